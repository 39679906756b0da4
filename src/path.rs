//! Request paths as the servers behind Envoy read them.
//!
//! A credential must not follow a path out of its route, and an access rule must
//! not be skipped by an encoding. Servers disagree on what a path means: Envoy
//! (with its defaults) and plain routers match the bytes as sent; RFC 3986
//! normalisers decode and resolve dot segments; nginx and IIS-style servers decode
//! every escape (`%2F` included, `\` as `/`) and merge slashes; Tomcat and Spring
//! drop `;parameters` from each segment first. latchkey reads the path in each of
//! those ways ([`View`]) and the caller routes every reading: if they do not all
//! pick the same route, the request is refused ([`crate::router::Router::find_path`]).
//!
//! Some paths are refused whatever the routes ([`PathError`]): control characters
//! (raw or encoded), a `#`, an invalid escape, a double escape (`%252e`) and a path
//! that does not start with `/`. No client needs them and servers read them in
//! too many ways.
//!
//! Every reading is a percent-decoded string, the form route paths are written in.
//! A path with no `%`, `;`, `\`, empty segment or dot segment reads the same in
//! every way; [`analyze`] recognises it in one pass and allocates nothing.

use std::borrow::Cow;

/// Why a path is refused whatever the routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (`*`, empty, or no leading `/`).
    NotAbsolute,
    /// A control character (NUL, CR, LF, DEL, …), raw or percent-encoded.
    ControlCharacter,
    /// A `#`: fragments are never sent to a server.
    Fragment,
    /// A `%` not followed by two hex digits.
    InvalidEscape,
    /// `%25` followed by two hex digits: decodes into another escape.
    DoubleEscape,
}

impl PathError {
    /// A short, stable name for logs and the reply body.
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "path_not_absolute",
            PathError::ControlCharacter => "path_control_character",
            PathError::Fragment => "path_fragment",
            PathError::InvalidEscape => "path_invalid_escape",
            PathError::DoubleEscape => "path_double_escape",
        }
    }
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the path does not start with \"/\"",
            PathError::ControlCharacter => "the path has a control character",
            PathError::Fragment => "the path has a \"#\"",
            PathError::InvalidEscape => "the path has a \"%\" not followed by two hex digits",
            PathError::DoubleEscape => "the path has a double percent-escape",
        })
    }
}

/// The ways a path is read. Each reading percent-decodes; they differ in structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The segments as sent (Envoy's default route matching, plain routers).
    /// `%2F` and `%5C` stay escaped: they are not separators here.
    AsSent,
    /// RFC 3986 §6.2.2: decoded, dot segments removed (§5.2.4), slashes kept.
    Rfc3986,
    /// nginx / IIS: every escape decoded (`%2F` is `/`), `\` is `/`, slashes
    /// merged, dot segments removed.
    Decoding,
    /// Tomcat / Spring: `;parameters` dropped from each segment, then decoded,
    /// slashes merged, dot segments removed.
    Servlet,
}

impl View {
    pub const ALL: [View; 4] = [View::AsSent, View::Rfc3986, View::Decoding, View::Servlet];
}

/// A path ready for matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readings<'a> {
    /// Every view reads the path as these bytes (already canonical, no escapes).
    Same(&'a str),
    /// The views' readings, in [`View::ALL`] order. `escapes_plain` when the raw
    /// path escapes a character that needs no escape (`%61`, `%2E`): a server
    /// matching raw bytes sees another path than the readings show. An escaped
    /// separator (`%2F`, `%5C`) needs no flag: the decoding view splits on it, so
    /// the readings themselves differ.
    Differ {
        readings: [String; 4],
        escapes_plain: bool,
    },
}

impl Readings<'_> {
    /// Whether some server reads another path than a raw-bytes matcher (Envoy's
    /// own routing with its defaults) does.
    pub fn unstable(&self) -> bool {
        match self {
            Readings::Same(_) => false,
            Readings::Differ {
                readings,
                escapes_plain,
            } => *escapes_plain || readings.iter().any(|x| x != &readings[0]),
        }
    }
}

/// RFC 3986 §2.3 unreserved characters: escaping them changes nothing.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes that read the same in every view, whatever surrounds them: printable
/// ASCII except `%`, `;`, `\`, `#`, and `/` and `.`, which only matter next to
/// a `/` ([`plain`] checks those pairs). A table: in the wasm VM one load beats
/// the comparisons.
#[allow(clippy::indexing_slicing)] // b < 0x7f < 256, at compile time
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = !matches!(b as u8, b'%' | b';' | b'\\' | b'#');
        b += 1;
    }
    t
};

/// The common path, in one pass: only [`PLAIN`] bytes, and no `/`
/// followed by `/` or `.` (an empty segment, or what may be a dot segment). A
/// path it returns reads as itself in every view; anything else (a `/.well-known`
/// too) goes through the full check.
fn plain(raw: &[u8]) -> Option<&str> {
    let mut after_slash = false;
    for &b in raw {
        if PLAIN.get(usize::from(b)) != Some(&true) || (after_slash && (b == b'/' || b == b'.')) {
            return None;
        }
        after_slash = b == b'/';
    }
    crate::text::utf8(raw)
}

/// Checks a raw path (without its query) and reads it in every [`View`].
pub fn analyze(raw: &[u8]) -> Result<Readings<'_>, PathError> {
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    match plain(raw) {
        Some(s) => Ok(Readings::Same(s)),
        None => analyze_all(raw),
    }
}

/// [`analyze`] byte by byte, for a path starting with `/`.
fn analyze_all(raw: &[u8]) -> Result<Readings<'_>, PathError> {
    let mut plain = true;
    let mut escapes_plain = false;
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            b'#' => return Err(PathError::Fragment),
            b'%' => {
                plain = false;
                let h = raw.get(i + 1).copied().and_then(hex_val);
                let l = raw.get(i + 2).copied().and_then(hex_val);
                let (Some(h), Some(l)) = (h, l) else {
                    return Err(PathError::InvalidEscape);
                };
                let decoded = (h << 4) | l;
                if decoded < 0x20 || decoded == 0x7f {
                    return Err(PathError::ControlCharacter);
                }
                escapes_plain |= is_unreserved(decoded);
                if decoded == b'%' && decodes_to_hex_pair(raw, i + 3) {
                    return Err(PathError::DoubleEscape);
                }
                i += 3;
                continue;
            }
            b';' | b'\\' | 0x80..=0xff => plain = false,
            b'/' => {
                // An empty segment (`//`) or a dot segment (`/.`, `/..`).
                let next = raw.get(i + 1).copied();
                let after = raw.get(i + 2).copied();
                let third = raw.get(i + 3).copied();
                let seg_end = |c: Option<u8>| matches!(c, None | Some(b'/'));
                if next == Some(b'/')
                    || (next == Some(b'.')
                        && (seg_end(after) || (after == Some(b'.') && seg_end(third))))
                {
                    plain = false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if plain {
        // Only ASCII without escapes: every view is the bytes themselves.
        if let Ok(s) = std::str::from_utf8(raw) {
            return Ok(Readings::Same(s));
        }
    }
    Ok(Readings::Differ {
        readings: View::ALL.map(|v| read(raw, v)),
        escapes_plain,
    })
}

/// Whether the two bytes that decoding yields from `at` on are hex digits, so that
/// a decoded `%` before them would form a new escape (`%2541`, `%25%34%31`).
fn decodes_to_hex_pair(raw: &[u8], at: usize) -> bool {
    let decoded_at = |i: usize| -> Option<(u8, usize)> {
        match raw.get(i).copied()? {
            b'%' => {
                let h = raw.get(i + 1).copied().and_then(hex_val)?;
                let l = raw.get(i + 2).copied().and_then(hex_val)?;
                Some(((h << 4) | l, i + 3))
            }
            b => Some((b, i + 1)),
        }
    };
    let Some((first, next)) = decoded_at(at) else {
        return false;
    };
    let Some((second, _)) = decoded_at(next) else {
        return false;
    };
    hex_val(first).is_some() && hex_val(second).is_some()
}

/// Reads a path (already checked by [`analyze`]) in one view.
pub fn read(raw: &[u8], view: View) -> String {
    let decode_separators = view == View::Decoding;
    // Segments of the raw path; the leading `/` is implied.
    let body = raw.get(1..).unwrap_or_default();
    let body: Cow<[u8]> = if decode_separators && body.contains(&b'\\') {
        Cow::Owned(
            body.iter()
                .map(|&b| if b == b'\\' { b'/' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(body)
    };
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for seg in body.split(|&b| b == b'/') {
        let seg = if view == View::Servlet {
            match seg.iter().position(|&b| b == b';') {
                Some(at) => seg.get(..at).unwrap_or(seg),
                None => seg,
            }
        } else {
            seg
        };
        let decoded = decode(seg, !decode_separators, view == View::Servlet);
        if decode_separators {
            // A decoded `/` or `\` separates segments too.
            let decoded: Vec<u8> = decoded
                .into_iter()
                .map(|b| if b == b'\\' { b'/' } else { b })
                .collect();
            segments.extend(decoded.split(|&b| b == b'/').map(<[u8]>::to_vec));
        } else {
            segments.push(decoded);
        }
    }
    let (resolve, merge) = match view {
        View::AsSent => (false, false),
        View::Rfc3986 => (true, false),
        View::Decoding | View::Servlet => (true, true),
    };
    let out = if resolve {
        resolve_segments(segments, merge)
    } else {
        segments
    };
    let mut path = Vec::with_capacity(raw.len());
    for seg in &out {
        path.push(b'/');
        path.extend_from_slice(seg);
    }
    if path.is_empty() {
        path.push(b'/');
    }
    String::from_utf8_lossy(&path).into_owned()
}

/// RFC 3986 §5.2.4 over segments: `.` is dropped, `..` drops the segment before
/// it; a dot segment at the end leaves a trailing slash. With `merge`, empty
/// segments other than the last (a trailing slash) are dropped first.
fn resolve_segments(segments: Vec<Vec<u8>>, merge: bool) -> Vec<Vec<u8>> {
    let n = segments.len();
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(n);
    for (i, seg) in segments.into_iter().enumerate() {
        let last = i + 1 == n;
        match seg.as_slice() {
            b"." => {
                if last {
                    out.push(Vec::new());
                }
            }
            b".." => {
                out.pop();
                if last {
                    out.push(Vec::new());
                }
            }
            b"" if merge && !last => {}
            _ => out.push(seg),
        }
    }
    out
}

/// Percent-decodes a segment. With `keep_separators`, `%2F` and `%5C` stay as
/// they are (upper-cased): in that view they are data, not separators. With
/// `keep_semicolon`, `%3B` stays too: the servlet view splits parameters off at a
/// raw `;`, so a decoded one must not look like one (reading a reading again
/// would then drop it; found by fuzzing: `/%3B`).
fn decode(seg: &[u8], keep_separators: bool, keep_semicolon: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(seg.len());
    let mut i = 0;
    while let Some(&b) = seg.get(i) {
        if b == b'%' {
            let h = seg.get(i + 1).copied().and_then(hex_val);
            let l = seg.get(i + 2).copied().and_then(hex_val);
            if let (Some(h), Some(l)) = (h, l) {
                let d = (h << 4) | l;
                if keep_separators && (d == b'/' || d == b'\\') {
                    out.extend_from_slice(if d == b'/' { b"%2F" } else { b"%5C" });
                } else if keep_semicolon && d == b';' {
                    out.extend_from_slice(b"%3B");
                } else {
                    out.push(d);
                }
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

pub(crate) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Why a configured route path can never match a reading (configuration check).
pub fn config_path_problem(p: &str) -> Option<&'static str> {
    if p.contains('%') {
        return Some("paths are matched percent-decoded: write the characters, not \"%XX\"");
    }
    if p.contains(';') || p.contains('\\') {
        return Some(
            "\";\" and \"\\\" can't be matched: requests with them are read in several ways",
        );
    }
    if p.chars()
        .any(|c| c.is_control() || c == '#' || c == '\u{fffd}')
    {
        return Some("has a control character, \"#\" or U+FFFD");
    }
    let body = p.strip_prefix('/').unwrap_or(p);
    let segs: Vec<&str> = body.split('/').collect();
    let n = segs.len();
    for (i, s) in segs.iter().enumerate() {
        if *s == "." || *s == ".." {
            return Some("has a dot segment (\".\" or \"..\")");
        }
        if s.is_empty() && i + 1 != n {
            return Some("has an empty segment (\"//\")");
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(p: &str) -> [String; 4] {
        match analyze(p.as_bytes()).unwrap() {
            Readings::Same(s) => [s, s, s, s].map(str::to_string),
            Readings::Differ { readings, .. } => readings,
        }
    }

    #[test]
    fn plain_paths_read_the_same_without_allocating() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/a.b/.c/..d/",
            "/a/b.",
            "/x/.hidden",
            "/a/...",
        ] {
            assert_eq!(analyze(p.as_bytes()), Ok(Readings::Same(p)), "{p}");
        }
    }

    #[test]
    fn dot_segments_resolve_in_normalising_views() {
        assert_eq!(
            views("/partner/../admin"),
            ["/partner/../admin", "/admin", "/admin", "/admin"]
        );
        assert_eq!(
            views("/partner/%2e%2e/admin"),
            ["/partner/../admin", "/admin", "/admin", "/admin"]
        );
        assert_eq!(
            views("/partner/.%2E/admin"),
            ["/partner/../admin", "/admin", "/admin", "/admin"]
        );
        assert_eq!(
            views("/partner/x/../../admin"),
            ["/partner/x/../../admin", "/admin", "/admin", "/admin"]
        );
        assert_eq!(views("/a/./b/."), ["/a/./b/.", "/a/b/", "/a/b/", "/a/b/"]);
        assert_eq!(views("/.."), ["/..", "/", "/", "/"]);
        assert_eq!(views("/../../a"), ["/../../a", "/a", "/a", "/a"]);
    }

    #[test]
    fn encoded_slashes_and_backslashes_separate_only_when_decoded() {
        assert_eq!(
            views("/partner/..%2fadmin"),
            [
                "/partner/..%2Fadmin",
                "/partner/..%2Fadmin",
                "/admin",
                "/partner/..%2Fadmin"
            ]
        );
        assert_eq!(
            views("/priv%2Fx"),
            ["/priv%2Fx", "/priv%2Fx", "/priv/x", "/priv%2Fx"]
        );
        assert_eq!(
            views("/a\\..\\priv"),
            ["/a\\..\\priv", "/a\\..\\priv", "/priv", "/a\\..\\priv"]
        );
        assert_eq!(views("/a%5cb")[2], "/a/b");
        assert_eq!(views("/a%5cb")[0], "/a%5Cb");
    }

    #[test]
    fn slashes_merge_only_in_merging_views() {
        assert_eq!(
            views("//priv/x"),
            ["//priv/x", "//priv/x", "/priv/x", "/priv/x"]
        );
        assert_eq!(views("/a//"), ["/a//", "/a//", "/a/", "/a/"]);
        // RFC 3986: `..` removes the empty segment before it.
        assert_eq!(views("/partner//../admin")[1], "/partner/admin");
        assert_eq!(views("/partner//../admin")[2], "/admin");
    }

    #[test]
    fn servlet_view_drops_segment_parameters() {
        assert_eq!(
            views("/partner/..;/admin"),
            [
                "/partner/..;/admin",
                "/partner/..;/admin",
                "/partner/..;/admin",
                "/admin"
            ]
        );
        assert_eq!(
            views("/priv;a=b/x"),
            ["/priv;a=b/x", "/priv;a=b/x", "/priv;a=b/x", "/priv/x"]
        );
        assert_eq!(views("/admin;x")[3], "/admin");
        // An encoded `;` is data in every view; the servlet view keeps it escaped,
        // so that it never reads as a parameter (fuzz crash input `/%3B`).
        assert_eq!(views("/admin%3bx")[0], "/admin;x");
        assert_eq!(views("/admin%3bx")[3], "/admin%3Bx");
        assert_eq!(
            read(read(b"/%3B", View::Servlet).as_bytes(), View::Servlet),
            "/%3B"
        );
    }

    // Equivalent mutants (`make mutants`): `(h << 4) | l` with `^` for `|`, in
    // `analyze`, `decodes_to_hex_pair` and `decode`. `h << 4` has no low bits and
    // `l` < 16, so `|`, `^` and `+` give the same byte; the escapes below (and in
    // every test here) decode alike under all three.
    #[test]
    fn unreserved_escapes_decode_everywhere() {
        assert_eq!(views("/%70riv/x"), ["/priv/x"; 4].map(str::to_string));
        assert_eq!(views("/adm%69n"), ["/admin"; 4].map(str::to_string));
        assert_eq!(views("/caf%C3%A9"), ["/café"; 4].map(str::to_string));
    }

    #[test]
    fn refused_whatever_the_routes() {
        assert_eq!(analyze(b""), Err(PathError::NotAbsolute));
        assert_eq!(analyze(b"*"), Err(PathError::NotAbsolute));
        assert_eq!(analyze(b"a/b"), Err(PathError::NotAbsolute));
        assert_eq!(analyze(b"/a\0b"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/a\rb"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/a\x7fb"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/x%00/../a"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/x%0a"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/x%7F"), Err(PathError::ControlCharacter));
        assert_eq!(analyze(b"/x#y"), Err(PathError::Fragment));
        assert_eq!(analyze(b"/x%zz"), Err(PathError::InvalidEscape));
        assert_eq!(analyze(b"/x%2"), Err(PathError::InvalidEscape));
        assert_eq!(analyze(b"/x%"), Err(PathError::InvalidEscape));
        assert_eq!(analyze(b"/x%252e%252e/"), Err(PathError::DoubleEscape));
        assert_eq!(analyze(b"/x%25%32%65"), Err(PathError::DoubleEscape));
        assert_eq!(analyze(b"/x%25%32e"), Err(PathError::DoubleEscape));
        // `%25` followed by text that is not an escape is a literal percent sign.
        assert_eq!(views("/100%25off")[0], "/100%off");
        assert_eq!(views("/100%25")[0], "/100%");
    }

    #[test]
    fn refusals_have_stable_names_and_messages() {
        let all = [
            PathError::NotAbsolute,
            PathError::ControlCharacter,
            PathError::Fragment,
            PathError::InvalidEscape,
            PathError::DoubleEscape,
        ];
        assert_eq!(
            all.map(PathError::reason),
            [
                "path_not_absolute",
                "path_control_character",
                "path_fragment",
                "path_invalid_escape",
                "path_double_escape"
            ]
        );
        assert_eq!(
            all.map(|e| e.to_string()),
            [
                "the path does not start with \"/\"",
                "the path has a control character",
                "the path has a \"#\"",
                "the path has a \"%\" not followed by two hex digits",
                "the path has a double percent-escape",
            ]
        );
    }

    /// The one-pass check reads every path as the full one does: every path
    /// over bytes that matter to either, up to five after the `/`.
    #[test]
    fn the_fast_pass_agrees_with_the_full_check() {
        const BYTES: &[u8] = b"/.a%2e;\\# \x01\x7f\x80~";
        fn walk(path: &mut Vec<u8>, fast: &mut usize) {
            assert_eq!(analyze(path), analyze_all(path), "{}", path.escape_ascii());
            *fast += usize::from(plain(path).is_some());
            if path.len() > 5 {
                return;
            }
            for &b in BYTES {
                path.push(b);
                walk(path, fast);
                path.pop();
            }
        }
        let mut fast = 0;
        walk(&mut vec![b'/'], &mut fast);
        // The fast pass takes a good share of them (so the comparison tests it).
        assert!(fast > 1000, "{fast}");
    }

    #[test]
    fn every_byte_after_an_escape_is_checked() {
        assert_eq!(analyze(b"/a%41#b"), Err(PathError::Fragment));
        assert_eq!(analyze(b"/a%41b\0c"), Err(PathError::ControlCharacter));
        assert_eq!(views("/a%41b%42c"), ["/aAbBc"; 4].map(str::to_string));
    }

    #[test]
    fn a_decoded_percent_is_a_double_escape_only_before_two_hex_digits() {
        // `%25` then one hex digit and something else: a literal percent sign.
        assert_eq!(views("/x%254z")[0], "/x%4z");
        assert_eq!(views("/x%25a-")[0], "/x%a-");
        // The second character comes from an escape that is itself invalid.
        assert_eq!(analyze(b"/x%25a%4z"), Err(PathError::InvalidEscape));
        assert_eq!(analyze(b"/x%25a%41"), Err(PathError::DoubleEscape));
        assert_eq!(analyze(b"/x%25%41%42"), Err(PathError::DoubleEscape));
        assert_eq!(views("/x%25%41%5a-")[1], "/x%AZ-");
    }

    #[test]
    fn non_utf8_bytes_read_lossily_and_alike() {
        let v = match analyze(b"/a\xff/b").unwrap() {
            Readings::Differ { readings, .. } => readings,
            Readings::Same(_) => panic!("not plain"),
        };
        assert!(v.iter().all(|x| x == "/a\u{fffd}/b"));
    }

    #[test]
    fn normalising_views_are_idempotent() {
        for p in [
            "/a/../b/./c//d/",
            "/a%2F..%2Fb",
            "/x;p/../y;q",
            "/..%5c..%5cz",
            "//a//..//b",
            "/%3B",
            "/a%3B;b/c",
        ] {
            for v in [View::Rfc3986, View::Decoding, View::Servlet] {
                let once = read(p.as_bytes(), v);
                assert_eq!(read(once.as_bytes(), v), once, "{p} {v:?}");
            }
        }
    }

    #[test]
    fn unstable_when_any_view_differs() {
        assert!(!analyze(b"/a/b").unwrap().unstable());
        assert!(!analyze(b"/a%20b").unwrap().unstable());
        assert!(analyze(b"/a;x").unwrap().unstable());
        assert!(analyze(b"/a//b").unwrap().unstable());
        assert!(analyze(b"/%61dmin").unwrap().unstable());
        assert!(analyze(b"/a%2Fb").unwrap().unstable());
        // An escaped separator makes the decoding view differ by itself (a `%2F`
        // or `%5C` never survives decoding), so it needs no `escapes_plain`.
        for p in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5c"] {
            let r = analyze(p.as_bytes()).unwrap();
            assert!(
                matches!(&r, Readings::Differ { readings, escapes_plain: false }
                    if readings[0] != readings[2]),
                "{p}: {r:?}"
            );
            assert!(r.unstable(), "{p}");
        }
        assert!(!analyze(b"/caf%C3%A9").unwrap().unstable());
    }

    #[test]
    fn configured_paths_must_be_canonical() {
        assert_eq!(config_path_problem("/partner/"), None);
        assert_eq!(config_path_problem("/a b/é"), None);
        assert_eq!(config_path_problem("/"), None);
        for bad in [
            "/a%20b",
            "/a;b",
            "/a\\b",
            "/a//b",
            "/a/./b",
            "/a/..",
            "/a\u{0}",
            "/a#b",
            "/a\u{fffd}",
        ] {
            assert!(config_path_problem(bad).is_some(), "{bad}");
        }
    }
}
