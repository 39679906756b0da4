//! The stats latchkey defines, by name, and their ids (as `wasmcustom.<name>`
//! in Envoy's `/stats`, and without that prefix, dots as underscores, in
//! Prometheus output). The same name in every VM is one stat, so counts are
//! proxy-wide. Defining and counting go through [`Proxy`].

use std::cell::Cell;

use crate::config::Config;
use crate::credential::store::StoreError;
use crate::credential::FetchError;
use crate::proxy::{Level, MetricKind, Proxy};

/// Token counters of an oauth2 connection: `latchkey.connection.<name>.token.<stat>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStat {
    Requests,
    Success,
    CacheHit,
    Wait,
    BackoffRejected,
    DroppedOn401,
    Ignored401,
}

impl TokenStat {
    const ALL: [TokenStat; 7] = [
        TokenStat::Requests,
        TokenStat::Success,
        TokenStat::CacheHit,
        TokenStat::Wait,
        TokenStat::BackoffRejected,
        TokenStat::DroppedOn401,
        TokenStat::Ignored401,
    ];

    fn name(self) -> &'static str {
        match self {
            TokenStat::Requests => "requests",
            TokenStat::Success => "success",
            TokenStat::CacheHit => "cache_hit",
            TokenStat::Wait => "wait",
            TokenStat::BackoffRejected => "backoff_rejected",
            TokenStat::DroppedOn401 => "dropped_on_401",
            TokenStat::Ignored401 => "ignored_401",
        }
    }
}

/// A counter defined when first counted.
#[derive(Debug)]
struct Lazy {
    name: String,
    /// `None`: not defined yet; `Some(None)`: the host refused.
    id: Cell<Option<Option<u32>>>,
}

impl Lazy {
    fn new(name: String) -> Self {
        Lazy {
            name,
            id: Cell::new(None),
        }
    }

    fn id(&self, p: &impl Proxy) -> Option<u32> {
        match self.id.get() {
            Some(id) => id,
            None => {
                let id = p.define(MetricKind::Counter, &self.name);
                self.id.set(Some(id));
                id
            }
        }
    }
}

/// Stat ids; `None` where the host refused to define one (then not counted).
#[derive(Debug, Default)]
pub struct Stats {
    pub allowed: Option<u32>,
    pub unmatched: Option<u32>,
    pub denied_unauthenticated: Option<u32>,
    pub denied_forbidden: Option<u32>,
    pub denied_unmatched: Option<u32>,
    pub denied_bad_claims: Option<u32>,
    pub denied_bad_path: Option<u32>,
    /// Token exchange refused a subject token that isn't the verified JWT.
    pub denied_bad_subject: Option<u32>,
    pub discovery: Option<u32>,
    pub unavailable: Option<u32>,
    /// Refused at once: this worker already held `max_paused_requests` paused.
    pub paused_limit: Option<u32>,
    pub internal_errors: Option<u32>,
    /// authorization_code without consent: 403 with the login URL.
    pub consent_required: Option<u32>,
    /// Per connection index: `injected`, defined on first use (defining 10,000
    /// stats at load would dominate the load time of a large configuration).
    injected: Vec<Lazy>,
    /// Per connection index: token counters (indexed by `TokenStat`), failures
    /// (aligned with `FetchError::KINDS`), state gauge. Empty for API-key connections.
    tokens: Vec<Vec<Option<u32>>>,
    failures: Vec<Vec<Option<u32>>>,
    state: Vec<Option<u32>>,
    /// Per store index: `latchkey.secret.<name>.*`.
    stores: Vec<StoreStats>,
    /// `latchkey.consent.*` (indexed by `ConsentStat`), with a `consent` section.
    consent: Vec<Option<u32>>,
    /// Aligned with [`CONSENT_FAILURES`].
    consent_failures: Vec<Option<u32>>,
    /// Per provider index (private_key_jwt only): `signing.requests`, then
    /// `signing.failure.<kind>` aligned with `SignError::KINDS` (and "identity",
    /// "login": no Key Vault identity token, no Transit AppRole login).
    signing: Vec<Vec<Option<u32>>>,
}

/// What can stop a signature: the key service's answer, or no identity token for it.
const SIGNING_FAILURES: [&str; 7] = [
    "connect",
    "timeout",
    "forbidden",
    "status",
    "malformed",
    "identity",
    "login",
];

/// Counters of one stored secret.
#[derive(Debug, Default)]
struct StoreStats {
    reads: Option<u32>,
    success: Option<u32>,
    /// Aligned with `StoreError::KINDS`.
    failures: Vec<Option<u32>>,
    version_changes: Option<u32>,
    logins: Option<u32>,
    /// Seconds since the value in use was read (gauge, updated on the tick).
    age_seconds: Option<u32>,
}

/// Consent counters (SPEC v1.2), proxy-wide: `latchkey.consent.<stat>`, and
/// failed logins by reason, `latchkey.consent.failed.<reason>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentStat {
    /// A login answered with its 302 to the provider.
    LoginStarted,
    /// A callback that stored its refresh token.
    Completed,
    /// Codes redeemed at the token server.
    Redemptions,
    /// Records read (a cache miss's refresh token, a callback's version, a
    /// disconnect, discovery).
    StoreReads,
    /// Records written (consents and rotated refresh tokens).
    StoreWrites,
    /// Writes another proxy won (compare-and-set), followed by a re-read.
    StoreConflicts,
    Disconnects,
    /// Refresh tokens revoked at the provider on a disconnect.
    Revocations,
}

impl ConsentStat {
    const ALL: [ConsentStat; 8] = [
        ConsentStat::LoginStarted,
        ConsentStat::Completed,
        ConsentStat::Redemptions,
        ConsentStat::StoreReads,
        ConsentStat::StoreWrites,
        ConsentStat::StoreConflicts,
        ConsentStat::Disconnects,
        ConsentStat::Revocations,
    ];

    fn name(self) -> &'static str {
        match self {
            ConsentStat::LoginStarted => "logins_started",
            ConsentStat::Completed => "completed",
            ConsentStat::Redemptions => "redemptions",
            ConsentStat::StoreReads => "store_reads",
            ConsentStat::StoreWrites => "store_writes",
            ConsentStat::StoreConflicts => "store_conflicts",
            ConsentStat::Disconnects => "disconnects",
            ConsentStat::Revocations => "revocations",
        }
    }
}

/// Why a consent callback failed: the `reason` of its JSON answer and stat.
pub const CONSENT_FAILURES: [&str; 15] = [
    "not_found",
    "return_to",
    "paused_limit",
    "state_invalid",
    "state_expired",
    "state_replayed",
    "wrong_caller",
    "access_denied",
    "bad_request",
    "wrong_issuer",
    "code_rejected",
    "no_refresh_token",
    "token_server",
    "token_store",
    "store_conflict",
];

/// What happened to a store read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreStat {
    Read,
    Success,
    VersionChange,
    Login,
}

/// A name safe to put in a stat name: `[A-Za-z0-9_-]`, anything else as `_`.
pub fn stat_segment(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Stats {
    pub fn define(p: &impl Proxy, config: &Config) -> Stats {
        let define = |kind: MetricKind, name: &str| {
            let id = p.define(kind, name);
            if id.is_none() {
                p.log(Level::Warn, &format!("can't define stat {name}"));
            }
            id
        };
        let counter = |name: &str| define(MetricKind::Counter, name);
        let mut m = Stats {
            allowed: counter("latchkey.requests.allowed"),
            unmatched: counter("latchkey.requests.unmatched"),
            denied_unauthenticated: counter("latchkey.requests.denied.unauthenticated"),
            denied_forbidden: counter("latchkey.requests.denied.forbidden"),
            denied_unmatched: counter("latchkey.requests.denied.unmatched"),
            denied_bad_claims: counter("latchkey.requests.denied.bad_claims"),
            denied_bad_path: counter("latchkey.requests.denied.bad_path"),
            denied_bad_subject: counter("latchkey.requests.denied.bad_subject"),
            discovery: counter("latchkey.requests.discovery"),
            unavailable: counter("latchkey.requests.unavailable"),
            paused_limit: counter("latchkey.requests.paused_limit"),
            internal_errors: counter("latchkey.requests.internal_error"),
            consent_required: counter("latchkey.requests.consent_required"),
            ..Stats::default()
        };
        for c in &config.connections {
            let base = format!("latchkey.connection.{}", stat_segment(&c.name));
            m.injected.push(Lazy::new(format!("{base}.injected")));
            let oauth = c.credential.is_token();
            let mut tokens = Vec::new();
            let mut failures = Vec::new();
            let mut state = None;
            if oauth {
                tokens = TokenStat::ALL
                    .iter()
                    .map(|t| counter(&format!("{base}.token.{}", t.name())))
                    .collect();
                failures = FetchError::KINDS
                    .iter()
                    .map(|kind| counter(&format!("{base}.token.failure.{kind}")))
                    .collect();
                state = define(MetricKind::Gauge, &format!("{base}.token.state"));
            }
            m.tokens.push(tokens);
            m.failures.push(failures);
            m.state.push(state);
        }
        for st in &config.stores {
            let base = format!("latchkey.secret.{}", stat_segment(&st.name));
            m.stores.push(StoreStats {
                reads: counter(&format!("{base}.reads")),
                success: counter(&format!("{base}.success")),
                failures: StoreError::KINDS
                    .iter()
                    .map(|k| counter(&format!("{base}.failure.{k}")))
                    .collect(),
                version_changes: counter(&format!("{base}.version_changes")),
                logins: counter(&format!("{base}.logins")),
                age_seconds: define(MetricKind::Gauge, &format!("{base}.age_seconds")),
            });
        }
        for p in &config.providers {
            let signs = matches!(&p.kind, crate::config::ProviderKind::OAuth2(o)
                if matches!(o.auth_method, crate::config::AuthMethod::PrivateKeyJwt(_)));
            let mut ids = Vec::new();
            if signs {
                let base = format!("latchkey.provider.{}.signing", stat_segment(&p.name));
                ids.push(counter(&format!("{base}.requests")));
                ids.extend(
                    SIGNING_FAILURES
                        .iter()
                        .map(|k| counter(&format!("{base}.failure.{k}"))),
                );
            }
            m.signing.push(ids);
        }
        if config.consent.is_some() {
            m.consent = ConsentStat::ALL
                .iter()
                .map(|s| counter(&format!("latchkey.consent.{}", s.name())))
                .collect();
            m.consent_failures = CONSENT_FAILURES
                .iter()
                .map(|r| counter(&format!("latchkey.consent.failed.{r}")))
                .collect();
        }
        m
    }

    /// A signing call of provider `provider` (`failure: None`), or its failure by kind.
    pub fn signing(&self, p: &impl Proxy, provider: usize, failure: Option<&str>) {
        let Some(ids) = self.signing.get(provider) else {
            return;
        };
        let i = match failure {
            None => Some(0),
            Some(kind) => SIGNING_FAILURES
                .iter()
                .position(|k| *k == kind)
                .map(|i| i + 1),
        };
        p.count(i.and_then(|i| ids.get(i).copied().flatten()));
    }

    pub fn consent(&self, p: &impl Proxy, stat: ConsentStat) {
        p.count(self.consent.get(stat as usize).copied().flatten());
    }

    /// A failed callback, by reason (one of [`CONSENT_FAILURES`]).
    /// Per reason only: a total beside them would double a Prometheus `sum()`. A
    /// reason not in the list (none is made) counts as `bad_request`.
    pub fn consent_failed(&self, p: &impl Proxy, reason: &str) {
        let i = CONSENT_FAILURES
            .iter()
            .position(|r| *r == reason)
            .or_else(|| CONSENT_FAILURES.iter().position(|r| *r == "bad_request"));
        p.count(i.and_then(|i| self.consent_failures.get(i).copied().flatten()));
    }

    pub fn store(&self, p: &impl Proxy, store: usize, stat: StoreStat) {
        let Some(s) = self.stores.get(store) else {
            return;
        };
        p.count(match stat {
            StoreStat::Read => s.reads,
            StoreStat::Success => s.success,
            StoreStat::VersionChange => s.version_changes,
            StoreStat::Login => s.logins,
        });
    }

    pub fn store_failure(&self, p: &impl Proxy, store: usize, kind: &'static str) {
        let Some(s) = self.stores.get(store) else {
            return;
        };
        let i = StoreError::KINDS.iter().position(|k| *k == kind);
        p.count(i.and_then(|i| s.failures.get(i).copied().flatten()));
    }

    pub fn store_age(&self, p: &impl Proxy, store: usize, seconds: u64) {
        p.record(self.stores.get(store).and_then(|s| s.age_seconds), seconds);
    }

    /// A request forwarded with the credentials of these connections.
    pub fn allowed(&self, p: &impl Proxy, picks: &[usize]) {
        p.count(self.allowed);
        for &c in picks {
            p.count(self.injected.get(c).and_then(|l| l.id(p)));
        }
    }

    pub fn token(&self, p: &impl Proxy, connection: usize, stat: TokenStat) {
        p.count(
            self.tokens
                .get(connection)
                .and_then(|t| t.get(stat as usize))
                .copied()
                .flatten(),
        );
    }

    pub fn token_failure(&self, p: &impl Proxy, connection: usize, kind: &'static str) {
        let i = FetchError::KINDS.iter().position(|k| *k == kind);
        p.count(i.and_then(|i| self.failures.get(connection)?.get(i).copied().flatten()));
    }

    /// Requests paused for these connections' tokens.
    pub fn waits(&self, p: &impl Proxy, picks: &[usize]) {
        for &c in picks {
            self.token(p, c, TokenStat::Wait);
        }
    }

    pub fn token_state(&self, p: &impl Proxy, connection: usize, value: u64) {
        p.record(self.state.get(connection).copied().flatten(), value);
    }
}
