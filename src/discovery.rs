//! Discovery: what this caller may use (SPEC v1.1, `discovery.path`).
//!
//! A `GET` of the configured path is answered by latchkey itself with the routes
//! the caller may use and, per inject entry, the connection it would get, its
//! provider type and where the credential goes. It is what API Center's portal
//! shows a signed-in user. Built from the same decision the request path makes
//! ([`crate::policy::decide`]), so it never lists a route the caller would be
//! refused on. It holds no secret, no access policy (not the caller's, not
//! anyone else's) and no claim: only names and where credentials go.

use serde_json::{json, Map, Value};

use crate::claims::Identity;
use crate::config::{Config, PathMatch, ProviderKind, Target};
use crate::policy::{decide, Decision};

/// The discovery document for a caller (`None`: no claims).
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
                    Target::Header { name, .. } => e.insert("header".into(), json!(name)),
                    Target::Query { name } => e.insert("query".into(), json!(name)),
                    Target::ClusterHeader { name } => {
                        e.insert("cluster_header".into(), json!(name))
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
                  "access": { "groups": ["admins"] } }
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
}
