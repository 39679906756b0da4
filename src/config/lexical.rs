//! The lexical rules of the configuration: one function per kind of string a
//! field holds (a header name, a header value, a cluster name, a route path, …),
//! used by every field of that kind, so that one thing is never checked two ways.
//!
//! Each rule takes the configured text and returns it as the runtime wants it
//! (lowercased, normalized) or the refusal. A refusal carries no path: the
//! caller places it with [`ConfigError::at`], so that a path is only formatted
//! for an error (10,000 routes must load fast).

use super::error::ConfigError;

/// Headers whose value latchkey must not set: framing and routing belong to Envoy.
const ENVOY_OWNED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "keep-alive",
    "proxy-connection",
];

fn refused(value: &str, reason: &'static str) -> ConfigError {
    ConfigError::invalid("", value, reason)
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 §5.6.2 `token = 1*tchar`.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// A header name as Envoy stores it (RFC 9110 §5.1: a token), lowercased.
pub fn header_name(name: &str) -> Result<String, ConfigError> {
    if !is_token(name) {
        return Err(refused(name, "not a valid HTTP header name"));
    }
    Ok(name.to_ascii_lowercase())
}

/// A header latchkey writes (an injection's `header` or `cluster_header`): a
/// header name that Envoy doesn't own. Pseudo-headers (`:path`) are no tokens.
pub fn settable_header_name(name: &str) -> Result<String, ConfigError> {
    let lower = header_name(name)?;
    if ENVOY_OWNED_HEADERS.contains(&lower.as_str()) {
        return Err(refused(
            name,
            "Envoy owns this header; latchkey can't set it",
        ));
    }
    Ok(lower)
}

/// RFC 9110 §5.5 `field-vchar` (VCHAR / obs-text), SP or HTAB: the bytes a
/// field value may hold. Everything else is a control character (CTL, DEL).
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

fn is_whitespace(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A header value latchkey writes upstream whole (a Vault namespace, a client
/// certificate's cluster): RFC 9110 §5.5 `field-value`, VCHAR and obs-text
/// with SP and HTAB only inside. A recipient strips whitespace at either end,
/// and HTTP/2 codecs refuse it (RFC 9113 §8.2.1), so it is refused here rather
/// than sent. May be empty.
pub fn header_value(value: &str) -> Result<(), ConfigError> {
    if !value.bytes().all(is_field_byte) {
        return Err(refused(
            value,
            "not a valid header value (control characters)",
        ));
    }
    if value.starts_with(is_whitespace) || value.ends_with(is_whitespace) {
        return Err(refused(
            value,
            "not a valid header value (leading or trailing whitespace)",
        ));
    }
    Ok(())
}

/// The start of a header value (an injection's `prefix`): the credential follows
/// it, so it may end in SP or HTAB (`Bearer `), but not start with either. The
/// credential is a secret, checked when it is read. May be empty.
pub fn header_value_prefix(prefix: &str) -> Result<(), ConfigError> {
    if !prefix.bytes().all(is_field_byte) {
        return Err(refused(
            prefix,
            "not a valid header value (control characters)",
        ));
    }
    if prefix.starts_with(is_whitespace) {
        return Err(refused(
            prefix,
            "not a valid header value (leading whitespace)",
        ));
    }
    Ok(())
}

/// An Envoy cluster name (every `cluster` field): a non-empty [`header_value`].
/// A client certificate's cluster is written into a header (`cluster_header`),
/// and every cluster name may appear in a log line, where a control character
/// would start a line of its own.
pub fn cluster_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::empty_string(""));
    }
    header_value(name)
}

/// A query parameter latchkey sets (an injection's `query`): any non-empty
/// text; it is percent-encoded where it is written.
pub fn query_param_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::empty_string(""));
    }
    Ok(())
}

/// An HTTP method (RFC 9110 §9.1: a token), uppercased.
pub fn method(method: &str) -> Result<String, ConfigError> {
    if !is_token(method) {
        return Err(refused(method, "not an HTTP method token"));
    }
    Ok(method.to_ascii_uppercase())
}

/// A route's `host`: as the Host header holds it (a name, IPv4 or `[IPv6]`,
/// perhaps with a port), compared lowercased without port or trailing dot.
pub fn host(host: &str) -> Result<String, ConfigError> {
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    if !valid {
        return Err(refused(host, "not a host name"));
    }
    Ok(crate::router::normalize_host(host).to_ascii_lowercase())
}

/// A path a route matches or discovery answers on: absolute, without a query,
/// and read the one way every server reads it ([`crate::path::config_path_problem`]).
pub fn route_path(path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(refused(path, "must start with \"/\""));
    }
    if path.contains('?') {
        return Err(refused(
            path,
            "paths are matched without the query string; remove \"?…\"",
        ));
    }
    if let Some(problem) = crate::path::config_path_problem(path) {
        return Err(refused(path, problem));
    }
    Ok(path.to_string())
}

/// A claim name, perhaps dotted (`realm_access.roles`): no empty segment.
pub fn claim_name(claim: &str) -> Result<(), ConfigError> {
    claim_segments(claim).map(|_| ())
}

/// A claim name's segments, the path into the payload: separated by `.`;
/// inside a segment `\.` is a dot and `\\` a backslash (as kubectl's JSONPath
/// writes `kubernetes\.io/...`), so that names holding dots can be reached.
pub fn claim_segments(claim: &str) -> Result<Vec<String>, ConfigError> {
    let mut segments = Vec::new();
    let mut segment = String::new();
    let mut chars = claim.chars();
    while let Some(c) = chars.next() {
        match c {
            '.' => segments.push(std::mem::take(&mut segment)),
            '\\' => match chars.next() {
                Some(e @ ('.' | '\\')) => segment.push(e),
                _ => {
                    return Err(refused(
                        claim,
                        "not a claim name (a backslash escapes only \".\" or a backslash)",
                    ))
                }
            },
            c => segment.push(c),
        }
    }
    segments.push(segment);
    if segments.iter().any(String::is_empty) {
        return Err(refused(claim, "not a claim name (empty segment)"));
    }
    Ok(segments)
}

/// An OAuth scope: RFC 6749 §3.3 `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn scope_token(scope: &str) -> Result<(), ConfigError> {
    let valid = !scope.is_empty()
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
    if !valid {
        return Err(refused(
            scope,
            "not a valid scope token (RFC 6749 §3.3: no spaces, quotes or backslashes)",
        ));
    }
    Ok(())
}

/// A Vault path (a mount, a secret's path): segments of letters, digits and
/// `-_.` separated by single `/`, none of them `.` or `..`. Whether the value
/// is one is all this says: each field words its own refusal.
pub fn is_vault_path(path: &str) -> bool {
    path.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && !path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
}

/// A managed-identity `resource`, in the forms APIM's
/// `authentication-managed-identity` takes: an absolute URI of any scheme (a
/// resource or app ID URI: `https://vault.azure.net`, `api://backend-app`) or an
/// application (client) ID GUID. It is sent percent-encoded in the IMDS query.
pub fn managed_identity_resource(r: &str) -> Result<(), ConfigError> {
    absolute_uri_or_guid(r).map_err(|reason| refused(r, reason))
}

fn absolute_uri_or_guid(r: &str) -> Result<(), &'static str> {
    const EXPECTED: &str = "expected an absolute URI (https://vault.azure.net, api://backend-app) or an application (client) ID GUID";
    if r.trim().is_empty() {
        return Err("must not be empty or blank");
    }
    if !r.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("has spaces, control or non-ASCII characters");
    }
    if is_guid(r) {
        return Ok(());
    }
    // RFC 3986 §4.3: absolute-URI = scheme ":" hier-part [ "?" query ]
    let (scheme, rest) = r.split_once(':').ok_or(EXPECTED)?;
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok || rest.is_empty() {
        return Err(EXPECTED);
    }
    if let Some(after) = rest.strip_prefix("//") {
        if after.is_empty() || after.starts_with(['/', '?']) {
            return Err("has no host after \"//\"");
        }
    }
    if rest.contains('#') {
        return Err("must not have a #fragment");
    }
    if rest.bytes().any(|b| b"\"<>\\^`{|}".contains(&b)) {
        return Err("has characters a URI can't hold (percent-encode them)");
    }
    let bytes = rest.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err("has a \"%\" that is not a percent-encoded byte");
    }
    Ok(())
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hexadecimal (either case).
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An absolute `http(s)` URL a browser is sent to or comes back to
/// (`authorization_url`, `consent.redirect_uri`, `consent.return_to`): ASCII,
/// no user info, no fragment ([`super::http_url`]: `url::Url` would bring its
/// IDNA tables into the module). Returned as `scheme://authority/path?query`,
/// scheme and host lowercased and a default port dropped: the form latchkey
/// sends and compares.
pub fn browser_url(u: &str) -> Result<String, ConfigError> {
    let parsed = super::http_url::parse(u).map_err(|e| match e {
        super::http_url::UrlError::Credentials => {
            refused(u, "must not hold a user name or password")
        }
        e => ConfigError::invalid("", u, e.to_string()),
    })?;
    let scheme = if u
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
    {
        "https"
    } else {
        "http"
    };
    if u.contains('\\') {
        return Err(refused(u, "must not hold a backslash"));
    }
    Ok(format!("{scheme}://{}{}", parsed.authority, parsed.path))
}

/// A `consent.return_to` entry: a [`browser_url`] without a query whose path
/// ends in `/`, so that `https://portal.example.com/` never admits
/// `https://portal.example.com.evil.example/`.
pub fn return_to_prefix(u: &str) -> Result<String, ConfigError> {
    let url = browser_url(u)?;
    if url.contains('?') || !url.ends_with('/') {
        return Err(refused(
            u,
            "must end with \"/\" and have no query (it is a prefix of the URLs allowed)",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal as shown after the field's path.
    fn why<T: std::fmt::Debug>(r: Result<T, ConfigError>) -> String {
        match r {
            Ok(v) => panic!("accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn header_names_are_tokens_lowercased() {
        assert_eq!(header_name("X-Api-Key").unwrap(), "x-api-key");
        assert_eq!(
            header_name("a!#$%&'*+-.^_`|~9").unwrap(),
            "a!#$%&'*+-.^_`|~9"
        );
        for bad in [
            "", "x api", "x:y", ":path", "a\tb", "é", "a\"b", "a(b)", "a/b", "a@b",
        ] {
            assert_eq!(
                why(header_name(bad)),
                format!("invalid value {bad:?}: not a valid HTTP header name"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn settable_header_names_leave_envoy_s_own_alone() {
        assert_eq!(
            settable_header_name("Authorization").unwrap(),
            "authorization"
        );
        assert_eq!(settable_header_name("x-host").unwrap(), "x-host");
        for owned in ENVOY_OWNED_HEADERS {
            let upper = owned.to_ascii_uppercase();
            assert_eq!(
                why(settable_header_name(&upper)),
                format!("invalid value {upper:?}: Envoy owns this header; latchkey can't set it")
            );
        }
        assert_eq!(
            why(settable_header_name(":authority")),
            "invalid value \":authority\": not a valid HTTP header name"
        );
    }

    #[test]
    fn header_values_are_field_values() {
        for ok in ["", "team-a", "a b", "a\tb", "~é ü", "\u{80}", "x\u{7e}"] {
            assert!(header_value(ok).is_ok(), "{ok:?}");
        }
        for bad in ["a\r\nb", "\n", "a\u{0}", "a\u{1f}", "a\u{7f}", "\u{1b}[31m"] {
            assert_eq!(
                why(header_value(bad)),
                format!("invalid value {bad:?}: not a valid header value (control characters)"),
                "{bad:?}"
            );
        }
        for bad in [" a", "a ", "\ta", "a\t", " ", "\t"] {
            assert_eq!(
                why(header_value(bad)),
                format!(
                    "invalid value {bad:?}: not a valid header value (leading or trailing whitespace)"
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn header_value_prefixes_may_end_in_whitespace_only() {
        for ok in ["", "Bearer ", "Key", "Clé\t", "a b "] {
            assert!(header_value_prefix(ok).is_ok(), "{ok:?}");
        }
        for bad in [" Bearer", "\tKey", " "] {
            assert_eq!(
                why(header_value_prefix(bad)),
                format!("invalid value {bad:?}: not a valid header value (leading whitespace)"),
                "{bad:?}"
            );
        }
        for bad in ["Bearer\r\n", "a\u{7f}", "a\u{1f}", "\n", "\u{0}"] {
            assert_eq!(
                why(header_value_prefix(bad)),
                format!("invalid value {bad:?}: not a valid header value (control characters)"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cluster_names_are_non_empty_header_values() {
        for ok in ["idp", "outbound|443||idp.example.com", "a b", "é"] {
            assert!(cluster_name(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(why(cluster_name("")), "must not be an empty string");
        assert_eq!(
            why(cluster_name("idp\n")),
            "invalid value \"idp\\n\": not a valid header value (control characters)"
        );
        assert_eq!(
            why(cluster_name(" idp")),
            "invalid value \" idp\": not a valid header value (leading or trailing whitespace)"
        );
    }

    #[test]
    fn query_parameter_names_are_any_non_empty_text() {
        for ok in ["api_key", "a b", "é", "&=", "%"] {
            assert!(query_param_name(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(why(query_param_name("")), "must not be an empty string");
    }

    #[test]
    fn methods_are_tokens_uppercased() {
        assert_eq!(method("get").unwrap(), "GET");
        assert_eq!(method("M-SEARCH").unwrap(), "M-SEARCH");
        for bad in ["", "GE T", "GET\n", "GÉT"] {
            assert_eq!(
                why(method(bad)),
                format!("invalid value {bad:?}: not an HTTP method token")
            );
        }
    }

    #[test]
    fn hosts_are_compared_lowercased_without_port_or_trailing_dot() {
        assert_eq!(host("API.Example.com:8443").unwrap(), "api.example.com");
        assert_eq!(host("api.example.com.").unwrap(), "api.example.com");
        assert_eq!(host("[::1]:80").unwrap(), "[::1]");
        assert_eq!(host("a_b-c").unwrap(), "a_b-c");
        for bad in ["", "api example", "a/b", "é.com", "a@b"] {
            assert_eq!(
                why(host(bad)),
                format!("invalid value {bad:?}: not a host name")
            );
        }
    }

    #[test]
    fn route_paths_are_absolute_without_query() {
        assert_eq!(route_path("/partner/").unwrap(), "/partner/");
        assert_eq!(route_path("/").unwrap(), "/");
        assert_eq!(
            why(route_path("partner/")),
            "invalid value \"partner/\": must start with \"/\""
        );
        assert_eq!(
            why(route_path("")),
            "invalid value \"\": must start with \"/\""
        );
        assert_eq!(
            why(route_path("/a?b")),
            "invalid value \"/a?b\": paths are matched without the query string; remove \"?…\""
        );
        assert_eq!(
            why(route_path("/a//b")),
            "invalid value \"/a//b\": has an empty segment (\"//\")"
        );
    }

    #[test]
    fn claim_names_have_no_empty_segment() {
        for ok in ["sub", "realm_access.roles", "a.b.c", "é"] {
            assert!(claim_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", ".", "a.", ".a", "a..b", "\\.."] {
            assert_eq!(
                why(claim_name(bad)),
                format!("invalid value {bad:?}: not a claim name (empty segment)")
            );
        }
        // Escapes: a dot or a backslash inside a segment.
        let segments = |c| claim_segments(c).unwrap();
        assert_eq!(segments("a.b"), ["a", "b"]);
        assert_eq!(
            segments("https://example\\.com/roles"),
            ["https://example.com/roles"]
        );
        assert_eq!(
            segments("metadata.labels.kubernetes\\.io/name"),
            ["metadata", "labels", "kubernetes.io/name"]
        );
        assert_eq!(segments("a\\\\.b"), ["a\\", "b"]);
        assert_eq!(segments("\\."), ["."]);
        for bad in ["a\\", "a\\b", "\\"] {
            assert_eq!(
                why(claim_name(bad)),
                format!(
                    "invalid value {bad:?}: not a claim name (a backslash escapes only \".\" or a backslash)"
                )
            );
        }
    }

    #[test]
    fn scope_tokens_follow_rfc_6749() {
        for ok in [
            "orders.read",
            "!",
            "#[]~",
            "api://x/.default",
            "\u{21}\u{23}\u{5b}\u{5d}\u{7e}",
        ] {
            assert!(scope_token(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a b", "a\"b", "a\\b", "é", "a\u{7f}", "a\u{20}"] {
            assert_eq!(
                why(scope_token(bad)),
                format!("invalid value {bad:?}: not a valid scope token (RFC 6749 §3.3: no spaces, quotes or backslashes)"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn vault_paths_are_plain_segments() {
        for ok in ["secret", "kv/v2", "a.b/c-d_e", "..a/b.."] {
            assert!(is_vault_path(ok), "{ok:?}");
        }
        for bad in [
            "", "/", "a//b", "a/./b", "./a", "a/.", "a/b/..", "a b", "a/", "/a", "é",
        ] {
            assert!(!is_vault_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn managed_identity_resources_are_absolute_uris_or_guids() {
        for ok in [
            "https://vault.azure.net",
            "api://backend-app",
            "urn:example:backend",
            "a+b-c.d:x",
            "https://x/%2F",
            "7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8",
        ] {
            assert!(managed_identity_resource(ok).is_ok(), "{ok:?}");
        }
        assert_eq!(
            why(managed_identity_resource("a:%2")),
            "invalid value \"a:%2\": has a \"%\" that is not a percent-encoded byte"
        );
        assert_eq!(
            why(managed_identity_resource("\t")),
            "invalid value \"\\t\": must not be empty or blank"
        );
    }

    #[test]
    fn guids_are_five_hex_groups() {
        assert!(is_guid("7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8"));
        assert!(is_guid("7F3C1A2B-4D5E-6F70-8192-A3B4C5D6E7F8"));
        for bad in [
            "7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f",
            "7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8-0",
            "7f3c1a2b-4d5e-6f70-8192a3b4c5d6e7f8",
            "7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7fg",
            "7f3c1a2b4-d5e-6f70-8192-a3b4c5d6e7f8",
        ] {
            assert!(!is_guid(bad), "{bad}");
        }
    }
}
