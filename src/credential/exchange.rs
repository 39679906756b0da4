//! The token-exchange cache (RFC 8693): one token per connection *and caller*.
//!
//! Callers are many, so the cache is bounded: a connection has [`SETS`] shared-data
//! keys, created when the configuration loads (creating keys later would race
//! between workers), each holding up to [`WAYS`] entries. A caller's entry lives
//! in the set its subject-token hash selects; when the set is full the least
//! recently used entry is evicted. At most `SETS × WAYS` callers per connection
//! are cached ([`MAX_CALLERS`]).
//!
//! Entries are keyed by a 128-bit hash of the subject token, never the token
//! itself. A token obtained for a subject is never used after the subject
//! token's own `exp`.

use std::hash::{Hash, Hasher};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::cache::CacheState;
use crate::claims::Binding;
use crate::secret::Secret;

pub const SETS: usize = 256;
pub const WAYS: usize = 4;
pub const MAX_CALLERS: usize = SETS * WAYS;

/// Where a caller's entry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// 128-bit hash of the subject token, hex.
    pub hash: String,
    pub set: usize,
    /// The subject token's `exp` in ms, when it is a JWT with one.
    pub expires_ms: Option<u64>,
}

impl Subject {
    pub fn of(token: &str) -> Subject {
        let half = |domain: &str| {
            let mut h = std::hash::DefaultHasher::new();
            (domain, token).hash(&mut h);
            h.finish()
        };
        let (a, b) = (half("latchkey.subject.a"), half("latchkey.subject.b"));
        Subject {
            hash: format!("{a:016x}{b:016x}"),
            set: (a % SETS as u64) as usize,
            expires_ms: jwt_exp_ms(token),
        }
    }
}

/// Why a request's subject token can't be exchanged (the caller gets 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectError {
    /// No `authorization` header, or more than one.
    NoBearer,
    /// Not exactly `Bearer <JWT>`: another scheme, extra spaces, characters
    /// outside base64url, not three segments, anything before or after.
    NotStrictBearer,
    /// Its payload isn't a JSON object.
    BadPayload,
    /// No verified payload to bind it to (or one with none of the binding claims).
    Unverified,
    /// Its `iss`/`sub`/`exp`/`iat`/`jti` differ from the verified payload's:
    /// it is not the token `jwt_authn` verified.
    NotTheVerifiedToken,
}

impl std::fmt::Display for SubjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubjectError::NoBearer => "no single authorization header",
            SubjectError::NotStrictBearer => "authorization is not exactly 'Bearer <JWT>'",
            SubjectError::BadPayload => "the bearer token's payload is not a JSON object",
            SubjectError::Unverified => "no verified JWT payload to bind the bearer token to",
            SubjectError::NotTheVerifiedToken => {
                "the bearer token is not the JWT jwt_authn verified"
            }
        })
    }
}

/// Token exchange's subject token (SPEC v1.2): the request's one
/// `authorization` value must be exactly `Bearer <JWT>` (scheme in any case, one
/// space, three non-empty base64url segments, nothing else), and the JWT's
/// binding claims must equal those of the payload `jwt_authn` verified
/// (`verified`). So the token exchanged is the token that was verified, never a
/// second one sent beside it, and padding around it can't mint new cache keys.
pub fn verified_subject(
    authorization: &[&[u8]],
    verified: Option<&Binding>,
) -> Result<Secret, SubjectError> {
    let [value] = authorization else {
        return Err(SubjectError::NoBearer);
    };
    let jwt = strict_bearer(value).ok_or(SubjectError::NotStrictBearer)?;
    let verified = verified
        .filter(|b| !b.is_empty())
        .ok_or(SubjectError::Unverified)?;
    let payload = jwt.split('.').nth(1).ok_or(SubjectError::NotStrictBearer)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| SubjectError::BadPayload)?;
    let doc: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| SubjectError::BadPayload)?;
    let binding = Binding::of(&doc).ok_or(SubjectError::BadPayload)?;
    if &binding != verified {
        return Err(SubjectError::NotTheVerifiedToken);
    }
    Ok(Secret::new(jwt))
}

/// The JWT of an exact `Bearer <JWT>` value.
fn strict_bearer(value: &[u8]) -> Option<&str> {
    let (scheme, jwt) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let b64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    let mut segments = 0;
    for seg in jwt.split(|&b| b == b'.') {
        if seg.is_empty() || !seg.iter().all(b64url) {
            return None;
        }
        segments += 1;
    }
    if segments != 3 {
        return None;
    }
    std::str::from_utf8(jwt).ok()
}

/// The `exp` claim (seconds) of a JWT, in milliseconds; `None` for anything else.
pub fn jwt_exp_ms(token: &str) -> Option<u64> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v.get("exp")?.as_f64()?;
    (exp.is_finite() && exp > 0.0).then_some((exp * 1000.0) as u64)
}

/// The lifetime to cache a token obtained for a subject that expires at
/// `subject_exp_ms` (if known): never past the subject's own expiry.
pub fn capped_lifetime_ms(lifetime_ms: u64, subject_exp_ms: Option<u64>, now: u64) -> u64 {
    match subject_exp_ms {
        Some(exp) => lifetime_ms.min(exp.saturating_sub(now)).max(1),
        None => lifetime_ms,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub h: String,
    pub used_ms: u64,
    pub state: CacheState,
}

/// One shared-data set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Set(pub Vec<Entry>);

impl Set {
    /// Unreadable (a pre-created empty value) is an empty set.
    pub fn decode(bytes: &[u8]) -> Set {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn state(&self, h: &str) -> CacheState {
        self.0
            .iter()
            .find(|e| e.h == h)
            .map(|e| e.state.clone())
            .unwrap_or_default()
    }

    /// Sets `h`'s state (used now), evicting the least recently used entry if full.
    pub fn put(&mut self, h: &str, state: CacheState, now: u64) {
        if let Some(e) = self.0.iter_mut().find(|e| e.h == h) {
            e.state = state;
            e.used_ms = now;
            return;
        }
        if self.0.len() >= WAYS {
            if let Some(i) = self
                .0
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used_ms)
                .map(|(i, _)| i)
            {
                self.0.swap_remove(i);
            }
        }
        self.0.push(Entry {
            h: h.to_string(),
            used_ms: now,
            state,
        });
    }

    /// Marks `h` used at `now`; true if that changed anything worth writing
    /// (at most once a second per entry, to keep writes rare).
    pub fn touch(&mut self, h: &str, now: u64) -> bool {
        match self.0.iter_mut().find(|e| e.h == h) {
            Some(e) if now >= e.used_ms + 1000 => {
                e.used_ms = now;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::cache::{Cached, Lease, Policy};

    fn jwt(payload: &str) -> String {
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b(r#"{"alg":"RS256"}"#), b(payload))
    }

    fn binding(payload: &str) -> Binding {
        Binding::of(&serde_json::from_str(payload).unwrap()).unwrap()
    }

    const PAYLOAD: &str = r#"{"iss":"https://idp","sub":"alice","exp":1700000000,"iat":1699990000,"jti":"j1","scp":"x"}"#;

    #[test]
    fn subject_is_exactly_the_verified_bearer_jwt() {
        let t = jwt(PAYLOAD);
        let verified = binding(PAYLOAD);
        let ok = |v: &str| verified_subject(&[v.as_bytes()], Some(&verified));
        assert_eq!(ok(&format!("Bearer {t}")).unwrap().expose(), t);
        // The scheme in any case.
        assert_eq!(ok(&format!("bEARER {t}")).unwrap().expose(), t);
        // Every base64url character, `-` and `_` included, in any segment.
        let t2 = format!("{}-_Az09", t);
        assert_eq!(ok(&format!("Bearer {t2}")).unwrap().expose(), t2);
        // Padding jwt_authn skips, or anything else around the JWT, is refused.
        for bad in [
            format!("Bearer ~!*{t}"),
            format!("Bearer  {t}"),
            format!("Bearer {t} "),
            format!(" Bearer {t}"),
            format!("Bearer {t}.x"),
            format!("Bearer {t}="),
            format!("Bearer\t{t}"),
            format!("Token {t}"),
            format!("Bearer{t}"),
            "Bearer a.b".to_string(),
            // An empty signature (an unsigned JWT) or header segment.
            format!("Bearer {}.", &t[..t.rfind('.').unwrap()]),
            format!("Bearer .{}", &t[t.find('.').unwrap() + 1..]),
            "Bearer a..c".to_string(),
            "Bearer ".to_string(),
            "Bear".to_string(),
            String::new(),
        ] {
            assert_eq!(ok(&bad), Err(SubjectError::NotStrictBearer), "{bad:?}");
        }
        // Exactly one authorization value.
        let v = format!("Bearer {t}");
        assert_eq!(
            verified_subject(&[v.as_bytes(), v.as_bytes()], Some(&verified)),
            Err(SubjectError::NoBearer)
        );
        assert_eq!(
            verified_subject(&[], Some(&verified)),
            Err(SubjectError::NoBearer)
        );
        // No verified payload, or one that binds nothing: refused.
        assert_eq!(
            verified_subject(&[v.as_bytes()], None),
            Err(SubjectError::Unverified)
        );
        assert_eq!(
            verified_subject(&[v.as_bytes()], Some(&binding(r#"{"scp":"x"}"#))),
            Err(SubjectError::Unverified)
        );
        // A payload that isn't a JSON object.
        let not_object = format!("Bearer {}", jwt("[1]"));
        assert_eq!(ok(&not_object), Err(SubjectError::BadPayload));
        let not_json = format!("Bearer {}", jwt("{nope"));
        assert_eq!(ok(&not_json), Err(SubjectError::BadPayload));
    }

    #[test]
    fn another_token_than_the_verified_one_is_refused() {
        let verified = binding(PAYLOAD);
        // Each binding claim counts: another user, issuer, time or id, or one
        // claim missing or added.
        for other in [
            r#"{"iss":"https://idp","sub":"bob","exp":1700000000,"iat":1699990000,"jti":"j1"}"#,
            r#"{"iss":"https://evil","sub":"alice","exp":1700000000,"iat":1699990000,"jti":"j1"}"#,
            r#"{"iss":"https://idp","sub":"alice","exp":1700000001,"iat":1699990000,"jti":"j1"}"#,
            r#"{"iss":"https://idp","sub":"alice","exp":1700000000,"iat":1699990001,"jti":"j1"}"#,
            r#"{"iss":"https://idp","sub":"alice","exp":1700000000,"iat":1699990000,"jti":"j2"}"#,
            r#"{"iss":"https://idp","sub":"alice","exp":1700000000,"iat":1699990000}"#,
            r#"{"iss":"https://idp","sub":"alice","exp":"1700000000","iat":1699990000,"jti":"j1"}"#,
        ] {
            let v = format!("Bearer {}", jwt(other));
            assert_eq!(
                verified_subject(&[v.as_bytes()], Some(&verified)),
                Err(SubjectError::NotTheVerifiedToken),
                "{other}"
            );
        }
        // Claims outside the binding don't matter; a numeric claim compares by
        // value whichever way the verified payload came (metadata numbers are doubles).
        let same =
            r#"{"jti":"j1","iat":1699990000.0,"exp":1.7e9,"sub":"alice","iss":"https://idp"}"#;
        let v = format!("Bearer {}", jwt(same));
        assert!(verified_subject(&[v.as_bytes()], Some(&verified)).is_ok());
    }

    #[test]
    fn subject_errors_say_what_is_wrong_without_the_token() {
        for e in [
            SubjectError::NoBearer,
            SubjectError::NotStrictBearer,
            SubjectError::BadPayload,
            SubjectError::Unverified,
            SubjectError::NotTheVerifiedToken,
        ] {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains("eyJ"), "{text}");
        }
    }

    #[test]
    fn subject_hash_is_stable_and_never_the_token() {
        let t = jwt(r#"{"sub":"alice","exp":1700000000}"#);
        let a = Subject::of(&t);
        assert_eq!(a, Subject::of(&t));
        assert_eq!(a.hash.len(), 32);
        assert!(!a.hash.contains("alice") && !t.contains(&a.hash));
        assert!(a.set < SETS);
        assert_eq!(a.expires_ms, Some(1_700_000_000_000));
        assert_ne!(Subject::of("other").hash, a.hash);
        assert_eq!(Subject::of("opaque-token").expires_ms, None);
        assert_eq!(jwt_exp_ms(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(jwt_exp_ms("a.!!!.c"), None);
        // Only a positive `exp` counts; a fraction of a second is kept.
        assert_eq!(jwt_exp_ms(&jwt(r#"{"exp":0}"#)), None);
        assert_eq!(jwt_exp_ms(&jwt(r#"{"exp":-5}"#)), None);
        assert_eq!(jwt_exp_ms(&jwt(r#"{"exp":"1700000000"}"#)), None);
        assert_eq!(jwt_exp_ms(&jwt(r#"{"exp":1.5}"#)), Some(1500));
        assert_eq!(jwt_exp_ms("only.two"), None);
    }

    #[test]
    fn at_most_max_callers_are_cached_per_connection() {
        assert_eq!(MAX_CALLERS, 1024);
        let mut sets = vec![Set::default(); SETS];
        for i in 0..5000u64 {
            let s = Subject::of(&format!("subject-{i}"));
            sets[s.set].put(&s.hash, CacheState::Empty, i);
        }
        let cached: usize = sets.iter().map(|s| s.0.len()).sum();
        assert_eq!(cached, MAX_CALLERS);
    }

    #[test]
    fn set_state_and_touch() {
        let mut s = Set::default();
        let fetching = CacheState::Fetching {
            lease: Lease {
                owner: 1,
                until_ms: 10,
            },
            failures: 1,
        };
        s.put("a", fetching.clone(), 2000);
        s.put("b", CacheState::Empty, 2000);
        assert_eq!(s.state("a"), fetching);
        assert_eq!(s.state("b"), CacheState::Empty);
        // A second after the last use, and not before.
        assert!(!s.touch("a", 2999));
        assert!(s.touch("a", 3000));
        assert_eq!(s.0[0].used_ms, 3000);
        assert!(!s.touch("zzz", 9000));
        s.put("a", CacheState::Empty, 4000);
        assert_eq!((s.state("a"), s.0.len()), (CacheState::Empty, 2));
    }

    #[test]
    fn set_is_bounded_and_evicts_the_least_recently_used() {
        let mut s = Set::default();
        let lease = Lease {
            owner: 1,
            until_ms: 10,
        };
        for (i, h) in ["a", "b", "c", "d"].iter().enumerate() {
            s.put(
                h,
                CacheState::Fetching { lease, failures: 0 },
                i as u64 * 2000,
            );
        }
        assert!(s.touch("a", 9000)); // a is now the most recent
        assert!(!s.touch("a", 9500)); // not again within a second
        s.put("e", CacheState::Empty, 10_000);
        assert_eq!(s.0.len(), WAYS);
        let hs: Vec<&str> = s.0.iter().map(|e| e.h.as_str()).collect();
        assert!(!hs.contains(&"b"), "{hs:?}"); // b was least recently used
        assert!(hs.contains(&"a") && hs.contains(&"e"));
        assert_eq!(s.state("zzz"), CacheState::Empty);
    }

    #[test]
    fn exchanged_token_never_outlives_the_subject() {
        assert_eq!(capped_lifetime_ms(300_000, Some(10_000), 4_000), 6_000);
        assert_eq!(capped_lifetime_ms(3_000, Some(10_000), 4_000), 3_000);
        assert_eq!(capped_lifetime_ms(300_000, Some(1_000), 4_000), 1);
        assert_eq!(capped_lifetime_ms(300_000, None, 4_000), 300_000);
    }

    #[test]
    fn set_round_trips_and_garbage_is_empty() {
        let p = Policy::new(1000, 5000);
        let mut s = Set::default();
        s.put(
            "a",
            CacheState::Ready {
                token: Cached::new("tok".into(), 3, 60_000, 0, &p),
                failures: 0,
            },
            5,
        );
        assert_eq!(Set::decode(&s.encode()), s);
        assert_eq!(Set::decode(b""), Set::default());
    }
}
