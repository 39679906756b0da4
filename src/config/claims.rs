//! The `claims` section: where the caller's verified claims come from, and which
//! claims name the subject and the groups. It also keeps the list of every claim
//! the request path reads ([`ClaimPaths`]): the subject and the groups first, at
//! their fixed places, then each claim an access policy names, once.

use super::error::{ConfigError, ErrorKind};
use super::json::{Obj, Value};
use super::lexical;
use super::{ClaimPath, ClaimsConfig, ClaimsSource};

const CLAIMS: &[&str] = &["from", "key", "subject", "groups"];

/// The claims read per request, in the order of `Config::claim_paths`.
pub struct ClaimPaths(Vec<ClaimPath>);

impl ClaimPaths {
    /// The index of claim `dotted`, added at the end if no policy named it before.
    pub fn index(&mut self, dotted: &str) -> usize {
        if let Some(i) = self.0.iter().position(|c| c.dotted == dotted) {
            return i;
        }
        self.0.push(ClaimPath::new(dotted));
        self.0.len() - 1
    }

    pub fn into_vec(self) -> Vec<ClaimPath> {
        self.0
    }
}

/// Reads `claims`; the claim list starts with its subject and groups
/// (`SUBJECT_CLAIM`, `GROUPS_CLAIM`).
pub fn read(top: &Obj) -> Result<(ClaimsConfig, ClaimPaths), ConfigError> {
    let c = top.opt_obj("claims", CLAIMS)?;
    let get = |k: &str| -> Result<Option<&str>, ConfigError> {
        match &c {
            Some(c) => c.opt_str(k),
            None => Ok(None),
        }
    };
    // `key`: one name, or (jwt_metadata) a list whose first present key is read.
    let listed = matches!(c.as_ref().and_then(|c| c.get("key")), Some(Value::Array(_)));
    let keys: Vec<&str> = match c.as_ref().map(|c| (c, c.get("key"))) {
        Some((c, Some(Value::Array(_)))) => {
            let keys = c.opt_str_list("key")?.unwrap_or_default();
            if keys.is_empty() {
                return Err(ConfigError::new("claims.key", ErrorKind::EmptyList));
            }
            keys
        }
        _ => vec![get("key")?.unwrap_or("payload")],
    };
    if keys.iter().any(|k| k.is_empty()) {
        return Err(ConfigError::empty_string("claims.key"));
    }
    let source = match get("from")?.unwrap_or("jwt_metadata") {
        "jwt_metadata" => ClaimsSource::JwtMetadata {
            keys: keys.iter().map(|k| k.to_string()).collect(),
        },
        "header" => match keys.as_slice() {
            [key] if !listed => ClaimsSource::Header {
                name: lexical::header_name(key).map_err(|e| e.at("claims.key"))?,
            },
            _ => {
                return Err(ConfigError::not_allowed(
                    "claims.key",
                    "a list of keys only with \"from\": \"jwt_metadata\"; a header is one name",
                ))
            }
        },
        "none" => ClaimsSource::None,
        other => {
            return Err(ConfigError::invalid(
                "claims.from",
                other,
                "expected one of \"jwt_metadata\", \"header\", \"none\"",
            ))
        }
    };
    let subject = get("subject")?.unwrap_or("sub");
    let groups = get("groups")?.unwrap_or("groups");
    lexical::claim_name(subject).map_err(|e| e.at("claims.subject"))?;
    lexical::claim_name(groups).map_err(|e| e.at("claims.groups"))?;
    // Fixed places: SUBJECT_CLAIM and GROUPS_CLAIM.
    let paths = ClaimPaths(vec![ClaimPath::new(subject), ClaimPath::new(groups)]);
    Ok((ClaimsConfig { source }, paths))
}
