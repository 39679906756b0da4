//! A loaded configuration with what serving it needs beside the configuration
//! itself: the stats' ids, the discovery index, each fetched credential's
//! shared-data slot, and this VM's own copies of tokens and store values (a
//! request served from a copy makes no host call for it). One per plugin
//! configuration; requests and fetches hold it (`Rc`) until they end, so a
//! configuration swap never changes what a request in flight sees.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::config::{Config, Credential, Grant, ProviderKind};
use crate::credential::cache::{Cached, Policy};
use crate::credential::slot::{LoginSlot, StoreSlot, TokenSlot};
use crate::proxy::Proxy;
use crate::secret::Secret;
use crate::stats::Stats;

/// A loaded configuration with what the request path needs beside it.
pub struct Runtime {
    pub config: Config,
    pub stats: Stats,
    /// Token cache per connection index (oauth2 and managed-identity connections).
    pub tokens: Vec<Option<TokenSlot>>,
    /// Value cache per store index.
    pub stores: Vec<StoreSlot>,
    /// Per provider index: its Transit signing key's AppRole login cache.
    pub signer_logins: Vec<Option<LoginSlot>>,
    /// This VM's copy of each store's current value, kept fresh by the tick
    /// (`Broker::renew_store_copies`): a request reads it with no host call at all.
    pub store_values: RefCell<Vec<Option<Secret>>>,
    /// This VM's copy of each connection's current token (not for token
    /// exchange), kept while the tick finds it good for a few seconds more
    /// (`Broker::renew_token_copies`): a request then reads neither the shared cache
    /// nor the clock.
    pub token_copies: RefCell<Vec<Option<Rc<TokenCopy>>>>,
    /// Discovery answers, serialized once per configuration (only when
    /// `discovery.path` is set).
    pub discovery: Option<crate::discovery::Index>,
    /// The CAS of [`COPY_GENERATION`] when the copies above were taken: a token
    /// dropped on an upstream 401 by any worker moves it, and every VM's copies
    /// are then dropped before the next request uses one.
    pub copy_generation: std::cell::Cell<u32>,
    /// Consent states used on this proxy (`consent::Used`), with a `consent` section.
    pub used_states_key: Option<String>,
    /// This VM's copies of per-user tokens, per connection index by caller key
    /// (at most [`MAX_CALLER_COPIES`] per connection), kept like `token_copies`:
    /// while the tick finds them good, and never across a [`COPY_GENERATION`] move.
    pub caller_copies: RefCell<Vec<HashMap<String, Rc<TokenCopy>>>>,
}

/// A token this VM holds, made ready for requests once: a request takes
/// reference counts, not copies of the token.
#[derive(Debug)]
pub struct TokenCopy {
    pub cached: Cached,
    pub token: Secret,
    /// `Bearer <token>`: the header value of an entry without a `prefix`.
    pub bearer: Secret,
}

impl TokenCopy {
    pub fn new(cached: Cached) -> TokenCopy {
        let token = Secret::new(cached.token.as_str());
        let bearer = Secret::new(format!("Bearer {}", cached.token));
        TokenCopy {
            cached,
            token,
            bearer,
        }
    }
}

/// Per-user token copies one VM keeps per connection; past it, one is dropped.
pub const MAX_CALLER_COPIES: usize = 1024;

/// An always-empty shared-data key whose CAS moves whenever a worker drops a
/// token the upstream refused. Reading it costs a request one host call and no
/// copy; a VM's token copies are good only while it hasn't moved.
pub const COPY_GENERATION: &str = "latchkey.tokens.generation";

impl Runtime {
    /// This VM's copy of store `i`'s value, if it has one.
    pub fn store_value(&self, i: usize) -> Option<Secret> {
        self.store_values
            .try_borrow()
            .ok()
            .and_then(|v| v.get(i).cloned().flatten())
    }

    /// This VM's copy of connection `c`'s token, if it holds one.
    pub fn token_copy(&self, c: usize) -> Option<Rc<TokenCopy>> {
        self.token_copies
            .try_borrow()
            .ok()
            .and_then(|v| v.get(c).cloned().flatten())
    }

    pub fn has_token_copy(&self, c: usize) -> bool {
        self.token_copies
            .try_borrow()
            .is_ok_and(|v| v.get(c).is_some_and(Option::is_some))
    }

    /// The current [`COPY_GENERATION`]; `None` when it can't be read (then no
    /// copy may be used).
    pub fn read_copy_generation(p: &impl Proxy) -> Option<u32> {
        match p.shared_get(COPY_GENERATION) {
            Ok(Some((_, cas))) => Some(cas),
            _ => None,
        }
    }

    /// Drops this VM's token copies if a worker dropped a token since they were
    /// taken (or the generation can't be read).
    pub fn check_copy_generation(&self, p: &impl Proxy) {
        let now = Self::read_copy_generation(p);
        if now != Some(self.copy_generation.get()) {
            self.drop_token_copies();
            self.copy_generation.set(now.unwrap_or(0));
        }
    }

    pub fn drop_token_copies(&self) {
        if let Ok(mut v) = self.token_copies.try_borrow_mut() {
            v.iter_mut().for_each(|t| *t = None);
        }
        if let Ok(mut v) = self.caller_copies.try_borrow_mut() {
            v.iter_mut().for_each(HashMap::clear);
        }
    }

    /// This VM's copy of caller `key`'s token of connection `c`, if it holds one.
    pub fn caller_copy(&self, c: usize, key: &str) -> Option<Rc<TokenCopy>> {
        self.caller_copies
            .try_borrow()
            .ok()
            .and_then(|v| v.get(c)?.get(key).cloned())
    }

    pub fn has_caller_copy(&self, c: usize, key: &str) -> bool {
        self.caller_copies
            .try_borrow()
            .is_ok_and(|v| v.get(c).is_some_and(|m| m.contains_key(key)))
    }

    /// Keeps a copy of a caller's token (or drops it: `None`).
    pub fn set_caller_copy(&self, c: usize, key: &str, token: Option<Cached>) {
        let Ok(mut v) = self.caller_copies.try_borrow_mut() else {
            return;
        };
        let Some(map) = v.get_mut(c) else {
            return;
        };
        match token {
            None => {
                map.remove(key);
            }
            Some(t) => {
                if map.len() >= MAX_CALLER_COPIES && !map.contains_key(key) {
                    // Bounded: drop one (the shared cache still holds it).
                    if let Some(k) = map.keys().next().cloned() {
                        map.remove(&k);
                    }
                }
                map.insert(key.to_string(), Rc::new(TokenCopy::new(t)));
            }
        }
    }

    /// Drops caller copies that won't stay good until the tick after next.
    pub fn trim_caller_copies(&self, now: u64, grace_ms: u64) {
        if let Ok(mut v) = self.caller_copies.try_borrow_mut() {
            for map in v.iter_mut() {
                map.retain(|_, t| t.cached.copyable_until(now, grace_ms));
            }
        }
    }

    pub fn set_token_copy(&self, c: usize, token: Option<Cached>) {
        if let Ok(mut v) = self.token_copies.try_borrow_mut() {
            if let Some(slot) = v.get_mut(c) {
                *slot = token.map(|t| Rc::new(TokenCopy::new(t)));
            }
        }
    }

    pub fn set_store_value(&self, i: usize, value: Secret) {
        if let Ok(mut v) = self.store_values.try_borrow_mut() {
            if let Some(slot) = v.get_mut(i) {
                *slot = Some(value);
            }
        }
    }
}

/// Creates a shared-data key if it is absent: "create if absent" by CAS is not
/// atomic in the host, so every key is created at configure time.
fn precreate(p: &impl Proxy, key: &str) {
    if let Ok(None) = p.shared_get(key) {
        let _ = p.shared_set(key, b"", 0);
    }
}

impl Runtime {
    /// `namespace`: the plugin's name, so that two plugins sharing a VM id never
    /// share a shared-data key.
    pub fn new(p: &impl Proxy, config: Config, namespace: &str) -> Runtime {
        let stats = Stats::define(p, &config);
        let tokens: Vec<Option<TokenSlot>> = config
            .connections
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                let provider = config.provider_of(c)?;
                let (timeout_ms, margin_s, default_s, after_401_s) = match &provider.kind {
                    ProviderKind::OAuth2(p) => (p.timeout_ms, p.refresh_margin_s, p.default_expires_in_s, p.drop_on_401_after_s),
                    ProviderKind::ManagedIdentity(p) => (p.timeout_ms, p.refresh_margin_s, p.default_expires_in_s, p.drop_on_401_after_s),
                    ProviderKind::ApiKey | ProviderKind::ClientCertificate => return None,
                };
                let key = crate::credential::keys::token_key(namespace, &config, c)?;
                let refresh = matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::RefreshToken(_)));
                // Per caller: token exchange (by subject token) and per-user consent (by caller).
                let per_caller = matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. } | Grant::AuthorizationCode { per_user: true, .. }));
                let rt_key = refresh.then(|| format!("{key}.rt"));
                // A fetch of several calls holds its lease for all of them, so that no
                // other worker starts a second one meanwhile (a second redemption of a
                // rotating refresh token can make the server revoke the grant).
                let timeout_ms = timeout_ms + fetch_steps_ms(&config, c);
                let slot = TokenSlot {
                    key,
                    per_caller,
                    rt_key,
                    policy: Policy::new(timeout_ms, margin_s * 1000),
                    default_lifetime_ms: default_s * 1000,
                    drop_on_401_after_ms: after_401_s * 1000,
                    own_addr: None,
                };
                let own_addr = slot.addr(ci, None).map(Rc::new);
                let slot = TokenSlot { own_addr, ..slot };
                // Create the keys now: "create if absent" by CAS is not atomic in the host.
                let keys: Vec<String> = if per_caller {
                    (0..crate::credential::exchange::SETS).map(|i| slot.set_key(i)).collect()
                } else {
                    std::iter::once(slot.key.clone()).chain(slot.rt_key.clone()).collect()
                };
                for k in &keys {
                    precreate(p, k);
                }
                Some(slot)
            })
            .collect();
        let stores = config
            .stores
            .iter()
            .map(|st| {
                let key = crate::credential::keys::store_key(namespace, &config, st);
                let login_key = matches!(
                    &st.kind,
                    crate::config::StoreKind::Vault {
                        auth: crate::config::VaultAuth::AppRole { .. },
                        ..
                    }
                )
                .then(|| format!("{key}.login"));
                precreate(p, &key);
                if let Some(k) = &login_key {
                    precreate(p, k);
                }
                StoreSlot {
                    key,
                    login_key,
                    policy: Policy::new(st.timeout_ms, 0),
                }
            })
            .collect();
        let signer_logins = config
            .providers
            .iter()
            .map(|pr| {
                let key = crate::credential::keys::signer_login_key(namespace, pr)?;
                let timeout_ms = match &pr.kind {
                    ProviderKind::OAuth2(o) => match &o.auth_method {
                        crate::config::AuthMethod::PrivateKeyJwt(k) => k.timeout_ms,
                        _ => o.timeout_ms,
                    },
                    _ => return None,
                };
                precreate(p, &key);
                Some(LoginSlot {
                    key,
                    policy: Policy::new(timeout_ms, 0),
                })
            })
            .collect();
        let store_values = RefCell::new(vec![None; config.stores.len()]);
        let token_copies = RefCell::new(vec![None; config.connections.len()]);
        let caller_copies = RefCell::new(vec![HashMap::new(); config.connections.len()]);
        if tokens.iter().any(Option::is_some) {
            precreate(p, COPY_GENERATION);
        }
        let copy_generation = std::cell::Cell::new(Runtime::read_copy_generation(p).unwrap_or(0));
        let used_states_key = config.consent.as_ref().map(|_| {
            let k = format!(
                "latchkey.v1.{}.consent.used",
                crate::credential::keys::key_namespace(namespace)
            );
            precreate(p, &k);
            k
        });
        let discovery = config
            .discovery
            .as_ref()
            .map(|_| crate::discovery::Index::new(&config));

        Runtime {
            config,
            stats,
            tokens,
            stores,
            signer_logins,
            store_values,
            token_copies,
            discovery,
            copy_generation,
            used_states_key,
            caller_copies,
        }
    }
}

/// How long the calls a connection's token fetch makes before its token request
/// may take: a signed assertion's signing call (private_key_jwt), and for an
/// authorization_code connection its record's read and its write-back (twice, for
/// the re-reads after a lost compare-and-set).
fn fetch_steps_ms(config: &Config, c: &crate::config::Connection) -> u64 {
    let Some(ProviderKind::OAuth2(p)) = config.provider_of(c).map(|p| &p.kind) else {
        return 0;
    };
    let signing = match &p.auth_method {
        crate::config::AuthMethod::PrivateKeyJwt(k) => k.timeout_ms,
        _ => 0,
    };
    let store = match &c.credential {
        Credential::OAuth2(o) => match o.grant {
            Grant::AuthorizationCode { store, .. } => config
                .token_stores
                .get(store)
                .map_or(0, |t| 2 * t.timeout_ms + p.timeout_ms),
            _ => 0,
        },
        _ => 0,
    };
    signing + store
}
