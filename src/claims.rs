//! The caller's claims, decoded from what `jwt_authn` left behind.
//!
//! Two sources (see `claims.from`):
//! - `jwt_metadata`: the glue reads the request's dynamic metadata once
//!   (`get_property(["metadata"])`, a protobuf `Metadata`) and
//!   [`Identity::from_metadata`] takes `jwt_authn`'s payload `Struct` out of it
//!   ([`crate::pb`]), with every claim's JSON type.
//! - `header`: base64url JSON (padding optional) that [`Identity::from_header`]
//!   decodes. A malformed header is an error (the filter answers 401).
//!
//! Both end in the same JSON document, so a claim has the same type whichever
//! source it came from: a string is never read as a boolean, a number or a list.
//! An [`Identity`] holds one value per claim the configuration reads
//! (`Config::claim_paths`), so policy checks index instead of searching.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::Value;

use crate::config::{ClaimPath, GROUPS_CLAIM, SUBJECT_CLAIM};

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
    /// What identifies the verified token itself, when the request path asked
    /// for it (token exchange binds its subject token to it).
    binding: Option<Binding>,
}

/// The claims that identify one JWT: `iss`, `sub`, `exp`, `iat` and `jti`, each
/// as [`ClaimValue`] (absent: `None`). Two tokens with the same binding are,
/// for token exchange, the same token: a token server that issued both gave
/// them the same issuer, subject, times and id.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Binding([Option<(char, String)>; 5]);

impl Binding {
    pub const CLAIMS: [&'static str; 5] = ["iss", "sub", "exp", "iat", "jti"];

    /// The binding claims of a JSON payload; `None` unless it is an object.
    /// Each is kept with its JSON type, and a number by its value (the verified
    /// payload's numbers come as doubles from the metadata, a JWT's as written).
    pub fn of(doc: &Value) -> Option<Binding> {
        let obj = doc.as_object()?;
        Some(Binding(
            Self::CLAIMS.map(|name| obj.get(name).and_then(Self::typed)),
        ))
    }

    /// A binding claim with its JSON type.
    fn typed(v: &Value) -> Option<(char, String)> {
        match v {
            Value::Null => None,
            Value::String(s) => Some(('s', s.clone())),
            Value::Number(n) => n.as_f64().map(|n| ('n', number_text(n))),
            Value::Bool(b) => Some(('b', b.to_string())),
            other => Some(('j', other.to_string())),
        }
    }

    /// The token's issuer (`iss`), when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        match &self.0[0] {
            Some(('s', iss)) => Some(iss),
            _ => None,
        }
    }

    /// Whether any binding claim is present (a payload with none binds nothing).
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimsError {
    /// The claims header is not base64url.
    BadBase64,
    /// The decoded header is not JSON.
    BadJson,
    /// The JSON is not an object.
    NotObject,
    /// The dynamic metadata from the host is not a well-formed message.
    BadMetadata,
}

impl std::fmt::Display for ClaimsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClaimsError::BadBase64 => "claims header is not base64url",
            ClaimsError::BadJson => "claims header is not JSON",
            ClaimsError::NotObject => "claims header is not a JSON object",
            ClaimsError::BadMetadata => "jwt_authn metadata is not a well-formed payload",
        })
    }
}

/// The filter whose metadata holds the verified payload.
pub const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl Identity {
    pub fn new(values: Vec<Option<ClaimValue>>) -> Self {
        Identity {
            values,
            binding: None,
        }
    }

    /// Decodes a `forward_payload_header`-style header value; with `bind`, also
    /// keeps the payload's [`Binding`].
    pub fn from_header(
        value: &[u8],
        paths: &[ClaimPath],
        bind: bool,
    ) -> Result<Identity, ClaimsError> {
        let value = value.trim_ascii();
        let json = B64URL.decode(value).map_err(|_| ClaimsError::BadBase64)?;
        let doc: Value = serde_json::from_slice(&json).map_err(|_| ClaimsError::BadJson)?;
        let id = Identity::from_json(&doc, paths).ok_or(ClaimsError::NotObject)?;
        Ok(if bind { id.bound_to(&doc) } else { id })
    }

    /// This identity with the binding claims of `doc`, its verified payload.
    fn bound_to(mut self, doc: &Value) -> Identity {
        self.binding = Binding::of(doc);
        self
    }

    /// The verified token's binding claims, if they were asked for.
    pub fn binding(&self) -> Option<&Binding> {
        self.binding.as_ref()
    }

    /// The payload `jwt_authn` stored with `payload_in_metadata: <key>`, from the
    /// serialized dynamic metadata. `Ok(None)`: this request carried no JWT.
    pub fn from_metadata(
        metadata: &[u8],
        key: &str,
        paths: &[ClaimPath],
        bind: bool,
    ) -> Result<Option<Identity>, ClaimsError> {
        // Only the claims asked for are decoded, in one pass over the payload.
        let read = || -> Result<Option<Identity>, ()> {
            let Some(payload) = crate::pb::payload_ref(metadata, JWT_AUTHN, key)? else {
                return Ok(None);
            };
            if !bind {
                // The common case: typed claims straight from the protobuf.
                let values = payload.claims_with(paths, crate::pb::claim_value)?;
                return Ok(Some(Identity {
                    values: values.into_iter().map(Option::flatten).collect(),
                    binding: None,
                }));
            }
            let binding_paths = Binding::CLAIMS.map(|c| [c]);
            let mut wanted: Vec<&[&str]> = Vec::with_capacity(paths.len() + 5);
            let segments: Vec<Vec<&str>> = paths
                .iter()
                .map(|p| p.segments.iter().map(String::as_str).collect())
                .collect();
            wanted.extend(segments.iter().map(Vec::as_slice));
            wanted.extend(binding_paths.iter().map(|p| &p[..]));
            let mut found = payload.claims(&wanted)?;
            let binding = {
                let tail = found.split_off(paths.len());
                let mut out: [Option<(char, String)>; 5] = Default::default();
                for (slot, v) in out.iter_mut().zip(tail) {
                    *slot = v.as_ref().and_then(Binding::typed);
                }
                Some(Binding(out))
            };
            let values = found
                .iter()
                .map(|v| v.as_ref().and_then(from_json))
                .collect();
            Ok(Some(Identity { values, binding }))
        };
        read().map_err(|()| ClaimsError::BadMetadata)
    }

    /// The claims `paths` of a JSON payload; `None` unless it is an object.
    pub fn from_json(doc: &Value, paths: &[ClaimPath]) -> Option<Identity> {
        if !doc.is_object() {
            return None;
        }
        let values = paths
            .iter()
            .map(|p| {
                p.segments
                    .iter()
                    .try_fold(doc, |v, seg| v.get(seg))
                    .and_then(from_json)
            })
            .collect();
        Some(Identity {
            values,
            binding: None,
        })
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

pub(crate) fn from_json(v: &Value) -> Option<ClaimValue> {
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
        Value::Number(n) if n.is_f64() => n.as_f64().map(number_text),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
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

    fn paths(names: &[&str]) -> Vec<ClaimPath> {
        names.iter().map(|n| ClaimPath::new(n)).collect()
    }

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn metadata(payload: serde_json::Value) -> Vec<u8> {
        crate::pb::encode::metadata(JWT_AUTHN, "payload", &payload)
    }

    #[test]
    fn metadata_claims_keep_their_json_types() {
        let md = metadata(serde_json::json!({
            "sub": "alice", "groups": ["billing", "ops"], "tier": 2, "beta": true,
            "ratio": 2.5, "org": {"id": "acme"}
        }));
        let id = Identity::from_metadata(
            &md,
            "payload",
            &paths(&[
                "sub", "groups", "tier", "beta", "ratio", "org", "org.id", "nope",
            ]),
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(id.subject(), Some("alice"));
        assert_eq!(id.groups().collect::<Vec<_>>(), ["billing", "ops"]);
        assert_eq!(id.claim(2), Some(&ClaimValue::Scalar("2".into())));
        assert_eq!(id.claim(3), Some(&ClaimValue::Scalar("true".into())));
        assert_eq!(id.claim(4), Some(&ClaimValue::Scalar("2.5".into())));
        assert_eq!(id.claim(5), Some(&ClaimValue::Object));
        assert_eq!(id.claim(6), Some(&ClaimValue::Scalar("acme".into())));
        assert_eq!(id.claim(7), None);
        // Without a binding asked for, none is read; with one, the same values
        // and the token's binding claims.
        assert_eq!(id.binding(), None);
        let md = metadata(serde_json::json!({
            "iss": "https://idp", "sub": "alice", "exp": 2000000000, "iat": 1, "jti": "j1",
            "groups": ["billing"]
        }));
        let p = paths(&["sub", "groups"]);
        let plain = Identity::from_metadata(&md, "payload", &p, false)
            .unwrap()
            .unwrap();
        let bound = Identity::from_metadata(&md, "payload", &p, true)
            .unwrap()
            .unwrap();
        assert_eq!(plain.values, bound.values);
        assert_eq!(plain.binding(), None);
        let b = bound.binding().expect("a binding");
        assert_eq!(b.issuer(), Some("https://idp"));
        assert!(!b.is_empty());
        // No JWT on the request; another key; a broken message.
        assert_eq!(
            Identity::from_metadata(b"", "payload", &paths(&["sub"]), false),
            Ok(None)
        );
        assert_eq!(
            Identity::from_metadata(&md, "other", &paths(&["sub"]), false),
            Ok(None)
        );
        assert_eq!(
            Identity::from_metadata(&[0x0a, 0x05], "payload", &paths(&["sub"]), false),
            Err(ClaimsError::BadMetadata)
        );
    }

    #[test]
    fn strings_are_never_read_as_other_types() {
        // Each of these strings once passed for `true` or a list `["true"]`.
        let list_bytes = String::from_utf8(crate::pairs::encode(&[(b"true", b"")])).unwrap();
        for s in ["\u{1}", list_bytes.as_str()] {
            let md = metadata(serde_json::json!({ "sub": "x", "is_admin": s }));
            let id = Identity::from_metadata(
                &md,
                "payload",
                &paths(&["sub", "groups", "is_admin"]),
                false,
            )
            .unwrap()
            .unwrap();
            assert_eq!(id.claim(2), Some(&ClaimValue::Scalar(s.to_string())));
            assert!(!id.claim(2).unwrap().holds("true"));
        }
        let md = metadata(serde_json::json!({ "sub": "x", "n": "2", "b": "true" }));
        let id =
            Identity::from_metadata(&md, "payload", &paths(&["sub", "groups", "n", "b"]), false)
                .unwrap()
                .unwrap();
        // The string "true" holds "true" as a string; no type is inferred from it.
        assert_eq!(id.claim(3), Some(&ClaimValue::Scalar("true".into())));
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
            false,
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
            let id =
                Identity::from_header(v.as_bytes(), &paths(&["sub", "groups"]), false).unwrap();
            assert_eq!(id.subject(), Some("a"));
            assert_eq!(id.groups().count(), 0);
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        let p = paths(&["sub", "groups"]);
        assert_eq!(
            Identity::from_header(b"%%%", &p, false),
            Err(ClaimsError::BadBase64)
        );
        assert_eq!(
            Identity::from_header(b64("{nope").as_bytes(), &p, false),
            Err(ClaimsError::BadJson)
        );
        assert_eq!(
            Identity::from_header(b64("[1]").as_bytes(), &p, false),
            Err(ClaimsError::NotObject)
        );
        assert_eq!(
            Identity::from_header(b64("\"s\"").as_bytes(), &p, false),
            Err(ClaimsError::NotObject)
        );
        assert_eq!(
            Identity::from_header(&[0xff, 0x00], &p, false),
            Err(ClaimsError::BadBase64)
        );
    }

    #[test]
    fn a_list_holds_only_its_elements() {
        let l = ClaimValue::List(vec!["a".into(), "b c".into()]);
        assert!(l.holds("a") && l.holds("b c"));
        assert!(!l.holds("b") && !l.holds("x") && !l.holds(""));
        assert!(!ClaimValue::List(vec![]).holds(""));
        assert!(!ClaimValue::Object.holds(""));
        let s = ClaimValue::Scalar("orders.read orders.write".into());
        assert!(s.holds("orders.write") && !s.holds("orders"));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            ClaimsError::BadBase64.to_string(),
            "claims header is not base64url"
        );
        assert_eq!(
            ClaimsError::BadJson.to_string(),
            "claims header is not JSON"
        );
        assert_eq!(
            ClaimsError::NotObject.to_string(),
            "claims header is not a JSON object"
        );
        assert_eq!(
            ClaimsError::BadMetadata.to_string(),
            "jwt_authn metadata is not a well-formed payload"
        );
    }

    #[test]
    fn numbers_compare_as_json_writes_them() {
        // Header JSON keeps integers exact, beyond 2^53 too; a float that is whole
        // reads as an integer ("2", not "2.0").
        let json = r#"{"big":9007199254740993,"whole":2.0,"neg":-0.0,"half":0.5}"#;
        let id = Identity::from_header(
            b64(json).as_bytes(),
            &paths(&["big", "whole", "neg", "half"]),
            false,
        )
        .unwrap();
        let text = |i| match id.claim(i) {
            Some(ClaimValue::Scalar(s)) => s.as_str(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            [text(0), text(1), text(2), text(3)],
            ["9007199254740993", "2", "0", "0.5"]
        );
        assert_eq!(number_text(3.0), "3");
        assert_eq!(number_text(-0.0), "0");
        assert_eq!(number_text(2.5), "2.5");
        // At and past 2^53 a double is not an exact integer: written as a double
        // (shortest round-trip digits), not as the integer it happens to hold.
        assert_eq!(number_text(2f64.powi(60)), "1152921504606847000");
        assert_eq!(number_text(f64::NAN), "NaN");
        // Equivalent mutant: `<` → `<=` in the 2^53 bound. At exactly 2^53 both
        // branches write "9007199254740992" (the shortest round-trip digits are
        // the integer's), so no input tells them apart.
        assert_eq!(number_text(9_007_199_254_740_992.0), "9007199254740992");
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
