//! One store entry of the `secrets` section: an Azure Key Vault secret
//! (`azure_key_vault`, read with a token from connection `identity`) or a
//! HashiCorp Vault / OpenBao KV v2 secret (`vault`, with a token or an AppRole
//! login), compiled to the `:authority` and `:path` of its read.

use super::error::ConfigError;
use super::fields::{cluster, timeout_ms, vault_auth, vault_mount, vault_namespace, vault_url};
use super::json::Obj;
use super::lexical;
use super::names::Names;
use super::secret_values::Secrets;
use super::{Store, StoreKind};

const VAULT: &[&str] = &[
    "cluster",
    "url",
    "mount",
    "path",
    "field",
    "token",
    "approle",
    "namespace",
    "version",
];
const DEFAULT_REFRESH_S: u64 = 300;
const MAX_REFRESH_S: u64 = 86_400;
/// Below this, every proxy reads the store that often: worth a warning.
const LOW_REFRESH_S: u64 = 30;

/// The store entry `secrets.<name>` (`s`); `secrets` holds the values known at load.
pub fn read(
    name: &str,
    s: &Obj,
    names: &Names,
    secrets: &Secrets,
    warnings: &mut Vec<String>,
) -> Result<Store, ConfigError> {
    let timeout_ms = timeout_ms(s)?;
    let (kind, cluster, authority, path, pinned) = if s.has("azure_key_vault") {
        if s.has("vault") {
            return Err(ConfigError::not_allowed(s.child("vault"), "give one store"));
        }
        let id = s.req_str("azure_key_vault")?;
        let kv = key_vault_id(id)
            .map_err(|r| ConfigError::invalid(s.child("azure_key_vault"), id, r))?;
        let identity = names.connection(s.req_str("identity")?, || s.child("identity"))?;
        let path = match &kv.version {
            Some(v) => format!("/secrets/{}/{v}?api-version=7.4", kv.name),
            None => format!("/secrets/{}?api-version=7.4", kv.name),
        };
        (
            StoreKind::KeyVault { identity },
            cluster(s)?,
            kv.host,
            path,
            kv.version.is_some(),
        )
    } else {
        for field in ["cluster", "identity"] {
            if s.has(field) {
                return Err(ConfigError::not_allowed(
                    s.child(field),
                    "for \"vault\", give it inside the \"vault\" object",
                ));
            }
        }
        let v = Obj::new(s.child("vault"), s.required("vault")?, VAULT)?;
        vault(&v, secrets)?
    };
    let refresh_ms = if pinned {
        if s.has("refresh_s") {
            return Err(ConfigError::not_allowed(
                s.child("refresh_s"),
                "a pinned version is read once and never changes",
            ));
        }
        warnings.push(format!(
            "secret \"{name}\" pins one version of the stored secret: it is read once and will not follow rotation"
        ));
        None
    } else {
        let r = s.opt_u64("refresh_s")?.unwrap_or(DEFAULT_REFRESH_S);
        if r == 0 || r > MAX_REFRESH_S {
            return Err(ConfigError::invalid(
                s.child("refresh_s"),
                &r.to_string(),
                format!("must be between 1 and {MAX_REFRESH_S}"),
            ));
        }
        if r < LOW_REFRESH_S {
            warnings.push(format!(
                "secret \"{name}\" is re-read every {r} s: below {LOW_REFRESH_S} s the store sees a read per proxy that often"
            ));
        }
        Some(r * 1000)
    };
    Ok(Store {
        name: name.to_string(),
        kind,
        cluster,
        authority,
        path,
        refresh_ms,
        timeout_ms,
    })
}

/// A `vault` object: its kind, cluster, authority, path, and whether a version is pinned.
fn vault(
    v: &Obj,
    secrets: &Secrets,
) -> Result<(StoreKind, String, String, String, bool), ConfigError> {
    let (authority, prefix) = vault_url(v)?;
    let prefix = prefix.as_str();
    let mount = vault_mount(v, "secret")?;
    let secret_path = v.req_str("path")?;
    if !lexical::is_vault_path(secret_path) {
        return Err(ConfigError::invalid(
            v.child("path"),
            secret_path,
            "not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
        ));
    }
    let version = v.opt_u64("version")?;
    let mut path = format!("{prefix}/v1/{mount}/data/{secret_path}");
    if let Some(n) = version {
        path.push_str(&format!("?version={n}"));
    }
    let auth = vault_auth(v, secrets, prefix)?;
    let namespace = vault_namespace(v)?;
    Ok((
        StoreKind::Vault {
            auth,
            namespace,
            field: v.req_str("field")?.to_string(),
        },
        cluster(v)?,
        authority,
        path,
        version.is_some(),
    ))
}

/// A Vault mount (field `mount`, else `default`): a Vault path, slashes around it dropped.
/// A Key Vault secret identifier, split.
struct KeyVaultId {
    host: String,
    name: String,
    version: Option<String>,
}

/// `https://<vault host>/secrets/<name>[/<version>]`, as Azure prints it.
fn key_vault_id(id: &str) -> Result<KeyVaultId, String> {
    let rest = id
        .strip_prefix("https://")
        .ok_or("must be https://<vault>.vault.azure.net/secrets/<name>[/<version>]")?;
    let (host, path) = rest.split_once('/').ok_or("has no /secrets/<name> path")?;
    let host = host.to_ascii_lowercase();
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err("not a valid vault host".into());
    }
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let name_ok = |n: &str| {
        !n.is_empty() && n.len() <= 127 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match segs.as_slice() {
        ["secrets", name] if name_ok(name) => Ok(KeyVaultId {
            host,
            name: name.to_string(),
            version: None,
        }),
        ["secrets", name, version]
            if name_ok(name) && !version.is_empty() && version.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(KeyVaultId {
                host,
                name: name.to_string(),
                version: Some(version.to_ascii_lowercase()),
            })
        }
        _ => Err("not a secret identifier: expected /secrets/<name> or /secrets/<name>/<version> (names: letters, digits, -)".into()),
    }
}
