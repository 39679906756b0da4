//! The token request (RFC 6749 §4.4, §6; RFC 8693 §2.1) built as data.
//!
//! Client authentication follows RFC 6749 §2.3.1: with `client_secret_basic` the
//! client id and secret are each form-urlencoded, joined by `:` and base64-encoded
//! into `Authorization: Basic`; with `client_secret_post` they are form fields.

use base64::Engine;
use url::form_urlencoded;

use crate::config::{AuthMethod, Grant, OAuth2Connection, OAuth2Provider, SecretRef};
use crate::secret::Secret;

pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// What the grant needs from outside the configuration.
#[derive(Debug, Clone, Copy)]
pub enum GrantInput<'a> {
    /// `client_credentials`.
    None,
    /// `refresh_token`: the current refresh token (rotated ones replace the configured one).
    RefreshToken(&'a Secret),
    /// `token_exchange`: the caller's own bearer token.
    SubjectToken(&'a Secret),
    /// `authorization_code`: the code a consent brought back (RFC 6749 §4.1.3,
    /// RFC 7636 §4.5).
    Code {
        code: &'a Secret,
        verifier: &'a Secret,
        redirect_uri: &'a str,
    },
}

/// One POST to the token endpoint. `Debug` shows no secret: the body and the
/// `authorization` value are [`Secret`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cluster: String,
    /// `:method`, `:path`, `:authority`, `content-type`, `accept`.
    pub headers: Vec<(&'static str, String)>,
    pub authorization: Option<Secret>,
    pub body: Secret,
    pub timeout_ms: u64,
}

/// What the client authenticates with, now (the provider's `auth_method` says how).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCredential {
    /// `client_secret_basic` / `client_secret_post`: its current secret (perhaps from a store).
    Secret(Secret),
    /// `client_assertion` / `private_key_jwt`: the JWT to send (RFC 7521 §4.2).
    Assertion(Secret),
    /// `tls_client_auth`: the certificate the cluster presents; nothing in the request.
    None,
}

/// RFC 7521 §4.2: the assertion is a JWT bearer token.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// `client` is how the provider's client authenticates now.
pub fn build(
    provider: &OAuth2Provider,
    client: &ClientCredential,
    conn: &OAuth2Connection,
    input: GrantInput,
) -> TokenRequest {
    let mut form = form_urlencoded::Serializer::new(String::new());
    match (&conn.grant, input) {
        (Grant::RefreshToken(configured), input) => {
            // The glue passes the current one (rotated, or read from a store).
            let current = match (input, configured) {
                (GrantInput::RefreshToken(rt), _) => Some(rt),
                (_, SecretRef::Value(rt)) => Some(rt),
                (_, SecretRef::Store(_)) => None,
            };
            form.append_pair("grant_type", "refresh_token");
            if let Some(rt) = current {
                form.append_pair("refresh_token", rt.expose());
            }
        }
        (Grant::TokenExchange { subject_token_type }, input) => {
            form.append_pair("grant_type", GRANT_TOKEN_EXCHANGE);
            if let GrantInput::SubjectToken(subject) = input {
                form.append_pair("subject_token", subject.expose());
            }
            form.append_pair("subject_token_type", subject_token_type);
        }
        (Grant::ClientCredentials, _) => {
            form.append_pair("grant_type", "client_credentials");
        }
        (
            Grant::AuthorizationCode { .. },
            GrantInput::Code {
                code,
                verifier,
                redirect_uri,
            },
        ) => {
            form.append_pair("grant_type", "authorization_code");
            form.append_pair("code", code.expose());
            form.append_pair("redirect_uri", redirect_uri);
            form.append_pair("code_verifier", verifier.expose());
        }
        (Grant::AuthorizationCode { .. }, input) => {
            form.append_pair("grant_type", "refresh_token");
            if let GrantInput::RefreshToken(rt) = input {
                form.append_pair("refresh_token", rt.expose());
            }
        }
    }
    // A code is redeemed for what the consent granted: the scope was asked for then.
    if !conn.scopes.is_empty() && !matches!(input, GrantInput::Code { .. }) {
        form.append_pair("scope", &conn.scopes.join(" "));
    }
    if let Some(a) = &conn.audience {
        form.append_pair("audience", a);
    }
    if let Some(r) = &conn.resource {
        form.append_pair("resource", r);
    }
    for (k, v) in &conn.extra_params {
        form.append_pair(k, v);
    }
    finish(provider, client, form, &provider.path)
}

/// RFC 7009 §2.1: revoking a refresh token at the provider's `revocation_url`,
/// with the same client authentication as its token requests. `None` without one.
pub fn revocation(
    provider: &OAuth2Provider,
    client: &ClientCredential,
    refresh_token: &Secret,
) -> Option<TokenRequest> {
    let endpoint = provider.revocation.as_ref()?;
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", refresh_token.expose());
    form.append_pair("token_type_hint", "refresh_token");
    let mut req = finish(provider, client, form, &endpoint.path);
    if let Some(h) = req.headers.iter_mut().find(|(k, _)| *k == ":authority") {
        h.1 = endpoint.authority.clone();
    }
    Some(req)
}

/// The client's authentication added (RFC 6749 §2.3.1, RFC 7521 §4.2, RFC 8705
/// §2: every method but `client_secret_basic` names `client_id` in the form),
/// and the POST to `path`.
fn finish(
    provider: &OAuth2Provider,
    client: &ClientCredential,
    mut form: form_urlencoded::Serializer<'_, String>,
    path: &str,
) -> TokenRequest {
    let authorization = match (&provider.auth_method, client) {
        (AuthMethod::ClientSecretBasic, ClientCredential::Secret(secret)) => {
            let id: String =
                form_urlencoded::byte_serialize(provider.client_id.as_bytes()).collect();
            let secret: String =
                form_urlencoded::byte_serialize(secret.expose().as_bytes()).collect();
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
            Some(Secret::new(format!("Basic {encoded}")))
        }
        (AuthMethod::ClientSecretPost, ClientCredential::Secret(secret)) => {
            form.append_pair("client_id", &provider.client_id);
            form.append_pair("client_secret", secret.expose());
            None
        }
        (_, ClientCredential::Assertion(jwt)) => {
            form.append_pair("client_id", &provider.client_id);
            form.append_pair("client_assertion_type", CLIENT_ASSERTION_TYPE);
            form.append_pair("client_assertion", jwt.expose());
            None
        }
        // tls_client_auth (or a credential that doesn't fit the method: then the
        // server refuses the client, and nothing secret was sent).
        _ => {
            form.append_pair("client_id", &provider.client_id);
            None
        }
    };
    TokenRequest {
        cluster: provider.cluster.clone(),
        headers: vec![
            (":method", "POST".to_string()),
            (":path", path.to_string()),
            (":authority", provider.authority.clone()),
            (
                "content-type",
                "application/x-www-form-urlencoded".to_string(),
            ),
            ("accept", "application/json".to_string()),
        ],
        authorization,
        body: Secret::new(form.finish()),
        timeout_ms: provider.timeout_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(auth_method: AuthMethod) -> OAuth2Provider {
        OAuth2Provider {
            cluster: "idp".into(),
            token_url: "https://idp.test:8443/oauth/token?tenant=a".into(),
            authority: "idp.test:8443".into(),
            path: "/oauth/token?tenant=a".into(),
            client_id: "gw client".into(),
            client_secret: Some(crate::config::SecretRef::Value(Secret::new("s3cr:t/+"))),
            auth_method,
            timeout_ms: 2000,
            default_expires_in_s: 300,
            refresh_margin_s: 5,
            drop_on_401_after_s: 10,
            authorization_url: None,
            issuer: None,
            revocation: None,
        }
    }

    #[allow(non_snake_case)]
    fn SECRET() -> ClientCredential {
        ClientCredential::Secret(Secret::new("s3cr:t/+"))
    }

    fn conn(grant: Grant) -> OAuth2Connection {
        OAuth2Connection {
            grant,
            scopes: vec!["orders.read".into(), "orders.write".into()],
            audience: Some("https://api.test".into()),
            resource: Some("urn:api".into()),
            extra_params: vec![("tenant".into(), "a&b".into())],
        }
    }

    #[test]
    fn client_credentials_with_basic_auth_whole_request() {
        let r = build(
            &provider(AuthMethod::ClientSecretBasic),
            &SECRET(),
            &conn(Grant::ClientCredentials),
            GrantInput::None,
        );
        assert_eq!(r.cluster, "idp");
        assert_eq!(r.timeout_ms, 2000);
        assert_eq!(
            r.headers,
            vec![
                (":method", "POST".to_string()),
                (":path", "/oauth/token?tenant=a".to_string()),
                (":authority", "idp.test:8443".to_string()),
                (
                    "content-type",
                    "application/x-www-form-urlencoded".to_string()
                ),
                ("accept", "application/json".to_string()),
            ]
        );
        assert_eq!(
            r.body.expose(),
            "grant_type=client_credentials&scope=orders.read+orders.write&audience=https%3A%2F%2Fapi.test\
             &resource=urn%3Aapi&tenant=a%26b"
        );
        // base64("gw+client:s3cr%3At%2F%2B")
        let want = base64::engine::general_purpose::STANDARD.encode("gw+client:s3cr%3At%2F%2B");
        assert_eq!(
            r.authorization.as_ref().unwrap().expose(),
            format!("Basic {want}")
        );
        let dump = format!("{r:?}");
        assert!(!dump.contains("s3cr") && !dump.contains(&want));
    }

    #[test]
    fn client_secret_post_puts_credentials_in_the_body() {
        let mut c = conn(Grant::ClientCredentials);
        c.audience = None;
        c.resource = None;
        c.extra_params.clear();
        c.scopes = vec!["a".into()];
        let r = build(
            &provider(AuthMethod::ClientSecretPost),
            &SECRET(),
            &c,
            GrantInput::None,
        );
        assert_eq!(r.authorization, None);
        assert_eq!(
            r.body.expose(),
            "grant_type=client_credentials&scope=a&client_id=gw+client&client_secret=s3cr%3At%2F%2B"
        );
    }

    #[test]
    fn refresh_token_uses_the_current_token() {
        let mut c = conn(Grant::RefreshToken(SecretRef::Value(Secret::new(
            "rt-configured",
        ))));
        c.scopes.clear();
        c.audience = None;
        c.resource = None;
        c.extra_params.clear();
        let p = provider(AuthMethod::ClientSecretBasic);
        let r = build(&p, &SECRET(), &c, GrantInput::None);
        assert_eq!(
            r.body.expose(),
            "grant_type=refresh_token&refresh_token=rt-configured"
        );
        let rotated = Secret::new("rt-2");
        let r = build(&p, &SECRET(), &c, GrantInput::RefreshToken(&rotated));
        assert_eq!(
            r.body.expose(),
            "grant_type=refresh_token&refresh_token=rt-2"
        );
    }

    #[test]
    fn token_exchange_sends_the_subject_token() {
        let mut c = conn(Grant::TokenExchange {
            subject_token_type: "urn:ietf:params:oauth:token-type:access_token".into(),
        });
        c.extra_params.clear();
        c.resource = None;
        let subject = Secret::new("eyJ.subject.sig");
        let r = build(
            &provider(AuthMethod::ClientSecretBasic),
            &SECRET(),
            &c,
            GrantInput::SubjectToken(&subject),
        );
        assert_eq!(
            r.body.expose(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=eyJ.subject.sig\
             &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token\
             &scope=orders.read+orders.write&audience=https%3A%2F%2Fapi.test"
        );
    }
    /// A client_credentials connection with only a scope.
    fn plain() -> OAuth2Connection {
        let mut c = conn(Grant::ClientCredentials);
        c.audience = None;
        c.resource = None;
        c.extra_params.clear();
        c.scopes = vec!["a".into()];
        c
    }

    fn signing_key() -> crate::config::SigningKey {
        crate::config::SigningKey {
            alg: crate::config::JwsAlg::Rs256,
            kid: "k".into(),
            x5t_s256: None,
            audience: None,
            service: crate::config::SigningService::VaultTransit {
                cluster: "vault".into(),
                authority: "vault:8200".into(),
                path: "/v1/transit/sign/k/sha2-256".into(),
                auth: crate::config::VaultAuth::Token(Secret::new("hvs.t")),
                namespace: None,
            },
            timeout_ms: 1000,
        }
    }

    fn secretless(auth_method: AuthMethod) -> OAuth2Provider {
        let mut p = provider(auth_method);
        p.client_secret = None;
        p
    }

    const ASSERTED: &str = "grant_type=client_credentials&scope=a&client_id=gw+client\
        &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
        &client_assertion=eyJh.eyJj.c2ln";

    #[test]
    fn tls_client_auth_sends_the_client_id_and_nothing_secret() {
        let r = build(
            &secretless(AuthMethod::TlsClientAuth),
            &ClientCredential::None,
            &plain(),
            GrantInput::None,
        );
        assert_eq!(r.authorization, None);
        assert_eq!(
            r.body.expose(),
            "grant_type=client_credentials&scope=a&client_id=gw+client"
        );
        assert_eq!(r.cluster, "idp");
        assert_eq!(
            r.headers
                .iter()
                .find(|(k, _)| *k == ":authority")
                .map(|(_, v)| v.as_str()),
            Some("idp.test:8443")
        );
    }

    #[test]
    fn an_assertion_goes_in_the_form_with_its_type_and_the_client_id() {
        assert_eq!(
            CLIENT_ASSERTION_TYPE,
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        let jwt = ClientCredential::Assertion(Secret::new("eyJh.eyJj.c2ln"));
        for method in [
            AuthMethod::ClientAssertion { connection: 2 },
            AuthMethod::PrivateKeyJwt(Box::new(signing_key())),
        ] {
            let r = build(&secretless(method), &jwt, &plain(), GrantInput::None);
            assert_eq!(r.authorization, None);
            assert_eq!(r.body.expose(), ASSERTED);
            assert!(!format!("{r:?}").contains("c2ln"));
        }
        // With a refresh token, and on revocation (RFC 7009 §2.1: the same client
        // authentication), at the revocation endpoint's authority.
        let mut c = plain();
        c.grant = Grant::RefreshToken(SecretRef::Value(Secret::new("rt-1")));
        c.scopes.clear();
        let mut p = secretless(AuthMethod::ClientAssertion { connection: 2 });
        let r = build(&p, &jwt, &c, GrantInput::None);
        assert_eq!(
            r.body.expose(),
            "grant_type=refresh_token&refresh_token=rt-1&client_id=gw+client\
             &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
             &client_assertion=eyJh.eyJj.c2ln"
        );
        p.revocation = Some(crate::config::Endpoint {
            authority: "revoke.test".into(),
            path: "/revoke".into(),
        });
        let r = revocation(&p, &jwt, &Secret::new("rt-2")).unwrap();
        assert_eq!(r.authorization, None);
        assert_eq!(
            r.body.expose(),
            "token=rt-2&token_type_hint=refresh_token&client_id=gw+client\
             &client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
             &client_assertion=eyJh.eyJj.c2ln"
        );
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(":authority").as_deref(), Some("revoke.test"));
        assert_eq!(header(":path").as_deref(), Some("/revoke"));
        let r = revocation(
            &secretless(AuthMethod::TlsClientAuth),
            &ClientCredential::None,
            &Secret::new("rt-2"),
        );
        assert_eq!(r, None, "no revocation_url");
    }

    #[test]
    fn a_secret_is_sent_only_by_the_secret_methods() {
        // Basic and post are as before (the whole requests are checked above).
        let basic = build(
            &provider(AuthMethod::ClientSecretBasic),
            &SECRET(),
            &plain(),
            GrantInput::None,
        );
        assert_eq!(basic.body.expose(), "grant_type=client_credentials&scope=a");
        assert!(basic.authorization.is_some());
        // A secret handed to a secretless method is never sent: client_id only.
        for method in [
            AuthMethod::TlsClientAuth,
            AuthMethod::ClientAssertion { connection: 0 },
            AuthMethod::PrivateKeyJwt(Box::new(signing_key())),
        ] {
            let r = build(
                &provider(method.clone()),
                &SECRET(),
                &plain(),
                GrantInput::None,
            );
            assert_eq!(r.authorization, None, "{method:?}");
            assert_eq!(
                r.body.expose(),
                "grant_type=client_credentials&scope=a&client_id=gw+client",
                "{method:?}"
            );
        }
        // A secret method without a secret sends none either (the server refuses).
        for method in [AuthMethod::ClientSecretBasic, AuthMethod::ClientSecretPost] {
            let r = build(
                &provider(method),
                &ClientCredential::None,
                &plain(),
                GrantInput::None,
            );
            assert_eq!(r.authorization, None);
            assert_eq!(
                r.body.expose(),
                "grant_type=client_credentials&scope=a&client_id=gw+client"
            );
        }
    }
}
