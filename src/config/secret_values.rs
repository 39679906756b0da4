//! The secrets a configuration names, as the sections after `secrets` see them:
//! values known at load by name, and the stores (by the index [`Names`] gave
//! them). Its own module so that reading a store (which needs the values for
//! its own credentials) and reading the section (which reads the stores) don't
//! import each other.

use std::collections::HashMap;

use super::error::{ConfigError, ErrorKind};
use super::names::{Names, SecretSlot};
use super::{SecretRef, Store};
use crate::secret::Secret;

/// The secrets section, read.
#[derive(Default)]
pub struct Secrets<'t> {
    /// Secrets known at load, by name.
    pub values: HashMap<&'t str, Secret>,
    /// `Config::stores`, at the indices [`Names`] gave them.
    pub stores: Vec<Store>,
}

impl Secrets<'_> {
    /// Secret `name` as a provider or connection holds it; `path` (of the field
    /// naming it) is built only for an error.
    pub fn reference(
        &self,
        names: &Names,
        name: &str,
        path: impl Fn() -> String,
    ) -> Result<SecretRef, ConfigError> {
        match names.secret(name, &path)? {
            SecretSlot::Store(i) => Ok(SecretRef::Store(i)),
            SecretSlot::Value => self
                .known_at_load(name, path, "secret")
                .map(SecretRef::Value),
        }
    }

    /// Secret `name`, which must be known at load: a store's own credential
    /// can't be read from a store itself.
    pub fn known_at_load(
        &self,
        name: &str,
        path: impl FnOnce() -> String,
        what: &'static str,
    ) -> Result<Secret, ConfigError> {
        match self.values.get(name) {
            Some(secret) => Ok(secret.clone()),
            None => Err(ConfigError::new(
                path(),
                ErrorKind::UnknownReference {
                    what,
                    name: name.to_string(),
                },
            )),
        }
    }
}
