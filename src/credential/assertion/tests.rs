//! Client assertions as data: the JWT's header and claims exactly, the two key
//! services' sign calls and answers, and that nothing secret shows.

use std::collections::HashSet;

use super::*;
use crate::credential::token_response::MAX_BODY;

const TOKEN_URL: &str = "https://login.test/tenant-1/oauth2/v2.0/token";

fn provider() -> OAuth2Provider {
    OAuth2Provider {
        cluster: "idp".into(),
        token_url: TOKEN_URL.into(),
        authority: "login.test".into(),
        path: "/tenant-1/oauth2/v2.0/token".into(),
        client_id: "app-1234".into(),
        client_secret: None,
        auth_method: crate::config::AuthMethod::TlsClientAuth,
        timeout_ms: 2000,
        default_expires_in_s: 300,
        refresh_margin_s: 5,
        drop_on_401_after_s: 10,
        authorization_url: None,
        issuer: None,
        revocation: None,
    }
}

fn key_vault(alg: JwsAlg) -> SigningKey {
    SigningKey {
        alg,
        kid: "https://signer.vault.azure.net/keys/gw/0a1b".into(),
        x5t_s256: None,
        audience: None,
        service: SigningService::KeyVault {
            cluster: "keyvault".into(),
            authority: "signer.vault.azure.net".into(),
            path: "/keys/gw/0a1b/sign?api-version=7.4".into(),
            identity: 3,
        },
        timeout_ms: 1500,
    }
}

fn transit(alg: JwsAlg, namespace: Option<&str>) -> SigningKey {
    SigningKey {
        alg,
        kid: "gw".into(),
        x5t_s256: None,
        audience: None,
        service: SigningService::VaultTransit {
            cluster: "vault".into(),
            authority: "vault:8200".into(),
            path: "/v1/jwt-transit/sign/gw/sha2-256".into(),
            auth: crate::config::VaultAuth::Token(Secret::new("hvs.transit-token")),
            namespace: namespace.map(str::to_string),
        },
        timeout_ms: 2500,
    }
}

/// One part of a JWT, decoded (base64url without padding, then JSON).
fn part(p: &str) -> Value {
    assert!(!p.contains('='), "padded: {p}");
    serde_json::from_slice(&B64.decode(p).unwrap()).unwrap()
}

fn header_and_claims(input: &str) -> (Value, Value) {
    let (h, c) = input.split_once('.').unwrap();
    assert!(!c.contains('.'), "{input}");
    (part(h), part(c))
}

fn header(call: &HttpCall, name: &str) -> Option<String> {
    call.headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.clone())
}

fn body(call: &HttpCall) -> Value {
    serde_json::from_str(call.body.as_ref().unwrap().expose()).unwrap()
}

#[test]
fn the_signing_input_holds_exactly_the_header_and_claims() {
    let input = signing_input(&provider(), &key_vault(JwsAlg::Rs256), 1_700_000_000, "j-1");
    let (h, c) = header_and_claims(&input);
    assert_eq!(
        h,
        json!({ "alg": "RS256", "typ": "JWT", "kid": "https://signer.vault.azure.net/keys/gw/0a1b" })
    );
    assert_eq!(
        c,
        json!({ "iss": "app-1234", "sub": "app-1234", "aud": TOKEN_URL, "jti": "j-1",
                "iat": 1_700_000_000u64, "exp": 1_700_000_300u64 })
    );
    assert_eq!(LIFETIME_S, 300);
}

#[test]
fn the_header_names_the_algorithm_and_the_thumbprint_and_aud_the_configured_audience() {
    let thumb = "x".repeat(43);
    for (alg, name) in [
        (JwsAlg::Rs256, "RS256"),
        (JwsAlg::Ps256, "PS256"),
        (JwsAlg::Es256, "ES256"),
    ] {
        let mut key = transit(alg, None);
        key.x5t_s256 = Some(thumb.clone());
        key.audience = Some("https://login.test/tenant-1/v2.0".into());
        let input = signing_input(&provider(), &key, 60, "0123");
        let (h, c) = header_and_claims(&input);
        assert_eq!(
            h,
            json!({ "alg": name, "typ": "JWT", "kid": "gw", "x5t#S256": thumb })
        );
        assert_eq!(
            c,
            json!({ "iss": "app-1234", "sub": "app-1234", "aud": "https://login.test/tenant-1/v2.0",
                    "jti": "0123", "iat": 60, "exp": 360 })
        );
    }
}

#[test]
fn a_jti_is_32_hex_digits_from_its_two_halves_and_never_repeats() {
    assert_eq!(jti(0, 0), "0".repeat(32));
    assert_eq!(
        jti(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210),
        "0123456789abcdeffedcba9876543210"
    );
    assert_eq!(jti(1, u64::MAX), "0000000000000001ffffffffffffffff");
    let mut seen = HashSet::new();
    for _ in 0..100_000 {
        let j = jti(crate::consent::random_u64(), crate::consent::random_u64());
        assert_eq!(j.len(), 32, "{j}");
        assert!(
            j.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{j}"
        );
        assert!(seen.insert(j), "a jti repeated");
    }
}

#[test]
fn key_vault_signs_the_sha256_digest_with_the_identity_token() {
    let identity = Secret::new("eyJ.identity-token.sig");
    for (alg, name) in [
        (JwsAlg::Rs256, "RS256"),
        (JwsAlg::Ps256, "PS256"),
        (JwsAlg::Es256, "ES256"),
    ] {
        let c = sign_call(&key_vault(alg), &identity, "abc");
        assert_eq!(c.cluster, "keyvault");
        assert_eq!(c.timeout_ms, 1500);
        assert_eq!(
            c.headers,
            vec![
                (":method", "POST".to_string()),
                (":path", "/keys/gw/0a1b/sign?api-version=7.4".to_string()),
                (":authority", "signer.vault.azure.net".to_string()),
                ("accept", "application/json".to_string()),
                ("content-type", "application/json".to_string()),
            ]
        );
        assert_eq!(c.secret_headers.len(), 1);
        assert_eq!(c.secret_headers[0].0, "authorization");
        assert_eq!(
            c.secret_headers[0].1.expose(),
            "Bearer eyJ.identity-token.sig"
        );
        // SHA-256("abc"), base64url without padding.
        assert_eq!(
            body(&c),
            json!({ "alg": name, "value": "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0" })
        );
        assert!(!format!("{c:?}").contains("identity-token"));
    }
    // The digest of a real signing input, as sha2 makes it.
    let input = signing_input(&provider(), &key_vault(JwsAlg::Rs256), 5, "j");
    let c = sign_call(&key_vault(JwsAlg::Rs256), &identity, &input);
    assert_eq!(
        body(&c)["value"],
        json!(B64.encode(Sha256::digest(input.as_bytes())))
    );
}

#[test]
fn transit_signs_the_input_itself_with_the_vault_token() {
    let token = Secret::new("hvs.transit-token");
    // Standard base64 ('/' and padding), not base64url.
    let c = sign_call(&transit(JwsAlg::Rs256, Some("team-a")), &token, "ab??");
    assert_eq!(c.cluster, "vault");
    assert_eq!(c.timeout_ms, 2500);
    assert_eq!(
        c.headers,
        vec![
            (":method", "POST".to_string()),
            (":path", "/v1/jwt-transit/sign/gw/sha2-256".to_string()),
            (":authority", "vault:8200".to_string()),
            ("accept", "application/json".to_string()),
            ("content-type", "application/json".to_string()),
            ("x-vault-namespace", "team-a".to_string()),
        ]
    );
    assert_eq!(c.secret_headers.len(), 1);
    assert_eq!(c.secret_headers[0].0, "x-vault-token");
    assert_eq!(c.secret_headers[0].1.expose(), "hvs.transit-token");
    assert_eq!(
        body(&c),
        json!({ "input": "YWI/Pw==", "marshaling_algorithm": "jws",
                "signature_algorithm": "pkcs1v15" })
    );
    assert!(!format!("{c:?}").contains("hvs.transit-token"));
    // PSS with the salt as long as the hash; ECDSA takes no signature_algorithm.
    let c = sign_call(&transit(JwsAlg::Ps256, None), &token, "ab??");
    assert_eq!(header(&c, "x-vault-namespace"), None);
    assert_eq!(c.headers.len(), 5);
    assert_eq!(
        body(&c),
        json!({ "input": "YWI/Pw==", "marshaling_algorithm": "jws",
                "signature_algorithm": "pss", "salt_length": "hash" })
    );
    let c = sign_call(&transit(JwsAlg::Es256, None), &token, "ab??");
    assert_eq!(
        body(&c),
        json!({ "input": "YWI/Pw==", "marshaling_algorithm": "jws" })
    );
    // A whole signing input goes as it is, base64 of its bytes.
    let input = signing_input(&provider(), &transit(JwsAlg::Es256, None), 5, "j");
    let c = sign_call(&transit(JwsAlg::Es256, None), &token, &input);
    assert_eq!(body(&c)["input"], json!(STANDARD.encode(&input)));
}

fn sig(len: usize) -> String {
    // 0xff everywhere: base64url all '_', where standard base64 has '/'.
    B64.encode(vec![0xffu8; len])
}

fn kv_answer(sig: &str) -> Vec<u8> {
    json!({ "kid": "https://signer.vault.azure.net/keys/gw/0a1b", "value": sig })
        .to_string()
        .into_bytes()
}

fn transit_answer(signature: &str) -> Vec<u8> {
    json!({ "data": { "signature": signature, "key_version": 1 } })
        .to_string()
        .into_bytes()
}

#[test]
fn a_signature_is_read_from_either_service_s_answer() {
    let es = sig(64);
    assert_eq!(
        parse_signature(&key_vault(JwsAlg::Es256), Some(200), &kv_answer(&es)),
        Ok(es.clone())
    );
    // Transit prefixes it with "vault:v<version>:".
    for version in ["v1", "v12"] {
        assert_eq!(
            parse_signature(
                &transit(JwsAlg::Es256, None),
                Some(200),
                &transit_answer(&format!("vault:{version}:{es}"))
            ),
            Ok(es.clone())
        );
    }
    let rs = sig(256);
    assert_eq!(
        parse_signature(
            &transit(JwsAlg::Rs256, None),
            Some(200),
            &transit_answer(&format!("vault:v1:{rs}"))
        ),
        Ok(rs.clone())
    );
    assert_eq!(
        parse_signature(&key_vault(JwsAlg::Ps256), Some(299), &kv_answer(&rs)),
        Ok(rs)
    );
}

#[test]
fn an_answer_of_the_wrong_shape_is_malformed() {
    let es = sig(64);
    let kv = key_vault(JwsAlg::Es256);
    let tr = transit(JwsAlg::Es256, None);
    let malformed = Err(SignError::Malformed);
    // Each service's answer is not the other's.
    assert_eq!(
        parse_signature(&kv, Some(200), &transit_answer(&format!("vault:v1:{es}"))),
        malformed
    );
    assert_eq!(parse_signature(&tr, Some(200), &kv_answer(&es)), malformed);
    for body in [
        b"not json".to_vec(),
        b"".to_vec(),
        json!({ "value": 5 }).to_string().into_bytes(),
        json!({ "data": { "signature": 5 } })
            .to_string()
            .into_bytes(),
    ] {
        assert_eq!(parse_signature(&kv, Some(200), &body), malformed);
        assert_eq!(parse_signature(&tr, Some(200), &body), malformed);
    }
    // Transit's prefix is required, and its version part.
    for s in [
        es.clone(),
        format!("v1:{es}"),
        format!("vault:{es}"),
        format!("Vault:v1:{es}"),
    ] {
        assert_eq!(
            parse_signature(&tr, Some(200), &transit_answer(&s)),
            malformed,
            "{s}"
        );
    }
}

#[test]
fn a_signature_must_be_unpadded_base64url_of_the_algorithm_s_size() {
    let cases: &[(JwsAlg, usize, bool)] = &[
        (JwsAlg::Es256, 63, false),
        (JwsAlg::Es256, 64, true),
        (JwsAlg::Es256, 65, false),
        (JwsAlg::Es256, 256, false),
        (JwsAlg::Rs256, 64, false),
        (JwsAlg::Rs256, 255, false),
        (JwsAlg::Rs256, 256, true),
        (JwsAlg::Rs256, 512, true),
        (JwsAlg::Rs256, 1024, true),
        (JwsAlg::Rs256, 1025, false),
        (JwsAlg::Ps256, 255, false),
        (JwsAlg::Ps256, 256, true),
        (JwsAlg::Ps256, 1024, true),
        (JwsAlg::Ps256, 1025, false),
    ];
    for &(alg, len, ok) in cases {
        let s = sig(len);
        for key in [key_vault(alg), transit(alg, None)] {
            let answer = match key.service {
                SigningService::KeyVault { .. } => kv_answer(&s),
                SigningService::VaultTransit { .. } => transit_answer(&format!("vault:v1:{s}")),
            };
            let want = if ok {
                Ok(s.clone())
            } else {
                Err(SignError::Malformed)
            };
            assert_eq!(
                parse_signature(&key, Some(200), &answer),
                want,
                "{alg:?} {len}"
            );
        }
    }
    // Padding, or the standard alphabet: not as a JWS holds it.
    let kv = key_vault(JwsAlg::Es256);
    let raw = vec![0xffu8; 64];
    for s in [
        STANDARD.encode(&raw),                                   // "////…==": both
        STANDARD.encode(&raw).trim_end_matches('=').to_string(), // '/' only
        format!("{}==", B64.encode(&raw)),                       // padding only
        format!("{} ", B64.encode(&raw)),
    ] {
        assert_eq!(
            parse_signature(&kv, Some(200), &kv_answer(&s)),
            Err(SignError::Malformed),
            "{s}"
        );
    }
}

#[test]
fn refusals_and_transport_failures_have_their_kind_and_never_show_the_body() {
    let kv = key_vault(JwsAlg::Es256);
    let tr = transit(JwsAlg::Es256, None);
    let body = br#"{"errors":["permission denied: SECRET-BODY-TEXT"]}"#;
    let cases: &[(Option<u32>, &[u8], SignError, &str)] = &[
        (Some(401), body, SignError::Forbidden(401), "forbidden (HTTP 401)"),
        (Some(403), body, SignError::Forbidden(403), "forbidden (HTTP 403)"),
        (Some(500), body, SignError::Status(500), "status (HTTP 500)"),
        (Some(404), body, SignError::Status(404), "status (HTTP 404)"),
        (Some(400), body, SignError::Status(400), "status (HTTP 400)"),
        (Some(302), body, SignError::Status(302), "status (HTTP 302)"),
        (Some(199), body, SignError::Status(199), "status (HTTP 199)"),
        // Envoy's own answers when the service can't be reached.
        (None, b"", SignError::Connect, "connect"),
        (
            Some(503),
            b"upstream connect error or disconnect/reset before headers. reset reason: connection failure",
            SignError::Connect,
            "connect",
        ),
        (Some(504), b"upstream request timeout", SignError::Timeout, "timeout"),
        // A 503 or 504 of the service itself is its status.
        (Some(503), body, SignError::Status(503), "status (HTTP 503)"),
        (Some(504), body, SignError::Status(504), "status (HTTP 504)"),
    ];
    for (status, answer, want, shown) in cases {
        for key in [&kv, &tr] {
            let e = parse_signature(key, *status, answer).unwrap_err();
            assert_eq!(e, *want, "{status:?}");
            assert_eq!(e.to_string(), *shown);
            assert!(!e.to_string().contains("SECRET-BODY-TEXT"));
        }
    }
    // An answer past the body limit: not read at all, and no signature answer.
    let mut huge = kv_answer(&sig(64));
    huge.resize(MAX_BODY + 1, b' ');
    assert_eq!(
        parse_signature(&kv, Some(200), &huge),
        Err(SignError::Malformed)
    );
    huge.truncate(MAX_BODY);
    assert_eq!(parse_signature(&kv, Some(200), &huge), Ok(sig(64)));
    // A well-formed signature with a refusal's status is still refused.
    assert_eq!(
        parse_signature(&kv, Some(403), &kv_answer(&sig(64))),
        Err(SignError::Forbidden(403))
    );
    let malformed = parse_signature(&kv, Some(200), b"SECRET-BODY-TEXT").unwrap_err();
    assert_eq!(malformed.to_string(), "malformed");
}

#[test]
fn every_sign_error_has_its_kind_listed() {
    let all = [
        SignError::Connect,
        SignError::Timeout,
        SignError::Forbidden(403),
        SignError::Status(500),
        SignError::Malformed,
    ];
    let kinds: Vec<&str> = all.iter().map(SignError::kind).collect();
    assert_eq!(kinds, SignError::KINDS);
    assert_eq!(
        SignError::KINDS,
        ["connect", "timeout", "forbidden", "status", "malformed"]
    );
    assert_eq!(SignError::Connect.to_string(), "connect");
    assert_eq!(SignError::Timeout.to_string(), "timeout");
    assert_eq!(SignError::Malformed.to_string(), "malformed");
}

#[test]
fn the_signed_assertion_is_the_input_then_the_signature() {
    let input = signing_input(&provider(), &transit(JwsAlg::Es256, None), 7, "j");
    let s = sig(64);
    let jwt = assemble(&input, &s);
    assert_eq!(jwt.expose(), format!("{input}.{s}"));
    let parts: Vec<&str> = jwt.expose().split('.').collect();
    assert_eq!(parts.len(), 3);
    assert_eq!(B64.decode(parts[2]).unwrap(), vec![0xffu8; 64]);
    assert!(!format!("{jwt:?}").contains(&s));
}
