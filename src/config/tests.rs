//! Configuration validation: the SPEC example loads, and every bad configuration
//! is refused with a message naming the field and the offending value.

use serde_json::{json, Value};

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "PARTNER_API_KEY" => Some("pk-secret-1".into()),
        "ORDERS_CLIENT_SECRET" => Some("cs-secret-2".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

/// The configuration from SPEC.md.
fn spec_example() -> Value {
    json!({
      "claims": { "from": "jwt_metadata", "key": "jwt_payload", "subject": "sub", "groups": "groups" },
      "secrets": {
        "partner_key":   { "env": "PARTNER_API_KEY" },
        "orders_secret": { "env": "ORDERS_CLIENT_SECRET" },
        "demo_key":      { "inline": "demo-only" }
      },
      "providers": {
        "partner":    { "type": "api_key" },
        "orders_idp": { "type": "oauth2", "cluster": "idp",
                        "token_url": "http://idp.internal:8081/token",
                        "client_id": "orders-gateway", "client_secret": "orders_secret",
                        "auth_method": "client_secret_basic", "timeout_ms": 2000 }
      },
      "connections": {
        "partner_prod": { "provider": "partner", "api_key": "partner_key",
                          "access": { "groups": ["billing"] } },
        "orders_read":  { "provider": "orders_idp", "grant": "client_credentials",
                          "scopes": ["orders.read"], "access": { "authenticated": true } },
        "orders_write": { "provider": "orders_idp", "grant": "client_credentials",
                          "scopes": ["orders.read", "orders.write"],
                          "access": { "users": ["alice"], "groups": ["orders-admins"] } }
      },
      "routes": [
        { "name": "orders", "match": { "route_name": "orders" },
          "access": { "authenticated": true },
          "inject": [ { "connections": ["orders_write", "orders_read"], "header": "authorization" } ] },
        { "name": "partner", "match": { "path_prefix": "/partner/", "methods": ["GET"] },
          "inject": [ { "connections": ["partner_prod"], "query": "api_key" } ] }
      ],
      "unmatched": "allow"
    })
}

fn load(v: &Value) -> Result<Config, ConfigError> {
    Config::parse(v.to_string().as_bytes(), &env)
}

/// Applies `edit` to the SPEC example and returns the error message.
fn error_after(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = spec_example();
    edit(&mut v);
    match load(&v) {
        Ok(_) => panic!("configuration was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn spec_example_loads() {
    let c = load(&spec_example()).unwrap();
    assert_eq!(c.routes.len(), 2);
    assert_eq!(c.connections.len(), 3);
    assert_eq!(
        c.claims.source,
        ClaimsSource::JwtMetadata {
            keys: vec!["jwt_payload".into()]
        }
    );
    assert_eq!(c.unmatched, Unmatched::Allow);
    let orders = &c.routes[0];
    let names: Vec<&str> = orders.inject[0]
        .connections
        .iter()
        .map(|&i| c.connections[i].name.as_str())
        .collect();
    assert_eq!(names, ["orders_write", "orders_read"]);
    assert_eq!(
        orders.inject[0].target,
        Target::Header {
            name: "authorization".into(),
            prefix: None
        }
    );
    assert_eq!(c.routes[1].matcher.methods, ["GET", "HEAD"]);
    let ProviderKind::OAuth2(p) = &c
        .providers
        .iter()
        .find(|p| p.name == "orders_idp")
        .unwrap()
        .kind
    else {
        panic!("not oauth2")
    };
    assert_eq!(p.authority, "idp.internal:8081");
    assert_eq!(p.path, "/token");
    assert_eq!(p.timeout_ms, 2000);
    assert!(matches!(&p.client_secret, Some(SecretRef::Value(s)) if s.expose() == "cs-secret-2"));
    assert_eq!(
        c.warnings,
        ["secret \"demo_key\" is inline in the configuration; use \"env\" outside development"]
    );
}

#[test]
fn defaults() {
    let c = load(&json!({})).unwrap();
    assert_eq!(
        c.claims.source,
        ClaimsSource::JwtMetadata {
            keys: vec!["payload".into()]
        }
    );
    // `$schema` (for editors) is taken at the top, and only there.
    assert!(load(&json!({ "$schema": "https://example.test/latchkey.schema.json" })).is_ok());
    assert_eq!(
        load(&json!({ "$schema": 1 })).unwrap_err().to_string(),
        "$schema: expected a string, found a number"
    );
    assert!(load(&json!({ "claims": { "$schema": "x" } }))
        .unwrap_err()
        .to_string()
        .starts_with("claims.$schema: unknown field"));
    // A list of metadata keys: the first present one is read.
    let c = load(&json!({ "claims": { "key": ["team-a", "team-b"] } })).unwrap();
    assert_eq!(
        c.claims.source,
        ClaimsSource::JwtMetadata {
            keys: vec!["team-a".into(), "team-b".into()]
        }
    );
    for (claims, error) in [
        (json!({ "key": [] }), "claims.key: must not be empty"),
        (
            json!({ "key": ["a", ""] }),
            "claims.key[1]: must not be an empty string",
        ),
        (
            json!({ "key": ["a", 1] }),
            "claims.key[1]: expected a string, found a number",
        ),
        (
            json!({ "from": "header", "key": ["x-a", "x-b"] }),
            "claims.key: a list of keys only with \"from\": \"jwt_metadata\"; a header is one name",
        ),
        (
            json!({ "from": "header", "key": ["x-a"] }),
            "claims.key: a list of keys only with \"from\": \"jwt_metadata\"; a header is one name",
        ),
    ] {
        assert_eq!(
            load(&json!({ "claims": claims })).unwrap_err().to_string(),
            error
        );
    }
    assert_eq!(c.claim_paths[SUBJECT_CLAIM].dotted, "sub");
    assert_eq!(c.claim_paths[GROUPS_CLAIM].dotted, "groups");
    assert_eq!(c.unmatched, Unmatched::Allow);
    assert!(c.routes.is_empty());
    // Off unless asked for (v1.1), and the load says so once.
    assert!(!c.filter_state);
    assert_eq!(c.notes.len(), 1);
    assert!(
        c.notes[0].contains("\"filter_state\": true"),
        "{}",
        c.notes[0]
    );
    // A null field is an absent one.
    let c = load(&json!({ "unmatched": null, "filter_state": null, "routes": null })).unwrap();
    assert_eq!(c.unmatched, Unmatched::Allow);
    assert!(!c.filter_state && c.routes.is_empty());
    for (v, on) in [(true, true), (false, false)] {
        let c = load(&json!({ "filter_state": v })).unwrap();
        assert_eq!(c.filter_state, on);
        assert!(c.notes.is_empty());
    }
}

#[test]
fn debug_output_holds_no_secret() {
    let c = load(&spec_example()).unwrap();
    let dump = format!("{c:?}");
    for secret in ["pk-secret-1", "cs-secret-2", "demo-only"] {
        assert!(!dump.contains(secret), "{secret} in Debug output");
    }
    assert!(dump.contains("[redacted]"));
}

#[test]
fn bad_configurations_name_the_field_and_value() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("connections.orders_read.provider: unknown provider \"orders_idpp\"",
         Box::new(|v| v["connections"]["orders_read"]["provider"] = json!("orders_idpp"))),
        ("providers.orders_idp.clster: unknown field; expected one of \"type\", \"cluster\", \"token_url\", \"client_id\", \"client_secret\", \"auth_method\", \"timeout_ms\", \"default_expires_in_s\", \"refresh_margin_s\", \"drop_on_401_after_s\", \"endpoint\", \"authorization_url\", \"issuer\", \"revocation_url\", \"assertion\", \"signing_key\", \"assertion_audience\"",
         Box::new(|v| v["providers"]["orders_idp"]["clster"] = json!("idp"))),
        ("colour: unknown field; expected one of \"claims\", \"secrets\", \"providers\", \"connections\", \"routes\", \"unmatched\", \"filter_state\", \"discovery\", \"max_paused_requests\", \"token_stores\", \"consent\"",
         Box::new(|v| v["colour"] = json!("blue"))),
        ("routes[0].match.route_name: expected a string, found a number",
         Box::new(|v| v["routes"][0]["match"]["route_name"] = json!(5))),
        ("routes: expected an array, found an object",
         Box::new(|v| v["routes"] = json!({}))),
        ("connections.partner_prod.api_key: unknown secret \"partner_kee\"",
         Box::new(|v| v["connections"]["partner_prod"]["api_key"] = json!("partner_kee"))),
        ("providers.orders_idp.client_secret: unknown secret \"nope\"",
         Box::new(|v| v["providers"]["orders_idp"]["client_secret"] = json!("nope"))),
        ("routes[1].inject[0].connections[0]: unknown connection \"partner_dev\"",
         Box::new(|v| v["routes"][1]["inject"][0]["connections"] = json!(["partner_dev"]))),
        ("routes[1].name: duplicate route name \"orders\" (first used at routes[0].name)",
         Box::new(|v| v["routes"][1]["name"] = json!("orders"))),
        ("connections.orders_read.access: access policy admits no one; give at least one of \"public\": true, \"authenticated\": true, \"users\", \"groups\" or \"claims\"",
         Box::new(|v| v["connections"]["orders_read"]["access"] = json!({}))),
        ("routes[0].access: access policy admits no one; give at least one of \"public\": true, \"authenticated\": true, \"users\", \"groups\" or \"claims\"",
         Box::new(|v| v["routes"][0]["access"] = json!({"public": false}))),
        ("routes[1].inject[0]: give exactly one of \"header\" or \"query\", not both",
         Box::new(|v| v["routes"][1]["inject"][0]["header"] = json!("x-api-key"))),
        ("routes[1].inject[0]: give exactly one of \"header\", \"query\" or \"cluster_header\"",
         Box::new(|v| { v["routes"][1]["inject"][0].as_object_mut().unwrap().remove("query"); })),
        ("routes[0].inject[0].header: invalid value \"x api key\": not a valid HTTP header name",
         Box::new(|v| v["routes"][0]["inject"][0]["header"] = json!("x api key"))),
        ("routes[0].inject[0].header: invalid value \"Host\": Envoy owns this header; latchkey can't set it",
         Box::new(|v| v["routes"][0]["inject"][0]["header"] = json!("Host"))),
        ("routes[1].inject[0].prefix: only allowed with \"header\", not with \"query\"",
         Box::new(|v| v["routes"][1]["inject"][0]["prefix"] = json!("Key "))),
        ("connections.orders_read.grant: required field is missing",
         Box::new(|v| { v["connections"]["orders_read"].as_object_mut().unwrap().remove("grant"); })),
        ("connections.orders_read.grant: invalid value \"password\": expected one of \"client_credentials\", \"refresh_token\", \"token_exchange\", \"authorization_code\"",
         Box::new(|v| v["connections"]["orders_read"]["grant"] = json!("password"))),
        ("providers.orders_idp.token_url: invalid value \"idp.internal/token\": not an absolute URL (expected http://host/path or https://host/path)",
         Box::new(|v| v["providers"]["orders_idp"]["token_url"] = json!("idp.internal/token"))),
        ("providers.orders_idp.token_url: invalid value \"ftp://idp/token\": scheme must be http or https",
         Box::new(|v| v["providers"]["orders_idp"]["token_url"] = json!("ftp://idp/token"))),
        ("connections.orders_read.refresh_token: required when grant is \"refresh_token\"",
         Box::new(|v| v["connections"]["orders_read"]["grant"] = json!("refresh_token"))),
        ("connections.orders_read.refresh_token: only allowed when grant is \"refresh_token\"",
         Box::new(|v| v["connections"]["orders_read"]["refresh_token"] = json!("orders_secret"))),
        ("secrets.partner_key.env: environment variable \"PARTNER_API_KEY_UNSET\" is not set",
         Box::new(|v| v["secrets"]["partner_key"]["env"] = json!("PARTNER_API_KEY_UNSET"))),
        ("secrets.partner_key.env: environment variable \"EMPTY\" is empty",
         Box::new(|v| v["secrets"]["partner_key"]["env"] = json!("EMPTY"))),
        ("secrets.partner_key: give exactly one of \"env\", \"inline\", \"azure_key_vault\" or \"vault\", not several",
         Box::new(|v| v["secrets"]["partner_key"]["inline"] = json!("x"))),
        ("routes[0].inject[0].connections: must not be empty",
         Box::new(|v| v["routes"][0]["inject"][0]["connections"] = json!([]))),
        ("routes[0].inject[0].connections: required field is missing",
         Box::new(|v| { v["routes"][0]["inject"][0].as_object_mut().unwrap().remove("connections"); })),
        ("claims.from: invalid value \"jwt\": expected one of \"jwt_metadata\", \"header\", \"none\"",
         Box::new(|v| v["claims"]["from"] = json!("jwt"))),
        ("unmatched: invalid value \"block\": expected \"allow\" or \"deny\"",
         Box::new(|v| v["unmatched"] = json!("block"))),
        ("providers.partner.type: invalid value \"apikey\": expected \"api_key\", \"oauth2\", \"azure_managed_identity\" or \"client_certificate\"",
         Box::new(|v| v["providers"]["partner"]["type"] = json!("apikey"))),
        ("providers.partner.cluster: not allowed for an api_key provider",
         Box::new(|v| v["providers"]["partner"]["cluster"] = json!("c"))),
        ("connections.orders_read.api_key: not allowed for a connection of an oauth2 provider",
         Box::new(|v| v["connections"]["orders_read"]["api_key"] = json!("partner_key"))),
        ("connections.partner_prod.grant: not allowed for a connection of an api_key provider",
         Box::new(|v| v["connections"]["partner_prod"]["grant"] = json!("client_credentials"))),
        ("connections.partner_prod.access: required field is missing",
         Box::new(|v| { v["connections"]["partner_prod"].as_object_mut().unwrap().remove("access"); })),
        ("routes[1].match.path_prefix: invalid value \"partner/\": must start with \"/\"",
         Box::new(|v| v["routes"][1]["match"]["path_prefix"] = json!("partner/"))),
        ("routes[1].match.path_prefix: invalid value \"/partner/%2e%2e/\": paths are matched percent-decoded: write the characters, not \"%XX\"",
         Box::new(|v| v["routes"][1]["match"]["path_prefix"] = json!("/partner/%2e%2e/"))),
        ("routes[1].match.path_prefix: invalid value \"/partner//x\": has an empty segment (\"//\")",
         Box::new(|v| v["routes"][1]["match"]["path_prefix"] = json!("/partner//x"))),
        ("routes[1].match.path_exact: invalid value \"/a/../b\": has a dot segment (\".\" or \"..\")",
         Box::new(|v| { v["routes"][1]["match"].as_object_mut().unwrap().remove("path_prefix"); v["routes"][1]["match"]["path_exact"] = json!("/a/../b"); })),
        ("routes[1].match.path_prefix: invalid value \"/p;x\": \";\" and \"\\\" can't be matched: requests with them are read in several ways",
         Box::new(|v| v["routes"][1]["match"]["path_prefix"] = json!("/p;x"))),
        ("secrets.demo_key.inline: the value given inline has a control character (CR, LF, NUL, …); secrets must be printable",
         Box::new(|v| v["secrets"]["demo_key"]["inline"] = json!("demo\r\nx-injected: 1"))),
        ("routes[1].match.path_exact: give \"path_prefix\" or \"path_exact\", not both",
         Box::new(|v| v["routes"][1]["match"]["path_exact"] = json!("/partner/x"))),
        ("routes[1].match.methods[1]: invalid value \"GE T\": not an HTTP method token",
         Box::new(|v| v["routes"][1]["match"]["methods"] = json!(["GET", "GE T"]))),
        ("routes[1].match.methods: must not be empty",
         Box::new(|v| v["routes"][1]["match"]["methods"] = json!([]))),
        ("routes[0].match: required field is missing",
         Box::new(|v| { v["routes"][0].as_object_mut().unwrap().remove("match"); })),
        ("routes[0].name: required field is missing",
         Box::new(|v| { v["routes"][0].as_object_mut().unwrap().remove("name"); })),
        ("providers.orders_idp.timeout_ms: invalid value \"0\": must be between 1 and 300000",
         Box::new(|v| v["providers"]["orders_idp"]["timeout_ms"] = json!(0))),
        ("providers.orders_idp.timeout_ms: expected a non-negative integer, found a string",
         Box::new(|v| v["providers"]["orders_idp"]["timeout_ms"] = json!("2000"))),
        ("providers.orders_idp.auth_method: invalid value \"client_secret_jwt\": expected \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\", \"client_assertion\" or \"tls_client_auth\"",
         Box::new(|v| v["providers"]["orders_idp"]["auth_method"] = json!("client_secret_jwt"))),
        ("providers.orders_idp.client_secret: this auth_method sends no client secret",
         Box::new(|v| v["providers"]["orders_idp"]["auth_method"] = json!("private_key_jwt"))),
        ("connections.orders_read.scopes[0]: invalid value \"orders read\": not a valid scope token (RFC 6749 §3.3: no spaces, quotes or backslashes)",
         Box::new(|v| v["connections"]["orders_read"]["scopes"] = json!(["orders read"]))),
        ("connections.orders_read.extra_params.grant_type: latchkey sets this token request parameter itself",
         Box::new(|v| v["connections"]["orders_read"]["extra_params"] = json!({"grant_type": "x"}))),
        ("connections.orders_read.extra_params.foo: expected a string, found a number",
         Box::new(|v| v["connections"]["orders_read"]["extra_params"] = json!({"foo": 1}))),
        ("connections.partner_prod.access.groups[0]: expected a string, found a number",
         Box::new(|v| v["connections"]["partner_prod"]["access"]["groups"] = json!([1]))),
        ("connections.partner_prod.access.claims.scp: must not be empty",
         Box::new(|v| v["connections"]["partner_prod"]["access"] = json!({"claims": {"scp": []}}))),
        ("routes[0].access.public: expected a boolean, found a string",
         Box::new(|v| v["routes"][0]["access"] = json!({"public": "yes"}))),
        ("routes[0].strip[0]: invalid value \"bad header\": not a valid HTTP header name",
         Box::new(|v| v["routes"][0]["strip"] = json!(["bad header"]))),
        ("claims.key: invalid value \"x payload\": not a valid HTTP header name",
         Box::new(|v| v["claims"] = json!({"from": "header", "key": "x payload"}))),
        ("claims.groups: invalid value \"realm..roles\": not a claim name (empty segment)",
         Box::new(|v| v["claims"]["groups"] = json!("realm..roles"))),
        ("providers.orders_idp.token_url: must not carry credentials; use client_id and client_secret",
         Box::new(|v| v["providers"]["orders_idp"]["token_url"] = json!("https://u:p@idp/token"))),
        ("connections.orders_read.subject_token_type: only allowed when grant is \"token_exchange\"",
         Box::new(|v| v["connections"]["orders_read"]["subject_token_type"] = json!("x"))),
        ("routes[0].inject[0].connections[1]: duplicate connection \"orders_write\" (first used at routes[0].inject[0].connections)",
         Box::new(|v| v["routes"][0]["inject"][0]["connections"] = json!(["orders_write", "orders_write"]))),
        ("routes[1].match.host: invalid value \"api example\": not a host name",
         Box::new(|v| v["routes"][1]["match"]["host"] = json!("api example"))),
        ("routes[0].inject[0].prefix: invalid value \"Bearer\\r\\n\": not a valid header value (control characters)",
         Box::new(|v| v["routes"][0]["inject"][0]["prefix"] = json!("Bearer\r\n"))),
    ];
    assert!(cases.len() >= 25);
    let mut seen = std::collections::HashSet::new();
    for (want, edit) in cases {
        assert!(seen.insert(want), "duplicate case {want}");
        assert_eq!(error_after(edit), want);
    }
}

#[test]
fn not_json_and_not_an_object() {
    let e = Config::parse(b"{\"routes\": [", &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("configuration is not valid JSON: EOF while parsing"),
        "{e}"
    );
    let e = Config::parse(b"[]", &env).unwrap_err().to_string();
    assert_eq!(e, "expected an object, found an array");
    let e = Config::parse(b"", &env).unwrap_err().to_string();
    assert!(e.starts_with("configuration is not valid JSON"), "{e}");
}

#[test]
fn errors_never_hold_secret_values() {
    // A mistyped inline secret: the message says the type, not the value.
    let e = error_after(|v| v["secrets"]["demo_key"]["inline"] = json!(12345678));
    assert_eq!(
        e,
        "secrets.demo_key.inline: expected a string, found a number"
    );
    let e = error_after(|v| v["secrets"]["demo_key"] = json!("demo-only"));
    assert_eq!(e, "secrets.demo_key: expected an object, found a string");
    assert!(!e.contains("demo-only"));
}

#[test]
fn normalization_at_load() {
    let c = load(&json!({
        "secrets": {"k": {"inline": "v"}},
        "providers": {"p": {"type": "api_key"}},
        "connections": {"c": {"provider": "p", "api_key": "k", "access": {"public": true,
                                "claims": {"realm_access.roles": "admin", "tier": ["1", "2"]}}}},
        "routes": [{"name": "r", "match": {"host": "API.Example.com", "methods": ["get"]},
                    "inject": [{"connections": ["c"], "header": "X-Api-Key"}],
                    "strip": ["Cookie"]}]
    }))
    .unwrap();
    let r = &c.routes[0];
    assert_eq!(r.matcher.host.as_deref(), Some("api.example.com"));
    assert_eq!(r.matcher.methods, ["GET", "HEAD"]);
    assert_eq!(
        r.inject[0].target,
        Target::Header {
            name: "x-api-key".into(),
            prefix: None
        }
    );
    assert_eq!(r.strip, ["cookie"]);
    let paths: Vec<&str> = c.claim_paths.iter().map(|p| p.dotted.as_str()).collect();
    assert_eq!(paths, ["sub", "groups", "realm_access.roles", "tier"]);
    assert_eq!(c.claim_paths[2].segments, ["realm_access", "roles"]);
    assert_eq!(
        c.connections[0].access.as_ref().unwrap().claims,
        vec![
            (2, vec!["admin".to_string()]),
            (3, vec!["1".into(), "2".into()])
        ]
    );
}

#[test]
fn header_source_and_none() {
    let c = load(&json!({"claims": {"from": "header", "key": "X-JWT-Payload"}})).unwrap();
    assert_eq!(
        c.claims.source,
        ClaimsSource::Header {
            name: "x-jwt-payload".into()
        }
    );
    let c = load(&json!({"claims": {"from": "none"}})).unwrap();
    assert_eq!(c.claims.source, ClaimsSource::None);
}

fn store_config() -> Value {
    json!({
        "secrets": {
            "partner_key": { "azure_key_vault": "https://kv-gw.vault.azure.net/secrets/partner-key",
                             "cluster": "keyvault", "identity": "kv_reader", "refresh_s": 60 },
            "pinned": { "azure_key_vault": "https://kv-gw.vault.azure.net/secrets/partner-key/0A1b2c",
                        "cluster": "keyvault", "identity": "kv_reader" },
            "orders_secret": { "vault": { "cluster": "vault", "url": "http://vault.internal:8200",
                                          "path": "orders/idp", "field": "client_secret",
                                          "token": "vault_token", "namespace": "team-a" } },
            "by_role": { "vault": { "cluster": "vault", "url": "http://vault.internal:8200/",
                                    "mount": "kv", "path": "a/b", "field": "f", "version": 3,
                                    "approle": { "role_id": "r-1", "secret_id": "sid" } } },
            "vault_token": { "env": "PARTNER_API_KEY" },
            "sid": { "env": "ORDERS_CLIENT_SECRET" }
        },
        "providers": {
            "azure_mi": { "type": "azure_managed_identity", "cluster": "imds", "client_id": "uai-1" },
            "partner": { "type": "api_key" },
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                     "client_id": "gw", "client_secret": "orders_secret" }
        },
        "connections": {
            "kv_reader": { "provider": "azure_mi", "resource": "https://vault.azure.net" },
            "partner_prod": { "provider": "partner", "api_key": "partner_key",
                              "access": { "authenticated": true } },
            "orders": { "provider": "idp", "grant": "client_credentials",
                        "access": { "authenticated": true } }
        },
        "routes": [
            { "name": "p", "match": { "path_prefix": "/p/" },
              "inject": [ { "connections": ["partner_prod"], "header": "x-api-key" } ] },
            { "name": "o", "match": { "path_prefix": "/o/" },
              "inject": [ { "connections": ["orders"], "header": "authorization" } ] }
        ]
    })
}

#[test]
fn secret_stores_and_managed_identity_load() {
    let c = Config::parse(store_config().to_string().as_bytes(), &env).unwrap();
    assert_eq!(c.stores.len(), 4);
    let by = |n: &str| c.stores.iter().find(|s| s.name == n).unwrap();
    let kv = by("partner_key");
    assert_eq!(kv.authority, "kv-gw.vault.azure.net");
    assert_eq!(kv.path, "/secrets/partner-key?api-version=7.4");
    assert_eq!(kv.refresh_ms, Some(60_000));
    assert_eq!(kv.cluster, "keyvault");
    let reader = c
        .connections
        .iter()
        .position(|x| x.name == "kv_reader")
        .unwrap();
    assert!(matches!(kv.kind, StoreKind::KeyVault { identity } if identity == reader));
    let pinned = by("pinned");
    assert_eq!(pinned.path, "/secrets/partner-key/0a1b2c?api-version=7.4");
    assert_eq!(pinned.refresh_ms, None);
    let v = by("orders_secret");
    assert_eq!(v.authority, "vault.internal:8200");
    assert_eq!(v.path, "/v1/secret/data/orders/idp");
    assert_eq!(v.refresh_ms, Some(300_000));
    assert!(
        matches!(&v.kind, StoreKind::Vault { auth: VaultAuth::Token(t), namespace: Some(ns), field }
        if t.expose() == "pk-secret-1" && ns == "team-a" && field == "client_secret")
    );
    let r = by("by_role");
    assert_eq!(r.path, "/v1/kv/data/a/b?version=3");
    assert!(
        matches!(&r.kind, StoreKind::Vault { auth: VaultAuth::AppRole { role_id, login_path, .. }, .. }
        if role_id == "r-1" && login_path == "/v1/auth/approle/login")
    );
    // Connections point at stores, by index.
    let partner = c
        .connections
        .iter()
        .find(|x| x.name == "partner_prod")
        .unwrap();
    assert!(matches!(
        partner.credential,
        Credential::ApiKey(SecretRef::Store(_))
    ));
    let kv_reader = &c.connections[reader];
    assert!(kv_reader.access.is_none());
    assert!(
        matches!(&kv_reader.credential, Credential::ManagedIdentity { resource } if resource == "https://vault.azure.net")
    );
    let mi = c.providers.iter().find(|p| p.name == "azure_mi").unwrap();
    assert!(matches!(&mi.kind, ProviderKind::ManagedIdentity(p)
        if p.authority == "169.254.169.254" && p.path == "/metadata/identity/oauth2/token"
           && p.client_id.as_deref() == Some("uai-1")));
    // Warnings name the pinned secrets, never a value.
    let pins: Vec<&String> = c
        .warnings
        .iter()
        .filter(|w| w.contains("pins one version"))
        .collect();
    assert_eq!(pins.len(), 2, "{:?}", c.warnings);
    assert!(c.warnings.iter().all(|w| !w.contains("pk-secret-1")));
    assert!(!format!("{c:?}").contains("pk-secret-1"));
}

#[test]
fn bad_store_configurations_name_the_field() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("secrets.partner_key.azure_key_vault: invalid value \"http://kv/secrets/x\": must be https://<vault>.vault.azure.net/secrets/<name>[/<version>]",
         Box::new(|v| v["secrets"]["partner_key"]["azure_key_vault"] = json!("http://kv/secrets/x"))),
        ("secrets.partner_key.azure_key_vault: invalid value \"https://kv/keys/x\": not a secret identifier: expected /secrets/<name> or /secrets/<name>/<version> (names: letters, digits, -)",
         Box::new(|v| v["secrets"]["partner_key"]["azure_key_vault"] = json!("https://kv/keys/x"))),
        ("secrets.partner_key.identity: unknown connection \"nope\"",
         Box::new(|v| v["secrets"]["partner_key"]["identity"] = json!("nope"))),
        ("secrets.partner_key.identity: invalid value \"partner_prod\": must be an azure_managed_identity connection, or an oauth2 one that needs no caller and whose client_secret is not in a store",
         Box::new(|v| v["secrets"]["partner_key"]["identity"] = json!("partner_prod"))),
        ("secrets.pinned.refresh_s: a pinned version is read once and never changes",
         Box::new(|v| v["secrets"]["pinned"]["refresh_s"] = json!(60))),
        ("secrets.partner_key.refresh_s: invalid value \"0\": must be between 1 and 86400",
         Box::new(|v| v["secrets"]["partner_key"]["refresh_s"] = json!(0))),
        ("secrets.orders_secret.vault.token: unknown env or inline secret \"partner_key\"",
         Box::new(|v| v["secrets"]["orders_secret"]["vault"]["token"] = json!("partner_key"))),
        ("secrets.orders_secret.vault: give exactly one of \"token\" or \"approle\"",
         Box::new(|v| { v["secrets"]["orders_secret"]["vault"].as_object_mut().unwrap().remove("token"); })),
        ("secrets.orders_secret.vault.path: invalid value \"a/../b\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
         Box::new(|v| v["secrets"]["orders_secret"]["vault"]["path"] = json!("a/../b"))),
        ("secrets.orders_secret.vault.field: required field is missing",
         Box::new(|v| { v["secrets"]["orders_secret"]["vault"].as_object_mut().unwrap().remove("field"); })),
        ("secrets.vault_token.refresh_s: only allowed beside \"azure_key_vault\" or \"vault\"",
         Box::new(|v| v["secrets"]["vault_token"]["refresh_s"] = json!(5))),
        ("secrets.orders_secret.cluster: for \"vault\", give it inside the \"vault\" object",
         Box::new(|v| v["secrets"]["orders_secret"]["cluster"] = json!("vault"))),
        ("connections.kv_reader.access: required field is missing",
         Box::new(|v| v["routes"][0]["inject"][0]["connections"] = json!(["kv_reader"]))),
        ("connections.kv_reader.resource: required field is missing",
         Box::new(|v| { v["connections"]["kv_reader"].as_object_mut().unwrap().remove("resource"); })),
        ("connections.kv_reader.scopes: not allowed for a connection of an azure_managed_identity provider",
         Box::new(|v| v["connections"]["kv_reader"]["scopes"] = json!(["a"]))),
        ("providers.azure_mi.token_url: not allowed for an azure_managed_identity provider",
         Box::new(|v| v["providers"]["azure_mi"]["token_url"] = json!("https://x/t"))),
        ("providers.azure_mi.endpoint: invalid value \"http://imds/t?x=1\": must not have a query (latchkey adds api-version, resource and client_id)",
         Box::new(|v| v["providers"]["azure_mi"]["endpoint"] = json!("http://imds/t?x=1"))),
    ];
    for (want, mutate) in cases {
        let mut v = store_config();
        mutate(&mut v);
        let err = Config::parse(v.to_string().as_bytes(), &env).unwrap_err();
        assert_eq!(err.to_string(), want);
    }
}

#[test]
fn routes_know_whether_they_need_claims() {
    let v = json!({
        "secrets": { "k": { "env": "PARTNER_API_KEY" } },
        "providers": { "p": { "type": "api_key" } },
        "connections": {
            "open": { "provider": "p", "api_key": "k", "access": { "public": true } },
            "members": { "provider": "p", "api_key": "k", "access": { "groups": ["g"] } }
        },
        "routes": [
            { "name": "public_key", "match": { "path_prefix": "/a/" },
              "inject": [ { "connections": ["open"], "header": "x-k" } ] },
            { "name": "open_route", "match": { "path_prefix": "/b/" }, "access": { "public": true } },
            { "name": "bare", "match": { "path_prefix": "/c/" } },
            { "name": "guarded", "match": { "path_prefix": "/d/" }, "access": { "authenticated": true } },
            { "name": "member_key", "match": { "path_prefix": "/e/" },
              "inject": [ { "connections": ["open", "members"], "header": "x-k" } ] }
        ]
    });
    let c = Config::parse(v.to_string().as_bytes(), &env).unwrap();
    let needs: Vec<bool> = c.routes.iter().map(|r| r.needs_claims).collect();
    assert_eq!(needs, [false, false, false, true, true]);
}

#[test]
fn client_certificate_connections_and_cluster_headers() {
    let v = json!({
        "providers": { "partner_mtls": { "type": "client_certificate" } },
        "connections": {
            "cert_a": { "provider": "partner_mtls", "cluster": "partner_a", "access": { "groups": ["billing"] } },
            "cert_b": { "provider": "partner_mtls", "cluster": "partner_b", "access": { "users": ["svc"] } }
        },
        "routes": [ { "name": "partner", "match": { "path_prefix": "/partner/" },
                      "inject": [ { "connections": ["cert_a", "cert_b"], "cluster_header": "X-Latchkey-Cluster" } ] } ]
    });
    let c = Config::parse(v.to_string().as_bytes(), &env).unwrap();
    assert_eq!(c.cluster_headers, ["x-latchkey-cluster"]);
    assert_eq!(
        c.routes[0].inject[0].target,
        Target::ClusterHeader {
            name: "x-latchkey-cluster".into()
        }
    );
    assert!(
        matches!(&c.connections[0].credential, Credential::ClientCertificate { cluster } if &**cluster == "partner_a")
    );
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("routes[0].inject[0].header: not allowed with \"cluster_header\"",
         Box::new(|v| v["routes"][0]["inject"][0]["header"] = json!("x-k"))),
        ("connections.cert_a.cluster: required field is missing",
         Box::new(|v| { v["connections"]["cert_a"].as_object_mut().unwrap().remove("cluster"); })),
        ("connections.cert_a.api_key: not allowed for a connection of a client_certificate provider",
         Box::new(|v| v["connections"]["cert_a"]["api_key"] = json!("k"))),
        ("providers.partner_mtls.cluster: not allowed for a client_certificate provider (connections name the cluster)",
         Box::new(|v| v["providers"]["partner_mtls"]["cluster"] = json!("c"))),
        ("routes[0].inject[0].connections: client_certificate connections go in a \"cluster_header\" entry",
         Box::new(|v| { let e = v["routes"][0]["inject"][0].as_object_mut().unwrap(); e.remove("cluster_header"); e.insert("header".into(), json!("x-k")); })),
        ("routes[0].inject[0].cluster_header: invalid value \"host\": Envoy owns this header; latchkey can't set it",
         Box::new(|v| v["routes"][0]["inject"][0]["cluster_header"] = json!("host"))),
    ];
    for (want, mutate) in cases {
        let mut doc = v.clone();
        mutate(&mut doc);
        assert_eq!(
            Config::parse(doc.to_string().as_bytes(), &env)
                .unwrap_err()
                .to_string(),
            want
        );
    }
}

// Mutation testing (`make mutants`): the checks below pin behaviour that no test
// above asserted, each found by a mutant that survived.

/// Loads the store configuration after `edit`: the error message, or the warnings.
fn store_result(edit: impl FnOnce(&mut Value)) -> Result<Vec<String>, String> {
    let mut v = store_config();
    edit(&mut v);
    Config::parse(v.to_string().as_bytes(), &env)
        .map(|c| c.warnings)
        .map_err(|e| e.to_string())
}

#[test]
fn token_credentials_are_the_cached_ones() {
    let c = Config::parse(store_config().to_string().as_bytes(), &env).unwrap();
    let is_token = |n: &str| {
        c.connections
            .iter()
            .find(|x| x.name == n)
            .unwrap()
            .credential
            .is_token()
    };
    assert!(is_token("orders"));
    assert!(is_token("kv_reader"));
    assert!(!is_token("partner_prod"));
}

#[test]
fn required_strings_must_not_be_empty() {
    assert_eq!(
        error_after(|v| v["providers"]["orders_idp"]["client_id"] = json!("")),
        "providers.orders_idp.client_id: must not be an empty string"
    );
    assert_eq!(
        error_after(|v| v["connections"]["partner_prod"]["access"] = json!({"claims": {"scp": ""}})),
        "connections.partner_prod.access.claims.scp: expected an array of strings, found a string"
    );
}

#[test]
fn store_refresh_bounds_and_the_low_refresh_warning() {
    let refresh = |r: u64| store_result(|v| v["secrets"]["partner_key"]["refresh_s"] = json!(r));
    let low = |w: &Vec<String>| w.iter().any(|w| w.contains("is re-read every"));
    assert!(refresh(86_400).is_ok_and(|w| !low(&w)));
    assert_eq!(
        refresh(86_401).unwrap_err(),
        "secrets.partner_key.refresh_s: invalid value \"86401\": must be between 1 and 86400"
    );
    let w = refresh(29).unwrap();
    assert!(
        w.contains(&"secret \"partner_key\" is re-read every 29 s: below 30 s the store sees a read per proxy that often".to_string()),
        "{w:?}"
    );
    assert!(refresh(30).is_ok_and(|w| !low(&w)));
    assert!(refresh(1).is_ok_and(|w| low(&w)));
}

#[test]
fn vault_paths_and_mounts_are_plain_segments() {
    for bad in ["a//b", "a/./b", "./a", "a/.", "a/b/.."] {
        assert_eq!(
            store_result(|v| v["secrets"]["orders_secret"]["vault"]["path"] = json!(bad)).unwrap_err(),
            format!("secrets.orders_secret.vault.path: invalid value \"{bad}\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")")
        );
    }
    assert!(
        store_result(|v| v["secrets"]["orders_secret"]["vault"]["path"] = json!("a.b/c-d_e"))
            .is_ok()
    );
    for (bad, shown) in [
        ("/", ""),
        ("a b", "a b"),
        ("kv//x", "kv//x"),
        ("kv/./x", "kv/./x"),
        ("kv/..", "kv/.."),
        ("..", ".."),
    ] {
        assert_eq!(
            store_result(|v| v["secrets"]["orders_secret"]["vault"]["mount"] = json!(bad)).unwrap_err(),
            format!("secrets.orders_secret.vault.mount: invalid value \"{shown}\": not a Vault mount path"),
            "{bad}"
        );
    }
    let c = store_result(|v| v["secrets"]["orders_secret"]["vault"]["mount"] = json!("/kv/v2/"));
    assert!(c.is_ok(), "{c:?}");
    let c = Config::parse(
        {
            let mut v = store_config();
            v["secrets"]["orders_secret"]["vault"]["mount"] = json!("/kv/v2/");
            v
        }
        .to_string()
        .as_bytes(),
        &env,
    )
    .unwrap();
    let s = c.stores.iter().find(|s| s.name == "orders_secret").unwrap();
    assert_eq!(s.path, "/v1/kv/v2/data/orders/idp");
}

#[test]
fn vault_namespace_is_a_header_value() {
    let ns =
        |n: &str| store_result(|v| v["secrets"]["orders_secret"]["vault"]["namespace"] = json!(n));
    for bad in ["team\r\na", "a\u{1f}", "a\u{7f}", "\u{0}"] {
        assert_eq!(
            ns(bad).unwrap_err(),
            format!(
                "secrets.orders_secret.vault.namespace: invalid value {bad:?}: not a valid header value (control characters)"
            ),
            "{bad:?}"
        );
    }
    assert!(ns("team a/b ~é").is_ok());
}

#[test]
fn key_vault_identity_must_need_no_caller_nor_a_stored_secret() {
    let refused = |conn: &str| {
        format!("secrets.partner_key.identity: invalid value \"{conn}\": must be an azure_managed_identity connection, or an oauth2 one that needs no caller and whose client_secret is not in a store")
    };
    let add = |v: &mut Value, grant: &str, secret: &str| {
        v["secrets"]["idp_secret"] = json!({"env": "ORDERS_CLIENT_SECRET"});
        v["providers"]["plain_idp"] = json!({"type": "oauth2", "cluster": "idp",
            "token_url": "https://idp/token", "client_id": "gw", "client_secret": secret});
        v["connections"]["reader"] = json!({"provider": "plain_idp", "grant": grant});
        v["secrets"]["partner_key"]["identity"] = json!("reader");
        if grant == "token_exchange" {
            v["connections"]["reader"]["access"] = json!({"authenticated": true});
        }
    };
    // An oauth2 connection with client credentials from env: fine.
    assert!(store_result(|v| add(v, "client_credentials", "idp_secret")).is_ok());
    // Its client secret in a store, or a grant that needs the caller: refused.
    assert_eq!(
        store_result(|v| add(v, "client_credentials", "orders_secret")).unwrap_err(),
        refused("reader")
    );
    assert_eq!(
        store_result(|v| add(v, "token_exchange", "idp_secret")).unwrap_err(),
        refused("reader")
    );
}

#[test]
fn token_lifetimes_default_and_configured() {
    let c = load(&spec_example()).unwrap();
    let oauth = |c: &Config| {
        c.providers
            .iter()
            .find_map(|p| match &p.kind {
                ProviderKind::OAuth2(o) => Some((o.default_expires_in_s, o.refresh_margin_s)),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(oauth(&c), (300, 5));
    let mut v = spec_example();
    v["providers"]["orders_idp"]["default_expires_in_s"] = json!(120);
    v["providers"]["orders_idp"]["refresh_margin_s"] = json!(0);
    assert_eq!(oauth(&load(&v).unwrap()), (120, 0));
    assert_eq!(
        error_after(|v| v["providers"]["orders_idp"]["default_expires_in_s"] = json!(0)),
        "providers.orders_idp.default_expires_in_s: invalid value \"0\": must be at least 1"
    );
    let mut v = store_config();
    v["providers"]["azure_mi"]["default_expires_in_s"] = json!(60);
    v["providers"]["azure_mi"]["refresh_margin_s"] = json!(7);
    let c = Config::parse(v.to_string().as_bytes(), &env).unwrap();
    let mi = c
        .providers
        .iter()
        .find_map(|p| match &p.kind {
            ProviderKind::ManagedIdentity(m) => Some((m.default_expires_in_s, m.refresh_margin_s)),
            _ => None,
        })
        .unwrap();
    assert_eq!(mi, (60, 7));
}

#[test]
fn timeouts_up_to_five_minutes() {
    let mut v = spec_example();
    v["providers"]["orders_idp"]["timeout_ms"] = json!(300_000);
    assert!(load(&v).is_ok());
    assert_eq!(
        error_after(|v| v["providers"]["orders_idp"]["timeout_ms"] = json!(300_001)),
        "providers.orders_idp.timeout_ms: invalid value \"300001\": must be between 1 and 300000"
    );
}

#[test]
fn head_is_added_to_get_once() {
    let methods = |m: Value| {
        let mut v = spec_example();
        v["routes"][1]["match"]["methods"] = m;
        load(&v).unwrap().routes[1].matcher.methods.clone()
    };
    assert_eq!(methods(json!(["GET", "HEAD"])), ["GET", "HEAD"]);
    assert_eq!(methods(json!(["head", "get"])), ["HEAD", "GET"]);
    assert_eq!(methods(json!(["HEAD"])), ["HEAD"]);
    assert_eq!(methods(json!(["POST"])), ["POST"]);
}

#[test]
fn header_prefixes_take_tabs_and_non_ascii_but_no_control_characters() {
    let prefix = |p: &str| {
        let mut v = spec_example();
        v["routes"][0]["inject"][0]["prefix"] = json!(p);
        load(&v).map(|c| c.routes[0].inject[0].target.clone())
    };
    assert_eq!(
        prefix("Clé\t").unwrap(),
        Target::Header {
            name: "authorization".into(),
            prefix: Some("Clé\t".into())
        }
    );
    assert!(prefix("Key ~").is_ok());
    for bad in ["a\u{7f}", "a\u{1f}", "\n"] {
        assert!(prefix(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn key_vault_identifiers() {
    let id = |s: &str| {
        store_result(|v| {
            v["secrets"]["partner_key"] = json!({"azure_key_vault": s, "cluster": "keyvault",
                                                 "identity": "kv_reader"});
        })
    };
    let not_secret = |s: &str| {
        format!("secrets.partner_key.azure_key_vault: invalid value \"{s}\": not a secret identifier: expected /secrets/<name> or /secrets/<name>/<version> (names: letters, digits, -)")
    };
    let long = "a".repeat(127);
    assert!(id(&format!("https://kv.vault.azure.net/secrets/{long}")).is_ok());
    let r = id("https://KV.vault.azure.net:443/secrets/n-1/AbC0");
    assert!(r.is_ok(), "{r:?}");
    for bad in [
        format!("https://kv.vault.azure.net/secrets/{long}a"),
        "https://kv.vault.azure.net/secrets/a_b".to_string(),
        "https://kv.vault.azure.net/secrets/a_b/abc".to_string(),
        format!("https://kv.vault.azure.net/secrets/{long}a/abc"),
        "https://kv.vault.azure.net/secrets/n/xyz".to_string(),
        "https://kv.vault.azure.net/secrets//abc".to_string(),
    ] {
        assert_eq!(id(&bad).unwrap_err(), not_secret(&bad));
    }
    for bad in [
        "https:///secrets/n",
        "https://kv_1.vault.azure.net/secrets/n",
    ] {
        assert_eq!(
            id(bad).unwrap_err(),
            format!("secrets.partner_key.azure_key_vault: invalid value \"{bad}\": not a valid vault host")
        );
    }
}

#[test]
fn managed_identity_resources_are_uris_or_guids() {
    let resource = |r: &str| store_result(|v| v["connections"]["kv_reader"]["resource"] = json!(r));
    // The forms APIM's authentication-managed-identity takes.
    for ok in [
        "https://vault.azure.net",
        "https://management.azure.com/",
        "api://backend-app",
        "api://00000000-0000-0000-0000-000000000001",
        "urn:example:backend",
        "https://backend.contoso.com/api?x=%2F",
        "7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8",
        "7F3C1A2B-4D5E-6F70-8192-A3B4C5D6E7F8",
    ] {
        assert!(resource(ok).is_ok(), "{ok}: {:?}", resource(ok));
    }
    let c = Config::parse(
        {
            let mut v = store_config();
            v["connections"]["kv_reader"]["resource"] = json!("api://backend-app");
            v
        }
        .to_string()
        .as_bytes(),
        &env,
    )
    .unwrap();
    let reader = c
        .connections
        .iter()
        .find(|x| x.name == "kv_reader")
        .unwrap();
    assert!(
        matches!(&reader.credential, Credential::ManagedIdentity { resource } if resource == "api://backend-app")
    );
    let expected = "expected an absolute URI (https://vault.azure.net, api://backend-app) or an application (client) ID GUID";
    for (bad, why) in [
        ("   ", "must not be empty or blank"),
        (
            "api://backend app",
            "has spaces, control or non-ASCII characters",
        ),
        (
            "api://backend\tapp",
            "has spaces, control or non-ASCII characters",
        ),
        (
            "api://backend\u{7f}",
            "has spaces, control or non-ASCII characters",
        ),
        (
            "https://vault\r\n.azure.net",
            "has spaces, control or non-ASCII characters",
        ),
        (
            "api://bäckend",
            "has spaces, control or non-ASCII characters",
        ),
        ("backend-app", expected),
        ("vault.azure.net", expected),
        ("7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f", expected),
        ("7f3c1a2b4d5e6f708192a3b4c5d6e7f8", expected),
        ("7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7fg", expected),
        (":backend", expected),
        ("1api://backend", expected),
        ("ap_i://backend", expected),
        ("api:", expected),
        ("api://", "has no host after \"//\""),
        ("https:///path", "has no host after \"//\""),
        ("api://?x", "has no host after \"//\""),
        ("api://backend#x", "must not have a #fragment"),
        (
            "api://backend/{x}",
            "has characters a URI can't hold (percent-encode them)",
        ),
        (
            "api://backend/%zz",
            "has a \"%\" that is not a percent-encoded byte",
        ),
        (
            "api://backend/%2",
            "has a \"%\" that is not a percent-encoded byte",
        ),
    ] {
        assert_eq!(
            resource(bad).unwrap_err(),
            format!("connections.kv_reader.resource: invalid value {bad:?}: {why}"),
            "{bad:?}"
        );
    }
    assert_eq!(
        resource("").unwrap_err(),
        "connections.kv_reader.resource: must not be an empty string"
    );
}

#[test]
fn token_exchange_connections_are_never_public() {
    let exchange = |access: Value| {
        let mut v = spec_example();
        v["connections"]["obo"] = json!({"provider": "orders_idp", "grant": "token_exchange",
                                          "access": access});
        load(&v).map(|_| ()).map_err(|e| e.to_string())
    };
    let refused = "connections.obo.access.public: a token_exchange connection can't be public: \
                   it exchanges the caller's verified JWT, and a public connection admits \
                   callers without one";
    assert_eq!(exchange(json!({"public": true})).unwrap_err(), refused);
    assert_eq!(
        exchange(json!({"public": true, "authenticated": true})).unwrap_err(),
        refused
    );
    assert!(exchange(json!({"authenticated": true})).is_ok());
    assert!(exchange(json!({"public": false, "groups": ["g"]})).is_ok());
    // Other grants may be public.
    let mut v = spec_example();
    v["connections"]["orders_read"]["access"] = json!({"public": true});
    assert!(load(&v).is_ok());
}

#[test]
fn an_injected_key_vault_identity_is_warned_about() {
    let injected = "connection \"kv_reader\" is the Key Vault identity of secret \"partner_key\" \
                    and route \"kv\" injects it: a token that can read the vault leaves the \
                    gateway; give the route a connection of its own";
    let warned = |w: &Vec<String>| w.iter().any(|w| w.contains("Key Vault identity"));
    // Only a store uses it: no warning.
    assert!(store_result(|_| {}).is_ok_and(|w| !warned(&w)));
    let w = store_result(|v| {
        v["connections"]["kv_reader"]["access"] = json!({"authenticated": true});
        let inject = json!([{"connections": ["kv_reader"], "header": "authorization"}]);
        v["routes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "kv", "match": {"path_prefix": "/kv/"}, "inject": inject}));
        // A second route injecting it: still one warning, naming the first.
        v["routes"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "kv2", "match": {"path_prefix": "/kv2/"}, "inject": inject}));
    })
    .unwrap();
    assert_eq!(
        w.iter()
            .filter(|w| w.contains("Key Vault identity"))
            .collect::<Vec<_>>(),
        vec![injected],
        "{w:?}"
    );
    // An injected connection that is no store's identity: no warning.
    let w = store_result(|v| {
        v["connections"]["mi_upstream"] = json!({"provider": "azure_mi",
            "resource": "api://backend-app", "access": {"authenticated": true}});
        v["routes"][1]["inject"][0]["connections"] = json!(["mi_upstream"]);
    })
    .unwrap();
    assert!(!warned(&w), "{w:?}");
}

#[test]
fn a_store_reference_points_at_the_store_it_names() {
    // Values and stores interleaved in key order: the first pass numbers the
    // stores as the secrets reader builds them.
    let mut v = store_config();
    v["secrets"]["a_value"] = json!({"env": "PARTNER_API_KEY"});
    v["secrets"]["zz_store"] = json!({"azure_key_vault": "https://kv.vault.azure.net/secrets/z",
                                       "cluster": "keyvault", "identity": "kv_reader"});
    for (conn, secret) in [
        ("c_partner", "partner_key"),
        ("c_orders", "orders_secret"),
        ("c_role", "by_role"),
        ("c_pinned", "pinned"),
        ("c_zz", "zz_store"),
    ] {
        v["connections"][conn] =
            json!({"provider": "partner", "api_key": secret, "access": {"authenticated": true}});
    }
    let c = load(&v).unwrap();
    assert_eq!(c.stores.len(), 5);
    for conn in &c.connections {
        let Credential::ApiKey(SecretRef::Store(i)) = &conn.credential else {
            continue;
        };
        let want = v["connections"][&conn.name]["api_key"].as_str().unwrap();
        assert_eq!(c.stores[*i].name, want, "{}", conn.name);
    }
    let stored: Vec<&str> = c.stores.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        stored,
        [
            "by_role",
            "orders_secret",
            "partner_key",
            "pinned",
            "zz_store"
        ]
    );
}

#[test]
fn a_key_vault_identity_may_name_a_connection_anywhere() {
    // The first pass knows every connection before the secrets are read.
    let mut v = store_config();
    v["connections"]["zz_reader"] =
        json!({"provider": "azure_mi", "resource": "https://vault.azure.net"});
    v["secrets"]["partner_key"]["identity"] = json!("zz_reader");
    let c = load(&v).unwrap();
    let zz = c
        .connections
        .iter()
        .position(|x| x.name == "zz_reader")
        .unwrap();
    assert_eq!(zz, c.connections.len() - 1);
    let kv = c.stores.iter().find(|s| s.name == "partner_key").unwrap();
    assert!(matches!(kv.kind, StoreKind::KeyVault { identity } if identity == zz));
}

#[test]
fn every_cluster_is_a_non_empty_header_value() {
    // Each cluster field: its path in messages, and its JSON pointer.
    let fields = [
        ("providers.idp.cluster", "/providers/idp/cluster"),
        ("providers.azure_mi.cluster", "/providers/azure_mi/cluster"),
        (
            "secrets.partner_key.cluster",
            "/secrets/partner_key/cluster",
        ),
        (
            "secrets.orders_secret.vault.cluster",
            "/secrets/orders_secret/vault/cluster",
        ),
        ("connections.cert.cluster", "/connections/cert/cluster"),
    ];
    let with = |pointer: &str, cluster: &str| {
        let mut v = store_config();
        v["providers"]["mtls"] = json!({"type": "client_certificate"});
        v["connections"]["cert"] = json!({"provider": "mtls", "cluster": "partner_a"});
        *v.pointer_mut(pointer).unwrap() = json!(cluster);
        load(&v).map(|_| ()).map_err(|e| e.to_string())
    };
    for (path, set) in fields {
        assert_eq!(with(set, "outbound|443||idp.example.com"), Ok(()), "{path}");
        assert_eq!(with(set, "a\tb"), Ok(()), "{path}");
        assert_eq!(
            with(set, "idp\r\nx: y"),
            Err(format!(
                "{path}: invalid value \"idp\\r\\nx: y\": not a valid header value (control characters)"
            ))
        );
        assert_eq!(
            with(set, "idp "),
            Err(format!(
                "{path}: invalid value \"idp \": not a valid header value (leading or trailing whitespace)"
            ))
        );
        assert_eq!(
            with(set, ""),
            Err(format!("{path}: must not be an empty string"))
        );
    }
}

#[test]
fn header_values_follow_rfc_9110_field_value() {
    let ns =
        |n: &str| store_result(|v| v["secrets"]["orders_secret"]["vault"]["namespace"] = json!(n));
    assert!(ns("team\ta").is_ok());
    assert!(ns("").is_ok());
    for bad in [" team", "team ", "\tteam", "team\t"] {
        assert_eq!(
            ns(bad).unwrap_err(),
            format!("secrets.orders_secret.vault.namespace: invalid value {bad:?}: not a valid header value (leading or trailing whitespace)")
        );
    }
    // A prefix is the start of a value: it may end in whitespace, not start with it.
    let prefix = |p: &str| {
        let mut v = spec_example();
        v["routes"][0]["inject"][0]["prefix"] = json!(p);
        load(&v).map(|_| ()).map_err(|e| e.to_string())
    };
    assert_eq!(prefix("Bearer "), Ok(()));
    assert_eq!(prefix(""), Ok(()));
    assert_eq!(
        prefix(" Bearer "),
        Err("routes[0].inject[0].prefix: invalid value \" Bearer \": not a valid header value (leading whitespace)".into())
    );
}

#[test]
fn an_empty_query_parameter_is_refused() {
    assert_eq!(
        error_after(|v| v["routes"][1]["inject"][0]["query"] = json!("")),
        "routes[1].inject[0].query: must not be an empty string"
    );
}

#[test]
fn drop_on_401_after_defaults_to_10_s_and_is_at_most_an_hour() {
    let after = |v: &Value| {
        let c = load(v).unwrap();
        c.providers
            .iter()
            .filter_map(|p| match &p.kind {
                ProviderKind::OAuth2(o) => Some(o.drop_on_401_after_s),
                ProviderKind::ManagedIdentity(m) => Some(m.drop_on_401_after_s),
                _ => None,
            })
            .collect::<Vec<u64>>()
    };
    assert_eq!(after(&spec_example()), [10]);
    assert_eq!(after(&store_config()), [10, 10]);
    for (p, s) in [("orders_idp", 0), ("orders_idp", 3600)] {
        let mut v = spec_example();
        v["providers"][p]["drop_on_401_after_s"] = json!(s);
        assert_eq!(after(&v), [s]);
    }
    let mut v = store_config();
    v["providers"]["azure_mi"]["drop_on_401_after_s"] = json!(3600);
    v["providers"]["idp"]["drop_on_401_after_s"] = json!(7);
    assert_eq!(after(&v), [3600, 7]);
    assert_eq!(
        error_after(|v| v["providers"]["orders_idp"]["drop_on_401_after_s"] = json!(3601)),
        "providers.orders_idp.drop_on_401_after_s: invalid value \"3601\": must be at most 3600"
    );
    assert_eq!(
        store_result(|v| v["providers"]["azure_mi"]["drop_on_401_after_s"] = json!(3601))
            .unwrap_err(),
        "providers.azure_mi.drop_on_401_after_s: invalid value \"3601\": must be at most 3600"
    );
}

#[test]
fn a_route_s_match_is_compiled_whole_and_the_router_uses_it() {
    let mut v = spec_example();
    v["routes"][1]["match"] = json!({"route_name": "partner-rt", "host": "Partner.Example:443",
                                      "path_exact": "/partner/x", "methods": ["post"]});
    let c = load(&v).unwrap();
    assert_eq!(
        c.routes[1].matcher,
        RouteMatch {
            route_name: Some("partner-rt".into()),
            host: Some("partner.example".into()),
            path: Some(PathMatch::Exact("/partner/x".into())),
            methods: vec!["POST".into()],
            ..RouteMatch::default()
        }
    );
    // Or every route name with a prefix; not both.
    v["routes"][1]["match"] = json!({"route_name_prefix": "httproute/shop/partner/"});
    assert_eq!(
        load(&v).unwrap().routes[1]
            .matcher
            .route_name_prefix
            .as_deref(),
        Some("httproute/shop/partner/")
    );
    v["routes"][1]["match"] = json!({"route_name_prefix": "a", "route_name": "b"});
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "routes[1].match.route_name_prefix: give \"route_name\" or \"route_name_prefix\", not both"
    );
    v["routes"][1]["match"] = json!({"route_name_prefix": ""});
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "routes[1].match.route_name_prefix: must not be an empty string"
    );
    let req = |route_name, path, method| crate::router::RequestInfo {
        route_name,
        host: "partner.example",
        path,
        method,
    };
    assert_eq!(
        c.router
            .find(&req(Some("partner-rt"), "/partner/x", "POST")),
        Some(1)
    );
    assert_eq!(
        c.router.find(&req(Some("orders"), "/partner/x", "POST")),
        Some(0)
    );
    assert_eq!(
        c.router.find(&req(Some("partner-rt"), "/partner/x", "GET")),
        None
    );
}

#[test]
fn every_cluster_header_is_stripped_with_the_documented_one() {
    let v = json!({
        "providers": { "mtls": { "type": "client_certificate" } },
        "connections": {
            "a": { "provider": "mtls", "cluster": "ca", "access": { "authenticated": true } },
            "b": { "provider": "mtls", "cluster": "cb", "access": { "authenticated": true } }
        },
        "routes": [
            { "name": "r1", "match": { "path_prefix": "/1/" },
              "inject": [ { "connections": ["a"], "cluster_header": "X-Partner-Cluster" } ] },
            { "name": "r2", "match": { "path_prefix": "/2/" },
              "inject": [ { "connections": ["b"], "cluster_header": "x-partner-cluster" } ] },
            { "name": "r3", "match": { "path_prefix": "/3/" },
              "inject": [ { "connections": ["a", "b"], "cluster_header": "a-cluster" } ] }
        ]
    });
    let c = load(&v).unwrap();
    assert_eq!(
        c.cluster_headers,
        ["a-cluster", "x-latchkey-cluster", "x-partner-cluster"]
    );
    let c = load(&json!({})).unwrap();
    assert_eq!(c.cluster_headers, ["x-latchkey-cluster"]);
    // Only client certificates go in a cluster_header entry.
    let mut v = v;
    v["secrets"] = json!({"k": {"env": "PARTNER_API_KEY"}});
    v["providers"]["keys"] = json!({"type": "api_key"});
    v["connections"]["key"] =
        json!({"provider": "keys", "api_key": "k", "access": {"authenticated": true}});
    v["routes"][2]["inject"][0]["connections"] = json!(["a", "key"]);
    assert_eq!(
        load(&v).unwrap_err().to_string(),
        "routes[2].inject[0].connections: a cluster_header entry takes client_certificate connections only"
    );
}

/// SPEC's user-delegated example (v1.2), with a Key Vault token store beside
/// the Vault one and a provider that names its issuer and revocation URL.
fn delegated_config() -> Value {
    json!({
      "claims": { "from": "header", "key": "x-jwt-payload" },
      "secrets": {
        "github_secret": { "env": "ORDERS_CLIENT_SECRET" },
        "vault_token": { "env": "PARTNER_API_KEY" },
        "consent_state_key": { "inline": "0123456789abcdef0123456789abcdef" }
      },
      "providers": {
        "github": { "type": "oauth2", "cluster": "github",
                    "authorization_url": "https://github.com/login/oauth/authorize",
                    "token_url": "https://github.com/login/oauth/access_token",
                    "client_id": "Iv1.8a61f9b3a7aba766", "client_secret": "github_secret" },
        "crm": { "type": "oauth2", "cluster": "crm",
                 "authorization_url": "https://login.crm.example/oauth/authorize?tenant=t1",
                 "token_url": "https://login.crm.example/oauth/token",
                 "issuer": "https://login.crm.example",
                 "revocation_url": "https://login.crm.example:8443/oauth/revoke",
                 "client_id": "crm-gw", "client_secret": "github_secret" },
        "azure_mi": { "type": "azure_managed_identity", "cluster": "imds" }
      },
      "token_stores": {
        "user_tokens": { "vault": { "cluster": "vault", "url": "http://vault.internal:8200",
                                    "mount": "secret", "prefix": "latchkey/connections",
                                    "token": "vault_token" } },
        "kv_tokens": { "azure_key_vault": "https://kv-gw.vault.azure.net", "cluster": "keyvault",
                       "identity": "kv_writer", "timeout_ms": 3000 }
      },
      "consent": { "path": "/.latchkey/connections", "redirect_uri": "https://api.example.com/.latchkey/callback",
                   "state_key": "consent_state_key", "return_to": ["https://portal.example.com/"] },
      "connections": {
        "github_mine": { "provider": "github", "grant": "authorization_code", "per_user": true,
                         "scopes": ["repo"], "store": "user_tokens", "access": { "authenticated": true } },
        "crm_team": { "provider": "crm", "grant": "authorization_code", "store": "kv_tokens",
                      "consent": { "groups": ["crm-admins"] }, "access": { "groups": ["sales"] } },
        "kv_writer": { "provider": "azure_mi", "resource": "https://vault.azure.net" }
      },
      "routes": [
        { "name": "github", "match": { "path_prefix": "/github/" },
          "inject": [ { "connections": ["github_mine"], "header": "authorization" } ] },
        { "name": "crm", "match": { "path_prefix": "/crm/" },
          "inject": [ { "connections": ["crm_team"], "header": "authorization" } ] }
      ]
    })
}

fn delegated_error(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = delegated_config();
    edit(&mut v);
    match load(&v) {
        Ok(_) => panic!("configuration was accepted"),
        Err(e) => e.to_string(),
    }
}

fn delegated_loads(edit: impl FnOnce(&mut Value)) -> Config {
    let mut v = delegated_config();
    edit(&mut v);
    load(&v).unwrap()
}

#[test]
fn a_user_delegated_configuration_loads() {
    let c = load(&delegated_config()).unwrap();
    let by_conn = |n: &str| c.connections.iter().find(|x| x.name == n).unwrap();
    let store_index = |n: &str| c.token_stores.iter().position(|t| t.name == n).unwrap();
    let oauth = |n: &str| {
        let p = c.providers.iter().find(|p| p.name == n).unwrap();
        match &p.kind {
            ProviderKind::OAuth2(o) => o,
            _ => panic!("not oauth2"),
        }
    };
    // Providers: where people consent, the issuer a callback must name, revocation.
    let github = oauth("github");
    assert_eq!(
        github.authorization_url.as_deref(),
        Some("https://github.com/login/oauth/authorize")
    );
    assert_eq!((&github.issuer, &github.revocation), (&None, &None));
    let crm = oauth("crm");
    assert_eq!(
        crm.authorization_url.as_deref(),
        Some("https://login.crm.example/oauth/authorize?tenant=t1")
    );
    assert_eq!(crm.issuer.as_deref(), Some("https://login.crm.example"));
    assert_eq!(
        crm.revocation,
        Some(Endpoint {
            authority: "login.crm.example:8443".into(),
            path: "/oauth/revoke".into()
        })
    );
    // Token stores.
    assert_eq!(c.token_stores.len(), 2);
    let vault = &c.token_stores[store_index("user_tokens")];
    assert_eq!(
        (
            vault.cluster.as_str(),
            vault.authority.as_str(),
            vault.timeout_ms
        ),
        ("vault", "vault.internal:8200", 5000)
    );
    assert!(
        matches!(&vault.kind, TokenStoreKind::Vault { token, namespace: None, data_path, metadata_path }
        if token.expose() == "pk-secret-1"
            && data_path == "/v1/secret/data/latchkey/connections"
            && metadata_path == "/v1/secret/metadata/latchkey/connections")
    );
    let kv = &c.token_stores[store_index("kv_tokens")];
    assert_eq!(
        (kv.cluster.as_str(), kv.authority.as_str(), kv.timeout_ms),
        ("keyvault", "kv-gw.vault.azure.net", 3000)
    );
    let writer = c
        .connections
        .iter()
        .position(|x| x.name == "kv_writer")
        .unwrap();
    assert!(
        matches!(&kv.kind, TokenStoreKind::KeyVault { identity, prefix }
        if *identity == writer && prefix == "latchkey-connections")
    );
    // The consent section.
    let consent = c.consent.as_ref().unwrap();
    assert_eq!(consent.path, "/.latchkey/connections");
    assert_eq!(
        consent.redirect_uri,
        "https://api.example.com/.latchkey/callback"
    );
    assert_eq!(consent.callback_path, "/.latchkey/callback");
    assert_eq!(
        consent.state_key.expose(),
        "0123456789abcdef0123456789abcdef"
    );
    assert_eq!(consent.return_to, ["https://portal.example.com/"]);
    // Connections: per-user, and shared with who may consent.
    let Credential::OAuth2(mine) = &by_conn("github_mine").credential else {
        panic!("not oauth2")
    };
    assert!(
        matches!(&mine.grant, Grant::AuthorizationCode { per_user: true, store, consent: None }
        if *store == store_index("user_tokens"))
    );
    assert_eq!(mine.scopes, ["repo"]);
    let Credential::OAuth2(team) = &by_conn("crm_team").credential else {
        panic!("not oauth2")
    };
    let admins = Access {
        groups: vec!["crm-admins".into()],
        ..Access::default()
    };
    assert!(
        matches!(&team.grant, Grant::AuthorizationCode { per_user: false, store, consent: Some(a) }
        if *store == store_index("kv_tokens") && *a == admins)
    );
    // A per-user connection is keyed by the caller's issuer too: `iss` is read
    // as a claim. Neither route is a token exchange.
    let iss = c.issuer_claim.unwrap();
    assert_eq!(c.claim_paths[iss].dotted, "iss");
    let route = |n: &str| c.routes.iter().find(|r| r.name == n).unwrap();
    assert!(!route("github").binds_caller && route("github").needs_claims);
    assert!(!route("crm").binds_caller && route("crm").needs_claims);
    // Which routes may inject a per-user consent, known at load.
    assert!(route("github").per_user && !route("crm").per_user);
    // Secrets stay out of the Debug output.
    let dump = format!("{c:?}");
    for secret in [
        "pk-secret-1",
        "cs-secret-2",
        "0123456789abcdef0123456789abcdef",
    ] {
        assert!(!dump.contains(secret), "{secret}");
    }
    // Without any of it, nothing of it.
    let plain = load(&spec_example()).unwrap();
    assert!(plain.token_stores.is_empty() && plain.consent.is_none());
    assert_eq!(plain.issuer_claim, None);
    // Shared connections only: no issuer claim either.
    let shared = delegated_loads(|v| {
        let c = v["connections"].as_object_mut().unwrap();
        c.remove("github_mine");
        v["routes"].as_array_mut().unwrap().remove(0);
    });
    assert_eq!(shared.issuer_claim, None);
}

#[test]
fn consent_urls_and_paths_are_written_one_way() {
    let c = delegated_loads(|v| {
        v["consent"]["path"] = json!("/.latchkey/connections/");
        v["consent"]["redirect_uri"] = json!("HTTPS://API.Example.com:443/cb");
        v["consent"]["return_to"] =
            json!(["https://Portal.Example.com", "http://localhost:3000/app/"]);
        v["token_stores"]["user_tokens"]["vault"]["url"] =
            json!("http://vault.internal:8200/base/");
        v["token_stores"]["user_tokens"]["vault"]["mount"] = json!("/kv/");
        v["token_stores"]["user_tokens"]["vault"]["namespace"] = json!("team-a");
        v["token_stores"]["kv_tokens"]["prefix"] = json!("Consents-1");
        v["providers"]["github"]["authorization_url"] =
            json!("https://GitHub.com:443/login/oauth/authorize");
    });
    let consent = c.consent.as_ref().unwrap();
    assert_eq!(consent.path, "/.latchkey/connections");
    assert_eq!(consent.redirect_uri, "https://api.example.com/cb");
    assert_eq!(consent.callback_path, "/cb");
    assert_eq!(
        consent.return_to,
        ["https://portal.example.com/", "http://localhost:3000/app/"]
    );
    let by = |n: &str| c.token_stores.iter().find(|t| t.name == n).unwrap();
    assert!(
        matches!(&by("user_tokens").kind, TokenStoreKind::Vault { namespace: Some(ns), data_path, metadata_path, .. }
        if ns == "team-a"
            && data_path == "/base/v1/kv/data/latchkey/connections"
            && metadata_path == "/base/v1/kv/metadata/latchkey/connections")
    );
    assert!(
        matches!(&by("kv_tokens").kind, TokenStoreKind::KeyVault { prefix, .. } if prefix == "Consents-1")
    );
    let ProviderKind::OAuth2(p) = &c
        .providers
        .iter()
        .find(|p| p.name == "github")
        .unwrap()
        .kind
    else {
        panic!("not oauth2")
    };
    assert_eq!(
        p.authorization_url.as_deref(),
        Some("https://github.com/login/oauth/authorize")
    );
    // Vault's defaults: mount "secret", prefix "latchkey/connections".
    let c = delegated_loads(|v| {
        let vault = v["token_stores"]["user_tokens"]["vault"]
            .as_object_mut()
            .unwrap();
        vault.remove("mount");
        vault.remove("prefix");
    });
    assert!(
        matches!(&c.token_stores.iter().find(|t| t.name == "user_tokens").unwrap().kind,
        TokenStoreKind::Vault { data_path, .. } if data_path == "/v1/secret/data/latchkey/connections")
    );
}

#[test]
fn bad_user_delegated_configurations_name_the_field() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        // The grant.
        ("connections.github_mine.grant: \"authorization_code\" needs authorization_url on its provider",
         Box::new(|v| { v["providers"]["github"].as_object_mut().unwrap().remove("authorization_url"); })),
        ("connections.github_mine.store: required field is missing",
         Box::new(|v| { v["connections"]["github_mine"].as_object_mut().unwrap().remove("store"); })),
        ("connections.github_mine.store: invalid value \"secrets\": not a name in token_stores",
         Box::new(|v| v["connections"]["github_mine"]["store"] = json!("secrets"))),
        ("connections.github_mine.consent: a per_user connection is consented to by each caller: its access says who",
         Box::new(|v| v["connections"]["github_mine"]["consent"] = json!({ "groups": ["a"] }))),
        ("connections.crm_team.consent: required for a shared authorization_code connection (who may give the consent); or set per_user: true",
         Box::new(|v| { v["connections"]["crm_team"].as_object_mut().unwrap().remove("consent"); })),
        ("connections.github_mine.consent: required for a shared authorization_code connection (who may give the consent); or set per_user: true",
         Box::new(|v| v["connections"]["github_mine"]["per_user"] = json!(false))),
        ("connections.github_mine.per_user: expected a boolean, found a string",
         Box::new(|v| v["connections"]["github_mine"]["per_user"] = json!("yes"))),
        // latchkey sets these in the login URL and the code redemption itself.
        ("connections.github_mine.extra_params.state: latchkey sets this token request parameter itself",
         Box::new(|v| v["connections"]["github_mine"]["extra_params"] = json!({"state": "x"}))),
        ("connections.github_mine.extra_params.code_verifier: latchkey sets this token request parameter itself",
         Box::new(|v| v["connections"]["github_mine"]["extra_params"] = json!({"code_verifier": "x"}))),
        ("connections.github_mine.extra_params.redirect_uri: latchkey sets this token request parameter itself",
         Box::new(|v| v["connections"]["github_mine"]["extra_params"] = json!({"redirect_uri": "x"}))),
        ("connections.github_mine.access.public: a per_user connection can't be public: it injects the caller's own token, and a public connection admits callers nobody identified",
         Box::new(|v| v["connections"]["github_mine"]["access"] = json!({"public": true}))),
        ("connections.github_mine.access.public: a per_user connection can't be public: it injects the caller's own token, and a public connection admits callers nobody identified",
         Box::new(|v| v["connections"]["github_mine"]["access"] = json!({ "public": true }))),
        ("connections.crm_team.consent: access policy admits no one; give at least one of \"public\": true, \"authenticated\": true, \"users\", \"groups\" or \"claims\"",
         Box::new(|v| v["connections"]["crm_team"]["consent"] = json!({}))),
        // Fields of the grant on other grants.
        ("connections.orders.per_user: only allowed when grant is \"authorization_code\"",
         Box::new(|v| v["connections"]["orders"] = json!({ "provider": "github", "grant": "client_credentials", "per_user": true }))),
        ("connections.orders.store: only allowed when grant is \"authorization_code\"",
         Box::new(|v| v["connections"]["orders"] = json!({ "provider": "github", "grant": "client_credentials", "store": "user_tokens" }))),
        ("connections.orders.consent: only allowed when grant is \"authorization_code\"",
         Box::new(|v| v["connections"]["orders"] = json!({ "provider": "github", "grant": "token_exchange",
             "access": { "authenticated": true }, "consent": { "groups": ["a"] } }))),
        ("connections.kv_writer.store: not allowed for a connection of an azure_managed_identity provider",
         Box::new(|v| v["connections"]["kv_writer"]["store"] = json!("user_tokens"))),
        // The connection's name goes into URLs and store paths.
        ("connections.git.hub: invalid value \"git.hub\": an authorization_code connection's name goes into URLs and store paths: 1 to 64 letters, digits, \"-\" or \"_\"",
         Box::new(|v| {
             let c = v["connections"].as_object_mut().unwrap();
             let mine = c.remove("github_mine").unwrap();
             c.insert("git.hub".into(), mine);
             v["routes"][0]["inject"][0]["connections"] = json!(["git.hub"]);
         })),
        // The consent section.
        ("connections.crm_team.grant: \"authorization_code\" needs the top-level \"consent\" section (login and callback endpoints)",
         Box::new(|v| { v.as_object_mut().unwrap().remove("consent"); })),
        ("consent.state_key: the secret is shorter than 32 bytes: too short to sign consent states",
         Box::new(|v| v["secrets"]["consent_state_key"] = json!({ "inline": "0123456789abcdef0123456789abcde" }))),
        ("consent.state_key: unknown env or inline secret \"nope\"",
         Box::new(|v| v["consent"]["state_key"] = json!("nope"))),
        ("consent.state_key: required field is missing",
         Box::new(|v| { v["consent"].as_object_mut().unwrap().remove("state_key"); })),
        ("consent.redirect_uri: invalid value \"https://api.example.com/cb?x=1\": must not have a query (the authorization server adds code and state)",
         Box::new(|v| v["consent"]["redirect_uri"] = json!("https://api.example.com/cb?x=1"))),
        ("consent.redirect_uri: invalid value \"https://api.example.com/.latchkey/connections/callback\": its path must not be under consent.path",
         Box::new(|v| v["consent"]["redirect_uri"] = json!("https://api.example.com/.latchkey/connections/callback"))),
        ("consent.redirect_uri: invalid value \"https://api.example.com/.latchkey/connections\": its path must not be under consent.path",
         Box::new(|v| v["consent"]["redirect_uri"] = json!("https://api.example.com/.latchkey/connections"))),
        ("consent.redirect_uri: invalid value \"api.example.com/cb\": not an absolute URL (expected http://host/path or https://host/path)",
         Box::new(|v| v["consent"]["redirect_uri"] = json!("api.example.com/cb"))),
        ("consent.redirect_uri: invalid value \"https://api.example.com/cb#x\": must not have a #fragment",
         Box::new(|v| v["consent"]["redirect_uri"] = json!("https://api.example.com/cb#x"))),
        ("consent.path: invalid value \"/\": must not be \"/\": every path under it would be latchkey's",
         Box::new(|v| v["consent"]["path"] = json!("/"))),
        ("consent.path: invalid value \"latchkey\": must start with \"/\"",
         Box::new(|v| v["consent"]["path"] = json!("latchkey"))),
        ("consent.return_to[0]: invalid value \"https://portal.example.com/app\": must end with \"/\" and have no query (it is a prefix of the URLs allowed)",
         Box::new(|v| v["consent"]["return_to"] = json!(["https://portal.example.com/app"]))),
        ("consent.return_to[1]: invalid value \"https://portal.example.com/?x=/\": must end with \"/\" and have no query (it is a prefix of the URLs allowed)",
         Box::new(|v| v["consent"]["return_to"] = json!(["https://a.example/", "https://portal.example.com/?x=/"]))),
        ("consent.return_to[0]: invalid value \"https://user@portal.example.com/\": must not hold a user name or password",
         Box::new(|v| v["consent"]["return_to"] = json!(["https://user@portal.example.com/"]))),
        ("consent.return_to[0]: invalid value \"javascript:alert(1)//\": not an absolute URL (expected http://host/path or https://host/path)",
         Box::new(|v| v["consent"]["return_to"] = json!(["javascript:alert(1)//"]))),
        ("consent.colour: unknown field; expected one of \"path\", \"redirect_uri\", \"state_key\", \"return_to\"",
         Box::new(|v| v["consent"]["colour"] = json!("blue"))),
        // Providers.
        ("providers.github.authorization_url: invalid value \"https://github.com/authorize#x\": must not have a #fragment",
         Box::new(|v| v["providers"]["github"]["authorization_url"] = json!("https://github.com/authorize#x"))),
        ("providers.github.authorization_url: invalid value \"ftp://github.com/authorize\": scheme must be http or https",
         Box::new(|v| v["providers"]["github"]["authorization_url"] = json!("ftp://github.com/authorize"))),
        ("providers.crm.revocation_url: invalid value \"/oauth/revoke\": not an absolute URL (expected http://host/path or https://host/path)",
         Box::new(|v| v["providers"]["crm"]["revocation_url"] = json!("/oauth/revoke"))),
        ("providers.crm.issuer: expected a string, found a number",
         Box::new(|v| v["providers"]["crm"]["issuer"] = json!(1))),
        // Token stores.
        ("token_stores.user_tokens: give exactly one of \"vault\" or \"azure_key_vault\"",
         Box::new(|v| v["token_stores"]["user_tokens"]["azure_key_vault"] = json!("https://kv.vault.azure.net"))),
        ("token_stores.user_tokens: give exactly one of \"vault\" or \"azure_key_vault\"",
         Box::new(|v| v["token_stores"]["user_tokens"] = json!({ "timeout_ms": 1000 }))),
        ("token_stores.user_tokens.cluster: for \"vault\", give it inside the \"vault\" object",
         Box::new(|v| v["token_stores"]["user_tokens"]["cluster"] = json!("vault"))),
        ("token_stores.user_tokens.prefix: for \"vault\", give it inside the \"vault\" object",
         Box::new(|v| v["token_stores"]["user_tokens"]["prefix"] = json!("x"))),
        ("token_stores.user_tokens.vault.url: invalid value \"http://vault:8200/?x=1\": must not have a query",
         Box::new(|v| v["token_stores"]["user_tokens"]["vault"]["url"] = json!("http://vault:8200/?x=1"))),
        ("token_stores.user_tokens.vault.prefix: invalid value \"a/../b\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
         Box::new(|v| v["token_stores"]["user_tokens"]["vault"]["prefix"] = json!("a/../b"))),
        ("token_stores.user_tokens.vault.mount: invalid value \"\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
         Box::new(|v| v["token_stores"]["user_tokens"]["vault"]["mount"] = json!("/"))),
        ("token_stores.user_tokens.vault.token: required field is missing",
         Box::new(|v| { v["token_stores"]["user_tokens"]["vault"].as_object_mut().unwrap().remove("token"); })),
        ("token_stores.user_tokens.vault.token: unknown env or inline secret \"nope\"",
         Box::new(|v| v["token_stores"]["user_tokens"]["vault"]["token"] = json!("nope"))),
        ("token_stores.user_tokens.vault.approle: unknown field; expected one of \"cluster\", \"url\", \"mount\", \"prefix\", \"token\", \"namespace\"",
         Box::new(|v| v["token_stores"]["user_tokens"]["vault"]["approle"] = json!({}))),
        ("token_stores.kv_tokens.identity: must name an azure_managed_identity connection, or a client_credentials one whose client secret is known at load (its token reads and writes the vault)",
         Box::new(|v| v["token_stores"]["kv_tokens"]["identity"] = json!("github_mine"))),
        ("token_stores.kv_tokens.identity: unknown connection \"nope\"",
         Box::new(|v| v["token_stores"]["kv_tokens"]["identity"] = json!("nope"))),
        ("token_stores.kv_tokens.identity: required field is missing",
         Box::new(|v| { v["token_stores"]["kv_tokens"].as_object_mut().unwrap().remove("identity"); })),
        ("token_stores.kv_tokens.prefix: invalid value \"latchkey_connections\": must be 1 to 40 letters, digits or \"-\" (Key Vault's secret name alphabet)",
         Box::new(|v| v["token_stores"]["kv_tokens"]["prefix"] = json!("latchkey_connections"))),
        ("token_stores.kv_tokens.prefix: invalid value \"\": must be 1 to 40 letters, digits or \"-\" (Key Vault's secret name alphabet)",
         Box::new(|v| v["token_stores"]["kv_tokens"]["prefix"] = json!(""))),
        ("token_stores.kv_tokens.prefix: invalid value \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": must be 1 to 40 letters, digits or \"-\" (Key Vault's secret name alphabet)",
         Box::new(|v| v["token_stores"]["kv_tokens"]["prefix"] = json!("a".repeat(41)))),
        ("token_stores.kv_tokens.azure_key_vault: invalid value \"http://kv-gw.vault.azure.net\": must be the vault's URL, https://<vault>.vault.azure.net",
         Box::new(|v| v["token_stores"]["kv_tokens"]["azure_key_vault"] = json!("http://kv-gw.vault.azure.net"))),
        ("token_stores.kv_tokens.azure_key_vault: invalid value \"https://kv-gw.vault.azure.net/secrets/x\": must be the vault's URL, https://<vault>.vault.azure.net",
         Box::new(|v| v["token_stores"]["kv_tokens"]["azure_key_vault"] = json!("https://kv-gw.vault.azure.net/secrets/x"))),
        ("token_stores.kv_tokens.timeout_ms: invalid value \"0\": must be between 1 and 300000",
         Box::new(|v| v["token_stores"]["kv_tokens"]["timeout_ms"] = json!(0))),
        ("token_stores.kv_tokens.namespace: unknown field; expected one of \"vault\", \"azure_key_vault\", \"cluster\", \"identity\", \"prefix\", \"timeout_ms\"",
         Box::new(|v| v["token_stores"]["kv_tokens"]["namespace"] = json!("x"))),
    ];
    for (want, edit) in cases {
        assert_eq!(delegated_error(edit), want);
    }
}

#[test]
fn user_delegated_bounds_are_inclusive() {
    // A state key of exactly 32 bytes.
    let c = delegated_loads(|v| {
        v["secrets"]["consent_state_key"] = json!({ "inline": "x".repeat(32) });
    });
    assert_eq!(c.consent.unwrap().state_key.expose().len(), 32);
    // A Key Vault prefix of exactly 40 characters.
    let c = delegated_loads(|v| v["token_stores"]["kv_tokens"]["prefix"] = json!("a".repeat(40)));
    assert!(
        matches!(&c.token_stores.iter().find(|t| t.name == "kv_tokens").unwrap().kind,
        TokenStoreKind::KeyVault { prefix, .. } if prefix.len() == 40)
    );
    // A connection name of 64 safe characters; 65 is too long.
    let rename = |name: String| {
        move |v: &mut Value| {
            let c = v["connections"].as_object_mut().unwrap();
            let mine = c.remove("github_mine").unwrap();
            c.insert(name.clone(), mine);
            v["routes"][0]["inject"][0]["connections"] = json!([name]);
        }
    };
    let long = format!("Aa0-_{}", "z".repeat(59));
    let c = delegated_loads(rename(long.clone()));
    assert!(c.connections.iter().any(|x| x.name == long));
    let longer = format!("{long}z");
    assert_eq!(
        delegated_error(rename(longer.clone())),
        format!("connections.{longer}: invalid value \"{longer}\": an authorization_code connection's name goes into URLs and store paths: 1 to 64 letters, digits, \"-\" or \"_\"")
    );
    // Only authorization_code connections need such names.
    let c = load(&json!({
        "secrets": { "s": { "env": "PARTNER_API_KEY" } },
        "providers": { "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                                "client_id": "gw", "client_secret": "s" } },
        "connections": { "orders.read": { "provider": "idp", "grant": "client_credentials" } }
    }))
    .unwrap();
    assert_eq!(c.connections[0].name, "orders.read");
    // A redirect_uri beside consent.path, merely sharing its prefix, is fine.
    let c = delegated_loads(|v| {
        v["consent"]["redirect_uri"] =
            json!("https://api.example.com/.latchkey/connections-callback");
    });
    assert_eq!(
        c.consent.unwrap().callback_path,
        "/.latchkey/connections-callback"
    );
    // No return_to: nothing allowed (the callback answers with JSON).
    let c = delegated_loads(|v| {
        v["consent"].as_object_mut().unwrap().remove("return_to");
    });
    assert!(c.consent.unwrap().return_to.is_empty());
    // A per_user: false connection with consent is shared.
    let c = delegated_loads(|v| v["connections"]["crm_team"]["per_user"] = json!(false));
    assert!(c.connections.iter().any(|x| matches!(&x.credential,
        Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { per_user: false, consent: Some(_), .. }))));
}

#[test]
fn a_key_vault_token_store_s_identity_gets_its_own_token() {
    // A client_credentials connection whose secret is known at load: fine.
    let c = delegated_loads(|v| {
        v["connections"]["kv_writer"] = json!({ "provider": "github", "grant": "client_credentials",
                                                 "scopes": ["https://vault.azure.net/.default"] });
    });
    assert_eq!(c.token_stores.len(), 2);
    // Its client secret in a store, or a grant that needs a person or a caller: refused.
    let refused = "token_stores.kv_tokens.identity: must name an azure_managed_identity connection, or a client_credentials one whose client secret is known at load (its token reads and writes the vault)";
    assert_eq!(
        delegated_error(|v| {
            v["secrets"]["stored"] = json!({ "vault": { "cluster": "vault", "url": "http://vault:8200",
                "path": "idp", "field": "secret", "token": "vault_token" } });
            v["providers"]["stored_idp"] = json!({ "type": "oauth2", "cluster": "idp",
                "token_url": "https://idp/token", "client_id": "gw", "client_secret": "stored" });
            v["connections"]["kv_writer"] =
                json!({ "provider": "stored_idp", "grant": "client_credentials" });
        }),
        refused
    );
    assert_eq!(
        delegated_error(|v| {
            v["connections"]["kv_writer"] = json!({ "provider": "github", "grant": "token_exchange",
                                                     "access": { "authenticated": true } });
        }),
        refused
    );
    assert_eq!(
        delegated_error(|v| {
            v["secrets"]["rt"] = json!({ "env": "PARTNER_API_KEY" });
            v["connections"]["kv_writer"] = json!({ "provider": "github", "grant": "refresh_token",
                                                     "refresh_token": "rt" });
        }),
        refused
    );
}

#[test]
fn key_vault_record_names_fit_in_127_characters() {
    // `<prefix>-<connection>-<caller hash>`, "-" and "_" written as two
    // characters: SPEC v1.2, "at most 127 characters".
    let on_key_vault = |name: &str, prefix: &str, per_user: bool| {
        let name = name.to_string();
        let prefix = prefix.to_string();
        move |v: &mut Value| {
            v["token_stores"]["kv_tokens"]["prefix"] = json!(prefix);
            let c = v["connections"].as_object_mut().unwrap();
            let mut mine = c.remove("github_mine").unwrap();
            mine["store"] = json!("kv_tokens");
            if !per_user {
                mine.as_object_mut().unwrap().remove("per_user");
                mine["consent"] = json!({ "groups": ["a"] });
            }
            c.insert(name.clone(), mine);
            v["routes"][0]["inject"][0]["connections"] = json!([name]);
        }
    };
    let prefix = "p".repeat(40);
    // 40 + 1 + 53 + 1 + 32 = 127: the longest per-user name that fits.
    let fits = "c".repeat(53);
    let c = delegated_loads(on_key_vault(&fits, &prefix, true));
    let kv = c
        .token_stores
        .iter()
        .find(|t| t.name == "kv_tokens")
        .unwrap();
    let TokenStoreKind::KeyVault { prefix: p, .. } = &kv.kind else {
        panic!("not key vault")
    };
    let caller = crate::consent::caller_hash("i", "s");
    assert_eq!(
        crate::credential::token_store::key_vault_name(p, &fits, &caller).len(),
        127
    );
    let over = "c".repeat(54);
    assert_eq!(
        delegated_error(on_key_vault(&over, &prefix, true)),
        format!("connections.{over}: invalid value \"{over}\": its Key Vault secret names (token store \"kv_tokens\") would be longer than 127 characters: shorten the connection's name or the store's prefix")
    );
    // Escaped characters count twice: 52 characters, one of them "_", is 53.
    let escaped = format!("{}_", "c".repeat(51));
    assert!(delegated_loads(on_key_vault(&escaped, &prefix, true))
        .connections
        .iter()
        .any(|c| c.name == escaped));
    let escaped_over = format!("{}_", "c".repeat(52));
    assert!(delegated_error(on_key_vault(&escaped_over, &prefix, true))
        .contains("longer than 127 characters"));
    // A shared connection's record is "shared": 64 characters fit.
    let shared = "s".repeat(64);
    assert!(delegated_loads(on_key_vault(&shared, &prefix, false))
        .connections
        .iter()
        .any(|c| c.name == shared));
    // Vault paths have no such bound.
    let c = delegated_loads(|v| {
        let c = v["connections"].as_object_mut().unwrap();
        let mine = c.remove("github_mine").unwrap();
        c.insert("v".repeat(64), mine);
        v["routes"][0]["inject"][0]["connections"] = json!(["v".repeat(64)]);
    });
    assert!(c.connections.iter().any(|c| c.name.len() == 64));
}

/// Client authentication without a stored secret (SPEC v1.2): one provider per
/// method, and what they name.
fn client_auth_config() -> Value {
    json!({
      "secrets": {
        "cs": { "env": "ORDERS_CLIENT_SECRET" },
        "vault_token": { "env": "PARTNER_API_KEY" },
        "stored": { "vault": { "cluster": "vault", "url": "http://vault:8200", "path": "idp",
                               "field": "secret", "token": "vault_token" } }
      },
      "providers": {
        "entra": { "type": "oauth2", "cluster": "entra",
                   "token_url": "https://login.test/t1/oauth2/v2.0/token",
                   "client_id": "app-1", "auth_method": "client_assertion", "assertion": "fic" },
        "mtls": { "type": "oauth2", "cluster": "mtls_idp", "token_url": "https://mtls.test/token",
                  "client_id": "gw-mtls", "auth_method": "tls_client_auth" },
        "kv_jwt": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp.test/token",
                    "client_id": "gw-kv", "auth_method": "private_key_jwt",
                    "signing_key": { "azure_key_vault_key": "https://signer.vault.azure.net/keys/gw-signing",
                                     "cluster": "keyvault", "identity": "kv_signer" } },
        "transit_jwt": { "type": "oauth2", "cluster": "idp2", "token_url": "https://idp2.test/token",
                         "client_id": "gw-transit", "auth_method": "private_key_jwt",
                         "signing_key": { "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                                             "key": "gw-signing", "token": "vault_token" } } },
        "basic": { "type": "oauth2", "cluster": "idp3", "token_url": "https://idp3.test/token",
                   "client_id": "gw-basic", "client_secret": "cs" },
        "post": { "type": "oauth2", "cluster": "idp4", "token_url": "https://idp4.test/token",
                  "client_id": "gw-post", "client_secret": "stored", "auth_method": "client_secret_post" },
        "mi": { "type": "azure_managed_identity", "cluster": "imds" },
        "keys": { "type": "api_key" }
      },
      "connections": {
        "fic": { "provider": "mi", "resource": "api://AzureADTokenExchange" },
        "kv_signer": { "provider": "mi", "resource": "https://vault.azure.net" },
        "graph": { "provider": "entra", "grant": "client_credentials",
                   "scopes": ["https://graph.microsoft.com/.default"], "access": { "public": true } },
        "certified": { "provider": "mtls", "grant": "client_credentials", "access": { "public": true } },
        "kv_signed": { "provider": "kv_jwt", "grant": "client_credentials", "access": { "public": true } },
        "transit_signed": { "provider": "transit_jwt", "grant": "client_credentials",
                            "access": { "public": true } },
        "plain": { "provider": "basic", "grant": "client_credentials", "access": { "public": true } },
        "posted": { "provider": "post", "grant": "client_credentials", "access": { "public": true } },
        "partner": { "provider": "keys", "api_key": "cs", "access": { "public": true } },
        "obo": { "provider": "basic", "grant": "token_exchange", "access": { "authenticated": true } }
      },
      "routes": [ { "name": "graph", "match": { "path_prefix": "/graph/" },
                    "inject": [ { "connections": ["graph"], "header": "authorization" } ] } ]
    })
}

fn client_auth_loads(edit: impl FnOnce(&mut Value)) -> Config {
    let mut v = client_auth_config();
    edit(&mut v);
    load(&v).unwrap()
}

fn client_auth_error(edit: impl FnOnce(&mut Value)) -> String {
    let mut v = client_auth_config();
    edit(&mut v);
    match load(&v) {
        Ok(_) => panic!("configuration was accepted"),
        Err(e) => e.to_string(),
    }
}

fn oauth2_of<'a>(c: &'a Config, name: &str) -> &'a OAuth2Provider {
    match &c.providers.iter().find(|p| p.name == name).unwrap().kind {
        ProviderKind::OAuth2(o) => o,
        _ => panic!("{name} is not oauth2"),
    }
}

fn connection_index(c: &Config, name: &str) -> usize {
    c.connections.iter().position(|x| x.name == name).unwrap()
}

fn signing_key_of(c: &Config, name: &str) -> SigningKey {
    match &oauth2_of(c, name).auth_method {
        AuthMethod::PrivateKeyJwt(k) => (**k).clone(),
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn each_client_authentication_method_loads_with_its_defaults() {
    let c = client_auth_loads(|_| {});
    let entra = oauth2_of(&c, "entra");
    assert_eq!(
        entra.auth_method,
        AuthMethod::ClientAssertion {
            connection: connection_index(&c, "fic")
        }
    );
    assert_eq!(entra.client_secret, None);
    let mtls = oauth2_of(&c, "mtls");
    assert_eq!(mtls.auth_method, AuthMethod::TlsClientAuth);
    assert_eq!(mtls.client_secret, None);
    assert_eq!(
        signing_key_of(&c, "kv_jwt"),
        SigningKey {
            alg: JwsAlg::Rs256,
            kid: "https://signer.vault.azure.net/keys/gw-signing".into(),
            x5t_s256: None,
            audience: None,
            service: SigningService::KeyVault {
                cluster: "keyvault".into(),
                authority: "signer.vault.azure.net".into(),
                path: "/keys/gw-signing//sign?api-version=7.4".into(),
                identity: connection_index(&c, "kv_signer"),
            },
            timeout_ms: 5000,
        }
    );
    assert_eq!(oauth2_of(&c, "kv_jwt").client_secret, None);
    assert_eq!(
        signing_key_of(&c, "transit_jwt"),
        SigningKey {
            alg: JwsAlg::Rs256,
            kid: "gw-signing".into(),
            x5t_s256: None,
            audience: None,
            service: SigningService::VaultTransit {
                cluster: "vault".into(),
                authority: "vault:8200".into(),
                path: "/v1/transit/sign/gw-signing/sha2-256".into(),
                auth: VaultAuth::Token(crate::secret::Secret::new("pk-secret-1")),
                namespace: None,
            },
            timeout_ms: 5000,
        }
    );
    // Transit after an AppRole login, at the url's path and the given mount.
    let c = client_auth_loads(|v| {
        let t = v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]
            .as_object_mut()
            .unwrap();
        t.remove("token");
        t.insert("url".into(), json!("https://vault.test/base/"));
        t.insert(
            "approle".into(),
            json!({ "role_id": "role-7", "secret_id": "cs", "mount": "ci-approle" }),
        );
    });
    match &signing_key_of(&c, "transit_jwt").service {
        SigningService::VaultTransit { path, auth, .. } => {
            assert_eq!(path, "/base/v1/transit/sign/gw-signing/sha2-256");
            let VaultAuth::AppRole {
                role_id,
                secret_id,
                login_path,
            } = auth
            else {
                panic!("{auth:?}");
            };
            assert_eq!(
                (role_id.as_str(), login_path.as_str()),
                ("role-7", "/base/v1/auth/ci-approle/login")
            );
            assert_eq!(secret_id.expose(), "cs-secret-2");
        }
        other => panic!("{other:?}"),
    }
    // The default is client_secret_basic; a secret in a store is a store reference.
    let basic = oauth2_of(&c, "basic");
    assert_eq!(basic.auth_method, AuthMethod::ClientSecretBasic);
    assert!(
        matches!(&basic.client_secret, Some(SecretRef::Value(s)) if s.expose() == "cs-secret-2")
    );
    let post = oauth2_of(&c, "post");
    assert_eq!(post.auth_method, AuthMethod::ClientSecretPost);
    assert_eq!(post.client_secret, Some(SecretRef::Store(0)));
    assert_eq!(post.secret_store(), Some(0));
    assert_eq!(basic.secret_store(), None);
    assert_eq!(mtls.secret_store(), None);
    // Who fetches a token with nothing read at run time.
    for (name, alone) in [
        ("basic", true),
        ("mtls", true),
        ("post", false),
        ("entra", false),
        ("kv_jwt", false),
        ("transit_jwt", false),
    ] {
        assert_eq!(oauth2_of(&c, name).gets_tokens_alone(), alone, "{name}");
    }
    // A connection used only as an assertion or a signing identity needs no access.
    assert!(c.connections[connection_index(&c, "fic")].access.is_none());
    assert!(c.connections[connection_index(&c, "kv_signer")]
        .access
        .is_none());
    // The Vault token is not in the Debug output.
    assert!(!format!("{c:?}").contains("pk-secret-1"));
    // An explicit client_secret_basic is the default.
    let c = client_auth_loads(|v| {
        v["providers"]["basic"]["auth_method"] = json!("client_secret_basic")
    });
    assert_eq!(
        oauth2_of(&c, "basic").auth_method,
        AuthMethod::ClientSecretBasic
    );
}

#[test]
fn a_signing_key_takes_its_options() {
    let c = client_auth_loads(|v| {
        v["providers"]["kv_jwt"]["assertion_audience"] = json!("https://login.test/t1/v2.0");
        let k = &mut v["providers"]["kv_jwt"]["signing_key"];
        k["azure_key_vault_key"] = json!("https://signer.vault.azure.net/keys/gw-signing/0A1b2c/");
        k["alg"] = json!("ES256");
        k["x5t#S256"] = json!(format!("{}-_", "a".repeat(41)));
        k["timeout_ms"] = json!(1500);
        let t = &mut v["providers"]["transit_jwt"]["signing_key"];
        t["alg"] = json!("PS256");
        t["kid"] = json!("gw-signing-2024");
        t["vault_transit"]["url"] = json!("http://vault:8200/bao/");
        t["vault_transit"]["mount"] = json!("/jwt/signing/");
        t["vault_transit"]["key"] = json!("/gw-signing/");
        t["vault_transit"]["namespace"] = json!("team-a");
    });
    assert_eq!(
        signing_key_of(&c, "kv_jwt"),
        SigningKey {
            alg: JwsAlg::Es256,
            // The key's URL, without the trailing "/".
            kid: "https://signer.vault.azure.net/keys/gw-signing/0A1b2c".into(),
            x5t_s256: Some(format!("{}-_", "a".repeat(41))),
            audience: Some("https://login.test/t1/v2.0".into()),
            service: SigningService::KeyVault {
                cluster: "keyvault".into(),
                authority: "signer.vault.azure.net".into(),
                path: "/keys/gw-signing/0A1b2c/sign?api-version=7.4".into(),
                identity: connection_index(&c, "kv_signer"),
            },
            timeout_ms: 1500,
        }
    );
    assert_eq!(
        signing_key_of(&c, "transit_jwt"),
        SigningKey {
            alg: JwsAlg::Ps256,
            kid: "gw-signing-2024".into(),
            x5t_s256: None,
            audience: None,
            service: SigningService::VaultTransit {
                cluster: "vault".into(),
                authority: "vault:8200".into(),
                path: "/bao/v1/jwt/signing/sign/gw-signing/sha2-256".into(),
                auth: VaultAuth::Token(crate::secret::Secret::new("pk-secret-1")),
                namespace: Some("team-a".into()),
            },
            timeout_ms: 5000,
        }
    );
    assert_eq!(
        [JwsAlg::Rs256, JwsAlg::Ps256, JwsAlg::Es256].map(JwsAlg::name),
        ["RS256", "PS256", "ES256"]
    );
    // A key name of 127 characters; an explicit kid with a space and non-ASCII text.
    let long = "k".repeat(127);
    let c = client_auth_loads(|v| {
        let k = &mut v["providers"]["kv_jwt"]["signing_key"];
        k["azure_key_vault_key"] = json!(format!("https://signer.vault.azure.net:443/keys/{long}"));
        k["kid"] = json!("clé 1");
    });
    let k = signing_key_of(&c, "kv_jwt");
    assert_eq!(k.kid, "clé 1");
    assert!(
        matches!(&k.service, SigningService::KeyVault { path, authority, .. }
        if *path == format!("/keys/{long}//sign?api-version=7.4") && authority == "signer.vault.azure.net")
    );
}

#[test]
fn bad_client_authentication_is_refused_with_its_field() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let key_url = |url: &'static str| -> Edit {
        Box::new(move |v| {
            v["providers"]["kv_jwt"]["signing_key"]["azure_key_vault_key"] = json!(url)
        })
    };
    let not_a_key = |url: &str| {
        format!("providers.kv_jwt.signing_key.azure_key_vault_key: invalid value \"{url}\": not a key identifier: expected /keys/<name> or /keys/<name>/<version> (names: letters, digits, -)")
    };
    let not_https = |url: &str| {
        format!("providers.kv_jwt.signing_key.azure_key_vault_key: invalid value \"{url}\": expected https://<vault>.vault.azure.net/keys/<name>[/<version>]")
    };
    let x5t = |t: String| -> (String, Edit) {
        (
            format!("providers.kv_jwt.signing_key.x5t#S256: invalid value \"{t}\": expected the base64url SHA-256 thumbprint of the certificate (43 characters)"),
            Box::new(move |v| v["providers"]["kv_jwt"]["signing_key"]["x5t#S256"] = json!(t)),
        )
    };
    let no_token = |conn: &str, field: &str, provider: &str| {
        format!("providers.{provider}.{field}: connection \"{conn}\" can't give a token on its own: it must be an azure_managed_identity connection, or an oauth2 one with grant client_credentials or refresh_token")
    };
    let long_name = format!("https://signer.vault.azure.net/keys/{}", "k".repeat(128));
    let long_name2 = long_name.clone();
    let mut cases: Vec<(String, Edit)> = vec![
        // The method, and a client secret only with the methods that send one.
        ("providers.mtls.auth_method: invalid value \"client_secret_jwt\": expected \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\", \"client_assertion\" or \"tls_client_auth\"".into(),
         Box::new(|v| v["providers"]["mtls"]["auth_method"] = json!("client_secret_jwt"))),
        ("providers.mtls.client_secret: this auth_method sends no client secret".into(),
         Box::new(|v| v["providers"]["mtls"]["client_secret"] = json!("cs"))),
        ("providers.entra.client_secret: this auth_method sends no client secret".into(),
         Box::new(|v| v["providers"]["entra"]["client_secret"] = json!("cs"))),
        ("providers.kv_jwt.client_secret: this auth_method sends no client secret".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["client_secret"] = json!("cs"))),
        ("providers.basic.client_secret: required field is missing".into(),
         Box::new(|v| { v["providers"]["basic"].as_object_mut().unwrap().remove("client_secret"); })),
        ("providers.post.client_secret: required field is missing".into(),
         Box::new(|v| { v["providers"]["post"].as_object_mut().unwrap().remove("client_secret"); })),
        ("providers.basic.client_secret: unknown secret \"nope\"".into(),
         Box::new(|v| v["providers"]["basic"]["client_secret"] = json!("nope"))),
        // Each method's own fields.
        ("providers.basic.assertion: only allowed when auth_method is \"client_assertion\"".into(),
         Box::new(|v| v["providers"]["basic"]["assertion"] = json!("fic"))),
        ("providers.kv_jwt.assertion: only allowed when auth_method is \"client_assertion\"".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["assertion"] = json!("fic"))),
        ("providers.entra.assertion: required field is missing".into(),
         Box::new(|v| { v["providers"]["entra"].as_object_mut().unwrap().remove("assertion"); })),
        ("providers.entra.signing_key: only allowed when auth_method is \"private_key_jwt\"".into(),
         Box::new(|v| v["providers"]["entra"]["signing_key"] = json!({}))),
        ("providers.mtls.assertion_audience: only allowed when auth_method is \"private_key_jwt\"".into(),
         Box::new(|v| v["providers"]["mtls"]["assertion_audience"] = json!("https://mtls.test"))),
        ("providers.basic.signing_key: only allowed when auth_method is \"private_key_jwt\"".into(),
         Box::new(|v| v["providers"]["basic"]["signing_key"] = json!({}))),
        ("providers.kv_jwt.signing_key: required field is missing".into(),
         Box::new(|v| { v["providers"]["kv_jwt"].as_object_mut().unwrap().remove("signing_key"); })),
        ("providers.kv_jwt.assertion_audience: invalid value \" \": must not be empty".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["assertion_audience"] = json!(" "))),
        ("providers.kv_jwt.assertion_audience: invalid value \"\": must not be empty".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["assertion_audience"] = json!(""))),
        // The signing key.
        ("providers.kv_jwt.signing_key.alg: invalid value \"HS256\": expected \"RS256\", \"PS256\" or \"ES256\"".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["alg"] = json!("HS256"))),
        ("providers.transit_jwt.signing_key.alg: invalid value \"rs256\": expected \"RS256\", \"PS256\" or \"ES256\"".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["alg"] = json!("rs256"))),
        x5t("a".repeat(42)),
        x5t("a".repeat(44)),
        x5t(format!("{}+", "a".repeat(42))),
        x5t(format!("{}/", "a".repeat(42))),
        x5t(format!("{}=", "a".repeat(42))),
        x5t(format!("{}é", "a".repeat(41))),
        ("providers.kv_jwt.signing_key: give exactly one of \"azure_key_vault_key\" or \"vault_transit\"".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["vault_transit"] = json!({ "cluster": "vault",
             "url": "http://vault:8200", "key": "k", "token": "vault_token" }))),
        ("providers.kv_jwt.signing_key: give exactly one of \"azure_key_vault_key\" or \"vault_transit\"".into(),
         Box::new(|v| { v["providers"]["kv_jwt"]["signing_key"].as_object_mut().unwrap().remove("azure_key_vault_key"); })),
        ("providers.transit_jwt.signing_key.cluster: for \"vault_transit\", give it inside the \"vault_transit\" object".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["cluster"] = json!("vault"))),
        ("providers.transit_jwt.signing_key.identity: for \"vault_transit\", give it inside the \"vault_transit\" object".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["identity"] = json!("kv_signer"))),
        ("providers.kv_jwt.signing_key.url: unknown field; expected one of \"azure_key_vault_key\", \"cluster\", \"identity\", \"vault_transit\", \"alg\", \"kid\", \"x5t#S256\", \"timeout_ms\"".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["url"] = json!("x"))),
        ("providers.kv_jwt.signing_key.kid: invalid value \"k\\r\\n\": not a valid header value (control characters)".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["kid"] = json!("k\r\n"))),
        ("providers.kv_jwt.signing_key.timeout_ms: invalid value \"0\": must be between 1 and 300000".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["timeout_ms"] = json!(0))),
        ("providers.kv_jwt.signing_key.timeout_ms: invalid value \"300001\": must be between 1 and 300000".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["timeout_ms"] = json!(300_001))),
        // Key Vault.
        (not_https("http://signer.vault.azure.net/keys/gw"), key_url("http://signer.vault.azure.net/keys/gw")),
        (not_https("https://signer.vault.azure.net/keys/gw?x=1"), key_url("https://signer.vault.azure.net/keys/gw?x=1")),
        (not_a_key("https://signer.vault.azure.net/secrets/gw"), key_url("https://signer.vault.azure.net/secrets/gw")),
        (not_a_key("https://signer.vault.azure.net/keys/gw_1"), key_url("https://signer.vault.azure.net/keys/gw_1")),
        (not_a_key("https://signer.vault.azure.net/keys/gw/v1x"), key_url("https://signer.vault.azure.net/keys/gw/v1x")),
        (not_a_key("https://signer.vault.azure.net/keys/gw/0a1b/sign"), key_url("https://signer.vault.azure.net/keys/gw/0a1b/sign")),
        (not_a_key("https://signer.vault.azure.net/keys/"), key_url("https://signer.vault.azure.net/keys/")),
        (not_a_key("https://signer.vault.azure.net/keys//0a1b"), key_url("https://signer.vault.azure.net/keys//0a1b")),
        (not_a_key(&long_name), Box::new(move |v| v["providers"]["kv_jwt"]["signing_key"]["azure_key_vault_key"] = json!(long_name2))),
        ("providers.kv_jwt.signing_key.identity: required field is missing".into(),
         Box::new(|v| { v["providers"]["kv_jwt"]["signing_key"].as_object_mut().unwrap().remove("identity"); })),
        ("providers.kv_jwt.signing_key.cluster: required field is missing".into(),
         Box::new(|v| { v["providers"]["kv_jwt"]["signing_key"].as_object_mut().unwrap().remove("cluster"); })),
        ("providers.kv_jwt.signing_key.identity: unknown connection \"nope\"".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("nope"))),
        // Vault Transit.
        ("providers.transit_jwt.signing_key.vault_transit.key: invalid value \"gw/signing\": a Transit key name has no \"/\"".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["key"] = json!("gw/signing"))),
        ("providers.transit_jwt.signing_key.vault_transit.key: invalid value \"a/../b\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["key"] = json!("a/../b"))),
        ("providers.transit_jwt.signing_key.vault_transit.mount: invalid value \"a//b\": not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["mount"] = json!("a//b"))),
        ("providers.transit_jwt.signing_key.vault_transit.key: required field is missing".into(),
         Box::new(|v| { v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap().remove("key"); })),
        ("providers.transit_jwt.signing_key.vault_transit: give exactly one of \"token\" or \"approle\"".into(),
         Box::new(|v| {
             let t = v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap();
             t.insert("approle".into(), json!({ "role_id": "r", "secret_id": "cs" }));
         })),
        ("providers.transit_jwt.signing_key.vault_transit.approle.secret_id: unknown env or inline secret \"stored\"".into(),
         Box::new(|v| {
             let t = v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap();
             t.remove("token");
             t.insert("approle".into(), json!({ "role_id": "r", "secret_id": "stored" }));
         })),
        ("providers.transit_jwt.signing_key.vault_transit.approle.role: unknown field; expected one of \"role_id\", \"secret_id\", \"mount\"".into(),
         Box::new(|v| {
             let t = v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap();
             t.remove("token");
             t.insert("approle".into(), json!({ "role": "r", "secret_id": "cs" }));
         })),
        ("providers.transit_jwt.signing_key.vault_transit: give exactly one of \"token\" or \"approle\"".into(),
         Box::new(|v| { v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap().remove("token"); })),
        ("providers.transit_jwt.signing_key.vault_transit.token: unknown env or inline secret \"stored\"".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["token"] = json!("stored"))),
        ("providers.transit_jwt.signing_key.vault_transit.url: invalid value \"http://vault:8200/?x=1\": must not have a query".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["url"] = json!("http://vault:8200/?x=1"))),
        ("providers.transit_jwt.signing_key.vault_transit.namespace: invalid value \"a\\nb\": not a valid header value (control characters)".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["namespace"] = json!("a\nb"))),
        ("providers.transit_jwt.signing_key.vault_transit.cluster: required field is missing".into(),
         Box::new(|v| { v["providers"]["transit_jwt"]["signing_key"]["vault_transit"].as_object_mut().unwrap().remove("cluster"); })),
        ("providers.transit_jwt.signing_key.vault_transit.path: unknown field; expected one of \"cluster\", \"url\", \"mount\", \"key\", \"token\", \"approle\", \"namespace\"".into(),
         Box::new(|v| v["providers"]["transit_jwt"]["signing_key"]["vault_transit"]["path"] = json!("x"))),
        // The connection an assertion or a signing identity comes from.
        ("providers.entra.assertion: unknown connection \"nope\"".into(),
         Box::new(|v| v["providers"]["entra"]["assertion"] = json!("nope"))),
        (no_token("partner", "assertion", "entra"),
         Box::new(|v| v["providers"]["entra"]["assertion"] = json!("partner"))),
        (no_token("obo", "assertion", "entra"),
         Box::new(|v| v["providers"]["entra"]["assertion"] = json!("obo"))),
        (no_token("partner", "signing_key.identity", "kv_jwt"),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("partner"))),
        (no_token("obo", "signing_key.identity", "kv_jwt"),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("obo"))),
        // A provider whose client needs its own token, directly or not.
        ("providers.entra.assertion: connection \"graph\" needs this provider's own token to authenticate (through entra): it can never get one".into(),
         Box::new(|v| v["providers"]["entra"]["assertion"] = json!("graph"))),
        ("providers.kv_jwt.signing_key.identity: connection \"kv_signed\" needs this provider's own token to authenticate (through kv_jwt): it can never get one".into(),
         Box::new(|v| v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("kv_signed"))),
        ("providers.entra.assertion: connection \"kv_signed\" needs this provider's own token to authenticate (through entra → kv_jwt): it can never get one".into(),
         Box::new(|v| {
             v["providers"]["entra"]["assertion"] = json!("kv_signed");
             v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("graph");
         })),
    ];
    // Two providers, each asserting with a token of the other's.
    cases.push((
        "providers.a_idp.assertion: connection \"b_conn\" needs this provider's own token to authenticate (through a_idp → b_idp): it can never get one".into(),
        Box::new(|v| {
            for (p, other) in [("a", "b"), ("b", "a")] {
                v["providers"][format!("{p}_idp")] = json!({ "type": "oauth2", "cluster": "idp",
                    "token_url": format!("https://{p}.test/token"), "client_id": p,
                    "auth_method": "client_assertion", "assertion": format!("{other}_conn") });
                v["connections"][format!("{p}_conn")] =
                    json!({ "provider": format!("{p}_idp"), "grant": "client_credentials" });
            }
        }),
    ));
    // Three, in a ring.
    cases.push((
        "providers.a_idp.assertion: connection \"b_conn\" needs this provider's own token to authenticate (through a_idp → b_idp → c_idp): it can never get one".into(),
        Box::new(|v| {
            for (p, other) in [("a", "b"), ("b", "c"), ("c", "a")] {
                v["providers"][format!("{p}_idp")] = json!({ "type": "oauth2", "cluster": "idp",
                    "token_url": format!("https://{p}.test/token"), "client_id": p,
                    "auth_method": "client_assertion", "assertion": format!("{other}_conn") });
                v["connections"][format!("{p}_conn")] =
                    json!({ "provider": format!("{p}_idp"), "grant": "client_credentials" });
            }
        }),
    ));
    assert!(cases.len() >= 60, "{}", cases.len());
    // A provider whose assertion comes from a loop it is not part of: the loop
    // is reported at its first provider in it, not here.
    cases.push((
        "providers.b_idp.assertion: connection \"c_conn\" needs this provider's own token to authenticate (through b_idp → c_idp): it can never get one".into(),
        Box::new(|v| {
            for (p, other) in [("a", "b"), ("b", "c"), ("c", "b")] {
                v["providers"][format!("{p}_idp")] = json!({ "type": "oauth2", "cluster": "idp",
                    "token_url": format!("https://{p}.test/token"), "client_id": p,
                    "auth_method": "client_assertion", "assertion": format!("{other}_conn") });
                v["connections"][format!("{p}_conn")] =
                    json!({ "provider": format!("{p}_idp"), "grant": "client_credentials" });
            }
        }),
    ));
    for (want, edit) in cases {
        assert_eq!(client_auth_error(edit), want);
    }
}

#[test]
fn an_assertion_may_come_from_a_chain_that_ends_in_a_token_of_its_own() {
    // From an oauth2 connection whose client has a secret, a certificate, or signs.
    for (via, provider) in [
        ("plain", "basic"),
        ("certified", "mtls"),
        ("kv_signed", "kv_jwt"),
        ("transit_signed", "transit_jwt"),
    ] {
        let c = client_auth_loads(|v| v["providers"]["entra"]["assertion"] = json!(via));
        assert_eq!(
            oauth2_of(&c, "entra").auth_method,
            AuthMethod::ClientAssertion {
                connection: connection_index(&c, via)
            },
            "{provider}"
        );
    }
    // A refresh_token connection gives one too; so does a signing identity that
    // is itself a client_assertion connection (entra → fic).
    let c = client_auth_loads(|v| {
        v["connections"]["rotating"] =
            json!({ "provider": "basic", "grant": "refresh_token", "refresh_token": "cs" });
        v["providers"]["entra"]["assertion"] = json!("rotating");
        v["providers"]["kv_jwt"]["signing_key"]["identity"] = json!("graph");
    });
    assert!(matches!(
        &signing_key_of(&c, "kv_jwt").service,
        SigningService::KeyVault { identity, .. } if *identity == connection_index(&c, "graph")
    ));
    // A connection of a provider whose client uses a store is no cycle.
    let c = client_auth_loads(|v| v["providers"]["entra"]["assertion"] = json!("posted"));
    assert!(matches!(
        oauth2_of(&c, "entra").auth_method,
        AuthMethod::ClientAssertion { .. }
    ));
}

#[test]
fn an_authorization_code_connection_s_provider_may_use_every_secretless_method() {
    let c = delegated_loads(|v| {
        let gh = v["providers"]["github"].as_object_mut().unwrap();
        gh.remove("client_secret");
        gh.insert("auth_method".into(), json!("private_key_jwt"));
        gh.insert(
            "signing_key".into(),
            json!({ "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                       "key": "gh", "token": "vault_token" } }),
        );
    });
    assert_eq!(oauth2_of(&c, "github").client_secret, None);
    assert!(matches!(
        oauth2_of(&c, "github").auth_method,
        AuthMethod::PrivateKeyJwt(_)
    ));
    // And the other secretless methods.
    for (method, extra) in [
        ("tls_client_auth", json!({})),
        ("client_assertion", json!({ "assertion": "kv_writer" })),
    ] {
        let c = delegated_loads(|v| {
            let gh = v["providers"]["github"].as_object_mut().unwrap();
            gh.remove("client_secret");
            gh.insert("auth_method".into(), json!(method));
            gh.extend(extra.as_object().unwrap().clone());
        });
        assert_eq!(oauth2_of(&c, "github").client_secret, None);
    }
    // An authorization_code connection gives no token on its own: no assertion.
    assert_eq!(
        delegated_error(|v| {
            v["providers"]["fed"] = json!({ "type": "oauth2", "cluster": "fed",
                "token_url": "https://fed.test/token", "client_id": "fed",
                "auth_method": "client_assertion", "assertion": "github_mine" });
        }),
        "providers.fed.assertion: connection \"github_mine\" can't give a token on its own: it must be an azure_managed_identity connection, or an oauth2 one with grant client_credentials or refresh_token"
    );
}

#[test]
fn a_store_identity_s_client_must_get_tokens_alone() {
    // A Key Vault secret's identity.
    let identity = |method: &'static str| {
        move |v: &mut Value| {
            v["secrets"]["fic_token"] = json!({ "env": "ORDERS_CLIENT_SECRET" });
            v["providers"]["fed"] = match method {
                "client_assertion" => json!({ "type": "oauth2", "cluster": "fed",
                    "token_url": "https://fed.test/token", "client_id": "fed",
                    "auth_method": "client_assertion", "assertion": "kv_reader" }),
                "private_key_jwt" => json!({ "type": "oauth2", "cluster": "fed",
                    "token_url": "https://fed.test/token", "client_id": "fed",
                    "auth_method": "private_key_jwt",
                    "signing_key": { "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                                        "key": "k", "token": "vault_token" } } }),
                _ => json!({ "type": "oauth2", "cluster": "fed",
                    "token_url": "https://fed.test/token", "client_id": "fed", "auth_method": method }),
            };
            v["connections"]["reader"] =
                json!({ "provider": "fed", "grant": "client_credentials" });
            v["secrets"]["partner_key"]["identity"] = json!("reader");
        }
    };
    let refused = "secrets.partner_key.identity: invalid value \"reader\": must be an azure_managed_identity connection, or an oauth2 one that needs no caller and whose client_secret is not in a store";
    assert!(store_result(identity("tls_client_auth")).is_ok());
    assert_eq!(
        store_result(identity("client_assertion")).unwrap_err(),
        refused
    );
    assert_eq!(
        store_result(identity("private_key_jwt")).unwrap_err(),
        refused
    );
    // A Key Vault token store's identity.
    let token_store = |method: &'static str| {
        move |v: &mut Value| {
            v["providers"]["fed"] = match method {
                "client_assertion" => json!({ "type": "oauth2", "cluster": "fed",
                    "token_url": "https://fed.test/token", "client_id": "fed",
                    "auth_method": "client_assertion", "assertion": "mi_fic" }),
                _ => json!({ "type": "oauth2", "cluster": "fed",
                    "token_url": "https://fed.test/token", "client_id": "fed", "auth_method": method }),
            };
            v["connections"]["mi_fic"] =
                json!({ "provider": "azure_mi", "resource": "api://AzureADTokenExchange" });
            v["connections"]["kv_writer"] =
                json!({ "provider": "fed", "grant": "client_credentials" });
        }
    };
    let c = delegated_loads(token_store("tls_client_auth"));
    assert_eq!(c.token_stores.len(), 2);
    assert_eq!(
        delegated_error(token_store("client_assertion")),
        "token_stores.kv_tokens.identity: must name an azure_managed_identity connection, or a client_credentials one whose client secret is known at load (its token reads and writes the vault)"
    );
}
