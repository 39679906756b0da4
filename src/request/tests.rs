//! Every verdict of the request path, natively: configurations parsed as users
//! write them, headers as Envoy hands them over, the host's lazy reads counted.

use base64::Engine;
use serde_json::{json, Value};

use super::*;
use crate::claims::JWT_AUTHN;
use crate::config::Config;

#[derive(Default)]
struct Host {
    route_name: Option<&'static str>,
    metadata: Option<Vec<u8>>,
    fail: bool,
    route_reads: usize,
    metadata_reads: usize,
    now_ms: u64,
    random: u64,
}

impl Lazy for Host {
    fn route_name(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        self.route_reads += 1;
        if self.fail {
            return Err(HostFault(2));
        }
        Ok(self.route_name.map(|n| n.as_bytes().to_vec()))
    }

    fn metadata(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        self.metadata_reads += 1;
        if self.fail {
            return Err(HostFault(2));
        }
        Ok(self.metadata.clone())
    }

    fn now_ms(&mut self) -> Result<u64, HostFault> {
        if self.fail {
            return Err(HostFault(2));
        }
        Ok(self.now_ms)
    }

    fn random(&mut self) -> u64 {
        self.random += 1;
        self.random
    }
}

fn parse(v: Value) -> Config {
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

/// Claims from a payload header; an API-key route for group `billing`, a public
/// one, a token-exchange one, a cluster-header one, an admin-only route.
fn config(unmatched: &str) -> Config {
    parse(json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": { "k": { "inline": "pk-secret" }, "cs": { "inline": "client-secret" } },
        "providers": {
            "keys": { "type": "api_key" },
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                     "client_id": "gw", "client_secret": "cs" },
            "certs": { "type": "client_certificate" }
        },
        "connections": {
            "billing": { "provider": "keys", "api_key": "k", "access": { "groups": ["billing"] } },
            "open": { "provider": "keys", "api_key": "k", "access": { "public": true } },
            "obo": { "provider": "idp", "grant": "token_exchange",
                     "access": { "authenticated": true } },
            "cert_a": { "provider": "certs", "cluster": "partner_a",
                        "access": { "authenticated": true } }
        },
        "routes": [
            { "name": "partner", "match": { "path_prefix": "/partner/" },
              "inject": [ { "connections": ["billing"], "query": "api_key" },
                          { "connections": ["open"], "header": "x-key" } ],
              "strip": ["x-debug"] },
            { "name": "weather", "match": { "path_prefix": "/weather" },
              "inject": [ { "connections": ["open"], "header": "x-key" } ] },
            { "name": "orders", "match": { "path_prefix": "/orders" },
              "inject": [ { "connections": ["obo"], "header": "authorization" } ] },
            { "name": "mtls", "match": { "path_prefix": "/mtls" },
              "inject": [ { "connections": ["cert_a"], "cluster_header": "x-cluster" } ] },
            { "name": "admin", "match": { "route_name": "admin-route" },
              "access": { "groups": ["admins"] } }
        ],
        "unmatched": unmatched,
        "discovery": { "path": "/.well-known/latchkey" }
    }))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn payload(sub: &str, groups: &[&str]) -> String {
    b64(
        &json!({ "iss": "https://issuer", "sub": sub, "groups": groups, "jti": sub,
                 "exp": 1_900_000_000, "iat": 1_800_000_000 })
        .to_string(),
    )
}

fn jwt(payload_b64: &str) -> String {
    format!("{}.{payload_b64}.c2ln", b64(r#"{"alg":"RS256"}"#))
}

fn run(config: &Config, headers: &[(&str, &str)], host: &mut Host) -> Step {
    let index = Index::new(config);
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    start(config, Some(&index), &pairs, host).unwrap()
}

fn done(step: Step) -> Outcome {
    match step {
        Step::Done(o) => o,
        Step::Needs(n) => panic!("needs credentials: {n:?}"),
        Step::Consent(t) => panic!("a consent task: {t:?}"),
    }
}

fn needs(step: Step) -> Needed {
    match step {
        Step::Needs(n) => n,
        Step::Done(o) => panic!("done: {o:?}"),
        Step::Consent(t) => panic!("a consent task: {t:?}"),
    }
}

fn get<'a>(path: &'a str, more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut h = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", "api.test"),
    ];
    h.extend_from_slice(more);
    h
}

fn removed(o: &[Edit], name: &str) -> bool {
    o.iter().any(|e| matches!(e, Edit::Remove(n) if n == name))
}

fn status(o: &Outcome) -> u32 {
    o.reply.as_ref().map_or(0, |r| r.status)
}

#[test]
fn every_verdict_knows_its_label_details_and_whether_it_forwards() {
    use Verdict::*;
    let all = [
        Allowed,
        UnmatchedAllowed,
        DeniedUnmatched,
        DeniedUnauthenticated,
        DeniedForbidden,
        DeniedBadClaims,
        DeniedBadPath,
        DeniedBadSubject,
        Unavailable,
        PausedLimit,
        Internal,
        Discovery,
    ];
    let labels: Vec<&str> = all.iter().map(|v| v.label()).collect();
    assert_eq!(
        labels,
        [
            "allowed",
            "unmatched_allowed",
            "denied_unmatched",
            "denied_unauthenticated",
            "denied_forbidden",
            "denied_bad_claims",
            "denied_bad_path",
            "denied_bad_subject",
            "credential_unavailable",
            "paused_limit",
            "internal_error",
            "discovery"
        ]
    );
    for v in all {
        assert_eq!(v.details(), format!("latchkey_{}", v.label()));
        assert_eq!(v.forwards(), matches!(v, Allowed | UnmatchedAllowed));
    }
}

#[test]
fn a_member_is_allowed_with_its_connections_and_the_claims_header_goes() {
    let c = config("allow");
    let bob = payload("bob", &["billing"]);
    let mut host = Host::default();
    let n = needs(run(
        &c,
        &get(
            "/partner/x?q=1",
            &[("x-jwt-payload", &bob), ("x-latchkey-cluster", "evil")],
        ),
        &mut host,
    ));
    assert_eq!(c.route(n.route).unwrap().name, "partner");
    let names: Vec<&str> = n
        .picks
        .iter()
        .map(|&p| c.connection(p).unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["billing", "open"]);
    assert!(n.subject.is_none());
    assert!(removed(&n.edits, "x-jwt-payload"));
    assert!(removed(&n.edits, "x-latchkey-cluster"));
    // One route of this configuration matches by name: the route name is read
    // (once); the claims come from the header, so no metadata is read.
    assert_eq!((host.route_reads, host.metadata_reads), (1, 0));
    let key = Secret::new("pk-1");
    let resolved = [
        Resolved {
            secret: &key,
            default_prefix: "",
            with_default: None,
        },
        Resolved {
            secret: &key,
            default_prefix: "",
            with_default: None,
        },
    ];
    let sent = ["x-jwt-payload", "x-key", "x-debug"];
    let o = finish(&c, n, resolved, &sent[..], b"/partner/x?q=1&api_key=mine");
    assert_eq!(o.verdict, Verdict::Allowed);
    assert!(o.reply.is_none());
    assert_eq!(o.route, Some(0));
    assert_eq!(o.picks.len(), 2);
    assert!(removed(&o.edits, "x-jwt-payload") && removed(&o.edits, "x-debug"));
    assert!(o
        .edits
        .iter()
        .any(|e| matches!(e, Edit::SetPath(p) if p == b"/partner/x?q=1&api_key=pk-1")));
    assert!(o.edits.iter().any(
        |e| matches!(e, Edit::Set { name, value } if &**name == "x-key" && value.expose() == "pk-1")
    ));
}

#[test]
fn refusals_answer_with_their_status_and_keep_the_header_removals() {
    let c = config("deny");
    let eve = payload("eve", &["staff"]);
    let mut host = Host::default();
    // Claims needed, none: 401.
    let o = done(run(&c, &get("/partner/x", &[]), &mut host));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
    assert_eq!(
        o.reply.as_ref().unwrap().body,
        r#"{"error":"unauthenticated","route":"partner"}"#
    );
    // Claims that don't admit: 403; the claims header still goes.
    let o = done(run(
        &c,
        &get("/partner/x", &[("x-jwt-payload", &eve)]),
        &mut host,
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedForbidden, 403));
    assert!(removed(&o.edits, "x-jwt-payload"));
    // Malformed claims: 401 with the reason for the debug log.
    let o = done(run(
        &c,
        &get("/partner/x", &[("x-jwt-payload", "%%%")]),
        &mut host,
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedBadClaims, 401));
    assert_eq!(
        o.why.as_deref(),
        Some("401: claims header is not base64url")
    );
    // No route, unmatched deny: 403 without a route.
    let o = done(run(&c, &get("/nowhere", &[]), &mut host));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedUnmatched, 403));
    assert_eq!(o.reply.as_ref().unwrap().body, r#"{"error":"forbidden"}"#);
    // A path upstreams read differently: 400.
    let o = done(run(&c, &get("/partner/%2e%2e/weather", &[]), &mut host));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedBadPath, 400));
    assert!(o.why.as_deref().unwrap().starts_with("400: "));
    assert!(o.edits.is_empty());
}

#[test]
fn unmatched_allow_forwards_with_only_the_removals() {
    let c = config("allow");
    let mut host = Host::default();
    let o = done(run(
        &c,
        &get("/nowhere", &[("x-jwt-payload", "x")]),
        &mut host,
    ));
    assert_eq!(o.verdict, Verdict::UnmatchedAllowed);
    assert!(o.reply.is_none() && o.route.is_none());
    assert!(removed(&o.edits, "x-jwt-payload"));
    // Public-only route with a configured key: claims are never read, even
    // malformed ones, and the request is answered at once (its fixed plan).
    let o = done(run(
        &c,
        &get("/weather/today", &[("x-jwt-payload", "%%%")]),
        &mut host,
    ));
    assert_eq!(o.verdict, Verdict::Allowed);
    assert_eq!(c.route(o.route.unwrap()).unwrap().name, "weather");
    assert!(removed(&o.edits, "x-jwt-payload"));
    assert!(o
        .edits
        .iter()
        .any(|e| matches!(e, Edit::Set { .. } | Edit::SetPath(_))));
    assert_eq!(host.metadata_reads, 0);
}

#[test]
fn route_names_are_read_only_when_a_route_matches_by_name() {
    let c = config("deny");
    let admin = payload("ann", &["admins"]);
    let mut host = Host {
        route_name: Some("admin-route"),
        ..Host::default()
    };
    let n = needs(run(&c, &get("/x", &[("x-jwt-payload", &admin)]), &mut host));
    assert_eq!(c.route(n.route).unwrap().name, "admin");
    assert!(n.picks.is_empty());
    assert_eq!(host.route_reads, 1);
    // A failed host read fails the request (the glue answers 500).
    let mut broken = Host {
        fail: true,
        ..Host::default()
    };
    let pairs: Vec<(&str, &[u8])> = vec![(":path", b"/x")];
    assert_eq!(
        start(&c, None, &pairs, &mut broken).unwrap_err(),
        HostFault(2)
    );
}

#[test]
fn token_exchange_takes_exactly_the_verified_jwt() {
    let c = config("deny");
    let alice = payload("alice", &[]);
    let token = jwt(&alice);
    let bearer = format!("Bearer {token}");
    let mut host = Host::default();
    let n = needs(run(
        &c,
        &get(
            "/orders/1",
            &[("x-jwt-payload", &alice), ("authorization", &bearer)],
        ),
        &mut host,
    ));
    assert_eq!(n.subject.as_ref().map(Secret::expose), Some(token.as_str()));
    // Another user's JWT beside the verified payload, or padding: 401.
    let bob = format!("Bearer {}", jwt(&payload("bob", &[])));
    let padded = format!("Bearer ~{token}");
    for auth in [bob.as_str(), padded.as_str()] {
        let o = done(run(
            &c,
            &get(
                "/orders/1",
                &[("x-jwt-payload", &alice), ("authorization", auth)],
            ),
            &mut host,
        ));
        assert_eq!((o.verdict, status(&o)), (Verdict::DeniedBadSubject, 401));
        assert!(o.why.as_deref().unwrap().starts_with("401: "));
        assert!(!o.why.as_deref().unwrap().contains(&token));
        assert!(removed(&o.edits, "x-jwt-payload"));
    }
    // Two authorization headers: 401.
    let o = done(run(
        &c,
        &get(
            "/orders/1",
            &[
                ("x-jwt-payload", &alice),
                ("authorization", &bearer),
                ("authorization", &bearer),
            ],
        ),
        &mut host,
    ));
    assert_eq!(o.verdict, Verdict::DeniedBadSubject);
}

#[test]
fn metadata_claims_are_read_once_and_only_when_needed() {
    let mut v = json!({
        "providers": { "keys": { "type": "api_key" } },
        "secrets": { "k": { "inline": "pk" } },
        "connections": { "billing": { "provider": "keys", "api_key": "k",
                                      "access": { "groups": ["billing"] } } },
        "routes": [ { "name": "partner", "match": { "path_prefix": "/partner/" },
                      "inject": [ { "connections": ["billing"], "header": "x-key" } ] } ]
    });
    let c = parse(v.take());
    let md = crate::pb::encode::metadata(
        JWT_AUTHN,
        "payload",
        &json!({ "sub": "bob", "groups": ["billing"] }),
    );
    let mut host = Host {
        metadata: Some(md),
        ..Host::default()
    };
    let n = needs(run(&c, &get("/partner/a", &[]), &mut host));
    assert_eq!(n.picks.len(), 1);
    assert_eq!(host.metadata_reads, 1);
    // No route matches by name: the route name is never read.
    assert_eq!(host.route_reads, 0);
    // Unmatched: no claims read at all.
    done(run(&c, &get("/elsewhere", &[]), &mut host));
    assert_eq!(host.metadata_reads, 1);
    // Metadata that isn't a well-formed message: 401.
    host.metadata = Some(vec![0x0a, 0x05]);
    let o = done(run(&c, &get("/partner/a", &[]), &mut host));
    assert_eq!(o.verdict, Verdict::DeniedBadClaims);
}

#[test]
fn metadata_claims_are_read_under_the_first_present_key_and_dotted_names_by_escape() {
    // Envoy Gateway writes each JWT provider's payload under the provider's name;
    // Auth0 namespaces its claims with URLs.
    let c = parse(json!({
        "claims": { "key": ["team-a", "team-b"], "groups": "https://example\\.com/roles" },
        "providers": { "keys": { "type": "api_key" } },
        "secrets": { "k": { "inline": "pk" } },
        "connections": { "billing": { "provider": "keys", "api_key": "k",
                                      "access": { "groups": ["billing"] } } },
        "routes": [ { "name": "partner", "match": { "path_prefix": "/partner/" },
                      "inject": [ { "connections": ["billing"], "header": "x-key" } ] } ]
    }));
    let claims = json!({ "sub": "bob", "https://example.com/roles": ["billing"],
                         "https://example": { "com/roles": ["support"] } });
    for (key, allowed) in [("team-a", true), ("team-b", true), ("team-c", false)] {
        let mut host = Host {
            metadata: Some(crate::pb::encode::metadata(JWT_AUTHN, key, &claims)),
            ..Host::default()
        };
        match run(&c, &get("/partner/a", &[]), &mut host) {
            Step::Needs(n) => assert!(allowed && n.picks.len() == 1, "{key}"),
            Step::Done(o) => assert!(
                !allowed && o.verdict == Verdict::DeniedUnauthenticated,
                "{key}: {:?}",
                o.verdict
            ),
            Step::Consent(_) => panic!("consent"),
        }
        assert_eq!(host.metadata_reads, 1);
    }
    // The first present key wins, even when a later one would allow.
    let md = crate::pb::encode::metadata_holding(
        JWT_AUTHN,
        &json!({ "team-b": claims, "team-a": { "sub": "eve" } }),
    );
    let mut host = Host {
        metadata: Some(md),
        ..Host::default()
    };
    let o = done(run(&c, &get("/partner/a", &[]), &mut host));
    assert_eq!(o.verdict, Verdict::DeniedForbidden);
}

#[test]
fn discovery_answers_this_caller_and_only_for_get_and_head() {
    let c = config("deny");
    let bob = payload("bob", &["billing"]);
    let mut host = Host::default();
    let o = done(run(
        &c,
        &get("/.well-known/latchkey?x=1", &[("x-jwt-payload", &bob)]),
        &mut host,
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::Discovery, 200));
    let r = o.reply.unwrap();
    let doc: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(doc["authenticated"], json!(true));
    let names: Vec<&str> = doc["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["partner", "weather", "orders", "mtls"]);
    assert!(!r.body.contains("pk-secret"));
    assert!(r
        .headers
        .contains(&("cache-control", "no-store".to_string())));
    // A POST to the path is an ordinary (here unmatched) request.
    let mut post = get("/.well-known/latchkey", &[]);
    post[0] = (":method", "POST");
    assert_eq!(
        done(run(&c, &post, &mut host)).verdict,
        Verdict::DeniedUnmatched
    );
    // Malformed claims: 401, no document.
    let o = done(run(
        &c,
        &get("/.well-known/latchkey", &[("x-jwt-payload", "%%%")]),
        &mut host,
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedBadClaims, 401));
}

#[test]
fn after_a_wait_the_outcome_is_unavailable_or_paused_limit_or_internal() {
    let c = config("deny");
    let bob = payload("bob", &["billing"]);
    let need = || {
        needs(run(
            &c,
            &get("/partner/x", &[("x-jwt-payload", &bob)]),
            &mut Host::default(),
        ))
    };
    let billing = need().picks[0];
    let o = unavailable(&c, need(), billing, 2500);
    assert_eq!((o.verdict, status(&o)), (Verdict::Unavailable, 503));
    let r = o.reply.as_ref().unwrap();
    assert_eq!(
        r.body,
        r#"{"error":"credential_unavailable","route":"partner","connection":"billing"}"#
    );
    assert!(r.headers.contains(&("retry-after", "3".to_string())));
    assert!(removed(&o.edits, "x-jwt-payload"));
    assert_eq!(o.route, Some(0));
    // The connections it would have used, for the access log's connection label.
    assert_eq!(o.picks, need().picks);
    let o = paused_limit(&c, need());
    assert_eq!(o.picks, need().picks);
    assert_eq!((o.verdict, status(&o)), (Verdict::PausedLimit, 503));
    assert!(o
        .reply
        .as_ref()
        .unwrap()
        .body
        .contains(r#""connection":"billing""#));
    assert!(o
        .reply
        .as_ref()
        .unwrap()
        .headers
        .contains(&("retry-after", "1".to_string())));
    let o = internal(&c, Some(0));
    assert_eq!((o.verdict, status(&o)), (Verdict::Internal, 500));
    assert_eq!(
        o.reply.unwrap().body,
        r#"{"error":"internal_error","route":"partner"}"#
    );
    // A route that went away (it can't, within one configuration) is an internal error.
    let mut gone = need();
    gone.route = 99;
    let key = Secret::new("k");
    let o = finish(
        &c,
        gone,
        [Resolved {
            secret: &key,
            default_prefix: "",
            with_default: None,
        }],
        &[] as &[&str],
        b"/",
    );
    assert_eq!(o.verdict, Verdict::Internal);
    assert_eq!(status(&o), 500);
}

#[test]
fn a_cluster_header_entry_sets_the_chosen_cluster() {
    let c = config("deny");
    let bob = payload("bob", &[]);
    let mut host = Host::default();
    let n = needs(run(
        &c,
        &get("/mtls/a", &[("x-jwt-payload", &bob), ("x-cluster", "evil")]),
        &mut host,
    ));
    assert!(removed(&n.edits, "x-cluster"));
    let cluster = Secret::new("partner_a");
    let o = finish(
        &c,
        n,
        [Resolved {
            secret: &cluster,
            default_prefix: "",
            with_default: None,
        }],
        &["x-cluster"][..],
        b"/mtls/a",
    );
    assert!(o
        .edits
        .iter()
        .any(|e| matches!(e, Edit::Set { name, value } if &**name == "x-cluster" && value.expose() == "partner_a")));
}

// ---- User-delegated connections (SPEC v1.2): the consent endpoints. ----

const STATE_KEY: &str = "0123456789abcdef0123456789abcdef";

/// SPEC's example: a per-user connection, a shared one whose provider names its
/// issuer, a per-user one for staff only, and routes that use them.
fn consent_config() -> Config {
    parse(json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": { "cs": { "inline": "client-secret" }, "vt": { "inline": "vault-token" },
                     "sk": { "inline": STATE_KEY } },
        "providers": {
            "github": { "type": "oauth2", "cluster": "github",
                        "authorization_url": "https://github.com/login/oauth/authorize",
                        "token_url": "https://github.com/login/oauth/access_token",
                        "client_id": "gh-client", "client_secret": "cs" },
            "crm": { "type": "oauth2", "cluster": "crm", "issuer": "https://login.crm.example",
                     "authorization_url": "https://login.crm.example/authorize",
                     "token_url": "https://login.crm.example/token",
                     "client_id": "crm-client", "client_secret": "cs" }
        },
        "token_stores": { "user_tokens": { "vault": { "cluster": "vault", "url": "http://vault:8200",
                                                      "token": "vt" } } },
        "consent": { "path": "/.latchkey/connections",
                     "redirect_uri": "https://api.example.com/.latchkey/callback",
                     "state_key": "sk", "return_to": ["https://portal.example.com/"] },
        "connections": {
            "github_mine": { "provider": "github", "grant": "authorization_code", "per_user": true,
                             "scopes": ["repo"], "store": "user_tokens",
                             "access": { "authenticated": true } },
            "staff_only": { "provider": "github", "grant": "authorization_code", "per_user": true,
                            "store": "user_tokens", "access": { "groups": ["staff"] } },
            "crm_team": { "provider": "crm", "grant": "authorization_code", "store": "user_tokens",
                          "consent": { "groups": ["crm-admins"] }, "access": { "groups": ["sales"] } },
            "orders": { "provider": "github", "grant": "client_credentials",
                        "access": { "authenticated": true } }
        },
        "routes": [
            { "name": "github", "match": { "path_prefix": "/github/" },
              "inject": [ { "connections": ["github_mine"], "header": "authorization" } ] },
            { "name": "crm", "match": { "path_prefix": "/crm/" },
              "inject": [ { "connections": ["crm_team"], "header": "authorization" } ] },
            { "name": "orders", "match": { "path_prefix": "/orders/" },
              "inject": [ { "connections": ["orders"], "header": "authorization" } ] }
        ]
    }))
}

fn conn_index(c: &Config, name: &str) -> usize {
    c.connections.iter().position(|k| k.name == name).unwrap()
}

fn state_key() -> Secret {
    Secret::new(STATE_KEY)
}

fn at_time(now_ms: u64) -> Host {
    Host {
        now_ms,
        ..Host::default()
    }
}

fn consent_task(step: Step) -> Task {
    match step {
        Step::Consent(t) => t,
        Step::Done(o) => panic!("done: {o:?}"),
        Step::Needs(n) => panic!("needs credentials: {n:?}"),
    }
}

fn header_of<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    o.reply
        .as_ref()?
        .headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

fn body_json(o: &Outcome) -> Value {
    serde_json::from_str(&o.reply.as_ref().unwrap().body).unwrap()
}

/// A consent endpoint's refusal: its status and JSON body.
fn failed(o: &Outcome) -> (u32, Value) {
    assert_eq!(o.verdict, Verdict::ConsentFailed, "{o:?}");
    (status(o), body_json(o))
}

fn with_method<'a>(
    method: &'a str,
    path: &'a str,
    more: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut h = get(path, more);
    h[0] = (":method", method);
    h
}

fn claims(v: Value) -> String {
    b64(&v.to_string())
}

/// The query of a login's 302.
fn login_query(o: &Outcome) -> HashMapQuery {
    let location = header_of(o, "location").unwrap();
    let (_, query) = location.split_once('?').unwrap();
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

type HashMapQuery = Vec<(String, String)>;

fn param<'a>(q: &'a HashMapQuery, name: &str) -> Option<&'a str> {
    let mut found = q.iter().filter(|(k, _)| k == name);
    let first = found.next().map(|(_, v)| v.as_str());
    assert!(found.next().is_none(), "{name} twice");
    first
}

/// Logs `who` in to `connection` at `now`, and gives the state the provider brings back.
fn login(c: &Config, connection: &str, who: &str, now: u64) -> String {
    let path = format!("/.latchkey/connections/{connection}/login");
    let o = done(run(
        c,
        &get(&path, &[("x-jwt-payload", who)]),
        &mut at_time(now),
    ));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::ConsentLogin, 302),
        "{o:?}"
    );
    param(&login_query(&o), "state").unwrap().to_string()
}

#[test]
fn a_login_redirects_to_the_provider_with_a_state_bound_to_the_caller() {
    let c = consent_config();
    let alice = payload("alice", &[]);
    let mut host = at_time(1_000_000);
    let o = done(run(
        &c,
        &get(
            "/.latchkey/connections/github_mine/login",
            &[("x-jwt-payload", &alice)],
        ),
        &mut host,
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::ConsentLogin, 302));
    assert_eq!(o.picks, [conn_index(&c, "github_mine")]);
    assert_eq!(o.route, None);
    assert_eq!(header_of(&o, "cache-control"), Some("no-store"));
    let location = header_of(&o, "location").unwrap();
    assert!(
        location.starts_with("https://github.com/login/oauth/authorize?response_type=code&"),
        "{location}"
    );
    let q = login_query(&o);
    assert_eq!(param(&q, "response_type"), Some("code"));
    assert_eq!(param(&q, "client_id"), Some("gh-client"));
    assert_eq!(
        param(&q, "redirect_uri"),
        Some("https://api.example.com/.latchkey/callback")
    );
    assert_eq!(param(&q, "scope"), Some("repo"));
    assert_eq!(param(&q, "code_challenge_method"), Some("S256"));
    // The state: signed with the key, for this caller (hash of iss and sub),
    // a nonce of two random draws, ten minutes.
    let state =
        crate::consent::verify_state(&state_key(), param(&q, "state").unwrap(), 1_000_000).unwrap();
    assert_eq!(
        state,
        crate::consent::State {
            connection: "github_mine".into(),
            caller: crate::consent::caller_hash("https://issuer", "alice"),
            nonce: "00000000000000010000000000000002".into(),
            expires_ms: 1_000_000 + 600_000,
            return_to: None,
        }
    );
    assert_eq!(host.random, 2);
    // PKCE: the challenge of the verifier the key derives from the nonce.
    let verifier = crate::consent::pkce_verifier(&state_key(), &state.nonce);
    assert_eq!(
        param(&q, "code_challenge"),
        Some(crate::consent::pkce_challenge(&verifier).as_str())
    );
    // Nothing of the caller's claims or the secrets in the URL.
    assert!(!location.contains("alice") && !location.contains("client-secret"));
    // Another login, another nonce.
    let mut host2 = Host {
        random: 2,
        ..at_time(1_000_000)
    };
    let o = done(run(
        &c,
        &get(
            "/.latchkey/connections/github_mine/login",
            &[("x-jwt-payload", &alice)],
        ),
        &mut host2,
    ));
    let s2 =
        crate::consent::verify_state(&state_key(), param(&login_query(&o), "state").unwrap(), 0)
            .unwrap();
    assert_eq!(s2.nonce, "00000000000000030000000000000004");
    // A caller of another issuer is another caller.
    let other_iss = claims(json!({ "iss": "https://other", "sub": "alice" }));
    let o = done(run(
        &c,
        &get(
            "/.latchkey/connections/github_mine/login",
            &[("x-jwt-payload", &other_iss)],
        ),
        &mut at_time(5),
    ));
    let s3 =
        crate::consent::verify_state(&state_key(), param(&login_query(&o), "state").unwrap(), 0)
            .unwrap();
    assert_eq!(
        s3.caller,
        crate::consent::caller_hash("https://other", "alice")
    );
    assert_ne!(s3.caller, state.caller);
    // No issuer claim: the empty issuer.
    let no_iss = claims(json!({ "sub": "alice" }));
    let o = done(run(
        &c,
        &get(
            "/.latchkey/connections/github_mine/login",
            &[("x-jwt-payload", &no_iss)],
        ),
        &mut at_time(5),
    ));
    let s4 =
        crate::consent::verify_state(&state_key(), param(&login_query(&o), "state").unwrap(), 0)
            .unwrap();
    assert_eq!(s4.caller, crate::consent::caller_hash("", "alice"));
}

#[test]
fn a_login_keeps_an_allowed_return_to_and_refuses_any_other() {
    let c = consent_config();
    let alice = payload("alice", &[]);
    let login_at = |query: &str| {
        let path = format!("/.latchkey/connections/github_mine/login{query}");
        done(run(
            &c,
            &get(&path, &[("x-jwt-payload", &alice)]),
            &mut at_time(7),
        ))
    };
    let o = login_at("?return_to=https%3A%2F%2Fportal.example.com%2Fsettings%3Ftab%3D1");
    assert_eq!(status(&o), 302);
    let state =
        crate::consent::verify_state(&state_key(), param(&login_query(&o), "state").unwrap(), 7)
            .unwrap();
    assert_eq!(
        state.return_to.as_deref(),
        Some("https://portal.example.com/settings?tab=1")
    );
    // Other parameters are ignored.
    let o = login_at("?x=1");
    assert_eq!(status(&o), 302);
    let state =
        crate::consent::verify_state(&state_key(), param(&login_query(&o), "state").unwrap(), 7)
            .unwrap();
    assert_eq!(state.return_to, None);
    // Not under a configured prefix.
    let o = login_at("?return_to=https%3A%2F%2Fportal.example.com.evil%2F");
    assert_eq!(
        failed(&o),
        (
            400,
            json!({ "error": "consent_failed", "reason": "return_to", "connection": "github_mine" })
        )
    );
    assert_eq!(header_of(&o, "retry-after"), None);
    assert_eq!(header_of(&o, "content-type"), Some("application/json"));
    // Twice: two readings of one request.
    let o = login_at("?return_to=https%3A%2F%2Fportal.example.com%2F&return_to=https%3A%2F%2Fportal.example.com%2F");
    assert_eq!(
        failed(&o),
        (
            400,
            json!({ "error": "consent_failed", "reason": "bad_request", "connection": "github_mine" })
        )
    );
}

#[test]
fn a_login_needs_a_signed_in_caller_whom_the_connection_admits() {
    let c = consent_config();
    let login = |connection: &str, who: Option<&str>| {
        let path = format!("/.latchkey/connections/{connection}/login");
        let more: Vec<(&str, &str)> = who.map(|w| ("x-jwt-payload", w)).into_iter().collect();
        done(run(&c, &get(&path, &more), &mut at_time(7)))
    };
    // No claims, or claims without a subject: 401.
    let o = login("github_mine", None);
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
    assert_eq!(
        o.reply.as_ref().unwrap().body,
        r#"{"error":"unauthenticated"}"#
    );
    let no_sub = claims(json!({ "iss": "https://issuer", "groups": ["staff"] }));
    let o = login("github_mine", Some(&no_sub));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
    let empty_sub = claims(json!({ "iss": "https://issuer", "sub": "" }));
    let o = login("github_mine", Some(&empty_sub));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
    // Malformed claims: 401.
    let o = login("github_mine", Some("%%%"));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedBadClaims, 401));
    // Per-user: the connection's access says who.
    let alice = payload("alice", &[]);
    let sam = payload("sam", &["staff"]);
    let o = login("staff_only", Some(&alice));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedForbidden, 403));
    assert_eq!(o.reply.as_ref().unwrap().body, r#"{"error":"forbidden"}"#);
    assert_eq!(status(&login("staff_only", Some(&sam))), 302);
    // Shared: its consent access, not its access.
    let seller = payload("sid", &["sales"]);
    let admin = payload("ann", &["crm-admins"]);
    let o = login("crm_team", Some(&seller));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedForbidden, 403));
    let o = login("crm_team", Some(&admin));
    assert_eq!((o.verdict, status(&o)), (Verdict::ConsentLogin, 302));
    assert!(header_of(&o, "location").unwrap().starts_with(
        "https://login.crm.example/authorize?response_type=code&client_id=crm-client&"
    ));
    // Anything else under the path: 404, never forwarded.
    for (method, path) in [
        ("GET", "/.latchkey/connections/orders/login"),
        ("GET", "/.latchkey/connections/nope/login"),
        ("POST", "/.latchkey/connections/github_mine/login"),
        ("GET", "/.latchkey/connections/github_mine"),
        ("POST", "/.latchkey/callback"),
    ] {
        let o = done(run(
            &c,
            &with_method(method, path, &[("x-jwt-payload", &admin)]),
            &mut at_time(7),
        ));
        assert_eq!(
            failed(&o),
            (
                404,
                json!({ "error": "consent_failed", "reason": "not_found" })
            ),
            "{method} {path}"
        );
    }
    // A failed clock read fails the request.
    let mut broken = Host {
        fail: true,
        ..Host::default()
    };
    let headers = get(
        "/.latchkey/connections/github_mine/login",
        &[("x-jwt-payload", &alice)],
    );
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    assert_eq!(
        start(&c, None, &pairs, &mut broken).unwrap_err(),
        HostFault(2)
    );
}

#[test]
fn a_callback_becomes_a_connect_task_for_the_caller_who_started_the_login() {
    let c = consent_config();
    let alice = payload("alice", &[]);
    let state = login(&c, "github_mine", &alice, 1_000);
    let path = format!("/.latchkey/callback?code=c-1&state={state}&scope=repo");
    let t = consent_task(run(
        &c,
        &get(&path, &[("x-jwt-payload", &alice)]),
        &mut at_time(2_000),
    ));
    assert_eq!(t.connection, conn_index(&c, "github_mine"));
    assert_eq!(
        t.record,
        crate::consent::caller_hash("https://issuer", "alice")
    );
    assert_eq!(
        t.caller.as_ref().map(Secret::expose),
        crate::consent::caller_key("https://issuer", "alice").as_deref()
    );
    let TaskKind::Connect {
        code,
        verifier,
        return_to,
        nonce,
        expires_ms,
    } = t.kind
    else {
        panic!("not a connect")
    };
    assert_eq!(code.expose(), "c-1");
    assert_eq!(nonce, "00000000000000010000000000000002");
    assert_eq!(
        verifier,
        crate::consent::pkce_verifier(&state_key(), &nonce)
    );
    assert_eq!(expires_ms, 1_000 + 600_000);
    assert_eq!(return_to, None);
    // return_to travels in the state to the task.
    let path = "/.latchkey/connections/github_mine/login?return_to=https%3A%2F%2Fportal.example.com%2Fdone";
    let o = done(run(
        &c,
        &get(path, &[("x-jwt-payload", &alice)]),
        &mut at_time(1),
    ));
    let state = param(&login_query(&o), "state").unwrap().to_string();
    let path = format!("/.latchkey/callback?state={state}&code=c-2");
    let t = consent_task(run(
        &c,
        &get(&path, &[("x-jwt-payload", &alice)]),
        &mut at_time(2),
    ));
    assert!(
        matches!(t.kind, TaskKind::Connect { return_to: Some(r), .. } if r == "https://portal.example.com/done")
    );
}

#[test]
fn a_shared_callback_needs_the_issuer_the_provider_names() {
    let c = consent_config();
    let admin = payload("ann", &["crm-admins"]);
    let state = login(&c, "crm_team", &admin, 1_000);
    let callback = |extra: &str, who: &str| {
        let path = format!("/.latchkey/callback?code=c-1&state={state}{extra}");
        run(
            &c,
            &get(&path, &[("x-jwt-payload", who)]),
            &mut at_time(2_000),
        )
    };
    let t = consent_task(callback("&iss=https%3A%2F%2Flogin.crm.example", &admin));
    assert_eq!(t.connection, conn_index(&c, "crm_team"));
    assert_eq!(t.record, "shared");
    assert!(t.caller.is_none());
    assert!(matches!(t.kind, TaskKind::Connect { .. }));
    // RFC 9207: no iss, or another: refused.
    for extra in [
        "",
        "&iss=https%3A%2F%2Fevil.example",
        "&iss=https%3A%2F%2Flogin.crm.example%2F",
    ] {
        let o = done(callback(extra, &admin));
        assert_eq!(
            failed(&o),
            (
                400,
                json!({ "error": "consent_failed", "reason": "wrong_issuer", "connection": "crm_team" })
            ),
            "{extra}"
        );
    }
    // The same admin who lost the group on the way: refused.
    let demoted = payload("ann", &["sales"]);
    let o = done(callback("&iss=https%3A%2F%2Flogin.crm.example", &demoted));
    assert_eq!(
        failed(&o),
        (
            403,
            json!({ "error": "consent_failed", "reason": "wrong_caller", "connection": "crm_team" })
        )
    );
    // A provider without issuer takes any iss, or none.
    let alice = payload("alice", &[]);
    let state = login(&c, "github_mine", &alice, 1_000);
    let path = format!("/.latchkey/callback?code=c&state={state}&iss=https%3A%2F%2Fanything");
    consent_task(run(
        &c,
        &get(&path, &[("x-jwt-payload", &alice)]),
        &mut at_time(2_000),
    ));
}

#[test]
fn a_callback_refuses_a_forged_expired_or_foreign_state_and_says_why() {
    let c = consent_config();
    let alice = payload("alice", &[]);
    let state = login(&c, "github_mine", &alice, 1_000);
    let callback = |query: &str, who: Option<&str>, now: u64| {
        let path = format!("/.latchkey/callback{query}");
        let more: Vec<(&str, &str)> = who.map(|w| ("x-jwt-payload", w)).into_iter().collect();
        run(&c, &get(&path, &more), &mut at_time(now))
    };
    let reason = |step: Step| {
        let o = done(step);
        let (status, body) = failed(&o);
        (
            status,
            body["reason"].as_str().unwrap().to_string(),
            body.get("connection").cloned(),
        )
    };
    // Still good one ms before it expires; expired at its expiry.
    consent_task(callback(
        &format!("?code=c&state={state}"),
        Some(&alice),
        600_999,
    ));
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={state}"),
            Some(&alice),
            601_000
        )),
        (400, "state_expired".into(), None)
    );
    // Tampered with, or signed with another key.
    let mut tampered = state.clone();
    tampered.insert(0, 'x');
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={tampered}"),
            Some(&alice),
            2_000
        )),
        (400, "state_invalid".into(), None)
    );
    let forged = crate::consent::sign_state(
        &Secret::new("another-key-of-at-least-32-bytes!!"),
        &crate::consent::verify_state(&state_key(), &state, 0).unwrap(),
    );
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={forged}"),
            Some(&alice),
            2_000
        )),
        (400, "state_invalid".into(), None)
    );
    // Signed, but for a connection without consent.
    let orders = crate::consent::sign_state(
        &state_key(),
        &crate::consent::State {
            connection: "orders".into(),
            caller: crate::consent::caller_hash("https://issuer", "alice"),
            nonce: "n".into(),
            expires_ms: 10_000,
            return_to: None,
        },
    );
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={orders}"),
            Some(&alice),
            2_000
        )),
        (400, "state_invalid".into(), None)
    );
    // Another caller finishing alice's login.
    let bob = payload("bob", &[]);
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={state}"),
            Some(&bob),
            2_000
        )),
        (403, "wrong_caller".into(), Some(json!("github_mine")))
    );
    // The same subject at another issuer is another caller.
    let alice_elsewhere = claims(json!({ "iss": "https://other", "sub": "alice" }));
    assert_eq!(
        reason(callback(
            &format!("?code=c&state={state}"),
            Some(&alice_elsewhere),
            2_000
        )),
        (403, "wrong_caller".into(), Some(json!("github_mine")))
    );
    // The provider's answer: refused, or something else went wrong.
    assert_eq!(
        reason(callback(
            &format!("?error=access_denied&state={state}"),
            Some(&alice),
            2_000
        )),
        (400, "access_denied".into(), Some(json!("github_mine")))
    );
    assert_eq!(
        reason(callback(
            &format!("?error=server_error&state={state}"),
            Some(&alice),
            2_000
        )),
        (400, "bad_request".into(), Some(json!("github_mine")))
    );
    // An error beside a code is still an error.
    assert_eq!(
        reason(callback(
            &format!("?code=c&error=access_denied&state={state}"),
            Some(&alice),
            2_000
        )),
        (400, "access_denied".into(), Some(json!("github_mine")))
    );
    // No code, an empty one, no state, a parameter twice.
    assert_eq!(
        reason(callback(&format!("?state={state}"), Some(&alice), 2_000)),
        (400, "bad_request".into(), Some(json!("github_mine")))
    );
    assert_eq!(
        reason(callback(
            &format!("?code=&state={state}"),
            Some(&alice),
            2_000
        )),
        (400, "bad_request".into(), Some(json!("github_mine")))
    );
    assert_eq!(
        reason(callback("?code=c", Some(&alice), 2_000)),
        (400, "bad_request".into(), None)
    );
    assert_eq!(
        reason(callback(
            &format!("?code=c&code=d&state={state}"),
            Some(&alice),
            2_000
        )),
        (400, "bad_request".into(), None)
    );
    // No caller at all: 401.
    let o = done(callback(&format!("?code=c&state={state}"), None, 2_000));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
}

#[test]
fn a_disconnect_is_a_task_on_the_caller_s_record_or_the_shared_one() {
    let c = consent_config();
    let alice = payload("alice", &[]);
    let t = consent_task(run(
        &c,
        &with_method(
            "DELETE",
            "/.latchkey/connections/github_mine",
            &[("x-jwt-payload", &alice)],
        ),
        &mut at_time(1),
    ));
    assert_eq!(t.connection, conn_index(&c, "github_mine"));
    assert_eq!(
        t.record,
        crate::consent::caller_hash("https://issuer", "alice")
    );
    assert_eq!(
        t.caller.as_ref().map(Secret::expose),
        crate::consent::caller_key("https://issuer", "alice").as_deref()
    );
    assert!(matches!(t.kind, TaskKind::Disconnect));
    // Shared: only whom its consent admits.
    let admin = payload("ann", &["crm-admins"]);
    let t = consent_task(run(
        &c,
        &with_method(
            "DELETE",
            "/.latchkey/connections/crm_team",
            &[("x-jwt-payload", &admin)],
        ),
        &mut at_time(1),
    ));
    assert_eq!(
        (t.connection, t.record.as_str()),
        (conn_index(&c, "crm_team"), "shared")
    );
    assert!(t.caller.is_none());
    assert!(matches!(t.kind, TaskKind::Disconnect));
    let seller = payload("sid", &["sales"]);
    let o = done(run(
        &c,
        &with_method(
            "DELETE",
            "/.latchkey/connections/crm_team",
            &[("x-jwt-payload", &seller)],
        ),
        &mut at_time(1),
    ));
    assert_eq!((o.verdict, status(&o)), (Verdict::DeniedForbidden, 403));
    let o = done(run(
        &c,
        &with_method("DELETE", "/.latchkey/connections/github_mine", &[]),
        &mut at_time(1),
    ));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
}

#[test]
fn a_per_user_route_knows_the_caller_and_needs_a_subject() {
    let c = consent_config();
    let alice = payload("alice", &["sales"]);
    let n = needs(run(
        &c,
        &get("/github/user", &[("x-jwt-payload", &alice)]),
        &mut at_time(1),
    ));
    assert_eq!(n.picks, [conn_index(&c, "github_mine")]);
    assert_eq!(
        n.caller.as_ref().map(Secret::expose),
        crate::consent::caller_key("https://issuer", "alice").as_deref()
    );
    assert_eq!(
        crate::consent::caller_key("https://issuer", "alice").as_deref(),
        Some("https://issuer\0alice")
    );
    // A NUL in either would let two callers share a key: no key at all.
    assert_eq!(
        crate::consent::caller_key("https://issuer\0x", "alice"),
        None
    );
    assert_eq!(
        crate::consent::caller_key("https://issuer", "al\0ice"),
        None
    );
    assert!(n.subject.is_none());
    assert!(removed(&n.edits, "x-jwt-payload"));
    // A shared connection, or one of another grant: no caller.
    let n = needs(run(
        &c,
        &get("/crm/accounts", &[("x-jwt-payload", &alice)]),
        &mut at_time(1),
    ));
    assert_eq!(n.picks, [conn_index(&c, "crm_team")]);
    assert!(n.caller.is_none());
    let n = needs(run(
        &c,
        &get("/orders/1", &[("x-jwt-payload", &alice)]),
        &mut at_time(1),
    ));
    assert!(n.caller.is_none());
    // Signed in, but no subject to key the consent by: 401.
    let no_sub = claims(json!({ "iss": "https://issuer", "groups": ["sales"] }));
    let o = done(run(
        &c,
        &get("/github/user", &[("x-jwt-payload", &no_sub)]),
        &mut at_time(1),
    ));
    assert_eq!(
        (o.verdict, status(&o)),
        (Verdict::DeniedUnauthenticated, 401)
    );
    assert_eq!(o.route, Some(0));
    assert_eq!(
        o.reply.as_ref().unwrap().body,
        r#"{"error":"unauthenticated","route":"github"}"#
    );
    assert_eq!(
        o.why.as_deref(),
        Some("401: no subject to key a per-user consent")
    );
    assert!(removed(&o.edits, "x-jwt-payload"));
    // The shared route doesn't need one.
    needs(run(
        &c,
        &get("/crm/accounts", &[("x-jwt-payload", &no_sub)]),
        &mut at_time(1),
    ));
    // Nobody consented yet: 403 with where to sign in.
    let n = needs(run(
        &c,
        &get("/github/user", &[("x-jwt-payload", &alice)]),
        &mut at_time(1),
    ));
    let picks = n.picks.clone();
    let o = consent_required(&c, n, conn_index(&c, "github_mine"));
    assert_eq!((o.verdict, status(&o)), (Verdict::ConsentRequired, 403));
    assert_eq!(
        o.reply.as_ref().unwrap().body,
        r#"{"error":"consent_required","route":"github","connection":"github_mine","login_url":"/.latchkey/connections/github_mine/login"}"#
    );
    assert_eq!((o.route, o.picks), (Some(0), picks));
    assert!(removed(&o.edits, "x-jwt-payload"));
}

#[test]
fn consent_answers_and_verdicts() {
    let o = consent_connected(
        "github_mine",
        Some("https://portal.example.com/done".into()),
    );
    assert_eq!((o.verdict, status(&o)), (Verdict::ConsentConnected, 302));
    assert_eq!(
        header_of(&o, "location"),
        Some("https://portal.example.com/done")
    );
    assert_eq!(header_of(&o, "cache-control"), Some("no-store"));
    let o = consent_connected("github_mine", None);
    assert_eq!((o.verdict, status(&o)), (Verdict::ConsentConnected, 200));
    assert_eq!(body_json(&o), json!({ "connected": "github_mine" }));
    assert_eq!(header_of(&o, "cache-control"), Some("no-store"));
    for revoked in [true, false] {
        let o = consent_disconnected("crm_team", revoked);
        assert_eq!((o.verdict, status(&o)), (Verdict::ConsentDisconnected, 200));
        assert_eq!(
            body_json(&o),
            json!({ "disconnected": "crm_team", "revoked": revoked })
        );
    }
    // What may work when tried again says when.
    let o = consent_failed(503, "token_store", Some("crm_team"));
    assert_eq!(
        failed(&o),
        (
            503,
            json!({ "error": "consent_failed", "reason": "token_store", "connection": "crm_team" })
        )
    );
    assert_eq!(header_of(&o, "retry-after"), Some("1"));
    assert_eq!(o.why.as_deref(), Some("consent: 503 token_store"));
    let o = consent_failed(502, "no_refresh_token", None);
    assert_eq!(header_of(&o, "retry-after"), None);
    use Verdict::*;
    let all = [
        ConsentRequired,
        ConsentLogin,
        ConsentConnected,
        ConsentFailed,
        ConsentDisconnected,
    ];
    let labels: Vec<&str> = all.iter().map(|v| v.label()).collect();
    assert_eq!(
        labels,
        [
            "consent_required",
            "consent_login",
            "consent_connected",
            "consent_failed",
            "consent_disconnected"
        ]
    );
    for v in all {
        assert_eq!(v.details(), format!("latchkey_{}", v.label()));
        assert!(!v.forwards());
    }
}

#[test]
fn without_per_user_connections_the_issuer_comes_from_the_verified_token() {
    // Only a shared connection: `iss` is not a claim read per request, and a
    // consent endpoint takes it from the verified token's own claims.
    let mut v = json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": { "cs": { "inline": "client-secret" }, "vt": { "inline": "vault-token" },
                     "sk": { "inline": STATE_KEY } },
        "providers": { "crm": { "type": "oauth2", "cluster": "crm",
                                "authorization_url": "https://login.crm.example/authorize",
                                "token_url": "https://login.crm.example/token",
                                "client_id": "crm-client", "client_secret": "cs" } },
        "token_stores": { "user_tokens": { "vault": { "cluster": "vault", "url": "http://vault:8200",
                                                      "token": "vt" } } },
        "consent": { "path": "/.latchkey/connections", "redirect_uri": "https://api.example.com/cb",
                     "state_key": "sk" },
        "connections": { "crm_team": { "provider": "crm", "grant": "authorization_code",
                                       "store": "user_tokens", "consent": { "groups": ["crm-admins"] },
                                       "access": { "groups": ["sales"] } } }
    });
    let c = parse(v.take());
    assert_eq!(c.issuer_claim, None);
    let admin = payload("ann", &["crm-admins"]);
    let state = login(&c, "crm_team", &admin, 1_000);
    let s = crate::consent::verify_state(&state_key(), &state, 1_000).unwrap();
    assert_eq!(
        s.caller,
        crate::consent::caller_hash("https://issuer", "ann")
    );
    // The same subject from another issuer can't finish it.
    let elsewhere =
        claims(json!({ "iss": "https://other", "sub": "ann", "groups": ["crm-admins"] }));
    let path = format!("/cb?code=c&state={state}");
    let o = done(run(
        &c,
        &get(&path, &[("x-jwt-payload", &elsewhere)]),
        &mut at_time(2_000),
    ));
    assert_eq!(failed(&o).1["reason"], json!("wrong_caller"));
    let t = consent_task(run(
        &c,
        &get(&path, &[("x-jwt-payload", &admin)]),
        &mut at_time(2_000),
    ));
    assert_eq!((t.record.as_str(), t.caller.is_none()), ("shared", true));
}

#[test]
fn discovery_statuses_name_the_login_only_where_consent_is_required() {
    let c = consent_config();
    let (mine, team) = (conn_index(&c, "github_mine"), conn_index(&c, "crm_team"));
    let body = r#"{"authenticated":true,"routes":[]}"#;
    let o = discovery_with_statuses(
        &c,
        body,
        &[
            (mine, "connected"),
            (team, "consent_required"),
            (usize::MAX, "connected"),
        ],
    );
    assert_eq!(o.verdict, Verdict::Discovery);
    let r = o.reply.unwrap();
    assert_eq!(r.status, 200);
    let doc: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        doc,
        json!({ "authenticated": true, "routes": [], "connections": [
            { "connection": "github_mine", "status": "connected" },
            { "connection": "crm_team", "status": "consent_required",
              "login_url": "/.latchkey/connections/crm_team/login" }
        ]})
    );
    assert!(r.headers.contains(&("vary", "authorization".to_string())));
    // Something that is not one object is answered as it is.
    let o = discovery_with_statuses(&c, "[]", &[(mine, "connected")]);
    assert_eq!(o.reply.unwrap().body, "[]");
}

#[test]
fn a_route_that_may_exchange_or_key_by_caller_asks_only_when_its_pick_does() {
    // The route can inject a token exchange or a per-user consent, but this caller's
    // pick is the team's API key: no subject token, no caller key is needed.
    let c = parse(json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": { "k": { "inline": "pk-secret" }, "cs": { "inline": "client-secret" },
                     "vt": { "inline": "vault-token" }, "sk": { "inline": "0123456789abcdef0123456789abcdef" } },
        "providers": {
            "keys": { "type": "api_key" },
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                     "authorization_url": "https://idp/authorize",
                     "client_id": "gw", "client_secret": "cs" }
        },
        "token_stores": { "ts": { "vault": { "cluster": "vault", "url": "http://vault:8200", "token": "vt" } } },
        "consent": { "path": "/.latchkey/connections", "redirect_uri": "https://api.test/cb", "state_key": "sk" },
        "connections": {
            "obo": { "provider": "idp", "grant": "token_exchange", "access": { "groups": ["obo"] } },
            "mine": { "provider": "idp", "grant": "authorization_code", "per_user": true, "store": "ts",
                      "access": { "groups": ["consenters"] } },
            "team_key": { "provider": "keys", "api_key": "k", "access": { "groups": ["team"] } }
        },
        "routes": [
            { "name": "mixed", "match": { "path_prefix": "/mixed/" },
              "inject": [ { "connections": ["obo", "mine", "team_key"], "header": "authorization" } ] }
        ]
    }));
    let r = c.routes.iter().find(|r| r.name == "mixed").unwrap();
    assert!(r.binds_caller && r.per_user);
    // A payload without `sub` (no caller key) and no bearer token (no subject).
    let team = b64(&json!({ "iss": "https://issuer", "groups": ["team"] }).to_string());
    let n = needs(run(
        &c,
        &get("/mixed/x", &[("x-jwt-payload", &team)]),
        &mut Host::default(),
    ));
    assert_eq!(n.picks, [conn_index(&c, "team_key")]);
    assert!(n.subject.is_none() && n.caller.is_none());
    // The exchange itself still needs the verified token.
    let obo = b64(&json!({ "iss": "https://issuer", "sub": "o", "groups": ["obo"] }).to_string());
    let o = done(run(
        &c,
        &get("/mixed/x", &[("x-jwt-payload", &obo)]),
        &mut Host::default(),
    ));
    assert_eq!(o.verdict, Verdict::DeniedBadSubject);
    // And the per-user consent a caller key.
    let who = b64(&json!({ "iss": "https://issuer", "groups": ["consenters"] }).to_string());
    let o = done(run(
        &c,
        &get("/mixed/x", &[("x-jwt-payload", &who)]),
        &mut Host::default(),
    ));
    assert_eq!(o.verdict, Verdict::DeniedUnauthenticated);
}

#[test]
fn pseudo_headers_are_the_first_of_each_found_in_one_pass() {
    let headers: Vec<(&str, &[u8])> = vec![
        ("x-path", b"/not"),
        (":method", b"GET"),
        (":path", b"/a"),
        (":method", b"POST"),
        (":authority", b"api.test"),
        (":path", b"/b"),
    ];
    assert_eq!(
        Pseudo::of(&headers),
        Pseudo {
            path: Some(b"/a"),
            method: Some(b"GET"),
            authority: Some(b"api.test"),
        }
    );
    // Whatever is missing stays missing; the rest is still found.
    let headers: Vec<(&str, &[u8])> =
        vec![(":authority", b"h"), ("accept", b"*/*"), (":path", b"/p")];
    assert_eq!(
        Pseudo::of(&headers),
        Pseudo {
            path: Some(b"/p"),
            method: None,
            authority: Some(b"h"),
        }
    );
    assert_eq!(Pseudo::of(&[]), Pseudo::default());
}
