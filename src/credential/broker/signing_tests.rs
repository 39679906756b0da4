//! Client authentication without a stored secret in the broker (SPEC v1.2),
//! over the in-memory proxy: a private_key_jwt fetch has its assertion signed
//! first (Vault Transit, or Key Vault with an identity token), then sends it;
//! a client_assertion fetch sends another connection's token; tls_client_auth
//! sends its client id alone.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

pub(super) const ASSERTION_TYPE: &str =
    "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer";

fn signing_config() -> Config {
    let v = json!({
        "secrets": {
            "vt": { "inline": "hvs.signer" },
            "rt": { "inline": "rt-configured" },
            "sid": { "inline": "secret-id-4" }
        },
        "providers": {
            "transit_idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp.test/token",
                             "client_id": "gw", "auth_method": "private_key_jwt",
                             "drop_on_401_after_s": 0,
                             "signing_key": { "alg": "ES256", "kid": "k-1",
                                 "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                                    "key": "gw", "token": "vt", "namespace": "team" } } },
            "kv_idp": { "type": "oauth2", "cluster": "idp2", "token_url": "https://idp2.test/token",
                        "client_id": "gw2", "auth_method": "private_key_jwt",
                        "signing_key": { "azure_key_vault_key": "https://signer.vault.azure.net/keys/gw",
                                         "cluster": "keyvault", "identity": "kv_signer" } },
            "entra": { "type": "oauth2", "cluster": "entra", "token_url": "https://login.test/token",
                       "client_id": "app", "auth_method": "client_assertion", "assertion": "fic" },
            "mtls": { "type": "oauth2", "cluster": "mtls", "token_url": "https://mtls.test/token",
                      "client_id": "gw3", "auth_method": "tls_client_auth" },
            "approle_idp": { "type": "oauth2", "cluster": "idp4", "token_url": "https://idp4.test/token",
                             "client_id": "gw4", "auth_method": "private_key_jwt",
                             "signing_key": { "alg": "ES256", "kid": "k-4",
                                 "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                                    "key": "gw4", "namespace": "team",
                                                    "approle": { "role_id": "role-4", "secret_id": "sid" } } } },
            "mi": { "type": "azure_managed_identity", "cluster": "imds" }
        },
        "connections": {
            "signed": { "provider": "transit_idp", "grant": "client_credentials",
                        "scopes": ["orders.read"], "access": { "public": true } },
            "kv_signed": { "provider": "kv_idp", "grant": "client_credentials",
                           "access": { "public": true } },
            "kv_signer": { "provider": "mi", "resource": "https://vault.azure.net" },
            "federated": { "provider": "entra", "grant": "client_credentials",
                           "scopes": ["https://graph.test/.default"], "access": { "public": true } },
            "fic": { "provider": "mi", "resource": "api://AzureADTokenExchange" },
            "cert": { "provider": "mtls", "grant": "client_credentials", "access": { "public": true } },
            "approle_signed": { "provider": "approle_idp", "grant": "client_credentials",
                                "access": { "public": true } },
            "approle_signed2": { "provider": "approle_idp", "grant": "client_credentials",
                                 "scopes": ["two"], "access": { "public": true } },
            "signed_rt": { "provider": "transit_idp", "grant": "refresh_token", "refresh_token": "rt",
                           "access": { "public": true } },
            "signed_obo": { "provider": "transit_idp", "grant": "token_exchange",
                            "access": { "authenticated": true } }
        },
        "routes": [ { "name": "signed", "match": { "path_prefix": "/signed" },
                      "inject": [ { "connections": ["signed"], "header": "authorization" } ] } ]
    });
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn signing_setup() -> (Broker<Fake>, Rc<Runtime>) {
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, signing_config(), "test"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    (b, loaded)
}

fn one_call(b: &Broker<Fake>) -> (u32, HttpCall) {
    let mut calls = b.proxy.take_calls();
    assert_eq!(
        calls.len(),
        1,
        "{:?}",
        calls.iter().map(|(_, c)| &c.cluster).collect::<Vec<_>>()
    );
    calls.remove(0)
}

pub(super) fn body_text(call: &HttpCall) -> &str {
    call.body.as_ref().map_or("", |b| b.expose())
}

pub(super) fn body_json(call: &HttpCall) -> Value {
    serde_json::from_str(body_text(call)).unwrap()
}

/// A JWS part, decoded.
pub(super) fn jws_part(p: &str) -> Value {
    serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
}

/// The signing input a Transit sign call carries.
pub(super) fn transit_input(call: &HttpCall) -> String {
    let input = body_json(call)["input"].as_str().unwrap().to_string();
    String::from_utf8(STANDARD.decode(input).unwrap()).unwrap()
}

/// An ES256 signature, as Transit's `jws` marshaling gives it.
pub(super) fn es256_signature(fill: u8) -> String {
    B64.encode([fill; 64])
}

pub(super) fn transit_signature(sig: &str) -> Vec<u8> {
    json!({ "data": { "signature": format!("vault:v1:{sig}"), "key_version": 1 } })
        .to_string()
        .into_bytes()
}

pub(super) fn signing_stat(b: &Broker<Fake>, provider: &str, name: &str) -> u64 {
    b.proxy
        .stat(&format!("latchkey.provider.{provider}.signing.{name}"))
}

/// No call so far carries a client secret, or a basic authorization.
pub(super) fn no_secret_in(calls: &[(u32, HttpCall)]) {
    for (_, c) in calls {
        assert!(!body_text(c).contains("client_secret"), "{}", body_text(c));
        assert!(!c
            .secret_headers
            .iter()
            .any(|(_, v)| v.expose().starts_with("Basic ")));
    }
}

#[test]
fn a_signed_assertion_is_made_by_transit_then_sent_once_per_token_request() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "signed");
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 1_000, true)
            .unwrap()
    ));
    // A second request waits on the same fetch: one signature for both.
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 1_001, true)
            .unwrap()
    ));
    b.dispatch_due(2_500);
    // The sign call first, and nothing else.
    let (id, sign) = one_call(&b);
    assert_eq!(sign.cluster, "vault");
    assert_eq!(header(&sign, ":method"), Some("POST"));
    assert_eq!(header(&sign, ":path"), Some("/v1/transit/sign/gw/sha2-256"));
    assert_eq!(header(&sign, ":authority"), Some("vault:8200"));
    assert_eq!(header(&sign, "x-vault-namespace"), Some("team"));
    assert_eq!(sign.secret_headers.len(), 1);
    assert_eq!(sign.secret_headers[0].0, "x-vault-token");
    assert_eq!(sign.secret_headers[0].1.expose(), "hvs.signer");
    assert_eq!(body_json(&sign)["marshaling_algorithm"], json!("jws"));
    let input = transit_input(&sign);
    let (h, claims) = input.split_once('.').unwrap();
    assert_eq!(
        jws_part(h),
        json!({ "alg": "ES256", "typ": "JWT", "kid": "k-1" })
    );
    let claims = jws_part(claims);
    let jti = claims["jti"].as_str().unwrap().to_string();
    assert_eq!(jti.len(), 32);
    // Seconds, from the time the fetch went out.
    assert_eq!(
        claims,
        json!({ "iss": "gw", "sub": "gw", "aud": "https://idp.test/token", "jti": jti,
                "iat": 2, "exp": 302 })
    );
    assert_eq!(signing_stat(&b, "transit_idp", "requests"), 1);
    assert_eq!(b.proxy.stat("latchkey.connection.signed.token.requests"), 0);
    // The signature: the token request, with the signed assertion.
    let sig = es256_signature(0xab);
    b.on_answer(id, Some(200), Some(transit_signature(&sig)), 2_600);
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "idp");
    assert_eq!(header(&token, ":path"), Some("/token"));
    assert_eq!(header(&token, ":authority"), Some("idp.test"));
    assert!(token.secret_headers.is_empty());
    assert_eq!(
        body_text(&token),
        format!("grant_type=client_credentials&scope=orders.read&client_id=gw&{ASSERTION_TYPE}&client_assertion={input}.{sig}")
    );
    assert_eq!(b.proxy.stat("latchkey.connection.signed.token.requests"), 1);
    assert!(b.awaits(id));
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 2_700);
    let creds = ready(
        b.resolve(&loaded, &[c], Who::default(), 2_800, true)
            .unwrap(),
    );
    assert_eq!(creds[0].secret.expose(), "at-1");
    assert_eq!(b.proxy.stat("latchkey.connection.signed.token.success"), 1);
    // A refresh (here an upstream 401) signs a new assertion, with a new jti.
    b.on_upstream_401(&loaded, &EntryCredential::tokens(&creds), 3_000);
    b.dispatch_due(4_000);
    let (id, sign) = one_call(&b);
    assert_eq!(sign.cluster, "vault");
    let input2 = transit_input(&sign);
    let claims2 = jws_part(input2.split_once('.').unwrap().1);
    assert_ne!(claims2["jti"], json!(jti));
    assert_eq!(claims2["iat"], json!(4));
    assert_eq!(claims2["exp"], json!(304));
    assert_eq!(signing_stat(&b, "transit_idp", "requests"), 2);
    let sig2 = es256_signature(0xcd);
    b.on_answer(id, Some(200), Some(transit_signature(&sig2)), 4_100);
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "idp");
    assert!(body_text(&token).ends_with(&format!("&client_assertion={input2}.{sig2}")));
    b.on_answer(id, Some(200), Some(token_answer("at-2", json!({}))), 4_200);
    assert_eq!(
        ready(
            b.resolve(&loaded, &[c], Who::default(), 4_300, true)
                .unwrap()
        )[0]
        .secret
        .expose(),
        "at-2"
    );
    // Two token requests, two signatures; no failure counted.
    assert_eq!(b.proxy.stat("latchkey.connection.signed.token.requests"), 2);
    for kind in crate::credential::assertion::SignError::KINDS
        .iter()
        .chain(&["identity"])
    {
        assert_eq!(
            signing_stat(&b, "transit_idp", &format!("failure.{kind}")),
            0
        );
    }
    assert!(b.proxy.take_calls().is_empty());
    // No log holds the Vault token, the signature or the token.
    assert!(!b
        .proxy
        .logs
        .borrow()
        .iter()
        .any(|(_, m)| m.contains("hvs.signer") || m.contains(&sig) || m.contains("at-1")));
}

#[test]
fn a_failed_signature_fails_the_fetch_and_sends_no_token_request() {
    let refusal = br#"{"errors":["1 error occurred: permission denied SECRET-BODY"]}"#;
    type Case<'a> = (Option<u32>, Option<&'a [u8]>, &'a str);
    let cases: &[Case] = &[
        (Some(403), Some(refusal), "forbidden (HTTP 403)"),
        (Some(401), Some(refusal), "forbidden (HTTP 401)"),
        (Some(500), Some(refusal), "status (HTTP 500)"),
        (Some(504), Some(b"upstream request timeout"), "timeout"),
        (None, Some(b""), "connect"),
        // A signature of the wrong size for ES256, or not the answer's shape.
        (
            Some(200),
            Some(br#"{"data":{"signature":"vault:v1:c2hvcnQ"}}"#),
            "malformed",
        ),
        (Some(200), Some(b"SECRET-BODY"), "malformed"),
        // An answer larger than the body limit (the glue hands none).
        (Some(200), None, "malformed"),
    ];
    for &(status, answer, kind) in cases {
        let (mut b, loaded) = signing_setup();
        let c = conn(&loaded, "signed");
        let (deadline, keys) = keys_of(b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap());
        b.wait(3, waiter(&loaded, c, deadline, keys));
        b.dispatch_due(1);
        let (id, sign) = one_call(&b);
        assert_eq!(sign.cluster, "vault");
        b.on_answer(id, status, answer.map(<[u8]>::to_vec), 20);
        // No token request, now or later.
        b.dispatch_due(21);
        assert!(b.proxy.take_calls().is_empty(), "{kind}");
        assert_eq!(
            b.proxy
                .stat("latchkey.connection.signed.token.failure.signing"),
            1,
            "{kind}"
        );
        assert_eq!(b.proxy.stat("latchkey.connection.signed.token.requests"), 0);
        let stat_kind = kind.split(' ').next().unwrap();
        assert_eq!(
            signing_stat(&b, "transit_idp", &format!("failure.{stat_kind}")),
            1,
            "{kind}"
        );
        assert_eq!(signing_stat(&b, "transit_idp", "requests"), 1);
        assert!(
            b.proxy.logged(&format!(
                "connection signed: provider transit_idp: the client assertion could not be signed: {kind}; no token request sent"
            )),
            "{:?}",
            b.proxy.logs.borrow()
        );
        assert!(b
            .proxy
            .logged("connection signed: token fetch failed: signing"));
        assert!(!b.proxy.logged("SECRET-BODY"));
        // The paused request is refused with 503.
        let resumed = b.due_waiters(22);
        assert_eq!(resumed.len(), 1);
        let o = &resumed[0].outcome;
        assert_eq!(o.verdict, crate::request::Verdict::Unavailable);
        assert_eq!(o.reply.as_ref().unwrap().status, 503);
        // Backing off: the next request is refused at once, with no call.
        match b.resolve(&loaded, &[c], Who::default(), 30, true).unwrap() {
            Resolution::Reject {
                connection,
                retry_after_ms,
                consent_required: false,
            } => {
                assert_eq!(connection, c);
                assert!(retry_after_ms > 0 && retry_after_ms <= 1000);
            }
            _ => panic!("not rejected ({kind})"),
        }
        b.dispatch_due(31);
        assert!(b.proxy.take_calls().is_empty());
        // After the backoff: a new fetch signs again.
        let _ = b
            .resolve(&loaded, &[c], Who::default(), 2_000, true)
            .unwrap();
        b.dispatch_due(2_001);
        let (_, sign) = one_call(&b);
        assert_eq!(sign.cluster, "vault", "{kind}");
    }
}

#[test]
fn a_sign_call_the_host_refuses_fails_the_fetch() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "signed");
    b.proxy.refuse_dispatch.set(true);
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    assert!(b
        .proxy
        .logged("connection signed: can't call cluster \"vault\": BadArgument"));
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.signed.token.failure.dispatch"),
        1
    );
    assert!(matches!(
        b.resolve(&loaded, &[c], Who::default(), 2, true).unwrap(),
        Resolution::Reject { .. }
    ));
}

#[test]
fn key_vault_signs_with_its_identity_token_once_that_is_there() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "kv_signed");
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap()
    ));
    // First the identity's token (its fetch is queued by this one, and goes on
    // the next tick); the signature waits for it.
    b.dispatch_due(1);
    assert!(b.proxy.take_calls().is_empty());
    b.dispatch_due(2);
    let (id, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    assert!(header(&imds, ":path")
        .unwrap()
        .contains("resource=https%3A%2F%2Fvault.azure.net"));
    assert_eq!(signing_stat(&b, "kv_idp", "requests"), 0);
    b.dispatch_due(2);
    assert!(b.proxy.take_calls().is_empty());
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("kv-id-token", json!({}))),
        3,
    );
    b.dispatch_due(4_000);
    let (id, sign) = one_call(&b);
    assert_eq!(sign.cluster, "keyvault");
    assert_eq!(header(&sign, ":method"), Some("POST"));
    assert_eq!(
        header(&sign, ":path"),
        Some("/keys/gw//sign?api-version=7.4")
    );
    assert_eq!(header(&sign, ":authority"), Some("signer.vault.azure.net"));
    assert_eq!(sign.secret_headers.len(), 1);
    assert_eq!(sign.secret_headers[0].0, "authorization");
    assert_eq!(sign.secret_headers[0].1.expose(), "Bearer kv-id-token");
    let digest = body_json(&sign)["value"].as_str().unwrap().to_string();
    assert_eq!(body_json(&sign)["alg"], json!("RS256"));
    assert_eq!(signing_stat(&b, "kv_idp", "requests"), 1);
    // Key Vault answers with the signature (RS256: 256 bytes for a 2048-bit key).
    let sig = B64.encode([0x5a; 256]);
    let answer = json!({ "kid": "https://signer.vault.azure.net/keys/gw/0a1b", "value": sig });
    b.on_answer(id, Some(200), Some(answer.to_string().into_bytes()), 4_100);
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "idp2");
    let body = body_text(&token).to_string();
    let prefix =
        format!("grant_type=client_credentials&client_id=gw2&{ASSERTION_TYPE}&client_assertion=");
    let jwt = body.strip_prefix(&prefix).unwrap();
    let (input, signature) = jwt.rsplit_once('.').unwrap();
    assert_eq!(signature, sig);
    // What Key Vault signed is the SHA-256 of exactly this input.
    assert_eq!(B64.encode(Sha256::digest(input.as_bytes())), digest);
    let (h, claims) = input.split_once('.').unwrap();
    assert_eq!(
        jws_part(h),
        json!({ "alg": "RS256", "typ": "JWT", "kid": "https://signer.vault.azure.net/keys/gw" })
    );
    let claims = jws_part(claims);
    assert_eq!(claims["iat"], json!(4));
    assert_eq!(claims["aud"], json!("https://idp2.test/token"));
    b.on_answer(id, Some(200), Some(token_answer("at-kv", json!({}))), 4_200);
    assert_eq!(
        ready(
            b.resolve(&loaded, &[c], Who::default(), 4_300, true)
                .unwrap()
        )[0]
        .secret
        .expose(),
        "at-kv"
    );
}

#[test]
fn key_vault_signing_fails_when_its_identity_token_never_comes() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "kv_signed");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(0);
    b.dispatch_due(0);
    let (_, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    // The fetch waits for the identity's token as long as its own timeout (5 s),
    // which covers its signing call too (5 s more)...
    b.dispatch_due(9_999);
    assert_eq!(signing_stat(&b, "kv_idp", "failure.identity"), 0);
    assert!(b.proxy.take_calls().is_empty());
    // ...then fails for want of it: no sign call, no token request.
    b.dispatch_due(10_000);
    assert_eq!(signing_stat(&b, "kv_idp", "failure.identity"), 1);
    assert_eq!(signing_stat(&b, "kv_idp", "requests"), 0);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_signed.token.failure.signing"),
        1
    );
    assert!(b.proxy.logged(
        "connection kv_signed: provider kv_idp: the client assertion could not be signed: identity; no token request sent"
    ));
    // At most the identity's own fetch, tried again: no sign call, no token request.
    assert!(b
        .proxy
        .take_calls()
        .iter()
        .all(|(_, call)| call.cluster == "imds"));
}

#[test]
fn a_client_assertion_is_another_connection_s_token_and_waits_for_it() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "federated");
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap()
    ));
    b.dispatch_due(1);
    assert!(b.proxy.take_calls().is_empty());
    // The managed identity's token first (for api://AzureADTokenExchange).
    b.dispatch_due(1);
    let (id, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    assert!(header(&imds, ":path")
        .unwrap()
        .ends_with("resource=api%3A%2F%2FAzureADTokenExchange"));
    b.dispatch_due(2);
    assert!(b.proxy.take_calls().is_empty());
    b.on_answer(id, Some(200), Some(token_answer("fic-token", json!({}))), 3);
    b.dispatch_due(4);
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "entra");
    assert!(token.secret_headers.is_empty());
    assert_eq!(
        body_text(&token),
        format!("grant_type=client_credentials&scope=https%3A%2F%2Fgraph.test%2F.default&client_id=app&{ASSERTION_TYPE}&client_assertion=fic-token")
    );
    b.on_answer(id, Some(200), Some(token_answer("graph-1", json!({}))), 5);
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap())[0]
            .secret
            .expose(),
        "graph-1"
    );
    // No signing for this provider: no signing stat defined.
    assert!(!b
        .proxy
        .stats
        .borrow()
        .iter()
        .any(|n| n.starts_with("latchkey.provider.entra.")));
    // The assertion token never comes: the fetch fails after its timeout.
    let (mut b, loaded) = signing_setup();
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(0);
    b.dispatch_due(0);
    let (_, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    b.dispatch_due(4_999);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.federated.token.failure.dispatch"),
        0
    );
    b.dispatch_due(5_000);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.federated.token.failure.dispatch"),
        1
    );
    assert!(b.proxy.take_calls().is_empty());
}

#[test]
fn tls_client_auth_sends_the_client_id_alone() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "cert");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    let calls = b.proxy.take_calls();
    no_secret_in(&calls);
    assert_eq!(calls.len(), 1);
    let (id, token) = &calls[0];
    assert_eq!(token.cluster, "mtls");
    assert!(token.secret_headers.is_empty());
    assert_eq!(
        body_text(token),
        "grant_type=client_credentials&client_id=gw3"
    );
    b.on_answer(*id, Some(200), Some(token_answer("at-m", json!({}))), 2);
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 3, true).unwrap())[0]
            .secret
            .expose(),
        "at-m"
    );
}

#[test]
fn only_signing_providers_have_signing_stats() {
    let (b, _loaded) = signing_setup();
    let stats = b.proxy.stats.borrow();
    for provider in ["transit_idp", "kv_idp", "approle_idp"] {
        for kind in [
            "connect",
            "timeout",
            "forbidden",
            "status",
            "malformed",
            "identity",
            "login",
        ] {
            let name = format!("latchkey.provider.{provider}.signing.failure.{kind}");
            assert_eq!(stats.iter().filter(|n| **n == name).count(), 1, "{name}");
        }
        let name = format!("latchkey.provider.{provider}.signing.requests");
        assert!(stats.contains(&name), "{name}");
    }
    assert!(!stats.iter().any(|n| n.contains(".signing.")
        && !n.contains("provider.transit_idp.")
        && !n.contains("provider.kv_idp.")
        && !n.contains("provider.approle_idp.")));
}

/// Signs the one pending assertion and answers with `sig`; gives the token request.
fn sign_and_take_token_request(b: &mut Broker<Fake>, now: u64) -> (String, HttpCall) {
    let (id, sign) = one_call(b);
    assert_eq!(sign.cluster, "vault");
    let input = transit_input(&sign);
    let sig = es256_signature(0x11);
    b.on_answer(id, Some(200), Some(transit_signature(&sig)), now);
    let (_, token) = one_call(b);
    (format!("{input}.{sig}"), token)
}

#[test]
fn a_signed_token_request_keeps_its_grant_s_refresh_or_subject_token() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "signed_rt");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    let (jwt, token) = sign_and_take_token_request(&mut b, 2);
    assert_eq!(
        body_text(&token),
        format!("grant_type=refresh_token&refresh_token=rt-configured&client_id=gw&{ASSERTION_TYPE}&client_assertion={jwt}")
    );
    let c = conn(&loaded, "signed_obo");
    let alice = Secret::new("a.alice.s");
    let _ = b
        .resolve(
            &loaded,
            &[c],
            Who {
                subject: Some(&alice),
                caller: None,
            },
            3,
            true,
        )
        .unwrap();
    b.dispatch_due(4);
    let (jwt, token) = sign_and_take_token_request(&mut b, 5);
    assert_eq!(
        body_text(&token),
        format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
                 &subject_token=a.alice.s\
                 &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token\
                 &client_id=gw&{ASSERTION_TYPE}&client_assertion={jwt}"
        )
    );
}

#[test]
fn a_key_vault_401_to_a_signature_gets_a_new_identity_token_and_signs_once_more() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "kv_signed");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("old-id-token", json!({}))),
        3,
    );
    b.dispatch_due(4);
    let (id, sign) = one_call(&b);
    assert_eq!(sign.cluster, "keyvault");
    assert!(sign
        .secret_headers
        .iter()
        .any(|(_, v)| v.expose() == "Bearer old-id-token"));
    // Refused: the identity's token goes, a new one is fetched, then one more signature.
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 5);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_signed.token.failure.signing"),
        0
    );
    b.dispatch_due(6);
    b.dispatch_due(7);
    let (id, imds) = one_call(&b);
    assert_eq!(imds.cluster, "imds");
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("new-id-token", json!({}))),
        8,
    );
    b.dispatch_due(9);
    let (id, sign) = one_call(&b);
    assert!(sign
        .secret_headers
        .iter()
        .any(|(_, v)| v.expose() == "Bearer new-id-token"));
    // Refused again: that is the answer (once more only).
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 10);
    b.dispatch_due(11);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_signed.token.failure.signing"),
        1
    );
    assert_eq!(signing_stat(&b, "kv_idp", "failure.forbidden"), 1);
    assert_eq!(signing_stat(&b, "kv_idp", "requests"), 2);
}

#[test]
fn after_a_key_vault_401_the_new_identity_token_is_awaited_for_a_whole_timeout() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "kv_signed");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("old-id-token", json!({}))),
        3,
    );
    b.dispatch_due(4);
    let (id, _) = one_call(&b);
    // Refused late in the first fetch's time: the retry gets a time of its own
    // (its timeout: 5 s, and 5 s for the signature).
    b.on_answer(id, Some(401), Some(b"{}".to_vec()), 9_000);
    b.dispatch_due(9_001);
    b.dispatch_due(9_002);
    let imds: Vec<_> = b.proxy.take_calls();
    assert!(
        imds.iter().all(|(_, call)| call.cluster == "imds"),
        "{imds:?}"
    );
    b.dispatch_due(18_999);
    assert_eq!(signing_stat(&b, "kv_idp", "failure.identity"), 0);
    b.dispatch_due(19_000);
    assert_eq!(signing_stat(&b, "kv_idp", "failure.identity"), 1);
}

/// A Vault AppRole login answer.
fn login_answer(token: &str) -> Vec<u8> {
    json!({ "auth": { "client_token": token, "lease_duration": 600 } })
        .to_string()
        .into_bytes()
}

#[test]
fn transit_after_an_approle_login_signs_with_the_login_token_and_logs_in_again_on_403() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "approle_signed");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    // The login first: the role and secret IDs as JSON, in the namespace.
    let (id, login) = one_call(&b);
    assert_eq!(login.cluster, "vault");
    assert_eq!(
        (header(&login, ":method"), header(&login, ":path")),
        (Some("POST"), Some("/v1/auth/approle/login"))
    );
    assert_eq!(header(&login, "x-vault-namespace"), Some("team"));
    assert_eq!(
        body_json(&login),
        json!({ "role_id": "role-4", "secret_id": "secret-id-4" })
    );
    b.on_answer(id, Some(200), Some(login_answer("hvs.login-1")), 3);
    b.dispatch_due(4);
    let (id, sign) = one_call(&b);
    assert_eq!(
        header(&sign, ":path"),
        Some("/v1/transit/sign/gw4/sha2-256")
    );
    assert_eq!(sign.secret_headers[0].1.expose(), "hvs.login-1");
    // Vault no longer honours the login: a new one, then one more signature.
    b.on_answer(id, Some(403), Some(b"{}".to_vec()), 5);
    b.dispatch_due(6);
    b.dispatch_due(7);
    let (id, login) = one_call(&b);
    assert_eq!(header(&login, ":path"), Some("/v1/auth/approle/login"));
    b.on_answer(id, Some(200), Some(login_answer("hvs.login-2")), 8);
    b.dispatch_due(9);
    let (id, sign) = one_call(&b);
    assert_eq!(sign.secret_headers[0].1.expose(), "hvs.login-2");
    b.on_answer(
        id,
        Some(200),
        Some(transit_signature(&es256_signature(1))),
        10,
    );
    let (id, token) = one_call(&b);
    assert_eq!(token.cluster, "idp4");
    assert!(body_text(&token).contains(ASSERTION_TYPE));
    b.on_answer(id, Some(200), Some(token_answer("at-4", json!({}))), 11);
    assert_eq!(signing_stat(&b, "approle_idp", "requests"), 2);
    assert_eq!(signing_stat(&b, "approle_idp", "failure.forbidden"), 0);
    // The login token is cached: another connection's fetch signs without logging in.
    let c2 = conn(&loaded, "approle_signed2");
    let _ = b.resolve(&loaded, &[c2], Who::default(), 13, true).unwrap();
    b.dispatch_due(14);
    let (_, sign) = one_call(&b);
    assert_eq!(
        header(&sign, ":path"),
        Some("/v1/transit/sign/gw4/sha2-256")
    );
    assert_eq!(sign.secret_headers[0].1.expose(), "hvs.login-2");
    for (_, call) in [(0, login), (0, sign), (0, token)] {
        assert!(!format!("{call:?}").contains("secret-id-4"));
    }
}

#[test]
fn a_refused_approle_login_fails_the_signature_as_login_and_sends_nothing_else() {
    let (mut b, loaded) = signing_setup();
    let c = conn(&loaded, "approle_signed");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    b.dispatch_due(2);
    let (id, _) = one_call(&b);
    b.on_answer(
        id,
        Some(400),
        Some(br#"{"errors":["invalid role or secret ID"]}"#.to_vec()),
        3,
    );
    b.dispatch_due(4);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(signing_stat(&b, "approle_idp", "failure.login"), 1);
    assert_eq!(signing_stat(&b, "approle_idp", "requests"), 0);
    assert!(b
        .proxy
        .logged("provider approle_idp: the signing key's Vault login failed"));
    assert!(!b.proxy.logged("invalid role"));
}
