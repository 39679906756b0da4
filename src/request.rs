//! One request's decision, as data: what the glue read from the host goes in
//! (the request headers, and on demand the Envoy route name and `jwt_authn`'s
//! metadata), and out comes either an [`Outcome`] (the header edits, the local
//! reply if any, and one [`Verdict`] that knows its label, status and details)
//! or the credentials still [`Needed`]. When they are resolved, now or after a
//! wait, [`finish`] (or [`unavailable`], [`paused_limit`]) gives the outcome:
//! the same code for both. The glue applies an outcome in one place and
//! decides nothing itself.
//!
//! Order of the checks (SPEC "routes" and v1.2 "Tokens"): discovery; the route,
//! with the path read as every upstream reads it (else 400); the claims header
//! and every cluster header are removed whatever happens next; the caller's
//! claims (malformed: 401); the access policy and the connection per inject
//! entry (401/403, or unmatched allow/deny); for token exchange, the subject
//! token must be exactly the JWT `jwt_authn` verified (else 401).

use crate::claims::Identity;
use crate::config::{
    ClaimsSource, Config, Connection, Consent, Credential, Grant, Provider, ProviderKind,
};
use crate::consent::{self, Endpoint, State};
use crate::credential::exchange::verified_subject;
use crate::discovery::Index;
use crate::inject::{self, Edit, Resolved, Sent};
use crate::policy::{admits, decide, Decision, Denial};
use crate::response::{self, reply, LocalReply, Refusal};
use crate::router::RequestInfo;
use crate::secret::Secret;

pub use crate::proxy::HostFault;

/// What the request path reads from the host only when it needs it.
pub trait Lazy {
    /// The Envoy route's `name` (`xds.route_name`).
    fn route_name(&mut self) -> Result<Option<Vec<u8>>, HostFault>;
    /// The request's dynamic metadata (serialized `Metadata`).
    fn metadata(&mut self) -> Result<Option<Vec<u8>>, HostFault>;
    /// The clock, ms since the epoch (consent states expire).
    fn now_ms(&mut self) -> Result<u64, HostFault>;
    /// 64 unpredictable bits (a consent state's nonce).
    fn random(&mut self) -> u64;
}

/// How a request ended: each knows its access-log label, its counter and, for
/// those latchkey answers itself, its status and response details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded with its credentials.
    Allowed,
    /// No route matched; `unmatched: allow` forwards it as it is.
    UnmatchedAllowed,
    /// No route matched; `unmatched: deny`: 403.
    DeniedUnmatched,
    /// Claims needed and none: 401.
    DeniedUnauthenticated,
    /// The caller's claims don't admit it: 403.
    DeniedForbidden,
    /// Malformed claims: 401.
    DeniedBadClaims,
    /// The path reads differently to different upstreams, or is malformed: 400.
    DeniedBadPath,
    /// Token exchange: the bearer token isn't the JWT `jwt_authn` verified: 401.
    DeniedBadSubject,
    /// No valid credential in time: 503.
    Unavailable,
    /// This worker already holds `max_paused_requests` paused: 503 at once.
    PausedLimit,
    /// A host call failed: 500.
    Internal,
    /// The discovery document: 200.
    Discovery,
    /// authorization_code without consent: 403 with the login URL.
    ConsentRequired,
    /// A consent login: 302 to the provider.
    ConsentLogin,
    /// A consent callback stored its refresh token (302 to `return_to`, or 200).
    ConsentConnected,
    /// A consent endpoint refused the request (JSON with a reason).
    ConsentFailed,
    /// A consent was taken back: 200.
    ConsentDisconnected,
}

impl Verdict {
    /// The access-log label (`wasm.latchkey.decision`) and the local reply's
    /// response details (`latchkey_<label>`, in `%RESPONSE_CODE_DETAILS%`).
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::UnmatchedAllowed => "unmatched_allowed",
            Verdict::DeniedUnmatched => "denied_unmatched",
            Verdict::DeniedUnauthenticated => "denied_unauthenticated",
            Verdict::DeniedForbidden => "denied_forbidden",
            Verdict::DeniedBadClaims => "denied_bad_claims",
            Verdict::DeniedBadPath => "denied_bad_path",
            Verdict::DeniedBadSubject => "denied_bad_subject",
            Verdict::Unavailable => "credential_unavailable",
            Verdict::PausedLimit => "paused_limit",
            Verdict::Internal => "internal_error",
            Verdict::Discovery => "discovery",
            Verdict::ConsentRequired => "consent_required",
            Verdict::ConsentLogin => "consent_login",
            Verdict::ConsentConnected => "consent_connected",
            Verdict::ConsentFailed => "consent_failed",
            Verdict::ConsentDisconnected => "consent_disconnected",
        }
    }

    /// The response details of latchkey's own reply.
    pub fn details(self) -> &'static str {
        match self {
            Verdict::Allowed => "latchkey_allowed",
            Verdict::UnmatchedAllowed => "latchkey_unmatched_allowed",
            Verdict::DeniedUnmatched => "latchkey_denied_unmatched",
            Verdict::DeniedUnauthenticated => "latchkey_denied_unauthenticated",
            Verdict::DeniedForbidden => "latchkey_denied_forbidden",
            Verdict::DeniedBadClaims => "latchkey_denied_bad_claims",
            Verdict::DeniedBadPath => "latchkey_denied_bad_path",
            Verdict::DeniedBadSubject => "latchkey_denied_bad_subject",
            Verdict::Unavailable => "latchkey_credential_unavailable",
            Verdict::PausedLimit => "latchkey_paused_limit",
            Verdict::Internal => "latchkey_internal_error",
            Verdict::Discovery => "latchkey_discovery",
            Verdict::ConsentRequired => "latchkey_consent_required",
            Verdict::ConsentLogin => "latchkey_consent_login",
            Verdict::ConsentConnected => "latchkey_consent_connected",
            Verdict::ConsentFailed => "latchkey_consent_failed",
            Verdict::ConsentDisconnected => "latchkey_consent_disconnected",
        }
    }

    /// Whether the request goes on upstream.
    pub fn forwards(self) -> bool {
        matches!(self, Verdict::Allowed | Verdict::UnmatchedAllowed)
    }
}

/// Everything the glue does to end (or forward) a request.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Request header changes, applied before forwarding (and before a reply:
    /// the claims and cluster headers go in every case).
    pub edits: Vec<Edit>,
    /// latchkey's own answer (`None`: forward).
    pub reply: Option<LocalReply>,
    /// The route (index) and the connection per inject entry, for logs and counters.
    pub route: Option<usize>,
    pub picks: Vec<usize>,
    /// Why, for the debug log (no secret, no header value).
    pub why: Option<String>,
    /// A consent endpoint's refusal: its reason, counted by the glue.
    pub consent_reason: Option<&'static str>,
}

impl Outcome {
    fn new(verdict: Verdict, route: Option<usize>, edits: Vec<Edit>) -> Outcome {
        Outcome {
            verdict,
            edits,
            reply: None,
            route,
            picks: Vec::new(),
            why: None,
            consent_reason: None,
        }
    }

    /// A refusal on `route` (its name goes in the body).
    fn refused(
        verdict: Verdict,
        config: &Config,
        route: Option<usize>,
        edits: Vec<Edit>,
    ) -> Outcome {
        let refusal = match verdict {
            Verdict::DeniedUnmatched | Verdict::DeniedForbidden => {
                Refusal::Denied(Denial::Forbidden)
            }
            Verdict::Internal => Refusal::Internal,
            _ => Refusal::Denied(Denial::Unauthenticated),
        };
        let name = route.and_then(|r| config.route(r)).map(|r| r.name.as_str());
        Outcome {
            reply: Some(reply(refusal, name)),
            ..Outcome::new(verdict, route, edits)
        }
    }

    fn because(mut self, why: impl Into<String>) -> Outcome {
        self.why = Some(why.into());
        self
    }
}

/// A request allowed on a route whose credentials must be resolved first.
#[derive(Debug)]
pub struct Needed {
    pub route: usize,
    /// The connection serving each inject entry.
    pub picks: Vec<usize>,
    /// Token exchange: the verified JWT (the subject token).
    pub subject: Option<Secret>,
    /// Per-user consent: who the caller is ([`consent::caller_key`]).
    pub caller: Option<Secret>,
    /// Edits decided already (claims and cluster headers removed).
    pub edits: Vec<Edit>,
}

/// What [`start`] found.
#[derive(Debug)]
pub enum Step {
    Done(Outcome),
    Needs(Needed),
    /// A consent callback or disconnect: calls to make before answering.
    Consent(Task),
}

/// The pseudo-headers the request path reads (the first of each), found in one
/// pass over the headers.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pseudo<'a> {
    path: Option<&'a [u8]>,
    method: Option<&'a [u8]>,
    authority: Option<&'a [u8]>,
}

impl<'a> Pseudo<'a> {
    fn of(headers: &[(&str, &'a [u8])]) -> Self {
        let mut p = Pseudo::default();
        for &(k, v) in headers {
            let slot = match k {
                ":path" => &mut p.path,
                ":method" => &mut p.method,
                ":authority" => &mut p.authority,
                _ => continue,
            };
            slot.get_or_insert(v);
            if p.path.is_some() && p.method.is_some() && p.authority.is_some() {
                break;
            }
        }
        p
    }
}

/// The request's first look: from its headers (`(name, value)` as Envoy holds
/// them), and on demand the route name and metadata.
pub fn start<'h>(
    config: &Config,
    discovery: Option<&Index>,
    headers: &[(&str, &'h [u8])],
    lazy: &mut impl Lazy,
) -> Result<Step, HostFault> {
    let pseudo = Pseudo::of(headers);
    let full_path = pseudo.path.unwrap_or(b"/");
    let path_only = full_path.split(|&b| b == b'?').next().unwrap_or_default();
    let text = |v: Option<&'h [u8]>| -> &'h str { v.and_then(crate::text::utf8).unwrap_or("") };
    let method = text(pseudo.method);
    if let (Some(dp), Some(index)) = (&config.discovery, discovery) {
        if (method == "GET" || method == "HEAD") && path_only == dp.as_bytes() {
            return answer_discovery(config, index, headers, lazy);
        }
    }
    if let Some(c) = &config.consent {
        if let Some(e) = consent::endpoint(config, c, method, path_only) {
            let query = full_path
                .splitn(2, |&b| b == b'?')
                .nth(1)
                .unwrap_or_default();
            return consent_endpoint(config, c, e, query, headers, lazy);
        }
    }
    let route_name = if config.router.needs_route_name() {
        lazy.route_name()?.and_then(|v| String::from_utf8(v).ok())
    } else {
        None
    };
    let info = RequestInfo {
        route_name: route_name.as_deref(),
        host: text(pseudo.authority),
        path: "",
        method,
    };
    // The path as every kind of upstream reads it: one route for all, or 400.
    let route_index = match config.router.find_path(&info, path_only) {
        Ok(r) => r,
        Err(refusal) => {
            let reason = refusal.reason();
            let outcome = Outcome {
                reply: Some(reply(Refusal::BadPath { reason }, None)),
                ..Outcome::new(Verdict::DeniedBadPath, None, Vec::new())
            };
            return Ok(Step::Done(outcome.because(format!("400: {reason}"))));
        }
    };
    let route = route_index.and_then(|i| config.route(i));

    // The claims header never reaches the upstream, whatever happens next; nor
    // does a client-sent cluster header: no client picks a cluster (or a client
    // certificate) itself.
    let sent = || headers.iter().map(|(k, _)| *k);
    let mut edits = Vec::new();
    if let ClaimsSource::Header { name } = &config.claims.source {
        inject::remove_all(name, sent(), &mut edits);
    }
    for name in &config.cluster_headers {
        inject::remove_all(name, sent(), &mut edits);
    }

    let identity = match route {
        // No route, or only public policies on it: who the caller is changes nothing.
        None => None,
        Some(r) if !r.needs_claims => None,
        Some(r) => match read_identity(config, headers, r.binds_caller, lazy)? {
            Ok(identity) => identity,
            Err(e) => {
                let outcome =
                    Outcome::refused(Verdict::DeniedBadClaims, config, route_index, edits);
                return Ok(Step::Done(outcome.because(format!("401: {e}"))));
            }
        },
    };
    if let Some((route, f)) = route_index.zip(route.and_then(|r| r.fixed.as_ref())) {
        // Decided and served at load, the same for every request on this route:
        // no decision to make, nothing for the broker to look up.
        let needed = Needed {
            route,
            picks: f.picks.clone(),
            subject: None,
            caller: None,
            edits,
        };
        let values = f.values.iter().map(|secret| Resolved {
            secret,
            default_prefix: "",
            with_default: None,
        });
        return Ok(Step::Done(finish(
            config, needed, values, headers, full_path,
        )));
    }
    let (route_i, picks) = match decide(config, route_index, identity.as_ref()) {
        Decision::UnmatchedAllowed => {
            return Ok(Step::Done(Outcome::new(
                Verdict::UnmatchedAllowed,
                None,
                edits,
            )))
        }
        Decision::UnmatchedDenied => {
            return Ok(Step::Done(Outcome::refused(
                Verdict::DeniedUnmatched,
                config,
                None,
                edits,
            )))
        }
        Decision::Denied { denial, .. } => {
            let verdict = match denial {
                Denial::Unauthenticated => Verdict::DeniedUnauthenticated,
                Denial::Forbidden => Verdict::DeniedForbidden,
            };
            return Ok(Step::Done(Outcome::refused(
                verdict,
                config,
                route_index,
                edits,
            )));
        }
        Decision::Allowed { route, picks } => (route, picks),
    };
    // Token exchange sends the caller's own bearer token as the subject token:
    // exactly the JWT jwt_authn verified, or the caller gets 401.
    // Both asked of the picks only on routes that have such a connection (known at load).
    let allowed = config.route(route_i);
    let binds = allowed.is_some_and(|r| r.binds_caller);
    let subject = if binds && picks.iter().any(|&c| is_exchange(config, c)) {
        let values: Vec<&[u8]> = headers
            .iter()
            .filter(|(k, _)| *k == "authorization")
            .map(|(_, v)| *v)
            .collect();
        match verified_subject(&values, identity.as_ref().and_then(Identity::binding)) {
            Ok(s) => Some(s),
            Err(e) => {
                let outcome =
                    Outcome::refused(Verdict::DeniedBadSubject, config, Some(route_i), edits);
                return Ok(Step::Done(outcome.because(format!("401: {e}"))));
            }
        }
    } else {
        None
    };
    let per_user = allowed.is_some_and(|r| r.per_user)
        && picks
            .iter()
            .any(|&c| config.connection(c).is_some_and(consent::is_per_user));
    let caller = match per_user.then(|| identity.as_ref().and_then(|id| caller_of(config, id))) {
        None => None,
        Some(Some(h)) => Some(Secret::new(h)),
        // A per-user connection needs to know who the caller is.
        Some(None) => {
            let outcome =
                Outcome::refused(Verdict::DeniedUnauthenticated, config, Some(route_i), edits);
            return Ok(Step::Done(
                outcome.because("401: no subject to key a per-user consent"),
            ));
        }
    };
    Ok(Step::Needs(Needed {
        route: route_i,
        picks,
        subject,
        caller,
        edits,
    }))
}

/// The caller's [`consent::caller_key`]: their token's `iss` and their subject.
/// With a per-user connection configured, `iss` is one of the claims read per
/// request; otherwise (consent endpoints of shared connections) the verified
/// token's binding has it.
fn caller_of(config: &Config, id: &Identity) -> Option<String> {
    let sub = id.subject().filter(|s| !s.is_empty())?;
    let iss = match config.issuer_claim {
        Some(i) => match id.claim(i) {
            Some(crate::claims::ClaimValue::Scalar(s)) => s.as_str(),
            _ => "",
        },
        None => id.binding().and_then(|b| b.issuer()).unwrap_or(""),
    };
    consent::caller_key(iss, sub)
}

/// No consent for `connection`: 403 with where to sign in.
pub fn consent_required(config: &Config, needed: Needed, connection: usize) -> Outcome {
    let conn = config.connection(connection);
    let name = conn.map_or("", |c| c.name.as_str());
    let login = match (&config.consent, conn) {
        (Some(c), Some(conn)) => consent::login_path(c, conn),
        _ => String::new(),
    };
    let route_name = config.route(needed.route).map(|r| r.name.as_str());
    let refusal = Refusal::ConsentRequired {
        connection: name,
        login_url: &login,
    };
    Outcome {
        reply: Some(reply(refusal, route_name)),
        picks: needed.picks,
        ..Outcome::new(Verdict::ConsentRequired, Some(needed.route), needed.edits)
    }
}

/// A consent callback or disconnect, once its calls are made: what to do.
#[derive(Debug)]
pub struct Task {
    pub connection: usize,
    /// [`consent::caller_hash`], or [`consent::SHARED`] for a shared connection.
    pub record: String,
    /// Per-user: the caller's [`consent::caller_key`] (their cache entry).
    pub caller: Option<Secret>,
    pub kind: TaskKind,
}

#[derive(Debug)]
pub enum TaskKind {
    /// Redeem the code (with its PKCE verifier) and store the refresh token.
    Connect {
        code: Secret,
        verifier: Secret,
        return_to: Option<String>,
        /// The state's nonce and expiry: a state is accepted once per proxy.
        nonce: String,
        expires_ms: u64,
    },
    /// Remove the record, and revoke its refresh token at the provider.
    Disconnect,
    /// Discovery: read each connection's record (`items`: connection, record,
    /// caller key) for its status, then answer `body` with them.
    Discover {
        body: String,
        items: Vec<(usize, String, Option<Secret>)>,
        statuses: Vec<(usize, &'static str)>,
    },
}

/// A consent endpoint failed: `status` with `{"error": "consent_failed", "reason": …}`.
pub fn consent_failed(status: u32, reason: &'static str, connection: Option<&str>) -> Outcome {
    let body = match connection {
        Some(c) => {
            serde_json::json!({ "error": "consent_failed", "reason": reason, "connection": c })
        }
        None => serde_json::json!({ "error": "consent_failed", "reason": reason }),
    };
    let mut r = response::json(status, body);
    if status == 503 {
        r.headers.push(("retry-after", "1".to_string()));
    }
    Outcome {
        reply: Some(r),
        consent_reason: Some(reason),
        ..Outcome::new(Verdict::ConsentFailed, None, Vec::new())
    }
    .because(format!("consent: {status} {reason}"))
}

/// A callback whose code was redeemed but whose refresh token couldn't be kept:
/// sending the callback again can't help (the code is spent), a new login can.
/// As [`consent_failed`], with `"retry": "login"` and no `retry-after`.
pub fn consent_lost(status: u32, reason: &'static str, connection: &str) -> Outcome {
    let body = serde_json::json!({
        "error": "consent_failed", "reason": reason, "connection": connection, "retry": "login"
    });
    Outcome {
        reply: Some(response::json(status, body)),
        consent_reason: Some(reason),
        ..Outcome::new(Verdict::ConsentFailed, None, Vec::new())
    }
    .because(format!("consent: {status} {reason}, code spent"))
}

/// A consent callback stored its refresh token: back to `return_to`, or a small JSON answer.
pub fn consent_connected(connection: &str, return_to: Option<String>) -> Outcome {
    let r = match return_to {
        Some(url) => response::redirect(url),
        None => response::json(200, serde_json::json!({ "connected": connection })),
    };
    Outcome {
        reply: Some(r),
        ..Outcome::new(Verdict::ConsentConnected, None, Vec::new())
    }
}

/// A consent was taken back (`revoked`: at the provider too).
pub fn consent_disconnected(connection: &str, revoked: bool) -> Outcome {
    let body = serde_json::json!({ "disconnected": connection, "revoked": revoked });
    Outcome {
        reply: Some(response::json(200, body)),
        ..Outcome::new(Verdict::ConsentDisconnected, None, Vec::new())
    }
}

/// A request to a consent endpoint (SPEC v1.2): a login is answered at once;
/// a callback or disconnect becomes a [`Task`] once it is checked.
fn consent_endpoint(
    config: &Config,
    c: &Consent,
    endpoint: Endpoint,
    query: &[u8],
    headers: &[(&str, &[u8])],
    lazy: &mut impl Lazy,
) -> Result<Step, HostFault> {
    let done = |o: Outcome| Ok(Step::Done(o));
    let connection_of = |i: usize| config.connection(i);
    let i = match endpoint {
        Endpoint::Unknown => return done(consent_failed(404, "not_found", None)),
        Endpoint::Login(i) | Endpoint::Disconnect(i) => Some(i),
        Endpoint::Callback => None,
    };
    let identity = match read_identity(config, headers, true, lazy)? {
        Ok(id) => id,
        Err(e) => {
            return done(
                Outcome::refused(Verdict::DeniedBadClaims, config, None, Vec::new())
                    .because(format!("401: {e}")),
            )
        }
    };
    let Some(key) = identity.as_ref().and_then(|id| caller_of(config, id)) else {
        return done(
            Outcome::refused(Verdict::DeniedUnauthenticated, config, None, Vec::new())
                .because("401: a consent endpoint needs a signed-in caller"),
        );
    };
    // Who may consent: the connection's access (per-user) or its consent access (shared).
    let may_consent = |conn: &Connection| match &conn.credential {
        Credential::OAuth2(o) => match &o.grant {
            Grant::AuthorizationCode { per_user: true, .. } => conn
                .access
                .as_ref()
                .is_some_and(|a| admits(a, identity.as_ref())),
            Grant::AuthorizationCode {
                consent: Some(a), ..
            } => admits(a, identity.as_ref()),
            _ => false,
        },
        _ => false,
    };
    let caller = consent::hash_of_key(&key);
    let record_of = |conn: &Connection| {
        if consent::is_per_user(conn) {
            caller.clone()
        } else {
            consent::SHARED.to_string()
        }
    };
    let caller_of_conn =
        |conn: &Connection| consent::is_per_user(conn).then(|| Secret::new(key.clone()));
    if let Some(i) = i {
        let Some(conn) = connection_of(i) else {
            return done(consent_failed(404, "not_found", None));
        };
        if !may_consent(conn) {
            return done(
                Outcome::refused(Verdict::DeniedForbidden, config, None, Vec::new()).because(
                    format!("403: {} may not consent to {}", "caller", conn.name),
                ),
            );
        }
        if matches!(endpoint, Endpoint::Disconnect(_)) {
            return Ok(Step::Consent(Task {
                connection: i,
                record: record_of(conn),
                caller: caller_of_conn(conn),
                kind: TaskKind::Disconnect,
            }));
        }
        // The login: a signed state, and the 302 to the provider.
        let return_to = match login_return_to(query) {
            Ok(None) => None,
            Ok(Some(r)) => match consent::allowed_return_to(&c.return_to, &r) {
                Some(r) => Some(r),
                None => return done(consent_failed(400, "return_to", Some(&conn.name))),
            },
            Err(()) => return done(consent_failed(400, "bad_request", Some(&conn.name))),
        };
        let now = lazy.now_ms()?;
        let state = State {
            connection: conn.name.clone(),
            caller,
            nonce: format!("{:016x}{:016x}", lazy.random(), lazy.random()),
            expires_ms: now + consent::STATE_TTL_MS,
            return_to,
        };
        let signed = consent::sign_state(&c.state_key, &state);
        let Some(location) = consent::login_location(config, c, conn, &state, &signed) else {
            return done(internal(config, None));
        };
        return done(Outcome {
            reply: Some(response::redirect(location)),
            picks: vec![i],
            ..Outcome::new(Verdict::ConsentLogin, None, Vec::new())
        });
    }
    // The callback.
    let Some(params) = consent::callback_params(query) else {
        return done(consent_failed(400, "bad_request", None));
    };
    let Some(state_text) = params.state.as_deref() else {
        return done(consent_failed(400, "bad_request", None));
    };
    let now = lazy.now_ms()?;
    let state = match consent::verify_state(&c.state_key, state_text, now) {
        Ok(s) => s,
        Err(e) => return done(consent_failed(400, e.reason(), None)),
    };
    let Some((i, conn)) = config
        .connections
        .iter()
        .enumerate()
        .find(|(_, k)| k.name == state.connection && consent::is_delegated(k))
    else {
        return done(consent_failed(400, "state_invalid", None));
    };
    // Session binding: the caller finishing the login is the one who started it.
    if state.caller != caller {
        return done(consent_failed(403, "wrong_caller", Some(&conn.name)));
    }
    if !may_consent(conn) {
        return done(consent_failed(403, "wrong_caller", Some(&conn.name)));
    }
    if let Some(Provider {
        kind: ProviderKind::OAuth2(p),
        ..
    }) = config.provider_of(conn)
    {
        if let Some(issuer) = &p.issuer {
            if params.iss.as_deref() != Some(issuer.as_str()) {
                return done(consent_failed(400, "wrong_issuer", Some(&conn.name)));
            }
        }
    }
    if let Some(e) = params.error.as_deref() {
        let reason = if e == "access_denied" {
            "access_denied"
        } else {
            "bad_request"
        };
        return done(consent_failed(400, reason, Some(&conn.name)));
    }
    let Some(code) = params.code.filter(|c| !c.expose().is_empty()) else {
        return done(consent_failed(400, "bad_request", Some(&conn.name)));
    };
    Ok(Step::Consent(Task {
        connection: i,
        record: record_of(conn),
        caller: caller_of_conn(conn),
        kind: TaskKind::Connect {
            code,
            verifier: consent::pkce_verifier(&c.state_key, &state.nonce),
            return_to: state.return_to,
            nonce: state.nonce,
            expires_ms: state.expires_ms,
        },
    }))
}

/// A login's `return_to` (at most once), or `Err` when it is repeated.
fn login_return_to(query: &[u8]) -> Result<Option<String>, ()> {
    let mut found = None;
    for (k, v) in url::form_urlencoded::parse(query) {
        if k == "return_to" {
            if found.is_some() {
                return Err(());
            }
            found = Some(v.into_owned());
        }
    }
    Ok(found)
}

/// The outcome once every credential is resolved (one per inject entry, in
/// order): the route's injections and strips after the edits decided before.
/// `sent` are the header names the client sent, `path` its `:path`.
pub fn finish<'a, S: Sent + ?Sized>(
    config: &Config,
    needed: Needed,
    resolved: impl IntoIterator<Item = Resolved<'a>>,
    sent: &S,
    path: &[u8],
) -> Outcome {
    let Needed {
        route,
        picks,
        edits,
        ..
    } = needed;
    let Some(r) = config.route(route) else {
        return Outcome::refused(Verdict::Internal, config, None, edits);
    };
    let mut edits = edits;
    inject::plan_into(r, resolved, sent, path, &mut edits);
    Outcome {
        picks,
        ..Outcome::new(Verdict::Allowed, Some(route), edits)
    }
}

/// No valid credential of `connection` in time: 503 with `retry-after`.
pub fn unavailable(
    config: &Config,
    needed: Needed,
    connection: usize,
    retry_after_ms: u64,
) -> Outcome {
    refuse_503(
        config,
        needed,
        connection,
        retry_after_ms,
        Verdict::Unavailable,
    )
}

/// This worker holds `max_paused_requests` paused already: 503 at once, naming
/// the first connection the request would have waited for.
pub fn paused_limit(config: &Config, needed: Needed) -> Outcome {
    let connection = needed.picks.first().copied().unwrap_or(usize::MAX);
    refuse_503(config, needed, connection, 1000, Verdict::PausedLimit)
}

fn refuse_503(
    config: &Config,
    needed: Needed,
    connection: usize,
    retry_after_ms: u64,
    verdict: Verdict,
) -> Outcome {
    let name = config
        .connection(connection)
        .map_or("", |c| c.name.as_str());
    let route_name = config.route(needed.route).map(|r| r.name.as_str());
    let refusal = Refusal::Unavailable {
        connection: name,
        retry_after_s: retry_after_ms.div_ceil(1000),
    };
    Outcome {
        reply: Some(reply(refusal, route_name)),
        picks: needed.picks,
        ..Outcome::new(verdict, Some(needed.route), needed.edits)
    }
}

/// A host call failed on the request path: 500, fail closed.
pub fn internal(config: &Config, route: Option<usize>) -> Outcome {
    Outcome::refused(Verdict::Internal, config, route, Vec::new())
}

/// The discovery document (SPEC v1.1). With authorization_code connections the
/// caller may use, their consent status is read from the token store first (a
/// [`TaskKind::Discover`]), then added as `"connections"`.
fn answer_discovery(
    config: &Config,
    index: &Index,
    headers: &[(&str, &[u8])],
    lazy: &mut impl Lazy,
) -> Result<Step, HostFault> {
    let bind = config.consent.is_some() && config.issuer_claim.is_none();
    let identity = match read_identity(config, headers, bind, lazy)? {
        Ok(id) => id,
        Err(e) => {
            return Ok(Step::Done(
                Outcome::refused(Verdict::DeniedBadClaims, config, None, Vec::new())
                    .because(format!("401: {e}")),
            ))
        }
    };
    let body = index.answer(config, identity.as_ref());
    let key = identity.as_ref().and_then(|id| caller_of(config, id));
    let items: Vec<(usize, String, Option<Secret>)> = match &key {
        None => Vec::new(),
        Some(key) => config
            .connections
            .iter()
            .enumerate()
            .filter(|(_, c)| consent::is_delegated(c))
            .filter(|(_, c)| {
                c.access
                    .as_ref()
                    .is_some_and(|a| admits(a, identity.as_ref()))
            })
            .map(|(i, c)| {
                if consent::is_per_user(c) {
                    (i, consent::hash_of_key(key), Some(Secret::new(key.clone())))
                } else {
                    (i, consent::SHARED.to_string(), None)
                }
            })
            .collect(),
    };
    let Some((connection, record, caller)) = items.first().cloned() else {
        return Ok(Step::Done(discovery_outcome(body)));
    };
    Ok(Step::Consent(Task {
        connection,
        record,
        caller,
        kind: TaskKind::Discover {
            body,
            items,
            statuses: Vec::new(),
        },
    }))
}

/// The discovery answer: `body`, as [`Index::answer`] (perhaps with consent statuses) wrote it.
pub fn discovery_outcome(body: String) -> Outcome {
    let reply = LocalReply {
        status: 200,
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
            ("vary", "authorization".to_string()),
        ],
        body,
    };
    Outcome {
        reply: Some(reply),
        ..Outcome::new(Verdict::Discovery, None, Vec::new())
    }
}

/// Discovery with consent statuses: each `(connection, status)` added as
/// `"connections": [{"connection", "status"[, "login_url"]}]` to the document.
pub fn discovery_with_statuses(config: &Config, body: &str, statuses: &[(usize, &str)]) -> Outcome {
    let list: Vec<serde_json::Value> = statuses
        .iter()
        .filter_map(|&(i, status)| {
            let c = config.connection(i)?;
            let mut v = serde_json::json!({ "connection": c.name, "status": status });
            if status == "consent_required" {
                if let (Some(consent), Some(obj)) = (&config.consent, v.as_object_mut()) {
                    obj.insert("login_url".into(), consent::login_path(consent, c).into());
                }
            }
            Some(v)
        })
        .collect();
    // The document is one JSON object: the list goes before its closing brace.
    let mut out = body.trim_end().to_string();
    if out.ends_with('}') {
        out.pop();
        out.push_str(",\"connections\":");
        out.push_str(&serde_json::Value::from(list).to_string());
        out.push('}');
    }
    discovery_outcome(out)
}

fn is_exchange(config: &Config, connection: usize) -> bool {
    config.connection(connection).is_some_and(|c| {
        matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }))
    })
}

/// The caller's claims (`Ok(None)`: it brought none); the inner error is a
/// malformed claims source (401). With `bind`, the identity keeps the verified
/// token's binding claims.
fn read_identity(
    config: &Config,
    headers: &[(&str, &[u8])],
    bind: bool,
    lazy: &mut impl Lazy,
) -> Result<Result<Option<Identity>, crate::claims::ClaimsError>, HostFault> {
    Ok(match &config.claims.source {
        ClaimsSource::None => Ok(None),
        ClaimsSource::Header { name } => {
            match headers.iter().find(|(k, _)| k == name).map(|(_, v)| *v) {
                None => Ok(None),
                Some(v) => Identity::from_header(v, &config.claim_paths, bind).map(Some),
            }
        }
        ClaimsSource::JwtMetadata { keys } => match lazy.metadata()? {
            None => Ok(None),
            Some(md) => {
                let mut found = Ok(None);
                for key in keys {
                    found = Identity::from_metadata(&md, key, &config.claim_paths, bind);
                    if !matches!(found, Ok(None)) {
                        break;
                    }
                }
                found
            }
        },
    })
}

#[cfg(test)]
mod tests;
