//! The proxy-wasm glue: the only code that talks to the host.
//!
//! [`Root`] loads the configuration (`on_configure`; a bad one is refused whole),
//! defines the stats, prepares the shared token cache keys and runs the VM's
//! token [`broker`] (ticks and token-call responses). [`Http`] runs the request
//! flow in `on_http_request_headers`: read the headers once, match the route,
//! read the claims, decide, resolve credentials, then change the request and
//! continue, pause until a token arrives, or answer with a local reply. Any host
//! error on that path fails closed with a 500; nothing here can panic.

mod broker;
mod host;
mod metrics;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{Config, Credential, Grant, ProviderKind, SecretRef};
use crate::credential::cache::{Cached, Policy};
use crate::inject::Edit;
use crate::request::{self, HostFault, Outcome, Step, Verdict};
use crate::response::{reply, Refusal};
use crate::secret::Secret;
use broker::{Broker, Cred, Resolution, StoreSlot, TokenSlot, Waiter};
use host::{HostError, Level, Map};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { state: None, broker: Rc::new(RefCell::new(Broker::new(context_id))) })
    });
}}

struct Root {
    state: Option<Rc<Loaded>>,
    broker: Rc<RefCell<Broker>>,
}

/// A loaded configuration with what the request path needs beside it.
pub struct Loaded {
    pub config: Config,
    pub metrics: Metrics,
    /// Token cache per connection index (oauth2 and managed-identity connections).
    pub tokens: Vec<Option<TokenSlot>>,
    /// Value cache per store index.
    pub stores: Vec<StoreSlot>,
    /// This VM's copy of each store's current value, kept fresh by the tick
    /// (`Broker::tend_stores`): a request reads it with no host call at all.
    pub store_values: RefCell<Vec<Option<Secret>>>,
    /// This VM's copy of each connection's current token (not for token
    /// exchange), kept while the tick finds it good for a few seconds more
    /// (`Broker::tend_tokens`): a request then reads neither the shared cache
    /// nor the clock.
    pub hot_tokens: RefCell<Vec<Option<Cached>>>,
    /// Discovery answers, serialized once per configuration (only when
    /// `discovery.path` is set).
    pub discovery: Option<crate::discovery::Index>,
    /// The CAS of [`HOT_GENERATION`] when the copies above were taken: a token
    /// dropped on an upstream 401 by any worker moves it, and every VM's copies
    /// are then dropped before the next request uses one.
    pub hot_generation: std::cell::Cell<u32>,
}

/// An always-empty shared-data key whose CAS moves whenever a worker drops a
/// token the upstream refused. Reading it costs a request one host call and no
/// copy; a VM's token copies are good only while it hasn't moved.
pub const HOT_GENERATION: &str = "latchkey.tokens.generation";

impl Loaded {
    /// This VM's copy of store `i`'s value, if it has one.
    pub fn store_value(&self, i: usize) -> Option<Secret> {
        self.store_values
            .try_borrow()
            .ok()
            .and_then(|v| v.get(i).cloned().flatten())
    }

    /// This VM's copy of connection `c`'s token, if it holds one.
    pub fn hot_token(&self, c: usize) -> Option<Cached> {
        self.hot_tokens
            .try_borrow()
            .ok()
            .and_then(|v| v.get(c).cloned().flatten())
    }

    pub fn has_hot_token(&self, c: usize) -> bool {
        self.hot_tokens
            .try_borrow()
            .is_ok_and(|v| v.get(c).is_some_and(Option::is_some))
    }

    /// The current [`HOT_GENERATION`]; `None` when it can't be read (then no
    /// copy may be used).
    pub fn read_hot_generation() -> Option<u32> {
        match host::shared_data(HOT_GENERATION) {
            Ok(Some((_, cas))) => Some(cas),
            _ => None,
        }
    }

    /// Drops this VM's token copies if a worker dropped a token since they were
    /// taken (or the generation can't be read).
    pub fn check_hot_generation(&self) {
        let now = Self::read_hot_generation();
        if now != Some(self.hot_generation.get()) {
            self.cool_hot_tokens();
            self.hot_generation.set(now.unwrap_or(0));
        }
    }

    pub fn cool_hot_tokens(&self) {
        if let Ok(mut v) = self.hot_tokens.try_borrow_mut() {
            v.iter_mut().for_each(|t| *t = None);
        }
    }

    pub fn set_hot_token(&self, c: usize, token: Option<Cached>) {
        if let Ok(mut v) = self.hot_tokens.try_borrow_mut() {
            if let Some(slot) = v.get_mut(c) {
                *slot = token;
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

/// The VM's linear memory (what it holds, configuration included, plus the
/// allocator's free space), in KiB.
fn vm_memory_kib() -> usize {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) * 64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

/// Creates a shared-data key if it is absent: "create if absent" by CAS is not
/// atomic in the host, so every key is created at configure time.
fn precreate(key: &str) {
    if let Ok(None) = host::shared_data(key) {
        let _ = host::set_shared_data(key, b"", 0);
    }
}

impl Loaded {
    /// `namespace`: the plugin's name, so that two plugins sharing a VM id never
    /// share a shared-data key.
    fn new(config: Config, namespace: &str) -> Loaded {
        let metrics = Metrics::define(&config);
        let tokens: Vec<Option<TokenSlot>> = config
            .connections
            .iter()
            .map(|c| {
                let provider = config.provider_of(c)?;
                let (timeout_ms, margin_s, default_s, after_401_s) = match &provider.kind {
                    ProviderKind::OAuth2(p) => (p.timeout_ms, p.refresh_margin_s, p.default_expires_in_s, p.drop_on_401_after_s),
                    ProviderKind::ManagedIdentity(p) => (p.timeout_ms, p.refresh_margin_s, p.default_expires_in_s, p.drop_on_401_after_s),
                    ProviderKind::ApiKey | ProviderKind::ClientCertificate => return None,
                };
                let key = crate::credential::keys::token_key(namespace, &config, c)?;
                let refresh = matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::RefreshToken(_)));
                let exchange = matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }));
                let rt_key = refresh.then(|| format!("{key}.rt"));
                let slot = TokenSlot {
                    key,
                    exchange,
                    rt_key,
                    policy: Policy::new(timeout_ms, margin_s * 1000),
                    default_lifetime_ms: default_s * 1000,
                    drop_on_401_after_ms: after_401_s * 1000,
                };
                // Create the keys now: "create if absent" by CAS is not atomic in the host.
                let keys: Vec<String> = if exchange {
                    (0..crate::credential::exchange::SETS).map(|i| slot.set_key(i)).collect()
                } else {
                    std::iter::once(slot.key.clone()).chain(slot.rt_key.clone()).collect()
                };
                for k in &keys {
                    precreate(k);
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
                precreate(&key);
                if let Some(k) = &login_key {
                    precreate(k);
                }
                StoreSlot {
                    key,
                    login_key,
                    policy: Policy::new(st.timeout_ms, 0),
                }
            })
            .collect();
        let store_values = RefCell::new(vec![None; config.stores.len()]);
        let hot_tokens = RefCell::new(vec![None; config.connections.len()]);
        if tokens.iter().any(Option::is_some) {
            precreate(HOT_GENERATION);
        }
        let hot_generation = std::cell::Cell::new(Loaded::read_hot_generation().unwrap_or(0));
        let discovery = config
            .discovery
            .as_ref()
            .map(|_| crate::discovery::Index::new(&config));

        Loaded {
            config,
            metrics,
            tokens,
            stores,
            store_values,
            hot_tokens,
            discovery,
            hot_generation,
        }
    }
}

/// The root context goes away with its plugin, or with the VM (Envoy calls
/// `proxy_on_delete` for it at shutdown, and the SDK drops it then): hand Envoy
/// the counts this VM still holds. `proxy_on_done` is not exported, so that
/// Envoy doesn't enter the VM for it on every request.
impl Drop for Root {
    fn drop(&mut self) {
        Metrics::flush();
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        match self.broker.try_borrow_mut() {
            Ok(mut b) => b.on_http_call_response(token_id, body_size),
            Err(_) => host::log(Level::Error, "token broker busy; response dropped"),
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = match host::plugin_configuration() {
            Ok(t) => t,
            Err(e) => {
                host::log(
                    Level::Critical,
                    &format!("can't read the plugin configuration: {e}"),
                );
                return false;
            }
        };
        let env = |name: &str| std::env::var(name).ok();
        let started = host::now_ns().unwrap_or(0);
        match Config::parse(&text, &env) {
            Ok(config) => {
                for w in &config.warnings {
                    host::log(Level::Warn, w);
                }
                for n in &config.notes {
                    host::log(Level::Info, n);
                }
                let (routes, connections, providers) = (
                    config.routes.len(),
                    config.connections.len(),
                    config.providers.len(),
                );
                // Envoy's plugin name (empty when unset): shared-data keys are namespaced by it.
                let plugin = host::property(&["plugin_name"])
                    .ok()
                    .flatten()
                    .and_then(|v| String::from_utf8(v).ok())
                    .unwrap_or_default();
                let loaded = Rc::new(Loaded::new(config, &plugin));
                if let Ok(mut b) = self.broker.try_borrow_mut() {
                    b.has_stores = !loaded.stores.is_empty();
                    // The idle tick flushes counters kept in the VM.
                    b.kick();
                    if b.has_stores {
                        // Read every store on the first tick: the first request
                        // then finds its value.
                        b.prefetch_due = true;
                        b.kick();
                    }
                }
                self.state = Some(loaded);
                let took_us = host::now_ns().unwrap_or(0).saturating_sub(started) / 1000;
                host::log(
                    Level::Info,
                    &format!(
                        "configuration loaded: {routes} routes, {connections} connections, \
                         {providers} providers in {}.{:03} ms; VM memory {} KiB",
                        took_us / 1000,
                        took_us % 1000,
                        vm_memory_kib()
                    ),
                );
                true
            }
            Err(e) => {
                host::log(Level::Critical, &format!("configuration rejected: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Ok(mut b) = self.broker.try_borrow_mut() {
            if let (true, Some(state)) = (b.prefetch_due, &self.state) {
                b.prefetch_due = false;
                b.prefetch(state, host::now_ms().unwrap_or(0));
            }
            b.on_tick();
            Metrics::flush();
            if let Some(state) = &self.state {
                match host::now_ms() {
                    Ok(now) => {
                        b.tend_tokens(state, now);
                        if b.has_stores {
                            b.tend_stores(state, now);
                        }
                    }
                    // No clock, no check: every request goes to the shared cache.
                    Err(_) => state.cool_hot_tokens(),
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            id: context_id,
            state: self.state.clone(),
            broker: self.broker.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    id: u32,
    state: Option<Rc<Loaded>>,
    broker: Rc<RefCell<Broker>>,
}

impl Context for Http {}

/// The stream is gone (`proxy_on_delete`: finished, or the client left while
/// it waited for a token).
impl Drop for Http {
    fn drop(&mut self) {
        if let Ok(mut b) = self.broker.try_borrow_mut() {
            b.forget(self.id);
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            // Never configured: refuse rather than forward without policy, and answer
            // (a paused request would hang until the client gave up).
            host::log(Level::Error, "no configuration loaded: 503");
            let r = reply(Refusal::NotConfigured, None);
            let headers: Vec<(&str, &str)> =
                r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let _ = host::send_local_response(
                r.status,
                "latchkey_not_configured",
                &headers,
                r.body.as_bytes(),
            );
            return Action::Pause;
        };
        let Ok(mut broker) = self.broker.try_borrow_mut() else {
            return fail_closed(&state, None, HostError(0));
        };
        match handle_request(&state, &mut broker, self.id) {
            Ok(action) => action,
            Err(e) => fail_closed(&state, None, e),
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            return Action::Continue;
        };
        let Ok(mut broker) = self.broker.try_borrow_mut() else {
            return Action::Continue;
        };
        let used = broker.take_used(self.id);
        if used.is_empty() {
            return Action::Continue;
        }
        let status = host::header(Map::Response, ":status").ok().flatten();
        if status.as_deref() == Some(b"401") {
            broker.on_upstream_401(&state, &used, host::now_ms().unwrap_or(0));
        }
        Action::Continue
    }
}

/// The host reads the request path makes only when it needs them.
struct HostReads;

impl request::Lazy for HostReads {
    fn route_name(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        host::property(&["xds", "route_name"]).map_err(|e| HostFault(e.0))
    }

    fn metadata(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        host::property(&["metadata"]).map_err(|e| HostFault(e.0))
    }
}

/// The one place an [`Outcome`] reaches the host: the header edits (when the
/// request goes on), counters, filter state and the debug line, then
/// latchkey's own reply if it has one.
pub fn apply(loaded: &Loaded, o: &Outcome) -> Result<Action, HostError> {
    if o.verdict.forwards() {
        for edit in &o.edits {
            match edit {
                Edit::Remove(name) => host::remove_header(Map::Request, name)?,
                Edit::Set { name, value } => {
                    host::replace_header(Map::Request, name, value.expose().as_bytes())?
                }
                Edit::SetPath(path) => host::replace_header(Map::Request, ":path", path)?,
            }
        }
    }
    let m = &loaded.metrics;
    match o.verdict {
        Verdict::Allowed => m.allowed(&o.picks),
        Verdict::UnmatchedAllowed => Metrics::inc(m.unmatched),
        Verdict::DeniedUnmatched => Metrics::inc(m.denied_unmatched),
        Verdict::DeniedUnauthenticated => Metrics::inc(m.denied_unauthenticated),
        Verdict::DeniedForbidden => Metrics::inc(m.denied_forbidden),
        Verdict::DeniedBadClaims => Metrics::inc(m.denied_bad_claims),
        Verdict::DeniedBadPath => Metrics::inc(m.denied_bad_path),
        Verdict::DeniedBadSubject => Metrics::inc(m.denied_bad_subject),
        Verdict::Unavailable => Metrics::inc(m.unavailable),
        Verdict::PausedLimit => {
            Metrics::inc(m.unavailable);
            Metrics::inc(m.paused_limit);
        }
        Verdict::Internal => Metrics::inc(m.internal_errors),
        Verdict::Discovery => Metrics::inc(m.discovery),
    }
    record(loaded, o);
    if let Some(r) = &o.reply {
        let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(e) =
            host::send_local_response(r.status, o.verdict.details(), &headers, r.body.as_bytes())
        {
            host::log(
                Level::Error,
                &format!("can't send the {} reply: {e}", r.status),
            );
        }
    }
    Ok(if o.verdict.forwards() {
        Action::Continue
    } else {
        Action::Pause
    })
}

/// Filter state for access logs (`%FILTER_STATE(wasm.latchkey.decision:PLAIN)%`,
/// with `filter_state: true`) and the debug line.
fn record(loaded: &Loaded, o: &Outcome) {
    let debug = host::log_enabled(Level::Debug);
    if !loaded.config.filter_state && !debug {
        return;
    }
    if let (Some(why), true) = (&o.why, debug) {
        host::log(Level::Debug, why);
    }
    let config = &loaded.config;
    let route = o
        .route
        .and_then(|r| config.route(r))
        .map_or("-", |r| r.name.as_str());
    let connection = match o.verdict {
        Verdict::Allowed | Verdict::Unavailable | Verdict::PausedLimit if !o.picks.is_empty() => o
            .picks
            .iter()
            .filter_map(|&c| config.connection(c).map(|c| c.name.as_str()))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    };
    let decision = o.verdict.label();
    if config.filter_state {
        for (key, value) in [
            ("latchkey.route", route),
            ("latchkey.connection", connection.as_str()),
            ("latchkey.decision", decision),
        ] {
            if let Err(e) = host::set_property(&[key], value.as_bytes()) {
                host::log(Level::Debug, &format!("can't set filter state {key}: {e}"));
            }
        }
    }
    if debug {
        host::log(
            Level::Debug,
            &format!("route={route} connection={connection} decision={decision}"),
        );
    }
}

/// Fails a request closed: 500, counted, logged.
fn fail_closed(loaded: &Loaded, route: Option<usize>, e: HostError) -> Action {
    host::log(
        Level::Error,
        &format!("host call failed on the request path: {e}"),
    );
    // Sending the reply is itself a host call: nothing more to do if it fails.
    apply(loaded, &request::internal(&loaded.config, route)).unwrap_or(Action::Pause)
}

fn handle_request(
    state: &Rc<Loaded>,
    broker: &mut Broker,
    context_id: u32,
) -> Result<Action, HostError> {
    let config = &state.config;
    let headers = host::header_pairs(Map::Request)?;
    let pairs: Vec<(&str, &[u8])> = headers.iter().collect();
    let needed = match request::start(config, state.discovery.as_ref(), &pairs, &mut HostReads)
        .map_err(|f| HostError(f.0))?
    {
        Step::Done(outcome) => return apply(state, &outcome),
        Step::Needs(needed) => needed,
    };
    // A token this VM holds serves only if no worker dropped one since.
    if needed.picks.iter().any(|&c| state.has_hot_token(c)) {
        state.check_hot_generation();
    }
    // The clock is a host call: only token lookups need it.
    let now = if needs_time(state, &needed.picks) {
        host::now_ms()?
    } else {
        0
    };
    let sent: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    let path = pairs
        .iter()
        .find(|(k, _)| *k == ":path")
        .map_or(&b"/"[..], |(_, v)| *v);
    match broker.resolve(state, &needed.picks, needed.subject.as_ref(), now, true)? {
        Resolution::Ready(creds) => {
            let keep = config
                .route(needed.route)
                .is_some_and(|r| r.drop_token_on_401);
            let outcome = request::finish(config, needed, &Cred::resolved(&creds), &sent, path);
            let action = apply(state, &outcome)?;
            if keep {
                broker.record_used(context_id, Cred::tokens(&creds));
            }
            Ok(action)
        }
        Resolution::Reject {
            connection,
            retry_after_ms,
        } => apply(
            state,
            &request::unavailable(config, needed, connection, retry_after_ms),
        ),
        Resolution::Wait { deadline_ms, keys } => {
            if broker.paused() >= config.max_paused_requests {
                // Bounded waiting: past the cap, 503 at once rather than one more
                // paused stream in memory.
                return apply(state, &request::paused_limit(config, needed));
            }
            broker.wait(
                context_id,
                Waiter {
                    loaded: state.clone(),
                    needed,
                    deadline_ms,
                    sent: sent.iter().map(|s| s.to_string()).collect(),
                    path: path.to_vec(),
                    keys,
                    seen: Vec::new(),
                },
            );
            Ok(Action::Pause)
        }
    }
}

fn needs_time(loaded: &Loaded, picks: &[usize]) -> bool {
    picks.iter().any(|&ci| {
        loaded
            .config
            .connection(ci)
            .is_some_and(|conn| match &conn.credential {
                Credential::ApiKey(SecretRef::Value(_)) | Credential::ClientCertificate { .. } => {
                    false
                }
                // A store value this VM already holds costs no clock read.
                Credential::ApiKey(SecretRef::Store(i)) => loaded.store_value(*i).is_none(),
                // Nor does a token it holds (checked by the tick).
                Credential::OAuth2(_) | Credential::ManagedIdentity { .. } => {
                    !loaded.has_hot_token(ci)
                }
            })
    })
}
