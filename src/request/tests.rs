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
    }
}

fn needs(step: Step) -> Needed {
    match step {
        Step::Needs(n) => n,
        Step::Done(o) => panic!("done: {o:?}"),
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
        },
        Resolved {
            secret: &key,
            default_prefix: "",
        },
    ];
    let sent = ["x-jwt-payload", "x-key", "x-debug"];
    let o = finish(&c, n, &resolved, &sent, b"/partner/x?q=1&api_key=mine");
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
        |e| matches!(e, Edit::Set { name, value } if name == "x-key" && value.expose() == "pk-1")
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
    // Public-only route: claims are never read, even malformed ones.
    let n = needs(run(
        &c,
        &get("/weather/today", &[("x-jwt-payload", "%%%")]),
        &mut host,
    ));
    assert_eq!(c.route(n.route).unwrap().name, "weather");
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
        &[Resolved {
            secret: &key,
            default_prefix: "",
        }],
        &[],
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
        &[Resolved {
            secret: &cluster,
            default_prefix: "",
        }],
        &["x-cluster"],
        b"/mtls/a",
    );
    assert!(o
        .edits
        .iter()
        .any(|e| matches!(e, Edit::Set { name, value } if name == "x-cluster" && value.expose() == "partner_a")));
}
