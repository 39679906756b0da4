//! Readers of fields that several sections share: the Envoy `cluster` a fetch
//! goes through, a fetch's `timeout_ms`, and the refusal of fields that belong to
//! another kind of provider or connection.

use super::error::ConfigError;
use super::http_url;
use super::json::Obj;
use super::lexical;
use super::secret_values::Secrets;
use super::VaultAuth;

const DEFAULT_TIMEOUT_MS: u64 = 5000;
const MAX_TIMEOUT_MS: u64 = 300_000;

/// The required `cluster` of `o`: an Envoy cluster name ([`lexical::cluster_name`]).
pub fn cluster(o: &Obj) -> Result<String, ConfigError> {
    let name = o.req_str("cluster")?;
    lexical::cluster_name(name).map_err(|e| e.at(o.child("cluster")))?;
    Ok(name.to_string())
}

/// `timeout_ms` of a store or provider (default 5 s, at most 5 min).
pub fn timeout_ms(o: &Obj) -> Result<u64, ConfigError> {
    let timeout_ms = o.opt_u64("timeout_ms")?.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ConfigError::invalid(
            o.child("timeout_ms"),
            &timeout_ms.to_string(),
            format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        ));
    }
    Ok(timeout_ms)
}

/// Refuses any field of `all` that is set on `o` but not in `allowed` (the fields of
/// one kind of provider or connection), naming it with `reason`.
pub fn only_fields(
    o: &Obj,
    all: &[&str],
    allowed: &[&str],
    reason: &'static str,
) -> Result<(), ConfigError> {
    match all.iter().find(|f| !allowed.contains(f) && o.has(f)) {
        Some(field) => Err(ConfigError::not_allowed(o.child(field), reason)),
        None => Ok(()),
    }
}

pub fn owned(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_string).collect()
}

/// A Vault / OpenBao `url` (secret stores, token stores, Transit): its
/// `:authority`, and its path without a trailing `/` (a proxy prefix, or empty),
/// under which `/v1/…` goes. No query.
pub fn vault_url(v: &Obj) -> Result<(String, String), ConfigError> {
    let url = v.req_str("url")?;
    let base = http_url::parse(url)
        .map_err(|e| ConfigError::invalid(v.child("url"), url, e.to_string()))?;
    if base.path.contains('?') {
        return Err(ConfigError::invalid(
            v.child("url"),
            url,
            "must not have a query",
        ));
    }
    let root = base.path.trim_end_matches('/').to_string();
    Ok((base.authority, root))
}

/// A Vault `namespace` (sent as `X-Vault-Namespace`), if set.
pub fn vault_namespace(v: &Obj) -> Result<Option<String>, ConfigError> {
    let namespace = v.opt_str("namespace")?.map(str::to_string);
    if let Some(ns) = &namespace {
        lexical::header_value(ns).map_err(|e| e.at(v.child("namespace")))?;
    }
    Ok(namespace)
}

const APPROLE: &[&str] = &["role_id", "secret_id", "mount"];

/// How latchkey authenticates to a Vault (secret stores, Transit signing keys):
/// exactly one of `token` (a secret name) or `approle` (`role_id`, `secret_id`
/// a secret name, `mount` default "approle"); `prefix`: the url's path.
pub fn vault_auth(v: &Obj, secrets: &Secrets, prefix: &str) -> Result<VaultAuth, ConfigError> {
    match (v.get("token"), v.get("approle")) {
        (Some(_), None) => {
            let t = v.req_str("token")?;
            Ok(VaultAuth::Token(secrets.known_at_load(
                t,
                || v.child("token"),
                "env or inline secret",
            )?))
        }
        (None, Some(a)) => {
            let a = Obj::new(v.child("approle"), a, APPROLE)?;
            let role_id = a.req_str("role_id")?.to_string();
            let sid = a.req_str("secret_id")?;
            let secret_id =
                secrets.known_at_load(sid, || a.child("secret_id"), "env or inline secret")?;
            let login_mount = vault_mount(&a, "approle")?;
            Ok(VaultAuth::AppRole {
                role_id,
                secret_id,
                login_path: format!("{prefix}/v1/auth/{login_mount}/login"),
            })
        }
        _ => Err(ConfigError::not_allowed(
            v.path.clone(),
            "give exactly one of \"token\" or \"approle\"",
        )),
    }
}

/// A Vault mount path (`mount`), `default` when not given.
pub fn vault_mount(o: &Obj, default: &'static str) -> Result<String, ConfigError> {
    let v = o.opt_str("mount")?.unwrap_or(default).trim_matches('/');
    if !lexical::is_vault_path(v) {
        return Err(ConfigError::invalid(
            o.child("mount"),
            v,
            "not a Vault mount path",
        ));
    }
    Ok(v.to_string())
}
