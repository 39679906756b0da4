//! Configuration errors: each names the JSON path of the field and what is wrong
//! with it, and never a secret value.

use std::fmt;

use crate::secret::SecretError;

/// A configuration that can't be loaded. `Display` gives `path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path of the offending field: `connections.orders_read.provider`,
    /// `routes[1].inject[0].header`; empty for the document itself.
    pub path: String,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The document is not JSON (serde_json's message: position only, no content).
    NotJson(String),
    UnknownField {
        expected: &'static [&'static str],
    },
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    Missing,
    /// A value of the right type that is not acceptable; `value` is quoted.
    Invalid {
        value: String,
        reason: String,
    },
    UnknownReference {
        what: &'static str,
        name: String,
    },
    Duplicate {
        what: &'static str,
        name: String,
        first: String,
    },
    EmptyList,
    /// `access: {}` or an access policy that can admit no one.
    EmptyAccess,
    /// Fields that can't be combined, or one that doesn't apply here.
    NotAllowed(String),
    Secret(SecretError),
}

impl ConfigError {
    pub fn new(path: impl Into<String>, kind: ErrorKind) -> Self {
        ConfigError {
            path: path.into(),
            kind,
        }
    }

    /// The same error at `path` (for checks that learn their path only on failure).
    pub fn at(self, path: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            ..self
        }
    }

    pub fn invalid(path: impl Into<String>, value: &str, reason: impl Into<String>) -> Self {
        Self::new(
            path,
            ErrorKind::Invalid {
                value: value.to_string(),
                reason: reason.into(),
            },
        )
    }

    pub fn not_allowed(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(path, ErrorKind::NotAllowed(reason.into()))
    }

    /// An empty string where a value is needed.
    pub fn empty_string(path: impl Into<String>) -> Self {
        Self::not_allowed(path, "must not be an empty string")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        match &self.kind {
            ErrorKind::NotJson(msg) => write!(f, "configuration is not valid JSON: {msg}"),
            ErrorKind::UnknownField { expected } => {
                write!(f, "unknown field; expected one of ")?;
                write_list(f, expected)
            }
            ErrorKind::WrongType { expected, found } => {
                write!(f, "expected {expected}, found {found}")
            }
            ErrorKind::Missing => write!(f, "required field is missing"),
            ErrorKind::Invalid { value, reason } => write!(f, "invalid value {value:?}: {reason}"),
            ErrorKind::UnknownReference { what, name } => write!(f, "unknown {what} {name:?}"),
            ErrorKind::Duplicate { what, name, first } => {
                write!(f, "duplicate {what} {name:?} (first used at {first})")
            }
            ErrorKind::EmptyList => write!(f, "must not be empty"),
            ErrorKind::EmptyAccess => write!(
                f,
                "access policy admits no one; give at least one of \"public\": true, \
                 \"authenticated\": true, \"users\", \"groups\" or \"claims\""
            ),
            ErrorKind::NotAllowed(reason) => f.write_str(reason),
            ErrorKind::Secret(e) => write!(f, "{e}"),
        }
    }
}

fn write_list(f: &mut fmt::Formatter<'_>, items: &[&str]) -> fmt::Result {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "\"{item}\"")?;
    }
    Ok(())
}

impl std::error::Error for ConfigError {}
