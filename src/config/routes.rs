//! The `routes` section, in order: what each route matches (compiled to the
//! router's [`RouteMatch`]), who may use it, which connections it injects where
//! (`inject`), and which headers it strips. A route's `needs_claims` says whether
//! any policy it involves looks at claims, so that the filter reads them only then.

use std::collections::HashMap;

use super::access;
use super::claims::ClaimPaths;
use super::error::{ConfigError, ErrorKind};
use super::json::{index, join, Obj, Value};
use super::lexical;
use super::names::Names;
use super::{
    Access, Connection, Credential, Grant, Injection, PathMatch, Route, RouteMatch, Target,
};

const ROUTE: &[&str] = &[
    "name",
    "match",
    "access",
    "inject",
    "strip",
    "drop_token_on_401",
];
const MATCH: &[&str] = &[
    "route_name",
    "route_name_prefix",
    "host",
    "path_prefix",
    "path_exact",
    "methods",
];
const INJECT: &[&str] = &["connections", "header", "query", "cluster_header", "prefix"];

/// The `cluster_header` name docs/configuration.md and the Envoy examples use.
const DOCUMENTED_CLUSTER_HEADER: &str = "x-latchkey-cluster";

/// `Config::routes`, in configuration order.
pub fn read(
    top: &Obj,
    names: &Names,
    connections: &[Connection],
    claims: &mut ClaimPaths,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes: Vec<Route> = Vec::new();
    // Route name -> index of the route that first used it (paths are only
    // formatted for an error: 10,000 routes must load fast).
    let mut first_use: HashMap<&str, usize> = HashMap::new();
    let Some(items) = top.opt_array("routes")? else {
        return Ok(routes);
    };
    for (i, value) in items.iter().enumerate() {
        let r = Obj::new(index("routes", i), value, ROUTE)?;
        let name = r.req_str("name")?;
        if let Some(first) = first_use.get(name) {
            return Err(ConfigError::new(
                r.child("name"),
                ErrorKind::Duplicate {
                    what: "route name",
                    name: name.to_string(),
                    first: join(&index("routes", *first), "name"),
                },
            ));
        }
        first_use.insert(name, i);
        let matcher = route_match(&r)?;
        let access = match r.get("access") {
            Some(v) => Some(access::read(&r.child("access"), v, claims)?),
            None => None,
        };
        let mut inject = Vec::new();
        if let Some(entries) = r.opt_array("inject")? {
            for (j, entry) in entries.iter().enumerate() {
                inject.push(injection(
                    &index(&r.child("inject"), j),
                    entry,
                    names,
                    connections,
                )?);
            }
        }
        let mut strip = Vec::new();
        for (j, h) in r
            .opt_str_list("strip")?
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            strip.push(lexical::header_name(h).map_err(|e| e.at(index(&r.child("strip"), j)))?);
        }
        let drop_token_on_401 = r.opt_bool("drop_token_on_401")?.unwrap_or(true);
        let public = |a: Option<&Access>| a.is_some_and(|a| a.public);
        let needs_claims = access.as_ref().is_some_and(|a| !a.public)
            || inject.iter().any(|inj| {
                inj.connections
                    .iter()
                    .any(|&ci| !public(connections.get(ci).and_then(|c| c.access.as_ref())))
            });
        let binds_caller = inject.iter().any(|inj| {
            inj.connections.iter().any(|&ci| {
                connections.get(ci).is_some_and(|c| {
                    matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }))
                })
            })
        });
        let per_user = inject.iter().any(|inj| {
            inj.connections
                .iter()
                .any(|&ci| connections.get(ci).is_some_and(crate::consent::is_per_user))
        });
        routes.push(Route {
            binds_caller,
            per_user,
            needs_claims,
            name: name.to_string(),
            matcher,
            access,
            inject,
            strip,
            drop_token_on_401,
            fixed: None,
        });
    }
    Ok(routes)
}

/// Every `cluster_header` the routes use, and the documented one whether or not
/// they use it (an Envoy route may route on it: the shipped examples do); sorted,
/// each once. The filter removes them from every request a client sends.
pub fn cluster_headers(routes: &[Route]) -> Vec<String> {
    let mut names: Vec<String> = routes
        .iter()
        .flat_map(|r| &r.inject)
        .filter_map(|i| match &i.target {
            Target::ClusterHeader { name } => Some(name.to_string()),
            _ => None,
        })
        .collect();
    names.push(DOCUMENTED_CLUSTER_HEADER.to_string());
    names.sort();
    names.dedup();
    names
}

fn route_match(r: &Obj) -> Result<RouteMatch, ConfigError> {
    let m = Obj::new(r.child("match"), r.required("match")?, MATCH)?;
    let mut out = RouteMatch {
        route_name: m.opt_str("route_name")?.map(str::to_string),
        route_name_prefix: m.opt_str("route_name_prefix")?.map(str::to_string),
        ..RouteMatch::default()
    };
    if out.route_name.is_some() && out.route_name_prefix.is_some() {
        return Err(ConfigError::not_allowed(
            m.child("route_name_prefix"),
            "give \"route_name\" or \"route_name_prefix\", not both",
        ));
    }
    if out.route_name_prefix.as_deref() == Some("") {
        return Err(ConfigError::empty_string(m.child("route_name_prefix")));
    }
    if let Some(host) = m.opt_str("host")? {
        out.host = Some(lexical::host(host).map_err(|e| e.at(m.child("host")))?);
    }
    out.path = match (m.opt_str("path_prefix")?, m.opt_str("path_exact")?) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::not_allowed(
                m.child("path_exact"),
                "give \"path_prefix\" or \"path_exact\", not both",
            ))
        }
        (Some(p), None) => Some(PathMatch::Prefix(
            lexical::route_path(p).map_err(|e| e.at(m.child("path_prefix")))?,
        )),
        (None, Some(p)) => Some(PathMatch::Exact(
            lexical::route_path(p).map_err(|e| e.at(m.child("path_exact")))?,
        )),
        (None, None) => None,
    };
    if let Some(methods) = m.opt_str_list("methods")? {
        if methods.is_empty() {
            return Err(ConfigError::new(m.child("methods"), ErrorKind::EmptyList));
        }
        for (i, method) in methods.iter().enumerate() {
            out.methods
                .push(lexical::method(method).map_err(|e| e.at(index(&m.child("methods"), i)))?);
        }
        // Servers answer HEAD with the GET handler: a GET rule covers HEAD too.
        if out.methods.iter().any(|m| m == "GET") && !out.methods.iter().any(|m| m == "HEAD") {
            out.methods.push("HEAD".to_string());
        }
    }
    Ok(out)
}

/// One `inject` entry: the connections it may use, in order, and where the
/// chosen one's credential goes.
fn injection(
    path: &str,
    value: &Value,
    names: &Names,
    connections: &[Connection],
) -> Result<Injection, ConfigError> {
    let e = Obj::new(path, value, INJECT)?;
    let list = e
        .opt_str_list("connections")?
        .ok_or_else(|| ConfigError::new(e.child("connections"), ErrorKind::Missing))?;
    if list.is_empty() {
        return Err(ConfigError::new(
            e.child("connections"),
            ErrorKind::EmptyList,
        ));
    }
    let mut indices = Vec::with_capacity(list.len());
    for (i, name) in list.iter().enumerate() {
        let p = || index(&e.child("connections"), i);
        let ci = names.connection(name, p)?;
        if connections.get(ci).is_some_and(|c| c.access.is_none()) {
            // A connection without a policy serves only secret stores.
            return Err(ConfigError::new(
                format!("connections.{name}.access"),
                ErrorKind::Missing,
            ));
        }
        if indices.contains(&ci) {
            return Err(ConfigError::new(
                p(),
                ErrorKind::Duplicate {
                    what: "connection",
                    name: name.to_string(),
                    first: e.child("connections"),
                },
            ));
        }
        indices.push(ci);
    }
    let certs = indices
        .iter()
        .filter(|&&ci| {
            connections
                .get(ci)
                .is_some_and(|c| matches!(c.credential, Credential::ClientCertificate { .. }))
        })
        .count();
    if let Some(h) = e.opt_str("cluster_header")? {
        for field in ["header", "query", "prefix"] {
            if e.has(field) {
                return Err(ConfigError::not_allowed(
                    e.child(field),
                    "not allowed with \"cluster_header\"",
                ));
            }
        }
        if certs != indices.len() {
            return Err(ConfigError::not_allowed(
                e.child("connections"),
                "a cluster_header entry takes client_certificate connections only",
            ));
        }
        let name =
            lexical::settable_header_name(h).map_err(|err| err.at(e.child("cluster_header")))?;
        return Ok(Injection {
            connections: indices,
            target: Target::ClusterHeader { name: name.into() },
        });
    }
    if certs > 0 {
        return Err(ConfigError::not_allowed(
            e.child("connections"),
            "client_certificate connections go in a \"cluster_header\" entry",
        ));
    }
    let target = match (e.opt_str("header")?, e.opt_str("query")?) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::not_allowed(
                e.path.clone(),
                "give exactly one of \"header\" or \"query\", not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::not_allowed(
                e.path.clone(),
                "give exactly one of \"header\", \"query\" or \"cluster_header\"",
            ))
        }
        (Some(h), None) => {
            let name = lexical::settable_header_name(h).map_err(|err| err.at(e.child("header")))?;
            let prefix = match e.opt_str("prefix")? {
                None => None,
                Some(p) => {
                    lexical::header_value_prefix(p).map_err(|err| err.at(e.child("prefix")))?;
                    Some(p.to_string())
                }
            };
            Target::Header {
                name: name.into(),
                prefix,
            }
        }
        (None, Some(q)) => {
            if e.has("prefix") {
                return Err(ConfigError::not_allowed(
                    e.child("prefix"),
                    "only allowed with \"header\", not with \"query\"",
                ));
            }
            lexical::query_param_name(q).map_err(|err| err.at(e.child("query")))?;
            Target::Query {
                name: q.to_string(),
            }
        }
    };
    Ok(Injection {
        connections: indices,
        target,
    })
}
