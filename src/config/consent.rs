//! The v1.2 sections of user-delegated connections: `token_stores` (where
//! refresh tokens a person consented to are kept: Vault/OpenBao KV v2 or Azure
//! Key Vault) and `consent` (the login, callback and disconnect endpoints).

use super::error::ConfigError;
use super::fields::{cluster, timeout_ms, vault_namespace, vault_url};
use super::http_url;
use super::json::{as_object, join, Obj};
use super::lexical;
use super::names::Names;
use super::secret_values::Secrets;
use super::{Consent, TokenStore, TokenStoreKind};

const TOKEN_STORE: &[&str] = &[
    "vault",
    "azure_key_vault",
    "cluster",
    "identity",
    "prefix",
    "timeout_ms",
];
const VAULT: &[&str] = &["cluster", "url", "mount", "prefix", "token", "namespace"];
const CONSENT: &[&str] = &["path", "redirect_uri", "state_key", "return_to"];
/// HMAC-SHA256 keys shorter than this are refused (RFC 2104 §3: at least the
/// hash's output length).
pub const MIN_STATE_KEY_BYTES: usize = 32;
/// Key Vault names are at most 127 characters: a prefix this long leaves room
/// for the connection and the 32-character caller hash.
const MAX_KEY_VAULT_PREFIX: usize = 40;

/// `Config::token_stores`, in key order.
pub fn token_stores(
    top: &Obj,
    names: &Names,
    secrets: &Secrets,
) -> Result<Vec<TokenStore>, ConfigError> {
    let mut out = Vec::new();
    let Some(v) = top.get("token_stores") else {
        return Ok(out);
    };
    for (name, value) in as_object("token_stores", v)? {
        let s = Obj::new(join("token_stores", name), value, TOKEN_STORE)?;
        let timeout_ms = timeout_ms(&s)?;
        let store = match (s.has("vault"), s.has("azure_key_vault")) {
            (true, false) => {
                for field in ["cluster", "identity", "prefix"] {
                    if s.has(field) {
                        return Err(ConfigError::not_allowed(
                            s.child(field),
                            "for \"vault\", give it inside the \"vault\" object",
                        ));
                    }
                }
                let v = Obj::new(s.child("vault"), s.required("vault")?, VAULT)?;
                vault(name, &v, secrets, timeout_ms)?
            }
            (false, true) => key_vault(name, &s, names, timeout_ms)?,
            _ => {
                return Err(ConfigError::not_allowed(
                    s.path.clone(),
                    "give exactly one of \"vault\" or \"azure_key_vault\"",
                ))
            }
        };
        out.push(store);
    }
    Ok(out)
}

fn vault(
    name: &str,
    v: &Obj,
    secrets: &Secrets,
    timeout_ms: u64,
) -> Result<TokenStore, ConfigError> {
    let (authority, root) = vault_url(v)?;
    let root = root.as_str();
    let vault_path = |field: &str, default: &str| -> Result<String, ConfigError> {
        let p = v.opt_str(field)?.unwrap_or(default).trim_matches('/');
        if !lexical::is_vault_path(p) {
            return Err(ConfigError::invalid(
                v.child(field),
                p,
                "not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
            ));
        }
        Ok(p.to_string())
    };
    let mount = vault_path("mount", "secret")?;
    let prefix = vault_path("prefix", "latchkey/connections")?;
    let token = secrets.known_at_load(
        v.req_str("token")?,
        || v.child("token"),
        "env or inline secret",
    )?;
    let namespace = vault_namespace(v)?;
    Ok(TokenStore {
        name: name.to_string(),
        kind: TokenStoreKind::Vault {
            token,
            namespace,
            data_path: format!("{root}/v1/{mount}/data/{prefix}"),
            metadata_path: format!("{root}/v1/{mount}/metadata/{prefix}"),
        },
        cluster: cluster(v)?,
        authority,
        timeout_ms,
    })
}

fn key_vault(
    name: &str,
    s: &Obj,
    names: &Names,
    timeout_ms: u64,
) -> Result<TokenStore, ConfigError> {
    let url = s.req_str("azure_key_vault")?;
    let base = http_url::parse(url)
        .map_err(|e| ConfigError::invalid(s.child("azure_key_vault"), url, e.to_string()))?;
    if !url.starts_with("https://") || !matches!(base.path.as_str(), "" | "/") {
        return Err(ConfigError::invalid(
            s.child("azure_key_vault"),
            url,
            "must be the vault's URL, https://<vault>.vault.azure.net",
        ));
    }
    let identity = names.connection(s.req_str("identity")?, || s.child("identity"))?;
    let prefix = s.opt_str("prefix")?.unwrap_or("latchkey-connections");
    let valid = !prefix.is_empty()
        && prefix.len() <= MAX_KEY_VAULT_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid {
        return Err(ConfigError::invalid(
            s.child("prefix"),
            prefix,
            format!("must be 1 to {MAX_KEY_VAULT_PREFIX} letters, digits or \"-\" (Key Vault's secret name alphabet)"),
        ));
    }
    Ok(TokenStore {
        name: name.to_string(),
        kind: TokenStoreKind::KeyVault {
            identity,
            prefix: prefix.to_string(),
        },
        cluster: cluster(s)?,
        authority: base.authority,
        timeout_ms,
    })
}

/// The `consent` section, if any.
pub fn consent(top: &Obj, secrets: &Secrets) -> Result<Option<Consent>, ConfigError> {
    let Some(v) = top.get("consent") else {
        return Ok(None);
    };
    let c = Obj::new("consent".to_string(), v, CONSENT)?;
    let path = lexical::route_path(c.req_str("path")?).map_err(|e| e.at(c.child("path")))?;
    let path = path.trim_end_matches('/').to_string();
    if path.is_empty() {
        return Err(ConfigError::invalid(
            c.child("path"),
            "/",
            "must not be \"/\": every path under it would be latchkey's",
        ));
    }
    let redirect_uri = lexical::browser_url(c.req_str("redirect_uri")?)
        .map_err(|e| e.at(c.child("redirect_uri")))?;
    let callback_path = super::http_url::parse(&redirect_uri)
        .map(|u| u.path)
        .unwrap_or_default();
    if redirect_uri.contains('?') {
        return Err(ConfigError::invalid(
            c.child("redirect_uri"),
            &redirect_uri,
            "must not have a query (the authorization server adds code and state)",
        ));
    }
    lexical::route_path(&callback_path).map_err(|e| e.at(c.child("redirect_uri")))?;
    if callback_path == path || callback_path.starts_with(&format!("{path}/")) {
        return Err(ConfigError::invalid(
            c.child("redirect_uri"),
            &redirect_uri,
            "its path must not be under consent.path",
        ));
    }
    let key_name = c.req_str("state_key")?;
    let state_key =
        secrets.known_at_load(key_name, || c.child("state_key"), "env or inline secret")?;
    if state_key.expose().len() < MIN_STATE_KEY_BYTES {
        return Err(ConfigError::not_allowed(
            c.child("state_key"),
            format!("the secret is shorter than {MIN_STATE_KEY_BYTES} bytes: too short to sign consent states"),
        ));
    }
    let mut return_to = Vec::new();
    for (i, u) in c
        .opt_str_list("return_to")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        return_to.push(
            lexical::return_to_prefix(u)
                .map_err(|e| e.at(super::json::index(&c.child("return_to"), i)))?,
        );
    }
    Ok(Some(Consent {
        path,
        redirect_uri,
        callback_path,
        state_key,
        return_to,
    }))
}
