//! Access decisions: may this caller use this route, and which connection serves
//! each of the route's injections.
//!
//! A route's `access` is checked first. Then, for each `inject` entry, the first
//! connection (in the configured order) whose `access` admits the caller is
//! picked. Every entry is resolved before anything is changed, so a request is
//! either fully served or refused: never half-injected.
//!
//! A refusal is 401 when the caller brought no claims (authenticating might
//! help) and 403 when it did (it would not).

use crate::claims::Identity;
use crate::config::{Access, Config, Credential, Fixed, SecretRef, Unmatched};
use crate::secret::Secret;

/// Whether `access` admits the caller (`None`: no claims).
pub fn admits(access: &Access, id: Option<&Identity>) -> bool {
    if access.public {
        return true;
    }
    let Some(id) = id else { return false };
    if access.authenticated {
        return true;
    }
    if let Some(sub) = id.subject() {
        if access.users.iter().any(|u| u == sub) {
            return true;
        }
    }
    if !access.groups.is_empty() && id.groups().any(|g| access.groups.iter().any(|a| a == g)) {
        return true;
    }
    !access.claims.is_empty()
        && access.claims.iter().all(|(claim, wanted)| {
            id.claim(*claim)
                .is_some_and(|v| wanted.iter().any(|w| v.holds(w)))
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// 401: no claims, and claims are needed.
    Unauthenticated,
    /// 403: the caller's claims don't admit it.
    Forbidden,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No route matched and `unmatched` is `allow`: forward, inject nothing.
    UnmatchedAllowed,
    /// No route matched and `unmatched` is `deny`: 403.
    UnmatchedDenied,
    Denied {
        route: usize,
        denial: Denial,
    },
    /// Forward; `picks[i]` is the connection serving `route.inject[i]`.
    Allowed {
        route: usize,
        picks: Vec<usize>,
    },
}

pub fn decide(config: &Config, route: Option<usize>, id: Option<&Identity>) -> Decision {
    let Some((ri, r)) = route.and_then(|i| config.route(i).map(|r| (i, r))) else {
        return match config.unmatched {
            Unmatched::Allow => Decision::UnmatchedAllowed,
            Unmatched::Deny => Decision::UnmatchedDenied,
        };
    };
    let denial = if id.is_some() {
        Denial::Forbidden
    } else {
        Denial::Unauthenticated
    };
    if let Some(access) = &r.access {
        if !admits(access, id) {
            return Decision::Denied { route: ri, denial };
        }
    }
    let mut picks = Vec::with_capacity(r.inject.len());
    for inj in &r.inject {
        let pick = inj.connections.iter().copied().find(|&ci| {
            config
                .connection(ci)
                .and_then(|c| c.access.as_ref())
                .is_some_and(|a| admits(a, id))
        });
        match pick {
            Some(ci) => picks.push(ci),
            None => return Decision::Denied { route: ri, denial },
        }
    }
    Decision::Allowed { route: ri, picks }
}

/// Route `route`'s [`Fixed`] plan, when every request on it is decided and
/// served alike: no policy on it reads claims (so [`decide`] sees no identity,
/// whoever calls), the decision allows, and each picked connection holds a
/// configured value rather than a token or a stored secret (which a cache
/// serves). A connection that binds the caller (token exchange, per-user
/// consent) serves tokens, so a route that may pick one never gets a plan.
/// The request path then skips the decision and the broker: the same answer,
/// made once.
pub fn fixed(config: &Config, route: usize) -> Option<Fixed> {
    let r = config.route(route)?;
    if r.needs_claims {
        return None;
    }
    let Decision::Allowed { picks, .. } = decide(config, Some(route), None) else {
        return None;
    };
    let values = picks
        .iter()
        .map(|&c| match &config.connection(c)?.credential {
            Credential::ApiKey(SecretRef::Value(v)) => Some(v.clone()),
            Credential::ClientCertificate { cluster } => Some(Secret::shared(cluster.clone())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Fixed { picks, values })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claims::ClaimValue;

    fn id(sub: &str, groups: &[&str]) -> Identity {
        Identity::new(vec![
            Some(ClaimValue::Scalar(sub.into())),
            Some(ClaimValue::List(
                groups.iter().map(|g| g.to_string()).collect(),
            )),
            Some(ClaimValue::Scalar("orders.read orders.write".into())),
            Some(ClaimValue::Scalar("3".into())),
        ])
    }

    fn access() -> Access {
        Access::default()
    }

    #[test]
    fn public_admits_everyone_even_without_claims() {
        let a = Access {
            public: true,
            ..access()
        };
        assert!(admits(&a, None));
        assert!(admits(&a, Some(&id("x", &[]))));
    }

    #[test]
    fn authenticated_needs_claims() {
        let a = Access {
            authenticated: true,
            ..access()
        };
        assert!(!admits(&a, None));
        assert!(admits(&a, Some(&Identity::default())));
    }

    #[test]
    fn users_and_groups_are_alternatives() {
        let a = Access {
            users: vec!["alice".into()],
            groups: vec!["admins".into()],
            ..access()
        };
        assert!(admits(&a, Some(&id("alice", &[]))));
        assert!(admits(&a, Some(&id("bob", &["staff", "admins"]))));
        assert!(!admits(&a, Some(&id("bob", &["staff"]))));
        assert!(!admits(&a, None));
    }

    #[test]
    fn claims_must_all_hold() {
        let a = Access {
            claims: vec![
                (2, vec!["orders.write".into()]),
                (3, vec!["2".into(), "3".into()]),
            ],
            ..access()
        };
        assert!(admits(&a, Some(&id("bob", &[]))));
        let a = Access {
            claims: vec![(2, vec!["orders.write".into()]), (3, vec!["4".into()])],
            ..access()
        };
        assert!(!admits(&a, Some(&id("bob", &[]))));
        let a = Access {
            claims: vec![(9, vec!["x".into()])],
            ..access()
        };
        assert!(!admits(&a, Some(&id("bob", &[]))));
    }

    fn config(unmatched: &str) -> Config {
        let json = serde_json::json!({
            "secrets": { "k": { "inline": "v" } },
            "providers": { "p": { "type": "api_key" } },
            "connections": {
                "admins": { "provider": "p", "api_key": "k", "access": { "groups": ["admins"] } },
                "anyone": { "provider": "p", "api_key": "k", "access": { "authenticated": true } }
            },
            "routes": [
                { "name": "guarded", "match": { "path_prefix": "/g/" },
                  "access": { "users": ["alice"] },
                  "inject": [ { "connections": ["admins", "anyone"], "header": "x-k" } ] },
                { "name": "admins_only", "match": { "path_prefix": "/a/" },
                  "inject": [ { "connections": ["admins"], "header": "x-k" } ] },
                { "name": "open", "match": { "path_prefix": "/o/" } }
            ],
            "unmatched": unmatched
        });
        Config::parse(json.to_string().as_bytes(), &|_| None).unwrap()
    }

    #[test]
    fn decide_checks_the_route_then_picks_a_connection_per_entry() {
        let c = config("deny");
        let admins = c
            .connections
            .iter()
            .position(|x| x.name == "admins")
            .unwrap();
        let anyone = c
            .connections
            .iter()
            .position(|x| x.name == "anyone")
            .unwrap();
        let alice = id("alice", &[]);
        let alice_admin = id("alice", &["admins"]);
        let bob = id("bob", &["admins"]);
        // The route's own access comes first: bob is refused although a connection admits him.
        assert_eq!(
            decide(&c, Some(0), Some(&bob)),
            Decision::Denied {
                route: 0,
                denial: Denial::Forbidden
            }
        );
        assert_eq!(
            decide(&c, Some(0), None),
            Decision::Denied {
                route: 0,
                denial: Denial::Unauthenticated
            }
        );
        // The first admitting connection, in the configured order.
        assert_eq!(
            decide(&c, Some(0), Some(&alice)),
            Decision::Allowed {
                route: 0,
                picks: vec![anyone]
            }
        );
        assert_eq!(
            decide(&c, Some(0), Some(&alice_admin)),
            Decision::Allowed {
                route: 0,
                picks: vec![admins]
            }
        );
        // No access on the route: only the entries decide.
        assert_eq!(
            decide(&c, Some(1), Some(&bob)),
            Decision::Allowed {
                route: 1,
                picks: vec![admins]
            }
        );
        assert_eq!(
            decide(&c, Some(1), Some(&alice)),
            Decision::Denied {
                route: 1,
                denial: Denial::Forbidden
            }
        );
        assert_eq!(
            decide(&c, Some(2), None),
            Decision::Allowed {
                route: 2,
                picks: vec![]
            }
        );
        // No route (or an index past the routes): `unmatched` decides.
        assert_eq!(decide(&c, None, Some(&alice)), Decision::UnmatchedDenied);
        assert_eq!(decide(&c, Some(9), None), Decision::UnmatchedDenied);
        assert_eq!(
            decide(&config("allow"), None, None),
            Decision::UnmatchedAllowed
        );
    }

    #[test]
    fn claims_or_users() {
        let a = Access {
            users: vec!["alice".into()],
            claims: vec![(3, vec!["9".into()])],
            ..access()
        };
        assert!(admits(&a, Some(&id("alice", &[]))));
        assert!(!admits(&a, Some(&id("bob", &[]))));
    }
}
