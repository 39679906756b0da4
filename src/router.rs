//! Route matching: which route's auth configuration applies to a request.
//!
//! Routes are checked in configuration order and the first whose `match` holds
//! applies. To keep that cheap with thousands of routes, [`Router::new`] files
//! each route, at configure time, under its most selective field: the Envoy route
//! name, else the exact path, else the path prefix, else the host; routes with
//! none of these go to a list scanned for every request. A request then looks up
//! only the buckets its own values select (one hash lookup per distinct prefix
//! length for prefixes) and takes the lowest-numbered route that fully matches.
//! Nothing is allocated per request unless the Host header has upper-case letters.
//!
//! The router owns its match types ([`RouteMatch`], [`PathMatch`]): the
//! configuration builds them and hands them over, and nothing here depends on
//! the configuration.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::fnv::Fnv;

/// The router's keys are the configuration's own strings, and a request only
/// looks them up (never inserts): no key a client sends can make a bucket grow.
type Map = HashMap<String, Vec<usize>, BuildHasherDefault<Fnv>>;

use crate::path::{analyze, PathError, Readings};

/// A route's `match`: every field given must hold. Built by the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteMatch {
    pub route_name: Option<String>,
    /// Envoy route names starting with this (Envoy Gateway's generated names).
    pub route_name_prefix: Option<String>,
    /// Lowercased, without port.
    pub host: Option<String>,
    pub path: Option<PathMatch>,
    /// Uppercased.
    pub methods: Vec<String>,
}

impl AsRef<RouteMatch> for RouteMatch {
    fn as_ref(&self) -> &RouteMatch {
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

/// Why a request's path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRefusal {
    /// Refused whatever the routes.
    Invalid(PathError),
    /// The ways servers read the path pick different routes: one of them would
    /// take a credential out of its route, or skip a route's access rule.
    Ambiguous,
    /// Routes match on Envoy's route name, and the path reads differently once
    /// normalised: Envoy may have routed it by a reading the upstream won't serve.
    Unstable,
}

impl PathRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            PathRefusal::Invalid(e) => e.reason(),
            PathRefusal::Ambiguous => "path_ambiguous",
            PathRefusal::Unstable => "path_not_normalized",
        }
    }
}

/// What a request offers for matching. `path` excludes the query string.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub route_name: Option<&'a str>,
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
}

#[derive(Debug, Default)]
pub struct Router {
    matchers: Vec<RouteMatch>,
    by_route_name: Map,
    by_name_prefix: Map,
    /// Distinct lengths of the prefixes in `by_name_prefix`, ascending.
    name_prefix_lens: Vec<usize>,
    by_exact: Map,
    by_prefix: Map,
    /// Distinct lengths of the prefixes in `by_prefix`, ascending.
    prefix_lens: Vec<usize>,
    by_host: Map,
    rest: Vec<usize>,
    /// Whether any route matches on the host (else the host isn't normalized).
    matches_host: bool,
}

/// `map[key]`, without hashing `key` when the map is empty (most are).
fn bucket<'m>(map: &'m Map, key: &str) -> Option<&'m Vec<usize>> {
    if map.is_empty() {
        None
    } else {
        map.get(key)
    }
}

impl Router {
    /// Files every route's match; a route's number is its place in `routes`.
    pub fn new<R: AsRef<RouteMatch>>(routes: &[R]) -> Self {
        let mut r = Router::default();
        for (i, route) in routes.iter().enumerate() {
            let m = route.as_ref();
            r.matchers.push(m.clone());
            r.matches_host |= m.host.is_some();
            if let Some(name) = &m.route_name {
                r.by_route_name.entry(name.clone()).or_default().push(i);
            } else if let Some(p) = &m.route_name_prefix {
                if !r.name_prefix_lens.contains(&p.len()) {
                    r.name_prefix_lens.push(p.len());
                }
                r.by_name_prefix.entry(p.clone()).or_default().push(i);
            } else if let Some(PathMatch::Exact(p)) = &m.path {
                r.by_exact.entry(p.clone()).or_default().push(i);
            } else if let Some(PathMatch::Prefix(p)) = &m.path {
                if !r.prefix_lens.contains(&p.len()) {
                    r.prefix_lens.push(p.len());
                }
                r.by_prefix.entry(p.clone()).or_default().push(i);
            } else if let Some(h) = &m.host {
                r.by_host.entry(h.clone()).or_default().push(i);
            } else {
                r.rest.push(i);
            }
        }
        r.prefix_lens.sort_unstable();
        r.name_prefix_lens.sort_unstable();
        r
    }

    /// Whether any route matches on the Envoy route name (so the filter must read it).
    pub fn needs_route_name(&self) -> bool {
        !self.by_route_name.is_empty() || !self.by_name_prefix.is_empty()
    }

    /// The route for a request whose `req.path` is ignored: the path is taken raw
    /// (without its query) and read in every [`crate::path::View`]. The request
    /// gets a route only if every reading picks the same one.
    pub fn find_path(
        &self,
        req: &RequestInfo,
        raw_path: &[u8],
    ) -> Result<Option<usize>, PathRefusal> {
        let readings = analyze(raw_path).map_err(PathRefusal::Invalid)?;
        match &readings {
            Readings::Same(p) => Ok(self.find(&RequestInfo { path: p, ..*req })),
            Readings::Differ { readings: all, .. } => {
                if self.needs_route_name() && readings.unstable() {
                    return Err(PathRefusal::Unstable);
                }
                let mut found = None;
                for (i, p) in all.iter().enumerate() {
                    let r = self.find(&RequestInfo { path: p, ..*req });
                    if i == 0 {
                        found = r;
                    } else if r != found {
                        return Err(PathRefusal::Ambiguous);
                    }
                }
                Ok(found)
            }
        }
    }

    /// The index of the first route that matches, if any.
    pub fn find(&self, req: &RequestInfo) -> Option<usize> {
        let host = if self.matches_host {
            host_key(req.host)
        } else {
            Cow::Borrowed(req.host)
        };
        let req = RequestInfo {
            host: &host,
            ..*req
        };
        let mut best: Option<usize> = None;
        let mut scan = |list: &[usize]| {
            for &i in list {
                if best.is_some_and(|b| i >= b) {
                    return;
                }
                if self.matchers.get(i).is_some_and(|m| matches(m, &req)) {
                    best = Some(i);
                    return;
                }
            }
        };
        if let Some(name) = req.route_name {
            if let Some(list) = bucket(&self.by_route_name, name) {
                scan(list);
            }
            for &len in &self.name_prefix_lens {
                match name.get(..len) {
                    Some(head) => {
                        if let Some(list) = bucket(&self.by_name_prefix, head) {
                            scan(list);
                        }
                    }
                    None if len > name.len() => break,
                    // Inside a multi-byte character: longer prefixes still can.
                    None => {}
                }
            }
        }
        if let Some(list) = bucket(&self.by_exact, req.path) {
            scan(list);
        }
        for &len in &self.prefix_lens {
            if len > req.path.len() {
                break;
            }
            // A length inside a multi-byte character can't be a configured prefix
            // of this path; longer ones still can (found by fuzzing: `/é/`).
            let Some(head) = req.path.get(..len) else {
                continue;
            };
            if let Some(list) = bucket(&self.by_prefix, head) {
                scan(list);
            }
        }
        if let Some(list) = bucket(&self.by_host, req.host) {
            scan(list);
        }
        scan(&self.rest);
        best
    }
}

/// Whether every field the route gives holds. `req.host` is already normalized.
fn matches(m: &RouteMatch, req: &RequestInfo) -> bool {
    if let Some(name) = &m.route_name {
        if req.route_name != Some(name.as_str()) {
            return false;
        }
    }
    if let Some(prefix) = &m.route_name_prefix {
        if !req
            .route_name
            .is_some_and(|n| n.starts_with(prefix.as_str()))
        {
            return false;
        }
    }
    if let Some(h) = &m.host {
        if h != req.host {
            return false;
        }
    }
    match &m.path {
        Some(PathMatch::Exact(p)) if p != req.path => return false,
        Some(PathMatch::Prefix(p)) if !req.path.starts_with(p.as_str()) => return false,
        _ => {}
    }
    m.methods.is_empty() || m.methods.iter().any(|x| x == req.method)
}

/// The host without its port or a trailing dot: `api.example.com:8443` →
/// `api.example.com`, `[::1]:80` → `[::1]`. Case is left alone.
pub fn normalize_host(host: &str) -> &str {
    let host = if host.starts_with('[') {
        match host.find(']') {
            Some(end) => host.get(..=end).unwrap_or(host),
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            // A single colon is a port separator; more would be a bare IPv6 address.
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

fn host_key(host: &str) -> Cow<'_, str> {
    let h = normalize_host(host);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        rn: Option<&'a str>,
        host: &'a str,
        path: &'a str,
        method: &'a str,
    ) -> RequestInfo<'a> {
        RequestInfo {
            route_name: rn,
            host,
            path,
            method,
        }
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch::Prefix(p.into())),
            ..Default::default()
        }
    }

    #[test]
    fn first_match_wins_across_buckets() {
        let routes = vec![
            RouteMatch {
                host: Some("api.test".into()),
                ..Default::default()
            },
            prefix("/orders"),
            RouteMatch {
                route_name: Some("orders".into()),
                ..Default::default()
            },
            RouteMatch::default(),
        ];
        let r = Router::new(&routes);
        assert_eq!(
            r.find(&req(Some("orders"), "API.test:8080", "/orders/1", "GET")),
            Some(0)
        );
        assert_eq!(
            r.find(&req(Some("orders"), "other", "/orders/1", "GET")),
            Some(1)
        );
        assert_eq!(r.find(&req(Some("orders"), "other", "/x", "GET")), Some(2));
        assert_eq!(r.find(&req(None, "other", "/x", "GET")), Some(3));
        assert!(r.needs_route_name());
    }

    #[test]
    fn all_given_fields_must_hold() {
        let routes = vec![RouteMatch {
            route_name: Some("p".into()),
            host: Some("h".into()),
            path: Some(PathMatch::Exact("/a".into())),
            methods: vec!["GET".into(), "HEAD".into()],
            ..Default::default()
        }];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(Some("p"), "h", "/a", "HEAD")), Some(0));
        assert_eq!(r.find(&req(Some("p"), "h", "/a", "POST")), None);
        assert_eq!(r.find(&req(Some("p"), "h", "/a/", "GET")), None);
        assert_eq!(r.find(&req(Some("p"), "g", "/a", "GET")), None);
        assert_eq!(r.find(&req(Some("q"), "h", "/a", "GET")), None);
        assert_eq!(r.find(&req(None, "h", "/a", "GET")), None);
    }

    #[test]
    fn a_route_name_route_with_a_path_checks_the_path() {
        // Filed under its route name, so the lookup doesn't check the path: `matches` does.
        let routes = vec![
            RouteMatch {
                route_name: Some("api".into()),
                path: Some(PathMatch::Prefix("/admin/".into())),
                ..Default::default()
            },
            RouteMatch {
                route_name: Some("api".into()),
                ..Default::default()
            },
        ];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(Some("api"), "h", "/admin/x", "GET")), Some(0));
        assert_eq!(r.find(&req(Some("api"), "h", "/public/x", "GET")), Some(1));
        assert_eq!(r.find(&req(Some("api"), "h", "/admin", "GET")), Some(1));
        assert_eq!(r.find(&req(None, "h", "/admin/x", "GET")), None);
    }

    #[test]
    fn route_name_is_read_only_when_a_route_matches_on_it() {
        assert!(!Router::new(&[prefix("/a/")]).needs_route_name());
        assert!(!Router::new::<RouteMatch>(&[]).needs_route_name());
        let by_name = RouteMatch {
            route_name: Some("n".into()),
            ..Default::default()
        };
        assert!(Router::new(&[prefix("/a/"), by_name]).needs_route_name());
    }

    fn name_prefix(p: &str) -> RouteMatch {
        RouteMatch {
            route_name_prefix: Some(p.into()),
            ..Default::default()
        }
    }

    #[test]
    fn route_name_prefixes_match_generated_names_in_route_order() {
        // Envoy Gateway names routes `httproute/<ns>/<name>/rule/<n>`.
        let routes = vec![
            name_prefix("httproute/shop/orders/rule/1"),
            name_prefix("httproute/shop/orders/"),
            RouteMatch {
                route_name_prefix: Some("httproute/shop/".into()),
                path: Some(PathMatch::Prefix("/admin/".into())),
                ..Default::default()
            },
            name_prefix("httproute/shop/"),
            name_prefix("h\u{e9}/"),
        ];
        let r = Router::new(&routes);
        assert!(r.needs_route_name());
        let name = |n| r.find(&req(Some(n), "h", "/x", "GET"));
        assert_eq!(name("httproute/shop/orders/rule/1"), Some(0));
        assert_eq!(name("httproute/shop/orders/rule/10"), Some(0));
        assert_eq!(name("httproute/shop/orders/rule/0"), Some(1));
        assert_eq!(name("httproute/shop/cart/rule/0"), Some(3));
        assert_eq!(
            r.find(&req(
                Some("httproute/shop/cart/rule/0"),
                "h",
                "/admin/1",
                "GET"
            )),
            Some(2)
        );
        assert_eq!(name("httproute/shop"), None);
        assert_eq!(name("httproute/other/orders/rule/1"), None);
        assert_eq!(name("HTTPROUTE/shop/orders/rule/1"), None);
        assert_eq!(r.find(&req(None, "h", "/x", "GET")), None);
        // A length inside a multi-byte character is skipped, not the end.
        assert_eq!(name("\u{e9}\u{e9}"), None);
        assert_eq!(name("h\u{e9}/x"), Some(4));
        // A shorter prefix's length falling inside a character doesn't end the
        // search: a longer one can still match. (The guard `len > name.len()`
        // only ends it early: when it is false, every longer length misses too,
        // so mutants making it `false`, `==` or `>=` are equivalent.)
        let r = Router::new(&[name_prefix("a"), name_prefix("\u{e9}")]);
        assert_eq!(r.find(&req(Some("\u{e9}x"), "h", "/", "GET")), Some(1));
        // An exact name still wins over a later prefix, and a prefix over a later exact name.
        let r = Router::new(&[
            name_prefix("api/"),
            RouteMatch {
                route_name: Some("api/v1".into()),
                ..Default::default()
            },
        ]);
        assert_eq!(r.find(&req(Some("api/v1"), "h", "/", "GET")), Some(0));
        assert!(!Router::new(&[prefix("/a/")]).needs_route_name());
        assert!(Router::new(&[name_prefix("a")]).needs_route_name());
    }

    #[test]
    fn prefixes_of_several_lengths() {
        let routes = vec![prefix("/a/b/"), prefix("/a/"), prefix("/")];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(None, "h", "/a/b/c", "GET")), Some(0));
        assert_eq!(r.find(&req(None, "h", "/a/bc", "GET")), Some(1));
        assert_eq!(r.find(&req(None, "h", "/z", "GET")), Some(2));
        // A prefix longer than the path, and a non-ASCII path, are no trouble.
        assert_eq!(r.find(&req(None, "h", "/", "GET")), Some(2));
        assert_eq!(r.find(&req(None, "h", "/é", "GET")), Some(2));
    }

    #[test]
    fn a_prefix_length_inside_a_multibyte_character_does_not_end_the_search() {
        // Fuzz crash input `/é/` with routes `/x` and `/é/`: length 2 falls inside `é`.
        let routes = vec![prefix("/x"), prefix("/é/"), prefix("/日本/")];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(None, "h", "/é/", "GET")), Some(1));
        assert_eq!(r.find(&req(None, "h", "/é/x", "GET")), Some(1));
        assert_eq!(r.find(&req(None, "h", "/日本/a", "GET")), Some(2));
        assert_eq!(find_path(&r, "/%C3%A9/x"), Ok(Some(1)));
    }

    #[test]
    fn later_catch_all_does_not_shadow_earlier_specific_route() {
        let routes = vec![prefix("/x"), RouteMatch::default()];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(None, "h", "/x", "GET")), Some(0));
        let routes = vec![RouteMatch::default(), prefix("/x")];
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(None, "h", "/x", "GET")), Some(0));
    }

    #[test]
    fn many_routes_last_one_matches() {
        let routes: Vec<RouteMatch> = (0..10_000)
            .map(|i| RouteMatch {
                route_name: Some(format!("r{i}")),
                ..Default::default()
            })
            .chain((0..10_000).map(|i| prefix(&format!("/p{i}/"))))
            .collect();
        let r = Router::new(&routes);
        assert_eq!(r.find(&req(Some("r9999"), "h", "/", "GET")), Some(9999));
        assert_eq!(r.find(&req(None, "h", "/p9999/x", "GET")), Some(19_999));
        assert_eq!(r.find(&req(None, "h", "/q", "GET")), None);
    }

    fn find_path(r: &Router, path: &str) -> Result<Option<usize>, PathRefusal> {
        r.find_path(&req(None, "h", "", "GET"), path.as_bytes())
    }

    #[test]
    fn a_credential_never_follows_a_path_out_of_its_route() {
        let routes = vec![prefix("/partner/"), prefix("/admin")];
        let r = Router::new(&routes);
        assert_eq!(find_path(&r, "/partner/x"), Ok(Some(0)));
        assert_eq!(find_path(&r, "/partner/x;v=1"), Ok(Some(0)));
        assert_eq!(find_path(&r, "/partner/a%20b"), Ok(Some(0)));
        for p in [
            "/partner/../admin",
            "/partner/%2e%2e/admin",
            "/partner/%2E%2E/admin",
            "/partner/.%2e/admin",
            "/partner/..%2fadmin",
            "/partner/%2e%2e%2fadmin",
            "/partner/x/../../admin",
            "/partner/..;/admin",
            "/partner/..\\admin",
            "/partner//../admin",
        ] {
            assert_eq!(find_path(&r, p), Err(PathRefusal::Ambiguous), "{p}");
        }
        assert_eq!(
            find_path(&r, "/partner/x%00/../../admin"),
            Err(PathRefusal::Invalid(PathError::ControlCharacter))
        );
    }

    #[test]
    fn no_encoding_skips_a_protected_route() {
        let routes = vec![
            prefix("/priv/"),
            RouteMatch {
                path: Some(PathMatch::Exact("/admin".into())),
                ..Default::default()
            },
        ];
        let r = Router::new(&routes);
        // Every reading lands in the protected route: checked there.
        for p in ["/%70riv/x", "/adm%69n", "/%61dmin"] {
            assert!(matches!(find_path(&r, p), Ok(Some(_))), "{p}");
        }
        // Some reading lands in it and another doesn't: refused.
        for p in [
            "//priv/x",
            "/./priv/x",
            "/x/../priv/x",
            "/%2e/priv/x",
            "/priv%2Fx",
            "/%2fpriv/x",
            "/priv;a=b/x",
            "//admin",
            "/./admin",
            "/x/../admin",
            "/admin;x",
        ] {
            assert_eq!(find_path(&r, p), Err(PathRefusal::Ambiguous), "{p}");
        }
        // Unrelated odd paths are nobody's business.
        assert_eq!(find_path(&r, "/static//x"), Ok(None));
        assert_eq!(find_path(&r, "/a/../b;c"), Ok(None));
    }

    #[test]
    fn route_name_routes_refuse_paths_that_normalise_differently() {
        let routes = vec![RouteMatch {
            route_name: Some("admin".into()),
            ..Default::default()
        }];
        let r = Router::new(&routes);
        let by_name = |p: &str| r.find_path(&req(Some("default"), "h", "", "GET"), p.as_bytes());
        assert_eq!(by_name("/x/../admin"), Err(PathRefusal::Unstable));
        assert_eq!(by_name("/admin;x"), Err(PathRefusal::Unstable));
        assert_eq!(by_name("//admin"), Err(PathRefusal::Unstable));
        assert_eq!(by_name("/%61dmin"), Err(PathRefusal::Unstable));
        assert_eq!(by_name("/a%2Fb"), Err(PathRefusal::Unstable));
        assert_eq!(by_name("/a%20b"), Ok(None));
        assert_eq!(by_name("/admin"), Ok(None));
        assert_eq!(PathRefusal::Unstable.reason(), "path_not_normalized");
        assert_eq!(PathRefusal::Ambiguous.reason(), "path_ambiguous");
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("api.example.com:8443"), "api.example.com");
        assert_eq!(normalize_host("api.example.com."), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("::1"), "::1");
        assert_eq!(host_key("API.Example.COM:1"), "api.example.com");
    }
}
