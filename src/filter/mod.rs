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

use crate::claims::Identity;
use crate::config::{ClaimsSource, Config, Credential, Grant, ProviderKind, SecretRef};
use crate::credential::cache::{Cached, Policy};
use crate::credential::exchange::verified_subject;
use crate::inject::{self, Edit};
use crate::policy::{decide, Decision, Denial};
use crate::response::{reply, Refusal};
use crate::router::RequestInfo;
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
    /// Per route: whether an inject entry may pick a token-exchange connection
    /// (the caller's identity then keeps its verified token's binding claims).
    pub exchange_routes: Vec<bool>,
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
    /// Whether route `r`'s identity must keep its binding claims.
    pub fn binds(&self, r: Option<usize>) -> bool {
        r.and_then(|r| self.exchange_routes.get(r).copied())
            .unwrap_or(false)
    }

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
        let exchange_routes = config
            .routes
            .iter()
            .map(|r| {
                r.inject
                    .iter()
                    .any(|i| needs_subject(&config, &i.connections))
            })
            .collect();
        Loaded {
            config,
            metrics,
            tokens,
            stores,
            store_values,
            hot_tokens,
            discovery,
            exchange_routes,
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
            local_reply(&state, &Refused::Internal, None, None);
            return Action::Pause;
        };
        match handle_request(&state, &mut broker, self.id) {
            Ok(action) => action,
            Err(e) => {
                host::log(
                    Level::Error,
                    &format!("host call failed on the request path: {e}"),
                );
                local_reply(&state, &Refused::Internal, None, None);
                Action::Pause
            }
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

/// Why latchkey answers a request itself.
pub enum Refused {
    Denied(Denial),
    BadPath(&'static str),
    Unavailable {
        connection: String,
        retry_after_s: u64,
    },
    Internal,
}

/// Sends latchkey's JSON reply for the current (effective) request, counts it and
/// records the decision for the access log.
pub fn local_reply(
    loaded: &Loaded,
    refused: &Refused,
    route: Option<&str>,
    connection: Option<&str>,
) {
    let m = &loaded.metrics;
    let (refusal, decision) = match refused {
        Refused::Denied(d) => (Refusal::Denied(*d), ""),
        Refused::BadPath(reason) => (Refusal::BadPath { reason }, ""),
        Refused::Unavailable {
            connection,
            retry_after_s,
        } => {
            Metrics::inc(m.unavailable);
            (
                Refusal::Unavailable {
                    connection,
                    retry_after_s: *retry_after_s,
                },
                "credential_unavailable",
            )
        }
        Refused::Internal => {
            Metrics::inc(m.internal_errors);
            (Refusal::Internal, "internal_error")
        }
    };
    if !decision.is_empty() {
        set_filter_state(loaded, route, connection, decision);
    }
    let r = reply(refusal, route);
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(e) = host::send_local_response(r.status, "latchkey", &headers, r.body.as_bytes()) {
        host::log(
            Level::Error,
            &format!("can't send the {} reply: {e}", r.status),
        );
    }
}

/// Filter state for access logs: `%FILTER_STATE(wasm.latchkey.decision:PLAIN)%`.
pub fn set_filter_state(
    loaded: &Loaded,
    route: Option<&str>,
    connection: Option<&str>,
    decision: &str,
) {
    let items = if loaded.config.filter_state {
        &[
            ("latchkey.route", route.unwrap_or("-")),
            ("latchkey.connection", connection.unwrap_or("-")),
            ("latchkey.decision", decision),
        ][..]
    } else {
        &[][..]
    };
    for (key, value) in items {
        if let Err(e) = host::set_property(&[key], value.as_bytes()) {
            host::log(Level::Debug, &format!("can't set filter state {key}: {e}"));
        }
    }
    if host::log_enabled(Level::Debug) {
        host::log(
            Level::Debug,
            &format!(
                "route={} connection={} decision={decision}",
                route.unwrap_or("-"),
                connection.unwrap_or("-")
            ),
        );
    }
}

pub fn apply(edits: &[Edit]) -> Result<(), HostError> {
    for edit in edits {
        match edit {
            Edit::Remove(name) => host::remove_header(Map::Request, name)?,
            Edit::Set { name, value } => {
                host::replace_header(Map::Request, name, value.expose().as_bytes())?
            }
            Edit::SetPath(path) => host::replace_header(Map::Request, ":path", path)?,
        }
    }
    Ok(())
}

fn text(v: Option<&[u8]>) -> &str {
    v.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("")
}

fn handle_request(
    state: &Rc<Loaded>,
    broker: &mut Broker,
    context_id: u32,
) -> Result<Action, HostError> {
    let config = &state.config;
    let metrics = &state.metrics;
    let headers = host::header_pairs(Map::Request)?;
    let full_path = headers.get(":path").unwrap_or(b"/");
    let path_only = full_path.split(|&b| b == b'?').next().unwrap_or_default();
    if let Some(dp) = &config.discovery {
        let method = text(headers.get(":method"));
        if (method == "GET" || method == "HEAD") && path_only == dp.as_bytes() {
            return discovery(state, &headers);
        }
    }
    let route_name = if config.router.needs_route_name() {
        host::property(&["xds", "route_name"])?.and_then(|v| String::from_utf8(v).ok())
    } else {
        None
    };
    let info = RequestInfo {
        route_name: route_name.as_deref(),
        host: text(headers.get(":authority")),
        path: "",
        method: text(headers.get(":method")),
    };
    // The path as every kind of upstream reads it: one route for all, or 400.
    let route_index = match config.router.find_path(&info, path_only) {
        Ok(r) => r,
        Err(refusal) => {
            let reason = refusal.reason();
            host::log(Level::Debug, &format!("400: {reason}"));
            Metrics::inc(metrics.denied_bad_path);
            set_filter_state(state, None, None, "denied_bad_path");
            local_reply(state, &Refused::BadPath(reason), None, None);
            return Ok(Action::Pause);
        }
    };
    let route = route_index.and_then(|i| config.route(i));
    let route_label = route.map(|r| r.name.as_str());
    let sent: Vec<&str> = headers.iter().map(|(k, _)| k).collect();

    // The claims header never reaches the upstream, whatever happens next.
    let mut edits = Vec::new();
    if let ClaimsSource::Header { name } = &config.claims.source {
        inject::remove_all(name, sent.iter().copied(), &mut edits);
    }
    // Nor does a client-sent cluster header: no client picks a cluster (or a
    // client certificate) itself.
    for name in &config.cluster_headers {
        inject::remove_all(name, sent.iter().copied(), &mut edits);
    }

    let identity = match route {
        // No route, or only public policies on it: who the caller is changes nothing.
        None => None,
        Some(r) if !r.needs_claims => None,
        Some(_) => match read_identity(config, &headers, state.binds(route_index)) {
            Ok(identity) => identity,
            Err(IdentityError::Host(e)) => return Err(e),
            Err(IdentityError::Malformed(e)) => {
                host::log(Level::Debug, &format!("401: {e}"));
                Metrics::inc(metrics.denied_bad_claims);
                set_filter_state(state, route_label, None, "denied_bad_claims");
                local_reply(
                    state,
                    &Refused::Denied(Denial::Unauthenticated),
                    route_label,
                    None,
                );
                return Ok(Action::Pause);
            }
        },
    };
    let decision = match route {
        None => decide(config, None, None),
        Some(_) => decide(config, route_index, identity.as_ref()),
    };

    let deny = |m: Option<u32>, label: &str, denial: Denial, route: Option<&str>| {
        Metrics::inc(m);
        set_filter_state(state, route, None, label);
        local_reply(state, &Refused::Denied(denial), route, None);
        Ok(Action::Pause)
    };
    let (route_i, picks) = match decision {
        Decision::UnmatchedAllowed => {
            Metrics::inc(metrics.unmatched);
            apply(&edits)?;
            set_filter_state(state, None, None, "unmatched_allowed");
            return Ok(Action::Continue);
        }
        Decision::UnmatchedDenied => {
            return deny(
                metrics.denied_unmatched,
                "denied_unmatched",
                Denial::Forbidden,
                None,
            )
        }
        Decision::Denied {
            denial: Denial::Unauthenticated,
            ..
        } => {
            return deny(
                metrics.denied_unauthenticated,
                "denied_unauthenticated",
                Denial::Unauthenticated,
                route_label,
            )
        }
        Decision::Denied {
            denial: Denial::Forbidden,
            ..
        } => {
            return deny(
                metrics.denied_forbidden,
                "denied_forbidden",
                Denial::Forbidden,
                route_label,
            )
        }
        Decision::Allowed { route, picks } => (route, picks),
    };
    let Some(route) = config.route(route_i) else {
        return Err(HostError(2));
    };
    let names: Vec<&str> = picks
        .iter()
        .filter_map(|&c| config.connection(c).map(|c| c.name.as_str()))
        .collect();
    let connection_label = (!names.is_empty()).then(|| names.join(","));
    // A token this VM holds serves only if no worker dropped one since.
    if picks.iter().any(|&c| state.has_hot_token(c)) {
        state.check_hot_generation();
    }
    // The clock is a host call: only token lookups need it.
    let now = if needs_time(state, &picks) {
        host::now_ms()?
    } else {
        0
    };
    // Token exchange sends the caller's own bearer token as the subject token:
    // exactly the JWT jwt_authn verified, or the caller gets 401.
    let subject = if needs_subject(config, &picks) {
        let values: Vec<&[u8]> = headers
            .iter()
            .filter(|(k, _)| *k == "authorization")
            .map(|(_, v)| v)
            .collect();
        match verified_subject(&values, identity.as_ref().and_then(Identity::binding)) {
            Ok(s) => Some(s),
            Err(e) => {
                host::log(Level::Debug, &format!("401: {e}"));
                Metrics::inc(metrics.denied_bad_subject);
                set_filter_state(state, route_label, None, "denied_bad_subject");
                local_reply(
                    state,
                    &Refused::Denied(Denial::Unauthenticated),
                    route_label,
                    None,
                );
                return Ok(Action::Pause);
            }
        }
    } else {
        None
    };
    match broker.resolve(state, &picks, subject.as_ref(), now, true)? {
        Resolution::Ready(creds) => {
            let resolved = Cred::resolved(&creds);
            edits.extend(inject::plan(route, &resolved, &sent, full_path));
            apply(&edits)?;
            metrics.allowed(&picks);
            set_filter_state(
                state,
                Some(&route.name),
                connection_label.as_deref(),
                "allowed",
            );
            if route.drop_token_on_401 {
                broker.record_used(context_id, Cred::tokens(&creds));
            }
            Ok(Action::Continue)
        }
        Resolution::Reject {
            connection,
            retry_after_ms,
        } => {
            let name = config
                .connection(connection)
                .map_or(String::new(), |c| c.name.clone());
            local_reply(
                state,
                &Refused::Unavailable {
                    connection: name,
                    retry_after_s: retry_after_ms.div_ceil(1000),
                },
                Some(&route.name),
                connection_label.as_deref(),
            );
            Ok(Action::Pause)
        }
        Resolution::Wait { deadline_ms, keys } => {
            if broker.paused() >= config.max_paused_requests {
                // Bounded waiting: past the cap, 503 at once rather than one more
                // paused stream in memory.
                Metrics::inc(metrics.paused_limit);
                let name = picks
                    .first()
                    .and_then(|&c| config.connection(c))
                    .map_or(String::new(), |c| c.name.clone());
                local_reply(
                    state,
                    &Refused::Unavailable {
                        connection: name,
                        retry_after_s: 1,
                    },
                    Some(&route.name),
                    connection_label.as_deref(),
                );
                return Ok(Action::Pause);
            }
            broker.wait(
                context_id,
                Waiter {
                    loaded: state.clone(),
                    route: route_i,
                    picks,
                    deadline_ms,
                    sent: sent.iter().map(|s| s.to_string()).collect(),
                    path: full_path.to_vec(),
                    pre_edits: edits,
                    connection_label,
                    subject,
                    keys,
                    seen: Vec::new(),
                },
            );
            Ok(Action::Pause)
        }
    }
}

/// Answers `discovery.path` with what this caller may use. Per caller: never cached.
fn discovery(state: &Rc<Loaded>, headers: &host::HeaderPairs) -> Result<Action, HostError> {
    let config = &state.config;
    let identity = match read_identity(config, headers, false) {
        Ok(id) => id,
        Err(IdentityError::Host(e)) => return Err(e),
        Err(IdentityError::Malformed(e)) => {
            host::log(Level::Debug, &format!("401: {e}"));
            Metrics::inc(state.metrics.denied_bad_claims);
            local_reply(state, &Refused::Denied(Denial::Unauthenticated), None, None);
            return Ok(Action::Pause);
        }
    };
    let Some(index) = &state.discovery else {
        return Err(HostError(2));
    };
    let body = index.answer(config, identity.as_ref());
    Metrics::inc(state.metrics.discovery);
    set_filter_state(state, None, None, "discovery");
    let headers = [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
        ("vary", "authorization"),
    ];
    host::send_local_response(200, "latchkey_discovery", &headers, body.as_bytes())?;
    Ok(Action::Pause)
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

fn needs_subject(config: &Config, picks: &[usize]) -> bool {
    picks.iter().any(|&c| {
        config.connection(c).is_some_and(|c| {
            matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }))
        })
    })
}

enum IdentityError {
    Host(HostError),
    Malformed(crate::claims::ClaimsError),
}

impl From<HostError> for IdentityError {
    fn from(e: HostError) -> Self {
        IdentityError::Host(e)
    }
}

/// The caller's claims; `Ok(None)` when it brought none.
/// With `bind`, the identity keeps the verified token's binding claims.
fn read_identity(
    config: &Config,
    headers: &host::HeaderPairs,
    bind: bool,
) -> Result<Option<Identity>, IdentityError> {
    match &config.claims.source {
        ClaimsSource::None => Ok(None),
        ClaimsSource::Header { name } => match headers.get(name) {
            None => Ok(None),
            Some(v) => Identity::from_header(v, &config.claim_paths, bind)
                .map(Some)
                .map_err(IdentityError::Malformed),
        },
        ClaimsSource::JwtMetadata { key } => match host::property(&["metadata"])? {
            None => Ok(None),
            Some(md) => Identity::from_metadata(&md, key, &config.claim_paths, bind)
                .map_err(IdentityError::Malformed),
        },
    }
}
