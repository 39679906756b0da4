//! The proxy-wasm glue: the only code that talks to the host, and it decides
//! nothing. [`Root`] loads the configuration (`on_configure`; a bad one is
//! refused whole) and runs the VM's credential broker on its tick: it sends the
//! calls the broker has due, hands it each answer, and applies the outcome of
//! every paused request whose wait is over. [`Http`] reads a request's headers
//! once, asks [`crate::request`] for the outcome (resolving its credentials
//! through the broker), and applies it in one place ([`apply`]). Any host error
//! on that path fails closed with a 500; nothing here can panic.

mod host;
mod proxy;

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::Config;
use crate::credential::broker::{Broker, EntryCredential, Resolution, Resumed, Waiter, Who};
use crate::credential::token_response::MAX_BODY;
use crate::inject::Edit;
use crate::proxy::Proxy;
use crate::request::{self, HostFault, Outcome, Step, Verdict};
use crate::response::{reply, Refusal};
use crate::runtime::Runtime;
use crate::stats::ConsentStat;
use host::{HostError, Level, Map};
use proxy::ProxyHost;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root {
            id: context_id,
            state: None,
            broker: Rc::new(RefCell::new(Broker::new(ProxyHost))),
        })
    });
}}

struct Root {
    id: u32,
    state: Option<Rc<Runtime>>,
    broker: Rc<RefCell<Broker<ProxyHost>>>,
}

thread_local! {
    /// The tick period set last (one root context per VM).
    static TICK_MS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Sets the tick the broker wants now: fast while a fetch waits to be sent, a
/// poll while requests wait, once a second otherwise (a host call only when it
/// changes).
fn retick(broker: &Broker<ProxyHost>) {
    let ms = broker.wanted_tick_ms();
    if TICK_MS.with(std::cell::Cell::get) != ms && host::set_tick_period_ms(ms).is_ok() {
        TICK_MS.with(|t| t.set(ms));
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

impl Root {
    fn retick(&self) {
        if let Ok(b) = self.broker.try_borrow() {
            retick(&b);
        }
    }

    /// Applies the outcome of each paused request whose wait is over, in its
    /// own context, and lets those that go on continue.
    fn resume(&mut self, now: u64) {
        let resumed = match self.broker.try_borrow_mut() {
            Ok(mut b) => b.due_waiters(now),
            Err(_) => return,
        };
        for Resumed {
            id,
            loaded,
            outcome,
            used,
        } in resumed
        {
            if host::set_effective_context(id).is_err() {
                continue; // the request has gone away
            }
            let done = apply(&loaded, &outcome).and_then(|action| match action {
                Action::Continue => host::resume_request(),
                _ => Ok(()),
            });
            let _ = host::set_effective_context(self.id);
            match done {
                Ok(()) if !used.is_empty() => {
                    if let Ok(mut b) = self.broker.try_borrow_mut() {
                        b.record_used(id, used);
                    }
                }
                Ok(()) => {}
                Err(e) => host::log(Level::Error, &format!("can't resume a request: {e}")),
            }
        }
    }
}

/// The root context goes away with its plugin, or with the VM (Envoy calls
/// `proxy_on_delete` for it at shutdown, and the SDK drops it then): hand Envoy
/// the counts this VM still holds. `proxy_on_done` is not exported, so that
/// Envoy doesn't enter the VM for it on every request.
impl Drop for Root {
    fn drop(&mut self) {
        proxy::flush();
    }
}

impl Context for Root {
    fn on_http_call_response(
        &mut self,
        id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        let now = host::now_ms().unwrap_or(0);
        match self.broker.try_borrow_mut() {
            Ok(mut b) if b.awaits(id) => {
                let status = host::header_pairs(Map::CallResponse).ok().and_then(|h| {
                    h.get(":status")
                        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u32>().ok())
                });
                let body = (body_size <= MAX_BODY)
                    .then(|| host::http_call_response_body(body_size).unwrap_or_default());
                b.on_answer(id, status, body, now);
            }
            Ok(_) => return,
            Err(_) => {
                host::log(Level::Error, "credential broker busy; answer dropped");
                return;
            }
        }
        self.resume(now);
        self.retick();
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
        let config = match Config::parse(&text, &env) {
            Ok(config) => config,
            Err(e) => {
                host::log(Level::Critical, &format!("configuration rejected: {e}"));
                return false;
            }
        };
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
        let loaded = Rc::new(Runtime::new(&ProxyHost, config, &plugin));
        if let Ok(mut b) = self.broker.try_borrow_mut() {
            b.configured(&loaded);
        }
        self.state = Some(loaded);
        // The idle tick flushes counters kept in the VM; a store read is due at once.
        self.retick();
        let took_us = host::now_ns().unwrap_or(0).saturating_sub(started) / 1000;
        host::log(
            Level::Info,
            &format!(
                "configuration loaded: {routes} routes, {connections} connections, \
                 {providers} providers in {}.{:03} ms; VM memory {} KiB; module version {}",
                took_us / 1000,
                took_us % 1000,
                vm_memory_kib(),
                env!("CARGO_PKG_VERSION")
            ),
        );
        true
    }

    fn on_tick(&mut self) {
        let now = host::now_ms();
        if let (Ok(mut b), Ok(now)) = (self.broker.try_borrow_mut(), now) {
            b.on_tick(self.state.as_ref(), now);
        }
        proxy::flush();
        match now {
            Ok(now) => self.resume(now),
            // No clock, no check: every request goes to the shared cache.
            Err(_) => {
                if let Some(state) = &self.state {
                    state.drop_token_copies();
                }
            }
        }
        self.retick();
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
    state: Option<Rc<Runtime>>,
    broker: Rc<RefCell<Broker<ProxyHost>>>,
}

impl Context for Http {}

/// The stream is gone (`proxy_on_delete`: finished, or the client left while
/// it waited for a credential).
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
            return fail_closed(&state, None, "the credential broker is busy");
        };
        match handle_request(&state, &mut broker, self.id) {
            Ok(action) => action,
            Err(e) => fail_closed(&state, None, format_args!("host call failed: {e}")),
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
            retick(&broker);
        }
        Action::Continue
    }
}

/// The host reads the request path makes only when it needs them.
struct HostReads;

impl request::Lazy for HostReads {
    fn route_name(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        host::property(&["xds", "route_name"])
    }

    fn metadata(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
        host::property(&["metadata"])
    }

    fn now_ms(&mut self) -> Result<u64, HostFault> {
        host::now_ms()
    }

    fn random(&mut self) -> u64 {
        crate::consent::random_u64()
    }
}

/// The one place an [`Outcome`] reaches the host: the header edits (when the
/// request goes on), counters, filter state and the debug line, then
/// latchkey's own reply if it has one.
pub fn apply(loaded: &Runtime, o: &Outcome) -> Result<Action, HostError> {
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
    let m = &loaded.stats;
    let p = &ProxyHost;
    match o.verdict {
        Verdict::Allowed => m.allowed(p, &o.picks),
        Verdict::UnmatchedAllowed => p.count(m.unmatched),
        Verdict::DeniedUnmatched => p.count(m.denied_unmatched),
        Verdict::DeniedUnauthenticated => p.count(m.denied_unauthenticated),
        Verdict::DeniedForbidden => p.count(m.denied_forbidden),
        Verdict::DeniedBadClaims => p.count(m.denied_bad_claims),
        Verdict::DeniedBadPath => p.count(m.denied_bad_path),
        Verdict::DeniedBadSubject => p.count(m.denied_bad_subject),
        Verdict::Unavailable => p.count(m.unavailable),
        Verdict::PausedLimit => {
            p.count(m.unavailable);
            p.count(m.paused_limit);
        }
        Verdict::Internal => p.count(m.internal_errors),
        Verdict::Discovery => p.count(m.discovery),
        Verdict::ConsentRequired => p.count(m.consent_required),
        Verdict::ConsentLogin => m.consent(p, ConsentStat::LoginStarted),
        Verdict::ConsentFailed => m.consent_failed(p, o.consent_reason.unwrap_or("bad_request")),
        // Counted where they completed (the broker's task).
        Verdict::ConsentConnected | Verdict::ConsentDisconnected => {}
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
fn record(loaded: &Runtime, o: &Outcome) {
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
fn fail_closed(loaded: &Runtime, route: Option<usize>, why: impl std::fmt::Display) -> Action {
    host::log(Level::Error, &format!("request failed closed: {why}"));
    // Sending the reply is itself a host call: nothing more to do if it fails.
    apply(loaded, &request::internal(&loaded.config, route)).unwrap_or(Action::Pause)
}

fn handle_request(
    state: &Rc<Runtime>,
    broker: &mut Broker<ProxyHost>,
    context_id: u32,
) -> Result<Action, HostError> {
    let config = &state.config;
    let headers = host::header_pairs(Map::Request)?;
    let pairs = headers.pairs()?;
    let needed = match request::start(config, state.discovery.as_ref(), &pairs, &mut HostReads)? {
        Step::Done(outcome) => return apply(state, &outcome),
        Step::Needs(needed) => needed,
        Step::Consent(task) => {
            // A consent callback or disconnect: answered when its calls are done,
            // and bounded like any other paused request.
            if broker.paused() >= config.max_paused_requests {
                return apply(state, &request::consent_failed(503, "paused_limit", None));
            }
            broker.start_task(state, context_id, task, host::now_ms()?);
            retick(broker);
            return Ok(Action::Pause);
        }
    };
    let path = pairs
        .iter()
        .find(|(k, _)| *k == ":path")
        .map_or(&b"/"[..], |(_, v)| *v);
    // The clock is a host call: read only for what this VM holds no copy of.
    let mut clock = || host::now_ms();
    match broker.resolve_with(state, &needed.picks, Who::of(&needed), &mut clock, true)? {
        Resolution::Ready(creds) => {
            // A refresh it started goes out on the next tick.
            retick(broker);
            let keep = config
                .route(needed.route)
                .is_some_and(|r| r.drop_token_on_401);
            let outcome = request::finish(
                config,
                needed,
                EntryCredential::resolved(&creds),
                &pairs[..],
                path,
            );
            let action = apply(state, &outcome)?;
            if keep {
                broker.record_used(context_id, EntryCredential::tokens(&creds));
            }
            Ok(action)
        }
        Resolution::Reject {
            connection,
            consent_required: true,
            ..
        } => apply(
            state,
            &request::consent_required(config, needed, connection),
        ),
        Resolution::Reject {
            connection,
            retry_after_ms,
            ..
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
                    sent: pairs.iter().map(|(k, _)| k.to_string()).collect(),
                    path: path.to_vec(),
                    keys,
                    seen: Vec::new(),
                },
            );
            retick(broker);
            Ok(Action::Pause)
        }
    }
}
