//! The first pass over a configuration: every name the `secrets`, `providers` and
//! `connections` sections define, mapped to the index its item will have, before
//! any section is read. A reference then resolves to its index at once, whichever
//! section and place in the document it names: a Key Vault secret names the
//! connection whose token reads it, connections name providers and secrets,
//! routes name connections.
//!
//! The pass refuses nothing: a section or an entry that is not an object defines
//! what it can, and the section's own reader refuses it, naming its path.

use std::collections::HashMap;

use super::error::{ConfigError, ErrorKind};
use super::json::{Obj, Value};

/// What a secret's name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSlot {
    /// A value known at load (`env`, `inline`).
    Value,
    /// A store read at run time: its index in `Config::stores`.
    Store(usize),
}

/// Names in the document, each with the index of its item.
pub struct Names<'t> {
    secrets: HashMap<&'t str, SecretSlot>,
    providers: HashMap<&'t str, usize>,
    connections: HashMap<&'t str, usize>,
}

/// Whether a `secrets` entry is a value known at load (`env` or `inline`), not a
/// store. The pass and the secrets reader ask this one question, so that a
/// store's index here is its place among the stores the reader builds.
pub fn holds_value(entry: &Value) -> bool {
    match entry {
        Value::Object(m) => ["env", "inline"]
            .iter()
            .any(|k| m.get(k).is_some_and(|v| !v.is_null())),
        _ => false,
    }
}

/// The members of the top-level object `key`, in document (key) order; none if
/// it is absent or not an object.
fn members<'t>(top: &Obj<'t>, key: &str) -> impl Iterator<Item = (&'t str, &'t Value<'t>)> {
    let map = match top.get(key) {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    map.into_iter().flat_map(|m| m.iter())
}

fn unknown(what: &'static str, name: &str, path: impl FnOnce() -> String) -> ConfigError {
    ConfigError::new(
        path(),
        ErrorKind::UnknownReference {
            what,
            name: name.to_string(),
        },
    )
}

impl<'t> Names<'t> {
    pub fn collect(top: &Obj<'t>) -> Self {
        let mut stores = 0;
        let secrets = members(top, "secrets")
            .map(|(name, entry)| {
                let slot = if holds_value(entry) {
                    SecretSlot::Value
                } else {
                    stores += 1;
                    SecretSlot::Store(stores - 1)
                };
                (name, slot)
            })
            .collect();
        let numbered = |key| {
            members(top, key)
                .enumerate()
                .map(|(i, (name, _))| (name, i))
                .collect()
        };
        Names {
            secrets,
            providers: numbered("providers"),
            connections: numbered("connections"),
        }
    }

    /// The secret `name`; `path` (of the field naming it) is built only for an error.
    pub fn secret(
        &self,
        name: &str,
        path: impl FnOnce() -> String,
    ) -> Result<SecretSlot, ConfigError> {
        self.secrets
            .get(name)
            .copied()
            .ok_or_else(|| unknown("secret", name, path))
    }

    /// The index of provider `name` in `Config::providers`.
    pub fn provider(
        &self,
        name: &str,
        path: impl FnOnce() -> String,
    ) -> Result<usize, ConfigError> {
        self.providers
            .get(name)
            .copied()
            .ok_or_else(|| unknown("provider", name, path))
    }

    /// The index of connection `name` in `Config::connections`.
    pub fn connection(
        &self,
        name: &str,
        path: impl FnOnce() -> String,
    ) -> Result<usize, ConfigError> {
        self.connections
            .get(name)
            .copied()
            .ok_or_else(|| unknown("connection", name, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_its_index_before_any_section_is_read() {
        let doc = Value::parse(
            br#"{
              "secrets": { "z_env": {"env": "E"}, "b_vault": {"vault": {}}, "a_kv": {"azure_key_vault": "x"},
                           "c_inline": {"inline": "v", "vault": null}, "d_null_env": {"env": null},
                           "e_not_an_object": 5 },
              "providers": { "p2": 1, "p1": {} },
              "connections": { "c": {}, "a": {}, "b": [] }
            }"#,
        )
        .unwrap();
        let top = Obj::new("", &doc, &["secrets", "providers", "connections"]).unwrap();
        let n = Names::collect(&top);
        let path = || "here".to_string();
        // Stores are numbered in key order among the stores only.
        assert_eq!(n.secret("a_kv", path), Ok(SecretSlot::Store(0)));
        assert_eq!(n.secret("b_vault", path), Ok(SecretSlot::Store(1)));
        assert_eq!(n.secret("c_inline", path), Ok(SecretSlot::Value));
        assert_eq!(n.secret("d_null_env", path), Ok(SecretSlot::Store(2)));
        assert_eq!(n.secret("e_not_an_object", path), Ok(SecretSlot::Store(3)));
        assert_eq!(n.secret("z_env", path), Ok(SecretSlot::Value));
        assert_eq!(
            (n.provider("p1", path), n.provider("p2", path)),
            (Ok(0), Ok(1))
        );
        assert_eq!(n.connection("a", path), Ok(0));
        assert_eq!(n.connection("b", path), Ok(1));
        assert_eq!(n.connection("c", path), Ok(2));
        assert_eq!(
            n.connection("d", path).unwrap_err().to_string(),
            "here: unknown connection \"d\""
        );
        assert_eq!(
            n.provider("c", path).unwrap_err().to_string(),
            "here: unknown provider \"c\""
        );
        assert_eq!(
            n.secret("p1", path).unwrap_err().to_string(),
            "here: unknown secret \"p1\""
        );
    }

    #[test]
    fn sections_that_are_not_objects_define_nothing() {
        let doc =
            Value::parse(br#"{"secrets": [], "providers": "p", "connections": null}"#).unwrap();
        let top = Obj::new("", &doc, &["secrets", "providers", "connections"]).unwrap();
        let n = Names::collect(&top);
        assert!(n.secrets.is_empty() && n.providers.is_empty() && n.connections.is_empty());
    }
}
