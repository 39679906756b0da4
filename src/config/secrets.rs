//! The `secrets` section: each entry is a value known at load (`env`, `inline`)
//! or a store read at run time (`azure_key_vault`, `vault`; read in [`stores`]).
//! Values are read first, in key order, so that a store's own credential (a
//! Vault token, an AppRole `secret_id`) may name any of them. Other sections
//! name secrets through [`Secrets::reference`].
//!
//! After the connections are read, [`check_identities`] checks that each Key
//! Vault secret's `identity` is a connection that can read it, and
//! [`injected_identities`] warns about one a route also sends upstream.

use super::error::{ConfigError, ErrorKind};
use super::json::{as_object, join, Obj};
use super::names::{holds_value, Names};
pub use super::secret_values::Secrets;
use super::{
    stores, Connection, Credential, Grant, Provider, ProviderKind, Route, Store, StoreKind,
};
use crate::secret::{Secret, SecretSource};

const SECRET: &[&str] = &[
    "env",
    "inline",
    "azure_key_vault",
    "vault",
    "cluster",
    "identity",
    "refresh_s",
    "timeout_ms",
];
/// The fields of a store entry besides `azure_key_vault` or `vault` itself.
const STORE_FIELDS: &[&str] = &["cluster", "identity", "refresh_s", "timeout_ms"];

pub fn read<'t>(
    top: &Obj<'t>,
    names: &Names<'t>,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Secrets<'t>, ConfigError> {
    let mut secrets = Secrets::default();
    let Some(v) = top.get("secrets") else {
        return Ok(secrets);
    };
    for (name, value) in as_object("secrets", v)? {
        let s = Obj::new(join("secrets", name), value, SECRET)?;
        let given: Vec<&str> = ["env", "inline", "azure_key_vault", "vault"]
            .into_iter()
            .filter(|k| s.has(k))
            .collect();
        if given.len() != 1 {
            let reason = if given.is_empty() {
                "give exactly one of \"env\", \"inline\", \"azure_key_vault\" or \"vault\""
            } else {
                "give exactly one of \"env\", \"inline\", \"azure_key_vault\" or \"vault\", not several"
            };
            return Err(ConfigError::not_allowed(s.path, reason));
        }
        if holds_value(value) {
            for field in STORE_FIELDS {
                if s.has(field) {
                    return Err(ConfigError::not_allowed(
                        s.child(field),
                        "only allowed beside \"azure_key_vault\" or \"vault\"",
                    ));
                }
            }
            let secret = value_secret(name, &s, env, warnings)?;
            secrets.values.insert(name, secret);
        }
    }
    // Stores second: their own credentials name values, in any order.
    for (name, value) in as_object("secrets", v)? {
        if holds_value(value) {
            continue;
        }
        let s = Obj::new(join("secrets", name), value, SECRET)?;
        let store = stores::read(name, &s, names, &secrets, warnings)?;
        secrets.stores.push(store);
    }
    Ok(secrets)
}

/// An `env` or `inline` secret, resolved now.
fn value_secret(
    name: &str,
    s: &Obj,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Secret, ConfigError> {
    let source = if s.has("env") {
        SecretSource::Env(s.req_str("env")?.to_string())
    } else {
        warnings.push(format!(
            "secret \"{name}\" is inline in the configuration; use \"env\" outside development"
        ));
        SecretSource::Inline(Secret::new(s.req_str("inline")?))
    };
    source.resolve(env).map_err(|e| {
        let field = if matches!(source, SecretSource::Env(_)) {
            "env"
        } else {
            "inline"
        };
        ConfigError::new(s.child(field), ErrorKind::Secret(e))
    })
}

/// Checks that each Key Vault secret's `identity` gives a token without a caller
/// and without a store: a managed identity, or an OAuth2 connection that isn't a
/// token exchange and whose client secret is known at load.
pub fn check_identities(
    stores: &[Store],
    connections: &[Connection],
    providers: &[Provider],
) -> Result<(), ConfigError> {
    for store in stores {
        let StoreKind::KeyVault { identity } = store.kind else {
            continue;
        };
        let Some(conn) = connections.get(identity) else {
            continue;
        };
        let ok = match &conn.credential {
            Credential::ManagedIdentity { .. } => true,
            Credential::OAuth2(o) => {
                matches!(o.grant, Grant::ClientCredentials | Grant::RefreshToken(_))
                    && providers.get(conn.provider).is_some_and(
                        |p| matches!(&p.kind, ProviderKind::OAuth2(op) if op.gets_tokens_alone()),
                    )
            }
            Credential::ApiKey(_) | Credential::ClientCertificate { .. } => false,
        };
        if !ok {
            return Err(ConfigError::invalid(
                join(&join("secrets", &store.name), "identity"),
                &conn.name,
                "must be an azure_managed_identity connection, or an oauth2 one that needs no caller and whose client_secret is not in a store",
            ));
        }
    }
    Ok(())
}

/// A Key Vault identity's token is for the vault: a route that injects the same
/// connection sends it upstream. Allowed (one connection may serve both on
/// purpose), but worth a warning; one per connection, naming the first route.
pub fn injected_identities(
    stores: &[Store],
    connections: &[Connection],
    routes: &[Route],
) -> Vec<String> {
    let mut warnings = Vec::new();
    for (ci, conn) in connections.iter().enumerate() {
        let Some(store) = stores
            .iter()
            .find(|s| matches!(s.kind, StoreKind::KeyVault { identity } if identity == ci))
        else {
            continue;
        };
        let Some(route) = routes
            .iter()
            .find(|r| r.inject.iter().any(|inj| inj.connections.contains(&ci)))
        else {
            continue;
        };
        warnings.push(format!(
            "connection \"{}\" is the Key Vault identity of secret \"{}\" and route \"{}\" \
             injects it: a token that can read the vault leaves the gateway; give the route \
             a connection of its own",
            conn.name, store.name, route.name
        ));
    }
    warnings
}
