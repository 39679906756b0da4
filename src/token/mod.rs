//! OAuth2 tokens, as data: what to send to a token server ([`request`]), what
//! its answer means ([`response`]), and the per-key cache state machine shared by
//! every worker ([`cache`]). No I/O and no clock here: the filter performs the
//! call and passes the time in.

pub mod cache;
pub mod cas;
pub mod exchange;
pub mod request;
pub mod response;

pub use cache::{CacheState, Decision, Policy};
pub use request::{GrantInput, TokenRequest};
pub use response::{FetchError, Token};

use std::hash::{Hash, Hasher};

use crate::config::{Connection, Credential, Grant, Provider, ProviderKind, SecretRef};

/// The shared-data key of a connection's token cache:
/// `latchkey.v1.tok.<connection>.<fingerprint>`. The fingerprint covers everything
/// that makes a token (token URL, client, grant, scopes, audience, resource, extra
/// parameters), so two plugins on one proxy (Istio shares one namespace) that name
/// a connection alike but configure it differently never share tokens, and a
/// changed configuration starts from an empty cache.
pub fn cache_key(connection: &Connection, provider: &Provider) -> Option<String> {
    let mut h = std::hash::DefaultHasher::new();
    if let (ProviderKind::ManagedIdentity(p), Credential::ManagedIdentity { resource }) =
        (&provider.kind, &connection.credential)
    {
        (
            "imds",
            &p.cluster,
            &p.authority,
            &p.path,
            &p.client_id,
            resource,
        )
            .hash(&mut h);
        return Some(format!(
            "latchkey.v1.tok.{}.{:016x}",
            connection.name,
            h.finish()
        ));
    }
    let (ProviderKind::OAuth2(p), Credential::OAuth2(c)) = (&provider.kind, &connection.credential)
    else {
        return None;
    };
    // A store-held client secret rotates without changing the key: valid
    // tokens stay cached across a rotation.
    let secret = match &p.client_secret {
        SecretRef::Value(s) => s.expose().to_string(),
        SecretRef::Store(i) => format!("store:{i}"),
    };
    (&p.token_url, &p.cluster, &p.client_id, secret).hash(&mut h);
    let grant = match &c.grant {
        Grant::ClientCredentials => "client_credentials".to_string(),
        Grant::RefreshToken(SecretRef::Value(rt)) => format!("refresh_token:{}", rt.expose()),
        Grant::RefreshToken(SecretRef::Store(i)) => format!("refresh_token:store:{i}"),
        Grant::TokenExchange { subject_token_type } => {
            format!("token_exchange:{subject_token_type}")
        }
    };
    (grant, &c.scopes, &c.audience, &c.resource, &c.extra_params).hash(&mut h);
    Some(format!(
        "latchkey.v1.tok.{}.{:016x}",
        connection.name,
        h.finish()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(scopes: &[&str], client_id: &str) -> Config {
        let json = serde_json::json!({
            "secrets": { "s": { "inline": "cs" } },
            "providers": {
                "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                         "client_id": client_id, "client_secret": "s" },
                "mi": { "type": "azure_managed_identity", "cluster": "imds" },
                "keys": { "type": "api_key" }
            },
            "connections": {
                "orders": { "provider": "idp", "grant": "client_credentials", "scopes": scopes,
                            "access": { "authenticated": true } },
                "vault": { "provider": "mi", "resource": "https://vault.azure.net",
                           "access": { "authenticated": true } },
                "key": { "provider": "keys", "api_key": "s", "access": { "public": true } }
            }
        });
        Config::parse(json.to_string().as_bytes(), &|_| None).unwrap()
    }

    fn key(c: &Config, name: &str) -> Option<String> {
        let conn = c.connections.iter().find(|x| x.name == name).unwrap();
        cache_key(conn, &c.providers[conn.provider])
    }

    #[test]
    fn cache_keys_name_the_connection_and_fingerprint_what_makes_its_token() {
        let a = config(&["read"], "gw");
        let orders = key(&a, "orders").unwrap();
        let vault = key(&a, "vault").unwrap();
        for (k, name) in [(&orders, "orders"), (&vault, "vault")] {
            let hex = k.strip_prefix(&format!("latchkey.v1.tok.{name}.")).unwrap();
            assert!(
                hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "{k}"
            );
        }
        // API keys have no token cache.
        assert_eq!(key(&a, "key"), None);
        // Same configuration, same key; another scope or client, another key.
        assert_eq!(
            key(&config(&["read"], "gw"), "orders"),
            Some(orders.clone())
        );
        assert_ne!(
            key(&config(&["write"], "gw"), "orders"),
            Some(orders.clone())
        );
        assert_ne!(key(&config(&["read"], "gw2"), "orders"), Some(orders));
        assert_eq!(key(&config(&["write"], "gw2"), "vault"), Some(vault));
    }
}
