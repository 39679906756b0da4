//! Discovery: what this caller may use (SPEC v1.1, `discovery.path`).
//!
//! A `GET` of the configured path is answered by latchkey itself with the routes
//! the caller may use and, per inject entry, the connection it would get, its
//! provider type and where the credential goes. It is what API Center's portal
//! shows a signed-in user. Built from the same decision the request path makes
//! ([`crate::policy::decide`]), so it never lists a route the caller would be
//! refused on. It holds no secret, no access policy (not the caller's, not
//! anyone else's) and no claim: only names and where credentials go.
//!
//! **Cost.** Everything that does not depend on the caller is done once per
//! configuration, by [`Index::new`]: each route's `match` object and name, and
//! each inject entry's object for every connection it may pick, serialized to
//! JSON text. Answering a caller ([`Index::answer`]) only evaluates policy (each
//! distinct `access`, of routes and connections alike, at most once per answer,
//! with the same result as `decide`) and concatenates that text; no JSON tree is
//! built per request.
//!
//! **Size cap.** An answer lists at most [`MAX_ROUTES`] (1,000) routes and is at
//! most [`MAX_BYTES`] (256 KiB) long. When the caller may use more, the first
//! routes that fit are listed (in configuration order) and the document says so
//! with `"truncated": true`; it is valid JSON either way. Without a cut the
//! document has no `truncated` member and is exactly what [`document`] builds.
//! Policy is still evaluated route by route until the cut, so an answer's CPU is
//! bounded by the number of routes and its memory by [`MAX_BYTES`].

use std::collections::HashMap;
use std::ops::Range;

use serde_json::{json, Map, Value};

use crate::claims::Identity;
use crate::config::{
    Access, Config, Connection, Injection, PathMatch, ProviderKind, RouteMatch, Target,
};
use crate::policy::{admits, decide, Decision};

/// At most this many routes in one answer (then `"truncated": true`).
pub const MAX_ROUTES: usize = 1_000;
/// At most this many bytes in one answer, `truncated` member included.
pub const MAX_BYTES: usize = 256 * 1024;

/// How much one answer may hold; [`Limits::DEFAULT`] is [`MAX_ROUTES`] and [`MAX_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub routes: usize,
    pub bytes: usize,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        routes: MAX_ROUTES,
        bytes: MAX_BYTES,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

const OPEN_AUTHENTICATED: &str = "{\"authenticated\":true,\"routes\":[";
const OPEN_ANONYMOUS: &str = "{\"authenticated\":false,\"routes\":[";
const ROUTE_OPEN: &str = "{\"inject\":[";
const CLOSE: &str = "]}";
const CLOSE_TRUNCATED: &str = "],\"truncated\":true}";

/// What discovery answers for one configuration, serialized ahead of time.
///
/// Built once per configuration ([`Index::new`]) and answered from with that same
/// configuration ([`Index::answer`]): the index keeps text and indices, the
/// configuration keeps the policies.
#[derive(Debug, Default)]
pub struct Index {
    /// Every fragment, back to back (identical inject entries stored once).
    text: String,
    /// Per configured route, in order.
    routes: Vec<RouteText>,
    /// Per inject entry of every route, route after route: its candidates in `picks`.
    entries: Vec<Range<usize>>,
    /// Per candidate connection of every entry, entry after entry, in order of preference.
    picks: Vec<Pick>,
    /// The distinct `access` policies of routes and connections, each named by
    /// where the configuration holds it: asked at most once per answer.
    policies: Vec<Source>,
}

#[derive(Debug)]
struct RouteText {
    /// The route's `access` in [`Index::policies`] (`None`: no route policy).
    access: Option<usize>,
    /// `],"match":{…},"name":"…"}`: all of the route's object after its entries.
    tail: Range<usize>,
    /// Its entries in [`Index::entries`].
    entries: Range<usize>,
}

#[derive(Debug)]
struct Pick {
    /// The connection's `access` in [`Index::policies`] (`None`: it has none and
    /// admits nobody, as in [`decide`]).
    access: Option<usize>,
    /// The entry's object when this connection is picked; `None` when the
    /// connection or its provider is missing (then the entry is left out, as
    /// [`document`] does).
    text: Option<Range<usize>>,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Route(usize),
    Connection(usize),
}

/// An `access` as a hash key (every field of [`Access`] as of writing; equal keys
/// are also compared whole, so a field added later can't merge two policies).
type AccessKey<'a> = (
    bool,
    bool,
    &'a [String],
    &'a [String],
    &'a [(usize, Vec<String>)],
);

fn access_key(a: &Access) -> AccessKey<'_> {
    (a.public, a.authenticated, &a.users, &a.groups, &a.claims)
}

/// Per answer: whether each policy admits the caller, asked once.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admitted {
    Unknown,
    Yes,
    No,
}

impl Index {
    pub fn new(config: &Config) -> Index {
        let mut ix = Index::default();
        let mut policies: HashMap<AccessKey<'_>, usize> = HashMap::new();
        // An entry's text depends only on the connection and where the credential goes.
        let mut texts: HashMap<(usize, &str, &str), Option<Range<usize>>> = HashMap::new();
        let connection_access: Vec<Option<usize>> = (0..config.connections.len())
            .map(|ci| {
                let a = config.connection(ci)?.access.as_ref()?;
                Some(ix.policy(config, &mut policies, a, Source::Connection(ci)))
            })
            .collect();
        for (ri, route) in config.routes.iter().enumerate() {
            let access = route
                .access
                .as_ref()
                .map(|a| ix.policy(config, &mut policies, a, Source::Route(ri)));
            let first_entry = ix.entries.len();
            for inj in &route.inject {
                let first_pick = ix.picks.len();
                for &ci in &inj.connections {
                    let key = (ci, target_member(&inj.target), target_name(&inj.target));
                    let text = match texts.get(&key) {
                        Some(t) => t.clone(),
                        None => {
                            let t = entry_object(config, config.connection(ci), inj)
                                .map(|v| ix.push_text(&v.to_string()));
                            texts.insert(key, t.clone());
                            t
                        }
                    };
                    ix.picks.push(Pick {
                        access: connection_access.get(ci).copied().flatten(),
                        text,
                    });
                }
                ix.entries.push(first_pick..ix.picks.len());
            }
            let start = ix.text.len();
            ix.text.push_str("],\"match\":");
            write_match(&mut ix.text, &route.matcher);
            ix.text.push_str(",\"name\":");
            push_json_str(&mut ix.text, &route.name);
            ix.text.push('}');
            ix.routes.push(RouteText {
                access,
                tail: start..ix.text.len(),
                entries: first_entry..ix.entries.len(),
            });
        }
        ix.text.shrink_to_fit();
        ix.routes.shrink_to_fit();
        ix.entries.shrink_to_fit();
        ix.picks.shrink_to_fit();
        ix.policies.shrink_to_fit();
        ix
    }

    /// The policy number of `access` (found at `source`): an equal one's, or a new one.
    fn policy<'a>(
        &mut self,
        config: &Config,
        seen: &mut HashMap<AccessKey<'a>, usize>,
        access: &'a Access,
        source: Source,
    ) -> usize {
        let key = access_key(access);
        if let Some(&p) = seen.get(&key) {
            if self.access(config, p) == Some(access) {
                return p;
            }
        }
        let p = self.policies.len();
        self.policies.push(source);
        seen.entry(key).or_insert(p);
        p
    }

    fn access<'c>(&self, config: &'c Config, p: usize) -> Option<&'c Access> {
        match self.policies.get(p)? {
            Source::Route(ri) => config.route(*ri)?.access.as_ref(),
            Source::Connection(ci) => config.connection(*ci)?.access.as_ref(),
        }
    }

    fn push_text(&mut self, t: &str) -> Range<usize> {
        let start = self.text.len();
        self.text.push_str(t);
        start..self.text.len()
    }

    fn slice(&self, r: &Range<usize>) -> &str {
        self.text.get(r.clone()).unwrap_or_default()
    }

    /// Whether policy `p` admits the caller, asked once per answer (`memo`).
    fn admits(
        &self,
        config: &Config,
        p: usize,
        id: Option<&Identity>,
        memo: &mut [Admitted],
    ) -> bool {
        let ask = || self.access(config, p).is_some_and(|a| admits(a, id));
        let Some(known) = memo.get_mut(p) else {
            return ask();
        };
        if *known == Admitted::Unknown {
            *known = if ask() { Admitted::Yes } else { Admitted::No };
        }
        *known == Admitted::Yes
    }

    /// The discovery document for a caller (`None`: no claims), as JSON text, within
    /// [`Limits::DEFAULT`]. `config` is the one the index was built from.
    pub fn answer(&self, config: &Config, id: Option<&Identity>) -> String {
        self.answer_within(config, id, Limits::DEFAULT)
    }

    /// [`Index::answer`] with other limits (tests, benches). The text is at most
    /// `limits.bytes` long (unless even an empty list is longer) and so is the
    /// buffer it is written in.
    pub fn answer_within(&self, config: &Config, id: Option<&Identity>, limits: Limits) -> String {
        let open = if id.is_some() {
            OPEN_AUTHENTICATED
        } else {
            OPEN_ANONYMOUS
        };
        let mut out =
            String::with_capacity(limits.bytes.clamp(open.len() + CLOSE_TRUNCATED.len(), 4096));
        out.push_str(open);
        let mut memo = vec![Admitted::Unknown; self.policies.len()];
        let mut chosen: Vec<&Range<usize>> = Vec::new();
        let mut listed = 0usize;
        let mut truncated = false;
        for rt in &self.routes {
            if let Some(p) = rt.access {
                if !self.admits(config, p, id, &mut memo) {
                    continue;
                }
            }
            if !self.choose(config, id, rt, &mut memo, &mut chosen) {
                continue;
            }
            // The route's text: a comma before it, its entries with commas between.
            let entries =
                chosen.iter().map(|t| t.len()).sum::<usize>() + chosen.len().saturating_sub(1);
            let len = usize::from(listed > 0) + ROUTE_OPEN.len() + entries + rt.tail.len();
            let need = out.len() + len + CLOSE_TRUNCATED.len();
            if listed >= limits.routes || need > limits.bytes {
                truncated = true;
                break;
            }
            if need > out.capacity() {
                // Grow as a String would, but never past the limit.
                let target = out.capacity().saturating_mul(2).min(limits.bytes).max(need);
                out.reserve_exact(target - out.len());
            }
            if listed > 0 {
                out.push(',');
            }
            out.push_str(ROUTE_OPEN);
            for (i, t) in chosen.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(self.slice(t));
            }
            out.push_str(self.slice(&rt.tail));
            listed += 1;
        }
        out.push_str(if truncated { CLOSE_TRUNCATED } else { CLOSE });
        out
    }

    /// The text of each of the route's entries, with the first connection that
    /// admits the caller (as [`decide`] picks it), into `chosen`; `false` when an
    /// entry has none (the route is refused and not listed).
    fn choose<'s>(
        &'s self,
        config: &Config,
        id: Option<&Identity>,
        rt: &RouteText,
        memo: &mut [Admitted],
        chosen: &mut Vec<&'s Range<usize>>,
    ) -> bool {
        chosen.clear();
        for entry in self.entries.get(rt.entries.clone()).unwrap_or_default() {
            let candidates = self.picks.get(entry.clone()).unwrap_or_default();
            let Some(pick) = candidates
                .iter()
                .find(|p| p.access.is_some_and(|a| self.admits(config, a, id, memo)))
            else {
                return false;
            };
            chosen.extend(&pick.text);
        }
        true
    }
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// A route's `match` object, its members in the order `serde_json`'s map writes them.
fn write_match(out: &mut String, rm: &RouteMatch) {
    let mut sep = '{';
    let mut member = |out: &mut String, name: &str| {
        out.push(sep);
        sep = ',';
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
    };
    if let Some(h) = &rm.host {
        member(out, "host");
        push_json_str(out, h);
    }
    if !rm.methods.is_empty() {
        member(out, "methods");
        out.push_str(&serde_json::to_string(&rm.methods).unwrap_or_default());
    }
    match &rm.path {
        Some(PathMatch::Prefix(p)) => {
            member(out, "path_prefix");
            push_json_str(out, p);
        }
        Some(PathMatch::Exact(p)) => {
            member(out, "path_exact");
            push_json_str(out, p);
        }
        None => {}
    }
    if let Some(n) = &rm.route_name {
        member(out, "route_name");
        push_json_str(out, n);
    }
    if let Some(n) = &rm.route_name_prefix {
        member(out, "route_name_prefix");
        push_json_str(out, n);
    }
    if sep == '{' {
        out.push('{');
    }
    out.push('}');
}

/// The member of an entry's object that says where the credential goes.
fn target_member(t: &Target) -> &'static str {
    match t {
        Target::Header { .. } => "header",
        Target::Query { .. } => "query",
        Target::ClusterHeader { .. } => "cluster_header",
    }
}

fn target_name(t: &Target) -> &str {
    match t {
        Target::Header { name, .. } | Target::ClusterHeader { name } => name,
        Target::Query { name } => name,
    }
}

/// An inject entry's object when `conn` serves it (`None`: no such connection or provider).
fn entry_object(config: &Config, conn: Option<&Connection>, inj: &Injection) -> Option<Value> {
    let conn = conn?;
    let provider = config.provider_of(conn)?;
    let mut e = Map::new();
    e.insert("connection".into(), json!(conn.name));
    e.insert("provider".into(), json!(provider.name));
    e.insert("type".into(), json!(provider_type(&provider.kind)));
    e.insert(
        target_member(&inj.target).into(),
        json!(target_name(&inj.target)),
    );
    Some(Value::Object(e))
}

/// The discovery document for a caller (`None`: no claims), built as a JSON tree
/// over all routes, uncapped. The reference [`Index`] is tested against; the
/// request path uses [`Index::answer`].
pub fn document(config: &Config, id: Option<&Identity>) -> Value {
    let mut routes = Vec::new();
    for (ri, route) in config.routes.iter().enumerate() {
        let Decision::Allowed { picks, .. } = decide(config, Some(ri), id) else {
            continue;
        };
        let mut m = Map::new();
        let rm = &route.matcher;
        if let Some(n) = &rm.route_name {
            m.insert("route_name".into(), json!(n));
        }
        if let Some(n) = &rm.route_name_prefix {
            m.insert("route_name_prefix".into(), json!(n));
        }
        if let Some(h) = &rm.host {
            m.insert("host".into(), json!(h));
        }
        match &rm.path {
            Some(PathMatch::Prefix(p)) => {
                m.insert("path_prefix".into(), json!(p));
            }
            Some(PathMatch::Exact(p)) => {
                m.insert("path_exact".into(), json!(p));
            }
            None => {}
        }
        if !rm.methods.is_empty() {
            m.insert("methods".into(), json!(rm.methods));
        }
        let inject: Vec<Value> = route
            .inject
            .iter()
            .zip(&picks)
            .filter_map(|(inj, &ci)| {
                let conn = config.connection(ci)?;
                let provider = config.provider_of(conn)?;
                let mut e = Map::new();
                e.insert("connection".into(), json!(conn.name));
                e.insert("provider".into(), json!(provider.name));
                e.insert("type".into(), json!(provider_type(&provider.kind)));
                match &inj.target {
                    Target::Header { name, .. } => e.insert("header".into(), json!(&**name)),
                    Target::Query { name } => e.insert("query".into(), json!(name)),
                    Target::ClusterHeader { name } => {
                        e.insert("cluster_header".into(), json!(&**name))
                    }
                };
                Some(Value::Object(e))
            })
            .collect();
        routes.push(json!({ "name": route.name, "match": m, "inject": inject }));
    }
    json!({ "authenticated": id.is_some(), "routes": routes })
}

fn provider_type(kind: &ProviderKind) -> &'static str {
    match kind {
        ProviderKind::ApiKey => "api_key",
        ProviderKind::OAuth2(_) => "oauth2",
        ProviderKind::ManagedIdentity(_) => "azure_managed_identity",
        ProviderKind::ClientCertificate => "client_certificate",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::Identity;
    use crate::config::ClaimPath;

    fn config() -> Config {
        let v = json!({
            "secrets": { "k": { "env": "K" }, "s": { "env": "K" } },
            "providers": {
                "partner": { "type": "api_key" },
                "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                         "client_id": "gw", "client_secret": "s" }
            },
            "connections": {
                "billing": { "provider": "partner", "api_key": "k", "access": { "groups": ["billing"] } },
                "open": { "provider": "partner", "api_key": "k", "access": { "public": true } },
                "orders_admin": { "provider": "idp", "grant": "client_credentials",
                                  "access": { "users": ["alice"] } },
                "orders_read": { "provider": "idp", "grant": "client_credentials",
                                 "access": { "authenticated": true } }
            },
            "routes": [
                { "name": "partner", "match": { "path_prefix": "/partner/", "methods": ["GET"] },
                  "inject": [ { "connections": ["billing"], "query": "api_key" } ] },
                { "name": "weather", "match": { "host": "api.example.com", "path_exact": "/w" },
                  "inject": [ { "connections": ["open"], "header": "x-key" } ] },
                { "name": "orders", "match": { "route_name": "orders" },
                  "access": { "authenticated": true },
                  "inject": [ { "connections": ["orders_admin", "orders_read"], "header": "authorization" } ] },
                { "name": "admin", "match": { "path_prefix": "/admin/" },
                  "access": { "groups": ["admins"] } },
                { "name": "shop", "match": { "route_name_prefix": "httproute/shop/", "methods": ["POST"] },
                  "access": { "groups": ["shop"] },
                  "inject": [ { "connections": ["billing"], "header": "x-key" } ] }
            ],
            "discovery": { "path": "/.well-known/latchkey" }
        });
        let env = |_: &str| Some("secret-value-xyz".to_string());
        Config::parse(v.to_string().as_bytes(), &env).unwrap()
    }

    fn caller(c: &Config, sub: &str, groups: &[&str]) -> Identity {
        let payload = json!({ "sub": sub, "groups": groups });
        let paths: Vec<ClaimPath> = c.claim_paths.clone();
        Identity::from_json(&payload, &paths).unwrap()
    }

    #[test]
    fn anonymous_sees_only_public_routes() {
        let c = config();
        assert_eq!(
            document(&c, None),
            json!({ "authenticated": false, "routes": [
                { "name": "weather", "match": { "host": "api.example.com", "path_exact": "/w" },
                  "inject": [ { "connection": "open", "provider": "partner", "type": "api_key",
                                "header": "x-key" } ] }
            ]})
        );
    }

    #[test]
    fn a_group_member_sees_its_connections_and_no_policy() {
        let c = config();
        let doc = document(&c, Some(&caller(&c, "bob", &["billing"])));
        assert_eq!(
            doc,
            json!({ "authenticated": true, "routes": [
                { "name": "partner", "match": { "path_prefix": "/partner/", "methods": ["GET", "HEAD"] },
                  "inject": [ { "connection": "billing", "provider": "partner", "type": "api_key",
                                "query": "api_key" } ] },
                { "name": "weather", "match": { "host": "api.example.com", "path_exact": "/w" },
                  "inject": [ { "connection": "open", "provider": "partner", "type": "api_key",
                                "header": "x-key" } ] },
                { "name": "orders", "match": { "route_name": "orders" },
                  "inject": [ { "connection": "orders_read", "provider": "idp", "type": "oauth2",
                                "header": "authorization" } ] }
            ]})
        );
        let text = doc.to_string();
        assert!(!text.contains("secret-value-xyz"));
        assert!(
            !text.contains("billing\"]") && !text.contains("groups") && !text.contains("users")
        );
    }

    #[test]
    fn a_route_matched_by_route_name_prefix_says_so() {
        let c = config();
        let id = caller(&c, "carol", &["shop", "billing"]);
        let expected = json!({ "name": "shop",
            "match": { "methods": ["POST"], "route_name_prefix": "httproute/shop/" },
            "inject": [ { "connection": "billing", "provider": "partner", "type": "api_key",
                          "header": "x-key" } ] });
        let doc = document(&c, Some(&id));
        assert_eq!(doc["routes"].as_array().unwrap().last(), Some(&expected));
        // The request path's index writes the same bytes.
        let index = Index::new(&c);
        let served: Value = serde_json::from_str(&index.answer(&c, Some(&id))).unwrap();
        assert_eq!(served, doc);
    }

    #[test]
    fn the_first_admitting_connection_is_the_one_shown() {
        let c = config();
        let doc = document(&c, Some(&caller(&c, "alice", &[])));
        let orders = doc["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "orders")
            .unwrap();
        assert_eq!(orders["inject"][0]["connection"], "orders_admin");
        // alice is not in billing or admins: neither route is listed.
        let names: Vec<&str> = doc["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["weather", "orders"]);
    }

    /// What the index answers, checked against [`document`] byte for byte.
    fn same(c: &Config, id: Option<&Identity>) -> String {
        let text = Index::new(c).answer(c, id);
        assert_eq!(text, document(c, id).to_string());
        text
    }

    #[test]
    fn the_index_answers_what_document_builds() {
        let c = config();
        let callers = [
            None,
            Some(caller(&c, "bob", &["billing"])),
            Some(caller(&c, "alice", &[])),
            Some(caller(&c, "alice", &["billing", "admins"])),
            Some(caller(&c, "carol", &["admins"])),
        ];
        for id in &callers {
            let text = same(&c, id.as_ref());
            assert!(!text.contains("secret-value-xyz"));
            assert!(!text.contains("truncated"));
        }
        // One index answers every caller.
        let ix = Index::new(&c);
        for id in &callers {
            assert_eq!(
                ix.answer(&c, id.as_ref()),
                document(&c, id.as_ref()).to_string()
            );
        }
    }

    #[test]
    fn every_kind_of_entry_and_escaped_names() {
        let v = json!({
            "secrets": { "k": { "env": "K" }, "s": { "env": "K" } },
            "providers": {
                "partner": { "type": "api_key" },
                "mtls": { "type": "client_certificate" },
                "azure_mi": { "type": "azure_managed_identity", "cluster": "imds", "client_id": "uai-1" },
                "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                         "client_id": "gw", "client_secret": "s" }
            },
            "connections": {
                "key": { "provider": "partner", "api_key": "k", "access": { "public": true } },
                "cert_a": { "provider": "mtls", "cluster": "partner_a", "access": { "groups": ["a"] } },
                "cert_b": { "provider": "mtls", "cluster": "partner_b", "access": { "authenticated": true } },
                "mi": { "provider": "azure_mi", "resource": "https://backend.example.com",
                        "access": { "claims": { "tier": ["1", "2"] } } },
                "cc": { "provider": "idp", "grant": "client_credentials", "access": { "users": ["u\"1"] } }
            },
            "routes": [
                { "name": "two", "match": { "route_name": "r\"ü\\\u{1}", "host": "API.example.com",
                                           "path_prefix": "/two/", "methods": ["get", "post"] },
                  "inject": [ { "connections": ["key"], "query": "k\"ey" },
                              { "connections": ["cert_a", "cert_b"], "cluster_header": "X-Cluster" } ] },
                { "name": "mi", "match": { "path_exact": "/mi" },
                  "inject": [ { "connections": ["mi", "cc"], "header": "Authorization" } ] },
                { "name": "none", "match": { "path_prefix": "/none/" }, "inject": [] },
                { "name": "methods", "match": { "methods": ["DELETE"] }, "inject": [] },
                { "name": "everything", "match": {}, "access": { "users": ["u\"1"] } },
                { "name": "guarded", "match": { "path_prefix": "/g/" }, "access": { "groups": ["a"] },
                  "inject": [ { "connections": ["key"], "header": "x-key", "prefix": "Key " } ] }
            ]
        });
        let env = |_: &str| Some("secret-value-xyz".to_string());
        let c = Config::parse(v.to_string().as_bytes(), &env).unwrap();
        let with = |sub: &str, groups: &[&str], tier: Option<&str>| {
            let mut payload = json!({ "sub": sub, "groups": groups });
            if let Some(t) = tier {
                payload["tier"] = json!(t);
            }
            Identity::from_json(&payload, &c.claim_paths).unwrap()
        };
        let callers = [
            None,
            Some(with("x", &[], None)),
            Some(with("x", &["a"], None)),
            Some(with("u\"1", &[], None)),
            Some(with("x", &[], Some("2"))),
            Some(with("u\"1", &["a"], Some("1"))),
        ];
        let mut seen_routes = std::collections::BTreeSet::new();
        for id in &callers {
            let text = same(&c, id.as_ref());
            assert!(!text.contains("secret-value-xyz"));
            let doc: Value = serde_json::from_str(&text).unwrap();
            for r in doc["routes"].as_array().unwrap() {
                seen_routes.insert(r["name"].as_str().unwrap().to_string());
            }
        }
        // Every route was listed for someone, and most refused to the anonymous caller.
        assert_eq!(seen_routes.len(), 6);
        let anonymous: Value = serde_json::from_str(&same(&c, None)).unwrap();
        assert_eq!(anonymous["routes"].as_array().unwrap().len(), 2);
    }

    /// A small deterministic generator (no dependency): many configurations and
    /// callers, checked against [`document`].
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn access(rng: &mut Lcg) -> Value {
        match rng.below(6) {
            0 => json!({ "public": true }),
            1 => json!({ "authenticated": true }),
            2 => json!({ "groups": [format!("g{}", rng.below(3))] }),
            3 => json!({ "users": [format!("u{}", rng.below(2))] }),
            4 => json!({ "claims": { "tier": [format!("{}", rng.below(3))] } }),
            _ => json!({ "groups": ["g0"], "users": ["u1"] }),
        }
    }

    fn generated(seed: u64, routes: usize) -> Config {
        let mut rng = Lcg(seed);
        let mut connections = Map::new();
        for i in 0..6 {
            connections.insert(
                format!("k{i}"),
                json!({ "provider": "partner", "api_key": "k", "access": access(&mut rng) }),
            );
        }
        for i in 0..3 {
            connections.insert(
                format!("c{i}"),
                json!({ "provider": "mtls", "cluster": format!("cl{i}"), "access": access(&mut rng) }),
            );
        }
        let mut rs = Vec::new();
        for i in 0..routes {
            let mut inject = Vec::new();
            for _ in 0..rng.below(3) {
                let n = 1 + rng.below(3);
                if rng.below(4) == 0 {
                    let first = rng.below(3);
                    let cs: Vec<String> = (0..n).map(|j| format!("c{}", (first + j) % 3)).collect();
                    inject.push(json!({ "connections": cs, "cluster_header": "x-cluster" }));
                } else {
                    let first = rng.below(6);
                    let cs: Vec<String> = (0..n).map(|j| format!("k{}", (first + j) % 6)).collect();
                    let target = if rng.below(2) == 0 { "header" } else { "query" };
                    inject.push(json!({ "connections": cs, target: format!("t{}", rng.below(2)) }));
                }
            }
            let mut r = json!({ "name": format!("r{i}"), "match": { "path_prefix": format!("/r{i}/") },
                                "inject": inject });
            if rng.below(3) == 0 {
                r["access"] = access(&mut rng);
            }
            rs.push(r);
        }
        let v = json!({
            "secrets": { "k": { "env": "K" } },
            "providers": { "partner": { "type": "api_key" }, "mtls": { "type": "client_certificate" } },
            "connections": connections,
            "routes": rs
        });
        let env = |_: &str| Some("secret-value-xyz".to_string());
        Config::parse(v.to_string().as_bytes(), &env).unwrap()
    }

    fn generated_callers(c: &Config) -> Vec<Option<Identity>> {
        let mut out = vec![None];
        for sub in ["u0", "u1", "x"] {
            for groups in [&[][..], &["g0"], &["g1", "g2"], &["g0", "g1", "g2"]] {
                for tier in [None, Some("0"), Some("2")] {
                    let mut payload = json!({ "sub": sub, "groups": groups });
                    if let Some(t) = tier {
                        payload["tier"] = json!(t);
                    }
                    out.push(Identity::from_json(&payload, &c.claim_paths));
                }
            }
        }
        out
    }

    #[test]
    fn generated_configurations_answer_as_document_does() {
        let mut listed = 0;
        let mut refused = 0;
        for seed in 0..40 {
            let c = generated(seed, 12);
            let ix = Index::new(&c);
            for id in generated_callers(&c) {
                let text = ix.answer(&c, id.as_ref());
                assert_eq!(text, document(&c, id.as_ref()).to_string(), "seed {seed}");
                assert!(!text.contains("secret-value-xyz"));
                let n = serde_json::from_str::<Value>(&text).unwrap()["routes"]
                    .as_array()
                    .unwrap()
                    .len();
                listed += n;
                refused += c.routes.len() - n;
            }
        }
        // The generator exercises both outcomes, often.
        assert!(listed > 1000 && refused > 1000, "{listed} {refused}");
    }

    /// Checks a capped answer: valid JSON, within the bytes (unless even an empty
    /// list doesn't fit), its routes the first ones of the full document, and
    /// `truncated` exactly when some were left out.
    fn check_capped(
        (ix, c): (&Index, &Config),
        id: Option<&Identity>,
        full: &Value,
        limits: Limits,
    ) -> usize {
        let text = ix.answer_within(c, id, limits);
        let doc: Value = serde_json::from_str(&text).unwrap();
        let all = full["routes"].as_array().unwrap();
        let got = doc["routes"].as_array().unwrap();
        assert!(got.len() <= limits.routes);
        assert_eq!(got[..], all[..got.len()]);
        assert_eq!(doc["authenticated"], full["authenticated"]);
        let empty = OPEN_ANONYMOUS.len() + CLOSE_TRUNCATED.len() + 1;
        // Nor is the buffer larger (beyond the 4 KiB first allocation).
        assert!(text.capacity() <= limits.bytes.max(4096));
        assert!(
            text.len() <= limits.bytes.max(empty),
            "{} > {limits:?}",
            text.len()
        );
        if got.len() < all.len() {
            assert_eq!(doc["truncated"], json!(true));
            assert_eq!(doc.as_object().unwrap().len(), 3);
        } else {
            assert_eq!(text, full.to_string());
        }
        got.len()
    }

    #[test]
    fn the_route_cap_cuts_and_says_so() {
        let c = config();
        let ix = Index::new(&c);
        let bob = caller(&c, "bob", &["billing"]);
        let full = document(&c, Some(&bob));
        for routes in 0..5 {
            let n = check_capped(
                (&ix, &c),
                Some(&bob),
                &full,
                Limits {
                    routes,
                    bytes: MAX_BYTES,
                },
            );
            assert_eq!(n, routes.min(3));
        }
        let text = Index::new(&c).answer_within(
            &c,
            Some(&bob),
            Limits {
                routes: 1,
                bytes: MAX_BYTES,
            },
        );
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({ "authenticated": true, "truncated": true, "routes": [
                { "name": "partner", "match": { "path_prefix": "/partner/", "methods": ["GET", "HEAD"] },
                  "inject": [ { "connection": "billing", "provider": "partner", "type": "api_key",
                                "query": "api_key" } ] } ]})
        );
    }

    #[test]
    fn the_byte_cap_holds_at_every_size() {
        let c = generated(7, 30);
        let ix = Index::new(&c);
        for id in generated_callers(&c).iter().step_by(5) {
            let full = document(&c, id.as_ref());
            let mut counts = Vec::new();
            for bytes in 0..full.to_string().len() + 40 {
                counts.push(check_capped(
                    (&ix, &c),
                    id.as_ref(),
                    &full,
                    Limits {
                        routes: MAX_ROUTES,
                        bytes,
                    },
                ));
            }
            // Exactly as many as fit: the first k routes, with the `truncated` close.
            let open = if id.is_some() {
                OPEN_AUTHENTICATED
            } else {
                OPEN_ANONYMOUS
            };
            let mut fits = vec![open.len() + CLOSE_TRUNCATED.len()];
            for (k, r) in full["routes"].as_array().unwrap().iter().enumerate() {
                let comma = usize::from(k > 0);
                fits.push(fits[k] + comma + r.to_string().len());
            }
            for (bytes, &got) in counts.iter().enumerate() {
                let want = fits.iter().rposition(|&f| f <= bytes).unwrap_or(0);
                assert_eq!(got, want, "{bytes} bytes");
            }
        }
    }

    #[test]
    fn equal_policies_are_asked_once() {
        // billing, open, orders_admin, orders_read (= the orders route's), admins, shop.
        assert_eq!(Index::new(&config()).policies.len(), 6);
        let c = generated(3, 40);
        let ix = Index::new(&c);
        assert!(ix.policies.len() < 10, "{}", ix.policies.len());
        // Entries of the same connection and target share their text: at most
        // 6 keys × 4 (header or query, t0 or t1) + 3 certificates × 1 texts.
        let texts: std::collections::BTreeSet<(usize, usize)> = ix
            .picks
            .iter()
            .filter_map(|p| p.text.as_ref().map(|r| (r.start, r.end)))
            .collect();
        assert!(texts.len() <= 27 && ix.picks.len() > 2 * texts.len());
    }

    #[test]
    fn the_default_caps_bound_a_large_configuration() {
        let many = |n: usize, path_len: usize| {
            let routes: Vec<Value> = (0..n)
                .map(|i| {
                    json!({ "name": format!("r{i}"),
                            "match": { "path_prefix": format!("/{}/{i}/", "p".repeat(path_len)) },
                            "inject": [ { "connections": ["open"], "header": "x-key" } ] })
                })
                .collect();
            let v = json!({
                "secrets": { "k": { "env": "K" } },
                "providers": { "partner": { "type": "api_key" } },
                "connections": { "open": { "provider": "partner", "api_key": "k",
                                           "access": { "public": true } } },
                "routes": routes
            });
            let env = |_: &str| Some("secret-value-xyz".to_string());
            Config::parse(v.to_string().as_bytes(), &env).unwrap()
        };
        // More routes than MAX_ROUTES: the first MAX_ROUTES.
        let c = many(MAX_ROUTES + 500, 1);
        let text = Index::new(&c).answer(&c, None);
        let doc: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(doc["routes"].as_array().unwrap().len(), MAX_ROUTES);
        assert_eq!(doc["truncated"], json!(true));
        assert_eq!(doc["routes"][MAX_ROUTES - 1]["name"], "r999");
        assert!(text.len() <= MAX_BYTES);
        // Long routes: MAX_BYTES cuts first.
        let c = many(800, 400);
        let text = Index::new(&c).answer(&c, None);
        assert!(text.len() <= MAX_BYTES && text.len() > MAX_BYTES - 500);
        assert!(text.capacity() <= MAX_BYTES);
        let doc: Value = serde_json::from_str(&text).unwrap();
        let n = doc["routes"].as_array().unwrap().len();
        assert!(n > 100 && n < 800, "{n}");
        assert_eq!(doc["truncated"], json!(true));
        // The buffer doesn't outgrow a limit that isn't a power of two either.
        let limits = Limits {
            routes: MAX_ROUTES,
            bytes: 100_000,
        };
        let text = Index::new(&c).answer_within(&c, None, limits);
        assert!(text.len() > 99_000 && text.capacity() <= 100_000);
        // Exactly MAX_ROUTES: no cut.
        let c = many(MAX_ROUTES, 1);
        assert!(!Index::new(&c).answer(&c, None).contains("truncated"));
    }

    #[test]
    fn an_empty_configuration_and_a_caller_refused_everywhere() {
        let c = config();
        assert_eq!(
            Index::new(&c).answer(&c, Some(&caller(&c, "nobody", &[]))),
            document(&c, Some(&caller(&c, "nobody", &[]))).to_string()
        );
        let empty = Config::parse(b"{}", &|_| None).unwrap();
        assert_eq!(
            Index::new(&empty).answer(&empty, None),
            r#"{"authenticated":false,"routes":[]}"#
        );
    }
}
