//! The `connections` section: one credential each, from a provider, with who may
//! use it (`access`). What a connection holds depends on its provider's type: a
//! secret for `api_key`, a grant and its parameters for `oauth2`, a `resource`
//! for `azure_managed_identity`, a `cluster` for `client_certificate`.
//!
//! `access` is required once a route injects the connection (checked with the
//! routes); a connection only a secret store uses needs none.

use super::access;
use super::claims::ClaimPaths;
use super::error::ConfigError;
use super::fields::{cluster, only_fields, owned};
use super::json::{as_object, as_str, index, join, Obj};
use super::lexical;
use super::names::Names;
use super::secrets::Secrets;
use super::{
    Connection, Credential, Grant, OAuth2Connection, OAuth2Provider, Provider, ProviderKind,
    TokenStore,
};

const CONNECTION: &[&str] = &[
    "provider",
    "api_key",
    "grant",
    "refresh_token",
    "subject_token_type",
    "scopes",
    "audience",
    "resource",
    "extra_params",
    "access",
    "cluster",
    "per_user",
    "store",
    "consent",
];

/// Token request parameters latchkey sets itself; `extra_params` may not override them.
const RESERVED_TOKEN_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "scope",
    "audience",
    "resource",
    "subject_token",
    "subject_token_type",
];

/// What latchkey sets itself in an authorization_code connection's login URL and
/// code redemption (RFC 6749 §4.1, RFC 7636): not overridable by `extra_params`.
const RESERVED_CONSENT_PARAMS: &[&str] = &[
    "response_type",
    "redirect_uri",
    "state",
    "code",
    "code_challenge",
    "code_challenge_method",
    "code_verifier",
];

/// RFC 8693 §3: the default `subject_token_type` of a token exchange.
const TOKEN_EXCHANGE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// `Config::connections`, in key order (the indices [`Names`] gave them).
pub fn read(
    top: &Obj,
    names: &Names,
    secrets: &Secrets,
    providers: &[Provider],
    token_stores: &[TokenStore],
    claims: &mut ClaimPaths,
) -> Result<Vec<Connection>, ConfigError> {
    let mut out = Vec::new();
    let Some(v) = top.get("connections") else {
        return Ok(out);
    };
    for (name, value) in as_object("connections", v)? {
        let c = Obj::new(join("connections", name), value, CONNECTION)?;
        let provider = names.provider(c.req_str("provider")?, || c.child("provider"))?;
        let credential = match providers.get(provider).map(|p| &p.kind) {
            Some(ProviderKind::OAuth2(p)) => Credential::OAuth2(oauth2(
                &c,
                names,
                secrets,
                Delegated {
                    provider: p,
                    token_stores,
                    claims,
                },
            )?),
            Some(ProviderKind::ClientCertificate) => {
                only_fields(
                    &c,
                    CONNECTION,
                    &["provider", "cluster", "access"],
                    "not allowed for a connection of a client_certificate provider",
                )?;
                Credential::ClientCertificate {
                    cluster: cluster(&c)?.into(),
                }
            }
            Some(ProviderKind::ManagedIdentity(_)) => {
                only_fields(
                    &c,
                    CONNECTION,
                    &["provider", "resource", "access"],
                    "not allowed for a connection of an azure_managed_identity provider",
                )?;
                let resource = c.req_str("resource")?;
                lexical::managed_identity_resource(resource)
                    .map_err(|e| e.at(c.child("resource")))?;
                Credential::ManagedIdentity {
                    resource: resource.to_string(),
                }
            }
            Some(ProviderKind::ApiKey) | None => {
                only_fields(
                    &c,
                    CONNECTION,
                    &["provider", "api_key", "access"],
                    "not allowed for a connection of an api_key provider",
                )?;
                let secret = c.req_str("api_key")?;
                Credential::ApiKey(secrets.reference(names, secret, || c.child("api_key"))?)
            }
        };
        let access = match c.get("access") {
            Some(v) => Some(access::read(&c.child("access"), v, claims)?),
            None => None,
        };
        let exchange = matches!(&credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }));
        let per_user = matches!(&credential, Credential::OAuth2(o) if matches!(o.grant, Grant::AuthorizationCode { per_user: true, .. }));
        if per_user && access.as_ref().is_some_and(|a| a.public) {
            return Err(ConfigError::not_allowed(
                join(&c.child("access"), "public"),
                "a per_user connection can't be public: it injects the caller's own token, \
                 and a public connection admits callers nobody identified",
            ));
        }
        if exchange && access.as_ref().is_some_and(|a| a.public) {
            return Err(ConfigError::not_allowed(
                join(&c.child("access"), "public"),
                "a token_exchange connection can't be public: it exchanges the caller's \
                 verified JWT, and a public connection admits callers without one",
            ));
        }
        out.push(Connection {
            name: name.to_string(),
            provider,
            credential,
            access,
        });
    }
    Ok(out)
}

/// What an authorization_code connection is checked against.
struct Delegated<'a> {
    provider: &'a OAuth2Provider,
    token_stores: &'a [TokenStore],
    claims: &'a mut ClaimPaths,
}

/// A connection of an `oauth2` provider: its grant, scopes and token request parameters.
fn oauth2(
    c: &Obj,
    names: &Names,
    secrets: &Secrets,
    delegated: Delegated,
) -> Result<OAuth2Connection, ConfigError> {
    for field in ["api_key", "cluster"] {
        if c.has(field) {
            return Err(ConfigError::not_allowed(
                c.child(field),
                "not allowed for a connection of an oauth2 provider",
            ));
        }
    }
    let grant_name = c.req_str("grant")?;
    let grant = match grant_name {
        "client_credentials" => Grant::ClientCredentials,
        "refresh_token" => {
            let name = c.opt_str("refresh_token")?.ok_or_else(|| {
                ConfigError::not_allowed(
                    c.child("refresh_token"),
                    "required when grant is \"refresh_token\"",
                )
            })?;
            Grant::RefreshToken(secrets.reference(names, name, || c.child("refresh_token"))?)
        }
        "token_exchange" => Grant::TokenExchange {
            subject_token_type: c
                .opt_str("subject_token_type")?
                .unwrap_or(TOKEN_EXCHANGE_ACCESS_TOKEN)
                .to_string(),
        },
        "authorization_code" => authorization_code(c, delegated)?,
        other => {
            return Err(ConfigError::invalid(
                c.child("grant"),
                other,
                "expected one of \"client_credentials\", \"refresh_token\", \"token_exchange\", \"authorization_code\"",
            ))
        }
    };
    if grant_name != "authorization_code" {
        for field in ["per_user", "store", "consent"] {
            if c.has(field) {
                return Err(ConfigError::not_allowed(
                    c.child(field),
                    "only allowed when grant is \"authorization_code\"",
                ));
            }
        }
    }
    if grant_name != "refresh_token" && c.has("refresh_token") {
        return Err(ConfigError::not_allowed(
            c.child("refresh_token"),
            "only allowed when grant is \"refresh_token\"",
        ));
    }
    if grant_name != "token_exchange" && c.has("subject_token_type") {
        return Err(ConfigError::not_allowed(
            c.child("subject_token_type"),
            "only allowed when grant is \"token_exchange\"",
        ));
    }
    let scopes = owned(c.opt_str_list("scopes")?.unwrap_or_default());
    for (i, s) in scopes.iter().enumerate() {
        lexical::scope_token(s).map_err(|e| e.at(index(&c.child("scopes"), i)))?;
    }
    let mut extra_params = Vec::new();
    if let Some(v) = c.get("extra_params") {
        let path = c.child("extra_params");
        for (k, val) in as_object(&path, v)? {
            let p = join(&path, k);
            let delegated = c.opt_str("grant")? == Some("authorization_code");
            if RESERVED_TOKEN_PARAMS.contains(&k)
                || (delegated && RESERVED_CONSENT_PARAMS.contains(&k))
            {
                return Err(ConfigError::not_allowed(
                    p,
                    "latchkey sets this token request parameter itself",
                ));
            }
            extra_params.push((k.to_string(), as_str(&p, val)?.to_string()));
        }
    }
    Ok(OAuth2Connection {
        grant,
        scopes,
        audience: c.opt_str("audience")?.map(str::to_string),
        resource: c.opt_str("resource")?.map(str::to_string),
        extra_params,
    })
}

/// `grant: "authorization_code"` (SPEC v1.2): its provider must say where people
/// consent, its refresh tokens need a token store, and a shared consent says
/// who may give it.
fn authorization_code(c: &Obj, d: Delegated) -> Result<Grant, ConfigError> {
    if d.provider.authorization_url.is_none() {
        return Err(ConfigError::not_allowed(
            c.child("grant"),
            "\"authorization_code\" needs authorization_url on its provider",
        ));
    }
    let store_name = c.req_str("store")?;
    let store = d
        .token_stores
        .iter()
        .position(|t| t.name == store_name)
        .ok_or_else(|| {
            ConfigError::invalid(c.child("store"), store_name, "not a name in token_stores")
        })?;
    let per_user = c.opt_bool("per_user")?.unwrap_or(false);
    let consent = match (per_user, c.get("consent")) {
        (true, Some(_)) => {
            return Err(ConfigError::not_allowed(
                c.child("consent"),
                "a per_user connection is consented to by each caller: its access says who",
            ))
        }
        (true, None) => None,
        (false, Some(v)) => Some(access::read(&c.child("consent"), v, d.claims)?),
        (false, None) => {
            return Err(ConfigError::not_allowed(
                c.child("consent"),
                "required for a shared authorization_code connection (who may give the consent); or set per_user: true",
            ))
        }
    };
    Ok(Grant::AuthorizationCode {
        per_user,
        store,
        consent,
    })
}
