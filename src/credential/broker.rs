//! The credential broker of one VM: reads and writes the shared cache of every
//! fetched credential (OAuth2 and managed-identity tokens, values read from secret
//! stores, Vault AppRole logins), owns the fetches this VM makes, and the requests
//! paused on this VM waiting for one. All of them go through one state machine
//! ([`crate::credential::cache`]): one fetch per key for the whole proxy, refresh ahead,
//! backoff, last good value kept.
//!
//! A fetch may need another credential first (a Key Vault read needs its
//! identity's token, a Vault read its AppRole login, a token request a client
//! secret from a store): it then stays deferred, and is retried on the tick, until
//! that credential is there or its lease runs out.
//!
//! Pure: shared data, calls, logs and stats go through [`Proxy`]; time comes in.
//! The glue dispatches from the root context (in `on_tick`), so that a
//! background refresh outlives the request that triggered it, hands each
//! answer to [`Broker::on_answer`], and applies the outcomes of paused requests
//! [`Broker::due_waiters`] gives back. Paused requests are looked at again when a
//! key they wait on moves: a fetch of this VM or another worker's.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;

use crate::config::{AuthMethod, Credential, Grant, ProviderKind, SecretRef, StoreKind, VaultAuth};
use crate::credential::cache::{self, CacheState, Cached, Choice, FetchOutcome, Policy};
use crate::credential::cas::{self, Attempt};
use crate::credential::exchange::Set;
pub use crate::credential::slot::{Addr, Owner, StoreSlot, TokenSlot};
use crate::credential::store::{self, HttpCall, StoreError};
use crate::credential::token_request::{self, ClientCredential, GrantInput};
use crate::credential::token_response::{self, FetchError};
use crate::fnv::FnvMap;
use crate::inject::Resolved;
use crate::proxy::{HostFault, Level, Proxy};
use crate::request::{self, Needed, Outcome};
use crate::runtime::{Runtime, TokenCopy, COPY_GENERATION};
use crate::secret::Secret;
use crate::stats::{StoreStat, TokenStat};

/// Tick while a fetch waits to be dispatched.
const KICK_MS: u32 = 1;
/// Tick while requests wait for a token another worker fetches.
const POLL_MS: u32 = 10;
/// Tick when nothing waits: counters kept in the VM are flushed, stores' age
/// gauges updated. Counts reach Envoy at most this long after a request.
pub const IDLE_MS: u32 = 1000;
/// A VM serves a token from its own copy only while it stays good (no refresh
/// due) for this long: three idle ticks. The tick that checks it runs on the
/// same worker thread as the requests, so it can't fall behind them by more
/// than one event-loop turn; the copy is re-checked (and dropped near its
/// refresh point) about every second.
const COPY_GRACE_MS: u64 = 3 * IDLE_MS as u64;
/// CAS attempts before giving up on a contended key for this round.
const CAS_TRIES: usize = 4;

/// What was read with a state, to write it back by CAS.
struct Stored {
    cas: u32,
    set: Option<Set>,
}

thread_local! {
    /// The last decoded state per key, by CAS token: a key whose CAS hasn't moved
    /// holds the same bytes, so the JSON isn't parsed again on every request.
    static DECODED: std::cell::RefCell<HashMap<String, (u32, CacheState)>> =
        std::cell::RefCell::new(HashMap::new());
}

fn decode_cached(key: &str, bytes: &[u8], cas: u32) -> CacheState {
    DECODED.with(|d| {
        let Ok(mut d) = d.try_borrow_mut() else {
            return CacheState::decode(bytes);
        };
        match d.get(key) {
            Some((c, state)) if *c == cas && cas != 0 => state.clone(),
            _ => {
                let state = CacheState::decode(bytes);
                d.insert(key.to_string(), (cas, state.clone()));
                state
            }
        }
    })
}

fn load(p: &impl Proxy, addr: &Addr) -> Result<(CacheState, Stored), HostFault> {
    let (bytes, cas) = p.shared_get(&addr.key)?.unwrap_or_default();
    Ok(match &addr.subject {
        None => (
            decode_cached(&addr.key, &bytes, cas),
            Stored { cas, set: None },
        ),
        Some(s) => {
            let set = Set::decode(&bytes);
            (
                set.state(&s.hash),
                Stored {
                    cas,
                    set: Some(set),
                },
            )
        }
    })
}

/// CAS-writes an entry's state; `Ok(false)` when another writer came first.
fn store(
    p: &impl Proxy,
    loaded: &Runtime,
    addr: &Addr,
    stored: Stored,
    next: &CacheState,
    now: u64,
) -> Result<bool, HostFault> {
    let bytes = match (&addr.subject, stored.set) {
        (Some(s), Some(mut set)) => {
            set.put(&s.hash, next.clone(), now);
            set.encode()
        }
        _ => next.encode(),
    };
    let written = p.shared_set(&addr.key, &bytes, stored.cas)?;
    if let (true, None, Owner::Connection(c)) = (written, &addr.subject, addr.owner) {
        loaded.stats.token_state(p, c, next.gauge());
    }
    Ok(written)
}

/// What a request gets for one oauth2 connection.
pub enum Lookup {
    Ready(Cached),
    Wait,
    Reject {
        retry_after_ms: u64,
        /// Nobody consented (authorization_code): 403 `consent_required`, not 503.
        consent_required: bool,
    },
}

/// The credential serving one inject entry.
pub struct EntryCredential {
    pub secret: Secret,
    /// `""` for API keys, `"Bearer "` for tokens (when the entry gives no prefix).
    pub default_prefix: &'static str,
    /// `default_prefix` then the secret, when it was made ahead (a token copy).
    pub with_default: Option<Secret>,
    /// For tokens: where it is cached and its id, so an upstream 401 can refresh it.
    pub token: Option<Used>,
}

/// A token a request carried upstream: where it is cached, its id, and (token
/// exchange) the subject token a refresh needs.
#[derive(Clone)]
pub struct Used {
    /// Shared with the token's copy: a request clones a reference count.
    addr: Rc<Addr>,
    id: u64,
    subject: Option<Secret>,
}

impl EntryCredential {
    pub fn resolved(creds: &[EntryCredential]) -> impl Iterator<Item = Resolved<'_>> {
        creds.iter().map(|c| Resolved {
            secret: &c.secret,
            default_prefix: c.default_prefix,
            with_default: c.with_default.as_ref(),
        })
    }

    pub fn tokens(creds: &[EntryCredential]) -> Vec<Used> {
        creds.iter().filter_map(|c| c.token.clone()).collect()
    }
}

/// All the credentials of a request, or why not yet / not at all.
pub enum Resolution {
    /// One per inject entry.
    Ready(Vec<EntryCredential>),
    Wait {
        deadline_ms: u64,
        /// The shared-data keys whose change may end the wait.
        keys: Vec<String>,
    },
    Reject {
        connection: usize,
        retry_after_ms: u64,
        /// authorization_code without consent: 403 with the login URL.
        consent_required: bool,
    },
}

/// A request paused until its credentials arrive.
pub struct Waiter {
    pub loaded: Rc<Runtime>,
    /// What the request path decided, and still needs.
    pub needed: Needed,
    pub deadline_ms: u64,
    /// Header names the client sent, and its `:path` (headers can't be read later).
    pub sent: Vec<String>,
    pub path: Vec<u8>,
    /// The shared-data keys it waits on, and their CAS when it last looked: it
    /// is looked at again only when one of them moves (or its deadline passes).
    pub keys: Vec<String>,
    pub seen: Vec<Option<u32>>,
}

/// A fetch to dispatch, or in flight.
struct Fetch {
    loaded: Rc<Runtime>,
    addr: Addr,
    owner: u64,
    subject: Option<Secret>,
    /// Give up waiting for a credential this fetch needs after this.
    defer_until_ms: u64,
    /// The identity token a Key Vault read carried (dropped on a 401).
    identity: Option<Used>,
    /// A Key Vault 401 is retried once, with a fresh identity token.
    retried: bool,
    /// A refresh an upstream 401 started: when its token is installed, every
    /// worker drops its copy of the refused one at once.
    after_401: bool,
    /// An authorization_code fetch's step (record read, redemption, write-back).
    phase: delegated::Phase,
}

/// What a store read or a Vault login brought.
enum StoreAnswer {
    Read(store::Read),
    Login(Secret, u64),
}

/// What `dispatch` did with a fetch.
enum Sent {
    Done,
    /// It needs a credential that isn't there yet: try again on the tick.
    Deferred(Box<Fetch>),
}

pub struct Broker<P: Proxy> {
    /// The host, through which everything is read, written, sent and counted.
    pub proxy: P,
    pending: Vec<Fetch>,
    deferred: Vec<Fetch>,
    /// Whether the loaded configuration has stores (their age gauges tick).
    pub has_stores: bool,
    /// Stores are read on the next tick.
    pub prefetch_due: bool,
    last_ages_ms: u64,
    last_copies_ms: u64,
    inflight: HashMap<u32, Fetch>,
    waiters: BTreeMap<u32, Waiter>,
    /// Tokens each live request carried, for upstream-401 handling.
    /// By Envoy's context id (FNV: the host numbers streams, no client does).
    used: FnvMap<u32, Vec<Used>>,
    /// Consent callbacks and disconnects waiting to send their next call.
    jobs: Vec<delegated::Job>,
    /// Those whose call is in flight, by call id.
    job_calls: HashMap<u32, delegated::Job>,
    /// Requests whose job is over, with their answer, for `due_waiters`.
    jobs_done: Vec<Resumed>,
}

thread_local! {
    static RNG: std::cell::Cell<u64> = std::cell::Cell::new({
        // Seeded once per VM from the hasher keys std draws from WASI random_get.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x6c61_7463_686b_6579);
        h.finish()
    });
}

/// A random u64 (splitmix64 over a per-VM random seed): owner ids, token ids,
/// jitter. No host call.
pub fn random_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

impl<P: Proxy> Broker<P> {
    pub fn new(proxy: P) -> Self {
        Broker {
            proxy,
            pending: Vec::new(),
            deferred: Vec::new(),
            has_stores: false,
            prefetch_due: false,
            last_ages_ms: 0,
            last_copies_ms: 0,
            inflight: HashMap::new(),
            waiters: BTreeMap::new(),
            used: FnvMap::default(),
            jobs: Vec::new(),
            job_calls: HashMap::new(),
            jobs_done: Vec::new(),
        }
    }

    /// The tick this VM needs now: fast while a fetch waits to go out, a poll while
    /// requests wait, once a second otherwise.
    pub fn wanted_tick_ms(&self) -> u32 {
        if !self.pending.is_empty() || !self.jobs.is_empty() || self.prefetch_due {
            KICK_MS
        } else if !self.waiters.is_empty() || !self.deferred.is_empty() {
            POLL_MS
        } else {
            // Stats kept in the VM are flushed on this tick (and stores' ages kept).
            IDLE_MS
        }
    }

    /// The cache entry and timing of an owner; `None` for token exchange
    /// without a subject token, or an owner that has no cache.
    fn entry(loaded: &Runtime, owner: Owner, subject: Option<&Secret>) -> Option<(Addr, Policy)> {
        match owner {
            Owner::Connection(c) => {
                let slot = loaded.tokens.get(c)?.as_ref()?;
                Some((slot.addr(c, subject)?, slot.policy))
            }
            Owner::Store(i) => {
                let slot = loaded.stores.get(i)?;
                Some((
                    Addr {
                        owner,
                        key: slot.key.clone(),
                        subject: None,
                    },
                    slot.policy,
                ))
            }
            Owner::Login(i) => {
                let slot = loaded.stores.get(i)?;
                Some((
                    Addr {
                        owner,
                        key: slot.login_key.clone()?,
                        subject: None,
                    },
                    slot.policy,
                ))
            }
            Owner::SignerLogin(p) => {
                let slot = loaded.signer_logins.get(p)?.as_ref()?;
                Some((
                    Addr {
                        owner,
                        key: slot.key.clone(),
                        subject: None,
                    },
                    slot.policy,
                ))
            }
        }
    }

    /// A credential from the shared cache: a token for connection `owner` (and,
    /// for token exchange, the caller whose bearer token is `subject`), a store's
    /// value, a Vault login; may start a fetch. `on_request`: a request's first
    /// look (counted as a cache hit when served), not a re-check.
    pub fn acquire(
        &mut self,
        loaded: &Rc<Runtime>,
        owner: Owner,
        subject: Option<&Secret>,
        now: u64,
        on_request: bool,
    ) -> Result<Lookup, HostFault> {
        let m = &loaded.stats;
        let connection = match owner {
            Owner::Connection(c) => Some(c),
            _ => None,
        };
        let count = |p: &P, stat: TokenStat| {
            if let Some(c) = connection {
                m.token(p, c, stat);
            }
        };
        let Some((addr, policy)) = Self::entry(loaded, owner, subject) else {
            let name = connection
                .and_then(|c| loaded.config.connection(c))
                .map_or("?", |c| c.name.as_str());
            self.proxy.log(
                Level::Warn,
                &format!(
                    "connection {name}: token_exchange needs the caller's bearer token in \
                     authorization (set forward: true on the jwt_authn provider)"
                ),
            );
            return Ok(Lookup::Reject {
                retry_after_ms: 1000,
                consent_required: false,
            });
        };
        let outcome = cas::retry(CAS_TRIES, || {
            let (state, mut stored) = match load(&self.proxy, &addr) {
                Ok(x) => x,
                Err(e) => return Attempt::Done(Err(e)),
            };
            let owner_id = random_u64();
            Attempt::Done(Ok(
                match cache::on_request(&state, now, owner_id, &policy) {
                    Choice::Use(token) => {
                        if on_request {
                            count(&self.proxy, TokenStat::CacheHit);
                        }
                        if let (Some(s), Some(set)) = (&addr.subject, &mut stored.set) {
                            // Least-recently-used bookkeeping; losing this race is harmless.
                            if set.touch(&s.hash, now) {
                                let _ = self.proxy.shared_set(&addr.key, &set.encode(), stored.cas);
                            }
                        }
                        Lookup::Ready(token)
                    }
                    Choice::UseAndRefresh { token, next } => {
                        // Losing this race is harmless too: another worker refreshes.
                        match store(&self.proxy, loaded, &addr, stored, &next, now) {
                            Ok(true) => {
                                self.queue(loaded, &addr, owner_id, subject, now, &policy, false)
                            }
                            Ok(false) => {}
                            Err(e) => return Attempt::Done(Err(e)),
                        }
                        if on_request {
                            count(&self.proxy, TokenStat::CacheHit);
                        }
                        Lookup::Ready(token)
                    }
                    Choice::Wait => Lookup::Wait,
                    Choice::Fetch { next } => {
                        match store(&self.proxy, loaded, &addr, stored, &next, now) {
                            Ok(true) => {
                                self.queue(loaded, &addr, owner_id, subject, now, &policy, false);
                                Lookup::Wait
                            }
                            // Another worker may have started the fetch: look again.
                            Ok(false) => return Attempt::Conflict,
                            Err(e) => return Attempt::Done(Err(e)),
                        }
                    }
                    Choice::Reject {
                        retry_after_ms,
                        consent_required,
                    } => {
                        if !consent_required {
                            count(&self.proxy, TokenStat::BackoffRejected);
                        }
                        Lookup::Reject {
                            retry_after_ms,
                            consent_required,
                        }
                    }
                },
            ))
        });
        // Contended all round: wait, and look again on the tick.
        outcome.unwrap_or(Ok(Lookup::Wait))
    }

    /// How a provider's client authenticates now: its client secret (from a
    /// store: the cached value), another connection's token as its assertion,
    /// or nothing (a certificate). `Err(Some)`: not yet, `Err(None)`: not in time.
    fn client_credential(
        &mut self,
        loaded: &Rc<Runtime>,
        provider: &crate::config::OAuth2Provider,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<ClientCredential, Option<()>> {
        let wanted = match (&provider.auth_method, &provider.client_secret) {
            (_, Some(SecretRef::Value(s))) => return Ok(ClientCredential::Secret(s.clone())),
            (_, Some(SecretRef::Store(i))) => Owner::Store(*i),
            (AuthMethod::ClientAssertion { connection }, None) => Owner::Connection(*connection),
            (AuthMethod::TlsClientAuth, None) => return Ok(ClientCredential::None),
            // A signed assertion is made per token request (see `dispatch_token`).
            _ => return Err(None),
        };
        match self.acquire(loaded, wanted, None, now, false) {
            Ok(Lookup::Ready(v)) => Ok(match wanted {
                Owner::Connection(_) => ClientCredential::Assertion(Secret::new(v.token)),
                _ => ClientCredential::Secret(Secret::new(v.token)),
            }),
            Ok(Lookup::Wait) if now < defer_until_ms => Err(Some(())),
            _ => Err(None),
        }
    }

    /// The stores a connection's own token fetch needs first: its client secret
    /// and its refresh token, when they come from a store.
    fn prerequisites(loaded: &Runtime, connection: usize) -> Vec<usize> {
        let config = &loaded.config;
        let Some(conn) = config.connection(connection) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(ProviderKind::OAuth2(p)) = config.provider_of(conn).map(|p| &p.kind) {
            if let Some(i) = p.secret_store() {
                out.push(i);
            }
        }
        if let Credential::OAuth2(o) = &conn.credential {
            if let Grant::RefreshToken(SecretRef::Store(i)) = o.grant {
                out.push(i);
            }
        }
        out
    }

    /// A configuration was loaded: its stores are read on the next tick, so
    /// that the first request finds their values.
    pub fn configured(&mut self, loaded: &Runtime) {
        self.has_stores = !loaded.stores.is_empty();
        self.prefetch_due = self.has_stores;
    }

    /// The tick's work: the stores' first reads, every fetch that is due, and
    /// (about once a second) this VM's copies of tokens and store values.
    pub fn on_tick(&mut self, loaded: Option<&Rc<Runtime>>, now: u64) {
        if let (true, Some(state)) = (self.prefetch_due, loaded) {
            self.prefetch_due = false;
            self.prefetch(state, now);
        }
        self.dispatch_due(now);
        if let Some(state) = loaded {
            self.renew_token_copies(state, now);
            if self.has_stores {
                self.renew_store_copies(state, now);
            }
        }
    }

    /// Starts reading every store, so that the first request finds its value.
    pub fn prefetch(&mut self, loaded: &Rc<Runtime>, now: u64) {
        for i in 0..loaded.stores.len() {
            let _ = self.acquire(loaded, Owner::Store(i), None, now, false);
        }
    }

    /// Resolves every inject entry's credential for `picks`.
    pub fn resolve(
        &mut self,
        loaded: &Rc<Runtime>,
        picks: &[usize],
        who: Who<'_>,
        now: u64,
        on_request: bool,
    ) -> Result<Resolution, HostFault> {
        self.resolve_with(loaded, picks, who, &mut || Ok(now), on_request)
    }

    /// [`Self::resolve`], reading the clock only when a credential isn't in this
    /// VM's copies (checked against the copy generation first): the request path
    /// of a cached token or value makes no clock call.
    pub fn resolve_with(
        &mut self,
        loaded: &Rc<Runtime>,
        picks: &[usize],
        who: Who<'_>,
        clock: &mut dyn FnMut() -> Result<u64, HostFault>,
        on_request: bool,
    ) -> Result<Resolution, HostFault> {
        let mut read: Option<u64> = None;
        let mut now = || -> Result<u64, HostFault> {
            if let Some(n) = read {
                return Ok(n);
            }
            let n = clock()?;
            read = Some(n);
            Ok(n)
        };
        // A token this VM holds serves only if no worker replaced one since.
        let copied = |c: usize| {
            loaded.has_token_copy(c)
                || who
                    .caller
                    .is_some_and(|k| loaded.has_caller_copy(c, k.expose()))
        };
        if picks.iter().any(|&c| copied(c)) {
            loaded.check_copy_generation(&self.proxy);
        }
        let config = &loaded.config;
        let mut out = Vec::with_capacity(picks.len());
        let mut deadline: Option<u64> = None;
        let mut keys: Vec<String> = Vec::new();
        for &ci in picks {
            let Some(conn) = config.connection(ci) else {
                return Ok(Resolution::Reject {
                    connection: ci,
                    retry_after_ms: 1000,
                    consent_required: false,
                });
            };
            // Per caller: the subject token (token exchange) or who the caller is (per-user consent).
            let subject = who.of_connection(conn);
            let mut wait_for = |owner: Owner, now: u64| {
                let entry = Self::entry(loaded, owner, subject);
                let d = now + entry.as_ref().map_or(5000, |(_, p)| p.fetch_timeout_ms);
                deadline = Some(deadline.map_or(d, |x: u64| x.min(d)));
                if let Some((addr, _)) = entry {
                    if !keys.contains(&addr.key) {
                        keys.push(addr.key);
                    }
                }
            };
            match &conn.credential {
                Credential::ClientCertificate { cluster } => out.push(EntryCredential {
                    secret: Secret::shared(cluster.clone()),
                    default_prefix: "",
                    with_default: None,
                    token: None,
                }),
                Credential::ApiKey(SecretRef::Value(secret)) => out.push(EntryCredential {
                    secret: secret.clone(),
                    default_prefix: "",
                    with_default: None,
                    token: None,
                }),
                Credential::ApiKey(SecretRef::Store(si)) => {
                    // This VM's copy, kept fresh by the tick: no host call.
                    if let Some(secret) = loaded.store_value(*si) {
                        out.push(EntryCredential {
                            secret,
                            default_prefix: "",
                            with_default: None,
                            token: None,
                        });
                        continue;
                    }
                    let now = now()?;
                    match self.acquire(loaded, Owner::Store(*si), None, now, on_request)? {
                        Lookup::Ready(v) => {
                            let secret = Secret::new(v.token);
                            loaded.set_store_value(*si, secret.clone());
                            out.push(EntryCredential {
                                secret,
                                default_prefix: "",
                                with_default: None,
                                token: None,
                            })
                        }
                        Lookup::Wait => wait_for(Owner::Store(*si), now),
                        Lookup::Reject {
                            retry_after_ms,
                            consent_required,
                        } => {
                            return Ok(Resolution::Reject {
                                connection: ci,
                                retry_after_ms,
                                consent_required,
                            })
                        }
                    }
                }
                Credential::OAuth2(_) | Credential::ManagedIdentity { .. } => {
                    // This VM's copy, checked by the tick: no host call.
                    let per_user = crate::consent::is_per_user(conn);
                    let copy = match (per_user, subject) {
                        (false, _) => loaded.token_copy(ci),
                        (true, Some(key)) => loaded.caller_copy(ci, key.expose()),
                        (true, None) => None,
                    };
                    if let Some(t) = copy {
                        if on_request {
                            loaded.stats.token(&self.proxy, ci, TokenStat::CacheHit);
                        }
                        out.push(Self::copy_cred(loaded, ci, None, &t));
                        continue;
                    }
                    let now = now()?;
                    let mut ready = true;
                    for si in Self::prerequisites(loaded, ci) {
                        match self.acquire(loaded, Owner::Store(si), None, now, false)? {
                            Lookup::Ready(_) => {}
                            Lookup::Wait => {
                                wait_for(Owner::Store(si), now);
                                ready = false;
                            }
                            Lookup::Reject { retry_after_ms, .. } => {
                                return Ok(Resolution::Reject {
                                    connection: ci,
                                    retry_after_ms,
                                    consent_required: false,
                                })
                            }
                        }
                    }
                    if !ready {
                        continue;
                    }
                    match self.acquire(loaded, Owner::Connection(ci), subject, now, on_request)? {
                        Lookup::Ready(t) => {
                            let slot = loaded.tokens.get(ci).and_then(Option::as_ref);
                            if t.copyable_until(now, COPY_GRACE_MS) {
                                match (slot.is_some_and(|s| !s.per_caller), per_user, subject) {
                                    (true, _, _) => loaded.set_token_copy(ci, Some(t.clone())),
                                    (false, true, Some(key)) => {
                                        loaded.set_caller_copy(ci, key.expose(), Some(t.clone()))
                                    }
                                    _ => {}
                                }
                            }
                            out.push(Self::token_cred(loaded, ci, subject, t))
                        }
                        Lookup::Wait => wait_for(Owner::Connection(ci), now),
                        Lookup::Reject {
                            retry_after_ms,
                            consent_required,
                        } => {
                            return Ok(Resolution::Reject {
                                connection: ci,
                                retry_after_ms,
                                consent_required,
                            })
                        }
                    }
                }
            }
        }
        Ok(match deadline {
            Some(deadline_ms) => Resolution::Wait { deadline_ms, keys },
            None => Resolution::Ready(out),
        })
    }

    /// The credential for connection `ci`'s token `t`, with where it is cached
    /// (for an upstream 401).
    fn token_cred(
        loaded: &Runtime,
        ci: usize,
        subject: Option<&Secret>,
        t: Cached,
    ) -> EntryCredential {
        Self::copy_cred(loaded, ci, subject, &TokenCopy::new(t))
    }

    /// A token's credential from a [`TokenCopy`]: reference counts, no copy.
    fn copy_cred(
        loaded: &Runtime,
        ci: usize,
        subject: Option<&Secret>,
        t: &TokenCopy,
    ) -> EntryCredential {
        let slot = loaded.tokens.get(ci).and_then(Option::as_ref);
        let addr = slot.and_then(|s| s.shared_addr(ci, subject));
        EntryCredential {
            token: addr.map(|addr| Used {
                addr,
                id: t.cached.id,
                subject: subject.cloned(),
            }),
            secret: t.token.clone(),
            default_prefix: "Bearer ",
            with_default: Some(t.bearer.clone()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn queue(
        &mut self,
        loaded: &Rc<Runtime>,
        addr: &Addr,
        owner: u64,
        subject: Option<&Secret>,
        now: u64,
        policy: &Policy,
        after_401: bool,
    ) {
        self.pending.push(Fetch {
            loaded: loaded.clone(),
            addr: addr.clone(),
            owner,
            subject: subject.cloned(),
            defer_until_ms: now + policy.fetch_timeout_ms,
            identity: None,
            retried: false,
            after_401,
            phase: delegated::Phase::Start,
        });
    }

    /// How many requests this VM holds paused: waiting for a credential, or
    /// for a consent task's calls.
    pub fn paused(&self) -> usize {
        self.waiters.len() + self.jobs.len() + self.job_calls.len()
    }

    pub fn wait(&mut self, context_id: u32, mut waiter: Waiter) {
        waiter.loaded.stats.waits(&self.proxy, &waiter.needed.picks);
        waiter.seen = waiter
            .keys
            .iter()
            .map(|k| key_cas(&self.proxy, k))
            .collect();
        self.waiters.insert(context_id, waiter);
    }

    pub fn record_used(&mut self, context_id: u32, used: Vec<Used>) {
        if !used.is_empty() {
            self.used.insert(context_id, used);
        }
    }

    pub fn take_used(&mut self, context_id: u32) -> Vec<Used> {
        // Most requests used no token: no hashing for them.
        if self.used.is_empty() {
            return Vec::new();
        }
        self.used.remove(&context_id).unwrap_or_default()
    }

    /// A request went away (finished, or the client left while it waited).
    pub fn forget(&mut self, context_id: u32) {
        if !self.waiters.is_empty() {
            self.waiters.remove(&context_id);
        }
        if !self.used.is_empty() {
            self.used.remove(&context_id);
        }
    }

    /// Sends every fetch that is due (from the root context: see the module
    /// doc); those that still need another credential wait for the next tick.
    pub fn dispatch_due(&mut self, now: u64) {
        let mut queue = std::mem::take(&mut self.deferred);
        queue.append(&mut self.pending);
        for f in queue {
            if let Sent::Deferred(f) = self.dispatch(f, now) {
                self.deferred.push(*f);
            }
        }
        for job in std::mem::take(&mut self.jobs) {
            self.run_job(job, now);
        }
    }

    /// Once a second, off the request path: refreshes this VM's copy of every
    /// store value from the shared cache (starting a re-read when one is due, as a
    /// request would), and records how old each value is.
    pub fn renew_store_copies(&mut self, loaded: &Rc<Runtime>, now: u64) {
        if now < self.last_ages_ms + u64::from(IDLE_MS) {
            return;
        }
        self.last_ages_ms = now;
        for i in 0..loaded.stores.len() {
            if let Ok(Lookup::Ready(v)) = self.acquire(loaded, Owner::Store(i), None, now, false) {
                loaded
                    .stats
                    .store_age(&self.proxy, i, now.saturating_sub(v.obtained_ms) / 1000);
                loaded.set_store_value(i, Secret::new(v.token));
            }
        }
    }

    /// About once a second, off the request path: renews each token copy this VM
    /// holds from the shared cache (a token another worker fetched or refreshed),
    /// or drops it when it won't stay good until the next check; requests then
    /// take the shared path, which refreshes ahead as before and takes a new copy.
    /// Only connections that hold a copy are read: the tick's work is bounded by
    /// the connections in use, not by how many are configured.
    pub fn renew_token_copies(&mut self, loaded: &Rc<Runtime>, now: u64) {
        if now < self.last_copies_ms + u64::from(IDLE_MS) / 2 {
            return;
        }
        self.last_copies_ms = now;
        // Read first: a drop after this read moves it again, and the copies taken
        // below are dropped before a request uses them.
        let Some(generation) = Runtime::read_copy_generation(&self.proxy) else {
            loaded.drop_token_copies();
            return;
        };
        loaded.copy_generation.set(generation);
        loaded.trim_caller_copies(now, COPY_GRACE_MS);
        for (c, slot) in loaded.tokens.iter().enumerate() {
            if !loaded.has_token_copy(c) {
                continue;
            }
            let Some(addr) = slot
                .as_ref()
                .filter(|s| !s.per_caller)
                .and_then(|s| s.addr(c, None))
            else {
                continue;
            };
            let hot = match load(&self.proxy, &addr) {
                Ok((CacheState::Ready { token, .. }, _))
                    if token.copyable_until(now, COPY_GRACE_MS) =>
                {
                    Some(token)
                }
                _ => None,
            };
            loaded.set_token_copy(c, hot);
        }
    }

    /// Sends a fetch's call, or defers it until what it needs is there.
    fn dispatch(&mut self, f: Fetch, now: u64) -> Sent {
        match f.addr.owner {
            Owner::Connection(c) => self.dispatch_token(f, c, now),
            Owner::Store(i) => self.dispatch_store(f, i, now),
            Owner::Login(i) => {
                let Some(st) = f.loaded.config.stores.get(i) else {
                    return Sent::Done;
                };
                match store::login_call(st) {
                    Some(call) => {
                        f.loaded.stats.store(&self.proxy, i, StoreStat::Login);
                        self.send(f, call, now)
                    }
                    None => Sent::Done,
                }
            }
            Owner::SignerLogin(p) => self.dispatch_signer_login(f, p, now),
        }
    }

    /// Waits for a credential a fetch needs: `Ok(value)`, or the fetch is
    /// deferred (`Err(Some)`) or has failed for want of it (`Err(None)`).
    fn need(&mut self, f: &Fetch, owner: Owner, now: u64) -> Result<Cached, Option<()>> {
        match self.acquire(&f.loaded, owner, None, now, false) {
            Ok(Lookup::Ready(t)) => Ok(t),
            Ok(Lookup::Wait) if now < f.defer_until_ms => Err(Some(())),
            _ => Err(None),
        }
    }

    fn dispatch_token(&mut self, f: Fetch, connection: usize, now: u64) -> Sent {
        let loaded = f.loaded.clone();
        let config = &loaded.config;
        let Some(conn) = config.connection(connection) else {
            return Sent::Done;
        };
        if crate::consent::is_delegated(conn) {
            return self.dispatch_delegated(f, connection, now);
        }
        let Some(provider) = config.provider_of(conn) else {
            return Sent::Done;
        };
        let call = match (&provider.kind, &conn.credential) {
            (ProviderKind::ManagedIdentity(p), Credential::ManagedIdentity { resource }) => {
                store::imds_call(p, resource)
            }
            (ProviderKind::OAuth2(op), Credential::OAuth2(oc)) => {
                let slot = loaded.tokens.get(connection).and_then(Option::as_ref);
                let rotated = match (slot.and_then(|s| s.rt_key.as_deref()), &oc.grant) {
                    (Some(k), Grant::RefreshToken(_)) => self
                        .proxy
                        .shared_get(k)
                        .ok()
                        .flatten()
                        .and_then(|(v, _)| String::from_utf8(v).ok())
                        .filter(|v| !v.is_empty())
                        .map(Secret::new),
                    _ => None,
                };
                // No rotated refresh token yet: the configured one, perhaps from a store.
                let rotated = match (rotated, &oc.grant) {
                    (None, Grant::RefreshToken(SecretRef::Store(i))) => {
                        match self.need(&f, Owner::Store(*i), now) {
                            Ok(v) => Some(Secret::new(v.token)),
                            Err(Some(())) => return Sent::Deferred(Box::new(f)),
                            Err(None) => {
                                self.complete(&f, Err(FetchError::Dispatch), now);
                                return Sent::Done;
                            }
                        }
                    }
                    (r, _) => r,
                };
                // A signed assertion: one signature per token request, first.
                if let AuthMethod::PrivateKeyJwt(key) = &op.auth_method {
                    return self.sign_then_request(
                        f,
                        op,
                        key,
                        signing::Signed::Grant {
                            refresh_token: rotated,
                        },
                        now,
                    );
                }
                let client = match self.client_credential(&loaded, op, f.defer_until_ms, now) {
                    Ok(c) => c,
                    Err(Some(())) => return Sent::Deferred(Box::new(f)),
                    Err(None) => {
                        self.complete(&f, Err(FetchError::Dispatch), now);
                        return Sent::Done;
                    }
                };
                grant_call(op, &client, oc, rotated.as_ref(), f.subject.as_ref())
            }
            _ => return Sent::Done,
        };
        loaded
            .stats
            .token(&self.proxy, connection, TokenStat::Requests);
        self.send(f, call, now)
    }

    fn dispatch_store(&mut self, mut f: Fetch, i: usize, now: u64) -> Sent {
        let loaded = f.loaded.clone();
        let Some(st) = loaded.config.stores.get(i) else {
            return Sent::Done;
        };
        let credential = match &st.kind {
            StoreKind::KeyVault { identity } => {
                match self.need(&f, Owner::Connection(*identity), now) {
                    Ok(t) => {
                        let addr = Self::entry(&loaded, Owner::Connection(*identity), None)
                            .map(|(a, _)| a);
                        f.identity = addr.map(|addr| Used {
                            addr: Rc::new(addr),
                            id: t.id,
                            subject: None,
                        });
                        Secret::new(t.token)
                    }
                    Err(Some(())) => return Sent::Deferred(Box::new(f)),
                    Err(None) => {
                        self.complete_store(&f, i, Err(StoreError::Identity), now);
                        return Sent::Done;
                    }
                }
            }
            StoreKind::Vault {
                auth: VaultAuth::Token(t),
                ..
            } => t.clone(),
            StoreKind::Vault {
                auth: VaultAuth::AppRole { .. },
                ..
            } => match self.need(&f, Owner::Login(i), now) {
                Ok(t) => {
                    // Vault answers 403 to a login it no longer honours: then it
                    // is dropped and the read made once more, after a new login.
                    f.identity =
                        Self::entry(&loaded, Owner::Login(i), None).map(|(addr, _)| Used {
                            addr: Rc::new(addr),
                            id: t.id,
                            subject: None,
                        });
                    Secret::new(t.token)
                }
                Err(Some(())) => return Sent::Deferred(Box::new(f)),
                Err(None) => {
                    self.complete_store(&f, i, Err(StoreError::Identity), now);
                    return Sent::Done;
                }
            },
        };
        loaded.stats.store(&self.proxy, i, StoreStat::Read);
        self.send(f, store::read_call(st, &credential), now)
    }

    /// Dispatches a call from the root context.
    fn send(&mut self, f: Fetch, call: HttpCall, now: u64) -> Sent {
        match self.proxy.dispatch(&call) {
            Ok(token) => {
                self.inflight.insert(token, f);
            }
            Err(status) => {
                self.proxy.log(
                    Level::Error,
                    &format!(
                        "{}: can't call cluster {:?}: {status}",
                        self.describe(&f),
                        call.cluster
                    ),
                );
                self.fail(&f, now);
            }
        }
        Sent::Done
    }

    /// A fetch that could not be dispatched.
    fn fail(&mut self, f: &Fetch, now: u64) {
        match f.addr.owner {
            Owner::Connection(_) => self.complete(f, Err(FetchError::Dispatch), now),
            Owner::Store(i) | Owner::Login(i) => {
                self.complete_store(f, i, Err(StoreError::Dispatch), now)
            }
            Owner::SignerLogin(p) => {
                self.complete_signer_login(f, p, Err(StoreError::Dispatch), now)
            }
        }
    }

    fn describe(&self, f: &Fetch) -> String {
        let config = &f.loaded.config;
        match f.addr.owner {
            Owner::Connection(c) => format!(
                "connection {}",
                config.connection(c).map_or("?", |c| c.name.as_str())
            ),
            Owner::Store(i) | Owner::Login(i) => format!(
                "secret {}",
                config.stores.get(i).map_or("?", |s| s.name.as_str())
            ),
            Owner::SignerLogin(p) => format!(
                "provider {} (signing key login)",
                config.providers.get(p).map_or("?", |p| p.name.as_str())
            ),
        }
    }

    /// Whether call `id` is one of this VM's, still awaited.
    pub fn awaits(&self, id: u32) -> bool {
        self.inflight.contains_key(&id) || self.job_calls.contains_key(&id)
    }

    /// Call `id` of this VM answered: its HTTP status (`None`: no answer) and
    /// body (`None`: larger than [`token_response::MAX_BODY`]).
    pub fn on_answer(&mut self, id: u32, status: Option<u32>, body: Option<Vec<u8>>, now: u64) {
        if let Some(job) = self.job_calls.remove(&id) {
            self.on_job_answer(job, status, body, now);
            return;
        }
        let Some(mut f) = self.inflight.remove(&id) else {
            return;
        };
        match f.addr.owner {
            Owner::Connection(_) if matches!(f.phase, delegated::Phase::Sign { .. }) => {
                self.on_signature(f, status, body, now);
            }
            Owner::Connection(_) if !matches!(f.phase, delegated::Phase::Start) => {
                self.on_delegated_answer(f, status, body, now);
            }
            Owner::Connection(c) => {
                let default_ms = f
                    .loaded
                    .tokens
                    .get(c)
                    .and_then(Option::as_ref)
                    .map_or(300_000, |s| s.default_lifetime_ms);
                let result = match &body {
                    None => Err(FetchError::TooLarge),
                    Some(b) => token_response::parse(status, b, default_ms),
                };
                self.complete(&f, result, now);
            }
            Owner::Store(i) => {
                let result = match (&body, f.loaded.config.stores.get(i)) {
                    (None, _) => Err(StoreError::TooLarge),
                    (Some(b), Some(st)) => store::parse_read(&st.kind, status, b),
                    (Some(_), None) => Err(StoreError::Dispatch),
                };
                let refused = matches!(
                    (&result, f.loaded.config.stores.get(i)),
                    (Err(e), Some(st)) if e.credential_refused(&st.kind)
                );
                if refused && !f.retried {
                    if let Some(identity) = f.identity.take() {
                        // An expired identity token or Vault login: read again, once.
                        self.retry_refused(f, &identity, 2, now);
                        return;
                    }
                }
                self.complete_store(&f, i, result.map(StoreAnswer::Read), now);
            }
            Owner::Login(i) => {
                let result = match &body {
                    None => Err(StoreError::TooLarge),
                    Some(b) => store::parse_login(status, b),
                };
                self.complete_store(&f, i, result.map(|(t, ms)| StoreAnswer::Login(t, ms)), now);
            }
            Owner::SignerLogin(p) => {
                let result = match &body {
                    None => Err(StoreError::TooLarge),
                    Some(b) => store::parse_login(status, b),
                };
                self.complete_signer_login(&f, p, result, now);
            }
        }
    }

    fn complete(&mut self, f: &Fetch, result: Result<token_response::Token, FetchError>, now: u64) {
        let Owner::Connection(connection) = f.addr.owner else {
            return;
        };
        let loaded = &f.loaded;
        let Some(slot) = loaded.tokens.get(connection).and_then(Option::as_ref) else {
            return;
        };
        let name = loaded
            .config
            .connection(connection)
            .map_or("?", |c| c.name.as_str());
        let outcome = match result {
            Ok(t) => {
                loaded
                    .stats
                    .token(&self.proxy, connection, TokenStat::Success);
                if let (Some(rt), Some(k)) = (&t.refresh_token, &slot.rt_key) {
                    if let Err(e) = self.proxy.shared_set(k, rt.expose().as_bytes(), 0) {
                        self.proxy.log(
                            Level::Error,
                            &format!(
                                "connection {name}: can't store the rotated refresh token: {e}"
                            ),
                        );
                    }
                }
                let subject_exp = f.addr.subject.as_ref().and_then(|s| s.expires_ms);
                let lifetime_ms = token_response::lifetime_ms(&t, subject_exp, now);
                FetchOutcome::Token {
                    token: t.access_token.expose().to_string(),
                    id: random_u64(),
                    lifetime_ms,
                }
            }
            Err(e) => {
                loaded
                    .stats
                    .token_failure(&self.proxy, connection, e.kind());
                // Nobody consented yet: the caller is told so; not the gateway's failure.
                let level = if e == FetchError::NoConsent {
                    Level::Debug
                } else {
                    Level::Warn
                };
                self.proxy.log(
                    level,
                    &format!("connection {name}: token fetch failed: {e}"),
                );
                FetchOutcome::Failed { kind: e.kind() }
            }
        };
        let new_token = matches!(outcome, FetchOutcome::Token { .. });
        let replaced = self.install(f, outcome, now, &slot.policy);
        if f.after_401 && new_token && replaced.is_some() {
            // Every worker's copy of the refused token goes now, not at its tick.
            bump_generation(&self.proxy);
        }
    }

    /// Writes a fetch's outcome into the shared state (CAS, retried), if this
    /// VM still holds the lease. Returns the state it replaced.
    fn install(
        &self,
        f: &Fetch,
        outcome: FetchOutcome,
        now: u64,
        policy: &Policy,
    ) -> Option<CacheState> {
        cas::retry(CAS_TRIES, || {
            let Ok((state, stored)) = load(&self.proxy, &f.addr) else {
                return Attempt::Done(None);
            };
            let Some(next) =
                cache::on_result(&state, f.owner, outcome.clone(), now, policy, random_u64())
            else {
                self.proxy.log(
                    Level::Debug,
                    &format!(
                        "{}: fetch result dropped: lease taken over",
                        self.describe(f)
                    ),
                );
                return Attempt::Done(None);
            };
            match store(&self.proxy, &f.loaded, &f.addr, stored, &next, now) {
                Ok(true) => Attempt::Done(Some(state)),
                Err(_) => Attempt::Done(None),
                Ok(false) => Attempt::Conflict,
            }
        })
        .flatten()
    }

    /// A store read or login of this VM finished.
    fn complete_store(
        &mut self,
        f: &Fetch,
        i: usize,
        result: Result<StoreAnswer, StoreError>,
        now: u64,
    ) {
        let loaded = f.loaded.clone();
        let Some(slot) = loaded.stores.get(i) else {
            return;
        };
        let Some(st) = loaded.config.stores.get(i) else {
            return;
        };
        let m = &loaded.stats;
        let login = matches!(f.addr.owner, Owner::Login(_));
        let what = if login { "Vault login" } else { "read" };
        let outcome = match result {
            Ok(StoreAnswer::Read(read)) => {
                m.store(&self.proxy, i, StoreStat::Success);
                FetchOutcome::Stored {
                    value: read.value.expose().to_string(),
                    id: random_u64(),
                    version: read.version,
                    refresh_in_ms: st.refresh_ms,
                }
            }
            Ok(StoreAnswer::Login(token, lifetime_ms)) => FetchOutcome::Token {
                token: token.expose().to_string(),
                id: random_u64(),
                lifetime_ms,
            },
            Err(e) => {
                m.store_failure(&self.proxy, i, e.kind());
                let had = matches!(
                    load(&self.proxy, &f.addr).map(|(s, _)| s),
                    Ok(CacheState::Refreshing { .. })
                );
                self.proxy.log(
                    Level::Warn,
                    &format!(
                        "secret {}: {what} failed: {e}{}",
                        st.name,
                        if had {
                            "; the last good value stays in use"
                        } else {
                            ""
                        }
                    ),
                );
                FetchOutcome::Failed { kind: e.kind() }
            }
        };
        let (new_version, new_value) = match &outcome {
            FetchOutcome::Stored { version, value, .. } => {
                (Some(version.clone()), Some(Secret::new(value.clone())))
            }
            _ => (None, None),
        };
        let replaced = self.install(f, outcome, now, &slot.policy);
        if let (Some(_), Some(v)) = (&replaced, new_value) {
            loaded.set_store_value(i, v);
        }
        if let (Some(new), Some(old)) = (new_version, replaced) {
            let old = match old {
                CacheState::Refreshing { token, .. } => Some(token.version),
                _ => None,
            };
            match old {
                Some(old) if old == new => {}
                Some(old) => {
                    m.store(&self.proxy, i, StoreStat::VersionChange);
                    self.forget_rotated_refresh_tokens(&loaded, i);
                    self.proxy.log(
                        Level::Info,
                        &format!("secret {}: new version {new:?} (was {old:?})", st.name),
                    );
                }
                None => self.proxy.log(
                    Level::Info,
                    &format!("secret {}: read version {new:?}", st.name),
                ),
            }
        }
    }

    /// A store's refresh token changed (re-consented): refresh tokens the token
    /// server rotated from the old one no longer apply.
    fn forget_rotated_refresh_tokens(&self, loaded: &Runtime, store: usize) {
        for (ci, conn) in loaded.config.connections.iter().enumerate() {
            let Credential::OAuth2(o) = &conn.credential else {
                continue;
            };
            if !matches!(o.grant, Grant::RefreshToken(SecretRef::Store(i)) if i == store) {
                continue;
            }
            let key = loaded
                .tokens
                .get(ci)
                .and_then(Option::as_ref)
                .and_then(|s| s.rt_key.as_deref());
            if let Some(k) = key {
                let _ = self.proxy.shared_set(k, b"", 0);
            }
        }
    }

    /// The upstream answered 401 to a request that carried these tokens: each
    /// old enough, and not refreshed on a 401 lately, is refreshed in the
    /// background while it keeps serving (SPEC v1.2: a caller can provoke 401s).
    pub fn on_upstream_401(&mut self, loaded: &Rc<Runtime>, used: &[Used], now: u64) {
        for u in used {
            let Owner::Connection(c) = u.addr.owner else {
                continue;
            };
            let Some(slot) = loaded.tokens.get(c).and_then(Option::as_ref) else {
                continue;
            };
            let (window, policy) = (slot.drop_on_401_after_ms, slot.policy);
            let owner = random_u64();
            let started = cas::retry(CAS_TRIES, || {
                let Ok((state, stored)) = load(&self.proxy, &u.addr) else {
                    return Attempt::Done(false);
                };
                let Some(next) = cache::on_upstream_401(&state, u.id, now, owner, window, &policy)
                else {
                    return Attempt::Done(false);
                };
                match store(&self.proxy, loaded, &u.addr, stored, &next, now) {
                    Ok(true) => Attempt::Done(true),
                    Ok(false) => Attempt::Conflict,
                    Err(_) => Attempt::Done(false),
                }
            });
            if started == Some(true) {
                loaded.stats.token(&self.proxy, c, TokenStat::DroppedOn401);
                self.queue(
                    loaded,
                    &u.addr,
                    owner,
                    u.subject.as_ref(),
                    now,
                    &policy,
                    true,
                );
            } else {
                loaded.stats.token(&self.proxy, c, TokenStat::Ignored401);
            }
        }
    }

    /// The gateway's own call was refused with this token (a Key Vault read
    /// answered 401): drop it, so the retry fetches a fresh one.
    /// A credential a store or key service refused (an expired identity token,
    /// a Vault login it no longer honours): dropped, and fetch `f` made once more
    /// after a new one, given `timeouts` of its fetch timeout to get it.
    fn retry_refused(&mut self, f: Fetch, refused: &Used, timeouts: u64, now: u64) {
        let loaded = f.loaded.clone();
        self.drop_refused(&loaded, refused, now);
        let timeout = Self::entry(&loaded, f.addr.owner, f.subject.as_ref())
            .map_or(5000, |(_, p)| p.fetch_timeout_ms);
        self.pending.push(Fetch {
            retried: true,
            defer_until_ms: now + timeouts * timeout,
            ..f
        });
    }

    fn drop_refused(&mut self, loaded: &Runtime, used: &Used, now: u64) {
        let dropped = cas::retry(CAS_TRIES, || {
            let Ok((state, stored)) = load(&self.proxy, &used.addr) else {
                return Attempt::Done(false);
            };
            let Some(next) = cache::on_refused(&state, used.id) else {
                return Attempt::Done(false);
            };
            match store(&self.proxy, loaded, &used.addr, stored, &next, now) {
                Ok(true) => Attempt::Done(true),
                Ok(false) => Attempt::Conflict,
                Err(_) => Attempt::Done(false),
            }
        });
        if dropped == Some(true) {
            if let Owner::Connection(c) = used.addr.owner {
                loaded.stats.token(&self.proxy, c, TokenStat::DroppedOn401);
            }
            bump_generation(&self.proxy);
        }
    }

    /// Looks again at each paused request whose keys moved since it last
    /// looked (a fetch finished, here or on another worker), or whose deadline
    /// passed; the others cost one compare. Each key is read once per round.
    /// Gives back the requests whose wait is over, with their outcome, for the
    /// glue to apply in their own context (and resume those that go on).
    pub fn due_waiters(&mut self, now: u64) -> Vec<Resumed> {
        let mut out = std::mem::take(&mut self.jobs_done);
        if self.waiters.is_empty() {
            return out;
        }
        // Few distinct keys (one per credential being fetched): a list will do.
        let mut current: Vec<(String, Option<u32>)> = Vec::new();
        for w in self.waiters.values() {
            for k in &w.keys {
                if !current.iter().any(|(c, _)| c == k) {
                    current.push((k.clone(), key_cas(&self.proxy, k)));
                }
            }
        }
        let cas_of = |k: &String| current.iter().find(|(c, _)| c == k).map(|(_, cas)| *cas);
        let due: Vec<u32> = self
            .waiters
            .iter()
            .filter(|(_, w)| {
                now >= w.deadline_ms
                    || w.keys.is_empty()
                    || w.keys
                        .iter()
                        .zip(&w.seen)
                        .any(|(k, seen)| cas_of(k) != Some(*seen))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(mut w) = self.waiters.remove(&id) else {
                continue;
            };
            let resolution =
                self.resolve(&w.loaded, &w.needed.picks, Who::of(&w.needed), now, false);
            let loaded = w.loaded.clone();
            let config = &loaded.config;
            let (outcome, used) = match resolution {
                Ok(Resolution::Wait { keys, .. }) if now < w.deadline_ms => {
                    // What it saw before this look: a move during it is looked at next round.
                    w.seen = keys
                        .iter()
                        .map(|k| match cas_of(k) {
                            Some(cas) => cas,
                            None => key_cas(&self.proxy, k),
                        })
                        .collect();
                    w.keys = keys;
                    self.waiters.insert(id, w);
                    continue;
                }
                Ok(Resolution::Ready(creds)) => {
                    let keep = config
                        .route(w.needed.route)
                        .is_some_and(|r| r.drop_token_on_401);
                    let outcome = request::finish(
                        config,
                        w.needed,
                        EntryCredential::resolved(&creds),
                        &w.sent[..],
                        &w.path,
                    );
                    let used = if keep {
                        EntryCredential::tokens(&creds)
                    } else {
                        Vec::new()
                    };
                    (outcome, used)
                }
                Ok(Resolution::Reject {
                    connection,
                    retry_after_ms,
                    consent_required,
                }) => (
                    if consent_required {
                        request::consent_required(config, w.needed, connection)
                    } else {
                        request::unavailable(config, w.needed, connection, retry_after_ms)
                    },
                    Vec::new(),
                ),
                Ok(Resolution::Wait { .. }) => {
                    let ci = w.needed.picks.first().copied().unwrap_or(0);
                    (request::unavailable(config, w.needed, ci, 1000), Vec::new())
                }
                Err(e) => {
                    self.proxy.log(
                        Level::Error,
                        &format!("host call failed while a request waited: {e}"),
                    );
                    (request::internal(config, Some(w.needed.route)), Vec::new())
                }
            };
            out.push(Resumed {
                id,
                loaded,
                outcome,
                used,
            });
        }
        out
    }
}

/// A paused request whose wait is over: its outcome, and the tokens it carries
/// upstream (for an upstream 401) if it goes on.
pub struct Resumed {
    pub id: u32,
    pub loaded: Rc<Runtime>,
    pub outcome: Outcome,
    pub used: Vec<Used>,
}

/// A shared-data key's CAS (`None`: absent or unreadable).
fn key_cas(p: &impl Proxy, key: &str) -> Option<u32> {
    p.shared_get(key).ok().flatten().map(|(_, cas)| cas)
}

/// Moves [`COPY_GENERATION`]: every VM drops its token copies before a
/// request uses one again.
fn bump_generation(p: &impl Proxy) {
    if p.shared_set(COPY_GENERATION, b"", 0).is_err() {
        p.log(Level::Warn, "can't tell other workers a token was replaced");
    }
}

/// Who a request's per-caller credentials are for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Who<'a> {
    /// Token exchange: the verified JWT.
    pub subject: Option<&'a Secret>,
    /// Per-user consent: [`crate::consent::caller_hash`] of the caller.
    pub caller: Option<&'a Secret>,
}

impl<'a> Who<'a> {
    pub fn of(needed: &'a Needed) -> Who<'a> {
        Who {
            subject: needed.subject.as_ref(),
            caller: needed.caller.as_ref(),
        }
    }

    /// What keys connection `conn`'s per-caller cache entry, if anything.
    fn of_connection(&self, conn: &crate::config::Connection) -> Option<&'a Secret> {
        if crate::consent::is_per_user(conn) {
            self.caller
        } else {
            self.subject
        }
    }
}

/// The token request of a connection's grant: the current refresh token
/// (rotated, or read from a store), or the subject token, with the client's
/// authentication.
fn grant_call(
    op: &crate::config::OAuth2Provider,
    client: &ClientCredential,
    oc: &crate::config::OAuth2Connection,
    refresh_token: Option<&Secret>,
    subject: Option<&Secret>,
) -> HttpCall {
    let input = match (refresh_token, subject) {
        (Some(rt), _) => GrantInput::RefreshToken(rt),
        (None, Some(subject)) => GrantInput::SubjectToken(subject),
        (None, None) => GrantInput::None,
    };
    token_call(token_request::build(op, client, oc, input))
}

/// A token request as the call it is.
fn token_call(req: token_request::TokenRequest) -> HttpCall {
    HttpCall {
        cluster: req.cluster,
        headers: req.headers,
        secret_headers: req
            .authorization
            .map(|a| ("authorization", a))
            .into_iter()
            .collect(),
        body: Some(req.body),
        timeout_ms: req.timeout_ms,
    }
}

mod delegated;
mod signing;

#[cfg(test)]
mod tests;
