//! `private_key_jwt` client assertions (RFC 7523 §2.2, OpenID Connect Core §9),
//! as data: the unsigned JWT, the call that has a key service sign it (Azure Key
//! Vault `keys/<name>/sign`, or Vault / OpenBao Transit), what its answer
//! means, and the signed JWT. The private key never enters the proxy. No I/O.
//!
//! Each token request gets a new assertion: a fresh 128-bit `jti`, `iat` now and
//! `exp` [`LIFETIME_S`] later, `iss` = `sub` = `client_id`, `aud` = the token URL
//! (or `assertion_audience`).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD as B64};
use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::config::{JwsAlg, OAuth2Provider, SigningKey, SigningService};
use crate::credential::store::{call, HttpCall};
use crate::credential::token_response::{transport, FetchError};
use crate::secret::Secret;

/// How long an assertion is good for (SPEC: at most 5 minutes).
pub const LIFETIME_S: u64 = 300;

/// The JWT's first two parts, `base64url(header) "." base64url(claims)`: what is signed.
pub fn signing_input(provider: &OAuth2Provider, key: &SigningKey, now_s: u64, jti: &str) -> String {
    let mut header = Map::new();
    header.insert("alg".into(), key.alg.name().into());
    header.insert("typ".into(), "JWT".into());
    header.insert("kid".into(), key.kid.clone().into());
    if let Some(t) = &key.x5t_s256 {
        header.insert("x5t#S256".into(), t.clone().into());
    }
    let aud = key.audience.as_deref().unwrap_or(&provider.token_url);
    let claims = json!({
        "iss": provider.client_id,
        "sub": provider.client_id,
        "aud": aud,
        "jti": jti,
        "iat": now_s,
        "exp": now_s + LIFETIME_S,
    });
    format!(
        "{}.{}",
        B64.encode(Value::Object(header).to_string()),
        B64.encode(claims.to_string())
    )
}

/// A fresh `jti`: 128 unpredictable bits, hex.
pub fn jti(a: u64, b: u64) -> String {
    format!("{a:016x}{b:016x}")
}

/// The call that signs `input`. `credential`: the Key Vault identity's token,
/// or the Vault token.
pub fn sign_call(key: &SigningKey, credential: &Secret, input: &str) -> HttpCall {
    let (cluster, authority, path) = match &key.service {
        SigningService::KeyVault {
            cluster,
            authority,
            path,
            ..
        }
        | SigningService::VaultTransit {
            cluster,
            authority,
            path,
            ..
        } => (cluster, authority, path),
    };
    let mut c = call(cluster, "POST", path.clone(), authority, key.timeout_ms);
    c.headers
        .push(("content-type", "application/json".to_string()));
    let body = match &key.service {
        SigningService::KeyVault { .. } => {
            c.secret_headers.push((
                "authorization",
                Secret::new(format!("Bearer {}", credential.expose())),
            ));
            // Key Vault signs a digest the client made (RS256/PS256/ES256: SHA-256).
            json!({ "alg": key.alg.name(), "value": B64.encode(Sha256::digest(input.as_bytes())) })
        }
        SigningService::VaultTransit { namespace, .. } => {
            c.secret_headers.push(("x-vault-token", credential.clone()));
            if let Some(ns) = namespace {
                c.headers.push(("x-vault-namespace", ns.clone()));
            }
            // Transit hashes the input itself (sha2-256 in the path); `jws` gives the
            // signature as JWS wants it (ECDSA as r||s, base64url).
            let mut b = Map::new();
            b.insert("input".into(), STANDARD.encode(input).into());
            b.insert("marshaling_algorithm".into(), "jws".into());
            match key.alg {
                JwsAlg::Rs256 => {
                    b.insert("signature_algorithm".into(), "pkcs1v15".into());
                }
                JwsAlg::Ps256 => {
                    b.insert("signature_algorithm".into(), "pss".into());
                    b.insert("salt_length".into(), "hash".into());
                }
                JwsAlg::Es256 => {}
            }
            Value::Object(b)
        }
    };
    c.body = Some(Secret::new(body.to_string()));
    c
}

/// Why no signature came back. `Display` holds no signature and no body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignError {
    Connect,
    Timeout,
    /// 401/403: the identity or token may not sign with this key.
    Forbidden(u32),
    Status(u32),
    /// Not the answer's shape, or a signature of the wrong size for `alg`.
    Malformed,
}

impl SignError {
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::Connect => "connect",
            SignError::Timeout => "timeout",
            SignError::Forbidden(_) => "forbidden",
            SignError::Status(_) => "status",
            SignError::Malformed => "malformed",
        }
    }

    pub const KINDS: [&'static str; 5] = ["connect", "timeout", "forbidden", "status", "malformed"];
}

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SignError::Forbidden(s) | SignError::Status(s) => {
                write!(f, "{} (HTTP {s})", self.kind())
            }
            other => f.write_str(other.kind()),
        }
    }
}

/// The signature (base64url, as a JWS holds it) from the key service's answer.
pub fn parse_signature(
    key: &SigningKey,
    status: Option<u32>,
    body: &[u8],
) -> Result<String, SignError> {
    if let Some(e) = transport(status, body) {
        return Err(match e {
            FetchError::Timeout => SignError::Timeout,
            // Larger than any signature answer (as when the glue hands no body).
            FetchError::TooLarge => SignError::Malformed,
            _ => SignError::Connect,
        });
    }
    let status = status.unwrap_or(0);
    match status {
        200..=299 => {}
        401 | 403 => return Err(SignError::Forbidden(status)),
        s => return Err(SignError::Status(s)),
    }
    let json: Value = serde_json::from_slice(body).map_err(|_| SignError::Malformed)?;
    let sig = match &key.service {
        SigningService::KeyVault { .. } => json.get("value").and_then(Value::as_str),
        SigningService::VaultTransit { .. } => json
            .pointer("/data/signature")
            .and_then(Value::as_str)
            .and_then(|s| s.strip_prefix("vault:"))
            .and_then(|s| s.split_once(':'))
            .map(|(_, sig)| sig),
    }
    .ok_or(SignError::Malformed)?;
    // As a JWS holds it: base64url without padding, and the size the algorithm gives.
    let raw = B64.decode(sig).map_err(|_| SignError::Malformed)?;
    let size_ok = match key.alg {
        JwsAlg::Es256 => raw.len() == 64,
        JwsAlg::Rs256 | JwsAlg::Ps256 => raw.len() >= 256 && raw.len() <= 1024,
    };
    if !size_ok {
        return Err(SignError::Malformed);
    }
    Ok(sig.to_string())
}

/// The signed assertion.
pub fn assemble(input: &str, signature: &str) -> Secret {
    Secret::new(format!("{input}.{signature}"))
}

#[cfg(test)]
mod tests;
