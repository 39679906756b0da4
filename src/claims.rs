//! The caller's claims, decoded from what `jwt_authn` left behind.
//!
//! Two sources (see `claims.from`):
//! - `jwt_metadata`: the glue reads each needed claim with `get_property` under
//!   `metadata.filter_metadata["envoy.filters.http.jwt_authn"].<key>.<claim path>`
//!   and hands the raw bytes to [`decode_property`]. Envoy serializes strings as
//!   their bytes, numbers as 8-byte little-endian f64, booleans as one byte and
//!   lists/objects in the proxy-wasm pairs encoding, with no type tag: the
//!   decoding below tells them apart by shape (see [`decode_property`]).
//! - `header`: base64url JSON (padding optional) that [`Identity::from_header`]
//!   decodes. A malformed header is an error (the filter answers 401).
//!
//! An [`Identity`] holds one value per claim the configuration reads
//! (`Config::claim_paths`), so policy checks index instead of searching.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::Value;

use crate::config::{ClaimPath, GROUPS_CLAIM, SUBJECT_CLAIM};
use crate::pairs::decode_pairs;

/// A claim's value, reduced to what policies compare.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimValue {
    /// A string, or a number or boolean as its JSON text.
    Scalar(String),
    /// An array, each element as text.
    List(Vec<String>),
    /// An object: present, but no value to compare.
    Object,
}

impl ClaimValue {
    /// Whether this claim "holds" `want`: a list or a space-separated string holds
    /// each of its elements; a number or boolean compares as its JSON text.
    pub fn holds(&self, want: &str) -> bool {
        match self {
            ClaimValue::Scalar(s) => s == want || s.split(' ').any(|e| e == want),
            ClaimValue::List(items) => items.iter().any(|e| e == want),
            ClaimValue::Object => false,
        }
    }
}

/// A caller with claims. No claims at all is `Option<Identity>::None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    values: Vec<Option<ClaimValue>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimsError {
    /// The claims header is not base64url.
    BadBase64,
    /// The decoded header is not JSON.
    BadJson,
    /// The JSON is not an object.
    NotObject,
}

impl std::fmt::Display for ClaimsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClaimsError::BadBase64 => "claims header is not base64url",
            ClaimsError::BadJson => "claims header is not JSON",
            ClaimsError::NotObject => "claims header is not a JSON object",
        })
    }
}

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Identity {
    pub fn new(values: Vec<Option<ClaimValue>>) -> Self {
        Identity { values }
    }

    /// Decodes a `forward_payload_header`-style header value.
    pub fn from_header(value: &[u8], paths: &[ClaimPath]) -> Result<Identity, ClaimsError> {
        let value = value.trim_ascii();
        let json = B64URL.decode(value).map_err(|_| ClaimsError::BadBase64)?;
        let doc: Value = serde_json::from_slice(&json).map_err(|_| ClaimsError::BadJson)?;
        if !doc.is_object() {
            return Err(ClaimsError::NotObject);
        }
        let values = paths
            .iter()
            .map(|p| {
                p.segments
                    .iter()
                    .try_fold(&doc, |v, seg| v.get(seg))
                    .and_then(from_json)
            })
            .collect();
        Ok(Identity { values })
    }

    pub fn claim(&self, i: usize) -> Option<&ClaimValue> {
        self.values.get(i).and_then(Option::as_ref)
    }

    pub fn subject(&self) -> Option<&str> {
        match self.claim(SUBJECT_CLAIM)? {
            ClaimValue::Scalar(s) => Some(s),
            _ => None,
        }
    }

    /// The caller's groups: an array claim, or a space-separated string.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        let (list, scalar): (&[String], Option<&str>) = match self.claim(GROUPS_CLAIM) {
            Some(ClaimValue::List(items)) => (items, None),
            Some(ClaimValue::Scalar(s)) => (&[], Some(s)),
            _ => (&[], None),
        };
        list.iter()
            .map(String::as_str)
            .chain(scalar.into_iter().flat_map(|s| s.split(' ')))
            .filter(|g| !g.is_empty())
    }
}

fn from_json(v: &Value) -> Option<ClaimValue> {
    match v {
        Value::Null => None,
        Value::Object(_) => Some(ClaimValue::Object),
        Value::Array(items) => Some(ClaimValue::List(
            items.iter().filter_map(scalar_text).collect(),
        )),
        other => scalar_text(other).map(ClaimValue::Scalar),
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Decodes one claim as Envoy's `get_property` returns it from jwt_authn metadata.
///
/// Envoy gives no type tag, so the shape decides, in this order:
/// 1. a well-formed pairs encoding that consumes every byte is a list (all values
///    empty) or an object;
/// 2. one byte 0 or 1 is a boolean;
/// 3. eight bytes that are not printable UTF-8 text are an f64 (every integer-valued
///    number has zero bytes in its encoding);
/// 4. anything else is a UTF-8 string; bytes that are not UTF-8 are no value.
pub fn decode_property(bytes: &[u8]) -> Option<ClaimValue> {
    if let Some(pairs) = decode_pairs(bytes) {
        if pairs.iter().all(|(_, v)| v.is_empty()) {
            return Some(ClaimValue::List(
                pairs.iter().filter_map(|(k, _)| scalar_bytes(k)).collect(),
            ));
        }
        return Some(ClaimValue::Object);
    }
    scalar_bytes(bytes).map(ClaimValue::Scalar)
}

fn scalar_bytes(bytes: &[u8]) -> Option<String> {
    match bytes {
        [0] => return Some("false".into()),
        [1] => return Some("true".into()),
        _ => {}
    }
    let text = std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.chars().any(char::is_control));
    if let (8, None) = (bytes.len(), text) {
        let arr: [u8; 8] = bytes.try_into().ok()?;
        return Some(number_text(f64::from_le_bytes(arr)));
    }
    text.map(str::to_string)
}

/// A number as JSON would write it: integers without a fraction.
pub fn number_text(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&[u8], &[u8])]) -> Vec<u8> {
        crate::pairs::encode(items)
    }

    fn paths(names: &[&str]) -> Vec<ClaimPath> {
        names.iter().map(|n| ClaimPath::new(n)).collect()
    }

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn property_strings_numbers_bools_lists() {
        assert_eq!(
            decode_property(b"alice"),
            Some(ClaimValue::Scalar("alice".into()))
        );
        assert_eq!(
            decode_property(b"alice123"),
            Some(ClaimValue::Scalar("alice123".into()))
        );
        assert_eq!(
            decode_property(&2.0f64.to_le_bytes()),
            Some(ClaimValue::Scalar("2".into()))
        );
        assert_eq!(
            decode_property(&2.5f64.to_le_bytes()),
            Some(ClaimValue::Scalar("2.5".into()))
        );
        assert_eq!(
            decode_property(&(-7.0f64).to_le_bytes()),
            Some(ClaimValue::Scalar("-7".into()))
        );
        assert_eq!(
            decode_property(&[1]),
            Some(ClaimValue::Scalar("true".into()))
        );
        assert_eq!(
            decode_property(&[0]),
            Some(ClaimValue::Scalar("false".into()))
        );
        let list = pairs(&[(b"billing", b""), (b"ops", b"")]);
        assert_eq!(
            decode_property(&list),
            Some(ClaimValue::List(vec!["billing".into(), "ops".into()]))
        );
        assert_eq!(decode_property(&pairs(&[])), Some(ClaimValue::List(vec![])));
        let obj = pairs(&[(b"org", b"acme")]);
        assert_eq!(decode_property(&obj), Some(ClaimValue::Object));
        assert_eq!(decode_property(&[0xff, 0xfe, 0x41]), None);
    }

    #[test]
    fn header_claims_with_nested_paths_and_types() {
        let json = r#"{"sub":"alice","groups":"billing ops","realm_access":{"roles":["admin",7]},
                       "tier":2,"beta":true,"n":null}"#;
        let id = Identity::from_header(
            b64(json).as_bytes(),
            &paths(&[
                "sub",
                "groups",
                "realm_access.roles",
                "tier",
                "beta",
                "n",
                "missing.x",
            ]),
        )
        .unwrap();
        assert_eq!(id.subject(), Some("alice"));
        assert_eq!(id.groups().collect::<Vec<_>>(), ["billing", "ops"]);
        assert!(id.claim(2).unwrap().holds("admin"));
        assert!(id.claim(2).unwrap().holds("7"));
        assert!(id.claim(3).unwrap().holds("2"));
        assert!(id.claim(4).unwrap().holds("true"));
        assert_eq!(id.claim(5), None);
        assert_eq!(id.claim(6), None);
    }

    #[test]
    fn header_padding_is_optional() {
        let json = r#"{"sub":"a"}"#;
        let padded = base64::engine::general_purpose::URL_SAFE.encode(json);
        assert!(padded.ends_with('='));
        for v in [padded, b64(json)] {
            let id = Identity::from_header(v.as_bytes(), &paths(&["sub", "groups"])).unwrap();
            assert_eq!(id.subject(), Some("a"));
            assert_eq!(id.groups().count(), 0);
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        let p = paths(&["sub", "groups"]);
        assert_eq!(
            Identity::from_header(b"%%%", &p),
            Err(ClaimsError::BadBase64)
        );
        assert_eq!(
            Identity::from_header(b64("{nope").as_bytes(), &p),
            Err(ClaimsError::BadJson)
        );
        assert_eq!(
            Identity::from_header(b64("[1]").as_bytes(), &p),
            Err(ClaimsError::NotObject)
        );
        assert_eq!(
            Identity::from_header(b64("\"s\"").as_bytes(), &p),
            Err(ClaimsError::NotObject)
        );
        assert_eq!(
            Identity::from_header(&[0xff, 0x00], &p),
            Err(ClaimsError::BadBase64)
        );
    }

    #[test]
    fn groups_from_list_claim() {
        let id = Identity::new(vec![
            Some(ClaimValue::Scalar("bob".into())),
            Some(ClaimValue::List(vec!["a".into(), "b c".into()])),
        ]);
        assert_eq!(id.groups().collect::<Vec<_>>(), ["a", "b c"]);
    }
}
