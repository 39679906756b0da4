//! What latchkey changes in a request: pure functions over the request as data.
//!
//! - A header injection removes every header the client sent under that name, and
//!   under any name an upstream could read as the same one (case-insensitive, `_`
//!   for `-`: CGI-style servers fold `x_api_key` into `X-API-KEY`), then sets one
//!   value.
//! - A query injection removes every parameter the client sent whose name decodes
//!   (percent-decoding, `+` as space, case-insensitively) to the configured name,
//!   in segments split on `&` and `;`, appends the key percent-encoded, and keeps
//!   every other byte of the query as sent.
//!
//! So whichever value an upstream picks (first, last, or a case-insensitive match)
//! it is latchkey's.

use crate::config::{Route, Target};
use crate::path::{hex_val, is_unreserved};
use crate::secret::Secret;
use std::rc::Rc;

/// One change to the request headers, applied in order by the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Remove every value of this (lowercase) header.
    Remove(String),
    /// Replace every value of this header with one value.
    /// (`name` shared with the route's configuration: no copy per request.)
    Set { name: Rc<str>, value: Secret },
    /// Replace `:path`.
    SetPath(Vec<u8>),
}

/// Whether a header an upstream receives as `sent` may be read as `target`.
pub fn same_header(sent: &str, target: &str) -> bool {
    sent.len() == target.len()
        && sent
            .bytes()
            .zip(target.bytes())
            .all(|(a, b)| fold(a) == fold(b))
}

fn fold(b: u8) -> u8 {
    match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

/// Removes of every header the request carries that an upstream may read as
/// `target` (the name itself too). A header the request doesn't carry needs no
/// removal: each edit is a host call.
pub fn remove_all<'a>(target: &str, sent: impl Iterator<Item = &'a str>, edits: &mut Vec<Edit>) {
    for name in sent {
        if same_header(name, target) {
            push_remove(edits, &name.to_ascii_lowercase());
        }
    }
}

fn push_remove(edits: &mut Vec<Edit>, name: &str) {
    if !edits
        .iter()
        .any(|e| matches!(e, Edit::Remove(n) if n == name))
    {
        edits.push(Edit::Remove(name.to_string()));
    }
}

/// The `:path` with every client parameter named `name` removed and `name=value`
/// appended, both percent-encoded.
pub fn rewrite_query(path: &[u8], name: &str, value: &str) -> Vec<u8> {
    let (base, query) = match path.iter().position(|&b| b == b'?') {
        Some(i) => (path.get(..i).unwrap_or(path), path.get(i + 1..)),
        None => (path, None),
    };
    let mut out = Vec::with_capacity(path.len() + name.len() + value.len() * 3 + 2);
    out.extend_from_slice(base);
    out.push(b'?');
    let mut started = false;
    if let Some(query) = query.filter(|q| !q.is_empty()) {
        let mut start = 0;
        let mut sep: Option<u8> = None;
        for i in 0..=query.len() {
            let at = query.get(i).copied();
            if at.is_some() && at != Some(b'&') && at != Some(b';') {
                continue;
            }
            let segment = query.get(start..i).unwrap_or_default();
            if !names_param(segment, name) {
                if started {
                    out.extend(sep);
                }
                out.extend_from_slice(segment);
                started = true;
            }
            sep = at;
            start = i + 1;
        }
    }
    if started {
        out.push(b'&');
    }
    encode_into(&mut out, name.as_bytes());
    out.push(b'=');
    encode_into(&mut out, value.as_bytes());
    out
}

/// Whether an upstream could read a `name=value` segment as parameter `name`:
/// its name percent-decodes (`+` as space) to `name`, ASCII case-insensitively,
/// with `.` and space read as `_` (PHP folds them so), and optionally followed by
/// an array suffix `[…]` (`name[]`, `name[0]`, `name[a][b]`: Express, PHP and
/// Rails read those as the same parameter).
pub fn names_param(segment: &[u8], name: &str) -> bool {
    let raw = match segment.iter().position(|&b| b == b'=') {
        Some(i) => segment.get(..i).unwrap_or(segment),
        None => segment,
    };
    // Decoded as it is compared: no copy per query parameter.
    let mut decoded = Decoded { raw, at: 0 };
    let same = name.as_bytes().iter().all(|&n| {
        decoded
            .next()
            .is_some_and(|d| param_fold(d) == param_fold(n))
    });
    same && matches!(decoded.next(), None | Some(b'['))
}

fn param_fold(b: u8) -> u8 {
    match b {
        b'.' | b' ' => b'_',
        b => b.to_ascii_lowercase(),
    }
}

/// Percent-decoding with `+` as space, byte by byte; invalid escapes stay as
/// they are.
struct Decoded<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Iterator for Decoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let b = *self.raw.get(self.at)?;
        self.at += 1;
        Some(match b {
            b'+' => b' ',
            b'%' => {
                let hex = self.raw.get(self.at).and_then(|h| hex_val(*h));
                let lo = self.raw.get(self.at + 1).and_then(|l| hex_val(*l));
                match (hex, lo) {
                    (Some(h), Some(l)) => {
                        self.at += 2;
                        // Equivalent mutant: `^` or `+` for `|` (no low bits in `h << 4`).
                        h << 4 | l
                    }
                    _ => b'%',
                }
            }
            b => b,
        })
    }
}

/// The whole decoding (never longer than `raw`: bounded so that a broken
/// iterator fails the tests rather than running on).
#[cfg(test)]
fn decode(raw: &[u8]) -> Vec<u8> {
    Decoded { raw, at: 0 }.take(raw.len() + 1).collect()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (runs of
/// those copied whole: a key or token usually is one).
fn encode_into(out: &mut Vec<u8>, raw: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut rest = raw;
    loop {
        let run = rest.iter().take_while(|&&b| is_unreserved(b)).count();
        let (plain, tail) = rest.split_at_checked(run).unwrap_or((rest, &[]));
        out.extend_from_slice(plain);
        let Some((&b, tail)) = tail.split_first() else {
            return;
        };
        out.push(b'%');
        out.push(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0'));
        out.push(HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0'));
        rest = tail;
    }
}

/// The credential serving one `inject` entry, resolved by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    pub secret: &'a Secret,
    /// Used when the entry has no `prefix`: `""` for API keys, `"Bearer "` for tokens.
    pub default_prefix: &'static str,
    /// `default_prefix` then the secret, when it was made ahead (a token copy).
    pub with_default: Option<&'a Secret>,
}

/// The header names a request carries, however the caller holds them.
pub trait Sent {
    fn names(&self) -> impl Iterator<Item = &str>;
}

impl Sent for [&str] {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().copied()
    }
}

impl Sent for [String] {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(String::as_str)
    }
}

impl Sent for [(&str, &[u8])] {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(k, _)| *k)
    }
}

/// Every change a matched route makes to a request, added to `edits`: its
/// injections (aligned with `resolved`) and its `strip` list. `sent` are the
/// header names the client sent; `path` is the original `:path`.
pub fn plan_into<'a, S: Sent + ?Sized>(
    route: &Route,
    resolved: impl IntoIterator<Item = Resolved<'a>>,
    sent: &S,
    path: &[u8],
    edits: &mut Vec<Edit>,
) {
    for name in &route.strip {
        remove_all(name, sent.names(), edits);
    }
    edits.reserve(route.inject.len());
    let mut new_path: Option<Vec<u8>> = None;
    for (inj, cred) in route.inject.iter().zip(resolved) {
        match &inj.target {
            Target::Header { name, prefix } => {
                // The name itself is replaced by the Set; its look-alikes are removed.
                for sent_name in sent.names() {
                    if sent_name != &**name && same_header(sent_name, name) {
                        push_remove(edits, &sent_name.to_ascii_lowercase());
                    }
                }
                // Equivalent mutant: deleting the first arm. `with_default` is
                // the default prefix and the secret, made ahead: the second arm
                // builds the same value, only not shared.
                let value = match (prefix, cred.with_default) {
                    (None, Some(made)) => made.clone(),
                    _ => prefixed(
                        prefix.as_deref().unwrap_or(cred.default_prefix),
                        cred.secret,
                    ),
                };
                edits.retain(|e| !matches!(e, Edit::Set { name: n, .. } if n == name));
                edits.push(Edit::Set {
                    name: name.clone(),
                    value,
                });
            }
            Target::ClusterHeader { name } => {
                // The chosen connection's cluster; the Envoy route reads it.
                edits.retain(|e| !matches!(e, Edit::Set { name: n, .. } if n == name));
                edits.push(Edit::Set {
                    name: name.clone(),
                    value: cred.secret.clone(),
                });
            }
            Target::Query { name } => {
                let current = new_path.as_deref().unwrap_or(path);
                new_path = Some(rewrite_query(current, name, cred.secret.expose()));
            }
        }
    }
    if let Some(p) = new_path {
        edits.push(Edit::SetPath(p));
    }
}

/// `prefix` then the secret; the secret itself (shared, not copied) without one.
fn prefixed(prefix: &str, secret: &Secret) -> Secret {
    if prefix.is_empty() {
        return secret.clone();
    }
    let secret = secret.expose();
    let mut value = String::with_capacity(prefix.len() + secret.len());
    value.push_str(prefix);
    value.push_str(secret);
    Secret::new(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(route: &Route, resolved: &[Resolved], sent: &[&str], path: &[u8]) -> Vec<Edit> {
        let mut edits = Vec::new();
        plan_into(route, resolved.iter().copied(), sent, path, &mut edits);
        edits
    }

    fn rq(path: &str, name: &str, value: &str) -> String {
        String::from_utf8(rewrite_query(path.as_bytes(), name, value)).unwrap()
    }

    #[test]
    fn appends_to_a_path_without_query() {
        assert_eq!(rq("/a", "api_key", "k1"), "/a?api_key=k1");
        assert_eq!(rq("/a?", "api_key", "k1"), "/a?api_key=k1");
    }

    #[test]
    fn client_api_key_param_is_replaced_and_rest_kept_byte_for_byte() {
        assert_eq!(
            rq("/a?x=1&api_key=evil&y=%2F+z&api_key=again", "api_key", "k1"),
            "/a?x=1&y=%2F+z&api_key=k1"
        );
        assert_eq!(rq("/a?api_key=evil", "api_key", "k1"), "/a?api_key=k1");
        assert_eq!(rq("/a?api_key&x", "api_key", "k1"), "/a?x&api_key=k1");
        assert_eq!(rq("/a?b=1&&c=2", "api_key", "k"), "/a?b=1&&c=2&api_key=k");
        assert_eq!(rq("/a?&b=1", "api_key", "k"), "/a?&b=1&api_key=k");
    }

    #[test]
    fn encoded_cased_and_semicolon_variants_are_removed() {
        for evil in [
            "api%5Fkey=e",
            "api%5fkey=e",
            "%61pi_key=e",
            "API_KEY=e",
            "Api_Key=e",
            "api_key=",
            "api_key",
            "%61%70%69%5f%6b%65%79=e",
        ] {
            assert_eq!(
                rq(&format!("/a?{evil}&z=1"), "api_key", "k"),
                "/a?z=1&api_key=k",
                "{evil}"
            );
        }
        assert_eq!(
            rq("/a?z=1;api_key=e;w=2", "api_key", "k"),
            "/a?z=1;w=2&api_key=k"
        );
        assert_eq!(rq("/a?api+key=e", "api key", "k"), "/a?api%20key=k");
        // Not the same name: kept.
        assert_eq!(
            rq("/a?api_keys=e&xapi_key=f", "api_key", "k"),
            "/a?api_keys=e&xapi_key=f&api_key=k"
        );
        assert_eq!(
            rq("/a?api%255Fkey=e", "api_key", "k"),
            "/a?api%255Fkey=e&api_key=k"
        );
    }

    #[test]
    fn array_and_php_folded_copies_are_removed() {
        for evil in [
            "api_key[]=e",
            "api_key[0]=e",
            "api_key[a][b]=e",
            "api_key%5B%5D=e",
            "api_key%5b0%5d=e",
            "API_KEY[]=e",
            "api.key=e",
            "api+key=e",
            "api%20key[]=e",
            "api_key[=e",
        ] {
            assert_eq!(
                rq(&format!("/a?{evil}&z=1"), "api_key", "k"),
                "/a?z=1&api_key=k",
                "{evil}"
            );
        }
        // Other names that merely start with the key's name are kept.
        assert_eq!(
            rq("/a?api_key_id=1&api_keyx[]=2&api_k=3", "api_key", "k"),
            "/a?api_key_id=1&api_keyx[]=2&api_k=3&api_key=k"
        );
    }

    #[test]
    fn key_and_name_are_percent_encoded() {
        assert_eq!(
            rq("/a", "key", "a b&c=d/é"),
            "/a?key=a%20b%26c%3Dd%2F%C3%A9"
        );
        assert_eq!(rq("/a", "k&y", "v"), "/a?k%26y=v");
    }

    #[test]
    fn invalid_escapes_and_non_utf8_survive() {
        let out = rewrite_query(b"/a?x=%zz&y=\xff", "k", "v");
        assert_eq!(out, b"/a?x=%zz&y=\xff&k=v".to_vec());
        assert_eq!(decode(b"%4"), b"%4");
        assert_eq!(decode(b"%"), b"%");
    }

    #[test]
    fn decoding_percent_escapes_and_plus() {
        assert_eq!(decode(b"a%41%7e+b"), b"aA~ b");
        assert_eq!(decode(b"%5f%5F%2B"), b"__+");
        assert_eq!(decode(b"%C3%A9"), "é".as_bytes());
        assert_eq!(decode(b"%g1%1"), b"%g1%1");
        // Equivalent mutant: `h << 4 | l` with `^` (or `+`) for `|`: `h << 4` has
        // no low bits, so the three are the same byte.
    }

    fn route(inject: Vec<(Target, &str)>, strip: &[&str]) -> Route {
        Route {
            name: "r".into(),
            matcher: Default::default(),
            access: None,
            inject: inject
                .into_iter()
                .map(|(target, _)| crate::config::Injection {
                    connections: vec![0],
                    target,
                })
                .collect(),
            strip: strip.iter().map(|s| s.to_string()).collect(),
            drop_token_on_401: true,
            needs_claims: true,
            binds_caller: false,
            per_user: false,
            fixed: None,
        }
    }

    #[test]
    fn plan_sets_headers_strips_and_rewrites_query_once() {
        let k1 = Secret::new("k1");
        let k2 = Secret::new("k2");
        let r = route(
            vec![
                (
                    Target::Header {
                        name: "authorization".into(),
                        prefix: None,
                    },
                    "",
                ),
                (
                    Target::Query {
                        name: "api_key".into(),
                    },
                    "",
                ),
                (
                    Target::Header {
                        name: "x-key".into(),
                        prefix: Some("Key ".into()),
                    },
                    "",
                ),
                (Target::Query { name: "sig".into() }, ""),
            ],
            &["cookie"],
        );
        let resolved = [
            Resolved {
                secret: &k1,
                default_prefix: "Bearer ",
                with_default: None,
            },
            Resolved {
                secret: &k2,
                default_prefix: "",
                with_default: None,
            },
            Resolved {
                secret: &k2,
                default_prefix: "",
                with_default: None,
            },
            Resolved {
                secret: &k1,
                default_prefix: "",
                with_default: None,
            },
        ];
        let sent = ["host", "x_key", "Cookie", "authorization"];
        let edits = plan(&r, &resolved, &sent, b"/p?api_key=evil&a=1");
        assert_eq!(
            edits,
            vec![
                Edit::Remove("cookie".into()),
                Edit::Set {
                    name: "authorization".into(),
                    value: Secret::new("Bearer k1")
                },
                Edit::Remove("x_key".into()),
                Edit::Set {
                    name: "x-key".into(),
                    value: Secret::new("Key k2")
                },
                Edit::SetPath(b"/p?a=1&api_key=k2&sig=k1".to_vec()),
            ]
        );
        assert!(!format!("{edits:?}").contains("k1"));
    }

    #[test]
    fn plan_sets_the_cluster_header_and_keeps_the_other_edits() {
        let cluster = Secret::new("partner_a");
        let key = Secret::new("k1");
        let r = route(
            vec![
                (
                    Target::Header {
                        name: "x-key".into(),
                        prefix: None,
                    },
                    "",
                ),
                (
                    Target::ClusterHeader {
                        name: "x-latchkey-cluster".into(),
                    },
                    "",
                ),
            ],
            &["cookie"],
        );
        let resolved = [
            Resolved {
                secret: &key,
                default_prefix: "",
                with_default: None,
            },
            Resolved {
                secret: &cluster,
                default_prefix: "",
                with_default: None,
            },
        ];
        let edits = plan(&r, &resolved, &["cookie", "x-key"], b"/p");
        assert_eq!(
            edits,
            vec![
                Edit::Remove("cookie".into()),
                Edit::Set {
                    name: "x-key".into(),
                    value: Secret::new("k1")
                },
                Edit::Set {
                    name: "x-latchkey-cluster".into(),
                    value: Secret::new("partner_a")
                },
            ]
        );
    }

    /// The glue passes the request's header pairs, a resumed request its saved
    /// names: both read as the plain list of names does.
    #[test]
    fn sent_names_read_alike_from_pairs_names_and_saved_strings() {
        let r = route(
            vec![(
                Target::Header {
                    name: "x-api-key".into(),
                    prefix: None,
                },
                "",
            )],
            &["cookie"],
        );
        let key = Secret::new("k");
        let res = [Resolved {
            secret: &key,
            default_prefix: "",
            with_default: None,
        }];
        let pairs: Vec<(&str, &[u8])> =
            vec![("x_api_key", b"evil"), ("cookie", b"c"), ("host", b"h")];
        let names: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
        let saved: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let by_names = plan(&r, &res, &names, b"/");
        assert!(by_names.contains(&Edit::Remove("x_api_key".into())));
        assert!(by_names.contains(&Edit::Remove("cookie".into())));
        let mut from_pairs = Vec::new();
        plan_into(&r, res.iter().copied(), &pairs[..], b"/", &mut from_pairs);
        assert_eq!(from_pairs, by_names);
        let mut from_saved = Vec::new();
        plan_into(&r, res.iter().copied(), &saved[..], b"/", &mut from_saved);
        assert_eq!(from_saved, by_names);
    }

    #[test]
    fn header_equivalence() {
        assert!(same_header("x-api-key", "x-api-key"));
        assert!(same_header("X_API_KEY", "x-api-key"));
        assert!(same_header("x_api-key", "x-api-key"));
        assert!(!same_header("x-api-keys", "x-api-key"));
        // Same length, another name: only `_`/`-` and case fold.
        assert!(!same_header("x-api-kez", "x-api-key"));
        assert!(!same_header("x.api.key", "x-api-key"));
        let mut edits = vec![];
        remove_all(
            "x-api-key",
            ["host", "x_api_key", "x-api-key", "X_Api-Key"].into_iter(),
            &mut edits,
        );
        assert_eq!(
            edits,
            vec![
                Edit::Remove("x_api_key".into()),
                Edit::Remove("x-api-key".into()),
                Edit::Remove("x_api-key".into())
            ]
        );
        // A header the request doesn't carry costs no host call.
        let mut edits = vec![];
        remove_all("x-api-key", ["host", "x-api-keys"].into_iter(), &mut edits);
        assert_eq!(edits, vec![]);
    }
}
