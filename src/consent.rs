//! User-delegated connections (SPEC v1.2): the pure parts of a person's consent.
//!
//! - **Who.** A caller is known to stores and caches by [`caller_hash`] of their
//!   `iss` and subject, never by the raw subject.
//! - **Login.** [`login_location`] is the authorization request (RFC 6749 §4.1.1)
//!   with PKCE S256 (RFC 7636) and a [`State`] signed with HMAC-SHA256, so that
//!   any proxy holding the key can finish a login another proxy started. The PKCE
//!   verifier is derived from the state's nonce with the same key: nothing about
//!   a login is kept between its two requests except which states were used.
//! - **Callback.** [`verify_state`] checks the signature and expiry, [`Used`]
//!   admits each state once, [`callback_params`] reads the query strictly.
//! - **Where to.** [`allowed_return_to`] admits only URLs under a configured prefix.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, Connection, Consent, Credential, Grant, ProviderKind};
use crate::secret::Secret;

type HmacSha256 = Hmac<Sha256>;

/// How long a login may take, from the 302 to the callback.
pub const STATE_TTL_MS: u64 = 10 * 60 * 1000;
/// States remembered as used, per proxy; a full list refuses new callbacks
/// (503) rather than forget one that is still valid.
pub const MAX_USED_STATES: usize = 4096;
/// Longest `return_to` accepted.
const MAX_RETURN_TO: usize = 2048;

/// A caller as this proxy's caches know them: their token's issuer and their
/// subject. Kept in memory only; stores, states and logs see [`hash_of_key`].
/// `None` when either holds a NUL (the separator: two callers could share a key).
pub fn caller_key(iss: &str, sub: &str) -> Option<String> {
    (!iss.contains('\0') && !sub.contains('\0')).then(|| format!("{iss}\0{sub}"))
}

/// A caller as stores and states know them: 128 bits of SHA-256 over their
/// issuer and subject, hex. The same person at two issuers is two callers.
pub fn caller_hash(iss: &str, sub: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"latchkey.caller\0");
    h.update(iss.as_bytes());
    h.update(b"\0");
    h.update(sub.as_bytes());
    hex(h.finalize().get(..16).unwrap_or_default())
}

/// [`caller_hash`] of a [`caller_key`].
pub fn hash_of_key(key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"latchkey.caller\0");
    h.update(key.as_bytes());
    hex(h.finalize().get(..16).unwrap_or_default())
}

/// 64 unpredictable bits for a state's nonce: SipHash under keys std drew
/// from the host's `random_get` (WASI), fresh per call (std moves its keys on).
/// Not a counter anyone outside can follow, unlike the broker's splitmix ids.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x636f_6e73_656e_7421);
    h.finish()
}

/// The record of a shared (not per-user) connection.
pub const SHARED: &str = "shared";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac(key: &Secret, domain: &[u8], data: &[u8]) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(key.expose().as_bytes()).ok()?;
    m.update(domain);
    m.update(data);
    Some(m)
}

/// What a consent state carries from the login to the callback. Readable by
/// the browser and the authorization server (it is signed, not encrypted): it
/// holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The connection.
    #[serde(rename = "c")]
    pub connection: String,
    /// [`caller_hash`] of who started the login.
    #[serde(rename = "u")]
    pub caller: String,
    /// 128 random bits, hex: makes the state unique and derives the PKCE verifier.
    #[serde(rename = "n")]
    pub nonce: String,
    /// Expiry, ms since the epoch.
    #[serde(rename = "e")]
    pub expires_ms: u64,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub return_to: Option<String>,
}

/// `base64url(payload) "." base64url(HMAC-SHA256(key, payload))`.
pub fn sign_state(key: &Secret, state: &State) -> String {
    let payload = B64.encode(serde_json::to_vec(state).unwrap_or_default());
    let tag = mac(key, b"latchkey.state\0", payload.as_bytes())
        .map(|m| B64.encode(m.finalize().into_bytes()))
        .unwrap_or_default();
    format!("{payload}.{tag}")
}

/// Why a callback's state is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// Not `payload.tag`, or the tag doesn't match: forged or tampered with.
    BadSignature,
    /// Signed, but not a state of this version.
    Malformed,
    Expired,
}

impl StateError {
    pub fn reason(self) -> &'static str {
        match self {
            StateError::BadSignature => "state_invalid",
            StateError::Malformed => "state_invalid",
            StateError::Expired => "state_expired",
        }
    }
}

/// The state of a callback, if `key` signed it and it hasn't expired.
pub fn verify_state(key: &Secret, text: &str, now_ms: u64) -> Result<State, StateError> {
    let (payload, tag) = text.split_once('.').ok_or(StateError::BadSignature)?;
    let tag = B64.decode(tag).map_err(|_| StateError::BadSignature)?;
    let m = mac(key, b"latchkey.state\0", payload.as_bytes()).ok_or(StateError::BadSignature)?;
    m.verify_slice(&tag).map_err(|_| StateError::BadSignature)?;
    let json = B64.decode(payload).map_err(|_| StateError::Malformed)?;
    let state: State = serde_json::from_slice(&json).map_err(|_| StateError::Malformed)?;
    if now_ms >= state.expires_ms {
        return Err(StateError::Expired);
    }
    Ok(state)
}

/// The PKCE verifier of a login (RFC 7636 §4.1: 43 characters of base64url):
/// derived from its nonce with the state key, so only a holder of the key can
/// redeem the code.
pub fn pkce_verifier(key: &Secret, nonce: &str) -> Secret {
    let v = mac(key, b"latchkey.pkce\0", nonce.as_bytes())
        .map(|m| B64.encode(m.finalize().into_bytes()))
        .unwrap_or_default();
    Secret::new(v)
}

/// `BASE64URL(SHA256(verifier))` (RFC 7636 §4.2, S256).
pub fn pkce_challenge(verifier: &Secret) -> String {
    B64.encode(Sha256::digest(verifier.expose().as_bytes()))
}

/// The authorization request's URL (the login's 302 `location`): the
/// provider's `authorization_url`, its own query kept, with `response_type`,
/// `client_id`, `redirect_uri`, `scope`, `state`, the PKCE challenge, and the
/// connection's `audience`, `resource` and `extra_params`.
pub fn login_location(
    config: &Config,
    consent: &Consent,
    connection: &Connection,
    state: &State,
    signed: &str,
) -> Option<String> {
    let Credential::OAuth2(oc) = &connection.credential else {
        return None;
    };
    let Some(ProviderKind::OAuth2(p)) = config.provider_of(connection).map(|p| &p.kind) else {
        return None;
    };
    let base = p.authorization_url.as_deref()?;
    let challenge = pkce_challenge(&pkce_verifier(&consent.state_key, &state.nonce));
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code");
    q.append_pair("client_id", &p.client_id);
    q.append_pair("redirect_uri", &consent.redirect_uri);
    if !oc.scopes.is_empty() {
        q.append_pair("scope", &oc.scopes.join(" "));
    }
    q.append_pair("state", signed);
    q.append_pair("code_challenge", &challenge);
    q.append_pair("code_challenge_method", "S256");
    if let Some(a) = &oc.audience {
        q.append_pair("audience", a);
    }
    if let Some(r) = &oc.resource {
        q.append_pair("resource", r);
    }
    for (k, v) in &oc.extra_params {
        q.append_pair(k, v);
    }
    // The authorization URL's own query stays, first.
    let sep = if !base.contains('?') {
        "?"
    } else if base.ends_with(['?', '&']) {
        ""
    } else {
        "&"
    };
    Some(format!("{base}{sep}{}", q.finish()))
}

/// `candidate` if it starts with one of `prefixes` (each `scheme://host/…/`,
/// as [`crate::config`] wrote it) and is printable ASCII; `None` otherwise.
pub fn allowed_return_to(prefixes: &[String], candidate: &str) -> Option<String> {
    // Printable ASCII only (no spaces, controls or backslashes a browser would
    // read differently), and under a prefix that ends in `/`: the same origin.
    let plain = candidate.len() <= MAX_RETURN_TO
        && candidate
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\\');
    let rest = prefixes
        .iter()
        .find_map(|p| candidate.strip_prefix(p.as_str()))
        .filter(|_| plain)?;
    // Nor a path the browser would resolve out of the prefix (`..`, `.`, or
    // either percent-encoded).
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    let dots = path
        .split('/')
        .any(|seg| seg == "." || seg == ".." || seg.to_ascii_lowercase().contains("%2e"));
    (!dots).then(|| candidate.to_string())
}

/// States used on this proxy, with their expiry: a state is accepted once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Used(pub Vec<(String, u64)>);

/// Why a state can't be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Used before.
    Replayed,
    /// [`MAX_USED_STATES`] unexpired states are remembered: try again later.
    Full,
}

impl Used {
    pub fn decode(bytes: &[u8]) -> Used {
        serde_json::from_slice(bytes).unwrap_or_default()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Admits `state` (forgetting expired ones), or says why not.
    pub fn admit(&mut self, state: &State, now_ms: u64) -> Result<(), Replay> {
        self.0.retain(|(_, exp)| *exp > now_ms);
        if self.0.iter().any(|(n, _)| *n == state.nonce) {
            return Err(Replay::Replayed);
        }
        if self.0.len() >= MAX_USED_STATES {
            return Err(Replay::Full);
        }
        self.0.push((state.nonce.clone(), state.expires_ms));
        Ok(())
    }
}

/// A callback's query (RFC 6749 §4.1.2, RFC 9207): each parameter at most once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CallbackParams {
    pub code: Option<Secret>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub iss: Option<String>,
}

/// The callback query, or `None` when a parameter latchkey reads is repeated
/// (two readings of one request: refused).
pub fn callback_params(query: &[u8]) -> Option<CallbackParams> {
    let mut out = CallbackParams::default();
    for (k, v) in url::form_urlencoded::parse(query) {
        let slot = match k.as_ref() {
            "code" => {
                if out.code.is_some() {
                    return None;
                }
                out.code = Some(Secret::new(v.into_owned()));
                continue;
            }
            "state" => &mut out.state,
            "error" => &mut out.error,
            "iss" => &mut out.iss,
            _ => continue,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(v.into_owned());
    }
    Some(out)
}

/// A request to one of latchkey's consent endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET <path>/<connection>/login`.
    Login(usize),
    /// `DELETE <path>/<connection>`.
    Disconnect(usize),
    /// `GET <callback path>`.
    Callback,
    /// Under `<path>/` but none of the above (another method, an unknown
    /// connection): answered by latchkey, never forwarded.
    Unknown,
}

/// Which consent endpoint `path_only` (without its query) is, if any.
pub fn endpoint(
    config: &Config,
    consent: &Consent,
    method: &str,
    path_only: &[u8],
) -> Option<Endpoint> {
    if path_only == consent.callback_path.as_bytes() {
        return Some(if method == "GET" {
            Endpoint::Callback
        } else {
            Endpoint::Unknown
        });
    }
    let rest = path_only
        .strip_prefix(consent.path.as_bytes())
        .filter(|r| r.is_empty() || r.starts_with(b"/"))?;
    let rest = rest.strip_prefix(b"/").unwrap_or_default();
    let (name, login) = match rest.strip_suffix(b"/login") {
        Some(name) => (name, true),
        None => (rest, false),
    };
    let index = config
        .connections
        .iter()
        .position(|c| c.name.as_bytes() == name && is_delegated(c));
    Some(match (index, login, method) {
        (Some(i), true, "GET") => Endpoint::Login(i),
        (Some(i), false, "DELETE") => Endpoint::Disconnect(i),
        _ => Endpoint::Unknown,
    })
}

/// Whether a connection is an authorization_code one.
pub fn is_delegated(c: &Connection) -> bool {
    matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { .. }))
}

/// Whether every caller consents for themselves on this connection.
pub fn is_per_user(c: &Connection) -> bool {
    matches!(&c.credential, Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { per_user: true, .. }))
}

/// The login URL a `consent_required` answer names.
pub fn login_path(consent: &Consent, connection: &Connection) -> String {
    format!("{}/{}/login", consent.path, connection.name)
}

#[cfg(test)]
mod tests;
