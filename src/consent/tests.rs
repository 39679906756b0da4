//! The pure parts of a consent: caller hashes, signed states, PKCE, the login
//! URL, which `return_to` is allowed, used states, the callback's query and
//! which requests are consent endpoints. Configurations as users write them.

use serde_json::{json, Value};

use super::*;

const KEY: &str = "0123456789abcdef0123456789abcdef";

fn key() -> Secret {
    Secret::new(KEY)
}

/// SPEC's example: a per-user connection, a shared one, and one of another grant.
fn spec() -> Value {
    json!({
        "claims": { "from": "header", "key": "x-jwt-payload" },
        "secrets": {
            "github_secret": { "inline": "gh-client-secret" },
            "vault_token": { "inline": "vault-token-1" },
            "consent_state_key": { "inline": KEY }
        },
        "providers": {
            "github": { "type": "oauth2", "cluster": "github",
                        "authorization_url": "https://github.com/login/oauth/authorize?allow_signup=false",
                        "token_url": "https://github.com/login/oauth/access_token",
                        "client_id": "Iv1.8a61f9b3a7aba766", "client_secret": "github_secret" },
            "crm": { "type": "oauth2", "cluster": "crm",
                     "authorization_url": "https://login.crm.example/oauth/authorize",
                     "token_url": "https://login.crm.example/oauth/token",
                     "client_id": "crm-gw", "client_secret": "github_secret" },
            "keys": { "type": "api_key" }
        },
        "token_stores": {
            "user_tokens": { "vault": { "cluster": "vault", "url": "http://vault.internal:8200",
                                        "mount": "secret", "prefix": "latchkey/connections",
                                        "token": "vault_token" } }
        },
        "consent": { "path": "/.latchkey/connections",
                     "redirect_uri": "https://api.example.com/.latchkey/callback",
                     "state_key": "consent_state_key",
                     "return_to": ["https://portal.example.com/"] },
        "connections": {
            "github_mine": { "provider": "github", "grant": "authorization_code", "per_user": true,
                             "scopes": ["repo", "read:user"], "store": "user_tokens",
                             "audience": "https://api.github.com", "resource": "urn:github:api",
                             "extra_params": { "prompt": "consent" },
                             "access": { "authenticated": true } },
            "crm_team": { "provider": "crm", "grant": "authorization_code", "store": "user_tokens",
                          "consent": { "groups": ["crm-admins"] }, "access": { "groups": ["sales"] } },
            "orders": { "provider": "github", "grant": "client_credentials",
                        "access": { "authenticated": true } },
            "partner": { "provider": "keys", "api_key": "github_secret",
                         "access": { "authenticated": true } }
        }
    })
}

fn load(v: Value) -> Config {
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn consent_of(c: &Config) -> &Consent {
    c.consent.as_ref().unwrap()
}

fn index(c: &Config, name: &str) -> usize {
    c.connections.iter().position(|k| k.name == name).unwrap()
}

fn state(nonce: &str, expires_ms: u64) -> State {
    State {
        connection: "github_mine".into(),
        caller: "abc".into(),
        nonce: nonce.into(),
        expires_ms,
        return_to: None,
    }
}

#[test]
fn a_caller_is_128_bits_of_sha256_over_issuer_and_subject() {
    // Pinned: stores key every consent by it, so it never changes.
    assert_eq!(
        caller_hash("https://issuer", "alice"),
        "2d93b77e4c54af105763c3d12c9e1f18"
    );
    assert_eq!(caller_hash("", "alice"), "ae089b124564165024ece6eafb6338fd");
    // The same subject at another issuer is another caller; the separator
    // keeps the two parts apart.
    assert_ne!(
        caller_hash("https://a", "bob"),
        caller_hash("https://b", "bob")
    );
    assert_ne!(caller_hash("ab", "c"), caller_hash("a", "bc"));
    assert_ne!(caller_hash("i", "alice"), caller_hash("i", "bob"));
}

#[test]
fn random_nonces_differ() {
    let a = random_u64();
    let b = random_u64();
    let c = random_u64();
    assert!(a != b && b != c && a != c, "{a} {b} {c}");
}

#[test]
fn a_state_is_signed_payload_dot_tag_and_verifies_until_it_expires() {
    let signed = sign_state(&key(), &state("n-1", 1000));
    // base64url(JSON) "." base64url(HMAC-SHA256(key, "latchkey.state\0" payload)), pinned.
    assert_eq!(
        signed,
        "eyJjIjoiZ2l0aHViX21pbmUiLCJ1IjoiYWJjIiwibiI6Im4tMSIsImUiOjEwMDB9.0ZD1ZGcJLT0HQXEtJfuOqlvAWRQDTxdUXKbX0sMVP-k"
    );
    assert_eq!(verify_state(&key(), &signed, 0), Ok(state("n-1", 1000)));
    assert_eq!(verify_state(&key(), &signed, 999), Ok(state("n-1", 1000)));
    // Expired at exactly its expiry.
    assert_eq!(
        verify_state(&key(), &signed, 1000),
        Err(StateError::Expired)
    );
    assert_eq!(
        verify_state(&key(), &signed, 5000),
        Err(StateError::Expired)
    );
    // return_to travels in the state.
    let mut s = state("n-2", 1000);
    s.return_to = Some("https://portal.example.com/x".into());
    let signed = sign_state(&key(), &s);
    let payload = B64.decode(signed.split('.').next().unwrap()).unwrap();
    let json: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        json,
        json!({ "c": "github_mine", "u": "abc", "n": "n-2", "e": 1000,
                "r": "https://portal.example.com/x" })
    );
    assert_eq!(verify_state(&key(), &signed, 1), Ok(s));
}

#[test]
fn a_tampered_forged_or_malformed_state_is_refused() {
    let signed = sign_state(&key(), &state("n-1", 1000));
    let (payload, tag) = signed.split_once('.').unwrap();
    // Another payload under the same tag: the caller changed.
    let other = B64.encode(
        serde_json::to_vec(&State {
            caller: "mallory".into(),
            ..state("n-1", 1000)
        })
        .unwrap(),
    );
    assert_eq!(
        verify_state(&key(), &format!("{other}.{tag}"), 0),
        Err(StateError::BadSignature)
    );
    // The tag changed (one character), or cut short, or not base64url.
    let mut bad_tag = tag.to_string();
    let last = if bad_tag.ends_with('A') { "B" } else { "A" };
    bad_tag.replace_range(0..1, last);
    for t in [bad_tag.as_str(), &tag[..20], "!!!", ""] {
        assert_eq!(
            verify_state(&key(), &format!("{payload}.{t}"), 0),
            Err(StateError::BadSignature),
            "{t}"
        );
    }
    // Another key's state.
    let other_key = Secret::new("another-key-of-at-least-32-bytes!!");
    assert_eq!(
        verify_state(&other_key, &signed, 0),
        Err(StateError::BadSignature)
    );
    // No dot at all.
    assert_eq!(
        verify_state(&key(), payload, 0),
        Err(StateError::BadSignature)
    );
    assert_eq!(verify_state(&key(), "", 0), Err(StateError::BadSignature));
    // Signed with the key, but not a state: malformed.
    let sign = |payload: &str| {
        let tag = mac(&key(), b"latchkey.state\0", payload.as_bytes()).unwrap();
        format!("{payload}.{}", B64.encode(tag.finalize().into_bytes()))
    };
    let not_a_state = B64.encode(br#"{"c":"x"}"#);
    for text in [
        sign(&not_a_state),
        sign("%%%"),
        sign(&B64.encode(b"not json")),
    ] {
        assert_eq!(
            verify_state(&key(), &text, 0),
            Err(StateError::Malformed),
            "{text}"
        );
    }
    // A tag of the PKCE domain is not a state's tag.
    let pkce_tag = mac(&key(), b"latchkey.pkce\0", payload.as_bytes()).unwrap();
    let text = format!("{payload}.{}", B64.encode(pkce_tag.finalize().into_bytes()));
    assert_eq!(
        verify_state(&key(), &text, 0),
        Err(StateError::BadSignature)
    );
}

#[test]
fn state_errors_have_reasons() {
    assert_eq!(StateError::BadSignature.reason(), "state_invalid");
    assert_eq!(StateError::Malformed.reason(), "state_invalid");
    assert_eq!(StateError::Expired.reason(), "state_expired");
}

#[test]
fn pkce_s256_follows_rfc_7636() {
    // RFC 7636 Appendix B.
    assert_eq!(
        pkce_challenge(&Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")),
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    );
    // The verifier: HMAC-SHA256(key, "latchkey.pkce\0" nonce), base64url: 43 characters.
    let v = pkce_verifier(&key(), "n-1");
    assert_eq!(v.expose(), "AXwL73ot3B8Yt0IbxazorY3DKGEPOU2M8vhPlHWJ3DI");
    assert_eq!(
        pkce_challenge(&v),
        "iexAOoMmZ5g2f9SwZHleMy7VQxku0YoqpBRwiaXNmjE"
    );
    for nonce in ["n-1", "n-2", "0123456789abcdef0123456789abcdef"] {
        let v = pkce_verifier(&key(), nonce);
        assert_eq!(v.expose().len(), 43);
        assert!(v
            .expose()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        // The same nonce and key: the same verifier (any proxy finishes the login).
        assert_eq!(pkce_verifier(&key(), nonce), v);
    }
    // Per nonce and per key.
    assert_ne!(pkce_verifier(&key(), "n-1"), pkce_verifier(&key(), "n-2"));
    let other = Secret::new("another-key-of-at-least-32-bytes!!");
    assert_ne!(pkce_verifier(&key(), "n-1"), pkce_verifier(&other, "n-1"));
}

#[test]
fn the_login_location_has_every_parameter_after_the_providers_own_query() {
    let c = load(spec());
    let consent = consent_of(&c);
    let s = state("n-1", 1000);
    let signed = sign_state(&consent.state_key, &s);
    let mine = &c.connections[index(&c, "github_mine")];
    let url = login_location(&c, consent, mine, &s, &signed).unwrap();
    assert_eq!(
        url,
        format!(
            "https://github.com/login/oauth/authorize?allow_signup=false\
             &response_type=code&client_id=Iv1.8a61f9b3a7aba766\
             &redirect_uri=https%3A%2F%2Fapi.example.com%2F.latchkey%2Fcallback\
             &scope=repo+read%3Auser&state={signed}\
             &code_challenge=iexAOoMmZ5g2f9SwZHleMy7VQxku0YoqpBRwiaXNmjE\
             &code_challenge_method=S256\
             &audience=https%3A%2F%2Fapi.github.com&resource=urn%3Agithub%3Aapi&prompt=consent"
        )
    );
    // No scopes, audience, resource or extra parameters: none sent; an
    // authorization URL without a query gets one.
    let team_i = index(&c, "crm_team");
    let team = &c.connections[team_i];
    let tail = format!(
        "response_type=code&client_id=crm-gw\
         &redirect_uri=https%3A%2F%2Fapi.example.com%2F.latchkey%2Fcallback\
         &state={signed}\
         &code_challenge=iexAOoMmZ5g2f9SwZHleMy7VQxku0YoqpBRwiaXNmjE\
         &code_challenge_method=S256"
    );
    assert_eq!(
        login_location(&c, consent, team, &s, &signed).unwrap(),
        format!("https://login.crm.example/oauth/authorize?{tail}")
    );
    // A query that ends in "?" or "&" is followed at once.
    let mut c2 = load(spec());
    for (base, want) in [
        (
            "https://login.crm.example/a?",
            "https://login.crm.example/a?",
        ),
        (
            "https://login.crm.example/a?x=1&",
            "https://login.crm.example/a?x=1&",
        ),
        (
            "https://login.crm.example/a?x=1",
            "https://login.crm.example/a?x=1&",
        ),
    ] {
        let p = c2.connections[team_i].provider;
        let ProviderKind::OAuth2(op) = &mut c2.providers[p].kind else {
            panic!("not oauth2")
        };
        op.authorization_url = Some(base.to_string());
        let team = &c2.connections[team_i];
        assert_eq!(
            login_location(&c2, consent_of(&c2), team, &s, &signed).unwrap(),
            format!("{want}{tail}")
        );
    }
    // Not an oauth2 connection: no login.
    let partner = &c.connections[index(&c, "partner")];
    assert_eq!(login_location(&c, consent, partner, &s, &signed), None);
}

#[test]
fn a_provider_without_authorization_url_has_no_login() {
    let mut v = spec();
    v["providers"]["plain"] = json!({ "type": "oauth2", "cluster": "idp",
        "token_url": "https://idp/token", "client_id": "gw", "client_secret": "github_secret" });
    v["connections"]["orders"]["provider"] = json!("plain");
    let c = load(v);
    let s = state("n-1", 1000);
    let orders = &c.connections[index(&c, "orders")];
    assert_eq!(login_location(&c, consent_of(&c), orders, &s, "x.y"), None);
}

#[test]
fn return_to_must_be_under_a_prefix_exactly_as_written() {
    let prefixes = vec![
        "https://portal.example.com/".to_string(),
        "https://app.example.com/settings/".to_string(),
    ];
    let ok = |u: &str| allowed_return_to(&prefixes, u);
    for good in [
        "https://portal.example.com/",
        "https://portal.example.com/connections?done=github#top",
        "https://portal.example.com//x@y",
        "https://app.example.com/settings/",
        "https://app.example.com/settings/github",
    ] {
        assert_eq!(ok(good).as_deref(), Some(good), "{good}");
    }
    for bad in [
        // Another host that merely starts alike.
        "https://portal.example.com.evil/",
        "https://portal.example.com.evil.example/x",
        // Another scheme, port or path outside the prefix.
        "http://portal.example.com/",
        "https://portal.example.com:8443/",
        "https://app.example.com/settings",
        "https://app.example.com/other/",
        // User info.
        "https://user@portal.example.com/",
        "https://:pw@portal.example.com/",
        "https://portal.example.com@evil.example/",
        // Written otherwise than the prefix.
        "https://portal.example.com",
        "https://PORTAL.example.com/",
        "https://portal.example.com:443/",
        // Only printable ASCII, and no backslash a browser reads as "/".
        "https://portal.example.com/a b",
        "https://portal.example.com/\\evil.example",
        "https://portal.example.com/\tx",
        "https://portal.example.com/\u{e9}",
        "https://portal.example.com/x\n",
        "https:\\\\portal.example.com/",
        " https://portal.example.com/",
        // Not a URL at all.
        "/relative/path",
        "javascript:alert(1)",
        "",
    ] {
        assert_eq!(ok(bad), None, "{bad}");
    }
    assert_eq!(allowed_return_to(&[], "https://portal.example.com/"), None);
}

#[test]
fn return_to_is_at_most_2048_bytes() {
    let prefixes = vec!["https://portal.example.com/".to_string()];
    let base = "https://portal.example.com/";
    let longest = format!("{base}{}", "a".repeat(2048 - base.len()));
    assert_eq!(longest.len(), 2048);
    assert_eq!(
        allowed_return_to(&prefixes, &longest).as_deref(),
        Some(longest.as_str())
    );
    let over = format!("{longest}a");
    assert_eq!(allowed_return_to(&prefixes, &over), None);
}

#[test]
fn a_state_is_admitted_once_and_forgotten_when_it_expires() {
    let mut used = Used::default();
    assert_eq!(used.admit(&state("n-1", 100), 10), Ok(()));
    assert_eq!(used.admit(&state("n-1", 100), 11), Err(Replay::Replayed));
    assert_eq!(used.admit(&state("n-2", 200), 12), Ok(()));
    assert_eq!(
        used.0,
        vec![("n-1".to_string(), 100), ("n-2".to_string(), 200)]
    );
    // Still valid one ms before it expires: kept.
    assert_eq!(used.admit(&state("n-2", 200), 99), Err(Replay::Replayed));
    assert_eq!(used.0.len(), 2);
    // At its expiry it goes (its state can't verify any more).
    assert_eq!(used.admit(&state("n-3", 300), 100), Ok(()));
    assert_eq!(
        used.0,
        vec![("n-2".to_string(), 200), ("n-3".to_string(), 300)]
    );
    // What is kept survives shared data.
    let bytes = used.encode();
    assert_eq!(Used::decode(&bytes), used);
    // Anything unreadable (a pre-created empty value) is an empty list.
    assert_eq!(Used::decode(b""), Used::default());
    assert_eq!(Used::decode(b"{oops"), Used::default());
}

#[test]
fn a_full_list_refuses_new_states_rather_than_forget_valid_ones() {
    let mut used = Used(
        (0..MAX_USED_STATES - 1)
            .map(|i| (format!("n{i}"), 1000))
            .collect(),
    );
    // One place left.
    assert_eq!(used.admit(&state("last", 1000), 0), Ok(()));
    assert_eq!(used.0.len(), MAX_USED_STATES);
    // Full: refused, and not remembered.
    assert_eq!(used.admit(&state("more", 1000), 1), Err(Replay::Full));
    assert_eq!(used.0.len(), MAX_USED_STATES);
    // A replay is still told apart from a full list.
    assert_eq!(used.admit(&state("n7", 1000), 1), Err(Replay::Replayed));
    // Once one expires, there is room again.
    used.0[0].1 = 5;
    assert_eq!(used.admit(&state("more", 1000), 5), Ok(()));
    assert_eq!(used.0.len(), MAX_USED_STATES);
    assert!(used.0.iter().all(|(n, _)| n != "n0"));
}

#[test]
fn the_callback_query_is_read_strictly() {
    let p = callback_params(b"code=a%2Bb+c&state=s.t&iss=https%3A%2F%2Fidp&x=1&x=2&scope=repo")
        .unwrap();
    assert_eq!(p.code.as_ref().map(Secret::expose), Some("a+b c"));
    assert_eq!(p.state.as_deref(), Some("s.t"));
    assert_eq!(p.iss.as_deref(), Some("https://idp"));
    assert_eq!(p.error, None);
    let p = callback_params(b"error=access_denied&state=s").unwrap();
    assert_eq!(p.error.as_deref(), Some("access_denied"));
    assert_eq!(p.code, None);
    assert_eq!(callback_params(b"").unwrap(), CallbackParams::default());
    // A parameter latchkey reads, twice: two readings of one request.
    for twice in [
        "code=a&code=b&state=s",
        "code=a&state=s&state=t",
        "code=a&state=s&error=x&error=y",
        "code=a&state=s&iss=i&iss=j",
        "code=a&state=s&code=a",
    ] {
        assert_eq!(callback_params(twice.as_bytes()), None, "{twice}");
    }
}

#[test]
fn consent_endpoints_are_exactly_the_configured_paths() {
    let c = load(spec());
    let consent = consent_of(&c);
    let (mine, team) = (index(&c, "github_mine"), index(&c, "crm_team"));
    let at = |method: &str, path: &str| endpoint(&c, consent, method, path.as_bytes());
    assert_eq!(
        at("GET", "/.latchkey/connections/github_mine/login"),
        Some(Endpoint::Login(mine))
    );
    assert_eq!(
        at("GET", "/.latchkey/connections/crm_team/login"),
        Some(Endpoint::Login(team))
    );
    assert_eq!(
        at("DELETE", "/.latchkey/connections/github_mine"),
        Some(Endpoint::Disconnect(mine))
    );
    assert_eq!(
        at("DELETE", "/.latchkey/connections/crm_team"),
        Some(Endpoint::Disconnect(team))
    );
    assert_eq!(at("GET", "/.latchkey/callback"), Some(Endpoint::Callback));
    // Under the path but none of those: answered by latchkey, never forwarded.
    for (method, path) in [
        ("POST", "/.latchkey/connections/github_mine/login"),
        ("HEAD", "/.latchkey/connections/github_mine/login"),
        ("DELETE", "/.latchkey/connections/github_mine/login"),
        ("GET", "/.latchkey/connections/github_mine"),
        ("POST", "/.latchkey/connections/github_mine"),
        ("GET", "/.latchkey/connections/nope/login"),
        ("DELETE", "/.latchkey/connections/nope"),
        // Connections of other grants have no consent.
        ("GET", "/.latchkey/connections/orders/login"),
        ("DELETE", "/.latchkey/connections/orders"),
        ("GET", "/.latchkey/connections/partner/login"),
        ("GET", "/.latchkey/connections"),
        ("GET", "/.latchkey/connections/"),
        ("GET", "/.latchkey/connections/github_mine/login/"),
        ("GET", "/.latchkey/connections//github_mine/login"),
        ("GET", "/.latchkey/connections/github_mine/x/login"),
        ("POST", "/.latchkey/callback"),
        ("DELETE", "/.latchkey/callback"),
    ] {
        assert_eq!(at(method, path), Some(Endpoint::Unknown), "{method} {path}");
    }
    // Paths that merely share a prefix are not latchkey's.
    for path in [
        "/.latchkey/connectionsX",
        "/.latchkey/connectionsX/github_mine/login",
        "/.latchkey/callbackX",
        "/.latchkey/callback/",
        "/.latchkey",
        "/github_mine/login",
        "/",
    ] {
        assert_eq!(at("GET", path), None, "{path}");
    }
}

#[test]
fn which_connections_are_delegated_and_per_user_and_their_login_path() {
    let c = load(spec());
    let by = |n: &str| &c.connections[index(&c, n)];
    assert!(is_delegated(by("github_mine")) && is_per_user(by("github_mine")));
    assert!(is_delegated(by("crm_team")) && !is_per_user(by("crm_team")));
    assert!(!is_delegated(by("orders")) && !is_per_user(by("orders")));
    assert!(!is_delegated(by("partner")) && !is_per_user(by("partner")));
    assert_eq!(
        login_path(consent_of(&c), by("crm_team")),
        "/.latchkey/connections/crm_team/login"
    );
    assert_eq!(SHARED, "shared");
}

#[test]
fn return_to_never_resolves_out_of_its_prefix() {
    let prefixes = vec!["https://app.example.com/settings/".to_string()];
    for bad in [
        "https://app.example.com/settings/../admin",
        "https://app.example.com/settings/./x",
        "https://app.example.com/settings/a/..",
        "https://app.example.com/settings/%2e%2e/admin",
        "https://app.example.com/settings/%2E./admin",
        "https://app.example.com/settings/.%2e/admin",
    ] {
        assert_eq!(allowed_return_to(&prefixes, bad), None, "{bad}");
    }
    // Dots in a segment, the query or the fragment are just characters.
    for good in [
        "https://app.example.com/settings/a.b/..c",
        "https://app.example.com/settings/x?next=../y",
        "https://app.example.com/settings/x#/../y",
    ] {
        assert_eq!(
            allowed_return_to(&prefixes, good).as_deref(),
            Some(good),
            "{good}"
        );
    }
}
