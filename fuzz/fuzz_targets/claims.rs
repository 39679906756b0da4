//! The two claim sources, on arbitrary bytes, and the protobuf round trip.
//!
//! Invariants:
//! - (a) `Identity::from_header` never panics on the raw input, and on the input
//!   base64url-encoded (padded and unpadded) it agrees with JSON: the claims of
//!   `Identity::from_json` when the input is a JSON object, `NotObject` for other
//!   JSON, `BadJson` otherwise.
//! - (b) `Identity::from_metadata` never panics on the raw input (as serialized
//!   dynamic metadata).
//! - (c) when the input is JSON, `pb::encode::metadata` then `pb::payload` gives
//!   the value back with numbers as a protobuf `Struct` holds them (a double:
//!   integral and below 2^53 in magnitude reads as an integer, NaN/inf as null),
//!   or `Err` exactly when the nesting exceeds `pb::MAX_DEPTH`; and
//!   `from_metadata` of those bytes gives the claims of that value.

#![no_main]

use latchkey::claims::{ClaimsError, Identity, JWT_AUTHN};
use latchkey::config::ClaimPath;
use latchkey::pb;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn b64url(data: &[u8], pad: bool) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// A JSON number as a `google.protobuf.Value` double reads back.
fn as_double(n: &serde_json::Number) -> Value {
    let f = n.as_f64().unwrap_or(0.0);
    if f.is_finite() && f.trunc() == f && f.abs() < 9_007_199_254_740_992.0 {
        Value::from(f as i64)
    } else {
        // `From<f64>` is null for NaN and the infinities.
        Value::from(f)
    }
}

fn through_protobuf(v: &Value) -> Value {
    match v {
        Value::Number(n) => as_double(n),
        Value::Array(items) => Value::Array(items.iter().map(through_protobuf).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), through_protobuf(v)))
                .collect::<Map<String, Value>>(),
        ),
        other => other.clone(),
    }
}

/// The deepest message nesting the reader meets for a `Value` read at `depth`:
/// an object or list is a `Struct`/`ListValue` one level below its `Value`, and
/// its members are `Value`s one level below that.
fn message_depth(v: &Value, depth: usize) -> usize {
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(items) => Box::new(items.iter()),
        Value::Object(map) => Box::new(map.values()),
        _ => return depth,
    };
    children
        .map(|c| message_depth(c, depth + 2))
        .fold(depth + 1, usize::max)
}

fuzz_target!(|data: &[u8]| {
    let paths = ["sub", "groups", "a.b"].map(ClaimPath::new);

    // (a) and (b): no panic on anything.
    let _ = Identity::from_header(data, &paths, true);
    let _ = Identity::from_metadata(data, "payload", &paths, true);

    let doc = serde_json::from_slice::<Value>(data);

    // (a) The input as a well-formed header.
    let want = match &doc {
        Ok(v) if v.is_object() => Ok(Identity::from_json(v, &paths).expect("an object")),
        Ok(_) => Err(ClaimsError::NotObject),
        Err(_) => Err(ClaimsError::BadJson),
    };
    for pad in [false, true] {
        let header = b64url(data, pad);
        assert_eq!(
            Identity::from_header(header.as_bytes(), &paths, false),
            want,
            "header {header:?}"
        );
    }

    // (c) Round trip through the protobuf encoding.
    let Ok(value) = doc else {
        return;
    };
    let bytes = pb::encode::metadata(JWT_AUTHN, "payload", &value);
    let got = pb::payload(&bytes, JWT_AUTHN, "payload");
    // Metadata › Struct (depth 0) › the payload's Value (depth 1) › …
    if message_depth(&value, 1) > pb::MAX_DEPTH {
        assert_eq!(got, Err(()), "nesting beyond MAX_DEPTH was read");
        assert_eq!(
            Identity::from_metadata(&bytes, "payload", &paths, false),
            Err(ClaimsError::BadMetadata)
        );
        return;
    }
    let expected = through_protobuf(&value);
    assert_eq!(got, Ok(Some(expected.clone())), "round trip");
    let claims = Identity::from_metadata(&bytes, "payload", &paths, false);
    match Identity::from_json(&expected, &paths) {
        Some(id) => assert_eq!(claims, Ok(Some(id))),
        None => assert_eq!(claims, Err(ClaimsError::BadMetadata)),
    }
    // Another key or filter: no payload.
    assert_eq!(pb::payload(&bytes, JWT_AUTHN, "other"), Ok(None));
    assert_eq!(pb::payload(&bytes, "envoy.lb", "payload"), Ok(None));
});
