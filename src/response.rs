//! The responses latchkey writes itself: status, headers and JSON body.
//!
//! Bodies name the error kind and the route (and connection, for 503) and
//! nothing else: no secret, no policy detail, no claim.

use crate::policy::Denial;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal<'a> {
    Denied(Denial),
    /// No valid credential could be had in time; `retry_after_s` for the client.
    Unavailable {
        connection: &'a str,
        retry_after_s: u64,
    },
    /// A host call failed: latchkey fails closed.
    Internal,
    /// No configuration is loaded: nothing can be decided, so nothing is forwarded.
    NotConfigured,
    /// 403: an authorization_code connection nobody (or not this caller)
    /// consented to: where to sign in.
    ConsentRequired {
        connection: &'a str,
        login_url: &'a str,
    },
    /// 400: the path reads differently to different servers, or is malformed
    /// (`reason` is one of `PathRefusal::reason`'s names).
    BadPath {
        reason: &'a str,
    },
}

/// Builds the reply. `route` is `None` for requests no route matched.
pub fn reply(refusal: Refusal, route: Option<&str>) -> LocalReply {
    let (status, error) = match refusal {
        Refusal::Denied(Denial::Unauthenticated) => (401, "unauthenticated"),
        Refusal::Denied(Denial::Forbidden) => (403, "forbidden"),
        Refusal::Unavailable { .. } => (503, "credential_unavailable"),
        Refusal::Internal => (500, "internal_error"),
        Refusal::NotConfigured => (503, "not_configured"),
        Refusal::BadPath { .. } => (400, "bad_request"),
        Refusal::ConsentRequired { .. } => (403, "consent_required"),
    };
    // Written by hand to keep the documented key order; values JSON-escaped.
    let mut body = format!("{{\"error\":{}", quote(error));
    if let Some(route) = route {
        body.push_str(",\"route\":");
        body.push_str(&quote(route));
    }
    let mut headers = vec![("content-type", "application/json".to_string())];
    match refusal {
        Refusal::Denied(Denial::Unauthenticated) => {
            headers.push(("www-authenticate", "Bearer".to_string()));
        }
        Refusal::Unavailable {
            connection,
            retry_after_s,
        } => {
            body.push_str(",\"connection\":");
            body.push_str(&quote(connection));
            headers.push(("retry-after", retry_after_s.max(1).to_string()));
        }
        Refusal::BadPath { reason } => {
            body.push_str(",\"reason\":");
            body.push_str(&quote(reason));
        }
        Refusal::ConsentRequired {
            connection,
            login_url,
        } => {
            body.push_str(",\"connection\":");
            body.push_str(&quote(connection));
            body.push_str(",\"login_url\":");
            body.push_str(&quote(login_url));
        }
        Refusal::NotConfigured => headers.push(("retry-after", "5".to_string())),
        _ => {}
    }
    body.push('}');
    LocalReply {
        status,
        headers,
        body,
    }
}

/// One of latchkey's own JSON answers outside the refusals (consent endpoints).
pub fn json(status: u32, body: serde_json::Value) -> LocalReply {
    LocalReply {
        status,
        headers: vec![
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
        ],
        body: body.to_string(),
    }
}

/// A 302 to `location` (a login, or back to `return_to`), never cached.
pub fn redirect(location: String) -> LocalReply {
    LocalReply {
        status: 302,
        headers: vec![
            ("location", location),
            ("cache-control", "no-store".to_string()),
        ],
        body: String::new(),
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_configuration_is_503_with_retry_after() {
        let r = reply(Refusal::NotConfigured, None);
        assert_eq!(r.status, 503);
        assert_eq!(r.body, r#"{"error":"not_configured"}"#);
        assert_eq!(
            r.headers,
            vec![
                ("content-type", "application/json".to_string()),
                ("retry-after", "5".to_string())
            ]
        );
    }

    #[test]
    fn bad_path_names_the_reason() {
        let r = reply(
            Refusal::BadPath {
                reason: "path_ambiguous",
            },
            None,
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body,
            r#"{"error":"bad_request","reason":"path_ambiguous"}"#
        );
        assert_eq!(r.headers, vec![("content-type", "application/json".into())]);
    }

    #[test]
    fn bodies_are_exactly_as_specified() {
        let r = reply(Refusal::Denied(Denial::Unauthenticated), Some("orders"));
        assert_eq!(r.status, 401);
        assert_eq!(r.body, r#"{"error":"unauthenticated","route":"orders"}"#);
        assert_eq!(
            r.headers,
            vec![
                ("content-type", "application/json".into()),
                ("www-authenticate", "Bearer".into())
            ]
        );
        let r = reply(Refusal::Denied(Denial::Forbidden), Some("orders"));
        assert_eq!(
            (r.status, r.body.as_str()),
            (403, r#"{"error":"forbidden","route":"orders"}"#)
        );
        assert_eq!(r.headers, vec![("content-type", "application/json".into())]);
        let r = reply(
            Refusal::Unavailable {
                connection: "orders_read",
                retry_after_s: 0,
            },
            Some("orders"),
        );
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            r#"{"error":"credential_unavailable","route":"orders","connection":"orders_read"}"#
        );
        assert!(r.headers.contains(&("retry-after", "1".into())));
    }

    #[test]
    fn unmatched_and_quoting() {
        let r = reply(Refusal::Denied(Denial::Forbidden), None);
        assert_eq!(r.body, r#"{"error":"forbidden"}"#);
        let r = reply(Refusal::Denied(Denial::Forbidden), Some("a\"b"));
        assert_eq!(r.body, r#"{"error":"forbidden","route":"a\"b"}"#);
    }
}
