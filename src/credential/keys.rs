//! Where each fetched credential lives in proxy-wasm shared data: the keys of
//! tokens (`latchkey.v1.<plugin>.tok.<connection>.<fingerprint>`) and of stored
//! secrets (`latchkey.v1.<plugin>.sec.<name>.<fingerprint>`). A fingerprint
//! hashes what makes the credential (never exposing a value), so a changed
//! configuration starts from an empty cache and two plugins sharing a VM id never
//! share a key. Token and store fingerprints refer to each other (a client secret
//! read from a store, a Key Vault read with an identity's token): both live here.

use std::hash::{Hash, Hasher};

use crate::config::{
    AuthMethod, Config, Connection, Credential, Grant, Provider, ProviderKind, SecretRef,
    SigningService, Store, StoreKind, VaultAuth,
};

/// How many store references and Key Vault identities a fingerprint follows
/// (a client secret in a Key Vault whose identity is an oauth2 connection is
/// two); past it, a reference counts by its name. Bounds the recursion whatever
/// the configuration.
pub(crate) const KEY_DEPTH: u8 = 4;

/// The plugin's part of every shared-data key: the name it is given (Envoy's
/// plugin name) with every byte other than an ASCII letter, digit, `_` or `-`
/// percent-encoded (`.` too, since it separates the key's fields, and `%`), so
/// two plugins on one proxy (one VM id: Istio's is empty) never share a key
/// and a key says which plugin it is for. An empty name stays empty.
pub fn key_namespace(plugin: &str) -> String {
    let mut out = String::with_capacity(plugin.len());
    for b in plugin.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The shared-data key of a connection's token cache:
/// `latchkey.v1.<namespace>.tok.<connection>.<fingerprint>` (`namespace`: see
/// [`key_namespace`]). The fingerprint covers everything that makes a token
/// (token URL, client, grant, scopes, audience, resource, extra parameters, and
/// for a client secret or refresh token kept in a store, that store's own key),
/// so a connection configured differently, or whose secret is read from
/// elsewhere, never shares tokens, and a changed configuration starts from an
/// empty cache. A store-held secret counts by where it is read, not its value:
/// valid tokens stay cached across a rotation. `None` for a connection without
/// a token (api_key, client certificate).
pub fn token_key(namespace: &str, config: &Config, connection: &Connection) -> Option<String> {
    let fp = token_fingerprint(config, connection, KEY_DEPTH)?;
    Some(format!(
        "latchkey.v1.{}.tok.{}.{fp:016x}",
        key_namespace(namespace),
        connection.name
    ))
}

/// What makes a connection's token, hashed; `None` without a token.
pub(crate) fn token_fingerprint(
    config: &Config,
    connection: &Connection,
    depth: u8,
) -> Option<u64> {
    let provider = config.provider_of(connection)?;
    let mut h = std::hash::DefaultHasher::new();
    match (&provider.kind, &connection.credential) {
        (ProviderKind::ManagedIdentity(p), Credential::ManagedIdentity { resource }) => {
            (
                "imds",
                &p.cluster,
                &p.authority,
                &p.path,
                &p.client_id,
                resource,
            )
                .hash(&mut h);
        }
        (ProviderKind::OAuth2(p), Credential::OAuth2(c)) => {
            ("oauth2", &p.token_url, &p.cluster, &p.client_id).hash(&mut h);
            // How the client authenticates: its secret (where it is read), or the
            // method and what it names.
            match (&p.client_secret, &p.auth_method) {
                (Some(secret), _) => hash_secret(config, secret, depth, &mut h),
                (None, method) => format!("{method:?}").hash(&mut h),
            }
            match &c.grant {
                Grant::ClientCredentials => "client_credentials".hash(&mut h),
                Grant::RefreshToken(rt) => {
                    "refresh_token".hash(&mut h);
                    hash_secret(config, rt, depth, &mut h);
                }
                Grant::TokenExchange { subject_token_type } => {
                    ("token_exchange", subject_token_type).hash(&mut h)
                }
                Grant::AuthorizationCode {
                    per_user, store, ..
                } => {
                    let store = config.token_stores.get(*store).map(|t| &t.name);
                    ("authorization_code", per_user, store).hash(&mut h)
                }
            }
            (&c.scopes, &c.audience, &c.resource, &c.extra_params).hash(&mut h);
        }
        _ => return None,
    }
    Some(h.finish())
}

/// A secret as a fingerprint sees it: a value known at load, or the store it is
/// read from (its name and fingerprint: where and how it is read).
fn hash_secret(config: &Config, secret: &SecretRef, depth: u8, h: &mut impl Hasher) {
    match secret {
        SecretRef::Value(v) => ("value", v.expose()).hash(h),
        SecretRef::Store(i) => {
            let store = config.stores.get(*i);
            let fp = match (store, depth.checked_sub(1)) {
                (Some(st), Some(d)) => Some(store_fingerprint(config, st, d)),
                _ => None,
            };
            ("store", store.map(|st| &st.name), fp).hash(h);
        }
    }
}

/// The shared-data key of a stored secret's cache:
/// `latchkey.v1.<namespace>.sec.<name>.<fingerprint>` (`namespace`: see
/// [`key_namespace`]). The fingerprint covers where and how it is
/// read (cluster, host, path; Key Vault: the identity connection, by its name and
/// what makes its token; Vault: namespace, field and credentials), so a changed
/// reference starts from an empty cache, and two plugins on one proxy never
/// share a value they read differently.
pub fn store_key(namespace: &str, config: &Config, store: &Store) -> String {
    format!(
        "latchkey.v1.{}.sec.{}.{:016x}",
        key_namespace(namespace),
        store.name,
        store_fingerprint(config, store, KEY_DEPTH)
    )
}

/// Where and how a store is read, hashed (see [`store_key`]).
pub(crate) fn store_fingerprint(config: &Config, store: &Store, depth: u8) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    (&store.cluster, &store.authority, &store.path).hash(&mut h);
    match &store.kind {
        StoreKind::KeyVault { identity } => {
            let conn = config.connection(*identity);
            let token = match (conn, depth.checked_sub(1)) {
                (Some(c), Some(d)) => token_fingerprint(config, c, d),
                _ => None,
            };
            ("kv", conn.map(|c| &c.name), token).hash(&mut h);
        }
        StoreKind::Vault {
            auth,
            namespace,
            field,
        } => {
            ("vault", namespace, field).hash(&mut h);
            match auth {
                VaultAuth::Token(t) => t.expose().hash(&mut h),
                VaultAuth::AppRole {
                    role_id,
                    secret_id,
                    login_path,
                } => (role_id, secret_id.expose(), login_path).hash(&mut h),
            }
        }
    }
    h.finish()
}

/// Where provider `provider`'s Transit AppRole login token is cached:
/// `latchkey.v1.<namespace>.signer.<provider>.<fingerprint>.login`; `None`
/// unless the provider signs with Transit after an AppRole login. The
/// fingerprint covers where and as whom it logs in, so a changed role or
/// secret ID never reuses a login of the old one.
pub fn signer_login_key(namespace: &str, provider: &Provider) -> Option<String> {
    let ProviderKind::OAuth2(o) = &provider.kind else {
        return None;
    };
    let AuthMethod::PrivateKeyJwt(key) = &o.auth_method else {
        return None;
    };
    let SigningService::VaultTransit {
        cluster,
        authority,
        auth:
            VaultAuth::AppRole {
                role_id,
                secret_id,
                login_path,
            },
        namespace: vault_namespace,
        ..
    } = &key.service
    else {
        return None;
    };
    let mut h = std::hash::DefaultHasher::new();
    (cluster, authority, vault_namespace, role_id).hash(&mut h);
    (secret_id.expose(), login_path).hash(&mut h);
    Some(format!(
        "latchkey.v1.{}.signer.{}.{:016x}.login",
        key_namespace(namespace),
        provider.name,
        h.finish()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(json: &Value) -> Config {
        Config::parse(json.to_string().as_bytes(), &|_| None).unwrap()
    }

    fn config(scopes: &[&str], client_id: &str) -> Config {
        parse(&json!({
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
        }))
    }

    fn key_in(ns: &str, c: &Config, name: &str) -> Option<String> {
        let conn = c.connections.iter().find(|x| x.name == name).unwrap();
        token_key(ns, c, conn)
    }

    fn key(c: &Config, name: &str) -> Option<String> {
        key_in("lk", c, name)
    }

    #[test]
    fn cache_keys_name_the_connection_and_fingerprint_what_makes_its_token() {
        let a = config(&["read"], "gw");
        let orders = key(&a, "orders").unwrap();
        let vault = key(&a, "vault").unwrap();
        for (k, name) in [(&orders, "orders"), (&vault, "vault")] {
            let hex = k
                .strip_prefix(&format!("latchkey.v1.lk.tok.{name}."))
                .unwrap();
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

    /// `orders` takes its client secret, and `pre` its refresh token, from Vault
    /// stores; `path` is where the client secret is read. With `extra`, one more
    /// store sorts before them: the configuration lists secrets in name order,
    /// so their indices move.
    fn stored(extra: bool, path: &str, rt_path: &str) -> Config {
        let vault = |p: &str, f: &str| {
            json!({ "vault": { "cluster": "vault", "url": "http://vault:8200",
                               "path": p, "field": f, "token": "vt" } })
        };
        let mut v = json!({
            "secrets": { "vt": { "inline": "hvs.x" }, "cs": vault(path, "client_secret"),
                         "rt": vault(rt_path, "refresh_token") },
            "providers": { "idp": { "type": "oauth2", "cluster": "idp",
                "token_url": "https://idp/token", "client_id": "gw", "client_secret": "cs" } },
            "connections": {
                "orders": { "provider": "idp", "grant": "client_credentials",
                            "access": { "authenticated": true } },
                "pre": { "provider": "idp", "grant": "refresh_token", "refresh_token": "rt",
                         "access": { "authenticated": true } }
            }
        });
        if extra {
            v["secrets"]["a_first"] = vault("unused", "f");
        }
        parse(&v)
    }

    #[test]
    fn store_held_secrets_count_by_store_reference_not_position() {
        let a = stored(false, "orders/idp", "orders/rt");
        let b = stored(true, "orders/idp", "orders/rt");
        let index = |c: &Config, n: &str| c.stores.iter().position(|s| s.name == n);
        assert_ne!(index(&a, "cs"), index(&b, "cs"));
        assert_ne!(index(&a, "rt"), index(&b, "rt"));
        // The stores moved: same keys.
        assert_eq!(key(&a, "orders"), key(&b, "orders"));
        assert_eq!(key(&a, "pre"), key(&b, "pre"));
        // The client secret is read from elsewhere: both connections' keys change.
        let moved = stored(false, "orders/other", "orders/rt");
        assert_ne!(key(&moved, "orders"), key(&a, "orders"));
        assert_ne!(key(&moved, "pre"), key(&a, "pre"));
        // The refresh token is: only `pre`'s key changes (and with it the key of
        // its rotated refresh token, `<key>.rt`).
        let other_rt = stored(false, "orders/idp", "orders/rt2");
        assert_eq!(key(&other_rt, "orders"), key(&a, "orders"));
        assert_ne!(key(&other_rt, "pre"), key(&a, "pre"));
    }

    #[test]
    fn key_namespaces_are_the_plugin_name_made_safe() {
        assert_eq!(key_namespace("latchkey"), "latchkey");
        assert_eq!(key_namespace("Lk_2-a"), "Lk_2-a");
        assert_eq!(key_namespace(""), "");
        assert_eq!(
            key_namespace("istio-system.latchkey"),
            "istio-system%2Elatchkey"
        );
        assert_eq!(key_namespace("a b/%\u{e9}"), "a%20b%2F%25%C3%A9");
        // `.` separates the key's fields: namespaces can't run into them.
        assert_ne!(key_namespace("a.tok.b"), key_namespace("a"));
        let c = config(&["read"], "gw");
        let a = key_in("a", &c, "orders").unwrap();
        let b = key_in("istio-system.latchkey", &c, "orders").unwrap();
        assert!(a.starts_with("latchkey.v1.a.tok.orders."), "{a}");
        assert!(
            b.starts_with("latchkey.v1.istio-system%2Elatchkey.tok.orders."),
            "{b}"
        );
        assert_eq!(a.rsplit('.').next(), b.rsplit('.').next());
    }

    /// `orders`, of a provider whose client authenticates with `auth` (fields
    /// added to the provider).
    fn secretless(auth: Value) -> Config {
        let mut v = json!({
            "secrets": { "vt": { "inline": "hvs.x" } },
            "providers": {
                "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp/token",
                         "client_id": "gw" },
                "mi": { "type": "azure_managed_identity", "cluster": "imds" }
            },
            "connections": {
                "orders": { "provider": "idp", "grant": "client_credentials",
                            "access": { "authenticated": true } },
                "fic": { "provider": "mi", "resource": "api://AzureADTokenExchange" },
                "fic2": { "provider": "mi", "resource": "api://Other" }
            }
        });
        v["providers"]["idp"]
            .as_object_mut()
            .unwrap()
            .extend(auth.as_object().unwrap().clone());
        parse(&v)
    }

    #[test]
    fn how_a_secretless_client_authenticates_is_part_of_its_key() {
        let transit = |alg: &str| {
            json!({ "auth_method": "private_key_jwt", "signing_key": { "alg": alg,
                "vault_transit": { "cluster": "vault", "url": "http://vault:8200",
                                   "key": "k", "token": "vt" } } })
        };
        let configs = [
            json!({ "auth_method": "tls_client_auth" }),
            json!({ "auth_method": "client_assertion", "assertion": "fic" }),
            json!({ "auth_method": "client_assertion", "assertion": "fic2" }),
            transit("RS256"),
            transit("ES256"),
        ];
        let keys: Vec<String> = configs
            .iter()
            .map(|auth| key(&secretless(auth.clone()), "orders").unwrap())
            .collect();
        for (i, k) in keys.iter().enumerate() {
            // The same configuration gives the same key; any other, another.
            assert_eq!(
                key(&secretless(configs[i].clone()), "orders").as_ref(),
                Some(k)
            );
            for other in &keys[i + 1..] {
                assert_ne!(k, other, "{}", configs[i]);
            }
            assert_ne!(Some(k), key(&config(&[], "gw"), "orders").as_ref());
        }
    }

    #[test]
    fn a_cycle_of_references_still_gives_a_key() {
        // A Key Vault secret whose identity's refresh token is that secret: the
        // fingerprints stop following after KEY_DEPTH references.
        let c = parse(&json!({
            "secrets": {
                "cs": { "inline": "x" },
                "rt": { "azure_key_vault": "https://kv.vault.azure.net/secrets/rt",
                        "cluster": "keyvault", "identity": "reader" }
            },
            "providers": { "idp": { "type": "oauth2", "cluster": "idp",
                "token_url": "https://idp/token", "client_id": "gw", "client_secret": "cs" } },
            "connections": {
                "reader": { "provider": "idp", "grant": "refresh_token", "refresh_token": "rt" }
            }
        }));
        let k = key(&c, "reader").unwrap();
        assert!(k.starts_with("latchkey.v1.lk.tok.reader."), "{k}");
        assert_eq!(key(&c, "reader"), Some(k));
        assert!(store_key("lk", &c, &c.stores[0]).starts_with("latchkey.v1.lk.sec.rt."));
    }
}
