//! A small reader over `serde_json::Value` that knows where it is.
//!
//! serde's derive would reject unknown fields too, but its errors carry a line and
//! column, not the path a user needs (`routes[2].inject[0].header`). Every getter
//! here returns a [`ConfigError`] carrying the full path of the field.

use serde_json::{Map, Value};

use super::error::{ConfigError, ErrorKind};

/// The JSON type name used in "expected …, found …" messages. The value itself
/// is never echoed: a mistyped field may hold a secret.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(path: &str, expected: &'static str, found: &Value) -> ConfigError {
    ConfigError::new(
        path,
        ErrorKind::WrongType {
            expected,
            found: type_name(found),
        },
    )
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// A JSON object being read, with its path.
pub struct Obj<'a> {
    pub path: String,
    pub map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    /// `value` must be an object whose keys are all in `known`.
    pub fn new(
        path: impl Into<String>,
        value: &'a Value,
        known: &'static [&'static str],
    ) -> Result<Self, ConfigError> {
        let path = path.into();
        let map = as_object(&path, value)?;
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
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

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn required(&self, key: &str) -> Result<&'a Value, ConfigError> {
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
            Value::String(_) => {
                Err(ConfigError::new(self.child(key), ErrorKind::EmptyList).with_empty_string())
            }
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

    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
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

pub fn str_list<'a>(path: &str, items: &'a [Value]) -> Result<Vec<&'a str>, ConfigError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let s = as_str(&p, item)?;
        if s.is_empty() {
            return Err(ConfigError::new(p, ErrorKind::EmptyList).with_empty_string());
        }
        out.push(s);
    }
    Ok(out)
}

pub fn as_object<'a>(path: &str, v: &'a Value) -> Result<&'a Map<String, Value>, ConfigError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong_type(path, "an object", other)),
    }
}

pub fn as_str<'a>(path: &str, v: &'a Value) -> Result<&'a str, ConfigError> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(path, "a string", other)),
    }
}

impl ConfigError {
    /// An empty string where a value is needed reads better as "must not be empty".
    fn with_empty_string(self) -> Self {
        ConfigError::not_allowed(self.path, "must not be an empty string")
    }
}
