//! One cache key's state, shared by every worker of the proxy.
//!
//! The filter keeps a [`CacheState`] per key (a connection, or a connection and
//! caller for token exchange) in proxy-wasm shared data and changes it only by
//! compare-and-swap, so all workers see one state and at most one fetch per key
//! is in flight in the whole proxy:
//!
//! ```text
//!            request                 token                     refresh_at passed
//!   Empty ───────────► Fetching ───────────► Ready ─────────────────────────► Refreshing
//!     ▲                 │    ▲                 ▲ ▲                                │
//!     │ 401 on token    │    │ backoff over    │ └──── refresh failed (retry later)┤
//!     └── Ready         ▼    │                 └──────────── new token ────────────┘
//!                     Backoff ┘   (requests get 503 at once while it lasts)
//! ```
//!
//! `Fetching` and `Refreshing` hold a lease (owner, expiry): only the owner
//! installs the result, and a lease that outlives the fetch timeout (its worker
//! died, its call was lost) is taken over by the next request. Time is passed in
//! as milliseconds; randomness (owner ids, token ids, jitter) too.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::token_response::NO_CONSENT;

/// Timing rules for one key, from the provider's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub fetch_timeout_ms: u64,
    pub refresh_margin_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl Policy {
    pub fn new(fetch_timeout_ms: u64, refresh_margin_ms: u64) -> Self {
        Policy {
            fetch_timeout_ms,
            refresh_margin_ms,
            backoff_base_ms: 1000,
            backoff_max_ms: 60_000,
        }
    }

    fn lease(&self, owner: u64, now: u64) -> Lease {
        // The call times out after fetch_timeout_ms; allow a second for the callback.
        Lease {
            owner,
            until_ms: now + self.fetch_timeout_ms + 1000,
        }
    }

    /// The longest backoff after `failures` consecutive failures (0 for none).
    pub fn backoff_cap_ms(&self, failures: u32) -> u64 {
        if failures == 0 {
            return 0;
        }
        self.backoff_base_ms
            .saturating_mul(1u64 << failures.clamp(1, 20).saturating_sub(1))
            .min(self.backoff_max_ms)
    }

    /// Exponential backoff after `failures` consecutive failures (≥ 1), with
    /// "equal jitter": half fixed, half random (`jitter` is any random number).
    pub fn backoff_ms(&self, failures: u32, jitter: u64) -> u64 {
        let exp = self
            .backoff_base_ms
            .saturating_mul(1u64 << failures.clamp(1, 20).saturating_sub(1));
        let delay = exp.min(self.backoff_max_ms).max(2);
        delay / 2 + jitter % (delay / 2 + 1)
    }
}

/// A cached access token. `Debug` doesn't show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub token: String,
    /// Identifies this token (random), so a 401 drops only the token it was for.
    pub id: u64,
    /// After this the token is never injected (a little before its real expiry).
    pub usable_until_ms: u64,
    pub refresh_at_ms: u64,
    /// When it was obtained (age gauges).
    #[serde(default)]
    pub obtained_ms: u64,
    /// A stored secret's version id (empty for tokens).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// When an upstream 401 last started a refresh of this token (0: never):
    /// at most one such refresh per window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refreshed_on_401_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl fmt::Debug for Cached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cached")
            .field("token", &"[redacted]")
            .field("id", &self.id)
            .field("usable_until_ms", &self.usable_until_ms)
            .field("refresh_at_ms", &self.refresh_at_ms)
            .field("version", &self.version)
            .finish()
    }
}

impl Cached {
    pub fn usable(&self, now: u64) -> bool {
        now < self.usable_until_ms
    }

    /// Whether a VM may serve this token from its own copy, with no look at the
    /// shared cache and no clock read per request, until it checks again at most
    /// `grace_ms` after `now`: that is, whether [`on_request`] would still answer
    /// a plain [`Choice::Use`] (no refresh due, still usable) `grace_ms` from now.
    pub fn copyable_until(&self, now: u64, grace_ms: u64) -> bool {
        let at = now.saturating_add(grace_ms);
        at < self.refresh_at_ms && self.usable(at)
    }

    /// A token of `lifetime_ms` received at `now`: refreshed at half its
    /// lifetime, and at least `refresh_margin_ms` before expiry, but never
    /// before a quarter of its lifetime (so short tokens don't refresh in a loop).
    pub fn new(token: String, id: u64, lifetime_ms: u64, now: u64, policy: &Policy) -> Self {
        let skew = (lifetime_ms / 10).min(1000);
        let refresh_in = (lifetime_ms / 2)
            .min(lifetime_ms.saturating_sub(policy.refresh_margin_ms))
            .max(lifetime_ms / 4);
        Cached {
            token,
            id,
            usable_until_ms: now + lifetime_ms - skew,
            refresh_at_ms: now + refresh_in,
            obtained_ms: now,
            version: String::new(),
            refreshed_on_401_ms: 0,
        }
    }

    /// A value read from a secret store: it never expires (the last good value
    /// serves until a new one is read), and is re-read after `refresh_in_ms`
    /// (`None`: a pinned version, never re-read).
    pub fn stored(
        value: String,
        id: u64,
        version: String,
        refresh_in_ms: Option<u64>,
        now: u64,
    ) -> Self {
        Cached {
            token: value,
            id,
            usable_until_ms: u64::MAX,
            refresh_at_ms: refresh_in_ms.map_or(u64::MAX, |r| now.saturating_add(r)),
            obtained_ms: now,
            version,
            refreshed_on_401_ms: 0,
        }
    }
}

/// How long "no consent" is remembered before the store is read again.
pub const NO_CONSENT_RECHECK_MS: u64 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: u64,
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "s")]
pub enum CacheState {
    #[default]
    Empty,
    /// No usable token; one fetch in flight.
    Fetching { lease: Lease, failures: u32 },
    /// A usable token. `failures` counts failed refreshes since it came.
    Ready { token: Cached, failures: u32 },
    /// A usable token, and a fetch for its successor in flight.
    Refreshing {
        token: Cached,
        lease: Lease,
        failures: u32,
    },
    /// The last fetch failed: requests get 503 until `until_ms`.
    Backoff {
        until_ms: u64,
        failures: u32,
        kind: String,
    },
}

/// What a request should do, given the key's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Inject this token.
    Use(Cached),
    /// Inject this token, and start a background refresh: CAS the state to
    /// `next`; if that succeeds, this worker owns the fetch.
    UseAndRefresh { token: Cached, next: CacheState },
    /// Another fetch is in flight: wait for it.
    Wait,
    /// CAS the state to `next`; if that succeeds, fetch, then wait.
    Fetch { next: CacheState },
    /// Backing off: answer 503 now (403 `consent_required` when that is why).
    Reject {
        retry_after_ms: u64,
        consent_required: bool,
    },
}

/// The state gauge: 0 empty, 1 fetching, 2 ready, 3 refreshing, 4 backoff.
impl CacheState {
    pub fn gauge(&self) -> u64 {
        match self {
            CacheState::Empty => 0,
            CacheState::Fetching { .. } => 1,
            CacheState::Ready { .. } => 2,
            CacheState::Refreshing { .. } => 3,
            CacheState::Backoff { .. } => 4,
        }
    }

    /// Decodes shared data; anything unreadable (a pre-created empty value) is `Empty`.
    pub fn decode(bytes: &[u8]) -> CacheState {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

pub fn on_request(state: &CacheState, now: u64, owner: u64, policy: &Policy) -> Choice {
    use CacheState::*;
    let fetch = |failures: u32| Choice::Fetch {
        next: Fetching {
            lease: policy.lease(owner, now),
            failures,
        },
    };
    match state {
        Ready { token, failures } if token.usable(now) => {
            if now >= token.refresh_at_ms {
                Choice::UseAndRefresh {
                    token: token.clone(),
                    next: Refreshing {
                        token: token.clone(),
                        lease: policy.lease(owner, now),
                        failures: *failures,
                    },
                }
            } else {
                Choice::Use(token.clone())
            }
        }
        Refreshing {
            token,
            lease,
            failures,
        } if token.usable(now) => {
            if now < lease.until_ms {
                Choice::Use(token.clone())
            } else {
                // The refresh was lost: take it over.
                Choice::UseAndRefresh {
                    token: token.clone(),
                    next: Refreshing {
                        token: token.clone(),
                        lease: policy.lease(owner, now),
                        failures: *failures,
                    },
                }
            }
        }
        Refreshing {
            lease, failures, ..
        }
        | Fetching { lease, failures } => {
            if now < lease.until_ms {
                Choice::Wait
            } else {
                fetch(*failures)
            }
        }
        Backoff {
            until_ms,
            failures,
            kind,
        } => {
            if now < *until_ms {
                Choice::Reject {
                    retry_after_ms: until_ms - now,
                    consent_required: kind == NO_CONSENT,
                }
            } else {
                fetch(*failures)
            }
        }
        Empty | Ready { .. } => fetch(0),
    }
}

/// The result of a fetch, as the cache needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    Token {
        token: String,
        id: u64,
        lifetime_ms: u64,
    },
    /// A secret store's value and its version.
    Stored {
        value: String,
        id: u64,
        version: String,
        refresh_in_ms: Option<u64>,
    },
    Failed {
        kind: &'static str,
    },
}

/// The state after `owner`'s fetch finished; `None` if `owner` no longer holds
/// the lease (it was taken over, or the key changed): then the result is dropped.
pub fn on_result(
    state: &CacheState,
    owner: u64,
    outcome: FetchOutcome,
    now: u64,
    policy: &Policy,
    jitter: u64,
) -> Option<CacheState> {
    use CacheState::*;
    let (held, failures, current) = match state {
        Fetching { lease, failures } => (lease.owner == owner, *failures, None),
        Refreshing {
            token,
            lease,
            failures,
        } => (lease.owner == owner, *failures, Some(token)),
        _ => (false, 0, None),
    };
    if !held {
        return None;
    }
    Some(match outcome {
        FetchOutcome::Token {
            token,
            id,
            lifetime_ms,
        } => Ready {
            token: Cached::new(token, id, lifetime_ms, now, policy),
            failures: 0,
        },
        FetchOutcome::Stored {
            value,
            id,
            version,
            refresh_in_ms,
        } => Ready {
            token: Cached::stored(value, id, version, refresh_in_ms, now),
            failures: 0,
        },
        // Nobody consented: not a failure to back off from, but known for a
        // moment, so that a caller without consent doesn't read the store on
        // every request (a consent on this proxy clears it at once).
        FetchOutcome::Failed { kind } if kind == NO_CONSENT => Backoff {
            until_ms: now + NO_CONSENT_RECHECK_MS,
            failures,
            kind: kind.to_string(),
        },
        FetchOutcome::Failed { kind } => {
            let failures = failures.saturating_add(1);
            let delay = policy.backoff_ms(failures, jitter);
            match current {
                // Keep serving the current token; try again after the backoff, or
                // (a refresh an upstream 401 started early) when it was due anyway.
                Some(token) if token.usable(now) => Ready {
                    token: Cached {
                        refresh_at_ms: now.saturating_add(delay).max(token.refresh_at_ms),
                        ..token.clone()
                    },
                    failures,
                },
                _ => Backoff {
                    until_ms: now + delay,
                    failures,
                    kind: kind.to_string(),
                },
            }
        }
    })
}

/// What an upstream 401 to token `id` does (SPEC v1.2). A caller can provoke
/// 401s, so the token is never thrown away: `Some(next)` starts a refresh (CAS
/// the state to `next`; if that succeeds, `owner` fetches) while the token keeps
/// serving until its successor arrives, and stays in use if the refresh fails.
/// `None`, nothing to do, when the token is no longer the cached one, is younger
/// than `window_ms`, was already refreshed on a 401 within `window_ms`, is
/// being refreshed, or a failed refresh is backing off.
pub fn on_upstream_401(
    state: &CacheState,
    id: u64,
    now: u64,
    owner: u64,
    window_ms: u64,
    policy: &Policy,
) -> Option<CacheState> {
    let CacheState::Ready { token, failures } = state else {
        return None;
    };
    let young = now < token.obtained_ms.saturating_add(window_ms);
    let forced = token.refreshed_on_401_ms;
    // Once per window; after failed refreshes, no more often than the backoff.
    let recently =
        forced != 0 && now < forced.saturating_add(window_ms.max(policy.backoff_cap_ms(*failures)));
    // An ordinary refresh failed and backs off: a 401 doesn't cut that short.
    let backing_off = forced == 0 && *failures > 0 && now < token.refresh_at_ms;
    if token.id != id || young || recently || backing_off || !token.usable(now) {
        return None;
    }
    Some(CacheState::Refreshing {
        token: Cached {
            refreshed_on_401_ms: now.max(1),
            ..token.clone()
        },
        lease: policy.lease(owner, now),
        failures: *failures,
    })
}

/// The gateway's own call was refused with token `id` (a Key Vault read
/// answered 401): drop it if it is still the cached one, so the retry fetches a
/// fresh one. Not for upstream answers, which a caller can provoke.
pub fn on_refused(state: &CacheState, id: u64) -> Option<CacheState> {
    use CacheState::*;
    match state {
        Ready { token, .. } if token.id == id => Some(Empty),
        Refreshing {
            token,
            lease,
            failures,
        } if token.id == id => Some(Fetching {
            lease: *lease,
            failures: *failures,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CacheState::*;

    const P: Policy = Policy {
        fetch_timeout_ms: 2000,
        refresh_margin_ms: 5000,
        backoff_base_ms: 1000,
        backoff_max_ms: 60_000,
    };

    fn ready(lifetime: u64, now: u64) -> CacheState {
        Ready {
            token: Cached::new("at".into(), 7, lifetime, now, &P),
            failures: 0,
        }
    }

    fn fetched(lifetime: u64) -> FetchOutcome {
        FetchOutcome::Token {
            token: "new".into(),
            id: 8,
            lifetime_ms: lifetime,
        }
    }

    /// Applies a decision's CAS target, as the filter does when its CAS succeeds.
    fn next_of(d: &Choice) -> Option<CacheState> {
        match d {
            Choice::UseAndRefresh { next, .. } | Choice::Fetch { next } => Some(next.clone()),
            _ => None,
        }
    }

    /// A VM's own copy is served only while `on_request` would answer a plain
    /// `Use` for the whole grace period, to the millisecond.
    #[test]
    fn hot_copy_only_while_use_holds_for_the_grace() {
        let t = Cached::new("at".into(), 7, 100_000, 0, &P);
        assert_eq!(t.refresh_at_ms, 50_000);
        let state = Ready {
            token: t.clone(),
            failures: 0,
        };
        let grace = 3000;
        // The last instant still good: `now + grace` is the last Use.
        assert!(t.copyable_until(46_999, grace));
        assert!(matches!(
            on_request(&state, 46_999 + grace, 1, &P),
            Choice::Use(_)
        ));
        assert!(!t.copyable_until(47_000, grace));
        assert!(matches!(
            on_request(&state, 47_000 + grace, 1, &P),
            Choice::UseAndRefresh { .. }
        ));
        // A token whose use ends before its refresh point (a stored value
        // never does; a token may after a clock jump) is bounded by its use.
        let short = Cached {
            usable_until_ms: 10_000,
            ..t.clone()
        };
        assert!(short.copyable_until(6_999, grace));
        assert!(!short.copyable_until(7_000, grace));
        assert!(!short.copyable_until(u64::MAX - 1, grace));
    }

    #[test]
    fn cold_key_fetches_once_then_others_wait() {
        let d = on_request(&Empty, 0, 1, &P);
        let fetching = next_of(&d).unwrap();
        assert_eq!(
            fetching,
            Fetching {
                lease: Lease {
                    owner: 1,
                    until_ms: 3000
                },
                failures: 0
            }
        );
        assert_eq!(on_request(&fetching, 10, 2, &P), Choice::Wait);
        assert_eq!(on_request(&fetching, 2999, 3, &P), Choice::Wait);
        let s = on_result(&fetching, 1, fetched(10_000), 50, &P, 0).unwrap();
        let Ready { token, failures: 0 } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(token.token, "new");
        assert_eq!(token.usable_until_ms, 50 + 10_000 - 1000);
        assert_eq!(token.refresh_at_ms, 50 + 5000);
        assert_eq!(on_request(&s, 60, 9, &P), Choice::Use(token.clone()));
    }

    #[test]
    fn lost_fetch_lease_is_taken_over() {
        let fetching = Fetching {
            lease: Lease {
                owner: 1,
                until_ms: 3000,
            },
            failures: 2,
        };
        let d = on_request(&fetching, 3000, 5, &P);
        assert_eq!(
            next_of(&d),
            Some(Fetching {
                lease: Lease {
                    owner: 5,
                    until_ms: 6000
                },
                failures: 2
            })
        );
        // The old owner's late result is dropped.
        let taken = next_of(&d).unwrap();
        assert_eq!(on_result(&taken, 1, fetched(10_000), 3100, &P, 0), None);
    }

    #[test]
    fn refresh_ahead_never_makes_requests_wait() {
        let s = ready(10_000, 0);
        let Choice::Use(_) = on_request(&s, 4999, 1, &P) else {
            panic!()
        };
        let d = on_request(&s, 5000, 2, &P);
        let Choice::UseAndRefresh { token, next } = d else {
            panic!("{d:?}")
        };
        assert_eq!(token.token, "at");
        let Refreshing { lease, .. } = &next else {
            panic!()
        };
        assert_eq!(lease.owner, 2);
        // While refreshing, everyone uses the current token.
        assert!(matches!(on_request(&next, 6000, 3, &P), Choice::Use(_)));
        let s2 = on_result(&next, 2, fetched(10_000), 6100, &P, 0).unwrap();
        let Ready { token, .. } = &s2 else { panic!() };
        assert_eq!((token.token.as_str(), token.id), ("new", 8));
    }

    #[test]
    fn expired_token_is_never_used() {
        let s = ready(10_000, 0);
        // usable until 9000 (skew 1000)
        assert!(matches!(
            on_request(&s, 8999, 1, &P),
            Choice::UseAndRefresh { .. }
        ));
        assert!(matches!(on_request(&s, 9000, 1, &P), Choice::Fetch { .. }));
        let Ready { token, .. } = &s else { panic!() };
        let refreshing = Refreshing {
            token: token.clone(),
            lease: Lease {
                owner: 1,
                until_ms: 20_000,
            },
            failures: 0,
        };
        assert_eq!(on_request(&refreshing, 9000, 2, &P), Choice::Wait);
    }

    #[test]
    fn failure_backs_off_with_growing_jittered_delay_then_recovers() {
        let fetching = Fetching {
            lease: Lease {
                owner: 1,
                until_ms: 3000,
            },
            failures: 0,
        };
        let s = on_result(
            &fetching,
            1,
            FetchOutcome::Failed { kind: "timeout" },
            100,
            &P,
            0,
        )
        .unwrap();
        assert_eq!(
            s,
            Backoff {
                until_ms: 100 + 500,
                failures: 1,
                kind: "timeout".into()
            }
        );
        assert_eq!(
            on_request(&s, 300, 2, &P),
            Choice::Reject {
                retry_after_ms: 300,
                consent_required: false,
            }
        );
        // Backoff over: one request fetches again, keeping the failure count.
        let d = on_request(&s, 600, 3, &P);
        let f2 = next_of(&d).unwrap();
        assert_eq!(
            f2,
            Fetching {
                lease: Lease {
                    owner: 3,
                    until_ms: 3600
                },
                failures: 1
            }
        );
        let s = on_result(
            &f2,
            3,
            FetchOutcome::Failed { kind: "status" },
            700,
            &P,
            999,
        )
        .unwrap();
        let Backoff {
            until_ms,
            failures: 2,
            ..
        } = s
        else {
            panic!("{s:?}")
        };
        assert!((700 + 1000..=700 + 2000).contains(&until_ms), "{until_ms}");
        // Recovery clears the failures.
        let f3 = next_of(&on_request(&s, until_ms, 4, &P)).unwrap();
        let s = on_result(&f3, 4, fetched(10_000), until_ms + 10, &P, 0).unwrap();
        assert!(matches!(s, Ready { failures: 0, .. }));
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        assert_eq!(P.backoff_ms(1, 0), 500);
        assert_eq!(P.backoff_ms(2, 0), 1000);
        assert_eq!(P.backoff_ms(3, 0), 2000);
        assert_eq!(P.backoff_ms(30, 0), 30_000);
        for j in [0, 1, 12345, u64::MAX] {
            let d = P.backoff_ms(4, j);
            assert!((4000..=8000).contains(&d), "{d}");
        }
    }

    #[test]
    fn backoff_jitter_spans_exactly_half_to_the_full_delay() {
        // Equal jitter over a 1000 ms delay (1 failure): 500 + jitter % 501, so
        // every value from 500 to 1000 inclusive, and nothing outside.
        let all: std::collections::BTreeSet<u64> = (0..2000).map(|j| P.backoff_ms(1, j)).collect();
        assert!(
            all == (500..=1000).collect(),
            "{:?}",
            (all.first(), all.last(), all.len())
        );
        assert_eq!(P.backoff_ms(1, 500), 1000);
        assert_eq!(P.backoff_ms(1, 501), 500);
        // The cap bounds the delay, jitter included; a zero base still waits a little.
        let capped = (0..100_000).map(|j| P.backoff_ms(30, j)).max();
        assert_eq!(capped, Some(60_000));
        let zero = Policy {
            backoff_base_ms: 0,
            ..P
        };
        assert_eq!((zero.backoff_ms(1, 0), zero.backoff_ms(1, 1)), (1, 2));
    }

    #[test]
    fn failed_refresh_keeps_the_valid_token() {
        let Ready { token, .. } = ready(10_000, 0) else {
            panic!()
        };
        let refreshing = Refreshing {
            token: token.clone(),
            lease: Lease {
                owner: 1,
                until_ms: 8000,
            },
            failures: 0,
        };
        let s = on_result(
            &refreshing,
            1,
            FetchOutcome::Failed { kind: "connect" },
            5100,
            &P,
            0,
        )
        .unwrap();
        let Ready {
            token: t,
            failures: 1,
        } = &s
        else {
            panic!("{s:?}")
        };
        assert_eq!(t.token, "at");
        assert_eq!(t.refresh_at_ms, 5100 + 500);
        assert!(matches!(on_request(&s, 5200, 2, &P), Choice::Use(_)));
        // Token expired by the time the refresh fails: back off.
        let s = on_result(
            &refreshing,
            1,
            FetchOutcome::Failed { kind: "connect" },
            9500,
            &P,
            0,
        )
        .unwrap();
        assert!(matches!(s, Backoff { failures: 1, .. }));
    }

    #[test]
    fn the_backoff_cap_doubles_from_the_base_to_the_max() {
        let caps: Vec<u64> = (0..9).map(|f| P.backoff_cap_ms(f)).collect();
        assert_eq!(
            caps,
            [0, 1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(P.backoff_cap_ms(u32::MAX), 60_000);
        // Every backoff lies within its cap.
        for f in 1..9 {
            for jitter in [0, 7, u64::MAX] {
                assert!(P.backoff_ms(f, jitter) <= P.backoff_cap_ms(f));
            }
        }
    }

    #[test]
    fn a_401_refresh_time_is_written_only_when_there_is_one() {
        let t = Cached::new("at".into(), 7, 10_000, 0, &P);
        let plain = String::from_utf8(
            Ready {
                token: t.clone(),
                failures: 0,
            }
            .encode(),
        )
        .unwrap();
        assert!(!plain.contains("refreshed_on_401_ms"), "{plain}");
        let marked = Ready {
            token: Cached {
                refreshed_on_401_ms: 1234,
                ..t
            },
            failures: 0,
        };
        let text = String::from_utf8(marked.encode()).unwrap();
        assert!(text.contains(r#""refreshed_on_401_ms":1234"#), "{text}");
        assert_eq!(CacheState::decode(text.as_bytes()), marked);
        assert_eq!(CacheState::decode(plain.as_bytes()).gauge(), 2);
    }

    #[test]
    fn a_refused_gateway_call_drops_only_the_cached_token() {
        let s = ready(10_000, 0);
        assert_eq!(on_refused(&s, 6), None);
        assert_eq!(on_refused(&s, 7), Some(Empty));
        let Ready { token, .. } = s else { panic!() };
        let lease = Lease {
            owner: 1,
            until_ms: 9000,
        };
        let refreshing = Refreshing {
            token,
            lease,
            failures: 0,
        };
        assert_eq!(
            on_refused(&refreshing, 7),
            Some(Fetching { lease, failures: 0 })
        );
        assert_eq!(on_refused(&Empty, 7), None);
        // A 401 for an older token leaves a refreshing key alone.
        assert_eq!(on_refused(&refreshing, 6), None);
    }

    const W: u64 = 10_000;

    #[test]
    fn upstream_401_refreshes_an_old_enough_token_and_keeps_it_serving() {
        let s = ready(600_000, 0);
        // Not the cached token, or younger than the window: nothing.
        assert_eq!(on_upstream_401(&s, 6, 20_000, 2, W, &P), None);
        assert_eq!(on_upstream_401(&s, 7, W - 1, 2, W, &P), None);
        // Old enough: a refresh owned by the worker that saw the 401, the token
        // still serving meanwhile.
        let next = on_upstream_401(&s, 7, W, 2, W, &P).unwrap();
        let Refreshing {
            token,
            lease,
            failures: 0,
        } = &next
        else {
            panic!("{next:?}")
        };
        assert_eq!(token.token, "at");
        assert_eq!(token.refreshed_on_401_ms, W);
        assert_eq!(
            *lease,
            Lease {
                owner: 2,
                until_ms: W + 3000
            }
        );
        assert_eq!(on_request(&next, W + 1, 3, &P), Choice::Use(token.clone()));
        // While it refreshes, more 401s change nothing.
        assert_eq!(on_upstream_401(&next, 7, W + 5, 3, W, &P), None);
        // The refresh fails: the old token stays in use, and a 401 within the
        // window (even once the backoff is over) starts no second refresh.
        let failed = on_result(
            &next,
            2,
            FetchOutcome::Failed { kind: "connect" },
            W + 100,
            &P,
            0,
        )
        .unwrap();
        let Ready { token: kept, .. } = &failed else {
            panic!("{failed:?}")
        };
        assert_eq!(kept.token, "at");
        assert_eq!(
            on_request(&failed, W + 200, 3, &P),
            Choice::Use(kept.clone())
        );
        assert_eq!(on_upstream_401(&failed, 7, 2 * W - 1, 3, W, &P), None);
        // After the window, and the backoff, it may refresh again.
        assert!(on_upstream_401(&failed, 7, 2 * W, 3, W, &P).is_some());
        // The new token is young: a 401 to it waits for the window.
        let fresh = on_result(&next, 2, fetched(600_000), W + 50, &P, 0).unwrap();
        assert_eq!(on_upstream_401(&fresh, 8, W + 60, 3, W, &P), None);
        assert!(on_upstream_401(&fresh, 8, 2 * W + 50, 3, W, &P).is_some());
    }

    #[test]
    fn upstream_401_waits_for_a_failed_refresh_to_back_off() {
        let Ready { token, .. } = ready(600_000, 0) else {
            panic!()
        };
        // Two failed refreshes: next try at 40 s.
        let backing = Ready {
            token: Cached {
                refresh_at_ms: 40_000,
                ..token
            },
            failures: 2,
        };
        assert_eq!(on_upstream_401(&backing, 7, 39_999, 2, W, &P), None);
        assert!(on_upstream_401(&backing, 7, 40_000, 2, W, &P).is_some());
        // A window of 0 still can't bypass the backoff.
        assert_eq!(on_upstream_401(&backing, 7, 20_000, 2, 0, &P), None);
        // Nor refresh a token that is no longer usable, nor a key without one.
        assert_eq!(on_upstream_401(&backing, 7, 600_000, 2, 0, &P), None);
        assert_eq!(on_upstream_401(&Empty, 7, 50_000, 2, W, &P), None);
    }

    #[test]
    fn a_thousand_401s_start_one_refresh_per_window() {
        // One 401 every 10 ms for 10 s, against a token of an hour: the state
        // machine alone allows exactly one refresh (applied as the CAS would).
        let mut state = ready(3_600_000, 0);
        let mut refreshes = 0;
        for i in 0..1000u64 {
            let now = 10_000 + i * 10;
            if let Some(next) = on_upstream_401(&state, 7, now, i, W, &P) {
                refreshes += 1;
                state = next;
            }
            // The refresh fails at once each time (the token server is down).
            if let Refreshing { lease, .. } = &state {
                let owner = lease.owner;
                state = on_result(
                    &state,
                    owner,
                    FetchOutcome::Failed { kind: "connect" },
                    now,
                    &P,
                    0,
                )
                .unwrap();
            }
            assert!(matches!(
                on_request(&state, now, 99, &P),
                Choice::Use(_) | Choice::UseAndRefresh { .. }
            ));
        }
        assert_eq!(refreshes, 1);
    }

    #[test]
    fn a_refresh_lease_is_taken_over_exactly_when_it_ends() {
        let Ready { token, .. } = ready(10_000, 0) else {
            panic!()
        };
        let refreshing = Refreshing {
            token: token.clone(),
            lease: Lease {
                owner: 1,
                until_ms: 6000,
            },
            failures: 2,
        };
        assert_eq!(
            on_request(&refreshing, 5999, 2, &P),
            Choice::Use(token.clone())
        );
        let d = on_request(&refreshing, 6000, 2, &P);
        assert_eq!(
            d,
            Choice::UseAndRefresh {
                token: token.clone(),
                next: Refreshing {
                    token,
                    lease: Lease {
                        owner: 2,
                        until_ms: 9000
                    },
                    failures: 2
                }
            }
        );
    }

    #[test]
    fn refresh_timing_for_short_and_long_tokens() {
        let c = Cached::new("t".into(), 1, 3_600_000, 0, &P);
        assert_eq!(c.refresh_at_ms, 1_800_000);
        assert_eq!(c.usable_until_ms, 3_599_000);
        let c = Cached::new("t".into(), 1, 8000, 0, &P);
        assert_eq!(c.refresh_at_ms, 3000); // 5 s margin before expiry
        let c = Cached::new("t".into(), 1, 2000, 0, &P);
        assert_eq!(c.refresh_at_ms, 500); // never before a quarter of the lifetime
        assert_eq!(c.usable_until_ms, 1800);
    }

    #[test]
    fn encoding_round_trips_and_garbage_is_empty() {
        for s in [
            Empty,
            ready(1000, 5),
            Backoff {
                until_ms: 9,
                failures: 3,
                kind: "timeout".into(),
            },
        ] {
            assert_eq!(CacheState::decode(&s.encode()), s);
        }
        assert_eq!(CacheState::decode(b""), Empty);
        assert_eq!(CacheState::decode(b"{\"s\":\"Nope\"}"), Empty);
        assert!(!format!("{:?}", ready(1000, 5)).contains("\"at\""));
        let Ready { token, .. } = ready(1000, 5) else {
            panic!()
        };
        assert_eq!(
            format!("{token:?}"),
            "Cached { token: \"[redacted]\", id: 7, usable_until_ms: 905, refresh_at_ms: 255, version: \"\" }"
        );
    }

    #[test]
    fn gauge_values() {
        let lease = Lease {
            owner: 1,
            until_ms: 1,
        };
        assert_eq!(Empty.gauge(), 0);
        assert_eq!(Fetching { lease, failures: 0 }.gauge(), 1);
        assert_eq!(ready(1000, 0).gauge(), 2);
        assert_eq!(
            Backoff {
                until_ms: 0,
                failures: 1,
                kind: String::new()
            }
            .gauge(),
            4
        );
    }

    #[test]
    fn stored_values_refresh_on_time_and_survive_failures() {
        let fetching = next_of(&on_request(&Empty, 0, 1, &P)).unwrap();
        let stored = FetchOutcome::Stored {
            value: "v1".into(),
            id: 3,
            version: "a1".into(),
            refresh_in_ms: Some(60_000),
        };
        let s = on_result(&fetching, 1, stored, 100, &P, 0).unwrap();
        let Ready { token, .. } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(
            (
                token.version.as_str(),
                token.refresh_at_ms,
                token.obtained_ms
            ),
            ("a1", 60_100, 100)
        );
        // Never expires: used at any time, refreshed once refresh_at passes.
        assert_eq!(on_request(&s, 60_099, 2, &P), Choice::Use(token.clone()));
        let d = on_request(&s, 60_100, 2, &P);
        let refreshing = next_of(&d).unwrap();
        assert!(matches!(d, Choice::UseAndRefresh { .. }));
        // A failed re-read keeps the value and retries after the backoff.
        let s = on_result(
            &refreshing,
            2,
            FetchOutcome::Failed { kind: "connect" },
            60_200,
            &P,
            0,
        )
        .unwrap();
        let Ready {
            token: kept,
            failures: 1,
        } = &s
        else {
            panic!("{s:?}")
        };
        assert_eq!(kept.token, "v1");
        assert_eq!(kept.refresh_at_ms, 60_200 + 500);
        assert!(matches!(on_request(&s, 60_699, 4, &P), Choice::Use(_)));
        assert!(matches!(
            on_request(&s, 60_700, 4, &P),
            Choice::UseAndRefresh { .. }
        ));
    }

    #[test]
    fn pinned_values_are_never_re_read() {
        let fetching = next_of(&on_request(&Empty, 0, 1, &P)).unwrap();
        let pinned = FetchOutcome::Stored {
            value: "v".into(),
            id: 3,
            version: "p".into(),
            refresh_in_ms: None,
        };
        let s = on_result(&fetching, 1, pinned, 100, &P, 0).unwrap();
        let Ready { token, .. } = &s else {
            panic!("{s:?}")
        };
        assert_eq!(token.refresh_at_ms, u64::MAX);
        assert_eq!(on_request(&s, 1 << 60, 2, &P), Choice::Use(token.clone()));
    }

    #[test]
    fn no_consent_is_remembered_briefly_without_counting_as_a_failure() {
        let fetching = Fetching {
            lease: Lease {
                owner: 1,
                until_ms: 3000,
            },
            failures: 2,
        };
        let none = FetchOutcome::Failed { kind: NO_CONSENT };
        let s = on_result(&fetching, 1, none.clone(), 100, &P, 999).unwrap();
        // Exactly NO_CONSENT_RECHECK_MS, no jitter, the failure count unchanged.
        assert_eq!(
            s,
            Backoff {
                until_ms: 100 + NO_CONSENT_RECHECK_MS,
                failures: 2,
                kind: "consent_required".into()
            }
        );
        assert_eq!(NO_CONSENT_RECHECK_MS, 2000);
        // Meanwhile every request is told to consent (403), not to retry (503).
        assert_eq!(
            on_request(&s, 100, 2, &P),
            Choice::Reject {
                retry_after_ms: NO_CONSENT_RECHECK_MS,
                consent_required: true,
            }
        );
        assert_eq!(
            on_request(&s, 100 + NO_CONSENT_RECHECK_MS - 1, 2, &P),
            Choice::Reject {
                retry_after_ms: 1,
                consent_required: true,
            }
        );
        // Then the store is read again.
        assert_eq!(
            next_of(&on_request(&s, 100 + NO_CONSENT_RECHECK_MS, 3, &P)),
            Some(Fetching {
                lease: Lease {
                    owner: 3,
                    until_ms: 100 + NO_CONSENT_RECHECK_MS + 3000
                },
                failures: 2
            })
        );
        // A refresh that finds the consent gone stops serving the token it had.
        let Ready { token, .. } = ready(10_000, 0) else {
            panic!()
        };
        let refreshing = Refreshing {
            token,
            lease: Lease {
                owner: 4,
                until_ms: 9000,
            },
            failures: 0,
        };
        assert_eq!(
            on_result(&refreshing, 4, none, 6000, &P, 0),
            Some(Backoff {
                until_ms: 6000 + NO_CONSENT_RECHECK_MS,
                failures: 0,
                kind: "consent_required".into()
            })
        );
        // Another failure's backoff is no consent question.
        let s = on_result(
            &fetching,
            1,
            FetchOutcome::Failed {
                kind: "token_store",
            },
            100,
            &P,
            0,
        )
        .unwrap();
        assert_eq!(
            on_request(&s, 101, 2, &P),
            Choice::Reject {
                retry_after_ms: 1999,
                consent_required: false,
            }
        );
    }
}
