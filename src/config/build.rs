//! Building a [`Config`] from the document, in phases: the JSON is read, a first
//! pass gives every named item its index ([`Names`]), then each section is read by
//! its own module, in the order their items need one another's contents:
//! [`claims`], [`secrets`] (values, then [`stores`](super::stores)),
//! [`providers`], [`connections`], the Key Vault identities checked against the
//! connections, [`routes`]; last the top-level settings and the router, built
//! from the routes.

use super::error::{ConfigError, ErrorKind};
use super::json::{Obj, Value};
use super::names::Names;
use super::{claims, client_auth, connections, consent, lexical, providers, routes, secrets};
use super::{
    Config, Connection, Consent, Credential, Grant, Provider, ProviderKind, TokenStore,
    TokenStoreKind, Unmatched,
};
use crate::router::Router;

/// The top-level fields of a configuration (the offline checker reads it too).
pub const TOP_LEVEL_FIELDS: &[&str] = &[
    "claims",
    "secrets",
    "providers",
    "connections",
    "routes",
    "unmatched",
    "filter_state",
    "discovery",
    "max_paused_requests",
    "token_stores",
    "consent",
];
/// Requests one worker may hold paused for a credential; past it, 503 at once.
const DEFAULT_MAX_PAUSED_REQUESTS: u64 = 1024;
const MAX_PAUSED_REQUESTS: u64 = 100_000;

pub fn build(text: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let doc = Value::parse(text).map_err(|e| {
        // serde_json's message for syntax errors holds a position, not content.
        ConfigError::new("", ErrorKind::NotJson(e.to_string()))
    })?;
    let top = Obj::top(&doc, TOP_LEVEL_FIELDS)?;
    let names = Names::collect(&top);
    let mut warnings = Vec::new();

    let (claims, mut claim_paths) = claims::read(&top)?;
    let secrets = secrets::read(&top, &names, env, &mut warnings)?;
    let providers = providers::read(&top, &names, &secrets)?;
    let token_stores = consent::token_stores(&top, &names, &secrets)?;
    let connections = connections::read(
        &top,
        &names,
        &secrets,
        &providers,
        &token_stores,
        &mut claim_paths,
    )?;
    let consent = consent::consent(&top, &secrets)?;
    // A per-user consent is keyed by the caller's issuer and subject: read `iss` too.
    let issuer_claim = connections
        .iter()
        .any(|c| matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { per_user: true, .. })))
        .then(|| claim_paths.index("iss"));
    check_delegated(&connections, &token_stores, &providers, consent.as_ref())?;
    secrets::check_identities(&secrets.stores, &connections, &providers)?;
    client_auth::check(&providers, &connections)?;
    let routes = routes::read(&top, &names, &connections, &mut claim_paths)?;
    warnings.extend(secrets::injected_identities(
        &secrets.stores,
        &connections,
        &routes,
    ));
    let unmatched = match top.opt_str("unmatched")? {
        None | Some("allow") => Unmatched::Allow,
        Some("deny") => Unmatched::Deny,
        Some(other) => {
            return Err(ConfigError::invalid(
                "unmatched",
                other,
                "expected \"allow\" or \"deny\"",
            ))
        }
    };
    let cluster_headers = routes::cluster_headers(&routes);
    let router = Router::new(&routes);
    let max_paused_requests = top
        .opt_u64("max_paused_requests")?
        .unwrap_or(DEFAULT_MAX_PAUSED_REQUESTS);
    if !(1..=MAX_PAUSED_REQUESTS).contains(&max_paused_requests) {
        return Err(ConfigError::invalid(
            top.child("max_paused_requests"),
            &max_paused_requests.to_string(),
            format!("must be 1 to {MAX_PAUSED_REQUESTS}"),
        ));
    }
    let filter_state = top.opt_bool("filter_state")?;
    let mut notes = Vec::new();
    if filter_state.is_none() {
        notes.push(
            "filter_state is not set: access logs get no wasm.latchkey.route, .connection or \
             .decision (set \"filter_state\": true to write them; before v1.1 they were \
             always written)"
                .to_string(),
        );
    }
    let discovery = match top.opt_obj("discovery", &["path"])? {
        None => None,
        Some(d) => {
            Some(lexical::route_path(d.req_str("path")?).map_err(|e| e.at(d.child("path")))?)
        }
    };
    let mut config = Config {
        claims,
        stores: secrets.stores,
        providers,
        connections,
        routes,
        router,
        unmatched,
        claim_paths: claim_paths.into_vec(),
        warnings,
        notes,
        filter_state: filter_state.unwrap_or(false),
        max_paused_requests: max_paused_requests as usize,
        cluster_headers,
        discovery,
        token_stores,
        consent,
        issuer_claim,
    };
    let fixed: Vec<_> = (0..config.routes.len())
        .map(|i| crate::policy::fixed(&config, i))
        .collect();
    for (route, fixed) in config.routes.iter_mut().zip(fixed) {
        route.fixed = fixed;
    }
    Ok(config)
}

/// authorization_code connections need the `consent` section (their login and
/// callback), and a Key Vault token store's identity must be a managed-identity
/// connection. Connection names go into store paths and login URLs: they must
/// be safe there as they are.
fn check_delegated(
    connections: &[Connection],
    token_stores: &[TokenStore],
    providers: &[Provider],
    consent: Option<&Consent>,
) -> Result<(), ConfigError> {
    for c in connections {
        if !matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { .. }))
        {
            continue;
        }
        let path = format!("connections.{}", c.name);
        if consent.is_none() {
            return Err(ConfigError::not_allowed(
                format!("{path}.grant"),
                "\"authorization_code\" needs the top-level \"consent\" section (login and callback endpoints)",
            ));
        }
        let safe = !c.name.is_empty()
            && c.name.len() <= 64
            && c.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !safe {
            return Err(ConfigError::invalid(
                path,
                &c.name,
                "an authorization_code connection's name goes into URLs and store paths: 1 to 64 letters, digits, \"-\" or \"_\"",
            ));
        }
        // Key Vault names a record `<prefix>-<connection>-<caller>`, at most 127 characters.
        if let Credential::OAuth2(o) = &c.credential {
            if let Grant::AuthorizationCode {
                per_user, store, ..
            } = o.grant
            {
                if let Some(t) = token_stores.get(store) {
                    if let TokenStoreKind::KeyVault { prefix, .. } = &t.kind {
                        let caller = if per_user {
                            crate::consent::caller_hash("", "")
                        } else {
                            crate::consent::SHARED.to_string()
                        };
                        let name = crate::credential::token_store::key_vault_name(
                            prefix, &c.name, &caller,
                        );
                        if name.len() > crate::credential::token_store::MAX_KEY_VAULT_NAME {
                            return Err(ConfigError::invalid(
                                path,
                                &c.name,
                                format!("its Key Vault secret names (token store {:?}) would be longer than 127 characters: shorten the connection's name or the store's prefix", t.name),
                            ));
                        }
                    }
                }
            }
        }
    }
    for t in token_stores {
        if let TokenStoreKind::KeyVault { identity, .. } = &t.kind {
            // As a Key Vault secret's identity: a token the gateway gets for itself.
            let ok =
                connections.get(*identity).is_some_and(|c| {
                    match &c.credential {
                Credential::ManagedIdentity { .. } => true,
                Credential::OAuth2(o) => {
                    matches!(o.grant, Grant::ClientCredentials)
                        && providers.get(c.provider).is_some_and(|p| {
                            matches!(&p.kind, ProviderKind::OAuth2(op) if op.gets_tokens_alone())
                        })
                }
                _ => false,
            }
                });
            if !ok {
                return Err(ConfigError::not_allowed(
                    format!("token_stores.{}.identity", t.name),
                    "must name an azure_managed_identity connection, or a client_credentials one whose client secret is known at load (its token reads and writes the vault)",
                ));
            }
        }
    }
    Ok(())
}
