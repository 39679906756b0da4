//! The token server's answer (RFC 6749 §5.1 success, §5.2 error) as data.
//!
//! Envoy reports a failed call in-band: a reset reaches the filter with no
//! headers, and the async client answers a connect failure with its own 503
//! (`upstream connect error or disconnect/reset before headers…`) and a timeout
//! with its own 504 (`upstream request timeout`). [`parse`] maps those to
//! [`FetchError::Connect`] and [`FetchError::Timeout`].

use std::fmt;

use serde_json::Value;

use crate::secret::Secret;

/// Largest token response accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// A token from a successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub access_token: Secret,
    /// Lifetime from `expires_in`, or the configured default.
    pub lifetime_ms: u64,
    /// A new refresh token (rotation), if the server sent one.
    pub refresh_token: Option<Secret>,
}

/// Why no token came back. `Display` holds no secret: the server's `error`
/// code is kept (sanitized), never its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// No connection, or it was reset before a response.
    Connect,
    /// The provider's `timeout_ms` passed.
    Timeout,
    /// A non-2xx status without an RFC 6749 error body.
    Status(u32),
    /// An RFC 6749 §5.2 error (`invalid_client`, `invalid_grant`, …).
    OAuth {
        status: u32,
        code: String,
    },
    /// Not a JSON object, or a field of the wrong type.
    Malformed,
    MissingAccessToken,
    /// A `token_type` other than bearer (RFC 6750).
    WrongTokenType,
    /// Larger than [`MAX_BODY`].
    TooLarge,
    /// The call could not be made (e.g. an unknown cluster).
    Dispatch,
    /// authorization_code: the token store failed (read or write).
    TokenStore,
    /// private_key_jwt: the client assertion could not be signed.
    Signing,
    /// authorization_code: no consent stored, or the server refused the
    /// refresh token (`invalid_grant`): the caller must sign in again.
    NoConsent,
}

impl FetchError {
    /// A short stable name, for stats and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Connect => "connect",
            FetchError::Timeout => "timeout",
            FetchError::Status(_) => "status",
            FetchError::OAuth { .. } => "oauth_error",
            FetchError::Malformed => "malformed",
            FetchError::MissingAccessToken => "missing_token",
            FetchError::WrongTokenType => "wrong_token_type",
            FetchError::TooLarge => "too_large",
            FetchError::Dispatch => "dispatch",
            FetchError::TokenStore => "token_store",
            FetchError::Signing => "signing",
            FetchError::NoConsent => NO_CONSENT,
        }
    }

    pub const KINDS: [&'static str; 12] = [
        "connect",
        "timeout",
        "status",
        "oauth_error",
        "malformed",
        "missing_token",
        "wrong_token_type",
        "too_large",
        "dispatch",
        "token_store",
        "signing",
        NO_CONSENT,
    ];
}

/// The failure kind of a connection nobody consented to (yet).
pub const NO_CONSENT: &str = "consent_required";

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Status(s) => write!(f, "status: token server answered {s}"),
            FetchError::OAuth { status, code } => {
                write!(
                    f,
                    "oauth_error: token server answered {status} with error {code:?}"
                )
            }
            other => f.write_str(other.kind()),
        }
    }
}

/// A failure Envoy reports in-band for any dispatched call: a reset (no status),
/// its own 503 for a connect failure, its own 504 for a timeout, or a body over
/// [`MAX_BODY`].
pub fn transport(status: Option<u32>, body: &[u8]) -> Option<FetchError> {
    let Some(status) = status else {
        return Some(FetchError::Connect);
    };
    if body.len() > MAX_BODY {
        return Some(FetchError::TooLarge);
    }
    if status == 503
        && body.starts_with(b"upstream connect error or disconnect/reset before headers")
    {
        return Some(FetchError::Connect);
    }
    if status == 504 && body == b"upstream request timeout" {
        return Some(FetchError::Timeout);
    }
    None
}

/// Interprets a token response. `status` is `None` when the call was reset.
pub fn parse(
    status: Option<u32>,
    body: &[u8],
    default_lifetime_ms: u64,
) -> Result<Token, FetchError> {
    if let Some(e) = transport(status, body) {
        return Err(e);
    }
    let Some(status) = status else {
        return Err(FetchError::Connect);
    };
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if !(200..300).contains(&status) {
        let code = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .and_then(Value::as_str)
            .map(sanitize_code);
        return Err(match code {
            Some(code) => FetchError::OAuth { status, code },
            None => FetchError::Status(status),
        });
    }
    let Some(Value::Object(obj)) = json else {
        return Err(FetchError::Malformed);
    };
    let access_token = match obj.get("access_token") {
        None | Some(Value::Null) => return Err(FetchError::MissingAccessToken),
        Some(Value::String(s)) if s.is_empty() => return Err(FetchError::MissingAccessToken),
        // It goes into a header: visible ASCII only (RFC 6750 b64token is narrower still).
        Some(Value::String(s)) if s.bytes().all(|b| (0x21..0x7f).contains(&b)) => s.clone(),
        Some(_) => return Err(FetchError::Malformed),
    };
    match obj.get("token_type") {
        // RFC 6749 requires token_type; a server that omits it is taken to mean bearer.
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(FetchError::WrongTokenType),
    }
    let lifetime_ms = match obj.get("expires_in") {
        None | Some(Value::Null) => default_lifetime_ms,
        Some(v) => {
            let secs = match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            match secs {
                Some(s) if s.is_finite() && s >= 1.0 => (s.min(1e9) * 1000.0) as u64,
                _ => return Err(FetchError::Malformed),
            }
        }
    };
    let refresh_token = match obj.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.clone())),
        _ => None,
    };
    Ok(Token {
        access_token: Secret::new(access_token),
        lifetime_ms,
        refresh_token,
    })
}

/// An RFC 6749 error code is `%x20-21 / %x23-5B / %x5D-7E`; keep at most 64 such.
fn sanitize_code(code: &str) -> String {
    code.chars()
        .filter(|c| matches!(*c as u32, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e))
        .take(64)
        .collect()
}

/// How long token `t`, received at `now`, may be cached: its `expires_in`, but
/// never past its own `exp` when it is a JWT (a server may round `exp` down to
/// the second it issued it in and still say `expires_in: 5`, so the token dies
/// up to a second before `now + expires_in`), nor past the subject token's
/// `exp` (token exchange: a token obtained for a caller never outlives the
/// caller's own).
pub fn lifetime_ms(t: &Token, subject_exp_ms: Option<u64>, now: u64) -> u64 {
    use super::exchange::{capped_lifetime_ms, jwt_exp_ms};
    let own = capped_lifetime_ms(t.lifetime_ms, jwt_exp_ms(t.access_token.expose()), now);
    capped_lifetime_ms(own, subject_exp_ms, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_access_token_is_never_cached_past_its_own_exp() {
        use base64::Engine;
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = |exp: u64| {
            format!(
                "{}.{}.sig",
                b(r#"{"alg":"RS256"}"#),
                b(&format!(r#"{{"exp":{exp}}}"#))
            )
        };
        let token = |access: String, lifetime_ms: u64| Token {
            access_token: Secret::new(access),
            lifetime_ms,
            refresh_token: None,
        };
        // Issued at 100.9 s with exp 105 (rounded down) and expires_in 5: 4.1 s.
        let now = 100_900;
        assert_eq!(lifetime_ms(&token(jwt(105), 5_000), None, now), 4_100);
        // An exp later than expires_in changes nothing; nor does an opaque token.
        assert_eq!(lifetime_ms(&token(jwt(200), 5_000), None, now), 5_000);
        assert_eq!(
            lifetime_ms(&token("opaque".into(), 5_000), None, now),
            5_000
        );
        // The subject's exp caps it too (token exchange), and the earlier one wins.
        assert_eq!(
            lifetime_ms(&token(jwt(105), 5_000), Some(103_000), now),
            2_100
        );
        assert_eq!(
            lifetime_ms(&token("opaque".into(), 5_000), Some(103_000), now),
            2_100
        );
        // Already past exp: the shortest lifetime, never 0 or a wrap.
        assert_eq!(lifetime_ms(&token(jwt(100), 5_000), None, now), 1);
    }

    const DEFAULT: u64 = 300_000;

    fn ok(body: &str) -> Result<Token, FetchError> {
        parse(Some(200), body.as_bytes(), DEFAULT)
    }

    #[test]
    fn success_with_numeric_or_string_expires_in() {
        let t = ok(r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600}"#).unwrap();
        assert_eq!(t.access_token.expose(), "at-1");
        assert_eq!(t.lifetime_ms, 3_600_000);
        assert_eq!(t.refresh_token, None);
        let t = ok(r#"{"access_token":"a","token_type":"bearer","expires_in":"10"}"#).unwrap();
        assert_eq!(t.lifetime_ms, 10_000);
        let t = ok(r#"{"access_token":"a","token_type":"BEARER","expires_in":2.5}"#).unwrap();
        assert_eq!(t.lifetime_ms, 2_500);
    }

    #[test]
    fn missing_expires_in_uses_the_default_and_refresh_token_is_kept() {
        let t = ok(r#"{"access_token":"a","token_type":"Bearer","refresh_token":"rt-2"}"#).unwrap();
        assert_eq!(t.lifetime_ms, DEFAULT);
        assert_eq!(t.refresh_token.unwrap().expose(), "rt-2");
        assert_eq!(ok(r#"{"access_token":"a"}"#).unwrap().lifetime_ms, DEFAULT);
    }

    #[test]
    fn every_error_kind() {
        assert_eq!(parse(None, b"", DEFAULT), Err(FetchError::Connect));
        assert_eq!(
            parse(Some(503), b"upstream connect error or disconnect/reset before headers. reset reason: connection failure", DEFAULT),
            Err(FetchError::Connect)
        );
        assert_eq!(
            parse(Some(504), b"upstream request timeout", DEFAULT),
            Err(FetchError::Timeout)
        );
        assert_eq!(
            parse(Some(503), b"busy", DEFAULT),
            Err(FetchError::Status(503))
        );
        assert_eq!(parse(Some(500), b"", DEFAULT), Err(FetchError::Status(500)));
        assert_eq!(
            parse(
                Some(401),
                br#"{"error":"invalid_client","error_description":"secret s3cr wrong"}"#,
                DEFAULT
            ),
            Err(FetchError::OAuth {
                status: 401,
                code: "invalid_client".into()
            })
        );
        assert_eq!(ok("not json"), Err(FetchError::Malformed));
        assert_eq!(ok("[1]"), Err(FetchError::Malformed));
        assert_eq!(
            ok(r#"{"token_type":"Bearer"}"#),
            Err(FetchError::MissingAccessToken)
        );
        assert_eq!(
            ok(r#"{"access_token":""}"#),
            Err(FetchError::MissingAccessToken)
        );
        assert_eq!(ok(r#"{"access_token":5}"#), Err(FetchError::Malformed));
        assert_eq!(ok(r#"{"access_token":"a b"}"#), Err(FetchError::Malformed));
        assert_eq!(
            ok("{\"access_token\":\"a\\r\\nx: y\"}"),
            Err(FetchError::Malformed)
        );
        assert_eq!(
            ok(r#"{"access_token":"a","token_type":"mac"}"#),
            Err(FetchError::WrongTokenType)
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":0}"#),
            Err(FetchError::Malformed)
        );
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":"soon"}"#),
            Err(FetchError::Malformed)
        );
        let huge = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(MAX_BODY));
        assert_eq!(ok(&huge), Err(FetchError::TooLarge));
    }

    #[test]
    fn a_body_of_max_body_bytes_is_accepted() {
        assert_eq!(MAX_BODY, 65_536);
        let token = "a".repeat(MAX_BODY - r#"{"access_token":""}"#.len());
        let body = format!(r#"{{"access_token":"{token}"}}"#);
        assert_eq!(body.len(), MAX_BODY);
        assert_eq!(ok(&body).unwrap().access_token.expose(), token);
        assert_eq!(transport(Some(200), body.as_bytes()), None);
        assert_eq!(
            transport(Some(200), format!("{body} ").as_bytes()),
            Some(FetchError::TooLarge)
        );
    }

    #[test]
    fn envoys_own_answers_are_recognised_only_with_their_status() {
        assert_eq!(
            transport(Some(504), b"upstream request timeout"),
            Some(FetchError::Timeout)
        );
        assert_eq!(transport(Some(504), b"gateway timeout"), None);
        assert_eq!(transport(Some(200), b"upstream request timeout"), None);
        assert_eq!(
            transport(
                Some(200),
                b"upstream connect error or disconnect/reset before headers"
            ),
            None
        );
        assert_eq!(transport(Some(503), b"busy"), None);
    }

    #[test]
    fn an_empty_refresh_token_is_no_rotation() {
        let t = ok(r#"{"access_token":"a","refresh_token":""}"#).unwrap();
        assert_eq!(t.refresh_token, None);
    }

    #[test]
    fn error_display_holds_no_description_and_sanitized_code() {
        let e = parse(
            Some(400),
            br#"{"error":"bad\"\\code\n","error_description":"s3cr"}"#,
            DEFAULT,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "oauth_error: token server answered 400 with error \"badcode\""
        );
        assert_eq!(FetchError::Timeout.to_string(), "timeout");
        assert_eq!(FetchError::KINDS.len(), 12);
    }
}
