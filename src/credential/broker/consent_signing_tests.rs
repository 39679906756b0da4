//! private_key_jwt on authorization_code connections, over the in-memory
//! proxy: every call the gateway makes to the token server for a consent (the
//! stored refresh token's redemption, the callback's code, the disconnect's
//! revocation) carries its own freshly signed assertion, and a signature that
//! can't be had sends nothing to the token server.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use super::delegated_tests::{
    connect_task, consent_stat, disconnect_task, kv2, one_call, record_path, task_answer, STATE_KEY,
};
use super::signing_tests::{
    body_text, es256_signature, jws_part, no_secret_in, signing_stat, transit_input,
    transit_signature, ASSERTION_TYPE,
};
use super::*;
use crate::request::Verdict;

fn consent_signing_config() -> Config {
    let v = json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": {
            "signer": { "inline": "hvs.signer" },
            "vt": { "inline": "vault-token-1" },
            "sk": { "inline": STATE_KEY }
        },
        "providers": {
            "gh": { "type": "oauth2", "cluster": "github", "client_id": "gh",
                    "auth_method": "private_key_jwt",
                    "signing_key": { "alg": "ES256", "kid": "k-1",
                        "vault_transit": { "cluster": "vault_transit", "url": "http://transit:8200",
                                           "key": "gh", "token": "signer" } },
                    "authorization_url": "https://github.example/authorize",
                    "token_url": "https://github.example/token",
                    "revocation_url": "https://github.example/revoke" },
            "kvgh": { "type": "oauth2", "cluster": "github", "client_id": "kvgh",
                      "auth_method": "private_key_jwt",
                      "signing_key": { "azure_key_vault_key": "https://signer.vault.azure.net/keys/gh",
                                       "cluster": "keyvault", "identity": "kv_signer" },
                      "authorization_url": "https://github.example/authorize",
                      "token_url": "https://github.example/token" },
            "mi": { "type": "azure_managed_identity", "cluster": "imds" }
        },
        "token_stores": {
            "vault_store": { "vault": { "cluster": "vault", "url": "http://vault:8200", "token": "vt" } }
        },
        "consent": { "path": "/.latchkey/connections", "redirect_uri": "https://api.test/cb",
                     "state_key": "sk" },
        "connections": {
            "team": { "provider": "gh", "grant": "authorization_code", "store": "vault_store",
                      "consent": { "groups": ["admins"] }, "access": { "authenticated": true } },
            "kv_team": { "provider": "kvgh", "grant": "authorization_code", "store": "vault_store",
                         "consent": { "groups": ["admins"] }, "access": { "authenticated": true } },
            "kv_signer": { "provider": "mi", "resource": "https://vault.azure.net" }
        }
    });
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn consent_signing_setup() -> (Broker<Fake>, Rc<Runtime>) {
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, consent_signing_config(), "test"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    b.prefetch_due = false;
    (b, loaded)
}

/// Answers Transit sign call `sign` (checked: path, token, the assertion's
/// claims) with a signature filled with `fill`; the signed JWS it makes.
fn sign(b: &mut Broker<Fake>, sign: (u32, HttpCall), fill: u8, now: u64) -> String {
    let (id, call) = sign;
    assert_eq!(call.cluster, "vault_transit");
    assert_eq!(header(&call, ":path"), Some("/v1/transit/sign/gh/sha2-256"));
    assert_eq!(call.secret_headers[0].1.expose(), "hvs.signer");
    let input = transit_input(&call);
    let claims = jws_part(input.split('.').nth(1).unwrap());
    assert_eq!(claims["iss"], json!("gh"));
    assert_eq!(claims["sub"], json!("gh"));
    assert_eq!(claims["aud"], json!("https://github.example/token"));
    assert_eq!(claims["iat"], json!(now / 1000));
    b.on_answer(
        id,
        Some(200),
        Some(transit_signature(&es256_signature(fill))),
        now,
    );
    format!("{input}.{}", es256_signature(fill))
}

/// The form a token server call sends with assertion `jws`, after `grant`.
fn signed_form(grant: &str, jws: &str) -> String {
    format!("{grant}&client_id=gh&{ASSERTION_TYPE}&client_assertion={jws}")
}

#[test]
fn a_stored_consent_is_redeemed_with_a_signed_assertion() {
    let (mut b, loaded) = consent_signing_setup();
    let team = conn(&loaded, "team");
    assert!(waits(
        &b.resolve(&loaded, &[team], Who::default(), 1_000, true)
            .unwrap()
    ));
    b.dispatch_due(1_001);
    // The record first, then the signature, then the redemption.
    let (id, read) = one_call(&b);
    assert_eq!(
        header(&read, ":path"),
        Some(record_path("team", "shared").as_str())
    );
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 1_002);
    let jws = {
        let call = one_call(&b);
        sign(&mut b, call, 7, 1_003)
    };
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "github");
    assert_eq!(header(&token, ":path"), Some("/token"));
    assert_eq!(
        body_text(&token),
        signed_form("grant_type=refresh_token&refresh_token=rt-9", &jws)
    );
    assert!(token.secret_headers.is_empty());
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 1_004);
    assert_eq!(
        ready(
            b.resolve(&loaded, &[team], Who::default(), 1_005, true)
                .unwrap()
        )[0]
        .secret
        .expose(),
        "at-1"
    );
    assert_eq!(signing_stat(&b, "gh", "requests"), 1);
    assert_eq!(b.proxy.stat("latchkey.connection.team.token.requests"), 1);
}

#[test]
fn a_consent_fetch_whose_signature_fails_sends_no_redemption() {
    let (mut b, loaded) = consent_signing_setup();
    let team = conn(&loaded, "team");
    let _ = b
        .resolve(&loaded, &[team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 2);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(403), Some(b"{}".to_vec()), 3);
    b.dispatch_due(4);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(signing_stat(&b, "gh", "failure.forbidden"), 1);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.team.token.failure.signing"),
        1
    );
    assert!(b.proxy.logged(
        "connection team: provider gh: the client assertion could not be signed: forbidden (HTTP 403); no token request sent"
    ));
    // Refused while backing off: unavailable, not "consent required".
    match b
        .resolve(&loaded, &[team], Who::default(), 5, true)
        .unwrap()
    {
        Resolution::Reject {
            consent_required, ..
        } => assert!(!consent_required),
        _ => panic!("not rejected"),
    }
}

#[test]
fn a_callback_redeems_its_code_with_a_signed_assertion() {
    let (mut b, loaded) = consent_signing_setup();
    b.start_task(
        &loaded,
        7,
        connect_task(&loaded, "team", "n-1", None),
        2_000,
    );
    b.dispatch_due(2_001);
    let jws = {
        let call = one_call(&b);
        sign(&mut b, call, 3, 2_002)
    };
    let (id, token) = one_call(&b);
    assert_eq!(
        body_text(&token),
        signed_form(
            "grant_type=authorization_code&code=code-1&redirect_uri=https%3A%2F%2Fapi.test%2Fcb&code_verifier=verifier-1",
            &jws
        )
    );
    assert_eq!(consent_stat(&b, "redemptions"), 1);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at", json!({ "refresh_token": "rt-new" }))),
        2_003,
    );
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(404), Some(b"{}".to_vec()), 2_004);
    let (id, write) = one_call(&b);
    assert_eq!(header(&write, ":method"), Some("POST"));
    b.on_answer(id, Some(200), Some(b"{}".to_vec()), 2_005);
    let (id, verdict, status, body) = task_answer(&mut b, 2_006);
    assert_eq!(
        (id, verdict, status, body.as_str()),
        (7, Verdict::ConsentConnected, 200, r#"{"connected":"team"}"#)
    );
    assert_eq!(signing_stat(&b, "gh", "requests"), 1);

    // Each call its own assertion: another callback signs anew, with another jti.
    b.start_task(
        &loaded,
        8,
        connect_task(&loaded, "team", "n-2", None),
        3_000,
    );
    b.dispatch_due(3_001);
    let again = {
        let call = one_call(&b);
        sign(&mut b, call, 3, 3_002)
    };
    let jti = |jws: &str| jws_part(jws.split('.').nth(1).unwrap())["jti"].clone();
    assert_ne!(jti(&jws), jti(&again));
    assert_eq!(signing_stat(&b, "gh", "requests"), 2);
}

#[test]
fn a_callback_whose_assertion_cannot_be_signed_fails_and_may_be_sent_again() {
    for (status, kind) in [
        (Some(503), "status"),
        (Some(403), "forbidden"),
        (None, "connect"),
    ] {
        let (mut b, loaded) = consent_signing_setup();
        b.start_task(&loaded, 7, connect_task(&loaded, "team", "n-1", None), 0);
        b.dispatch_due(1);
        let (id, _) = one_call(&b);
        b.on_answer(id, status, Some(b"{}".to_vec()), 2);
        // Nothing to the token server.
        b.dispatch_due(3);
        assert!(b.proxy.take_calls().is_empty(), "{kind}");
        let (id, verdict, code, body) = task_answer(&mut b, 4);
        assert_eq!(
            (id, verdict, code),
            (7, Verdict::ConsentFailed, 503),
            "{kind}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            json!({ "error": "consent_failed", "reason": "token_server", "connection": "team" })
        );
        assert_eq!(signing_stat(&b, "gh", &format!("failure.{kind}")), 1);
        assert_eq!(consent_stat(&b, "redemptions"), 0);
        assert!(b.proxy.logged(&format!(
            "connection team: provider gh: the client assertion could not be signed: {kind}"
        )));
        // The code was never spent: the same callback may be sent again.
        b.start_task(&loaded, 8, connect_task(&loaded, "team", "n-1", None), 10);
        b.dispatch_due(11);
        let (_, call) = one_call(&b);
        assert_eq!(call.cluster, "vault_transit", "{kind}");
    }
}

#[test]
fn a_sign_call_the_host_refuses_fails_the_callback_and_frees_its_state() {
    let (mut b, loaded) = consent_signing_setup();
    b.proxy.refuse_dispatch.set(true);
    b.start_task(&loaded, 7, connect_task(&loaded, "team", "n-1", None), 0);
    b.dispatch_due(1);
    let (_, _, status, body) = task_answer(&mut b, 2);
    assert_eq!(status, 503);
    assert!(body.contains(r#""reason":"token_server""#), "{body}");
    b.proxy.refuse_dispatch.set(false);
    b.start_task(&loaded, 8, connect_task(&loaded, "team", "n-1", None), 3);
    b.dispatch_due(4);
    assert_eq!(one_call(&b).1.cluster, "vault_transit");
}

/// A disconnect of "team" up to its revocation's sign call.
fn disconnect_to_signature(b: &mut Broker<Fake>, loaded: &Rc<Runtime>) -> (u32, HttpCall) {
    b.start_task(loaded, 9, disconnect_task(loaded, "team"), 10);
    b.dispatch_due(11);
    let (id, _) = one_call(b);
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 12);
    let (id, delete) = one_call(b);
    assert_eq!(header(&delete, ":method"), Some("DELETE"));
    b.on_answer(id, Some(204), Some(Vec::new()), 13);
    one_call(b)
}

#[test]
fn a_disconnect_revokes_with_a_signed_assertion() {
    let (mut b, loaded) = consent_signing_setup();
    let call = disconnect_to_signature(&mut b, &loaded);
    let jws = sign(&mut b, call, 5, 14);
    let (id, revoke) = one_call(&b);
    assert_eq!(header(&revoke, ":path"), Some("/revoke"));
    assert_eq!(
        body_text(&revoke),
        signed_form("token=rt-9&token_type_hint=refresh_token", &jws)
    );
    b.on_answer(id, Some(200), Some(Vec::new()), 15);
    let (_, verdict, status, body) = task_answer(&mut b, 16);
    assert_eq!(
        (verdict, status, body.as_str()),
        (
            Verdict::ConsentDisconnected,
            200,
            r#"{"disconnected":"team","revoked":true}"#
        )
    );
}

#[test]
fn a_disconnect_whose_revocation_cannot_be_signed_is_disconnected_not_revoked() {
    let (mut b, loaded) = consent_signing_setup();
    let (id, _) = disconnect_to_signature(&mut b, &loaded);
    b.on_answer(id, Some(500), Some(b"{}".to_vec()), 14);
    b.dispatch_due(15);
    assert!(b.proxy.take_calls().is_empty());
    let (_, verdict, status, body) = task_answer(&mut b, 16);
    assert_eq!(
        (verdict, status, body.as_str()),
        (
            Verdict::ConsentDisconnected,
            200,
            r#"{"disconnected":"team","revoked":false}"#
        )
    );
    assert_eq!(signing_stat(&b, "gh", "failure.status"), 1);
    assert_eq!(consent_stat(&b, "revocations"), 0);
    // The host refusing the revocation's sign call: the same answer.
    let (mut b, loaded) = consent_signing_setup();
    b.start_task(&loaded, 9, disconnect_task(&loaded, "team"), 10);
    b.dispatch_due(11);
    let (id, _) = one_call(&b);
    b.on_answer(id, Some(200), Some(kv2("rt-9", 5)), 12);
    let (id, _) = one_call(&b);
    b.proxy.refuse_dispatch.set(true);
    b.on_answer(id, Some(204), Some(Vec::new()), 13);
    assert_eq!(
        task_answer(&mut b, 14).3,
        r#"{"disconnected":"team","revoked":false}"#
    );
}

/// Answers the identity token fetch due by `now` (IMDS) with `token`, then gives
/// the Key Vault sign call it makes way for, checked to carry that token.
fn identity_then_sign(b: &mut Broker<Fake>, token: &str, now: u64) -> (u32, HttpCall) {
    b.dispatch_due(now);
    b.dispatch_due(now + 1);
    let (id, imds) = one_call(b);
    assert_eq!(imds.cluster, "imds");
    b.on_answer(id, Some(200), Some(token_answer(token, json!({}))), now + 2);
    b.dispatch_due(now + 3);
    let (id, sign) = one_call(b);
    assert_eq!(sign.cluster, "keyvault");
    assert!(sign
        .secret_headers
        .iter()
        .any(|(_, v)| v.expose() == format!("Bearer {token}")));
    (id, sign)
}

#[test]
fn a_key_vault_401_to_a_callback_s_signature_signs_once_more_after_a_new_identity_token() {
    let (mut b, loaded) = consent_signing_setup();
    b.start_task(&loaded, 7, connect_task(&loaded, "kv_team", "n-1", None), 0);
    // The signing identity's token first.
    let (id, _) = identity_then_sign(&mut b, "old-id", 1);
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 5);
    // A new identity token, then a second signature (the state stays admitted once).
    let (id, _) = identity_then_sign(&mut b, "new-id", 6);
    let sig = URL_SAFE_NO_PAD.encode([0x5a; 256]);
    b.on_answer(
        id,
        Some(200),
        Some(
            json!({ "kid": "https://signer.vault.azure.net/keys/gh/v1", "value": sig })
                .to_string()
                .into_bytes(),
        ),
        10,
    );
    let (_, token) = one_call(&b);
    assert_eq!(token.cluster, "github");
    assert!(body_text(&token).contains("code=code-1"));
    assert!(body_text(&token).contains(ASSERTION_TYPE));
    assert_eq!(signing_stat(&b, "kvgh", "requests"), 2);
    assert_eq!(signing_stat(&b, "kvgh", "failure.forbidden"), 0);
    let calls: Vec<_> = vec![(0, token)];
    no_secret_in(&calls);

    // Refused twice: the callback fails (its code unspent).
    let (mut b, loaded) = consent_signing_setup();
    b.start_task(&loaded, 7, connect_task(&loaded, "kv_team", "n-1", None), 0);
    let (id, _) = identity_then_sign(&mut b, "old-id", 1);
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 5);
    let (id, _) = identity_then_sign(&mut b, "new-id", 6);
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 10);
    b.dispatch_due(11);
    assert!(b.proxy.take_calls().is_empty());
    let (_, _, status, body) = task_answer(&mut b, 12);
    assert_eq!(status, 503);
    assert!(body.contains("token_server"), "{body}");
    assert_eq!(signing_stat(&b, "kvgh", "failure.forbidden"), 1);
}

#[test]
fn a_consent_fetch_has_its_signing_identity_s_token_before_it_reads_the_record() {
    let (mut b, loaded) = consent_signing_setup();
    let kv_team = conn(&loaded, "kv_team");
    let _ = b
        .resolve(&loaded, &[kv_team], Who::default(), 0, true)
        .unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    // The identity's token first: no store read while it is missing.
    let (id, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    b.dispatch_due(3);
    assert!(b.proxy.take_calls().is_empty());
    b.on_answer(id, Some(200), Some(token_answer("kv-id", json!({}))), 4);
    b.dispatch_due(5);
    let (id, read) = one_call(&b);
    assert_eq!(
        header(&read, ":path"),
        Some(record_path("kv_team", "shared").as_str())
    );
    b.on_answer(id, Some(200), Some(kv2("rt-1", 1)), 6);
    let (_, sign) = one_call(&b);
    assert_eq!(sign.cluster, "keyvault");
}

#[test]
fn after_a_key_vault_401_a_callback_waits_one_identity_timeout_for_a_new_token() {
    let (mut b, loaded) = consent_signing_setup();
    b.start_task(&loaded, 7, connect_task(&loaded, "kv_team", "n-1", None), 0);
    let (id, _) = identity_then_sign(&mut b, "old-id", 1);
    // Refused late: the new token gets the identity's whole timeout (5 s) from now.
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 9_000);
    b.dispatch_due(9_001);
    b.dispatch_due(9_002);
    let (_, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    b.dispatch_due(13_999);
    assert!(b.due_waiters(13_999).is_empty());
    assert_eq!(signing_stat(&b, "kvgh", "failure.identity"), 0);
    b.dispatch_due(14_000);
    assert_eq!(signing_stat(&b, "kvgh", "failure.identity"), 1);
    let (_, _, status, body) = task_answer(&mut b, 14_001);
    assert_eq!(status, 503);
    assert!(body.contains("token_server"), "{body}");
}
