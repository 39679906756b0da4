//! Secret values and where they come from.
//!
//! A [`Secret`] holds a credential (API key, client secret, refresh token, access
//! token). Its `Debug` and `Display` print `[redacted]`, so a secret can't reach a
//! log line, an error body or a metric through formatting. The only way to read it
//! is [`Secret::expose`], which the injection and token code call at the point of
//! use.
//!
//! A [`SecretSource`] says where a named secret is read from. Today: an environment
//! variable of the wasm VM or an inline value (development only). Secret stores with
//! rotation (Key Vault, Vault KV v2) will be further variants; callers already go
//! through [`SecretSource::resolve`] and handle its error.

use std::fmt;
use std::rc::Rc;

/// A credential value. Never printed.
#[derive(Clone, PartialEq, Eq)]
///
/// Shared, not copied: a request carrying a cached credential clones it, and a
/// clone is a reference count, not an allocation.
pub struct Secret(Rc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Rc::from(value.into()))
    }

    /// A value shared with where it is kept (a client certificate's cluster in
    /// the configuration): a reference count, no copy per request.
    pub fn shared(value: Rc<str>) -> Self {
        Secret(value)
    }

    /// The secret's value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a named secret comes from (`secrets.<name>` in the configuration).
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `{"env": "NAME"}`: an environment variable of the wasm VM.
    Env(String),
    /// `{"inline": "value"}`: in the configuration itself; development only.
    Inline(Secret),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            SecretSource::Inline(_) => f.write_str("Inline([redacted])"),
        }
    }
}

/// Why a secret could not be resolved. Names the source, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretError {
    EnvUnset(String),
    EnvEmpty(String),
    /// The value has a control character (CR, LF, NUL, …): it can't go into a
    /// header or a query. Says where the value came from, never the value.
    ControlCharacter {
        from: String,
    },
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretError::EnvUnset(name) => write!(f, "environment variable \"{name}\" is not set"),
            SecretError::EnvEmpty(name) => write!(f, "environment variable \"{name}\" is empty"),
            SecretError::ControlCharacter { from } => write!(
                f,
                "the value {from} has a control character (CR, LF, NUL, …); secrets must be printable"
            ),
        }
    }
}

impl SecretSource {
    /// Reads the secret. `env` looks a variable up; the caller passes it so that
    /// tests need not touch the process environment.
    pub fn resolve(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Secret, SecretError> {
        match self {
            SecretSource::Env(name) => match env(name) {
                None => Err(SecretError::EnvUnset(name.clone())),
                Some(v) if v.is_empty() => Err(SecretError::EnvEmpty(name.clone())),
                Some(v) => check_value(Secret::new(v), || {
                    format!("of environment variable \"{name}\"")
                }),
            },
            SecretSource::Inline(secret) => {
                check_value(secret.clone(), || "given inline".to_string())
            }
        }
    }
}

/// Refuses a secret value with a control character: Envoy refuses such a header
/// value, so the route would answer 503 to every request instead. The same rule
/// holds for values read from secret stores.
pub fn check_value(secret: Secret, from: impl FnOnce() -> String) -> Result<Secret, SecretError> {
    if secret.0.chars().any(char::is_control) {
        return Err(SecretError::ControlCharacter { from: from() });
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some([redacted])");
        let src = SecretSource::Inline(Secret::new("hunter2"));
        assert_eq!(format!("{src:?}"), "Inline([redacted])");
        assert_eq!(
            format!("{:?}", SecretSource::Env("API_KEY".into())),
            "Env(\"API_KEY\")"
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn env_source_resolves_or_names_the_variable() {
        let env = |k: &str| match k {
            "SET" => Some("v".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        assert_eq!(
            SecretSource::Env("SET".into())
                .resolve(&env)
                .unwrap()
                .expose(),
            "v"
        );
        assert_eq!(
            SecretSource::Env("NOPE".into())
                .resolve(&env)
                .unwrap_err()
                .to_string(),
            "environment variable \"NOPE\" is not set"
        );
        assert_eq!(
            SecretSource::Env("EMPTY".into())
                .resolve(&env)
                .unwrap_err()
                .to_string(),
            "environment variable \"EMPTY\" is empty"
        );
    }

    #[test]
    fn control_characters_are_refused_without_the_value() {
        for bad in [
            "a\r\nx-evil: 1",
            "k\0ey",
            "tab\there",
            "del\u{7f}",
            "nel\u{85}",
        ] {
            let env = |_: &str| Some(bad.to_string());
            let err = SecretSource::Env("K".into()).resolve(&env).unwrap_err();
            assert_eq!(
                err.to_string(),
                "the value of environment variable \"K\" has a control character (CR, LF, NUL, …); \
                 secrets must be printable"
            );
            let err = SecretSource::Inline(Secret::new(bad))
                .resolve(&env)
                .unwrap_err();
            assert!(err.to_string().starts_with("the value given inline has"));
            assert!(!err.to_string().contains(bad));
        }
        let env = |_: &str| Some("printable: é ü ~ =".to_string());
        assert!(SecretSource::Env("K".into()).resolve(&env).is_ok());
    }
}
