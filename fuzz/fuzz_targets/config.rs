//! `Config::parse` on arbitrary bytes, with every environment variable set to a
//! sentinel secret.
//!
//! Invariants:
//! - it never panics;
//! - on `Err`, neither `Display` nor `Debug` of the error holds the sentinel;
//! - on `Ok`, `Debug` of the whole configuration does not hold it;
//! - latchkey's own JSON tree (`config::json::Value`) reads what
//!   `serde_json::Value` reads: the same value, or the same error.
//!
//! An input that itself spells the sentinel in a JSON string (key or value,
//! after unescaping) is skipped: latchkey quotes configured names and values in
//! its messages on purpose, and those are not secrets.

#![no_main]

use latchkey::config::Config;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const SENTINEL: &str = "SENTINEL-S3CRET-VALUE";

fn spells_sentinel(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains(SENTINEL),
        Value::Array(items) => items.iter().any(spells_sentinel),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains(SENTINEL) || spells_sentinel(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let theirs = serde_json::from_slice::<Value>(data);
    match (latchkey::config::json::Value::parse(data), &theirs) {
        (Ok(ours), Ok(theirs)) => assert_eq!(&ours.to_serde(), theirs, "read differently"),
        (Err(ours), Err(theirs)) => assert_eq!(ours.to_string(), theirs.to_string()),
        (ours, theirs) => panic!("one reading failed: ours {ours:?}, serde_json {theirs:?}"),
    }
    if let Ok(doc) = theirs {
        if spells_sentinel(&doc) {
            return;
        }
    }
    let env = |_: &str| Some(SENTINEL.to_string());
    match Config::parse(data, &env) {
        Ok(config) => {
            let dump = format!("{config:?}");
            assert!(
                !dump.contains(SENTINEL),
                "secret value in Debug of the configuration: {dump}"
            );
        }
        Err(err) => {
            let shown = err.to_string();
            assert!(
                !shown.contains(SENTINEL),
                "secret value in the error message: {shown}"
            );
            let debug = format!("{err:?}");
            assert!(
                !debug.contains(SENTINEL),
                "secret value in Debug of the error: {debug}"
            );
        }
    }
});
