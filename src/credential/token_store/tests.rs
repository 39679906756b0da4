//! Token store calls and answers, as data: Vault/OpenBao KV v2 and Azure Key Vault.

use std::collections::HashSet;

use serde_json::json;

use super::*;

fn vault(namespace: Option<&str>) -> TokenStore {
    TokenStore {
        name: "user_tokens".into(),
        kind: TokenStoreKind::Vault {
            token: Secret::new("vault-token-1"),
            namespace: namespace.map(str::to_string),
            data_path: "/v1/secret/data/latchkey/connections".into(),
            metadata_path: "/v1/secret/metadata/latchkey/connections".into(),
        },
        cluster: "vault".into(),
        authority: "vault.internal:8200".into(),
        timeout_ms: 4000,
    }
}

fn key_vault() -> TokenStore {
    TokenStore {
        name: "kv_tokens".into(),
        kind: TokenStoreKind::KeyVault {
            identity: 0,
            prefix: "latchkey-connections".into(),
        },
        cluster: "keyvault".into(),
        authority: "kv-gw.vault.azure.net".into(),
        timeout_ms: 3000,
    }
}

fn headers(call: &HttpCall) -> Vec<(&str, &str)> {
    call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn secret_headers(call: &HttpCall) -> Vec<(&str, &str)> {
    call.secret_headers
        .iter()
        .map(|(k, v)| (*k, v.expose()))
        .collect()
}

fn body(call: &HttpCall) -> Value {
    serde_json::from_str(call.body.as_ref().unwrap().expose()).unwrap()
}

const CALLER: &str = "2d93b77e4c54af105763c3d12c9e1f18";

#[test]
fn key_vault_names_escape_dash_and_underscore_so_no_two_connections_share_one() {
    assert_eq!(
        key_vault_name("latchkey-connections", "github_mine", CALLER),
        format!("latchkey-connections-github-umine-{CALLER}")
    );
    assert_eq!(key_vault_name("p", "a-b", "c"), "p-a--b-c");
    assert_eq!(key_vault_name("p", "a_b", "c"), "p-a-ub-c");
    assert_eq!(key_vault_name("p", "a--b", "c"), "p-a----b-c");
    assert_eq!(key_vault_name("p", "Ab9", "shared"), "p-Ab9-shared");
    let names = [
        "a-b", "a_b", "a--b", "a__b", "a-_b", "a_-b", "a-ub", "a_ub", "a-u", "a_u", "au", "a-",
        "a_", "a", "ab", "-a", "_a", "u",
    ];
    let mut seen = HashSet::new();
    for n in names {
        for caller in [CALLER, "shared"] {
            let name = key_vault_name("latchkey-connections", n, caller);
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{name}"
            );
            assert!(seen.insert(name.clone()), "{n} shares {name}");
        }
    }
}

#[test]
fn vault_reads_writes_and_deletes_the_record_under_its_prefix() {
    let store = vault(Some("team-a"));
    let token = Secret::new("vault-token-1");
    let read = read_call(&store, &token, "github_mine", CALLER);
    assert_eq!(read.cluster, "vault");
    assert_eq!(read.timeout_ms, 4000);
    let record_path = format!("/v1/secret/data/latchkey/connections/github_mine/{CALLER}");
    assert_eq!(
        headers(&read),
        [
            (":method", "GET"),
            (":path", record_path.as_str()),
            (":authority", "vault.internal:8200"),
            ("accept", "application/json"),
            ("x-vault-namespace", "team-a"),
        ]
    );
    assert_eq!(secret_headers(&read), [("x-vault-token", "vault-token-1")]);
    assert!(read.body.is_none());

    let write = write_call(
        &store,
        &token,
        "github_mine",
        CALLER,
        &Secret::new("rt-new"),
        "repo read:user",
        1_700_000_000,
        7,
    );
    assert_eq!(write.cluster, "vault");
    assert_eq!(write.timeout_ms, 4000);
    assert_eq!(
        headers(&write),
        [
            (":method", "POST"),
            (":path", record_path.as_str()),
            (":authority", "vault.internal:8200"),
            ("accept", "application/json"),
            ("x-vault-namespace", "team-a"),
            ("content-type", "application/json"),
        ]
    );
    assert_eq!(secret_headers(&write), [("x-vault-token", "vault-token-1")]);
    assert_eq!(
        body(&write),
        json!({ "options": { "cas": 7 },
                "data": { "refresh_token": "rt-new", "scopes": "repo read:user",
                          "updated": 1_700_000_000u64 } })
    );
    // A first consent compares-and-sets against version 0 (no record yet).
    let first = write_call(&store, &token, "c", "shared", &Secret::new("r"), "", 1, 0);
    assert_eq!(body(&first)["options"], json!({ "cas": 0 }));

    // A disconnect deletes every version: the metadata.
    let delete = delete_call(&store, &token, "github_mine", CALLER);
    let metadata_path = format!("/v1/secret/metadata/latchkey/connections/github_mine/{CALLER}");
    assert_eq!(
        headers(&delete),
        [
            (":method", "DELETE"),
            (":path", metadata_path.as_str()),
            (":authority", "vault.internal:8200"),
            ("accept", "application/json"),
            ("x-vault-namespace", "team-a"),
        ]
    );
    assert_eq!(
        secret_headers(&delete),
        [("x-vault-token", "vault-token-1")]
    );
    assert!(delete.body.is_none());

    // Without a namespace, no namespace header.
    let read = read_call(&vault(None), &token, "crm_team", "shared");
    assert!(read.headers.iter().all(|(k, _)| *k != "x-vault-namespace"));
    assert!(read.headers.contains(&(
        ":path",
        "/v1/secret/data/latchkey/connections/crm_team/shared".to_string()
    )));
}

#[test]
fn key_vault_reads_and_writes_a_json_value_and_a_disconnect_empties_it() {
    let store = key_vault();
    let token = Secret::new("kv-token");
    let path = format!("/secrets/latchkey-connections-github-umine-{CALLER}?api-version=7.4");
    let read = read_call(&store, &token, "github_mine", CALLER);
    assert_eq!(read.cluster, "keyvault");
    assert_eq!(read.timeout_ms, 3000);
    assert_eq!(
        headers(&read),
        [
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", "kv-gw.vault.azure.net"),
            ("accept", "application/json"),
        ]
    );
    assert_eq!(
        secret_headers(&read),
        [("authorization", "Bearer kv-token")]
    );
    assert!(read.body.is_none());

    let write = write_call(
        &store,
        &token,
        "github_mine",
        CALLER,
        &Secret::new("rt-new"),
        "repo",
        1_700_000_000,
        7,
    );
    assert_eq!(
        headers(&write),
        [
            (":method", "PUT"),
            (":path", path.as_str()),
            (":authority", "kv-gw.vault.azure.net"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
        ]
    );
    assert_eq!(
        secret_headers(&write),
        [("authorization", "Bearer kv-token")]
    );
    let b = body(&write);
    assert_eq!(b["contentType"], json!("application/json"));
    // No compare-and-set: the record is the value, as JSON text.
    let value: Value = serde_json::from_str(b["value"].as_str().unwrap()).unwrap();
    assert_eq!(
        value,
        json!({ "refresh_token": "rt-new", "scopes": "repo", "updated": 1_700_000_000u64 })
    );
    assert_eq!(b.as_object().unwrap().len(), 2);

    let delete = delete_call(&store, &token, "github_mine", CALLER);
    assert_eq!(
        headers(&delete),
        [
            (":method", "PUT"),
            (":path", path.as_str()),
            (":authority", "kv-gw.vault.azure.net"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
        ]
    );
    assert_eq!(
        secret_headers(&delete),
        [("authorization", "Bearer kv-token")]
    );
    assert_eq!(
        body(&delete),
        json!({ "value": "{}", "contentType": "application/json" })
    );
    // What a disconnect writes reads as no consent.
    let emptied = json!({ "value": "{}" }).to_string();
    assert_eq!(
        parse_read(&store.kind, Some(200), emptied.as_bytes()),
        Ok(None)
    );
}

fn kv2(data: Value, version: u64) -> Vec<u8> {
    json!({ "data": { "data": data, "metadata": { "version": version } } })
        .to_string()
        .into_bytes()
}

#[test]
fn a_vault_record_reads_as_its_refresh_token_and_version() {
    let kind = vault(None).kind;
    let read = |status: Option<u32>, body: &[u8]| parse_read(&kind, status, body);
    assert_eq!(
        read(
            Some(200),
            &kv2(
                json!({ "refresh_token": "rt-1", "scopes": "repo", "updated": 1 }),
                3
            )
        ),
        Ok(Some(Record {
            refresh_token: Secret::new("rt-1"),
            version: 3
        }))
    );
    // None: never consented, a deleted latest version, an empty record.
    assert_eq!(read(Some(404), br#"{"errors":[]}"#), Ok(None));
    assert_eq!(read(Some(404), b""), Ok(None));
    assert_eq!(read(Some(200), &kv2(Value::Null, 4)), Ok(None));
    assert_eq!(read(Some(200), &kv2(json!({}), 4)), Ok(None));
    assert_eq!(
        read(Some(200), &kv2(json!({ "refresh_token": null }), 4)),
        Ok(None)
    );
    assert_eq!(
        read(Some(200), &kv2(json!({ "refresh_token": "" }), 4)),
        Ok(None)
    );
    // Malformed: not JSON, no version, a refresh token that isn't a string.
    assert_eq!(read(Some(200), b"<html>"), Err(StoreError::Malformed));
    assert_eq!(
        read(
            Some(200),
            json!({ "data": { "data": { "refresh_token": "rt" } } })
                .to_string()
                .as_bytes()
        ),
        Err(StoreError::Malformed)
    );
    assert_eq!(
        read(Some(200), &kv2(json!({ "refresh_token": 5 }), 1)),
        Err(StoreError::Malformed)
    );
    assert_eq!(
        read(Some(200), &kv2(json!({ "refresh_token": "a\nb" }), 1)),
        Err(StoreError::ControlCharacter)
    );
    // Failures by status and transport.
    assert_eq!(
        read(Some(403), br#"{"errors":["permission denied"]}"#),
        Err(StoreError::Forbidden(403))
    );
    assert_eq!(read(Some(401), b""), Err(StoreError::Unauthorized));
    assert_eq!(read(Some(500), b""), Err(StoreError::Status(500)));
    assert_eq!(read(Some(302), b""), Err(StoreError::Status(302)));
    assert_eq!(read(None, b""), Err(StoreError::Connect));
    assert_eq!(
        read(Some(504), b"upstream request timeout"),
        Err(StoreError::Timeout)
    );
    assert_eq!(
        read(
            Some(200),
            &vec![b' '; crate::credential::token_response::MAX_BODY + 1]
        ),
        Err(StoreError::TooLarge)
    );
}

#[test]
fn a_key_vault_record_is_the_json_of_its_value() {
    let kind = key_vault().kind;
    let read =
        |status: Option<u32>, body: Value| parse_read(&kind, status, body.to_string().as_bytes());
    let value = json!({ "refresh_token": "rt-2", "scopes": "repo", "updated": 5 }).to_string();
    assert_eq!(
        read(
            Some(200),
            json!({ "value": value, "id": "https://kv/secrets/x/1" })
        ),
        Ok(Some(Record {
            refresh_token: Secret::new("rt-2"),
            version: 0
        }))
    );
    // A disabled secret, an empty record, none at all: no consent.
    assert_eq!(
        read(
            Some(200),
            json!({ "value": value, "attributes": { "enabled": false } })
        ),
        Ok(None)
    );
    assert_eq!(
        read(
            Some(200),
            json!({ "value": value, "attributes": { "enabled": true } })
        )
        .map(|r| r.is_some()),
        Ok(true)
    );
    assert_eq!(read(Some(200), json!({ "value": "{}" })), Ok(None));
    assert_eq!(
        read(Some(404), json!({ "error": { "code": "SecretNotFound" } })),
        Ok(None)
    );
    // A value that isn't the JSON latchkey writes, or none.
    assert_eq!(
        read(Some(200), json!({ "value": "rt-plain" })),
        Err(StoreError::Malformed)
    );
    assert_eq!(
        read(Some(200), json!({ "id": "x" })),
        Err(StoreError::Malformed)
    );
    assert_eq!(
        read(Some(200), json!({ "value": 5 })),
        Err(StoreError::Malformed)
    );
    let bad = json!({ "refresh_token": "rt\u{7f}" }).to_string();
    assert_eq!(
        read(Some(200), json!({ "value": bad })),
        Err(StoreError::ControlCharacter)
    );
    assert_eq!(
        read(Some(403), json!({ "error": { "code": "Forbidden" } })),
        Err(StoreError::Forbidden(403))
    );
}

#[test]
fn the_version_a_consent_writes_over() {
    let v = vault(None).kind;
    assert_eq!(
        parse_version(&v, Some(200), &kv2(json!({ "refresh_token": "r" }), 9)),
        Ok(9)
    );
    // None yet: 0. Soft-deleted: 404 that still names its version.
    assert_eq!(parse_version(&v, Some(404), br#"{"errors":[]}"#), Ok(0));
    assert_eq!(parse_version(&v, Some(404), &kv2(Value::Null, 4)), Ok(4));
    assert_eq!(
        parse_version(&v, Some(200), b"{}"),
        Err(StoreError::Malformed)
    );
    assert_eq!(
        parse_version(&v, Some(403), b"{}"),
        Err(StoreError::Forbidden(403))
    );
    assert_eq!(
        parse_version(&v, Some(500), &kv2(json!({}), 4)),
        Err(StoreError::Status(500))
    );
    assert_eq!(parse_version(&v, None, b""), Err(StoreError::Connect));
    // Key Vault has no versions to compare: 0 whatever it holds.
    let k = key_vault().kind;
    assert_eq!(parse_version(&k, Some(200), br#"{"value":"{}"}"#), Ok(0));
    assert_eq!(parse_version(&k, Some(404), b""), Ok(0));
    assert_eq!(
        parse_version(&k, Some(401), b""),
        Err(StoreError::Unauthorized)
    );
    assert_eq!(
        parse_version(&k, Some(500), b""),
        Err(StoreError::Status(500))
    );
    assert_eq!(
        parse_version(&k, Some(504), b"upstream request timeout"),
        Err(StoreError::Timeout)
    );
}

#[test]
fn a_write_is_done_or_lost_to_another_writer_or_failed() {
    let v = vault(None).kind;
    let cas = br#"{"errors":["check-and-set parameter did not match the current version"]}"#;
    assert_eq!(
        parse_write(&v, Some(200), br#"{"data":{"version":8}}"#),
        Ok(Written::Done)
    );
    assert_eq!(parse_write(&v, Some(204), b""), Ok(Written::Done));
    assert_eq!(parse_write(&v, Some(400), cas), Ok(Written::Conflict));
    // Another 400 is an error; so is the CAS message with another status.
    assert_eq!(
        parse_write(&v, Some(400), br#"{"errors":["no data provided"]}"#),
        Err(StoreError::Status(400))
    );
    assert_eq!(
        parse_write(&v, Some(400), b""),
        Err(StoreError::Status(400))
    );
    assert_eq!(
        parse_write(&v, Some(400), br#"{"errors":"check-and-set"}"#),
        Err(StoreError::Status(400))
    );
    assert_eq!(
        parse_write(&v, Some(500), cas),
        Err(StoreError::Status(500))
    );
    assert_eq!(
        parse_write(&v, Some(403), b""),
        Err(StoreError::Forbidden(403))
    );
    assert_eq!(parse_write(&v, None, b""), Err(StoreError::Connect));
    // Key Vault has no compare-and-set: a 400 is an error whatever it says.
    let k = key_vault().kind;
    assert_eq!(parse_write(&k, Some(200), b"{}"), Ok(Written::Done));
    assert_eq!(
        parse_write(&k, Some(400), cas),
        Err(StoreError::Status(400))
    );
}

#[test]
fn a_disconnect_is_done_when_the_record_is_gone_or_never_was() {
    assert_eq!(parse_delete(Some(204), b""), Ok(()));
    assert_eq!(parse_delete(Some(200), b"{}"), Ok(()));
    assert_eq!(parse_delete(Some(404), b""), Ok(()));
    assert_eq!(parse_delete(Some(500), b""), Err(StoreError::Status(500)));
    assert_eq!(
        parse_delete(Some(403), b""),
        Err(StoreError::Forbidden(403))
    );
    assert_eq!(parse_delete(Some(400), b""), Err(StoreError::Status(400)));
    assert_eq!(parse_delete(None, b""), Err(StoreError::Connect));
    assert_eq!(
        parse_delete(Some(504), b"upstream request timeout"),
        Err(StoreError::Timeout)
    );
}
