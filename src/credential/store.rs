//! Secret stores and managed-identity tokens, as data: the calls latchkey makes
//! to Azure Key Vault, HashiCorp Vault / OpenBao KV v2, Vault's AppRole login and
//! Azure IMDS ([`HttpCall`]), and what their answers mean ([`parse_read`],
//! [`parse_login`]). No I/O: the filter dispatches the call and hands the answer
//! back. Values read are checked like configured ones: a control character is a
//! failure, and the last good value stays.

use std::fmt;

use serde_json::Value;
use url::form_urlencoded;

use crate::config::{ManagedIdentityProvider, Store, StoreKind, VaultAuth};
use crate::credential::token_response::{transport, FetchError};
use crate::secret::{check_value, Secret};

/// One HTTP call through an Envoy cluster. `Debug` shows no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub cluster: String,
    /// `:method`, `:path`, `:authority` and plain headers.
    pub headers: Vec<(&'static str, String)>,
    /// Headers that carry a credential.
    pub secret_headers: Vec<(&'static str, Secret)>,
    pub body: Option<Secret>,
    pub timeout_ms: u64,
}

pub(crate) fn call(
    cluster: &str,
    method: &str,
    path: String,
    authority: &str,
    timeout_ms: u64,
) -> HttpCall {
    HttpCall {
        cluster: cluster.to_string(),
        headers: vec![
            (":method", method.to_string()),
            (":path", path),
            (":authority", authority.to_string()),
            ("accept", "application/json".to_string()),
        ],
        secret_headers: Vec::new(),
        body: None,
        timeout_ms,
    }
}

/// The read of a stored secret. `credential`: for Key Vault the identity's
/// bearer token, for Vault the Vault token (configured, or from AppRole login).
pub fn read_call(store: &Store, credential: &Secret) -> HttpCall {
    let mut c = call(
        &store.cluster,
        "GET",
        store.path.clone(),
        &store.authority,
        store.timeout_ms,
    );
    match &store.kind {
        StoreKind::KeyVault { .. } => c.secret_headers.push((
            "authorization",
            Secret::new(format!("Bearer {}", credential.expose())),
        )),
        StoreKind::Vault { namespace, .. } => {
            c.secret_headers.push(("x-vault-token", credential.clone()));
            if let Some(ns) = namespace {
                c.headers.push(("x-vault-namespace", ns.clone()));
            }
        }
    }
    c
}

/// The AppRole login of a Vault store; `None` for other stores.
pub fn login_call(store: &Store) -> Option<HttpCall> {
    let StoreKind::Vault {
        auth, namespace, ..
    } = &store.kind
    else {
        return None;
    };
    vault_login_call(
        &store.cluster,
        &store.authority,
        auth,
        namespace.as_deref(),
        store.timeout_ms,
    )
}

/// A Vault AppRole login (`POST <login_path>` with the role and secret IDs as
/// JSON): a secret store's, or a Transit signing key's. `None` for a token.
pub fn vault_login_call(
    cluster: &str,
    authority: &str,
    auth: &VaultAuth,
    namespace: Option<&str>,
    timeout_ms: u64,
) -> Option<HttpCall> {
    let VaultAuth::AppRole {
        role_id,
        secret_id,
        login_path,
    } = auth
    else {
        return None;
    };
    let mut c = call(cluster, "POST", login_path.clone(), authority, timeout_ms);
    c.headers
        .push(("content-type", "application/json".to_string()));
    if let Some(ns) = namespace {
        c.headers.push(("x-vault-namespace", ns.to_string()));
    }
    let body = serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose() });
    c.body = Some(Secret::new(body.to_string()));
    Some(c)
}

/// An IMDS token request, as APIM's `authentication-managed-identity` sends it:
/// `GET <endpoint>?api-version=2018-02-01&resource=…[&client_id=…]` with
/// `Metadata: true` (IMDS refuses requests that carry `X-Forwarded-For`).
pub fn imds_call(p: &ManagedIdentityProvider, resource: &str) -> HttpCall {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("api-version", "2018-02-01");
    q.append_pair("resource", resource);
    if let Some(id) = &p.client_id {
        q.append_pair("client_id", id);
    }
    let mut c = call(
        &p.cluster,
        "GET",
        format!("{}?{}", p.path, q.finish()),
        &p.authority,
        p.timeout_ms,
    );
    c.headers.push(("metadata", "true".to_string()));
    c
}

/// A value read from a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub value: Secret,
    /// Key Vault: the version id (last segment of `id`); Vault: `data.metadata.version`.
    pub version: String,
}

/// Why a read (or login) failed. `Display` (what the log shows) is the kind and,
/// when the store answered with an error status, that status: `forbidden (HTTP
/// 403)`; never a value, a body or a store message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Connect,
    Timeout,
    /// HTTP 401: the store refused the credential (Key Vault: the identity token
    /// expired or is for another resource).
    Unauthorized,
    /// No permission, with the status: 403 (a missing role assignment or Vault
    /// policy; for Vault also a token it no longer honours), or 400 to an AppRole
    /// login (a wrong role or secret ID).
    Forbidden(u32),
    /// HTTP 404.
    NotFound,
    /// Key Vault: the secret (version) is disabled; the status when the store
    /// refused the read (403), `None` when a 2xx answer said so.
    Disabled(Option<u32>),
    /// Any other non-2xx status.
    Status(u32),
    Malformed,
    /// No `value` (Key Vault) or no such field (Vault).
    MissingValue,
    /// The value has a control character.
    ControlCharacter,
    TooLarge,
    /// The call could not be made (e.g. an unknown cluster).
    Dispatch,
    /// No token from the store's identity (or AppRole login) could be had.
    Identity,
}

impl StoreError {
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Connect => "connect",
            StoreError::Timeout => "timeout",
            StoreError::Unauthorized => "unauthorized",
            StoreError::Forbidden(_) => "forbidden",
            StoreError::NotFound => "not_found",
            StoreError::Disabled(_) => "disabled",
            StoreError::Status(_) => "status",
            StoreError::Malformed => "malformed",
            StoreError::MissingValue => "missing_value",
            StoreError::ControlCharacter => "control_character",
            StoreError::TooLarge => "too_large",
            StoreError::Dispatch => "dispatch",
            StoreError::Identity => "identity",
        }
    }

    /// The HTTP status the store answered, when the failure is that status.
    pub fn status(&self) -> Option<u32> {
        match self {
            StoreError::Unauthorized => Some(401),
            StoreError::NotFound => Some(404),
            StoreError::Forbidden(s) | StoreError::Status(s) => Some(*s),
            StoreError::Disabled(s) => *s,
            _ => None,
        }
    }

    /// Whether the store refused the credential latchkey obtained for it, so
    /// that a new one may succeed: Key Vault answered 401 (the identity token),
    /// or a Vault store with AppRole answered 401 or 403 (the login token: Vault
    /// answers 403 to a token it no longer honours, as to a missing policy). The
    /// filter then drops that cached credential and reads once more. A configured
    /// Vault token can't be renewed: never.
    pub fn credential_refused(&self, kind: &StoreKind) -> bool {
        match kind {
            StoreKind::KeyVault { .. } => *self == StoreError::Unauthorized,
            StoreKind::Vault {
                auth: VaultAuth::AppRole { .. },
                ..
            } => matches!(self, StoreError::Unauthorized | StoreError::Forbidden(403)),
            StoreKind::Vault {
                auth: VaultAuth::Token(_),
                ..
            } => false,
        }
    }

    pub const KINDS: [&'static str; 13] = [
        "connect",
        "timeout",
        "unauthorized",
        "forbidden",
        "not_found",
        "disabled",
        "status",
        "malformed",
        "missing_value",
        "control_character",
        "too_large",
        "dispatch",
        "identity",
    ];
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        match self.status() {
            Some(s) => write!(f, " (HTTP {s})"),
            None => Ok(()),
        }
    }
}

pub(crate) fn status_error(status: u32, json: Option<&Value>) -> StoreError {
    match status {
        401 => StoreError::Unauthorized,
        403 => {
            // Key Vault: {"error":{"code":"Forbidden","innererror":{"code":"SecretDisabled"}}}
            let inner = json
                .and_then(|j| j.pointer("/error/innererror/code"))
                .and_then(Value::as_str);
            if inner == Some("SecretDisabled") {
                StoreError::Disabled(Some(403))
            } else {
                StoreError::Forbidden(403)
            }
        }
        404 => StoreError::NotFound,
        s => StoreError::Status(s),
    }
}

pub(crate) fn from_transport(e: FetchError) -> StoreError {
    match e {
        FetchError::Timeout => StoreError::Timeout,
        FetchError::TooLarge => StoreError::TooLarge,
        _ => StoreError::Connect,
    }
}

/// Interprets a store's answer to [`read_call`]. `status` is `None` on a reset.
pub fn parse_read(kind: &StoreKind, status: Option<u32>, body: &[u8]) -> Result<Read, StoreError> {
    if let Some(e) = transport(status, body) {
        return Err(from_transport(e));
    }
    let status = status.unwrap_or(0);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        return Err(status_error(status, json.as_ref()));
    }
    let json = json.filter(Value::is_object).ok_or(StoreError::Malformed)?;
    let (value, version) = match kind {
        StoreKind::KeyVault { .. } => {
            if json.pointer("/attributes/enabled") == Some(&Value::Bool(false)) {
                return Err(StoreError::Disabled(None));
            }
            let value = match json.get("value") {
                Some(Value::String(v)) if !v.is_empty() => v,
                None | Some(Value::Null) | Some(Value::String(_)) => {
                    return Err(StoreError::MissingValue)
                }
                Some(_) => return Err(StoreError::Malformed),
            };
            let id = json.get("id").and_then(Value::as_str).unwrap_or("");
            let version = id.rsplit('/').next().unwrap_or("").to_string();
            (value.clone(), version)
        }
        StoreKind::Vault { field, .. } => {
            let data = json
                .pointer("/data/data")
                .and_then(Value::as_object)
                .ok_or(StoreError::Malformed)?;
            let value = match data.get(field) {
                Some(Value::String(v)) if !v.is_empty() => v,
                None | Some(Value::Null) | Some(Value::String(_)) => {
                    return Err(StoreError::MissingValue)
                }
                Some(_) => return Err(StoreError::Malformed),
            };
            let version = json
                .pointer("/data/metadata/version")
                .and_then(Value::as_u64)
                .map(|v| v.to_string())
                .unwrap_or_default();
            (value.clone(), version)
        }
    };
    let value =
        check_value(Secret::new(value), String::new).map_err(|_| StoreError::ControlCharacter)?;
    Ok(Read {
        value,
        version: sanitize_version(&version),
    })
}

/// A version id is logged and compared: keep it short and printable.
fn sanitize_version(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(64)
        .collect()
}

/// How long an AppRole login token is used at most: its `lease_duration`, capped.
pub const MAX_LOGIN_LEASE_S: u64 = 86_400;
/// How long a login token without a lease is used (`lease_duration` 0: a token
/// that doesn't expire; missing, negative or not a whole number: none given).
pub const UNLEASED_LOGIN_MS: u64 = 3_600_000;

/// A Vault AppRole login answer: the client token and how long to use it, in
/// ms: its `lease_duration`, at most [`MAX_LOGIN_LEASE_S`] (a huge lease can't
/// overflow), or [`UNLEASED_LOGIN_MS`] without one. A token Vault stops honouring
/// earlier is answered 403, and the filter logs in again
/// ([`StoreError::credential_refused`]).
pub fn parse_login(status: Option<u32>, body: &[u8]) -> Result<(Secret, u64), StoreError> {
    if let Some(e) = transport(status, body) {
        return Err(from_transport(e));
    }
    let status = status.unwrap_or(0);
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        // Vault answers a bad role_id/secret_id with 400 "invalid role or secret ID".
        return Err(match status {
            400 => StoreError::Forbidden(400),
            s => status_error(s, json.as_ref()),
        });
    }
    let json = json.ok_or(StoreError::Malformed)?;
    let token = json
        .pointer("/auth/client_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or(StoreError::Malformed)?;
    let lease_s = json
        .pointer("/auth/lease_duration")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // A lease of 0 means "no expiry" (a root token); re-login hourly anyway.
    let lifetime_ms = if lease_s == 0 {
        UNLEASED_LOGIN_MS
    } else {
        lease_s.min(MAX_LOGIN_LEASE_S).saturating_mul(1000)
    };
    Ok((Secret::new(token), lifetime_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, StoreKind, VaultAuth};
    use crate::credential::keys::store_key as cache_key;
    use crate::credential::token_response::MAX_BODY;

    fn kv() -> Store {
        Store {
            name: "partner_key".into(),
            kind: StoreKind::KeyVault { identity: 0 },
            cluster: "keyvault".into(),
            authority: "kv-gw.vault.azure.net".into(),
            path: "/secrets/partner-key?api-version=7.4".into(),
            refresh_ms: Some(300_000),
            timeout_ms: 2000,
        }
    }

    fn vault(auth: VaultAuth) -> Store {
        Store {
            name: "orders_secret".into(),
            kind: StoreKind::Vault {
                auth,
                namespace: Some("team-a".into()),
                field: "client_secret".into(),
            },
            cluster: "vault".into(),
            authority: "vault.internal:8200".into(),
            path: "/v1/secret/data/orders/idp".into(),
            refresh_ms: Some(60_000),
            timeout_ms: 1000,
        }
    }

    #[test]
    fn key_vault_read_is_a_bearer_get() {
        let c = read_call(&kv(), &Secret::new("mi-token"));
        assert_eq!(c.cluster, "keyvault");
        assert_eq!(
            c.headers,
            vec![
                (":method", "GET".to_string()),
                (":path", "/secrets/partner-key?api-version=7.4".to_string()),
                (":authority", "kv-gw.vault.azure.net".to_string()),
                ("accept", "application/json".to_string()),
            ]
        );
        assert_eq!(
            c.secret_headers,
            vec![("authorization", Secret::new("Bearer mi-token"))]
        );
        assert!(!format!("{c:?}").contains("mi-token"));
    }

    #[test]
    fn vault_read_sends_token_and_namespace() {
        let c = read_call(
            &vault(VaultAuth::Token(Secret::new("hvs.x"))),
            &Secret::new("hvs.x"),
        );
        assert!(c
            .headers
            .contains(&("x-vault-namespace", "team-a".to_string())));
        assert_eq!(
            c.secret_headers,
            vec![("x-vault-token", Secret::new("hvs.x"))]
        );
        assert_eq!(login_call(&kv()), None);
    }

    #[test]
    fn approle_login_posts_json() {
        let s = vault(VaultAuth::AppRole {
            role_id: "r-1".into(),
            secret_id: Secret::new("s\"1"),
            login_path: "/v1/auth/approle/login".into(),
        });
        let c = login_call(&s).unwrap();
        assert_eq!(c.headers[0], (":method", "POST".to_string()));
        assert_eq!(
            c.headers[1],
            (":path", "/v1/auth/approle/login".to_string())
        );
        assert_eq!(
            c.body.unwrap().expose(),
            r#"{"role_id":"r-1","secret_id":"s\"1"}"#
        );
    }

    #[test]
    fn imds_request_is_what_azure_expects() {
        let p = ManagedIdentityProvider {
            cluster: "imds".into(),
            authority: "169.254.169.254".into(),
            path: "/metadata/identity/oauth2/token".into(),
            client_id: Some("abc-123".into()),
            timeout_ms: 1000,
            default_expires_in_s: 300,
            refresh_margin_s: 5,
            drop_on_401_after_s: 10,
        };
        let c = imds_call(&p, "https://vault.azure.net");
        assert_eq!(
            c.headers[1],
            (
                ":path",
                "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=abc-123"
                    .to_string()
            )
        );
        assert!(c.headers.contains(&("metadata", "true".to_string())));
        assert!(c.headers.iter().all(|(k, _)| *k != "x-forwarded-for"));
        // App ID URIs and application (client) ID GUIDs, percent-encoded.
        let path = |resource: &str| imds_call(&p, resource).headers[1].1.clone();
        assert_eq!(
            path("api://backend-app"),
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fbackend-app&client_id=abc-123"
        );
        assert_eq!(
            path("7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8"),
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=7f3c1a2b-4d5e-6f70-8192-a3b4c5d6e7f8&client_id=abc-123"
        );
        assert_eq!(
            path("https://backend.contoso.com/api?x=%2F&y"),
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fbackend.contoso.com%2Fapi%3Fx%3D%252F%26y&client_id=abc-123"
        );
    }

    fn kvk() -> StoreKind {
        kv().kind
    }

    #[test]
    fn key_vault_answers() {
        let ok = br#"{"value":"pk-1","id":"https://kv.vault.azure.net/secrets/partner-key/0123abcd","attributes":{"enabled":true}}"#;
        let r = parse_read(&kvk(), Some(200), ok).unwrap();
        assert_eq!(r.value.expose(), "pk-1");
        assert_eq!(r.version, "0123abcd");
        let disabled = br#"{"error":{"code":"Forbidden","message":"Operation get is not allowed on a disabled secret.","innererror":{"code":"SecretDisabled"}}}"#;
        assert_eq!(
            parse_read(&kvk(), Some(403), disabled),
            Err(StoreError::Disabled(Some(403)))
        );
        assert_eq!(
            parse_read(&kvk(), Some(403), br#"{"error":{"code":"Forbidden"}}"#),
            Err(StoreError::Forbidden(403))
        );
        assert_eq!(
            parse_read(&kvk(), Some(401), b""),
            Err(StoreError::Unauthorized)
        );
        assert_eq!(
            parse_read(&kvk(), Some(404), br#"{"error":{"code":"SecretNotFound"}}"#),
            Err(StoreError::NotFound)
        );
        assert_eq!(
            parse_read(&kvk(), Some(500), b"x"),
            Err(StoreError::Status(500))
        );
        assert_eq!(
            parse_read(&kvk(), Some(200), b"{nope"),
            Err(StoreError::Malformed)
        );
        assert_eq!(
            parse_read(&kvk(), Some(200), b"{}"),
            Err(StoreError::MissingValue)
        );
        assert_eq!(
            parse_read(&kvk(), Some(200), br#"{"value":"a\r\nb","id":"x/1"}"#),
            Err(StoreError::ControlCharacter)
        );
        assert_eq!(
            parse_read(
                &kvk(),
                Some(200),
                br#"{"value":"v","attributes":{"enabled":false}}"#
            ),
            Err(StoreError::Disabled(None))
        );
        assert_eq!(parse_read(&kvk(), None, b""), Err(StoreError::Connect));
        assert_eq!(
            parse_read(&kvk(), Some(504), b"upstream request timeout"),
            Err(StoreError::Timeout)
        );
        assert_eq!(
            parse_read(
                &kvk(),
                Some(503),
                b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            ),
            Err(StoreError::Connect)
        );
    }

    #[test]
    fn vault_answers() {
        let k = vault(VaultAuth::Token(Secret::new("t"))).kind;
        let ok =
            br#"{"data":{"data":{"client_secret":"cs-2","other":"x"},"metadata":{"version":7}}}"#;
        let r = parse_read(&k, Some(200), ok).unwrap();
        assert_eq!((r.value.expose(), r.version.as_str()), ("cs-2", "7"));
        assert_eq!(
            parse_read(&k, Some(200), br#"{"data":{"data":{"other":"x"}}}"#),
            Err(StoreError::MissingValue)
        );
        assert_eq!(
            parse_read(&k, Some(200), br#"{"data":{"data":{"client_secret":5}}}"#),
            Err(StoreError::Malformed)
        );
        assert_eq!(
            parse_read(&k, Some(403), br#"{"errors":["permission denied"]}"#),
            Err(StoreError::Forbidden(403))
        );
        assert_eq!(
            parse_read(&k, Some(404), br#"{"errors":[]}"#),
            Err(StoreError::NotFound)
        );
    }

    #[test]
    fn approle_login_answers() {
        let (t, ms) = parse_login(
            Some(200),
            br#"{"auth":{"client_token":"hvs.abc","lease_duration":30}}"#,
        )
        .unwrap();
        assert_eq!((t.expose(), ms), ("hvs.abc", 30_000));
        assert_eq!(
            parse_login(Some(400), br#"{"errors":["invalid role or secret ID"]}"#),
            Err(StoreError::Forbidden(400))
        );
        assert_eq!(parse_login(Some(200), b"{}"), Err(StoreError::Malformed));
        assert_eq!(
            parse_login(Some(200), br#"{"auth":{"client_token":"a b"}}"#),
            Err(StoreError::Malformed)
        );
    }

    #[test]
    fn empty_and_too_large_answers() {
        assert_eq!(
            parse_read(&kvk(), Some(200), br#"{"value":""}"#),
            Err(StoreError::MissingValue)
        );
        let k = vault(VaultAuth::Token(Secret::new("t"))).kind;
        assert_eq!(
            parse_read(&k, Some(200), br#"{"data":{"data":{"client_secret":""}}}"#),
            Err(StoreError::MissingValue)
        );
        let huge = format!(r#"{{"value":"{}"}}"#, "v".repeat(MAX_BODY));
        assert_eq!(
            parse_read(&kvk(), Some(200), huge.as_bytes()),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            parse_login(Some(200), huge.as_bytes()),
            Err(StoreError::TooLarge)
        );
    }

    #[test]
    fn versions_are_kept_short_and_printable() {
        assert_eq!(sanitize_version("0a1B-2.3"), "0a1B-2.3");
        assert_eq!(sanitize_version("v1/\r\n x_y:z"), "v1xyz");
        assert_eq!(sanitize_version(&"7".repeat(100)), "7".repeat(64));
        let ok = br#"{"value":"v","id":"https://kv/secrets/n/ab\r\ncd"}"#;
        assert_eq!(parse_read(&kvk(), Some(200), ok).unwrap().version, "abcd");
    }

    fn no_config() -> Config {
        Config::parse(b"{}", &|_| None).unwrap()
    }

    #[test]
    fn cache_keys_name_the_secret_and_fingerprint_where_it_is_read() {
        let none = no_config();
        let key = |s: &Store| cache_key("lk", &none, s);
        let k = key(&kv());
        let hex = k.strip_prefix("latchkey.v1.lk.sec.partner_key.").unwrap();
        assert!(
            hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k}"
        );
        assert_eq!(key(&kv()), k);
        let moved = Store {
            path: "/secrets/other?api-version=7.4".into(),
            ..kv()
        };
        assert_ne!(key(&moved), k);
        let token = key(&vault(VaultAuth::Token(Secret::new("a"))));
        assert!(token.starts_with("latchkey.v1.lk.sec.orders_secret."));
        assert_ne!(key(&vault(VaultAuth::Token(Secret::new("b")))), token);
        let role = |sid: &str| {
            key(&vault(VaultAuth::AppRole {
                role_id: "r".into(),
                secret_id: Secret::new(sid),
                login_path: "/v1/auth/approle/login".into(),
            }))
        };
        assert_eq!(role("s1"), role("s1"));
        assert_ne!(role("s1"), role("s2"));
        assert!(!role("s1").contains("s1"));
    }

    /// A Key Vault secret read with connection `identity` (an IMDS token for
    /// `resource`); `other` names another connection: the configuration lists
    /// connections in name order, so the identity's index follows the names.
    fn kv_config(identity: &str, other: &str, resource: &str) -> Config {
        let text = format!(
            r#"{{"secrets": {{"pk": {{"azure_key_vault": "https://kv.vault.azure.net/secrets/pk",
                                   "cluster": "keyvault", "identity": "{identity}"}}}},
               "providers": {{"mi": {{"type": "azure_managed_identity", "cluster": "imds"}}}},
               "connections": {{
                 "{other}": {{"provider": "mi", "resource": "api://other"}},
                 "{identity}": {{"provider": "mi", "resource": "{resource}"}}}}}}"#
        );
        Config::parse(text.as_bytes(), &|_| None).unwrap()
    }

    #[test]
    fn key_vault_keys_follow_the_identity_by_name_not_position() {
        let key = |c: &Config| cache_key("lk", c, &c.stores[0]);
        let first = kv_config("kv_reader", "zz_other", "https://vault.azure.net");
        let second = kv_config("kv_reader", "aa_other", "https://vault.azure.net");
        let index = |c: &Config| match c.stores[0].kind {
            StoreKind::KeyVault { identity } => identity,
            StoreKind::Vault { .. } => usize::MAX,
        };
        assert_ne!(index(&first), index(&second));
        // Another position, the same identity: the same key.
        assert_eq!(key(&first), key(&second));
        // Another identity, or the same name making another token: another key.
        let renamed = kv_config("kv_reader2", "zz_other", "https://vault.azure.net");
        assert_ne!(key(&renamed), key(&first));
        let other_resource = kv_config("kv_reader", "zz_other", "api://backend-app");
        assert_ne!(key(&other_resource), key(&first));
    }

    #[test]
    fn keys_are_namespaced_by_plugin() {
        let c = kv_config("kv_reader", "zz_other", "https://vault.azure.net");
        let a = cache_key("latchkey", &c, &c.stores[0]);
        let b = cache_key("istio-system.latchkey/v2", &c, &c.stores[0]);
        assert!(a.starts_with("latchkey.v1.latchkey.sec.pk."), "{a}");
        assert!(
            b.starts_with("latchkey.v1.istio-system%2Elatchkey%2Fv2.sec.pk."),
            "{b}"
        );
        // Only the namespace differs.
        assert_eq!(a.rsplit('.').next(), b.rsplit('.').next());
        assert!(cache_key("", &c, &c.stores[0]).starts_with("latchkey.v1..sec.pk."));
    }

    #[test]
    fn error_kinds_are_the_listed_names() {
        let all = [
            StoreError::Connect,
            StoreError::Timeout,
            StoreError::Unauthorized,
            StoreError::Forbidden(403),
            StoreError::NotFound,
            StoreError::Disabled(None),
            StoreError::Status(500),
            StoreError::Malformed,
            StoreError::MissingValue,
            StoreError::ControlCharacter,
            StoreError::TooLarge,
            StoreError::Dispatch,
            StoreError::Identity,
        ];
        assert_eq!(all.map(|e| e.kind()), StoreError::KINDS);
        assert_eq!(StoreError::Timeout.to_string(), "timeout");
    }

    #[test]
    fn errors_never_show_values() {
        for e in StoreError::KINDS {
            assert!(!e.contains(' '));
        }
        assert_eq!(StoreError::Status(500).to_string(), "status (HTTP 500)");
    }

    #[test]
    fn logged_failures_carry_the_http_status() {
        let kv = |status, body: &[u8]| parse_read(&kvk(), Some(status), body).unwrap_err();
        let shown = [
            (kv(401, b""), "unauthorized (HTTP 401)"),
            (
                kv(403, br#"{"error":{"code":"Forbidden"}}"#),
                "forbidden (HTTP 403)",
            ),
            (
                kv(
                    403,
                    br#"{"error":{"innererror":{"code":"SecretDisabled"}}}"#,
                ),
                "disabled (HTTP 403)",
            ),
            (kv(404, b"{}"), "not_found (HTTP 404)"),
            (kv(429, b"slow down"), "status (HTTP 429)"),
            (kv(500, b"x"), "status (HTTP 500)"),
            (
                parse_login(Some(400), br#"{"errors":["invalid role or secret ID"]}"#).unwrap_err(),
                "forbidden (HTTP 400)",
            ),
            (
                parse_read(
                    &kvk(),
                    Some(200),
                    br#"{"value":"v","attributes":{"enabled":false}}"#,
                )
                .unwrap_err(),
                "disabled",
            ),
            (kv(200, b"{}"), "missing_value"),
            (parse_read(&kvk(), None, b"").unwrap_err(), "connect"),
            (kv(504, b"upstream request timeout"), "timeout"),
            (StoreError::Identity, "identity"),
        ];
        for (e, want) in shown {
            assert_eq!(e.to_string(), want, "{e:?}");
        }
        // The metric label stays the kind alone.
        assert_eq!(StoreError::Forbidden(403).kind(), "forbidden");
        assert_eq!(StoreError::Disabled(Some(403)).kind(), "disabled");
        // No body and no store message in the log line.
        let e = kv(
            403,
            br#"{"error":{"code":"Forbidden","message":"Caller s3cr3t is not authorized"}}"#,
        );
        assert!(!e.to_string().contains("s3cr3t") && !format!("{e:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_refused_login_or_identity_token_is_told_apart() {
        let approle = vault(VaultAuth::AppRole {
            role_id: "r".into(),
            secret_id: Secret::new("s"),
            login_path: "/v1/auth/approle/login".into(),
        })
        .kind;
        let token = vault(VaultAuth::Token(Secret::new("t"))).kind;
        let denied = br#"{"errors":["permission denied"]}"#;
        let read = |k: &StoreKind, status| parse_read(k, Some(status), denied).unwrap_err();
        // AppRole: a 403 (or 401) to the read means log in again.
        assert!(read(&approle, 403).credential_refused(&approle));
        assert!(read(&approle, 401).credential_refused(&approle));
        // A configured Vault token can't be renewed.
        assert!(!read(&token, 403).credential_refused(&token));
        assert!(!read(&token, 401).credential_refused(&token));
        // Key Vault: a 401 means a new identity token; a 403 is a missing role.
        assert!(read(&kvk(), 401).credential_refused(&kvk()));
        assert!(!read(&kvk(), 403).credential_refused(&kvk()));
        // Other failures are not the credential's.
        for e in [
            StoreError::NotFound,
            StoreError::Status(500),
            StoreError::Forbidden(400),
            StoreError::Disabled(Some(403)),
            StoreError::Timeout,
            StoreError::Identity,
        ] {
            assert!(!e.credential_refused(&approle), "{e:?}");
            assert!(!e.credential_refused(&kvk()), "{e:?}");
        }
    }

    #[test]
    fn login_leases_are_capped_and_never_overflow() {
        let lease = |l: &str| {
            let body = format!(r#"{{"auth":{{"client_token":"hvs.abc","lease_duration":{l}}}}}"#);
            parse_login(Some(200), body.as_bytes()).map(|(_, ms)| ms)
        };
        assert_eq!(lease("1"), Ok(1000));
        assert_eq!(lease("86400"), Ok(86_400_000));
        assert_eq!(lease("86401"), Ok(MAX_LOGIN_LEASE_S * 1000));
        assert_eq!(lease(&u64::MAX.to_string()), Ok(86_400_000));
        assert_eq!(lease(&(u64::MAX / 1000 + 1).to_string()), Ok(86_400_000));
        // No lease, or none usable: re-login hourly.
        for l in [
            "0",
            "-1",
            "-9223372036854775808",
            "1e30",
            "2.5",
            "\"60\"",
            "null",
        ] {
            assert_eq!(lease(l), Ok(UNLEASED_LOGIN_MS), "{l}");
        }
        assert_eq!(
            parse_login(Some(200), br#"{"auth":{"client_token":"hvs.abc"}}"#).map(|(_, ms)| ms),
            Ok(3_600_000)
        );
    }
}
