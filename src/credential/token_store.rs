//! Token stores (SPEC v1.2), as data: the calls that read, write and delete the
//! record of an authorization_code connection (one per connection, or per
//! connection and caller), and what their answers mean. No I/O.
//!
//! - **Vault / OpenBao KV v2**: the record is the secret
//!   `<prefix>/<connection>/<caller>`; writes carry `options.cas` (the version
//!   read, 0 when there was none), so a proxy that lost a rotation race learns
//!   it and reads again. A disconnect deletes the metadata (every version).
//! - **Azure Key Vault**: the record is the JSON value of secret
//!   `<prefix>-<connection>-<caller>`. Key Vault has no compare-and-set: the
//!   write is read back, and a value other than the one written means another
//!   proxy wrote after it (the newer one wins). Key Vault keeps a deleted
//!   secret's name until it is purged, so a disconnect writes an empty record
//!   instead of deleting, and the next consent can write the name again.

use serde_json::{json, Value};

use crate::config::{TokenStore, TokenStoreKind};
use crate::credential::store::{call, from_transport, status_error, HttpCall, StoreError};
use crate::credential::token_response::transport;
use crate::secret::{check_value, Secret};

const KEY_VAULT_API: &str = "api-version=7.4";
/// Key Vault's longest secret name.
pub const MAX_KEY_VAULT_NAME: usize = 127;

/// A stored consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub refresh_token: Secret,
    /// KV v2: the version to compare-and-set against. Key Vault: 0.
    pub version: u64,
}

/// What a write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// Another writer came first (KV v2: the CAS didn't match).
    Conflict,
}

/// Key Vault's name of a record: `<prefix>-<connection>-<caller>` in its
/// `[0-9a-zA-Z-]` alphabet, `-` written `--` and `_` written `-u`, so that two
/// connections never share a name.
pub fn key_vault_name(prefix: &str, connection: &str, caller: &str) -> String {
    let mut name = String::with_capacity(prefix.len() + connection.len() * 2 + caller.len() + 2);
    name.push_str(prefix);
    name.push('-');
    for c in connection.chars() {
        match c {
            '-' => name.push_str("--"),
            '_' => name.push_str("-u"),
            c => name.push(c),
        }
    }
    name.push('-');
    name.push_str(caller);
    name
}

fn base(store: &TokenStore, method: &str, path: String, credential: &Secret) -> HttpCall {
    let mut c = call(
        &store.cluster,
        method,
        path,
        &store.authority,
        store.timeout_ms,
    );
    match &store.kind {
        TokenStoreKind::Vault { namespace, .. } => {
            c.secret_headers.push(("x-vault-token", credential.clone()));
            if let Some(ns) = namespace {
                c.headers.push(("x-vault-namespace", ns.clone()));
            }
        }
        TokenStoreKind::KeyVault { .. } => c.secret_headers.push((
            "authorization",
            Secret::new(format!("Bearer {}", credential.expose())),
        )),
    }
    c
}

fn key_vault_path(prefix: &str, connection: &str, caller: &str) -> String {
    format!(
        "/secrets/{}?{KEY_VAULT_API}",
        key_vault_name(prefix, connection, caller)
    )
}

/// Reads the record. `credential`: the Vault token, or the Key Vault identity's token.
pub fn read_call(
    store: &TokenStore,
    credential: &Secret,
    connection: &str,
    caller: &str,
) -> HttpCall {
    let path = match &store.kind {
        TokenStoreKind::Vault { data_path, .. } => format!("{data_path}/{connection}/{caller}"),
        TokenStoreKind::KeyVault { prefix, .. } => key_vault_path(prefix, connection, caller),
    };
    base(store, "GET", path, credential)
}

/// Writes the record: a refresh token and the scopes it was granted for, with
/// when (`now_s`). KV v2 compares-and-sets against `version`.
#[allow(clippy::too_many_arguments)]
pub fn write_call(
    store: &TokenStore,
    credential: &Secret,
    connection: &str,
    caller: &str,
    refresh_token: &Secret,
    scopes: &str,
    now_s: u64,
    version: u64,
) -> HttpCall {
    let data = json!({
        "refresh_token": refresh_token.expose(),
        "scopes": scopes,
        "updated": now_s,
    });
    let (method, path, body) = match &store.kind {
        TokenStoreKind::Vault { data_path, .. } => (
            "POST",
            format!("{data_path}/{connection}/{caller}"),
            json!({ "options": { "cas": version }, "data": data }),
        ),
        TokenStoreKind::KeyVault { prefix, .. } => (
            "PUT",
            key_vault_path(prefix, connection, caller),
            json!({ "value": data.to_string(), "contentType": "application/json" }),
        ),
    };
    let mut c = base(store, method, path, credential);
    c.headers
        .push(("content-type", "application/json".to_string()));
    c.body = Some(Secret::new(body.to_string()));
    c
}

/// Removes the record (a disconnect). Key Vault: an empty record (see the module doc).
pub fn delete_call(
    store: &TokenStore,
    credential: &Secret,
    connection: &str,
    caller: &str,
) -> HttpCall {
    match &store.kind {
        TokenStoreKind::Vault { metadata_path, .. } => base(
            store,
            "DELETE",
            format!("{metadata_path}/{connection}/{caller}"),
            credential,
        ),
        TokenStoreKind::KeyVault { prefix, .. } => {
            let mut c = base(
                store,
                "PUT",
                key_vault_path(prefix, connection, caller),
                credential,
            );
            c.headers
                .push(("content-type", "application/json".to_string()));
            c.body = Some(Secret::new(
                json!({ "value": "{}", "contentType": "application/json" }).to_string(),
            ));
            c
        }
    }
}

fn answer(status: Option<u32>, body: &[u8]) -> Result<(u32, Option<Value>), StoreError> {
    if let Some(e) = transport(status, body) {
        return Err(from_transport(e));
    }
    Ok((status.unwrap_or(0), serde_json::from_slice(body).ok()))
}

/// The record read, `Ok(None)` when there is none (never consented, or disconnected).
pub fn parse_read(
    kind: &TokenStoreKind,
    status: Option<u32>,
    body: &[u8],
) -> Result<Option<Record>, StoreError> {
    let (status, json) = answer(status, body)?;
    if status == 404 {
        return Ok(None);
    }
    if !(200..300).contains(&status) {
        return Err(status_error(status, json.as_ref()));
    }
    let json = json.ok_or(StoreError::Malformed)?;
    let (data, version) = match kind {
        TokenStoreKind::Vault { .. } => {
            let version = json
                .pointer("/data/metadata/version")
                .and_then(Value::as_u64)
                .ok_or(StoreError::Malformed)?;
            match json.pointer("/data/data") {
                // A deleted (not destroyed) latest version reads as no data.
                None | Some(Value::Null) => return Ok(None),
                Some(d) => (d.clone(), version),
            }
        }
        TokenStoreKind::KeyVault { .. } => {
            if json.pointer("/attributes/enabled") == Some(&Value::Bool(false)) {
                return Ok(None);
            }
            let text = json
                .get("value")
                .and_then(Value::as_str)
                .ok_or(StoreError::Malformed)?;
            (
                serde_json::from_str(text).map_err(|_| StoreError::Malformed)?,
                0,
            )
        }
    };
    let rt = match data.get("refresh_token") {
        // An empty record: a disconnect (Key Vault) or a record without consent.
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(StoreError::Malformed),
    };
    let refresh_token =
        check_value(Secret::new(rt), String::new).map_err(|_| StoreError::ControlCharacter)?;
    Ok(Some(Record {
        refresh_token,
        version,
    }))
}

/// The version a consent writes over (KV v2's compare-and-set): the record's,
/// 0 when there is none. A soft-deleted latest version reads as 404 but still
/// has its number, and only that number may write the record again.
pub fn parse_version(
    kind: &TokenStoreKind,
    status: Option<u32>,
    body: &[u8],
) -> Result<u64, StoreError> {
    let (status, json) = answer(status, body)?;
    if matches!(kind, TokenStoreKind::KeyVault { .. }) {
        return match status {
            404 => Ok(0),
            s if (200..300).contains(&s) => Ok(0),
            s => Err(status_error(s, json.as_ref())),
        };
    }
    let version = json
        .as_ref()
        .and_then(|j| j.pointer("/data/metadata/version"))
        .and_then(Value::as_u64);
    match (status, version) {
        (404, v) => Ok(v.unwrap_or(0)),
        (s, Some(v)) if (200..300).contains(&s) => Ok(v),
        (s, None) if (200..300).contains(&s) => Err(StoreError::Malformed),
        (s, _) => Err(status_error(s, json.as_ref())),
    }
}

/// A write's answer. KV v2 answers 400 naming the check-and-set when another
/// writer came first.
pub fn parse_write(
    kind: &TokenStoreKind,
    status: Option<u32>,
    body: &[u8],
) -> Result<Written, StoreError> {
    let (status, json) = answer(status, body)?;
    if (200..300).contains(&status) {
        return Ok(Written::Done);
    }
    let cas_mismatch = matches!(kind, TokenStoreKind::Vault { .. })
        && status == 400
        && json
            .as_ref()
            .and_then(|j| j.get("errors"))
            .and_then(Value::as_array)
            .is_some_and(|errors| {
                errors
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|e| e.contains("check-and-set"))
            });
    if cas_mismatch {
        return Ok(Written::Conflict);
    }
    Err(status_error(status, json.as_ref()))
}

/// A disconnect's answer: gone, or never there.
pub fn parse_delete(status: Option<u32>, body: &[u8]) -> Result<(), StoreError> {
    let (status, json) = answer(status, body)?;
    if (200..300).contains(&status) || status == 404 {
        return Ok(());
    }
    Err(status_error(status, json.as_ref()))
}

#[cfg(test)]
mod tests;
