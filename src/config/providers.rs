//! The `providers` section: where credentials come from. An `api_key` or
//! `client_certificate` provider has no fields of its own; an `oauth2` one names
//! its token endpoint and client credentials; an `azure_managed_identity` one its
//! IMDS endpoint. Connections name providers and add what is theirs.

use super::error::ConfigError;
use super::fields::{cluster, only_fields, timeout_ms};
use super::http_url::{self, HttpUrl, UrlError};
use super::json::{as_object, join, Obj};
use super::lexical;
use super::names::Names;
use super::secrets::Secrets;
use super::{Endpoint, ManagedIdentityProvider, OAuth2Provider, Provider, ProviderKind};

const PROVIDER: &[&str] = &[
    "type",
    "cluster",
    "token_url",
    "client_id",
    "client_secret",
    "auth_method",
    "timeout_ms",
    "default_expires_in_s",
    "refresh_margin_s",
    "drop_on_401_after_s",
    "endpoint",
    "authorization_url",
    "issuer",
    "revocation_url",
    "assertion",
    "signing_key",
    "assertion_audience",
];
const MI_PROVIDER: &[&str] = &[
    "type",
    "cluster",
    "endpoint",
    "client_id",
    "timeout_ms",
    "default_expires_in_s",
    "refresh_margin_s",
    "drop_on_401_after_s",
];
const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
const DEFAULT_EXPIRES_IN_S: u64 = 300;
const DEFAULT_REFRESH_MARGIN_S: u64 = 5;
const DEFAULT_DROP_ON_401_AFTER_S: u64 = 10;
const MAX_DROP_ON_401_AFTER_S: u64 = 3600;

/// `Config::providers`, in key order (the indices [`Names`] gave them).
pub fn read(top: &Obj, names: &Names, secrets: &Secrets) -> Result<Vec<Provider>, ConfigError> {
    let mut out = Vec::new();
    let Some(v) = top.get("providers") else {
        return Ok(out);
    };
    for (name, value) in as_object("providers", v)? {
        let p = Obj::new(join("providers", name), value, PROVIDER)?;
        let kind = match p.req_str("type")? {
            "api_key" => {
                only_fields(&p, PROVIDER, &["type"], "not allowed for an api_key provider")?;
                ProviderKind::ApiKey
            }
            "oauth2" => {
                if p.has("endpoint") {
                    return Err(ConfigError::not_allowed(
                        p.child("endpoint"),
                        "not allowed for an oauth2 provider (use token_url)",
                    ));
                }
                ProviderKind::OAuth2(oauth2(&p, names, secrets)?)
            }
            "azure_managed_identity" => ProviderKind::ManagedIdentity(managed_identity(&p)?),
            "client_certificate" => {
                only_fields(&p, PROVIDER, &["type"], "not allowed for a client_certificate provider (connections name the cluster)")?;
                ProviderKind::ClientCertificate
            }
            other => {
                return Err(ConfigError::invalid(
                    p.child("type"),
                    other,
                    "expected \"api_key\", \"oauth2\", \"azure_managed_identity\" or \"client_certificate\"",
                ))
            }
        };
        out.push(Provider {
            name: name.to_string(),
            kind,
        });
    }
    Ok(out)
}

fn oauth2(p: &Obj, names: &Names, secrets: &Secrets) -> Result<OAuth2Provider, ConfigError> {
    let cluster = cluster(p)?;
    let token_url = p.req_str("token_url")?;
    let url_path = p.child("token_url");
    let HttpUrl { authority, path } = http_url::parse(token_url).map_err(|e| match e {
        UrlError::Credentials => ConfigError::not_allowed(&url_path, e.to_string()),
        e => ConfigError::invalid(&url_path, token_url, e.to_string()),
    })?;
    let client_id = p.req_str("client_id")?.to_string();
    let (auth_method, client_secret) = super::client_auth::read(p, names, secrets)?;
    let timeout_ms = timeout_ms(p)?;
    let (default_expires_in_s, refresh_margin_s) = token_lifetimes(p)?;
    let authorization_url = match p.opt_str("authorization_url")? {
        None => None,
        Some(u) => Some(lexical::browser_url(u).map_err(|e| e.at(p.child("authorization_url")))?),
    };
    let revocation = match p.opt_str("revocation_url")? {
        None => None,
        Some(u) => {
            let HttpUrl { authority, path } = http_url::parse(u)
                .map_err(|e| ConfigError::invalid(p.child("revocation_url"), u, e.to_string()))?;
            Some(Endpoint { authority, path })
        }
    };
    let issuer = p.opt_str("issuer")?.map(str::to_string);
    Ok(OAuth2Provider {
        authorization_url,
        issuer,
        revocation,
        refresh_margin_s,
        drop_on_401_after_s: drop_on_401_after(p)?,
        cluster,
        token_url: token_url.to_string(),
        authority,
        path,
        client_id,
        client_secret,
        auth_method,
        timeout_ms,
        default_expires_in_s,
    })
}

fn managed_identity(p: &Obj) -> Result<ManagedIdentityProvider, ConfigError> {
    only_fields(
        p,
        PROVIDER,
        MI_PROVIDER,
        "not allowed for an azure_managed_identity provider",
    )?;
    let endpoint = p.opt_str("endpoint")?.unwrap_or(IMDS_ENDPOINT);
    let url = http_url::parse(endpoint)
        .map_err(|e| ConfigError::invalid(p.child("endpoint"), endpoint, e.to_string()))?;
    if url.path.contains('?') {
        return Err(ConfigError::invalid(
            p.child("endpoint"),
            endpoint,
            "must not have a query (latchkey adds api-version, resource and client_id)",
        ));
    }
    let client_id = p.opt_str("client_id")?.map(str::to_string);
    let (default_expires_in_s, refresh_margin_s) = token_lifetimes(p)?;
    Ok(ManagedIdentityProvider {
        cluster: cluster(p)?,
        authority: url.authority,
        path: url.path,
        client_id,
        timeout_ms: timeout_ms(p)?,
        default_expires_in_s,
        refresh_margin_s,
        drop_on_401_after_s: drop_on_401_after(p)?,
    })
}

/// A token's assumed lifetime when its response has none (`default_expires_in_s`,
/// at least 1), and how long before expiry it is refreshed at the latest
/// (`refresh_margin_s`).
fn token_lifetimes(p: &Obj) -> Result<(u64, u64), ConfigError> {
    let default_expires_in_s = p
        .opt_u64("default_expires_in_s")?
        .unwrap_or(DEFAULT_EXPIRES_IN_S);
    if default_expires_in_s == 0 {
        return Err(ConfigError::invalid(
            p.child("default_expires_in_s"),
            "0",
            "must be at least 1",
        ));
    }
    let refresh_margin_s = p
        .opt_u64("refresh_margin_s")?
        .unwrap_or(DEFAULT_REFRESH_MARGIN_S);
    Ok((default_expires_in_s, refresh_margin_s))
}

/// How old a token must be before an upstream 401 may refresh it (SPEC v1.2):
/// a caller can provoke 401s, so a young token is never refreshed on one.
fn drop_on_401_after(p: &Obj) -> Result<u64, ConfigError> {
    let s = p
        .opt_u64("drop_on_401_after_s")?
        .unwrap_or(DEFAULT_DROP_ON_401_AFTER_S);
    if s > MAX_DROP_ON_401_AFTER_S {
        return Err(ConfigError::invalid(
            p.child("drop_on_401_after_s"),
            &s.to_string(),
            format!("must be at most {MAX_DROP_ON_401_AFTER_S}"),
        ));
    }
    Ok(s)
}
