//! Just enough protobuf to read `jwt_authn`'s payload with its JSON types.
//!
//! Envoy answers `get_property(["metadata"])` with the request's dynamic
//! metadata, an `envoy.config.core.v3.Metadata` message in protobuf binary form.
//! `jwt_authn` keeps the verified payload there as a `google.protobuf.Struct`
//! under `filter_metadata["envoy.filters.http.jwt_authn"][<payload key>]`. A
//! `Struct` carries each value's type (string, number, bool, list, object), so
//! one host call gives every claim with its real type; reading a claim leaf by
//! leaf instead returns bytes with no type tag.
//!
//! The reader is strict: a malformed message is `None`, never a partial answer.
//! Unknown fields are skipped, as protobuf requires. Nesting deeper than
//! [`MAX_DEPTH`] is refused (a hostile payload must not exhaust the stack).

use serde_json::{Map, Number, Value};

use crate::claims::ClaimValue;

/// Deepest nesting of protobuf messages read from a payload. Each JSON object or
/// list level is two messages (a `Value` holding a `Struct` or `ListValue`), so a
/// payload may nest 16 JSON containers; the 17th is refused.
pub const MAX_DEPTH: usize = 32;

/// The payload `jwt_authn` stored under `filter` / `key` in a serialized
/// `Metadata`, as JSON. `Ok(None)`: no such entry (no JWT on this request).
/// `Err(())`: the bytes are not a well-formed message of the expected shape.
#[allow(clippy::result_unit_err)]
pub fn payload(metadata: &[u8], filter: &str, key: &str) -> Result<Option<Value>, ()> {
    let Some(structure) = filter_struct(metadata, filter)? else {
        return Ok(None);
    };
    let Value::Object(mut fields) = decode_struct(structure, 0)? else {
        return Err(());
    };
    Ok(fields.remove(key))
}

/// `filter`'s Struct in a serialized `Metadata` (`map<string, Struct>
/// filter_metadata = 1`), undecoded; later entries win, as in a protobuf map.
fn filter_struct<'a>(metadata: &'a [u8], filter: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut found = None;
    for field in Fields::new(metadata) {
        let (number, data) = field?;
        if number != 1 {
            continue;
        }
        let Data::Bytes(entry) = data else {
            return Err(());
        };
        let (k, v) = map_entry(entry)?;
        if k == filter.as_bytes() {
            found = Some(v.unwrap_or_default());
        }
    }
    Ok(found)
}

/// The depth [`payload`] decodes a payload's top-level values at: the filter's
/// Struct, the payload's Value, its Struct, then the entries' Values.
const TOP_DEPTH: usize = 3;

/// A payload read claim by claim: only what is asked for is decoded into JSON.
/// The same answers as [`payload`] then walking the JSON, without building it.
#[derive(Debug, Clone, Copy)]
pub struct Payload<'a>(&'a [u8]);

/// The payload `jwt_authn` stored under `filter` / `key`, which must be an
/// object (`Err` otherwise). `Ok(None)`: no such entry. What is read is read as
/// strictly as [`payload`] reads it; the entries of a Struct are framed, so one
/// not read is skipped without being decoded (the host wrote the message; a
/// malformed value nobody reads changes no answer).
#[allow(clippy::result_unit_err)]
pub fn payload_ref<'a>(
    metadata: &'a [u8],
    filter: &str,
    key: &str,
) -> Result<Option<Payload<'a>>, ()> {
    let Some(structure) = filter_struct(metadata, filter)? else {
        return Ok(None);
    };
    match entry_of(structure, key)? {
        None => Ok(None),
        Some(value) => struct_in(value)?.map(|s| Some(Payload(s))).ok_or(()),
    }
}

impl Payload<'_> {
    /// The values at each of `paths` (claim paths, as [`Payload::get`] reads
    /// one), with one pass over the payload's top-level entries for all of them.
    #[allow(clippy::result_unit_err)]
    pub fn claims<S: AsRef<str>>(&self, paths: &[&[S]]) -> Result<Vec<Option<Value>>, ()> {
        self.claims_with(paths, decode_value)
    }

    /// [`Payload::claims`], each value decoded by `decode` (bytes of a
    /// `Value`, its depth) instead of into JSON.
    #[allow(clippy::result_unit_err)]
    pub fn claims_with<S: AsRef<str>, P: AsRef<[S]>, T>(
        &self,
        paths: &[P],
        decode: impl Fn(&[u8], usize) -> Result<T, ()>,
    ) -> Result<Vec<Option<T>>, ()> {
        let mut found: Vec<Option<&[u8]>> = vec![None; paths.len()];
        for field in Fields::new(self.0) {
            if let Some(entry) = struct_entry(field?)? {
                let (k, v) = map_entry(entry)?;
                for (slot, path) in found.iter_mut().zip(paths) {
                    if path
                        .as_ref()
                        .first()
                        .is_some_and(|first| first.as_ref().as_bytes() == k)
                    {
                        // Later entries win, as in a protobuf map.
                        *slot = Some(v.unwrap_or_default());
                    }
                }
            }
        }
        found
            .into_iter()
            .zip(paths)
            .map(|(value, path)| match (value, path.as_ref().get(1..)) {
                (None, _) => Ok(None),
                (Some(v), None | Some([])) => decode(v, TOP_DEPTH).map(Some),
                (Some(v), Some(rest)) => match struct_in(v)? {
                    Some(inner) => Payload(inner).get_at(rest, TOP_DEPTH + 2, &decode),
                    None => Ok(None),
                },
            })
            .collect()
    }

    /// The value at `segments` (a claim path) as JSON; `Ok(None)` when a segment
    /// is missing or a value on the way is not an object.
    #[allow(clippy::result_unit_err)]
    pub fn get<S: AsRef<str>>(&self, segments: &[S]) -> Result<Option<Value>, ()> {
        self.get_at(segments, TOP_DEPTH, &decode_value)
    }

    /// [`Payload::get`] for a Struct whose entries' values sit at `depth`.
    fn get_at<S: AsRef<str>, T>(
        &self,
        segments: &[S],
        depth: usize,
        decode: &impl Fn(&[u8], usize) -> Result<T, ()>,
    ) -> Result<Option<T>, ()> {
        let mut at = self.0;
        let mut depth = depth;
        let mut rest = segments.iter().peekable();
        while let Some(segment) = rest.next() {
            let Some(value) = entry_of(at, segment.as_ref())? else {
                return Ok(None);
            };
            if rest.peek().is_none() {
                return decode(value, depth).map(Some);
            }
            match struct_in(value)? {
                Some(inner) => at = inner,
                None => return Ok(None),
            }
            // A Value holding a Struct: two messages deeper.
            depth += 2;
        }
        Ok(None)
    }
}

/// The value of entry `key` of a Struct, undecoded; later entries win.
fn entry_of<'a>(structure: &'a [u8], key: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut found = None;
    for field in Fields::new(structure) {
        if let Some(entry) = struct_entry(field?)? {
            let (k, v) = map_entry(entry)?;
            if k == key.as_bytes() {
                found = Some(v.unwrap_or_default());
            }
        }
    }
    Ok(found)
}

/// A Struct's field: an entry (`fields = 1`, bytes), an error for a field 1 of
/// another wire type (as [`decode_struct`] says), nothing for unknown fields.
fn struct_entry(field: (u64, Data<'_>)) -> Result<Option<&[u8]>, ()> {
    match field {
        (1, Data::Bytes(entry)) => Ok(Some(entry)),
        (1, _) => Err(()),
        _ => Ok(None),
    }
}

/// The Struct a `Value` holds, if that is its kind (the last kind set wins);
/// its kinds are checked as [`decode_value`] checks them.
fn struct_in(value: &[u8]) -> Result<Option<&[u8]>, ()> {
    let mut out = None;
    for field in Fields::new(value) {
        out = match field? {
            (5, Data::Bytes(s)) => Some(s),
            (1, Data::Varint(_)) | (2, Data::Fixed64(_)) | (4, Data::Varint(_)) => None,
            (6, Data::Bytes(_)) => None,
            (3, Data::Bytes(s)) => {
                crate::text::utf8(s).ok_or(())?;
                None
            }
            (1..=6, _) => return Err(()),
            _ => continue,
        };
    }
    Ok(out)
}

/// One field: its number and what it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Data<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32,
    Bytes(&'a [u8]),
}

/// The fields of a message, in order; an error ends the iteration.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields {
            bytes,
            pos: 0,
            failed: false,
        }
    }

    fn varint(&mut self) -> Result<u64, ()> {
        // Tags and most lengths are one byte.
        let first = *self.bytes.get(self.pos).ok_or(())?;
        if first < 0x80 {
            self.pos += 1;
            return Ok(u64::from(first));
        }
        let mut out: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.bytes.get(self.pos).ok_or(())?;
            self.pos += 1;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ()> {
        let end = self.pos.checked_add(n).ok_or(())?;
        let out = self.bytes.get(self.pos..end).ok_or(())?;
        self.pos = end;
        Ok(out)
    }

    fn field(&mut self) -> Result<(u64, Data<'a>), ()> {
        let tag = self.varint()?;
        let number = tag >> 3;
        if number == 0 {
            return Err(());
        }
        let data = match tag & 7 {
            0 => Data::Varint(self.varint()?),
            1 => Data::Fixed64(self.take(8)?.try_into().map_err(|_| ())?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| ())?;
                Data::Bytes(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Data::Fixed32
            }
            _ => return Err(()),
        };
        Ok((number, data))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Data<'a>), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.bytes.len() {
            return None;
        }
        let r = self.field();
        self.failed = r.is_err();
        Some(r)
    }
}

/// A map entry message: `key = 1` (string) and `value = 2` (message).
fn map_entry(entry: &[u8]) -> Result<(&[u8], Option<&[u8]>), ()> {
    let (mut key, mut value): (&[u8], Option<&[u8]>) = (b"", None);
    for field in Fields::new(entry) {
        match field? {
            (1, Data::Bytes(k)) => key = k,
            (2, Data::Bytes(v)) => value = Some(v),
            (1 | 2, _) => return Err(()),
            _ => {}
        }
    }
    Ok((key, value))
}

/// `google.protobuf.Struct { map<string, Value> fields = 1; }` as a JSON object.
fn decode_struct(bytes: &[u8], depth: usize) -> Result<Value, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let mut out = Map::new();
    for field in Fields::new(bytes) {
        match field? {
            (1, Data::Bytes(entry)) => {
                let (k, v) = map_entry(entry)?;
                let key = crate::text::utf8(k).ok_or(())?.to_string();
                let value = decode_value(v.unwrap_or_default(), depth + 1)?;
                out.insert(key, value);
            }
            (1, _) => return Err(()),
            _ => {}
        }
    }
    Ok(Value::Object(out))
}

/// `google.protobuf.Value` (a oneof) as JSON. An empty message is `null`.
fn decode_value(bytes: &[u8], depth: usize) -> Result<Value, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let mut out = Value::Null;
    for field in Fields::new(bytes) {
        out = match field? {
            (1, Data::Varint(_)) => Value::Null,
            (2, Data::Fixed64(b)) => number(f64::from_le_bytes(b)),
            (3, Data::Bytes(s)) => Value::String(crate::text::utf8(s).ok_or(())?.into()),
            (4, Data::Varint(b)) => Value::Bool(b != 0),
            (5, Data::Bytes(s)) => decode_struct(s, depth + 1)?,
            (6, Data::Bytes(l)) => decode_list(l, depth + 1)?,
            (1..=6, _) => return Err(()),
            _ => continue,
        };
    }
    Ok(out)
}

/// A `Value`'s kind, the last one set winning; what it holds is checked as
/// [`decode_value`] checks it, when it is met (a nested Struct is decoded and
/// dropped, so that a malformed one is refused here too).
enum Kind<'a> {
    Null,
    Number(f64),
    Text(&'a str),
    Bool(bool),
    Struct,
    /// A list's scalars, as text.
    List(Vec<String>),
}

// Equivalent mutant: `>` → `>=` in kind_of's depth check, as in decode_value's:
// a Value always sits at an odd depth, so never at MAX_DEPTH (32) itself.
fn kind_of(bytes: &[u8], depth: usize) -> Result<Kind<'_>, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let mut out = Kind::Null;
    for field in Fields::new(bytes) {
        out = match field? {
            (1, Data::Varint(_)) => Kind::Null,
            (2, Data::Fixed64(b)) => Kind::Number(f64::from_le_bytes(b)),
            (3, Data::Bytes(s)) => Kind::Text(crate::text::utf8(s).ok_or(())?),
            (4, Data::Varint(b)) => Kind::Bool(b != 0),
            (5, Data::Bytes(s)) => {
                decode_struct(s, depth + 1)?;
                Kind::Struct
            }
            (6, Data::Bytes(l)) => Kind::List(list_texts(l, depth + 1)?),
            (1..=6, _) => return Err(()),
            _ => continue,
        };
    }
    Ok(out)
}

/// A `ListValue`'s scalars as text, every element checked as [`decode_list`]
/// checks it.
fn list_texts(bytes: &[u8], depth: usize) -> Result<Vec<String>, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let mut out = Vec::new();
    for field in Fields::new(bytes) {
        match field? {
            (1, Data::Bytes(v)) => {
                if let Some(text) = scalar_text(kind_of(v, depth + 1)?) {
                    out.push(text);
                }
            }
            (1, _) => return Err(()),
            _ => {}
        }
    }
    Ok(out)
}

/// A scalar's text as a claim compares it (`None` for null, objects, lists and
/// numbers that aren't finite): the text of [`decode_value`]'s JSON.
fn scalar_text(kind: Kind<'_>) -> Option<String> {
    match kind {
        Kind::Text(s) => Some(s.to_string()),
        Kind::Number(n) if n.is_finite() => Some(crate::claims::number_text(n)),
        Kind::Bool(b) => Some(if b { "true" } else { "false" }.to_string()),
        Kind::Number(_) | Kind::Null | Kind::Struct | Kind::List(_) => None,
    }
}

/// A claim's `Value` as the request path compares it: the same
/// [`ClaimValue`] as decoding it to JSON first, without building the JSON
/// (strings, and a list's scalars, are the only allocations).
#[allow(clippy::result_unit_err)]
pub fn claim_value(bytes: &[u8], depth: usize) -> Result<Option<ClaimValue>, ()> {
    Ok(match kind_of(bytes, depth)? {
        Kind::Null => None,
        Kind::Struct => Some(ClaimValue::Object),
        Kind::List(items) => Some(ClaimValue::List(items)),
        other => scalar_text(other).map(ClaimValue::Scalar),
    })
}

/// `google.protobuf.ListValue { repeated Value values = 1; }`.
fn decode_list(bytes: &[u8], depth: usize) -> Result<Value, ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    let mut out = Vec::new();
    for field in Fields::new(bytes) {
        match field? {
            (1, Data::Bytes(v)) => out.push(decode_value(v, depth + 1)?),
            (1, _) => return Err(()),
            _ => {}
        }
    }
    Ok(Value::Array(out))
}

/// A Struct number (always a double) as JSON: integers stay integers, so that
/// `2` compares as `"2"`, not `"2.0"`. Not finite: `null`.
fn number(n: f64) -> Value {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Value::Number(Number::from(n as i64))
    } else {
        Number::from_f64(n).map_or(Value::Null, Value::Number)
    }
}

/// Encoding, for tests and fuzzing: the inverse of the reader above.
pub mod encode {
    use serde_json::Value;

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(out: &mut Vec<u8>, number: u64, data: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }

    fn entry(key: &str, value: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        bytes_field(&mut e, 1, key.as_bytes());
        bytes_field(&mut e, 2, value);
        e
    }

    pub fn value(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        match v {
            Value::Null => {
                varint(&mut out, 1 << 3);
                varint(&mut out, 0);
            }
            Value::Number(n) => {
                varint(&mut out, 2 << 3 | 1);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_le_bytes());
            }
            Value::String(s) => bytes_field(&mut out, 3, s.as_bytes()),
            Value::Bool(b) => {
                varint(&mut out, 4 << 3);
                varint(&mut out, u64::from(*b));
            }
            Value::Object(_) => bytes_field(&mut out, 5, &structure(v)),
            Value::Array(items) => {
                let mut l = Vec::new();
                for item in items {
                    bytes_field(&mut l, 1, &value(item));
                }
                bytes_field(&mut out, 6, &l);
            }
        }
        out
    }

    /// A JSON object as a `Struct` (anything else: an empty one).
    pub fn structure(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        if let Value::Object(map) = v {
            for (k, item) in map {
                bytes_field(&mut out, 1, &entry(k, &value(item)));
            }
        }
        out
    }

    /// A `Metadata` with one filter's `Struct` holding `key: payload`.
    pub fn metadata(filter: &str, key: &str, payload: &Value) -> Vec<u8> {
        let mut holder = serde_json::Map::new();
        holder.insert(key.to_string(), payload.clone());
        metadata_holding(filter, &Value::Object(holder))
    }

    /// Metadata whose `filter` struct is `holder` (several keys at once).
    pub fn metadata_holding(filter: &str, holder: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        bytes_field(&mut out, 1, &entry(filter, &structure(holder)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const F: &str = "envoy.filters.http.jwt_authn";

    #[test]
    fn payload_round_trips_with_types() {
        let p = json!({"sub": "alice", "groups": ["a", "b"], "n": 2, "f": 2.5,
                       "t": true, "z": null, "o": {"k": [1, {"x": "y"}]}, "s": "\u{1}"});
        let md = encode::metadata(F, "payload", &p);
        assert_eq!(payload(&md, F, "payload"), Ok(Some(p)));
        assert_eq!(payload(&md, F, "other"), Ok(None));
        assert_eq!(payload(&md, "other.filter", "payload"), Ok(None));
        assert_eq!(payload(b"", F, "payload"), Ok(None));
    }

    #[test]
    fn other_filters_and_unknown_fields_are_skipped() {
        let mut md = encode::metadata("envoy.lb", "x", &json!({"a": 1}));
        md.extend(encode::metadata(F, "payload", &json!({"sub": "bob"})));
        // typed_filter_metadata (field 2) and an unknown varint field 9.
        md.extend([0x12, 0x00, 0x48, 0x01]);
        assert_eq!(payload(&md, F, "payload"), Ok(Some(json!({"sub": "bob"}))));
    }

    #[test]
    fn malformed_messages_are_errors() {
        let md = encode::metadata(F, "payload", &json!({"sub": "bob", "g": [1, 2]}));
        for cut in 1..md.len() {
            let r = payload(&md[..cut], F, "payload");
            assert!(r.is_err() || r == Ok(None), "cut {cut}: {r:?}");
        }
        assert_eq!(payload(&[0x0b], F, "payload"), Err(())); // group wire type
        assert_eq!(payload(&[0x08, 0xff], F, "payload"), Err(())); // short varint
        assert_eq!(payload(&[0x00, 0x00], F, "payload"), Err(())); // field 0
        assert_eq!(payload(&[0x08, 0x01], F, "payload"), Err(())); // field 1 not bytes
    }

    /// What reading a claim from the JSON payload gives.
    fn navigate(doc: &Value, path: &[&str]) -> Option<Value> {
        path.iter().try_fold(doc, |v, seg| v.get(seg)).cloned()
    }

    #[test]
    fn a_payload_read_claim_by_claim_answers_as_the_whole_json_does() {
        let p = json!({"sub": "alice", "groups": ["a", "b"], "n": 2, "f": 2.5, "t": true,
                       "z": null, "o": {"k": [1, {"x": "y"}], "deep": {"er": "e"}, "n": null},
                       "https://example.com/roles": ["r"], "s": "\u{1}", "": "empty"});
        let md = encode::metadata(F, "payload", &p);
        let whole = payload(&md, F, "payload").unwrap().unwrap();
        let r = payload_ref(&md, F, "payload").unwrap().unwrap();
        for path in [
            &["sub"][..],
            &["groups"],
            &["n"],
            &["f"],
            &["t"],
            &["z"],
            &["o"],
            &["o", "k"],
            &["o", "deep", "er"],
            &["o", "n"],
            &["o", "n", "x"],
            &["sub", "x"],
            &["groups", "0"],
            &["missing"],
            &["o", "missing"],
            &["https://example.com/roles"],
            &["s"],
            &[""],
        ] {
            assert_eq!(r.get(path), Ok(navigate(&whole, path)), "{path:?}");
            assert_eq!(
                r.claims(&[path, &["sub"]]),
                Ok(vec![navigate(&whole, path), Some(json!("alice"))])
            );
        }
        // No entry, another filter, nothing at all: no payload.
        assert!(payload_ref(&md, F, "other").unwrap().is_none());
        assert!(payload_ref(&md, "envoy.lb", "payload").unwrap().is_none());
        assert!(payload_ref(b"", F, "payload").unwrap().is_none());
        // A payload that is not an object is an error, as the JSON reading makes it.
        for v in [json!("jwt"), json!(null), json!([1])] {
            let md = encode::metadata(F, "payload", &v);
            assert_eq!(
                payload_ref(&md, F, "payload").map(|p| p.is_some()),
                Err(()),
                "{v}"
            );
        }
        // Later map entries win, at every level.
        let dup = with_struct(
            &[
                ld(
                    1,
                    &[
                        ld(1, b"payload"),
                        ld(
                            2,
                            &ld(5, &ld(1, &[ld(1, b"sub"), ld(2, &ld(3, b"eve"))].concat())),
                        ),
                    ]
                    .concat(),
                ),
                ld(
                    1,
                    &[
                        ld(1, b"payload"),
                        ld(
                            2,
                            &ld(
                                5,
                                &[
                                    ld(1, &[ld(1, b"sub"), ld(2, &ld(3, b"bob"))].concat()),
                                    ld(1, &[ld(1, b"sub"), ld(2, &ld(3, b"amy"))].concat()),
                                ]
                                .concat(),
                            ),
                        ),
                    ]
                    .concat(),
                ),
            ]
            .concat(),
        );
        assert_eq!(payload(&dup, F, "payload"), Ok(Some(json!({"sub": "amy"}))));
        let r = payload_ref(&dup, F, "payload").unwrap().unwrap();
        assert_eq!(r.get(&["sub"]), Ok(Some(json!("amy"))));
    }

    #[test]
    fn a_payload_read_claim_by_claim_is_as_strict_as_the_whole_on_what_it_reads() {
        let md = encode::metadata(
            F,
            "payload",
            &json!({"sub": "bob", "g": [1, 2], "o": {"a": "b"}}),
        );
        for cut in 1..md.len() {
            // A cut message: an error, or (cut before the entry) no payload; never a claim.
            let by_claim = payload_ref(&md[..cut], F, "payload").and_then(|p| {
                p.map(|p| p.claims(&[&["sub"][..], &["g"], &["o", "a"]]))
                    .transpose()
            });
            let whole = payload(&md[..cut], F, "payload");
            assert!(
                by_claim.is_err() || by_claim == Ok(None),
                "cut {cut}: {by_claim:?}"
            );
            assert!(whole.is_err() || whole == Ok(None), "cut {cut}");
        }
        // A bad string: an error where it is read, and only there (framing is checked).
        let bad = with_value(&ld(
            5,
            &[
                ld(1, &[ld(1, b"sub"), ld(2, &ld(3, b"bob"))].concat()),
                ld(1, &[ld(1, b"x"), ld(2, &ld(3, &[0xff]))].concat()),
            ]
            .concat(),
        ));
        assert_eq!(payload(&bad, F, "payload"), Err(()));
        let r = payload_ref(&bad, F, "payload").unwrap().unwrap();
        assert_eq!(r.get(&["sub"]), Ok(Some(json!("bob"))));
        assert_eq!(r.get(&["x"]), Err(()));
        assert_eq!(r.claims(&[&["sub"][..], &["x"]]), Err(()));
        // Too deep: exactly where the whole reading says so, at every level of the path.
        for (levels, leaf) in
            (8..20).flat_map(|l| [(l, json!("leaf")), (l, json!({})), (l, json!([]))])
        {
            let mut deep = leaf;
            for _ in 0..levels {
                deep = json!({ "d": deep });
            }
            let md = encode::metadata(F, "payload", &json!({"sub": "bob", "x": deep}));
            let ok = payload(&md, F, "payload").is_ok();
            let r = payload_ref(&md, F, "payload").unwrap().unwrap();
            for path in [&["x"][..], &["x", "d"], &["x", "d", "d"]] {
                assert_eq!(r.get(path).is_ok(), ok, "{levels} {path:?} {deep}");
                assert_eq!(r.claims(&[path]).is_ok(), ok, "{levels} {path:?} {deep}");
            }
        }
        // A Value's kind is the last one set: a Struct then a string is a string.
        let twice = with_value(&ld(
            5,
            &ld(
                1,
                &[
                    ld(1, b"o"),
                    ld(
                        2,
                        &[
                            ld(5, &ld(1, &[ld(1, b"a"), ld(2, &ld(3, b"b"))].concat())),
                            ld(3, b"str"),
                        ]
                        .concat(),
                    ),
                ]
                .concat(),
            ),
        ));
        let whole = payload(&twice, F, "payload").unwrap().unwrap();
        assert_eq!(whole, json!({"o": "str"}));
        let r = payload_ref(&twice, F, "payload").unwrap().unwrap();
        assert_eq!(r.get(&["o", "a"]), Ok(None));
        assert_eq!(r.claims(&[&["o", "a"][..]]), Ok(vec![None]));
        assert_eq!(r.get(&["o"]), Ok(Some(json!("str"))));
        // On the path it follows, a Value's kinds and a Struct's entries are checked as
        // the whole reading checks them: a wrong wire type, a string that isn't UTF-8.
        let o_is =
            |value: Vec<u8>| with_value(&ld(5, &ld(1, &[ld(1, b"o"), ld(2, &value)].concat())));
        let inner = ld(5, &ld(1, &[ld(1, b"a"), ld(2, &ld(3, b"b"))].concat()));
        for (name, value) in [
            (
                "kind 5 as a varint, then a Struct",
                [vec![0x28, 0x01], inner.clone()].concat(),
            ),
            (
                "a string kind that isn't UTF-8, then a Struct",
                [ld(3, &[0xff]), inner.clone()].concat(),
            ),
            (
                "a Struct, then kind 3 as a varint",
                [inner.clone(), vec![0x18, 0x01]].concat(),
            ),
        ] {
            let md = o_is(value);
            assert_eq!(payload(&md, F, "payload"), Err(()), "{name}");
            let r = payload_ref(&md, F, "payload").unwrap().unwrap();
            assert_eq!(r.get(&["o", "a"]), Err(()), "{name}");
            assert_eq!(r.claims(&[&["o", "a"][..]]), Err(()), "{name}");
        }
        // A Struct's field 1 that isn't an entry's bytes.
        let md = with_value(&ld(
            5,
            &[
                ld(1, &[ld(1, b"sub"), ld(2, &ld(3, b"bob"))].concat()),
                vec![0x08, 0x01],
            ]
            .concat(),
        ));
        assert_eq!(payload(&md, F, "payload"), Err(()));
        let r = payload_ref(&md, F, "payload").unwrap().unwrap();
        assert_eq!(r.get(&["sub"]), Err(()));
        assert_eq!(r.claims(&[&["sub"][..]]), Err(()));
        for (levels, ok) in [(14, true), (15, false)] {
            let mut deep = json!("leaf");
            for _ in 0..levels {
                deep = json!({ "d": deep });
            }
            let md = encode::metadata(F, "payload", &json!({"sub": "bob", "x": deep}));
            assert_eq!(payload(&md, F, "payload").is_ok(), ok, "{levels}");
            let r = payload_ref(&md, F, "payload").unwrap().unwrap();
            assert_eq!(r.get(&["x"]).is_ok(), ok, "{levels}");
            assert_eq!(r.get(&["x", "d"]).is_ok(), ok, "{levels}");
            assert_eq!(r.claims(&[&["x", "d", "d"][..]]).is_ok(), ok, "{levels}");
            assert_eq!(r.get(&["sub"]), Ok(Some(json!("bob"))));
        }
    }

    /// A length-delimited field (lengths below 128).
    fn ld(number: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![number << 3 | 2];
        let mut n = data.len();
        while n >= 0x80 {
            out.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(data);
        out
    }

    /// A Metadata whose jwt_authn Struct is `structure` (raw bytes).
    fn with_struct(structure: &[u8]) -> Vec<u8> {
        ld(1, &[ld(1, F.as_bytes()), ld(2, structure)].concat())
    }

    /// The payload Struct `{"payload": <value bytes>}`.
    fn with_value(value: &[u8]) -> Vec<u8> {
        with_struct(&ld(1, &[ld(1, b"payload"), ld(2, value)].concat()))
    }

    /// What [`claim_value`] must answer: the claim decoded to JSON, then converted.
    fn via_json(p: &Payload<'_>, path: &[&str]) -> Result<Option<ClaimValue>, ()> {
        p.claims(&[path]).map(|v| {
            v.into_iter()
                .next()
                .flatten()
                .as_ref()
                .and_then(crate::claims::from_json)
        })
    }

    fn typed(p: &Payload<'_>, path: &[&str]) -> Result<Option<ClaimValue>, ()> {
        p.claims_with(&[path], claim_value)
            .map(|v| v.into_iter().next().flatten().flatten())
    }

    /// The payload Struct with these raw entries (key, Value bytes).
    fn entries(items: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let body: Vec<u8> = items
            .iter()
            .flat_map(|(k, v)| ld(1, &[ld(1, k.as_bytes()), ld(2, v)].concat()))
            .collect();
        with_value(&ld(5, &body))
    }

    fn double(n: f64) -> Vec<u8> {
        let mut v = vec![2 << 3 | 1];
        v.extend(n.to_le_bytes());
        v
    }

    #[test]
    fn typed_claims_answer_as_the_json_reading_does() {
        let p = json!({"sub": "alice", "groups": ["a", "b", 1, 2.5, true, null, {"x": 1}, [1, "n"]],
                       "n": 2, "f": 2.5, "neg": -7, "big": 9_007_199_254_740_992.0, "huge": 1e300,
                       "t": true, "fa": false, "z": null, "e": [], "o": {"k": [1, {"x": "y"}],
                       "deep": {"er": "e"}}, "s": "\u{1}", "": "empty", "sp": "a b"});
        let md = encode::metadata(F, "payload", &p);
        let r = payload_ref(&md, F, "payload").unwrap().unwrap();
        let paths: &[&[&str]] = &[
            &["sub"],
            &["groups"],
            &["n"],
            &["f"],
            &["neg"],
            &["big"],
            &["huge"],
            &["t"],
            &["fa"],
            &["z"],
            &["e"],
            &["o"],
            &["o", "k"],
            &["o", "deep"],
            &["o", "deep", "er"],
            &["o", "none"],
            &["s"],
            &[""],
            &["sp"],
            &["missing"],
            &["sub", "x"],
        ];
        for path in paths {
            assert_eq!(typed(&r, path), via_json(&r, path), "{path:?}");
        }
        assert_eq!(
            typed(&r, &["groups"]),
            Ok(Some(ClaimValue::List(
                ["a", "b", "1", "2.5", "true"].map(String::from).to_vec()
            )))
        );
        // Hand-made Values: numbers that aren't finite, several kinds set (the
        // last wins; each is checked when met), wrong wire types, bad UTF-8.
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("nan", double(f64::NAN)),
            ("inf", double(f64::INFINITY)),
            (
                "list_nan",
                ld(
                    6,
                    &[ld(1, &double(f64::NAN)), ld(1, &ld(3, b"ok"))].concat(),
                ),
            ),
            (
                "list_then_text",
                [ld(6, &ld(1, &ld(3, b"x"))), ld(3, b"t")].concat(),
            ),
            (
                "text_then_list",
                [ld(3, b"t"), ld(6, &ld(1, &ld(3, b"x")))].concat(),
            ),
            ("struct_then_bool", [ld(5, &[]), vec![0x20, 0x01]].concat()),
            (
                "bad_list_then_text",
                [ld(6, &ld(1, &ld(3, &[0xff]))), ld(3, b"t")].concat(),
            ),
            (
                "bad_struct_then_text",
                [ld(5, &[0x08, 0x01]), ld(3, b"t")].concat(),
            ),
            ("bad_utf8", ld(3, &[0xff])),
            ("list_varint_values", ld(6, &[0x08, 0x01])),
            ("text_as_varint", vec![0x18, 0x01]),
            ("null_then_text", [vec![0x08, 0x00], ld(3, b"t")].concat()),
            ("text_then_null", [ld(3, b"t"), vec![0x08, 0x00]].concat()),
            ("unknown_field", [ld(3, b"t"), vec![0x38, 0x01]].concat()),
            ("empty", vec![]),
        ];
        let md = entries(&cases);
        let r = payload_ref(&md, F, "payload").unwrap().unwrap();
        for (name, _) in &cases {
            assert_eq!(typed(&r, &[name]), via_json(&r, &[name]), "{name}");
        }
        assert_eq!(typed(&r, &["bad_list_then_text"]), Err(()));
        assert_eq!(typed(&r, &["nan"]), Ok(None));
        // Nesting: refused at exactly the same depth, read the same below it.
        for object in [false, true] {
            for n in 12..18 {
                for leaf in [None, Some(json!("x"))] {
                    let v = nested(n, object, leaf);
                    let md = encode::metadata(F, "payload", &v);
                    let r = payload_ref(&md, F, "payload").unwrap().unwrap();
                    assert_eq!(
                        typed(&r, &["deep"]),
                        via_json(&r, &["deep"]),
                        "{n} {object}"
                    );
                }
            }
        }
    }

    // Equivalent mutants (`make mutants`): in the test encoder, `number << 3 | 2`
    // (`bytes_field`) and `2 << 3 | 1` (`value`) with `^` for `|`: the shifted
    // field number has no low bits, so both give the same tag byte.
    #[test]
    fn fixed32_fields_are_skipped() {
        let mut md = encode::metadata(F, "payload", &json!({"sub": "bob"}));
        md.extend([0x4d, 1, 2, 3, 4]); // field 9, wire type 5
        assert_eq!(payload(&md, F, "payload"), Ok(Some(json!({"sub": "bob"}))));
        // A fixed64 inside a Value where a number is expected is its double.
        let mut v = vec![2 << 3 | 1];
        v.extend(2.5f64.to_le_bytes());
        assert_eq!(payload(&with_value(&v), F, "payload"), Ok(Some(json!(2.5))));
    }

    #[test]
    fn known_fields_with_the_wrong_wire_type_are_errors() {
        let p = |md: &[u8]| payload(md, F, "payload");
        // Map entry key (1) or value (2) as a varint.
        assert_eq!(p(&ld(1, &[0x08, 0x01])), Err(()));
        assert_eq!(
            p(&ld(1, &[ld(1, F.as_bytes()), vec![0x10, 0x01]].concat())),
            Err(())
        );
        // Struct.fields (1) as a varint.
        assert_eq!(p(&with_struct(&[0x08, 0x01])), Err(()));
        // Value: string_value (3) as a varint, number_value (2) as bytes, a varint
        // struct_value (5) or list_value (6), bool_value (4) as bytes.
        for bad in [
            [0x18, 0x01],
            [0x12, 0x00],
            [0x28, 0x01],
            [0x30, 0x01],
            [0x22, 0x00],
        ] {
            assert_eq!(p(&with_value(&bad)), Err(()), "{bad:?}");
        }
        // ListValue.values (1) as a varint.
        assert_eq!(p(&with_value(&ld(6, &[0x08, 0x01]))), Err(()));
        // Unknown fields of a Value are skipped; the last known one wins.
        assert_eq!(
            p(&with_value(&[0x38, 0x01, 0x20, 0x01])),
            Ok(Some(json!(true)))
        );
    }

    /// `n` JSON containers, nested, inside the payload object: lists or objects,
    /// the innermost holding `leaf` (or nothing).
    fn nested(n: usize, object: bool, leaf: Option<Value>) -> Value {
        let wrap = |v: Option<Value>| match (object, v) {
            (true, Some(v)) => json!({ "k": v }),
            (true, None) => json!({}),
            (false, Some(v)) => json!([v]),
            (false, None) => json!([]),
        };
        let mut v = wrap(leaf);
        for _ in 1..n {
            v = wrap(Some(v));
        }
        json!({ "deep": v })
    }

    #[test]
    fn sixteen_containers_are_read_and_the_seventeenth_is_refused() {
        let read = |v: &Value| payload(&encode::metadata(F, "payload", v), F, "payload");
        for object in [false, true] {
            // The payload object itself is the first container.
            let ok = nested(15, object, None);
            assert_eq!(read(&ok), Ok(Some(ok.clone())), "object {object}");
            assert_eq!(read(&nested(16, object, None)), Err(()), "object {object}");
            let leaf = nested(14, object, Some(json!("x")));
            assert_eq!(read(&leaf), Ok(Some(leaf.clone())), "object {object}");
            assert_eq!(
                read(&nested(15, object, Some(json!("x")))),
                Err(()),
                "object {object}"
            );
        }
        // Equivalent mutant: `>` → `>=` in decode_value's depth check. Values are
        // always read at odd depths (Struct and ListValue at even ones, from 0),
        // so a Value never sits at depth MAX_DEPTH (32) itself.
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = json!("leaf");
        for _ in 0..40 {
            v = json!([v]);
        }
        let md = encode::metadata(F, "payload", &json!({ "deep": v }));
        assert_eq!(payload(&md, F, "payload"), Err(()));
    }

    #[test]
    fn numbers_keep_integers_whole() {
        assert_eq!(number(3.0), json!(3));
        assert_eq!(number(-7.0), json!(-7));
        assert_eq!(number(0.5), json!(0.5));
        assert_eq!(
            number(9_007_199_254_740_992.0),
            json!(9_007_199_254_740_992.0)
        );
        assert_eq!(number(f64::NAN), Value::Null);
        assert_eq!(number(f64::INFINITY), Value::Null);
    }
}
