//! A small reader over a JSON tree that knows where it is.
//!
//! serde's derive would reject unknown fields too, but its errors carry a line and
//! column, not the path a user needs (`routes[2].inject[0].header`). Every getter
//! here returns a [`ConfigError`] carrying the full path of the field.
//!
//! The tree is [`Value`], not `serde_json::Value`: it borrows its strings from the
//! configuration text where they have no escapes, and keeps an object's members in
//! one sorted vector instead of a `BTreeMap`. A 10,000-route configuration is a
//! few hundred thousand JSON values; building and dropping `serde_json::Value`s
//! for them was about 40 % of its load time. It reads what `serde_json::Value`
//! reads, the same way: serde_json's parser fills it, a repeated key keeps its
//! last value, members are visited in key order, and integers are told apart
//! from other numbers as serde_json tells them.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::error::{ConfigError, ErrorKind};

/// A JSON value of the configuration text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Value<'a>>),
    Object(Map<'a>),
}

/// A JSON number as serde_json reads it: a non-negative integer, a negative
/// one, or anything else (a fraction, an exponent, or beyond 64 bits).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    PosInt(u64),
    NegInt(i64),
    Float(f64),
}

/// A JSON object: its members sorted by key, each key once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Map<'a>(Vec<(Cow<'a, str>, Value<'a>)>);

impl<'a> Map<'a> {
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|(_, v)| v)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_ref())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value<'a>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

type Member<'a> = (Cow<'a, str>, Value<'a>);

impl<'m, 'a> IntoIterator for &'m Map<'a> {
    type Item = (&'m str, &'m Value<'a>);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'m, Member<'a>>, fn(&'m Member<'a>) -> Self::Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

impl<'a> Value<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A non-negative integer, as `serde_json::Value::as_u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(Number::PosInt(n)) => Some(*n),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The same value as a `serde_json::Value` (for the tests and the fuzz target,
    /// which compare the two readings).
    pub fn to_serde(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(Number::PosInt(n)) => serde_json::Value::from(*n),
            Value::Number(Number::NegInt(n)) => serde_json::Value::from(*n),
            Value::Number(Number::Float(f)) => serde_json::Number::from_f64(*f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Value::String(s) => serde_json::Value::String(s.to_string()),
            Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_serde).collect())
            }
            Value::Object(m) => serde_json::Value::Object(
                m.iter()
                    .map(|(k, v)| (k.to_string(), v.to_serde()))
                    .collect(),
            ),
        }
    }

    /// Parses `text` with serde_json's parser.
    pub fn parse(text: &'a [u8]) -> Result<Value<'a>, serde_json::Error> {
        serde_json::from_slice(text)
    }
}

impl<'de> Deserialize<'de> for Value<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(b))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value<'de>, E> {
        Ok(Value::Number(Number::PosInt(n)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value<'de>, E> {
        // As serde_json's `Number::from(i64)`: a non-negative one is a PosInt.
        Ok(Value::Number(match u64::try_from(n) {
            Ok(u) => Number::PosInt(u),
            Err(_) => Number::NegInt(n),
        }))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value<'de>, E> {
        Ok(Value::Number(Number::Float(n)))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s.to_string())))
    }

    fn visit_string<E>(self, s: String) -> Result<Value<'de>, E> {
        Ok(Value::String(Cow::Owned(s)))
    }

    fn visit_none<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value<'de>, D::Error> {
        Deserialize::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'de>, A::Error> {
        let mut members: Vec<(Cow<'de, str>, Value<'de>)> =
            Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            members.push((key.0, map.next_value()?));
        }
        // Key order, and a repeated key keeps its last value (as a BTreeMap
        // insert does): a stable sort keeps repeats in document order.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Cow<'de, str>, Value<'de>)> = Vec::with_capacity(members.len());
        for m in members {
            match out.last_mut() {
                Some(last) if last.0 == m.0 => *last = m,
                _ => out.push(m),
            }
        }
        Ok(Value::Object(Map(out)))
    }
}

/// An object key, borrowed from the text when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// The JSON type name used in "expected …, found …" messages. The value itself
/// is never echoed: a mistyped field may hold a secret.
pub fn type_name(v: &Value<'_>) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(path: &str, expected: &'static str, found: &Value<'_>) -> ConfigError {
    ConfigError::new(
        path,
        ErrorKind::WrongType {
            expected,
            found: type_name(found),
        },
    )
}

/// `path.key` (or `key` at the top). Built by hand, not with `format!`: a large
/// configuration builds a few of these per route and per connection.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        return key.to_string();
    }
    let mut out = String::with_capacity(path.len() + 1 + key.len());
    out.push_str(path);
    out.push('.');
    out.push_str(key);
    out
}

/// `path[i]`.
pub fn index(path: &str, i: usize) -> String {
    let mut digits = [0u8; 20];
    let mut n = i;
    let mut at = digits.len();
    loop {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    let digits = digits.get(at..).unwrap_or_default();
    let mut out = String::with_capacity(path.len() + digits.len() + 2);
    out.push_str(path);
    out.push('[');
    out.extend(digits.iter().map(|&d| char::from(d)));
    out.push(']');
    out
}

/// A JSON object being read, with its path.
pub struct Obj<'a> {
    pub path: String,
    pub map: &'a Map<'a>,
}

impl<'a> Obj<'a> {
    /// `value` must be an object whose keys are all in `known`.
    pub fn new(
        path: impl Into<String>,
        value: &'a Value<'a>,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        Self::checked(path.into(), value, known, false)
    }

    /// The configuration's top-level object: its `known` fields, and `$schema`
    /// (a string, for editors; ignored).
    pub fn top(value: &'a Value<'a>, known: &'static [&'static str]) -> Result<Self, ConfigError> {
        Self::checked(String::new(), value, known, true)
    }

    fn checked(
        path: String,
        value: &'a Value<'a>,
        known: &'static [&'static str],
        schema: bool,
    ) -> Result<Self, ConfigError> {
        let map = as_object(&path, value)?;
        if let (true, Some(v)) = (schema, map.get("$schema")) {
            if !matches!(v, Value::String(_)) {
                return Err(wrong_type("$schema", "a string", v));
            }
        }
        for key in map.keys() {
            let ignored = schema && key == "$schema";
            if !(known.contains(&key) || ignored) {
                return Err(ConfigError::new(
                    join(&path, key),
                    ErrorKind::UnknownField { expected: known },
                ));
            }
        }
        Ok(Obj { path, map })
    }

    pub fn child(&self, key: &str) -> String {
        join(&self.path, key)
    }

    pub fn get(&self, key: &str) -> Option<&'a Value<'a>> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn required(&self, key: &str) -> Result<&'a Value<'a>, ConfigError> {
        self.get(key)
            .ok_or_else(|| ConfigError::new(self.child(key), ErrorKind::Missing))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => as_str(&self.child(key), v).map(Some),
        }
    }

    /// A required string that must not be empty.
    pub fn req_str(&self, key: &str) -> Result<&'a str, ConfigError> {
        match self.required(key)? {
            Value::String(s) if !s.is_empty() => Ok(s),
            Value::String(_) => Err(ConfigError::empty_string(self.child(key))),
            v => as_str(&self.child(key), v),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(&self.child(key), "a boolean", v)),
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                None => Err(wrong_type(&self.child(key), "a non-negative integer", v)),
            },
        }
    }

    pub fn opt_obj(
        &self,
        key: &str,
        known: &'static [&'static str],
    ) -> Result<Option<Obj<'a>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => Obj::new(self.child(key), v, known).map(Some),
        }
    }

    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value<'a>>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong_type(&self.child(key), "an array", v)),
        }
    }

    /// An optional list of non-empty strings.
    pub fn opt_str_list(&self, key: &str) -> Result<Option<Vec<&'a str>>, ConfigError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        // The path is built only if an element is wrong.
        if items
            .iter()
            .all(|v| matches!(v, Value::String(s) if !s.is_empty()))
        {
            return Ok(Some(items.iter().filter_map(Value::as_str).collect()));
        }
        str_list(&self.child(key), items).map(Some)
    }
}

pub fn str_list<'a>(path: &str, items: &'a [Value<'_>]) -> Result<Vec<&'a str>, ConfigError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let s = as_str(&p, item)?;
        if s.is_empty() {
            return Err(ConfigError::empty_string(p));
        }
        out.push(s);
    }
    Ok(out)
}

pub fn as_object<'a, 'b>(path: &str, v: &'a Value<'b>) -> Result<&'a Map<'b>, ConfigError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong_type(path, "an object", other)),
    }
}

pub fn as_str<'a>(path: &str, v: &'a Value<'_>) -> Result<&'a str, ConfigError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(path, "a string", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two mutants cargo-mutants reports as missed are equivalent: the `expecting`
    // texts of `ValueVisitor` and `KeyVisitor` are only shown when a visitor is
    // handed a type it doesn't accept, and neither is ever: `ValueVisitor`
    // accepts every JSON type (`deserialize_any`), and serde_json hands object
    // keys to `KeyVisitor` only as strings.

    #[test]
    fn paths_are_written_as_format_would() {
        for i in [0, 7, 10, 99, 12_345, usize::MAX] {
            assert_eq!(index("routes", i), format!("routes[{i}]"));
            assert_eq!(index("", i), format!("[{i}]"));
        }
        assert_eq!(join("", "routes"), "routes");
        assert_eq!(join("routes[3]", "inject"), "routes[3].inject");
        assert_eq!(join("a", ""), "a.");
    }

    #[test]
    fn reads_what_serde_json_reads() {
        for text in [
            r#"{"b": 1, "a": 2, "b": 3}"#,
            r#"{"k": [0, -0, 5, -5, 5.0, 1e3, -1.5e-3, 18446744073709551615, 18446744073709551616, -9223372036854775808]}"#,
            r#"{"esc\u0061ped": "tab\there \u00e9 \ud83d\ude00", "plain": "x", "": null}"#,
            r#"[{"z": {"y": [true, false, null]}}, [], {}, ""]"#,
            r#"{"dup": {"x": 1}, "dup": {"y": 2}, "a\"b": "q\"q"}"#,
            "  \"just a string\"  ",
            "-12",
        ] {
            let ours = Value::parse(text.as_bytes()).unwrap();
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours.to_serde(), theirs, "{text}");
            // Members in key order, each key once, as serde_json's map.
            if let (Value::Object(m), serde_json::Value::Object(t)) = (&ours, &theirs) {
                assert!(m.keys().eq(t.keys().map(String::as_str)), "{text}");
            }
        }
    }

    #[test]
    fn integers_are_told_apart_as_serde_json_does() {
        for (text, want) in [
            ("5", Some(5)),
            ("-0", None),
            ("0", Some(0)),
            ("-5", None),
            ("5.0", None),
            ("1e2", None),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
        ] {
            let ours = Value::parse(text.as_bytes()).unwrap();
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours.as_u64(), want, "{text}");
            assert_eq!(theirs.as_u64(), want, "{text}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let text = br#"{"plain": "abc", "esc\"aped": "a\nb"}"#;
        let Value::Object(m) = Value::parse(text).unwrap() else {
            panic!("not an object")
        };
        let (k0, v0) = (&m.0[0].0, &m.0[0].1);
        let (k1, v1) = (&m.0[1].0, &m.0[1].1);
        assert!(matches!(k0, Cow::Owned(_)) && k0 == "esc\"aped");
        assert!(matches!(v0, Value::String(Cow::Owned(s)) if s == "a\nb"));
        assert!(matches!(k1, Cow::Borrowed("plain")));
        assert!(matches!(v1, Value::String(Cow::Borrowed("abc"))));
    }

    #[test]
    fn errors_and_depth_are_serde_json_s() {
        for text in ["{", "[1,]", r#"{"a" 1}"#, "nul", "\"\\x\""] {
            let ours = Value::parse(text.as_bytes()).unwrap_err().to_string();
            let theirs = serde_json::from_str::<serde_json::Value>(text)
                .unwrap_err()
                .to_string();
            assert_eq!(ours, theirs, "{text}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(Value::parse(deep.as_bytes()).is_err());
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
    }
}
