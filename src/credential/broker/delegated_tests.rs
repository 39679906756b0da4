//! authorization_code connections in the broker (SPEC v1.2), over the in-memory
//! proxy: a fetch reads the stored consent, redeems it and writes a rotated
//! refresh token back before using the token; consent tasks (callback,
//! disconnect) make their calls and end with the request's answer.

use serde_json::Value;

use super::*;
use crate::consent::{caller_key, hash_of_key};
use crate::request::{Task, TaskKind, Verdict};

pub(super) const STATE_KEY: &str = "0123456789abcdef0123456789abcdef";

fn delegated_config() -> Config {
    let v = json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": {
            "cs": { "inline": "client-secret-1" },
            "vt": { "inline": "vault-token-1" },
            "sk": { "inline": STATE_KEY }
        },
        "providers": {
            "gh": { "type": "oauth2", "cluster": "github", "client_id": "gh",
                    "client_secret": "cs", "auth_method": "client_secret_post",
                    "authorization_url": "https://github.example/authorize",
                    "token_url": "https://github.example/token",
                    "revocation_url": "https://github.example/revoke" },
            "plain": { "type": "oauth2", "cluster": "plain", "client_id": "p",
                       "client_secret": "cs", "auth_method": "client_secret_post",
                       "authorization_url": "https://plain.example/authorize",
                       "token_url": "https://plain.example/token" },
            "mi": { "type": "azure_managed_identity", "cluster": "imds" }
        },
        "token_stores": {
            "vault_store": { "vault": { "cluster": "vault", "url": "http://vault:8200", "token": "vt" } },
            "kv_store": { "azure_key_vault": "https://kv.vault.azure.net", "cluster": "keyvault",
                          "identity": "kv_writer", "timeout_ms": 3000 }
        },
        "consent": { "path": "/.latchkey/connections", "redirect_uri": "https://api.test/cb",
                     "state_key": "sk", "return_to": ["https://portal.test/"] },
        "connections": {
            "mine": { "provider": "gh", "grant": "authorization_code", "per_user": true,
                      "scopes": ["repo"], "store": "vault_store", "access": { "authenticated": true } },
            "team": { "provider": "gh", "grant": "authorization_code", "store": "vault_store",
                      "scopes": ["repo", "user"],
                      "consent": { "groups": ["admins"] }, "access": { "authenticated": true } },
            "plain_team": { "provider": "plain", "grant": "authorization_code", "store": "vault_store",
                            "consent": { "groups": ["admins"] }, "access": { "authenticated": true } },
            "kv_team": { "provider": "gh", "grant": "authorization_code", "store": "kv_store",
                         "consent": { "groups": ["admins"] }, "access": { "authenticated": true } },
            "kv_writer": { "provider": "mi", "resource": "https://vault.azure.net" }
        },
        "routes": [
            { "name": "mine", "match": { "path_prefix": "/mine/" },
              "inject": [ { "connections": ["mine"], "header": "authorization" } ] },
            { "name": "team", "match": { "path_prefix": "/team/" },
              "inject": [ { "connections": ["team"], "header": "authorization" } ] }
        ]
    });
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn delegated_setup() -> (Broker<Fake>, Rc<Runtime>) {
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, delegated_config(), "test"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    (b, loaded)
}

/// A KV v2 read of a record.
pub(super) fn kv2(rt: &str, version: u64) -> Vec<u8> {
    json!({ "data": { "data": { "refresh_token": rt, "scopes": "repo", "updated": 1 },
                      "metadata": { "version": version } } })
    .to_string()
    .into_bytes()
}

const CAS_LOST: &[u8] =
    br#"{"errors":["check-and-set parameter did not match the current version"]}"#;

/// The one call made since the last look.
pub(super) fn one_call(b: &Broker<Fake>) -> (u32, HttpCall) {
    let mut calls = b.proxy.take_calls();
    assert_eq!(
        calls.len(),
        1,
        "{:?}",
        calls
            .iter()
            .map(|(_, c)| header(c, ":path"))
            .collect::<Vec<_>>()
    );
    calls.remove(0)
}

fn body_text(call: &HttpCall) -> &str {
    call.body.as_ref().map_or("", |b| b.expose())
}

fn body_json(call: &HttpCall) -> Value {
    serde_json::from_str(body_text(call)).unwrap()
}

pub(super) fn consent_stat(b: &Broker<Fake>, name: &str) -> u64 {
    b.proxy.stat(&format!("latchkey.consent.{name}"))
}

fn rejected(r: Resolution) -> (u64, bool) {
    match r {
        Resolution::Reject {
            retry_after_ms,
            consent_required,
            ..
        } => (retry_after_ms, consent_required),
        Resolution::Ready(_) => panic!("ready"),
        Resolution::Wait { .. } => panic!("waits"),
    }
}

thread_local! {
    /// The consent_reason of the last answer `task_answer` took (the glue counts it).
    static LAST_REASON: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

fn last_reason() -> Option<&'static str> {
    LAST_REASON.with(|r| r.get())
}

/// The one request whose task ended: its id, status and JSON body (or location).
pub(super) fn task_answer(b: &mut Broker<Fake>, now: u64) -> (u32, Verdict, u32, String) {
    let mut done = b.due_waiters(now);
    assert_eq!(done.len(), 1);
    let r = done.remove(0);
    LAST_REASON.with(|c| c.set(r.outcome.consent_reason));
    let reply = r.outcome.reply.unwrap();
    let text = match reply.headers.iter().find(|(k, _)| *k == "location") {
        Some((_, l)) => l.clone(),
        None => reply.body.clone(),
    };
    (r.id, r.outcome.verdict, reply.status, text)
}

pub(super) fn record_path(connection: &str, record: &str) -> String {
    format!("/v1/secret/data/latchkey/connections/{connection}/{record}")
}

// ---- The fetch of a token from a stored consent. ----

#[test]
fn a_rotated_refresh_token_is_written_back_before_the_token_is_used() {
    let (mut b, loaded) = delegated_setup();
    let team = conn(&loaded, "team");
    assert!(waits(
        &b.resolve(&loaded, &[team], Who::default(), 0, true)
            .unwrap()
    ));
    b.dispatch_due(1);
    // The shared record first.
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "vault");
    assert_eq!(header(&call, ":method"), Some("GET"));
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("team", "shared").as_str())
    );
    assert_eq!(call.secret_headers[0].0, "x-vault-token");
    assert_eq!(call.secret_headers[0].1.expose(), "vault-token-1");
    b.on_answer(id, Some(200), Some(kv2("rt-1", 3)), 2);
    // Its refresh token redeemed.
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "github");
    assert_eq!(header(&call, ":path"), Some("/token"));
    assert_eq!(
        body_text(&call),
        "grant_type=refresh_token&refresh_token=rt-1&scope=repo+user&client_id=gh&client_secret=client-secret-1"
    );
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-1", json!({ "refresh_token": "rt-2" }))),
        3_200,
    );
    // The rotated one is written with the version read (compare-and-set)...
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "vault");
    assert_eq!(header(&call, ":method"), Some("POST"));
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("team", "shared").as_str())
    );
    assert_eq!(
        body_json(&call),
        json!({ "options": { "cas": 3 },
                "data": { "refresh_token": "rt-2", "scopes": "repo user", "updated": 3 } })
    );
    assert_eq!(consent_stat(&b, "store_writes"), 1);
    // ... and until it is stored, the token is not used.
    assert!(waits(
        &b.resolve(&loaded, &[team], Who::default(), 3_500, true)
            .unwrap()
    ));
    assert!(b.proxy.take_calls().is_empty());
    b.on_answer(
        id,
        Some(200),
        Some(br#"{"data":{"version":4}}"#.to_vec()),
        4_000,
    );
    let creds = ready(
        b.resolve(&loaded, &[team], Who::default(), 4_001, true)
            .unwrap(),
    );
    assert_eq!(creds[0].secret.expose(), "at-1");
    assert_eq!(b.proxy.stat("latchkey.connection.team.token.requests"), 1);
    assert_eq!(b.proxy.stat("latchkey.connection.team.token.success"), 1);
    assert_eq!(consent_stat(&b, "store_conflicts"), 0);
    // No refresh token nor vault token in any log line.
    assert!(!b.proxy.logs.borrow().iter().any(|(_, m)| {
        m.contains("rt-1")
            || m.contains("rt-2")
            || m.contains("vault-token-1")
            || m.contains("at-1")
    }));
}

#[test]
fn a_refresh_token_that_did_not_rotate_is_not_written() {
    for answer in [json!({}), json!({ "refresh_token": "rt-1" })] {
        let (mut b, loaded) = delegated_setup();
        let team = conn(&loaded, "team");
        let _ = b
            .resolve(&loaded, &[team], Who::default(), 0, true)
            .unwrap();
        b.dispatch_due(1);
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(200), Some(kv2("rt-1", 3)), 2);
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(200), Some(token_answer("at-1", answer.clone())), 3);
        assert!(b.proxy.take_calls().is_empty(), "{answer}");
        let creds = ready(
            b.resolve(&loaded, &[team], Who::default(), 4, true)
                .unwrap(),
        );
        assert_eq!(creds[0].secret.expose(), "at-1");
        assert_eq!(consent_stat(&b, "store_writes"), 0);
    }
}

#[test]
fn a_lost_compare_and_set_reads_the_record_again_twice_at_most() {
    let (mut b, loaded) = delegated_setup();
    let team = conn(&loaded, "team");
    let _ = b
        .resolve(&loaded, &[team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    let (mut id, _) = one_call(&b);
    for round in 0..3u64 {
        let version = 3 + round;
        // The record (first read, then each re-read), its redemption, the write.
        b.on_answer(
            id,
            Some(200),
            Some(kv2(&format!("rt-{round}"), version)),
            10 + round,
        );
        let (tid, call) = one_call(&b);
        assert_eq!(call.cluster, "github");
        assert!(body_text(&call).contains(&format!("refresh_token=rt-{round}&")));
        b.on_answer(
            tid,
            Some(200),
            Some(token_answer(
                "at",
                json!({ "refresh_token": format!("new-{round}") }),
            )),
            20 + round,
        );
        let (wid, call) = one_call(&b);
        assert_eq!(body_json(&call)["options"]["cas"], json!(version));
        // Another proxy rotated first.
        b.on_answer(wid, Some(400), Some(CAS_LOST.to_vec()), 30 + round);
        assert_eq!(consent_stat(&b, "store_conflicts"), round + 1);
        if round < 2 {
            let (rid, call) = one_call(&b);
            assert_eq!(header(&call, ":method"), Some("GET"));
            assert_eq!(
                header(&call, ":path"),
                Some(record_path("team", "shared").as_str())
            );
            id = rid;
        }
    }
    // A third loss: no more reads, a store failure (503, not consent).
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.team.token.failure.token_store"),
        1
    );
    let (_, consent_required) = rejected(
        b.resolve(&loaded, &[team], Who::default(), 40, true)
            .unwrap(),
    );
    assert!(!consent_required);
}

#[test]
fn no_record_or_a_refused_refresh_token_is_consent_required() {
    // Nothing stored (404), a deleted latest version, an empty record, invalid_grant.
    let record_answers: [(u32, Vec<u8>); 3] = [
        (404, br#"{"errors":[]}"#.to_vec()),
        (
            200,
            json!({ "data": { "data": null, "metadata": { "version": 2 } } })
                .to_string()
                .into_bytes(),
        ),
        (
            200,
            json!({ "data": { "data": {}, "metadata": { "version": 2 } } })
                .to_string()
                .into_bytes(),
        ),
    ];
    for (status, body) in record_answers {
        let (mut b, loaded) = delegated_setup();
        let team = conn(&loaded, "team");
        let _ = b
            .resolve(&loaded, &[team], Who::default(), 0, true)
            .unwrap();
        b.dispatch_due(1);
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(status), Some(body), 2);
        assert!(b.proxy.take_calls().is_empty(), "no redemption");
        // Nobody consented: the caller is told; not the gateway's failure to warn of.
        let levels: Vec<Level> = b
            .proxy
            .logs
            .borrow()
            .iter()
            .filter(|(_, m)| m.contains("token fetch failed: consent_required"))
            .map(|(l, _)| *l)
            .collect();
        assert_eq!(levels, [Level::Debug]);
        assert_eq!(
            rejected(
                b.resolve(&loaded, &[team], Who::default(), 3, true)
                    .unwrap()
            ),
            (1999, true)
        );
        assert_eq!(
            b.proxy
                .stat("latchkey.connection.team.token.failure.consent_required"),
            1
        );
        // Not counted as a backoff rejection.
        assert_eq!(
            b.proxy
                .stat("latchkey.connection.team.token.backoff_rejected"),
            0
        );
    }
    let (mut b, loaded) = delegated_setup();
    let team = conn(&loaded, "team");
    let _ = b
        .resolve(&loaded, &[team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-1", 3)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(400),
        Some(br#"{"error":"invalid_grant"}"#.to_vec()),
        3,
    );
    assert!(b.proxy.take_calls().is_empty(), "nothing written");
    assert!(b.proxy.logged(
        "connection team: the stored refresh token was refused (invalid_grant): consent required"
    ));
    assert_eq!(
        rejected(
            b.resolve(&loaded, &[team], Who::default(), 4, true)
                .unwrap()
        ),
        (1999, true)
    );
    // Remembered for NO_CONSENT_RECHECK_MS, then the store is read again.
    assert!(waits(
        &b.resolve(&loaded, &[team], Who::default(), 3 + 2000, true)
            .unwrap()
    ));
    b.dispatch_due(2004);
    let (_, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("team", "shared").as_str())
    );
}

#[test]
fn other_failures_are_unavailable_not_consent() {
    // The token server refuses the client, the store fails, the server is down.
    let cases: [(bool, u32, &[u8], &str); 3] = [
        (false, 401, br#"{"error":"invalid_client"}"#, "oauth_error"),
        (true, 500, b"", "token_store"),
        (false, 503, b"", "status"),
    ];
    for (at_store, status, body, kind) in cases {
        let (mut b, loaded) = delegated_setup();
        let team = conn(&loaded, "team");
        let _ = b
            .resolve(&loaded, &[team], Who::default(), 0, true)
            .unwrap();
        b.dispatch_due(1);
        let (id, _) = one_call(&b);
        if at_store {
            b.on_answer(id, Some(status), Some(body.to_vec()), 2);
        } else {
            b.on_answer(id, Some(200), Some(kv2("rt-1", 3)), 2);
            let (id, _) = one_call(&b);
            b.on_answer(id, Some(status), Some(body.to_vec()), 3);
        }
        let (_, consent_required) = rejected(
            b.resolve(&loaded, &[team], Who::default(), 4, true)
                .unwrap(),
        );
        assert!(!consent_required, "{kind}");
        assert_eq!(
            b.proxy
                .stat("latchkey.connection.team.token.backoff_rejected"),
            1
        );
        assert_eq!(
            b.proxy
                .logged("connection team: token store vault_store read failed"),
            at_store
        );
        assert_eq!(
            b.proxy
                .stat(&format!("latchkey.connection.team.token.failure.{kind}")),
            1,
            "{kind}"
        );
    }
    // A failed write of a rotated token: the token is not used.
    let (mut b, loaded) = delegated_setup();
    let team = conn(&loaded, "team");
    let _ = b
        .resolve(&loaded, &[team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-1", 3)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-1", json!({ "refresh_token": "rt-2" }))),
        3,
    );
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(500), Some(b"{}".to_vec()), 4);
    assert!(b
        .proxy
        .logged("connection team: can't store the rotated refresh token in vault_store"));
    let (_, consent_required) = rejected(
        b.resolve(&loaded, &[team], Who::default(), 5, true)
            .unwrap(),
    );
    assert!(!consent_required);
}

#[test]
fn a_per_user_fetch_reads_the_caller_s_own_record() {
    let (mut b, loaded) = delegated_setup();
    let mine = conn(&loaded, "mine");
    let alice = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let bob = Secret::new(caller_key("https://issuer", "bob").unwrap());
    assert!(waits(
        &b.resolve(&loaded, &[mine], who(&alice), 0, true).unwrap()
    ));
    b.dispatch_due(1);
    let (id, call) = one_call(&b);
    let alice_record = hash_of_key(alice.expose());
    assert_eq!(
        alice_record,
        crate::consent::caller_hash("https://issuer", "alice")
    );
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &alice_record).as_str())
    );
    b.on_answer(id, Some(200), Some(kv2("rt-a", 1)), 2);
    let (id, call) = one_call(&b);
    assert!(body_text(&call).starts_with("grant_type=refresh_token&refresh_token=rt-a&scope=repo&"));
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-a", json!({ "refresh_token": "rt-a2" }))),
        3,
    );
    let (id, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &alice_record).as_str())
    );
    assert_eq!(body_json(&call)["data"]["refresh_token"], json!("rt-a2"));
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 4);
    assert_eq!(
        ready(b.resolve(&loaded, &[mine], who(&alice), 5, true).unwrap())[0]
            .secret
            .expose(),
        "at-a"
    );
    // Bob has a cache entry and a record of his own: no consent stored for him.
    assert!(waits(
        &b.resolve(&loaded, &[mine], who(&bob), 6, true).unwrap()
    ));
    b.dispatch_due(7);
    let (id, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &hash_of_key(bob.expose())).as_str())
    );
    b.on_answer(id, Some(404), Some(b"{}".to_vec()), 8);
    assert!(rejected(b.resolve(&loaded, &[mine], who(&bob), 9, true).unwrap()).1);
    // Alice still has hers.
    assert_eq!(
        ready(b.resolve(&loaded, &[mine], who(&alice), 10, true).unwrap())[0]
            .secret
            .expose(),
        "at-a"
    );
    // The raw caller never reaches a store path or a log.
    assert!(!b
        .proxy
        .logs
        .borrow()
        .iter()
        .any(|(_, m)| m.contains("alice") || m.contains("bob")));
}

/// A per-user request's caller.
fn who(caller: &Secret) -> Who<'_> {
    Who {
        subject: None,
        caller: Some(caller),
    }
}

#[test]
fn a_paused_request_without_consent_is_told_where_to_sign_in() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let mine = conn(&loaded, "mine");
    let key = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let needed = Needed {
        route: 0,
        picks: vec![mine],
        subject: None,
        caller: Some(key.clone()),
        edits: Vec::new(),
    };
    let (deadline, keys) = keys_of(
        b.resolve(&loaded, &[mine], Who::of(&needed), 0, true)
            .unwrap(),
    );
    b.wait(
        5,
        Waiter {
            loaded: loaded.clone(),
            needed,
            deadline_ms: deadline,
            sent: Vec::new(),
            path: b"/mine/x".to_vec(),
            keys,
            seen: Vec::new(),
        },
    );
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(404), Some(Vec::new()), 2);
    let resumed = b.due_waiters(3);
    assert_eq!(resumed.len(), 1);
    let o = &resumed[0].outcome;
    assert_eq!(o.verdict, Verdict::ConsentRequired);
    let reply = o.reply.as_ref().unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.body,
        r#"{"error":"consent_required","route":"mine","connection":"mine","login_url":"/.latchkey/connections/mine/login"}"#
    );
}

#[test]
fn a_key_vault_record_is_written_then_read_back() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let kv_team = conn(&loaded, "kv_team");
    assert!(waits(
        &b.resolve(&loaded, &[kv_team], Who::default(), 0, true)
            .unwrap()
    ));
    // First the identity's token: the read waits for it.
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "imds");
    b.on_answer(id, Some(200), Some(token_answer("kv-token", json!({}))), 3);
    b.dispatch_due(4);
    let (id, call) = one_call(&b);
    let path = "/secrets/latchkey-connections-kv-uteam-shared?api-version=7.4";
    assert_eq!(
        (
            call.cluster.as_str(),
            header(&call, ":method"),
            header(&call, ":path")
        ),
        ("keyvault", Some("GET"), Some(path))
    );
    assert_eq!(call.secret_headers[0].1.expose(), "Bearer kv-token");
    let kv_value = |rt: &str| {
        json!({ "value": json!({ "refresh_token": rt }).to_string() })
            .to_string()
            .into_bytes()
    };
    b.on_answer(id, Some(200), Some(kv_value("rt-1")), 5);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-1", json!({ "refresh_token": "rt-2" }))),
        6,
    );
    // No compare-and-set: a PUT, then the value read back.
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("PUT"), Some(path))
    );
    let written: Value = serde_json::from_str(body_json(&call)["value"].as_str().unwrap()).unwrap();
    assert_eq!(written["refresh_token"], json!("rt-2"));
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 7);
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("GET"), Some(path))
    );
    assert!(waits(
        &b.resolve(&loaded, &[kv_team], Who::default(), 8, true)
            .unwrap()
    ));
    // Another proxy wrote after this one: its refresh token is the current one.
    b.on_answer(id, Some(200), Some(kv_value("rt-other")), 9);
    assert_eq!(consent_stat(&b, "store_conflicts"), 1);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "github");
    assert!(body_text(&call).contains("refresh_token=rt-other&"));
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-2", json!({ "refresh_token": "rt-3" }))),
        10,
    );
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 11);
    let (id, _) = one_call(&b);
    // Read back as written: installed.
    b.on_answer(id, Some(200), Some(kv_value("rt-3")), 12);
    assert_eq!(
        ready(
            b.resolve(&loaded, &[kv_team], Who::default(), 13, true)
                .unwrap()
        )[0]
        .secret
        .expose(),
        "at-2"
    );
}

// ---- Consent tasks. ----

pub(super) fn connect_task(
    loaded: &Runtime,
    connection: &str,
    nonce: &str,
    return_to: Option<&str>,
) -> Task {
    let c = conn(loaded, connection);
    let per_user = crate::consent::is_per_user(&loaded.config.connections[c]);
    let key = caller_key("https://issuer", "alice").unwrap();
    Task {
        connection: c,
        record: if per_user {
            hash_of_key(&key)
        } else {
            "shared".into()
        },
        caller: per_user.then(|| Secret::new(key)),
        kind: TaskKind::Connect {
            code: Secret::new("code-1"),
            verifier: Secret::new("verifier-1"),
            return_to: return_to.map(str::to_string),
            nonce: nonce.into(),
            expires_ms: 600_000,
        },
    }
}

#[test]
fn a_callback_redeems_the_code_and_stores_the_refresh_token_once() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let mine = conn(&loaded, "mine");
    let key = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let record = hash_of_key(key.expose());
    let who = Who {
        subject: None,
        caller: Some(&key),
    };
    // Before: no consent (remembered).
    let _ = b.resolve(&loaded, &[mine], who, 0, true).unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(404), Some(Vec::new()), 2);
    assert!(rejected(b.resolve(&loaded, &[mine], who, 3, true).unwrap()).1);

    let generation = b.proxy.shared_get(COPY_GENERATION).unwrap();
    b.start_task(
        &loaded,
        42,
        connect_task(&loaded, "mine", "n-1", Some("https://portal.test/done")),
        10,
    );
    assert_eq!(b.wanted_tick_ms(), KICK_MS);
    b.dispatch_due(11);
    // The code, with its PKCE verifier and the redirect URI; no scope.
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "github");
    assert_eq!(header(&call, ":path"), Some("/token"));
    assert_eq!(
        body_text(&call),
        "grant_type=authorization_code&code=code-1&redirect_uri=https%3A%2F%2Fapi.test%2Fcb&code_verifier=verifier-1&client_id=gh&client_secret=client-secret-1"
    );
    assert!(b.awaits(id));
    assert_eq!(consent_stat(&b, "redemptions"), 1);
    assert!(b.due_waiters(12).is_empty());
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-x", json!({ "refresh_token": "rt-new" }))),
        12,
    );
    // The record's version, to write over it.
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("GET"), Some(record_path("mine", &record).as_str()))
    );
    b.on_answer(id, Some(200), Some(kv2("rt-old", 6)), 13);
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("POST"), Some(record_path("mine", &record).as_str()))
    );
    assert_eq!(
        body_json(&call),
        json!({ "options": { "cas": 6 },
                "data": { "refresh_token": "rt-new", "scopes": "repo", "updated": 0 } })
    );
    assert!(b.due_waiters(14).is_empty());
    b.on_answer(id, Some(204), Some(Vec::new()), 14);
    assert_eq!(
        task_answer(&mut b, 15),
        (
            42,
            Verdict::ConsentConnected,
            302,
            "https://portal.test/done".to_string()
        )
    );
    assert_eq!(consent_stat(&b, "completed"), 1);
    assert_eq!(consent_stat(&b, "store_writes"), 1);
    assert!(b.proxy.logged("connection mine: consent stored"));
    // Every worker drops its copies before a request uses one again.
    assert_ne!(b.proxy.shared_get(COPY_GENERATION).unwrap(), generation);
    assert!(!b.awaits(id));
    assert_eq!(b.wanted_tick_ms(), IDLE_MS);
    // The "no consent" this proxy remembered is gone: the next request reads the store.
    assert!(waits(&b.resolve(&loaded, &[mine], who, 16, true).unwrap()));
    b.dispatch_due(17);
    let (_, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &record).as_str())
    );

    // The same state again (a replayed callback): nothing redeemed.
    b.start_task(&loaded, 43, connect_task(&loaded, "mine", "n-1", None), 20);
    b.dispatch_due(21);
    assert!(b.proxy.take_calls().is_empty());
    let (id, verdict, status, body) = task_answer(&mut b, 22);
    assert_eq!((id, verdict, status), (43, Verdict::ConsentFailed, 400));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({ "error": "consent_failed", "reason": "state_replayed", "connection": "mine" })
    );
    assert_eq!(last_reason(), Some("state_replayed"));
    // Another worker of the proxy knows it too.
    let mut other = Broker::new(b.proxy.clone());
    other.start_task(&loaded, 44, connect_task(&loaded, "mine", "n-1", None), 30);
    other.dispatch_due(31);
    assert!(other.proxy.take_calls().is_empty());
    assert_eq!(task_answer(&mut other, 32).2, 400);
    // A new state is fine; without return_to the answer is JSON.
    b.start_task(&loaded, 45, connect_task(&loaded, "team", "n-2", None), 40);
    b.dispatch_due(41);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at", json!({ "refresh_token": "rt-t" }))),
        42,
    );
    let (id, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("team", "shared").as_str())
    );
    // Never consented: version 0.
    b.on_answer(id, Some(404), Some(br#"{"errors":[]}"#.to_vec()), 43);
    let (id, call) = one_call(&b);
    assert_eq!(body_json(&call)["options"], json!({ "cas": 0 }));
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 44);
    let (id, verdict, status, body) = task_answer(&mut b, 45);
    assert_eq!((id, verdict, status), (45, Verdict::ConsentConnected, 200));
    assert_eq!(body, r#"{"connected":"team"}"#);
}

/// Runs a connect task of `connection` up to its answer, with the token
/// server's and the store's answers given.
fn connect_with(
    token: (u32, Vec<u8>),
    version: Option<(u32, Vec<u8>)>,
    write: Option<(u32, Vec<u8>)>,
) -> (Broker<Fake>, (u32, Verdict, u32, Value)) {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.start_task(&loaded, 7, connect_task(&loaded, "team", "n-9", None), 0);
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(token.0), Some(token.1), 2);
    if let Some((status, body)) = version {
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(status), Some(body), 3);
    }
    if let Some((status, body)) = write {
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(status), Some(body), 4);
    }
    assert!(b.proxy.take_calls().is_empty());
    let mut done = b.due_waiters(5);
    assert_eq!(done.len(), 1);
    let r = done.remove(0);
    LAST_REASON.with(|c| c.set(r.outcome.consent_reason));
    let reply = r.outcome.reply.unwrap();
    let retry_after = reply
        .headers
        .iter()
        .any(|(k, v)| *k == "retry-after" && v == "1");
    let body: Value = serde_json::from_str(&reply.body).unwrap();
    // A retry of the same callback can work only when its code wasn't spent.
    assert_eq!(
        retry_after,
        reply.status == 503 && body.get("retry").is_none()
    );
    (b, (r.id, r.outcome.verdict, reply.status, body))
}

fn failure(status: u32, reason: &str) -> (u32, Verdict, u32, Value) {
    (
        7,
        Verdict::ConsentFailed,
        status,
        json!({ "error": "consent_failed", "reason": reason, "connection": "team" }),
    )
}

/// A callback whose code was spent: start again at the login.
fn lost(status: u32, reason: &str) -> (u32, Verdict, u32, Value) {
    (
        7,
        Verdict::ConsentFailed,
        status,
        json!({ "error": "consent_failed", "reason": reason, "connection": "team", "retry": "login" }),
    )
}

#[test]
fn a_callback_that_cannot_finish_says_why() {
    let ok_token = || (200, token_answer("at", json!({ "refresh_token": "rt-1" })));
    // The code refused (expired, used, wrong verifier): 400.
    let (b, answer) = connect_with((400, br#"{"error":"invalid_grant"}"#.to_vec()), None, None);
    assert_eq!(answer, failure(400, "code_rejected"));
    assert_eq!(last_reason(), Some("code_rejected"));
    assert!(b
        .proxy
        .logged("connection team: consent: the code was refused (invalid_grant)"));
    // The token server down or broken: 503.
    let (_, answer) = connect_with((500, b"oops".to_vec()), None, None);
    assert_eq!(answer, failure(503, "token_server"));
    assert_eq!(last_reason(), Some("token_server"));
    let (_, answer) = connect_with(
        (
            503,
            b"upstream connect error or disconnect/reset before headers".to_vec(),
        ),
        None,
        None,
    );
    assert_eq!(answer, failure(503, "token_server"));
    // An OAuth error on a 5xx is the server's trouble, not the code's.
    let (_, answer) = connect_with(
        (503, br#"{"error":"temporarily_unavailable"}"#.to_vec()),
        None,
        None,
    );
    assert_eq!(answer, failure(503, "token_server"));
    // The gateway's own client refused: its configuration, not the person's code.
    let (b, answer) = connect_with((401, br#"{"error":"invalid_client"}"#.to_vec()), None, None);
    assert_eq!(answer, failure(502, "token_server"));
    assert!(b
        .proxy
        .logged("refused the gateway's client (invalid_client)"));
    // A token but no refresh token: nothing to keep, and the code is spent.
    let (_, answer) = connect_with((200, token_answer("at", json!({}))), None, None);
    assert_eq!(answer, lost(502, "no_refresh_token"));
    assert_eq!(last_reason(), Some("no_refresh_token"));
    // The store's version read fails.
    let (_, answer) = connect_with(ok_token(), Some((500, Vec::new())), None);
    assert_eq!(answer, lost(503, "token_store"));
    // The write fails, or another writer came first.
    let (b, answer) = connect_with(
        ok_token(),
        Some((200, kv2("old", 1))),
        Some((503, Vec::new())),
    );
    assert_eq!(answer, lost(503, "token_store"));
    assert_eq!(last_reason(), Some("token_store"));
    assert_eq!(consent_stat(&b, "completed"), 0);
    let (b, answer) = connect_with(
        ok_token(),
        Some((200, kv2("old", 1))),
        Some((400, CAS_LOST.to_vec())),
    );
    assert_eq!(answer, lost(503, "store_conflict"));
    assert_eq!(last_reason(), Some("store_conflict"));
    assert_eq!(consent_stat(&b, "store_conflicts"), 1);
    assert_eq!(consent_stat(&b, "completed"), 0);
    // No secret in any answer or log line.
    assert!(!b.proxy.logs.borrow().iter().any(|(_, m)| {
        m.contains("code-1")
            || m.contains("verifier-1")
            || m.contains("rt-1")
            || m.contains("client-secret-1")
    }));
}

#[test]
fn a_callback_whose_call_cannot_be_made_fails_at_once() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.proxy.refuse_dispatch.set(true);
    b.start_task(&loaded, 7, connect_task(&loaded, "team", "n-1", None), 0);
    b.dispatch_due(1);
    let (id, verdict, status, _) = task_answer(&mut b, 2);
    assert_eq!((id, verdict, status), (7, Verdict::ConsentFailed, 503));
    assert_eq!(last_reason(), Some("token_server"));
    assert!(b.proxy.logged("consent: can't call cluster \"github\""));
    b.start_task(&loaded, 8, disconnect_task(&loaded, "team"), 0);
    b.dispatch_due(3);
    let (_, _, status, body) = task_answer(&mut b, 4);
    assert_eq!(status, 503);
    assert!(body.contains(r#""reason":"token_store""#));
}

pub(super) fn disconnect_task(loaded: &Runtime, connection: &str) -> Task {
    let c = conn(loaded, connection);
    let per_user = crate::consent::is_per_user(&loaded.config.connections[c]);
    let key = caller_key("https://issuer", "alice").unwrap();
    Task {
        connection: c,
        record: if per_user {
            hash_of_key(&key)
        } else {
            "shared".into()
        },
        caller: per_user.then(|| Secret::new(key)),
        kind: TaskKind::Disconnect,
    }
}

#[test]
fn a_disconnect_removes_the_record_revokes_it_and_drops_the_token() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let team = conn(&loaded, "team");
    // A token in use.
    let _ = b
        .resolve(&loaded, &[team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 3);
    ready(
        b.resolve(&loaded, &[team], Who::default(), 4, true)
            .unwrap(),
    );
    assert!(loaded.has_token_copy(team));
    let generation = b.proxy.shared_get(COPY_GENERATION).unwrap();

    b.start_task(&loaded, 9, disconnect_task(&loaded, "team"), 10);
    b.dispatch_due(11);
    // The record is read for its refresh token...
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("GET"), Some(record_path("team", "shared").as_str()))
    );
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 12);
    // ... removed, every version...
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "vault");
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (
            Some("DELETE"),
            Some("/v1/secret/metadata/latchkey/connections/team/shared")
        )
    );
    assert!(b.due_waiters(13).is_empty());
    b.on_answer(id, Some(204), Some(Vec::new()), 13);
    // ... and revoked at the provider (RFC 7009).
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "github");
    assert_eq!(
        (
            header(&call, ":method"),
            header(&call, ":path"),
            header(&call, ":authority")
        ),
        (Some("POST"), Some("/revoke"), Some("github.example"))
    );
    assert_eq!(
        body_text(&call),
        "token=rt-9&token_type_hint=refresh_token&client_id=gh&client_secret=client-secret-1"
    );
    assert_eq!(consent_stat(&b, "disconnects"), 1);
    b.on_answer(id, Some(200), Some(Vec::new()), 14);
    let (id, verdict, status, body) = task_answer(&mut b, 15);
    assert_eq!(
        (id, verdict, status),
        (9, Verdict::ConsentDisconnected, 200)
    );
    assert_eq!(body, r#"{"disconnected":"team","revoked":true}"#);
    assert_eq!(consent_stat(&b, "revocations"), 1);
    // The token is gone on this proxy, and every worker's copy with it.
    assert_ne!(b.proxy.shared_get(COPY_GENERATION).unwrap(), generation);
    assert!(!loaded.has_token_copy(team));
    assert!(waits(
        &b.resolve(&loaded, &[team], Who::default(), 16, true)
            .unwrap()
    ));
}

#[test]
fn a_disconnect_without_record_or_revocation_still_answers() {
    // No record: removed anyway, nothing to revoke.
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.start_task(&loaded, 1, disconnect_task(&loaded, "mine"), 0);
    b.dispatch_due(1);
    let key = caller_key("https://issuer", "alice").unwrap();
    let (id, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &hash_of_key(&key)).as_str())
    );
    b.on_answer(id, Some(404), Some(Vec::new()), 2);
    let (id, call) = one_call(&b);
    assert_eq!(header(&call, ":method"), Some("DELETE"));
    b.on_answer(id, Some(404), Some(Vec::new()), 3);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        task_answer(&mut b, 4),
        (
            1,
            Verdict::ConsentDisconnected,
            200,
            r#"{"disconnected":"mine","revoked":false}"#.to_string()
        )
    );
    // A provider without revocation_url: no call.
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.start_task(&loaded, 2, disconnect_task(&loaded, "plain_team"), 0);
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(204), Some(Vec::new()), 3);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        task_answer(&mut b, 4).3,
        r#"{"disconnected":"plain_team","revoked":false}"#
    );
    // Revocation refused: the record is gone all the same.
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.start_task(&loaded, 3, disconnect_task(&loaded, "team"), 0);
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(204), Some(Vec::new()), 3);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(503), Some(Vec::new()), 4);
    assert_eq!(
        task_answer(&mut b, 5).3,
        r#"{"disconnected":"team","revoked":false}"#
    );
    assert_eq!(consent_stat(&b, "revocations"), 0);
    assert!(b
        .proxy
        .logged("disconnect: revocation answered Some(503); the record is removed"));
    // The store fails: 503, nothing revoked.
    for read_fails in [true, false] {
        let (mut b, loaded) = delegated_setup();
        b.prefetch_due = false;
        b.start_task(&loaded, 4, disconnect_task(&loaded, "team"), 0);
        b.dispatch_due(1);
        let (id, _) = one_call(&b);
        if read_fails {
            b.on_answer(id, Some(500), Some(Vec::new()), 2);
        } else {
            b.on_answer(id, Some(200), Some(kv2("rt", 1)), 2);
            let (id, _) = one_call(&b);
            b.on_answer(id, Some(500), Some(Vec::new()), 3);
        }
        assert!(b.proxy.take_calls().is_empty());
        let (_, verdict, status, body) = task_answer(&mut b, 5);
        assert_eq!((verdict, status), (Verdict::ConsentFailed, 503));
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({ "error": "consent_failed", "reason": "token_store", "connection": "team" })
        );
        assert_eq!(consent_stat(&b, "disconnects"), 0);
    }
}

fn kv_value(rt: &str) -> Vec<u8> {
    json!({ "value": json!({ "refresh_token": rt }).to_string() })
        .to_string()
        .into_bytes()
}

/// A Key Vault fetch of `kv_team` up to its first read, the identity token in hand.
fn kv_fetch_started() -> (Broker<Fake>, Rc<Runtime>, u32) {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let kv_team = conn(&loaded, "kv_team");
    let _ = b
        .resolve(&loaded, &[kv_team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(token_answer("kv-token", json!({}))), 3);
    b.dispatch_due(4);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "keyvault");
    (b, loaded, id)
}

#[test]
fn a_key_vault_read_back_is_followed_twice_at_most() {
    let (mut b, loaded, mut id) = kv_fetch_started();
    let kv_team = conn(&loaded, "kv_team");
    b.on_answer(id, Some(200), Some(kv_value("rt-0")), 5);
    for round in 0..3u64 {
        let (tid, call) = one_call(&b);
        assert!(body_text(&call).contains(&format!("refresh_token=rt-{round}&")));
        b.on_answer(
            tid,
            Some(200),
            Some(token_answer(
                "at",
                json!({ "refresh_token": format!("mine-{round}") }),
            )),
            6,
        );
        let (wid, _) = one_call(&b);
        b.on_answer(wid, Some(200), Some(b"{}".to_vec()), 7);
        let (rid, _) = one_call(&b);
        id = rid;
        // Someone else's value each time.
        b.on_answer(
            id,
            Some(200),
            Some(kv_value(&format!("rt-{}", round + 1))),
            8,
        );
    }
    assert_eq!(consent_stat(&b, "store_conflicts"), 2);
    assert!(b.proxy.take_calls().is_empty());
    assert!(
        !rejected(
            b.resolve(&loaded, &[kv_team], Who::default(), 9, true)
                .unwrap()
        )
        .1
    );
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_team.token.failure.token_store"),
        1
    );
}

#[test]
fn a_key_vault_read_back_that_fails_keeps_the_token_and_one_that_finds_nothing_does_not() {
    for (status, body, installed) in [(500, Vec::new(), true), (404, Vec::new(), false)] {
        let (mut b, loaded, id) = kv_fetch_started();
        let kv_team = conn(&loaded, "kv_team");
        b.on_answer(id, Some(200), Some(kv_value("rt-0")), 5);
        let (id, _) = one_call(&b);
        b.on_answer(
            id,
            Some(200),
            Some(token_answer("at-1", json!({ "refresh_token": "rt-1" }))),
            6,
        );
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(200), Some(b"{}".to_vec()), 7);
        let (id, _) = one_call(&b);
        b.on_answer(id, Some(status), Some(body), 8);
        let r = b
            .resolve(&loaded, &[kv_team], Who::default(), 9, true)
            .unwrap();
        if installed {
            // Written, not read back: the token is good.
            assert_eq!(ready(r)[0].secret.expose(), "at-1");
        } else {
            // Disconnected meanwhile.
            assert!(rejected(r).1);
        }
    }
}

#[test]
fn a_key_vault_callback_waits_for_the_identity_token_then_writes_without_compare_and_set() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    b.start_task(&loaded, 3, connect_task(&loaded, "kv_team", "n-1", None), 0);
    // The identity's token first: the task waits (nothing redeemed yet).
    b.dispatch_due(1);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(b.wanted_tick_ms(), KICK_MS);
    b.dispatch_due(2);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "imds");
    assert!(b.due_waiters(3).is_empty());
    b.on_answer(id, Some(200), Some(token_answer("kv-token", json!({}))), 3);
    b.dispatch_due(4);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "github");
    assert!(body_text(&call).starts_with("grant_type=authorization_code&code=code-1&"));
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at", json!({ "refresh_token": "rt-1" }))),
        5,
    );
    let path = "/secrets/latchkey-connections-kv-uteam-shared?api-version=7.4";
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("GET"), Some(path))
    );
    assert_eq!(call.secret_headers[0].1.expose(), "Bearer kv-token");
    // Key Vault answers 404 for a name never written.
    b.on_answer(id, Some(404), Some(Vec::new()), 6);
    let (id, call) = one_call(&b);
    assert_eq!(
        (header(&call, ":method"), header(&call, ":path")),
        (Some("PUT"), Some(path))
    );
    let value: Value = serde_json::from_str(body_json(&call)["value"].as_str().unwrap()).unwrap();
    assert_eq!(value["refresh_token"], json!("rt-1"));
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 7);
    assert_eq!(
        task_answer(&mut b, 8),
        (
            3,
            Verdict::ConsentConnected,
            200,
            r#"{"connected":"kv_team"}"#.to_string()
        )
    );
}

#[test]
fn a_task_gives_up_on_the_identity_token_after_the_longest_store_timeout() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    // Stores time out after 5000 (Vault's default) and 3000 ms: the task waits 5000.
    b.start_task(
        &loaded,
        3,
        connect_task(&loaded, "kv_team", "n-1", None),
        100,
    );
    b.dispatch_due(101);
    b.dispatch_due(102);
    let (_, call) = one_call(&b);
    assert_eq!(call.cluster, "imds");
    b.dispatch_due(5_099);
    assert!(b.due_waiters(5_099).is_empty());
    b.dispatch_due(5_100);
    let (id, verdict, status, body) = task_answer(&mut b, 5_100);
    assert_eq!((id, verdict, status), (3, Verdict::ConsentFailed, 503));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({ "error": "consent_failed", "reason": "token_store", "connection": "kv_team" })
    );
    assert!(b.proxy.take_calls().is_empty());
}

#[test]
fn a_per_user_disconnect_drops_the_caller_s_token_on_this_proxy() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let mine = conn(&loaded, "mine");
    let key = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let _ = b.resolve(&loaded, &[mine], who(&key), 0, true).unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-a", 1)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(token_answer("at-a", json!({}))), 3);
    assert_eq!(
        ready(b.resolve(&loaded, &[mine], who(&key), 4, true).unwrap())[0]
            .secret
            .expose(),
        "at-a"
    );
    assert!(loaded.has_caller_copy(mine, key.expose()));
    b.start_task(&loaded, 1, disconnect_task(&loaded, "mine"), 10);
    b.dispatch_due(11);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-a", 1)), 12);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(204), Some(Vec::new()), 13);
    let (id, call) = one_call(&b);
    assert!(body_text(&call).starts_with("token=rt-a&token_type_hint=refresh_token&"));
    b.on_answer(id, Some(200), Some(Vec::new()), 14);
    assert_eq!(task_answer(&mut b, 15).2, 200);
    assert!(!loaded.has_caller_copy(mine, key.expose()));
    // The next request reads the store again (and finds nothing).
    assert!(waits(
        &b.resolve(&loaded, &[mine], who(&key), 16, true).unwrap()
    ));
    b.dispatch_due(17);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(404), Some(Vec::new()), 18);
    assert!(rejected(b.resolve(&loaded, &[mine], who(&key), 19, true).unwrap()).1);
}

#[test]
fn no_identity_token_for_the_key_vault_is_a_store_failure() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let kv_team = conn(&loaded, "kv_team");
    let _ = b
        .resolve(&loaded, &[kv_team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, call) = one_call(&b);
    assert_eq!(call.cluster, "imds");
    b.on_answer(id, Some(500), Some(Vec::new()), 3);
    b.dispatch_due(4);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_team.token.failure.token_store"),
        1
    );
    assert!(
        !rejected(
            b.resolve(&loaded, &[kv_team], Who::default(), 5, true)
                .unwrap()
        )
        .1
    );
}

#[test]
fn a_per_user_token_is_served_from_this_vm_s_copy_until_a_consent_changes() {
    let (mut b, loaded) = delegated_setup();
    let mine = conn(&loaded, "mine");
    let alice = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let bob = Secret::new(caller_key("https://issuer", "bob").unwrap());
    assert!(waits(
        &b.resolve(&loaded, &[mine], who(&alice), 0, true).unwrap()
    ));
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-a", 1)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(token_answer("at-a", json!({}))), 3);
    // The first look copies it; then no shared-data read and no clock at all.
    ready(b.resolve(&loaded, &[mine], who(&alice), 4, true).unwrap());
    assert!(loaded.has_caller_copy(mine, alice.expose()));
    assert!(!loaded.has_caller_copy(mine, bob.expose()));
    let reads = b.proxy.gets.get();
    let clock = std::cell::Cell::new(0);
    let mut tick = || {
        clock.set(clock.get() + 1);
        Ok(5)
    };
    let creds = ready(
        b.resolve_with(&loaded, &[mine], who(&alice), &mut tick, true)
            .unwrap(),
    );
    assert_eq!(creds[0].secret.expose(), "at-a");
    assert_eq!(clock.get(), 0);
    // One read: the copy generation, nothing else.
    assert_eq!(b.proxy.gets.get(), reads + 1);
    // Well before its refresh point the copy stays; past it the tick drops it.
    loaded.trim_caller_copies(6, 3000);
    assert!(loaded.has_caller_copy(mine, alice.expose()));
    loaded.trim_caller_copies(10_000_000, 3000);
    assert!(!loaded.has_caller_copy(mine, alice.expose()));
}

#[test]
fn caller_copies_are_bounded_per_connection_and_replaced_in_place() {
    let (_, loaded) = delegated_setup();
    let mine = conn(&loaded, "mine");
    let token = |id: u64| Cached::new(format!("at-{id}"), id, 600_000, 0, &Policy::new(5000, 5000));
    for i in 0..crate::runtime::MAX_CALLER_COPIES {
        loaded.set_caller_copy(mine, &format!("k{i}"), Some(token(i as u64)));
    }
    let len = |l: &Runtime| l.caller_copies.borrow()[mine].len();
    assert_eq!(len(&loaded), crate::runtime::MAX_CALLER_COPIES);
    // A caller already held is replaced, nothing evicted.
    loaded.set_caller_copy(mine, "k7", Some(token(7_000)));
    assert_eq!(len(&loaded), crate::runtime::MAX_CALLER_COPIES);
    assert_eq!(
        loaded.caller_copy(mine, "k7").unwrap().cached.token,
        "at-7000"
    );
    assert!(loaded.has_caller_copy(mine, "k0") && loaded.has_caller_copy(mine, "k1"));
    // A new one evicts exactly one.
    loaded.set_caller_copy(mine, "new", Some(token(9)));
    assert_eq!(len(&loaded), crate::runtime::MAX_CALLER_COPIES);
    assert!(loaded.has_caller_copy(mine, "new"));
    // None drops it; other connections hold none.
    loaded.set_caller_copy(mine, "new", None);
    assert!(!loaded.has_caller_copy(mine, "new"));
    assert_eq!(len(&loaded), crate::runtime::MAX_CALLER_COPIES - 1);
    loaded.drop_token_copies();
    assert_eq!(len(&loaded), 0);
}

#[test]
fn consent_tasks_count_as_paused_requests() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    assert_eq!(b.paused(), 0);
    b.start_task(&loaded, 1, connect_task(&loaded, "team", "n-1", None), 0);
    b.start_task(&loaded, 2, connect_task(&loaded, "team", "n-2", None), 0);
    assert_eq!(b.paused(), 2);
    // Sent: still paused, now awaiting its call.
    b.dispatch_due(1);
    assert_eq!(b.proxy.take_calls().len(), 2);
    assert_eq!(b.paused(), 2);
    let mine = conn(&loaded, "mine");
    let alice = Secret::new(caller_key("https://issuer", "alice").unwrap());
    let needed = Needed {
        route: 0,
        picks: vec![mine],
        subject: None,
        caller: Some(alice),
        edits: Vec::new(),
    };
    b.wait(
        3,
        Waiter {
            loaded: loaded.clone(),
            needed,
            deadline_ms: 100,
            sent: Vec::new(),
            path: b"/".to_vec(),
            keys: Vec::new(),
            seen: Vec::new(),
        },
    );
    assert_eq!(b.paused(), 3);
}

#[test]
fn consent_failures_are_counted_by_reason_and_refusals_have_their_own_counter() {
    let (b, loaded) = delegated_setup();
    let m = &loaded.stats;
    m.consent_failed(&b.proxy, "state_expired");
    m.consent_failed(&b.proxy, "state_expired");
    m.consent_failed(&b.proxy, "wrong_caller");
    // Per reason only: no total beside them.
    assert_eq!(consent_stat(&b, "failed"), 0);
    assert_eq!(consent_stat(&b, "failed.state_expired"), 2);
    assert_eq!(consent_stat(&b, "failed.wrong_caller"), 1);
    assert_eq!(consent_stat(&b, "failed.state_invalid"), 0);
    // An unknown reason still counts, as bad_request.
    m.consent_failed(&b.proxy, "no_such_reason");
    assert_eq!(consent_stat(&b, "failed.bad_request"), 1);
    assert_eq!(consent_stat(&b, "failed"), 0);
    for reason in crate::stats::CONSENT_FAILURES {
        assert!(
            b.proxy
                .stats
                .borrow()
                .iter()
                .any(|s| *s == format!("latchkey.consent.failed.{reason}")),
            "{reason}"
        );
    }
    b.proxy.count(m.consent_required);
    assert_eq!(b.proxy.stat("latchkey.requests.consent_required"), 1);
}

#[test]
fn a_consent_fetch_holds_its_lease_for_all_its_calls() {
    let (_, loaded) = delegated_setup();
    let mine = conn(&loaded, "mine");
    let slot = loaded.tokens[mine].as_ref().unwrap();
    // Its record's read, its redemption, and its write-back (with a re-read): the
    // provider's and the store's timeouts (5 s each), plus the token request's own.
    assert_eq!(slot.policy.fetch_timeout_ms, 5_000 + 2 * 5_000 + 5_000);
}

#[test]
fn discovery_reads_each_record_in_turn_for_its_status() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let (mine, team) = (conn(&loaded, "mine"), conn(&loaded, "team"));
    let key = caller_key("https://issuer", "alice").unwrap();
    let items = vec![
        (mine, hash_of_key(&key), Some(Secret::new(key.clone()))),
        (team, "shared".to_string(), None),
    ];
    let task = |items: Vec<(usize, String, Option<Secret>)>| Task {
        connection: items[0].0,
        record: items[0].1.clone(),
        caller: items[0].2.clone(),
        kind: TaskKind::Discover {
            body: r#"{"authenticated":true,"routes":[]}"#.to_string(),
            items,
            statuses: Vec::new(),
        },
    };
    b.start_task(&loaded, 5, task(items.clone()), 0);
    b.dispatch_due(1);
    let (id, call) = one_call(&b);
    assert_eq!(header(&call, ":method"), Some("GET"));
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("mine", &hash_of_key(&key)).as_str())
    );
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 2);
    // The next record only after the first answered.
    let (id, call) = one_call(&b);
    assert_eq!(
        header(&call, ":path"),
        Some(record_path("team", "shared").as_str())
    );
    b.on_answer(id, Some(404), Some(b"{}".to_vec()), 3);
    let (got, verdict, status, body) = task_answer(&mut b, 4);
    assert_eq!((got, verdict, status), (5, Verdict::Discovery, 200));
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc["connections"],
        json!([
            { "connection": "mine", "status": "connected" },
            { "connection": "team", "status": "consent_required",
              "login_url": "/.latchkey/connections/team/login" }
        ])
    );
    assert_eq!(consent_stat(&b, "store_reads"), 2);
    // A store that fails: "unknown", and the answer still comes.
    b.start_task(&loaded, 6, task(items), 10);
    b.dispatch_due(11);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(500), Some(Vec::new()), 12);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 13);
    let (_, _, _, body) = task_answer(&mut b, 14);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["connections"][0]["status"], json!("unknown"));
    assert_eq!(doc["connections"][1]["status"], json!("connected"));
}

#[test]
fn a_consent_change_empties_the_caller_s_entry_even_when_another_worker_wrote_it_meanwhile() {
    let (mut b, loaded) = delegated_setup();
    b.prefetch_due = false;
    let mine = conn(&loaded, "mine");
    let key = Secret::new(caller_key("https://issuer", "alice").unwrap());
    // alice holds a token.
    let _ = b.resolve(&loaded, &[mine], who(&key), 0, true).unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(token_answer("at-a", json!({}))), 3);
    ready(b.resolve(&loaded, &[mine], who(&key), 4, true).unwrap());
    // Her disconnect: read, delete; the entry is emptied however its CAS moved.
    b.start_task(&loaded, 9, disconnect_task_for(&loaded, "mine", &key), 5);
    b.dispatch_due(6);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt", 1)), 7);
    let (id, _) = one_call(&b);
    // Another worker writes the shared set just as this one empties alice's entry:
    // its first compare-and-set is refused, and it tries again.
    b.proxy.conflicts.set(1);
    b.on_answer(id, Some(204), Some(Vec::new()), 8);
    assert_eq!(b.proxy.conflicts.get(), 0);
    loaded.drop_token_copies();
    assert!(waits(
        &b.resolve(&loaded, &[mine], who(&key), 9, true).unwrap()
    ));
}

fn disconnect_task_for(loaded: &Runtime, connection: &str, key: &Secret) -> Task {
    Task {
        connection: conn(loaded, connection),
        record: hash_of_key(key.expose()),
        caller: Some(key.clone()),
        kind: TaskKind::Disconnect,
    }
}

#[test]
fn a_callback_whose_code_was_never_redeemed_may_be_sent_again() {
    for conflicts in [0, 1] {
        let (mut b, loaded) = delegated_setup();
        b.prefetch_due = false;
        b.start_task(&loaded, 1, connect_task(&loaded, "team", "n-7", None), 0);
        b.dispatch_due(1);
        let (id, redeem) = one_call(&b);
        assert_eq!(header(&redeem, ":path"), Some("/token"));
        // The token server is down: the state is released (even when another
        // worker's write to the used states comes first).
        b.proxy.conflicts.set(conflicts);
        b.on_answer(id, Some(503), Some(b"upstream connect error".to_vec()), 2);
        assert_eq!(task_answer(&mut b, 3).2, 503);
        assert_eq!(b.proxy.conflicts.get(), 0);
        // The same callback again: redeemed again, not refused as a replay.
        b.start_task(&loaded, 2, connect_task(&loaded, "team", "n-7", None), 4);
        b.dispatch_due(5);
        let (id, again) = one_call(&b);
        assert_eq!(header(&again, ":path"), Some("/token"));
        // Redeemed (a spent code): now a third try is a replay.
        b.on_answer(
            id,
            Some(400),
            Some(br#"{"error":"invalid_grant"}"#.to_vec()),
            6,
        );
        assert_eq!(task_answer(&mut b, 7).2, 400);
        b.start_task(&loaded, 3, connect_task(&loaded, "team", "n-7", None), 8);
        b.dispatch_due(9);
        assert!(b.proxy.take_calls().is_empty());
        assert_eq!(last_reason(), Some("code_rejected"));
        let (_, _, status, body) = task_answer(&mut b, 10);
        assert_eq!(status, 400);
        assert!(body.contains("state_replayed"), "{body}");
        // Another nonce is not released by this one's failure.
        b.start_task(&loaded, 4, connect_task(&loaded, "team", "n-8", None), 11);
        b.dispatch_due(12);
        assert_eq!(one_call(&b).1.cluster, "github");
    }
}
