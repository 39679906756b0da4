//! Validation of the parsed JSON into the runtime [`Config`].

use std::collections::HashMap;

use super::error::{ConfigError, ErrorKind};
use super::json::{as_object, index, join, str_list, Obj, Value};
use super::*;
use crate::router::Router;
use crate::secret::{Secret, SecretSource};

/// A secret store entry: the secret's own fields besides the store key.
const SECRET_STORE: &[&str] = &[
    "azure_key_vault",
    "vault",
    "cluster",
    "identity",
    "refresh_s",
    "timeout_ms",
];
const VAULT: &[&str] = &[
    "cluster",
    "url",
    "mount",
    "path",
    "field",
    "token",
    "approle",
    "namespace",
    "version",
];
const APPROLE: &[&str] = &["role_id", "secret_id", "mount"];
const MI_PROVIDER: &[&str] = &[
    "type",
    "cluster",
    "endpoint",
    "client_id",
    "timeout_ms",
    "default_expires_in_s",
    "refresh_margin_s",
    "drop_on_401_after_s",
];
const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
const DEFAULT_REFRESH_S: u64 = 300;
const LOW_REFRESH_S: u64 = 30;

const TOP: &[&str] = &[
    "claims",
    "secrets",
    "providers",
    "connections",
    "routes",
    "unmatched",
    "filter_state",
    "discovery",
    "max_paused_requests",
];
const CLAIMS: &[&str] = &["from", "key", "subject", "groups"];
const SECRET: &[&str] = &[
    "env",
    "inline",
    "azure_key_vault",
    "vault",
    "cluster",
    "identity",
    "refresh_s",
    "timeout_ms",
];
const PROVIDER: &[&str] = &[
    "type",
    "cluster",
    "token_url",
    "client_id",
    "client_secret",
    "auth_method",
    "timeout_ms",
    "default_expires_in_s",
    "refresh_margin_s",
    "drop_on_401_after_s",
    "endpoint",
];
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
];
const ACCESS: &[&str] = &["public", "authenticated", "users", "groups", "claims"];
const ROUTE: &[&str] = &[
    "name",
    "match",
    "access",
    "inject",
    "strip",
    "drop_token_on_401",
];
const MATCH: &[&str] = &["route_name", "host", "path_prefix", "path_exact", "methods"];
const INJECT: &[&str] = &["connections", "header", "query", "cluster_header", "prefix"];

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

/// Headers whose value latchkey must not set: framing and routing belong to Envoy.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "keep-alive",
    "proxy-connection",
];

pub const TOKEN_EXCHANGE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const DEFAULT_TIMEOUT_MS: u64 = 5000;
const MAX_TIMEOUT_MS: u64 = 300_000;
const DEFAULT_EXPIRES_IN_S: u64 = 300;
const DEFAULT_REFRESH_MARGIN_S: u64 = 5;
/// Requests one worker may hold paused for a credential; past it, 503 at once.
const DEFAULT_MAX_PAUSED_REQUESTS: u64 = 1024;
const MAX_PAUSED_REQUESTS: u64 = 100_000;
/// The `cluster_header` name the README and the Envoy examples use.
pub const DOCUMENTED_CLUSTER_HEADER: &str = "x-latchkey-cluster";
const DEFAULT_DROP_ON_401_AFTER_S: u64 = 10;

pub fn build(text: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let doc = Value::parse(text).map_err(|e| {
        // serde_json's message for syntax errors holds a position, not content.
        ConfigError::new("", ErrorKind::NotJson(e.to_string()))
    })?;
    let top = Obj::new("", &doc, TOP)?;
    let mut b = Builder {
        env,
        warnings: Vec::new(),
        claim_paths: Vec::new(),
        identities: Vec::new(),
        static_values: HashMap::new(),
    };

    let claims = b.claims(&top)?;
    let (secrets, mut stores) = b.secrets(&top)?;
    let providers = b.providers(&top, &secrets)?;
    let connections = b.connections(&top, &secrets, &providers)?;
    b.identities(&mut stores, &connections, &providers)?;
    let routes = b.routes(&top, &connections)?;
    b.warn_injected_identities(&stores, &connections, &routes);
    let unmatched = match top.opt_str("unmatched")? {
        None | Some("allow") => Unmatched::Allow,
        Some("deny") => Unmatched::Deny,
        Some(other) => {
            return Err(ConfigError::invalid(
                "unmatched",
                other,
                "expected \"allow\" or \"deny\"",
            ))
        }
    };
    let cluster_headers = {
        let mut names: Vec<String> = routes
            .iter()
            .flat_map(|r| &r.inject)
            .filter_map(|i| match &i.target {
                Target::ClusterHeader { name } => Some(name.clone()),
                _ => None,
            })
            .collect();
        // The documented name too, whether or not this configuration uses it: an
        // Envoy route may route on it (the shipped examples do).
        names.push(DOCUMENTED_CLUSTER_HEADER.to_string());
        names.sort();
        names.dedup();
        names
    };
    let router = Router::new(&routes);
    let max_paused_requests = top
        .opt_u64("max_paused_requests")?
        .unwrap_or(DEFAULT_MAX_PAUSED_REQUESTS);
    if !(1..=MAX_PAUSED_REQUESTS).contains(&max_paused_requests) {
        return Err(ConfigError::invalid(
            top.child("max_paused_requests"),
            &max_paused_requests.to_string(),
            format!("must be 1 to {MAX_PAUSED_REQUESTS}"),
        ));
    }
    let filter_state = top.opt_bool("filter_state")?;
    let mut notes = Vec::new();
    if filter_state.is_none() {
        notes.push(
            "filter_state is not set: access logs get no wasm.latchkey.route, .connection or \
             .decision (set \"filter_state\": true to write them; before v1.1 they were \
             always written)"
                .to_string(),
        );
    }
    Ok(Config {
        claims,
        stores,
        providers: providers.items,
        connections: connections.items,
        routes,
        router,
        unmatched,
        claim_paths: b.claim_paths,
        warnings: b.warnings,
        notes,
        filter_state: filter_state.unwrap_or(false),
        max_paused_requests: max_paused_requests as usize,
        cluster_headers,
        discovery: match top.opt_obj("discovery", &["path"])? {
            None => None,
            Some(d) => {
                let p = d.req_str("path")?;
                Some(path_value(p).map_err(|e| e.at(d.child("path")))?)
            }
        },
    })
}

/// Named items in configuration order, with a name → index map.
struct Named<T> {
    items: Vec<T>,
    index: HashMap<String, usize>,
}

impl<T> Named<T> {
    fn new() -> Self {
        Named {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn push(&mut self, name: &str, item: T) {
        self.index.insert(name.to_string(), self.items.len());
        self.items.push(item);
    }

    fn lookup(&self, path: String, what: &'static str, name: &str) -> Result<usize, ConfigError> {
        self.index.get(name).copied().ok_or_else(|| {
            ConfigError::new(
                path,
                ErrorKind::UnknownReference {
                    what,
                    name: name.to_string(),
                },
            )
        })
    }

    fn get(&self, path: String, what: &'static str, name: &str) -> Result<&T, ConfigError> {
        self.index
            .get(name)
            .and_then(|i| self.items.get(*i))
            .ok_or_else(|| {
                ConfigError::new(
                    path,
                    ErrorKind::UnknownReference {
                        what,
                        name: name.to_string(),
                    },
                )
            })
    }
}

struct Builder<'e> {
    env: &'e dyn Fn(&str) -> Option<String>,
    warnings: Vec<String>,
    claim_paths: Vec<ClaimPath>,
    /// Key Vault stores' `identity` connections, resolved once connections exist:
    /// (store index, path of the field, connection name).
    identities: Vec<(usize, String, String)>,
    /// Secrets known at load, by name (for a store's own credentials).
    static_values: HashMap<String, Secret>,
}

impl Builder<'_> {
    fn claim_index(&mut self, dotted: &str) -> usize {
        if let Some(i) = self.claim_paths.iter().position(|c| c.dotted == dotted) {
            return i;
        }
        self.claim_paths.push(ClaimPath::new(dotted));
        self.claim_paths.len() - 1
    }

    fn claims(&mut self, top: &Obj) -> Result<ClaimsConfig, ConfigError> {
        let c = top.opt_obj("claims", CLAIMS)?;
        let get = |k: &str| -> Result<Option<&str>, ConfigError> {
            match &c {
                Some(c) => c.opt_str(k),
                None => Ok(None),
            }
        };
        let key = get("key")?.unwrap_or("payload");
        if key.is_empty() {
            return Err(ConfigError::not_allowed(
                "claims.key",
                "must not be an empty string",
            ));
        }
        let source = match get("from")?.unwrap_or("jwt_metadata") {
            "jwt_metadata" => ClaimsSource::JwtMetadata {
                key: key.to_string(),
            },
            "header" => ClaimsSource::Header {
                name: header_name("claims.key", key)?,
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
        claim_path_valid("claims.subject", subject)?;
        claim_path_valid("claims.groups", groups)?;
        // Fixed positions: SUBJECT_CLAIM and GROUPS_CLAIM.
        self.claim_paths.push(ClaimPath::new(subject));
        self.claim_paths.push(ClaimPath::new(groups));
        Ok(ClaimsConfig { source })
    }

    fn secrets(&mut self, top: &Obj) -> Result<(Named<SecretRef>, Vec<Store>), ConfigError> {
        let mut out = Named::new();
        let mut stores = Vec::new();
        let Some(v) = top.get("secrets") else {
            return Ok((out, stores));
        };
        for (name, value) in as_object("secrets", v)? {
            let s = Obj::new(join("secrets", name), value, SECRET)?;
            let given: Vec<&str> = ["env", "inline", "azure_key_vault", "vault"]
                .into_iter()
                .filter(|k| s.has(k))
                .collect();
            if given.len() != 1 {
                let reason = if given.is_empty() {
                    "give exactly one of \"env\", \"inline\", \"azure_key_vault\" or \"vault\""
                } else {
                    "give exactly one of \"env\", \"inline\", \"azure_key_vault\" or \"vault\", not several"
                };
                return Err(ConfigError::not_allowed(s.path, reason));
            }
            if s.has("env") || s.has("inline") {
                for field in SECRET_STORE.iter().skip(2) {
                    if s.has(field) {
                        return Err(ConfigError::not_allowed(
                            s.child(field),
                            "only allowed beside \"azure_key_vault\" or \"vault\"",
                        ));
                    }
                }
                let secret = self.static_secret(name, &s)?;
                self.static_values.insert(name.to_string(), secret.clone());
                out.push(name, SecretRef::Value(secret));
            }
        }
        // Stores second: their own credentials (a Vault token, an AppRole
        // secret_id) name static secrets, in any order.
        for (name, value) in as_object("secrets", v)? {
            let s = Obj::new(join("secrets", name), value, SECRET)?;
            if s.has("env") || s.has("inline") {
                continue;
            }
            let store = self.store(name, &s, stores.len())?;
            out.push(name, SecretRef::Store(stores.len()));
            stores.push(store);
        }
        Ok((out, stores))
    }

    fn static_secret(&mut self, name: &str, s: &Obj) -> Result<Secret, ConfigError> {
        let source = if s.has("env") {
            SecretSource::Env(s.req_str("env")?.to_string())
        } else {
            self.warnings.push(format!(
                "secret \"{name}\" is inline in the configuration; use \"env\" outside development"
            ));
            SecretSource::Inline(Secret::new(s.req_str("inline")?))
        };
        source.resolve(self.env).map_err(|e| {
            let field = if matches!(source, SecretSource::Env(_)) {
                "env"
            } else {
                "inline"
            };
            ConfigError::new(s.child(field), ErrorKind::Secret(e))
        })
    }

    /// A Key Vault or Vault reference (`index`: its place in `Config::stores`).
    fn store(&mut self, name: &str, s: &Obj, index: usize) -> Result<Store, ConfigError> {
        let timeout_ms = timeout(s)?;
        let (kind, cluster, authority, path, pinned) = if s.has("azure_key_vault") {
            if s.has("vault") {
                return Err(ConfigError::not_allowed(s.child("vault"), "give one store"));
            }
            let id = s.req_str("azure_key_vault")?;
            let kv = key_vault_id(id)
                .map_err(|r| ConfigError::invalid(s.child("azure_key_vault"), id, r))?;
            let identity = s.req_str("identity")?;
            self.identities
                .push((index, s.child("identity"), identity.to_string()));
            let path = match &kv.version {
                Some(v) => format!("/secrets/{}/{v}?api-version=7.4", kv.name),
                None => format!("/secrets/{}?api-version=7.4", kv.name),
            };
            (
                StoreKind::KeyVault {
                    identity: usize::MAX,
                },
                s.req_str("cluster")?.to_string(),
                kv.host,
                path,
                kv.version.is_some(),
            )
        } else {
            for field in ["cluster", "identity"] {
                if s.has(field) {
                    return Err(ConfigError::not_allowed(
                        s.child(field),
                        "for \"vault\", give it inside the \"vault\" object",
                    ));
                }
            }
            let v = Obj::new(s.child("vault"), s.required("vault")?, VAULT)?;
            let url = v.req_str("url")?;
            let base = super::token_url::parse(url)
                .map_err(|e| ConfigError::invalid(v.child("url"), url, e.to_string()))?;
            if base.path.contains('?') {
                return Err(ConfigError::invalid(
                    v.child("url"),
                    url,
                    "must not have a query",
                ));
            }
            let prefix = base.path.trim_end_matches('/');
            let mount = vault_segment(&v, "mount", Some("secret"))?;
            let secret_path = v.req_str("path")?;
            if secret_path
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
                || !secret_path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            {
                return Err(ConfigError::invalid(
                    v.child("path"),
                    secret_path,
                    "not a Vault path (letters, digits, \"-_.\" segments separated by \"/\")",
                ));
            }
            let version = v.opt_u64("version")?;
            let mut path = format!("{prefix}/v1/{mount}/data/{secret_path}");
            if let Some(n) = version {
                path.push_str(&format!("?version={n}"));
            }
            let auth = match (v.get("token"), v.get("approle")) {
                (Some(_), None) => {
                    let t = v.req_str("token")?;
                    VaultAuth::Token(self.static_reference(&v.child("token"), t)?)
                }
                (None, Some(a)) => {
                    let a = Obj::new(v.child("approle"), a, APPROLE)?;
                    let role_id = a.req_str("role_id")?.to_string();
                    let sid = a.req_str("secret_id")?;
                    let secret_id = self.static_reference(&a.child("secret_id"), sid)?;
                    let login_mount = vault_segment(&a, "mount", Some("approle"))?;
                    VaultAuth::AppRole {
                        role_id,
                        secret_id,
                        login_path: format!("{prefix}/v1/auth/{login_mount}/login"),
                    }
                }
                _ => {
                    return Err(ConfigError::not_allowed(
                        v.path.clone(),
                        "give exactly one of \"token\" or \"approle\"",
                    ))
                }
            };
            let namespace = v.opt_str("namespace")?.map(str::to_string);
            if let Some(ns) = &namespace {
                header_value_ok(&v.child("namespace"), ns)?;
            }
            (
                StoreKind::Vault {
                    auth,
                    namespace,
                    field: v.req_str("field")?.to_string(),
                },
                v.req_str("cluster")?.to_string(),
                base.authority,
                path,
                version.is_some(),
            )
        };
        let refresh_ms = if pinned {
            if s.has("refresh_s") {
                return Err(ConfigError::not_allowed(
                    s.child("refresh_s"),
                    "a pinned version is read once and never changes",
                ));
            }
            self.warnings.push(format!(
                "secret \"{name}\" pins one version of the stored secret: it is read once and will not follow rotation"
            ));
            None
        } else {
            let r = s.opt_u64("refresh_s")?.unwrap_or(DEFAULT_REFRESH_S);
            if r == 0 || r > 86_400 {
                return Err(ConfigError::invalid(
                    s.child("refresh_s"),
                    &r.to_string(),
                    "must be between 1 and 86400",
                ));
            }
            if r < LOW_REFRESH_S {
                self.warnings.push(format!(
                    "secret \"{name}\" is re-read every {r} s: below {LOW_REFRESH_S} s the store sees a read per proxy that often"
                ));
            }
            Some(r * 1000)
        };
        Ok(Store {
            name: name.to_string(),
            kind,
            cluster,
            authority,
            path,
            refresh_ms,
            timeout_ms,
        })
    }

    /// A secret named by a store's own credentials (Vault token, AppRole
    /// secret_id): it must be known at load, not read from a store itself.
    fn static_reference(&self, path: &str, name: &str) -> Result<Secret, ConfigError> {
        if let Some(secret) = self.static_values.get(name) {
            return Ok(secret.clone());
        }
        Err(ConfigError::new(
            path,
            ErrorKind::UnknownReference {
                what: "env or inline secret",
                name: name.to_string(),
            },
        ))
    }

    /// Resolves Key Vault stores' `identity` to token-giving connections.
    fn identities(
        &mut self,
        stores: &mut [Store],
        connections: &Named<Connection>,
        providers: &Named<Provider>,
    ) -> Result<(), ConfigError> {
        for (si, path, name) in std::mem::take(&mut self.identities) {
            let ci = connections.lookup(path.clone(), "connection", &name)?;
            let conn = connections.items.get(ci);
            let ok = conn.is_some_and(|c| match &c.credential {
                Credential::ManagedIdentity { .. } => true,
                Credential::OAuth2(o) => {
                    !matches!(o.grant, Grant::TokenExchange { .. })
                        && providers.items.get(c.provider).is_some_and(|p| {
                            matches!(&p.kind, ProviderKind::OAuth2(op) if matches!(op.client_secret, SecretRef::Value(_)))
                        })
                }
                Credential::ApiKey(_) | Credential::ClientCertificate { .. } => false,
            });
            if !ok {
                return Err(ConfigError::invalid(
                    path,
                    &name,
                    "must be an azure_managed_identity connection, or an oauth2 one that needs no caller and whose client_secret is not in a store",
                ));
            }
            if let Some(Store {
                kind: StoreKind::KeyVault { identity },
                ..
            }) = stores.get_mut(si)
            {
                *identity = ci;
            }
        }
        Ok(())
    }

    /// A Key Vault identity's token is for the vault: a route that injects the
    /// same connection sends it upstream. Allowed (one connection may serve both
    /// on purpose), but worth a warning; one per connection.
    fn warn_injected_identities(
        &mut self,
        stores: &[Store],
        connections: &Named<Connection>,
        routes: &[Route],
    ) {
        for (ci, conn) in connections.items.iter().enumerate() {
            let Some(store) = stores
                .iter()
                .find(|s| matches!(s.kind, StoreKind::KeyVault { identity } if identity == ci))
            else {
                continue;
            };
            let Some(route) = routes
                .iter()
                .find(|r| r.inject.iter().any(|inj| inj.connections.contains(&ci)))
            else {
                continue;
            };
            self.warnings.push(format!(
                "connection \"{}\" is the Key Vault identity of secret \"{}\" and route \"{}\" \
                 injects it: a token that can read the vault leaves the gateway; give the route \
                 a connection of its own",
                conn.name, store.name, route.name
            ));
        }
    }

    fn providers(
        &mut self,
        top: &Obj,
        secrets: &Named<SecretRef>,
    ) -> Result<Named<Provider>, ConfigError> {
        let mut out = Named::new();
        let Some(v) = top.get("providers") else {
            return Ok(out);
        };
        for (name, value) in as_object("providers", v)? {
            let p = Obj::new(join("providers", name), value, PROVIDER)?;
            let kind = match p.req_str("type")? {
                "api_key" => {
                    only_fields(&p, PROVIDER, &["type"], "not allowed for an api_key provider")?;
                    ProviderKind::ApiKey
                }
                "oauth2" => {
                    if p.has("endpoint") {
                        return Err(ConfigError::not_allowed(
                            p.child("endpoint"),
                            "not allowed for an oauth2 provider (use token_url)",
                        ));
                    }
                    ProviderKind::OAuth2(oauth2_provider(&p, secrets)?)
                }
                "azure_managed_identity" => {
                    ProviderKind::ManagedIdentity(managed_identity_provider(&p)?)
                }
                "client_certificate" => {
                    only_fields(&p, PROVIDER, &["type"], "not allowed for a client_certificate provider (connections name the cluster)")?;
                    ProviderKind::ClientCertificate
                }
                other => {
                    return Err(ConfigError::invalid(
                        p.child("type"),
                        other,
                        "expected \"api_key\", \"oauth2\", \"azure_managed_identity\" or \"client_certificate\"",
                    ))
                }
            };
            out.push(
                name,
                Provider {
                    name: name.to_string(),
                    kind,
                },
            );
        }
        Ok(out)
    }

    fn connections(
        &mut self,
        top: &Obj,
        secrets: &Named<SecretRef>,
        providers: &Named<Provider>,
    ) -> Result<Named<Connection>, ConfigError> {
        let mut out = Named::new();
        let Some(v) = top.get("connections") else {
            return Ok(out);
        };
        for (name, value) in as_object("connections", v)? {
            let c = Obj::new(join("connections", name), value, CONNECTION)?;
            let provider_name = c.req_str("provider")?;
            let provider = providers.lookup(c.child("provider"), "provider", provider_name)?;
            let kind = providers.items.get(provider).map(|p| &p.kind);
            let credential = match kind {
                Some(ProviderKind::OAuth2(_)) => {
                    Credential::OAuth2(oauth2_connection(&c, secrets)?)
                }
                Some(ProviderKind::ClientCertificate) => {
                    only_fields(
                        &c,
                        CONNECTION,
                        &["provider", "cluster", "access"],
                        "not allowed for a connection of a client_certificate provider",
                    )?;
                    let cluster = c.req_str("cluster")?;
                    header_value_ok(&c.child("cluster"), cluster)?;
                    Credential::ClientCertificate {
                        cluster: cluster.to_string(),
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
                    managed_identity_resource(resource)
                        .map_err(|r| ConfigError::invalid(c.child("resource"), resource, r))?;
                    Credential::ManagedIdentity {
                        resource: resource.to_string(),
                    }
                }
                _ => {
                    only_fields(
                        &c,
                        CONNECTION,
                        &["provider", "api_key", "access"],
                        "not allowed for a connection of an api_key provider",
                    )?;
                    let secret = c.req_str("api_key")?;
                    Credential::ApiKey(secrets.get(c.child("api_key"), "secret", secret)?.clone())
                }
            };
            // Required once a route uses the connection (checked with the routes).
            let access = match c.get("access") {
                Some(v) => Some(self.access(&c.child("access"), v)?),
                None => None,
            };
            let exchange = matches!(&credential, Credential::OAuth2(o) if matches!(o.grant, Grant::TokenExchange { .. }));
            if exchange && access.as_ref().is_some_and(|a| a.public) {
                return Err(ConfigError::not_allowed(
                    join(&c.child("access"), "public"),
                    "a token_exchange connection can't be public: it exchanges the caller's \
                     verified JWT, and a public connection admits callers without one",
                ));
            }
            out.push(
                name,
                Connection {
                    name: name.to_string(),
                    provider,
                    credential,
                    access,
                },
            );
        }
        Ok(out)
    }

    fn access(&mut self, path: &str, value: &Value) -> Result<Access, ConfigError> {
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
                claim_path_valid(&p, claim)?;
                let values = match values {
                    Value::Array(items) => owned(str_list(&p, items)?),
                    Value::String(s) if !s.is_empty() => vec![s.to_string()],
                    other => {
                        return Err(ConfigError::new(
                            p,
                            ErrorKind::WrongType {
                                expected: "an array of strings",
                                found: super::json::type_name(other),
                            },
                        ))
                    }
                };
                if values.is_empty() {
                    return Err(ConfigError::new(p, ErrorKind::EmptyList));
                }
                let i = self.claim_index(claim);
                access.claims.push((i, values));
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

    fn routes(
        &mut self,
        top: &Obj,
        connections: &Named<Connection>,
    ) -> Result<Vec<Route>, ConfigError> {
        let mut routes: Vec<Route> = Vec::new();
        // Route name -> index of the route that first used it (paths are only
        // formatted for an error: 10,000 routes must load fast).
        let mut names: HashMap<&str, usize> = HashMap::new();
        let Some(items) = top.opt_array("routes")? else {
            return Ok(routes);
        };
        for (i, value) in items.iter().enumerate() {
            let r = Obj::new(index("routes", i), value, ROUTE)?;
            let name = r.req_str("name")?;
            if let Some(first) = names.get(name) {
                return Err(ConfigError::new(
                    r.child("name"),
                    ErrorKind::Duplicate {
                        what: "route name",
                        name: name.to_string(),
                        first: join(&index("routes", *first), "name"),
                    },
                ));
            }
            names.insert(name, i);
            let matcher = route_match(&r)?;
            let access = match r.get("access") {
                Some(v) => Some(self.access(&r.child("access"), v)?),
                None => None,
            };
            let mut inject = Vec::new();
            if let Some(entries) = r.opt_array("inject")? {
                for (j, entry) in entries.iter().enumerate() {
                    inject.push(injection(
                        &index(&r.child("inject"), j),
                        entry,
                        connections,
                    )?);
                }
            }
            let mut strip = Vec::new();
            for (j, h) in r
                .opt_str_list("strip")?
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                strip.push(header_name(&index(&r.child("strip"), j), h)?);
            }
            let drop_token_on_401 = r.opt_bool("drop_token_on_401")?.unwrap_or(true);
            let public = |a: Option<&Access>| a.is_some_and(|a| a.public);
            let needs_claims = access.as_ref().is_some_and(|a| !a.public)
                || inject.iter().any(|inj| {
                    inj.connections.iter().any(|&ci| {
                        !public(connections.items.get(ci).and_then(|c| c.access.as_ref()))
                    })
                });
            routes.push(Route {
                needs_claims,
                name: name.to_string(),
                matcher,
                access,
                inject,
                strip,
                drop_token_on_401,
            });
        }
        Ok(routes)
    }
}

fn owned(v: Vec<&str>) -> Vec<String> {
    v.into_iter().map(str::to_string).collect()
}

fn oauth2_provider(p: &Obj, secrets: &Named<SecretRef>) -> Result<OAuth2Provider, ConfigError> {
    let cluster = p.req_str("cluster")?.to_string();
    let token_url = p.req_str("token_url")?;
    let url_path = p.child("token_url");
    let super::token_url::TokenUrl { authority, path } = super::token_url::parse(token_url)
        .map_err(|e| match e {
            super::token_url::UrlError::Credentials => {
                ConfigError::not_allowed(&url_path, e.to_string())
            }
            e => ConfigError::invalid(&url_path, token_url, e.to_string()),
        })?;
    let client_id = p.req_str("client_id")?.to_string();
    let secret_name = p.req_str("client_secret")?;
    let client_secret = secrets
        .get(p.child("client_secret"), "secret", secret_name)?
        .clone();
    let auth_method = match p.opt_str("auth_method")? {
        None | Some("client_secret_basic") => AuthMethod::ClientSecretBasic,
        Some("client_secret_post") => AuthMethod::ClientSecretPost,
        Some(other) => {
            return Err(ConfigError::invalid(
                p.child("auth_method"),
                other,
                "expected \"client_secret_basic\" or \"client_secret_post\"",
            ))
        }
    };
    let timeout_ms = timeout(p)?;
    let (default_expires_in_s, refresh_margin_s) = token_lifetimes(p)?;
    Ok(OAuth2Provider {
        refresh_margin_s,
        drop_on_401_after_s: drop_on_401_after(p)?,
        cluster,
        token_url: token_url.to_string(),
        authority,
        path,
        client_id,
        client_secret,
        auth_method,
        timeout_ms,
        default_expires_in_s,
    })
}

/// How old a token must be before an upstream 401 may refresh it (SPEC v1.2):
/// a caller can provoke 401s, so a young token is never refreshed on one.
fn drop_on_401_after(p: &Obj) -> Result<u64, ConfigError> {
    let s = p
        .opt_u64("drop_on_401_after_s")?
        .unwrap_or(DEFAULT_DROP_ON_401_AFTER_S);
    if s > 3600 {
        return Err(ConfigError::invalid(
            p.child("drop_on_401_after_s"),
            &s.to_string(),
            "must be at most 3600",
        ));
    }
    Ok(s)
}

fn token_lifetimes(p: &Obj) -> Result<(u64, u64), ConfigError> {
    let default_expires_in_s = p
        .opt_u64("default_expires_in_s")?
        .unwrap_or(DEFAULT_EXPIRES_IN_S);
    if default_expires_in_s == 0 {
        return Err(ConfigError::invalid(
            p.child("default_expires_in_s"),
            "0",
            "must be at least 1",
        ));
    }
    let refresh_margin_s = p
        .opt_u64("refresh_margin_s")?
        .unwrap_or(DEFAULT_REFRESH_MARGIN_S);
    Ok((default_expires_in_s, refresh_margin_s))
}

fn managed_identity_provider(p: &Obj) -> Result<ManagedIdentityProvider, ConfigError> {
    only_fields(
        p,
        PROVIDER,
        MI_PROVIDER,
        "not allowed for an azure_managed_identity provider",
    )?;
    let endpoint = p.opt_str("endpoint")?.unwrap_or(IMDS_ENDPOINT);
    let url = super::token_url::parse(endpoint)
        .map_err(|e| ConfigError::invalid(p.child("endpoint"), endpoint, e.to_string()))?;
    if url.path.contains('?') {
        return Err(ConfigError::invalid(
            p.child("endpoint"),
            endpoint,
            "must not have a query (latchkey adds api-version, resource and client_id)",
        ));
    }
    let client_id = p.opt_str("client_id")?.map(str::to_string);
    let (default_expires_in_s, refresh_margin_s) = token_lifetimes(p)?;
    Ok(ManagedIdentityProvider {
        cluster: p.req_str("cluster")?.to_string(),
        authority: url.authority,
        path: url.path,
        client_id,
        timeout_ms: timeout(p)?,
        default_expires_in_s,
        refresh_margin_s,
        drop_on_401_after_s: drop_on_401_after(p)?,
    })
}

fn oauth2_connection(c: &Obj, secrets: &Named<SecretRef>) -> Result<OAuth2Connection, ConfigError> {
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
            Grant::RefreshToken(
                secrets
                    .get(c.child("refresh_token"), "secret", name)?
                    .clone(),
            )
        }
        "token_exchange" => Grant::TokenExchange {
            subject_token_type: c
                .opt_str("subject_token_type")?
                .unwrap_or(TOKEN_EXCHANGE_ACCESS_TOKEN)
                .to_string(),
        },
        other => {
            return Err(ConfigError::invalid(
                c.child("grant"),
                other,
                "expected one of \"client_credentials\", \"refresh_token\", \"token_exchange\"",
            ))
        }
    };
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
        // RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
        if !s
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(ConfigError::invalid(
                index(&c.child("scopes"), i),
                s,
                "not a valid scope token (RFC 6749 §3.3: no spaces, quotes or backslashes)",
            ));
        }
    }
    let mut extra_params = Vec::new();
    if let Some(v) = c.get("extra_params") {
        let path = c.child("extra_params");
        for (k, val) in as_object(&path, v)? {
            let p = join(&path, k);
            if RESERVED_TOKEN_PARAMS.contains(&k) {
                return Err(ConfigError::not_allowed(
                    p,
                    "latchkey sets this token request parameter itself",
                ));
            }
            extra_params.push((k.to_string(), super::json::as_str(&p, val)?.to_string()));
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

fn route_match(r: &Obj) -> Result<RouteMatch, ConfigError> {
    let m = Obj::new(r.child("match"), r.required("match")?, MATCH)?;
    let mut out = RouteMatch {
        route_name: m.opt_str("route_name")?.map(str::to_string),
        ..RouteMatch::default()
    };
    if let Some(host) = m.opt_str("host")? {
        out.host = Some(host_value(&m.child("host"), host)?);
    }
    out.path = match (m.opt_str("path_prefix")?, m.opt_str("path_exact")?) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::not_allowed(
                m.child("path_exact"),
                "give \"path_prefix\" or \"path_exact\", not both",
            ))
        }
        (Some(p), None) => Some(PathMatch::Prefix(
            path_value(p).map_err(|e| e.at(m.child("path_prefix")))?,
        )),
        (None, Some(p)) => Some(PathMatch::Exact(
            path_value(p).map_err(|e| e.at(m.child("path_exact")))?,
        )),
        (None, None) => None,
    };
    if let Some(methods) = m.opt_str_list("methods")? {
        if methods.is_empty() {
            return Err(ConfigError::new(m.child("methods"), ErrorKind::EmptyList));
        }
        for (i, method) in methods.iter().enumerate() {
            if !method.bytes().all(is_tchar) {
                return Err(ConfigError::invalid(
                    index(&m.child("methods"), i),
                    method,
                    "not an HTTP method token",
                ));
            }
            out.methods.push(method.to_ascii_uppercase());
        }
        // Servers answer HEAD with the GET handler: a GET rule covers HEAD too.
        if out.methods.iter().any(|m| m == "GET") && !out.methods.iter().any(|m| m == "HEAD") {
            out.methods.push("HEAD".to_string());
        }
    }
    Ok(out)
}

fn injection(
    path: &str,
    value: &Value,
    connections: &Named<Connection>,
) -> Result<Injection, ConfigError> {
    let e = Obj::new(path, value, INJECT)?;
    let list = e
        .opt_str_list("connections")?
        .ok_or_else(|| ConfigError::new(e.child("connections"), ErrorKind::Missing))?;
    if list.is_empty() {
        return Err(ConfigError::new(
            e.child("connections"),
            ErrorKind::EmptyList,
        ));
    }
    let mut indices = Vec::with_capacity(list.len());
    for (i, name) in list.iter().enumerate() {
        let p = || index(&e.child("connections"), i);
        let ci = match connections.index.get(*name) {
            Some(ci) => *ci,
            None => {
                return Err(ConfigError::new(
                    p(),
                    ErrorKind::UnknownReference {
                        what: "connection",
                        name: name.to_string(),
                    },
                ))
            }
        };
        if connections
            .items
            .get(ci)
            .is_some_and(|c| c.access.is_none())
        {
            // A connection without a policy serves only secret stores.
            return Err(ConfigError::new(
                format!("connections.{name}.access"),
                ErrorKind::Missing,
            ));
        }
        if indices.contains(&ci) {
            return Err(ConfigError::new(
                p(),
                ErrorKind::Duplicate {
                    what: "connection",
                    name: name.to_string(),
                    first: e.child("connections"),
                },
            ));
        }
        indices.push(ci);
    }
    let certs = indices.iter().filter(|&&ci| {
        connections
            .items
            .get(ci)
            .is_some_and(|c| matches!(c.credential, Credential::ClientCertificate { .. }))
    });
    let certs = certs.count();
    if let Some(h) = e.opt_str("cluster_header")? {
        for field in ["header", "query", "prefix"] {
            if e.has(field) {
                return Err(ConfigError::not_allowed(
                    e.child(field),
                    "not allowed with \"cluster_header\"",
                ));
            }
        }
        if certs != indices.len() {
            return Err(ConfigError::not_allowed(
                e.child("connections"),
                "a cluster_header entry takes client_certificate connections only",
            ));
        }
        let name = header_name("", h).map_err(|err| err.at(e.child("cluster_header")))?;
        if FORBIDDEN_HEADERS.contains(&name.as_str()) || name.starts_with(':') {
            return Err(ConfigError::invalid(
                e.child("cluster_header"),
                h,
                "Envoy owns this header; latchkey can't set it",
            ));
        }
        return Ok(Injection {
            connections: indices,
            target: Target::ClusterHeader { name },
        });
    }
    if certs > 0 {
        return Err(ConfigError::not_allowed(
            e.child("connections"),
            "client_certificate connections go in a \"cluster_header\" entry",
        ));
    }
    let target = match (e.opt_str("header")?, e.opt_str("query")?) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::not_allowed(
                e.path.clone(),
                "give exactly one of \"header\" or \"query\", not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::not_allowed(
                e.path.clone(),
                "give exactly one of \"header\", \"query\" or \"cluster_header\"",
            ))
        }
        (Some(h), None) => {
            let name = header_name("", h).map_err(|err| err.at(e.child("header")))?;
            if FORBIDDEN_HEADERS.contains(&name.as_str()) {
                return Err(ConfigError::invalid(
                    e.child("header"),
                    h,
                    "Envoy owns this header; latchkey can't set it",
                ));
            }
            let prefix = match e.opt_str("prefix")? {
                None => None,
                Some(p) => {
                    if !p.bytes().all(is_header_value_byte) {
                        return Err(ConfigError::invalid(
                            e.child("prefix"),
                            p,
                            "not a valid header value (control characters)",
                        ));
                    }
                    Some(p.to_string())
                }
            };
            Target::Header { name, prefix }
        }
        (None, Some(q)) => {
            if e.has("prefix") {
                return Err(ConfigError::not_allowed(
                    e.child("prefix"),
                    "only allowed with \"header\", not with \"query\"",
                ));
            }
            if q.is_empty() {
                return Err(ConfigError::not_allowed(
                    e.child("query"),
                    "must not be an empty string",
                ));
            }
            Target::Query {
                name: q.to_string(),
            }
        }
    };
    Ok(Injection {
        connections: indices,
        target,
    })
}

/// RFC 9110 token character.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_header_value_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

/// A header name as Envoy stores it: a token, lowercased.
fn header_name(path: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(ConfigError::invalid(
            path,
            name,
            "not a valid HTTP header name",
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn host_value(path: &str, host: &str) -> Result<String, ConfigError> {
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
    if !valid {
        return Err(ConfigError::invalid(path, host, "not a host name"));
    }
    Ok(crate::router::normalize_host(host).to_ascii_lowercase())
}

/// Refuses any field of `all` that is set on `o` but not in `allowed` (the fields of
/// one kind of provider or connection), naming it with `reason`.
fn only_fields(
    o: &Obj,
    all: &[&str],
    allowed: &[&str],
    reason: &'static str,
) -> Result<(), ConfigError> {
    match all.iter().find(|f| !allowed.contains(f) && o.has(f)) {
        Some(field) => Err(ConfigError::not_allowed(o.child(field), reason)),
        None => Ok(()),
    }
}

/// `timeout_ms` of a store or provider (default 5 s, at most 5 min).
fn timeout(o: &Obj) -> Result<u64, ConfigError> {
    let timeout_ms = o.opt_u64("timeout_ms")?.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
        return Err(ConfigError::invalid(
            o.child("timeout_ms"),
            &timeout_ms.to_string(),
            format!("must be between 1 and {MAX_TIMEOUT_MS}"),
        ));
    }
    Ok(timeout_ms)
}

/// A Key Vault secret identifier, split.
struct KeyVaultId {
    host: String,
    name: String,
    version: Option<String>,
}

/// `https://<vault host>/secrets/<name>[/<version>]`, as Azure prints it.
fn key_vault_id(id: &str) -> Result<KeyVaultId, String> {
    let rest = id
        .strip_prefix("https://")
        .ok_or("must be https://<vault>.vault.azure.net/secrets/<name>[/<version>]")?;
    let (host, path) = rest.split_once('/').ok_or("has no /secrets/<name> path")?;
    let host = host.to_ascii_lowercase();
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err("not a valid vault host".into());
    }
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let name_ok = |n: &str| {
        !n.is_empty() && n.len() <= 127 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match segs.as_slice() {
        ["secrets", name] if name_ok(name) => Ok(KeyVaultId {
            host,
            name: name.to_string(),
            version: None,
        }),
        ["secrets", name, version]
            if name_ok(name) && !version.is_empty() && version.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(KeyVaultId {
                host,
                name: name.to_string(),
                version: Some(version.to_ascii_lowercase()),
            })
        }
        _ => Err("not a secret identifier: expected /secrets/<name> or /secrets/<name>/<version> (names: letters, digits, -)".into()),
    }
}

/// A managed-identity `resource`, in the forms APIM's
/// `authentication-managed-identity` takes: an absolute URI of any scheme (a
/// resource or app ID URI: `https://vault.azure.net`, `api://backend-app`) or an
/// application (client) ID GUID. It is sent percent-encoded in the IMDS query.
fn managed_identity_resource(r: &str) -> Result<(), &'static str> {
    const EXPECTED: &str = "expected an absolute URI (https://vault.azure.net, api://backend-app) or an application (client) ID GUID";
    if r.trim().is_empty() {
        return Err("must not be empty or blank");
    }
    if !r.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("has spaces, control or non-ASCII characters");
    }
    if is_guid(r) {
        return Ok(());
    }
    // RFC 3986 §4.3: absolute-URI = scheme ":" hier-part [ "?" query ]
    let (scheme, rest) = r.split_once(':').ok_or(EXPECTED)?;
    let scheme_ok = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok || rest.is_empty() {
        return Err(EXPECTED);
    }
    if let Some(after) = rest.strip_prefix("//") {
        if after.is_empty() || after.starts_with(['/', '?']) {
            return Err("has no host after \"//\"");
        }
    }
    if rest.contains('#') {
        return Err("must not have a #fragment");
    }
    if rest.bytes().any(|b| b"\"<>\\^`{|}".contains(&b)) {
        return Err("has characters a URI can't hold (percent-encode them)");
    }
    let bytes = rest.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err("has a \"%\" that is not a percent-encoded byte");
    }
    Ok(())
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hexadecimal (either case).
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One path segment of a Vault mount (`secret`, `approle`).
fn vault_segment(o: &Obj, key: &str, default: Option<&'static str>) -> Result<String, ConfigError> {
    let v = match (o.opt_str(key)?, default) {
        (Some(v), _) => v,
        (None, Some(d)) => d,
        (None, None) => o.req_str(key)?,
    };
    let v = v.trim_matches('/');
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        || v.split('/').any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(ConfigError::invalid(
            o.child(key),
            v,
            "not a Vault mount path",
        ));
    }
    Ok(v.to_string())
}

fn header_value_ok(path: &str, v: &str) -> Result<(), ConfigError> {
    if v.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(ConfigError::invalid(
            path,
            v,
            "not a valid header value (control characters)",
        ));
    }
    Ok(())
}

/// A route path; the error's path is set by the caller (`ConfigError::at`).
fn path_value(value: &str) -> Result<String, ConfigError> {
    if !value.starts_with('/') {
        return Err(ConfigError::invalid("", value, "must start with \"/\""));
    }
    if value.contains('?') {
        return Err(ConfigError::invalid(
            "",
            value,
            "paths are matched without the query string; remove \"?…\"",
        ));
    }
    if let Some(problem) = crate::path::config_path_problem(value) {
        return Err(ConfigError::invalid("", value, problem));
    }
    Ok(value.to_string())
}

fn claim_path_valid(path: &str, claim: &str) -> Result<(), ConfigError> {
    if claim.is_empty() || claim.split('.').any(str::is_empty) {
        return Err(ConfigError::invalid(
            path,
            claim,
            "not a claim name (empty segment)",
        ));
    }
    Ok(())
}
