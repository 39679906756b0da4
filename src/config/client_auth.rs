//! How an oauth2 provider's client authenticates to its token server
//! (`auth_method`, SPEC v1 and v1.2): with a client secret (`client_secret_basic`,
//! `client_secret_post`), or with no stored secret at all: a certificate its
//! cluster presents (`tls_client_auth`, RFC 8705), another connection's token
//! as the assertion (`client_assertion`, e.g. Entra workload identity
//! federation), or a JWT signed by a key service (`private_key_jwt`, RFC 7523).
//!
//! Which connection an assertion or a signing identity comes from is resolved
//! here; that it can give a token, and never needs itself, is checked once all
//! connections are read ([`check`]).

use super::error::ConfigError;
use super::fields::{cluster, timeout_ms, vault_auth, vault_namespace, vault_url};
use super::http_url;
use super::json::{join, Obj};
use super::lexical;
use super::names::Names;
use super::secrets::Secrets;
use super::{
    AuthMethod, Connection, Credential, Grant, JwsAlg, Provider, ProviderKind, SigningKey,
    SigningService,
};

const SIGNING_KEY: &[&str] = &[
    "azure_key_vault_key",
    "cluster",
    "identity",
    "vault_transit",
    "alg",
    "kid",
    "x5t#S256",
    "timeout_ms",
];
const TRANSIT: &[&str] = &[
    "cluster",
    "url",
    "mount",
    "key",
    "token",
    "approle",
    "namespace",
];
const METHODS: &str = "expected \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\", \"client_assertion\" or \"tls_client_auth\"";

/// The provider's `auth_method` and, with a secret, its `client_secret`.
pub fn read(
    p: &Obj,
    names: &Names,
    secrets: &Secrets,
) -> Result<(AuthMethod, Option<super::SecretRef>), ConfigError> {
    let method = p.opt_str("auth_method")?.unwrap_or("client_secret_basic");
    const KNOWN: [&str; 5] = [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
        "client_assertion",
        "tls_client_auth",
    ];
    if !KNOWN.contains(&method) {
        return Err(ConfigError::invalid(
            p.child("auth_method"),
            method,
            METHODS,
        ));
    }
    let with_secret = matches!(method, "client_secret_basic" | "client_secret_post");
    // Each method's own fields, and none of another's.
    let only = |field: &str, allowed: bool, why: &'static str| -> Result<(), ConfigError> {
        if p.has(field) && !allowed {
            return Err(ConfigError::not_allowed(p.child(field), why));
        }
        Ok(())
    };
    only(
        "client_secret",
        with_secret,
        "this auth_method sends no client secret",
    )?;
    only(
        "assertion",
        method == "client_assertion",
        "only allowed when auth_method is \"client_assertion\"",
    )?;
    for f in ["signing_key", "assertion_audience"] {
        only(
            f,
            method == "private_key_jwt",
            "only allowed when auth_method is \"private_key_jwt\"",
        )?;
    }
    let secret = if with_secret {
        let name = p.req_str("client_secret")?;
        Some(secrets.reference(names, name, || p.child("client_secret"))?)
    } else {
        None
    };
    let auth = match method {
        "client_secret_basic" => AuthMethod::ClientSecretBasic,
        "client_secret_post" => AuthMethod::ClientSecretPost,
        "tls_client_auth" => AuthMethod::TlsClientAuth,
        "client_assertion" => AuthMethod::ClientAssertion {
            connection: names.connection(p.req_str("assertion")?, || p.child("assertion"))?,
        },
        "private_key_jwt" => {
            let audience = match p.opt_str("assertion_audience")? {
                Some(a) if a.trim().is_empty() => {
                    return Err(ConfigError::invalid(
                        p.child("assertion_audience"),
                        a,
                        "must not be empty",
                    ))
                }
                a => a.map(str::to_string),
            };
            let k = Obj::new(
                p.child("signing_key"),
                p.required("signing_key")?,
                SIGNING_KEY,
            )?;
            AuthMethod::PrivateKeyJwt(Box::new(signing_key(&k, names, secrets, audience)?))
        }
        other => return Err(ConfigError::invalid(p.child("auth_method"), other, METHODS)),
    };
    Ok((auth, secret))
}

fn signing_key(
    k: &Obj,
    names: &Names,
    secrets: &Secrets,
    audience: Option<String>,
) -> Result<SigningKey, ConfigError> {
    let alg = match k.opt_str("alg")?.unwrap_or("RS256") {
        "RS256" => JwsAlg::Rs256,
        "PS256" => JwsAlg::Ps256,
        "ES256" => JwsAlg::Es256,
        other => {
            return Err(ConfigError::invalid(
                k.child("alg"),
                other,
                "expected \"RS256\", \"PS256\" or \"ES256\"",
            ))
        }
    };
    let x5t_s256 = match k.opt_str("x5t#S256")? {
        None => None,
        Some(t) => {
            // base64url of a SHA-256 digest: 43 characters.
            let ok = t.len() == 43
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(ConfigError::invalid(
                    k.child("x5t#S256"),
                    t,
                    "expected the base64url SHA-256 thumbprint of the certificate (43 characters)",
                ));
            }
            Some(t.to_string())
        }
    };
    let timeout_ms = timeout_ms(k)?;
    let (service, default_kid) = match (k.has("azure_key_vault_key"), k.has("vault_transit")) {
        (true, false) => {
            let id = k.req_str("azure_key_vault_key")?;
            let (authority, key_path) = key_vault_key(id)
                .map_err(|r| ConfigError::invalid(k.child("azure_key_vault_key"), id, r))?;
            let identity = names.connection(k.req_str("identity")?, || k.child("identity"))?;
            (
                SigningService::KeyVault {
                    cluster: cluster(k)?,
                    authority,
                    path: format!("{key_path}/sign?api-version=7.4"),
                    identity,
                },
                id.trim_end_matches('/').to_string(),
            )
        }
        (false, true) => {
            for field in ["cluster", "identity"] {
                if k.has(field) {
                    return Err(ConfigError::not_allowed(
                        k.child(field),
                        "for \"vault_transit\", give it inside the \"vault_transit\" object",
                    ));
                }
            }
            let v = Obj::new(
                k.child("vault_transit"),
                k.required("vault_transit")?,
                TRANSIT,
            )?;
            transit(&v, secrets)?
        }
        _ => {
            return Err(ConfigError::not_allowed(
                k.path.clone(),
                "give exactly one of \"azure_key_vault_key\" or \"vault_transit\"",
            ))
        }
    };
    let kid = match k.opt_str("kid")? {
        None => default_kid,
        Some(kid) => {
            lexical::header_value(kid).map_err(|e| e.at(k.child("kid")))?;
            kid.to_string()
        }
    };
    Ok(SigningKey {
        alg,
        kid,
        x5t_s256,
        audience,
        service,
        timeout_ms,
    })
}

/// `https://<vault host>/keys/<name>[/<version>]`: the authority and the key's path.
fn key_vault_key(id: &str) -> Result<(String, String), String> {
    let url = http_url::parse(id).map_err(|e| e.to_string())?;
    if !id.starts_with("https://") || url.path.contains('?') {
        return Err("expected https://<vault>.vault.azure.net/keys/<name>[/<version>]".into());
    }
    let segs: Vec<&str> = url.path.trim_end_matches('/').split('/').collect();
    let name_ok = |n: &str| {
        !n.is_empty() && n.len() <= 127 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match segs.as_slice() {
        // The latest version: an empty version segment, as Azure's SDKs send it.
        ["", "keys", name] if name_ok(name) => Ok((url.authority, format!("/keys/{name}/"))),
        ["", "keys", name, version]
            if name_ok(name) && !version.is_empty() && version.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok((url.authority, format!("/keys/{name}/{version}")))
        }
        _ => Err("not a key identifier: expected /keys/<name> or /keys/<name>/<version> (names: letters, digits, -)".into()),
    }
}

/// A `vault_transit` object: `POST <url>/v1/<mount>/sign/<key>/sha2-256`.
fn transit(v: &Obj, secrets: &Secrets) -> Result<(SigningService, String), ConfigError> {
    let (authority, root) = vault_url(v)?;
    let root = root.as_str();
    let path_field = |field: &str, default: Option<&str>| -> Result<String, ConfigError> {
        let raw = match default {
            Some(d) => v.opt_str(field)?.unwrap_or(d),
            None => v.req_str(field)?,
        };
        let p = raw.trim_matches('/');
        if !lexical::is_vault_path(p) {
            return Err(ConfigError::invalid(
                v.child(field),
                raw,
                "not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
            ));
        }
        Ok(p.to_string())
    };
    let mount = path_field("mount", Some("transit"))?;
    let key = path_field("key", None)?;
    if key.contains('/') {
        return Err(ConfigError::invalid(
            v.child("key"),
            &key,
            "a Transit key name has no \"/\"",
        ));
    }
    let auth = vault_auth(v, secrets, root)?;
    let namespace = vault_namespace(v)?;
    Ok((
        SigningService::VaultTransit {
            cluster: cluster(v)?,
            authority,
            path: format!("{root}/v1/{mount}/sign/{key}/sha2-256"),
            auth,
            namespace,
        },
        key,
    ))
}

/// Once every connection is read: an assertion connection must give a token
/// (an oauth2 or managed-identity connection, not a per-caller one), a Key
/// Vault signing identity too, and no provider's client authentication may
/// need a token of its own provider, however indirectly.
pub fn check(providers: &[Provider], connections: &[Connection]) -> Result<(), ConfigError> {
    for p in providers {
        let ProviderKind::OAuth2(o) = &p.kind else {
            continue;
        };
        let (field, needed) = match &o.auth_method {
            AuthMethod::ClientAssertion { connection } => ("assertion", *connection),
            AuthMethod::PrivateKeyJwt(k) => match &k.service {
                SigningService::KeyVault { identity, .. } => ("signing_key.identity", *identity),
                SigningService::VaultTransit { .. } => continue,
            },
            _ => continue,
        };
        let path = join(&join("providers", &p.name), field);
        let Some(c) = connections.get(needed) else {
            continue;
        };
        let gives_token = match &c.credential {
            Credential::ManagedIdentity { .. } => true,
            Credential::OAuth2(oc) => {
                matches!(oc.grant, Grant::ClientCredentials | Grant::RefreshToken(_))
            }
            _ => false,
        };
        if !gives_token {
            return Err(ConfigError::not_allowed(
                path,
                format!(
                    "connection \"{}\" can't give a token on its own: it must be an azure_managed_identity connection, or an oauth2 one with grant client_credentials or refresh_token",
                    c.name
                ),
            ));
        }
        // Follow the chain of client authentications from that connection's provider.
        let mut seen = vec![p.name.as_str()];
        let mut at = c;
        while let Some(next) = providers.get(at.provider) {
            if next.name == p.name {
                return Err(ConfigError::not_allowed(
                    path,
                    format!(
                        "connection \"{}\" needs this provider's own token to authenticate (through {}): it can never get one",
                        c.name,
                        seen.join(" → ")
                    ),
                ));
            }
            if seen.contains(&next.name.as_str()) {
                // A loop that doesn't come back here: reported at its own providers.
                break;
            }
            seen.push(next.name.as_str());
            let ProviderKind::OAuth2(no) = &next.kind else {
                break;
            };
            let following = match &no.auth_method {
                AuthMethod::ClientAssertion { connection } => *connection,
                AuthMethod::PrivateKeyJwt(k) => match &k.service {
                    SigningService::KeyVault { identity, .. } => *identity,
                    SigningService::VaultTransit { .. } => break,
                },
                _ => break,
            };
            match connections.get(following) {
                Some(n) => at = n,
                None => break,
            }
        }
    }
    Ok(())
}
