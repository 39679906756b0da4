//! An `access` policy, of a route or a connection: who may use it. The claims it
//! names join the list of claims read per request ([`ClaimPaths`]).

use super::claims::ClaimPaths;
use super::error::{ConfigError, ErrorKind};
use super::fields::owned;
use super::json::{as_object, join, str_list, type_name, Obj, Value};
use super::lexical;
use super::Access;

const ACCESS: &[&str] = &["public", "authenticated", "users", "groups", "claims"];

/// Reads the policy at `path`; one that admits no one is refused.
pub fn read(path: &str, value: &Value, claims: &mut ClaimPaths) -> Result<Access, ConfigError> {
    let a = Obj::new(path, value, ACCESS)?;
    let mut access = Access {
        public: a.opt_bool("public")?.unwrap_or(false),
        authenticated: a.opt_bool("authenticated")?.unwrap_or(false),
        users: owned(a.opt_str_list("users")?.unwrap_or_default()),
        groups: owned(a.opt_str_list("groups")?.unwrap_or_default()),
        claims: Vec::new(),
    };
    if let Some(c) = a.get("claims") {
        let cpath = a.child("claims");
        for (claim, values) in as_object(&cpath, c)? {
            let p = join(&cpath, claim);
            lexical::claim_name(claim).map_err(|e| e.at(&p))?;
            let values = match values {
                Value::Array(items) => owned(str_list(&p, items)?),
                Value::String(s) if !s.is_empty() => vec![s.to_string()],
                other => {
                    return Err(ConfigError::new(
                        p,
                        ErrorKind::WrongType {
                            expected: "an array of strings",
                            found: type_name(other),
                        },
                    ))
                }
            };
            if values.is_empty() {
                return Err(ConfigError::new(p, ErrorKind::EmptyList));
            }
            access.claims.push((claims.index(claim), values));
        }
    }
    let admits_someone = access.public
        || access.authenticated
        || !access.users.is_empty()
        || !access.groups.is_empty()
        || !access.claims.is_empty();
    if !admits_someone {
        return Err(ConfigError::new(path, ErrorKind::EmptyAccess));
    }
    Ok(access)
}
