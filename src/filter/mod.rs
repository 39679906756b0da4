//! The proxy-wasm glue: the only code that talks to the host.
//!
//! [`Root`] loads the configuration (`on_configure`; a bad one is refused whole)
//! and defines the stats. [`Http`] runs the request flow in
//! `on_http_request_headers`: read the headers once, match the route, read the
//! claims, decide, then either change the request and continue or answer with a
//! local reply. Any host error on that path fails closed with a 500 and forwards
//! nothing; nothing here can panic.

mod host;
mod metrics;

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::claims::{decode_property, Identity};
use crate::config::{ClaimsSource, Config, Credential};
use crate::inject::{self, Edit, Resolved};
use crate::policy::{decide, Decision, Denial};
use crate::response::{reply, Refusal};
use crate::router::RequestInfo;
use host::{HostError, Level, Map};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::<Root>::default() });
}}

const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

#[derive(Default)]
struct Root {
    state: Option<Rc<Loaded>>,
}

/// A loaded configuration and the stats defined for it.
struct Loaded {
    config: Config,
    metrics: Metrics,
}

impl Context for Root {}

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
        match Config::parse(&text, &env) {
            Ok(config) => {
                for w in &config.warnings {
                    host::log(Level::Warn, w);
                }
                host::log(
                    Level::Info,
                    &format!(
                        "configuration loaded: {} routes, {} connections, {} providers",
                        config.routes.len(),
                        config.connections.len(),
                        config.providers.len()
                    ),
                );
                let metrics = Metrics::define(&config);
                self.state = Some(Rc::new(Loaded { config, metrics }));
                true
            }
            Err(e) => {
                host::log(Level::Critical, &format!("configuration rejected: {e}"));
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            state: self.state.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    state: Option<Rc<Loaded>>,
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(state) = self.state.clone() else {
            // Never configured: refuse rather than forward without policy.
            return local_reply(&Outcome::internal(None), None);
        };
        match handle_request(&state) {
            Ok(Outcome {
                verdict: Verdict::Forward,
                ..
            }) => Action::Continue,
            Ok(outcome) => local_reply(&outcome, Some(&state.metrics)),
            Err(e) => {
                host::log(
                    Level::Error,
                    &format!("host call failed on the request path: {e}"),
                );
                local_reply(&Outcome::internal(None), Some(&state.metrics))
            }
        }
    }
}

enum Verdict {
    Forward,
    Refuse(RefusalKind),
}

enum RefusalKind {
    Denied(Denial),
    Unavailable { connection: String },
    Internal,
}

/// What happened to a request, for the reply, the stats and the filter state.
struct Outcome {
    verdict: Verdict,
    route: Option<String>,
}

impl Outcome {
    fn internal(route: Option<String>) -> Self {
        Outcome {
            verdict: Verdict::Refuse(RefusalKind::Internal),
            route,
        }
    }
}

fn local_reply(outcome: &Outcome, metrics: Option<&Metrics>) -> Action {
    let Verdict::Refuse(kind) = &outcome.verdict else {
        return Action::Continue;
    };
    let refusal = match kind {
        RefusalKind::Denied(d) => Refusal::Denied(*d),
        RefusalKind::Unavailable { connection } => Refusal::Unavailable {
            connection,
            retry_after_s: 1,
        },
        RefusalKind::Internal => {
            if let Some(m) = metrics {
                Metrics::inc(m.internal_errors);
            }
            set_filter_state(outcome.route.as_deref(), None, "internal_error");
            Refusal::Internal
        }
    };
    let r = reply(refusal, outcome.route.as_deref());
    let headers: Vec<(&str, &str)> = r.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(e) = host::send_local_response(r.status, "latchkey", &headers, r.body.as_bytes()) {
        host::log(
            Level::Error,
            &format!("can't send the {} reply: {e}", r.status),
        );
    }
    Action::Pause
}

/// Filter state for access logs: `%FILTER_STATE(wasm.latchkey.decision:PLAIN)%`.
fn set_filter_state(route: Option<&str>, connection: Option<&str>, decision: &str) {
    let items = [
        ("latchkey.route", route.unwrap_or("-")),
        ("latchkey.connection", connection.unwrap_or("-")),
        ("latchkey.decision", decision),
    ];
    for (key, value) in items {
        if let Err(e) = host::set_property(&[key], value.as_bytes()) {
            host::log(Level::Debug, &format!("can't set filter state {key}: {e}"));
        }
    }
}

fn handle_request(state: &Loaded) -> Result<Outcome, HostError> {
    let config = &state.config;
    let metrics = &state.metrics;
    let headers = host::header_pairs(Map::RequestHeaders)?;
    let full_path = headers.get(":path").unwrap_or(b"/");
    let path_only = full_path.split(|&b| b == b'?').next().unwrap_or_default();
    let route_name = if config.router.needs_route_name() {
        host::property(&["xds", "route_name"])?.and_then(|v| String::from_utf8(v).ok())
    } else {
        None
    };
    let info = RequestInfo {
        route_name: route_name.as_deref(),
        host: text(headers.get(":authority")),
        path: std::str::from_utf8(path_only).unwrap_or(""),
        method: text(headers.get(":method")),
    };
    let route_index = config.router.find(&info);
    let route = route_index.and_then(|i| config.route(i));
    let route_label = route.map(|r| r.name.clone());
    let sent: Vec<&str> = headers.iter().map(|(k, _)| k).collect();

    // The claims header never reaches the upstream, whatever happens next.
    let mut edits = Vec::new();
    if let ClaimsSource::Header { name } = &config.claims.source {
        inject::remove_all(name, sent.iter().copied(), &mut edits);
    }

    let decision = match route {
        None => decide(config, None, None),
        Some(_) => {
            let identity = match read_identity(config, &headers) {
                Ok(id) => id,
                Err(IdentityError::Host(e)) => return Err(e),
                Err(IdentityError::Malformed(e)) => {
                    host::log(Level::Debug, &format!("401: {e}"));
                    Metrics::inc(metrics.denied_bad_claims);
                    set_filter_state(route_label.as_deref(), None, "denied_bad_claims");
                    return Ok(Outcome {
                        verdict: Verdict::Refuse(RefusalKind::Denied(Denial::Unauthenticated)),
                        route: route_label,
                    });
                }
            };
            decide(config, route_index, identity.as_ref())
        }
    };

    let (verdict, connection_label, decision_label) = match &decision {
        Decision::UnmatchedAllowed => {
            Metrics::inc(metrics.unmatched);
            (Verdict::Forward, None, "unmatched_allowed")
        }
        Decision::UnmatchedDenied => {
            Metrics::inc(metrics.denied_unmatched);
            (
                Verdict::Refuse(RefusalKind::Denied(Denial::Forbidden)),
                None,
                "denied_unmatched",
            )
        }
        Decision::Denied { denial, .. } => {
            let (m, label) = match denial {
                Denial::Unauthenticated => {
                    (metrics.denied_unauthenticated, "denied_unauthenticated")
                }
                Denial::Forbidden => (metrics.denied_forbidden, "denied_forbidden"),
            };
            Metrics::inc(m);
            (Verdict::Refuse(RefusalKind::Denied(*denial)), None, label)
        }
        Decision::Allowed { picks, .. } => {
            let names: Vec<&str> = picks
                .iter()
                .filter_map(|&c| config.connection(c).map(|c| c.name.as_str()))
                .collect();
            let label = (!names.is_empty()).then(|| names.join(","));
            let mut resolved = Vec::with_capacity(picks.len());
            let mut unavailable = None;
            for &ci in picks {
                match config.connection(ci).map(|c| (c, &c.credential)) {
                    Some((_, Credential::ApiKey(secret))) => resolved.push(Resolved {
                        secret,
                        default_prefix: "",
                    }),
                    Some((c, Credential::OAuth2(_))) => {
                        // Token fetching is not built yet: fail closed, never forward bare.
                        unavailable = Some(c.name.clone());
                        break;
                    }
                    None => unavailable = Some(String::new()),
                }
            }
            match (unavailable, route) {
                (Some(connection), _) => {
                    Metrics::inc(metrics.unavailable);
                    (
                        Verdict::Refuse(RefusalKind::Unavailable { connection }),
                        label,
                        "credential_unavailable",
                    )
                }
                (None, Some(r)) => {
                    edits.extend(inject::plan(r, &resolved, &sent, full_path));
                    Metrics::inc(metrics.allowed);
                    for &ci in picks {
                        metrics.injected(ci);
                    }
                    (Verdict::Forward, label, "allowed")
                }
                (None, None) => (Verdict::Forward, label, "allowed"),
            }
        }
    };

    if matches!(verdict, Verdict::Forward) {
        apply(&edits)?;
    }
    set_filter_state(
        route_label.as_deref(),
        connection_label.as_deref(),
        decision_label,
    );
    if host::log_enabled(Level::Debug) {
        host::log(
            Level::Debug,
            &format!(
                "route={} connection={} decision={}",
                route_label.as_deref().unwrap_or("-"),
                connection_label.as_deref().unwrap_or("-"),
                decision_label
            ),
        );
    }
    Ok(Outcome {
        verdict,
        route: route_label,
    })
}

fn text(v: Option<&[u8]>) -> &str {
    v.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("")
}

fn apply(edits: &[Edit]) -> Result<(), HostError> {
    for edit in edits {
        match edit {
            Edit::Remove(name) => host::remove_header(Map::RequestHeaders, name)?,
            Edit::Set { name, value } => {
                host::add_header(Map::RequestHeaders, name, value.expose().as_bytes())?
            }
            Edit::SetPath(path) => host::replace_header(Map::RequestHeaders, ":path", path)?,
        }
    }
    Ok(())
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
fn read_identity(
    config: &Config,
    headers: &host::HeaderPairs,
) -> Result<Option<Identity>, IdentityError> {
    match &config.claims.source {
        ClaimsSource::None => Ok(None),
        ClaimsSource::Header { name } => match headers.get(name) {
            None => Ok(None),
            Some(v) => Identity::from_header(v, &config.claim_paths)
                .map(Some)
                .map_err(IdentityError::Malformed),
        },
        ClaimsSource::JwtMetadata { key } => {
            let mut values = Vec::with_capacity(config.claim_paths.len());
            let mut path: Vec<&str> = vec!["metadata", "filter_metadata", JWT_AUTHN, key];
            for claim in &config.claim_paths {
                path.truncate(4);
                path.extend(claim.segments.iter().map(String::as_str));
                values.push(host::property(&path)?.and_then(|b| decode_property(&b)));
            }
            let has_claims = values.iter().any(Option::is_some) || {
                path.truncate(4);
                host::property(&path)?.is_some()
            };
            Ok(has_claims.then(|| Identity::new(values)))
        }
    }
}
