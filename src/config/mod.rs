//! The plugin configuration (v1): the public contract users write.
//!
//! Loading is in phases. [`json`] reads the document with the path of every field
//! at hand; `names` gives every secret, provider and connection its index; then
//! one module per section validates it and produces the runtime types below,
//! resolving every name to an index or a value (`build` runs them in order).
//! Every string a field holds is checked by the one rule for its kind, in
//! `lexical`. The result is complete or there is none: [`Config::parse`]
//! returns the first error, and the filter keeps its previous configuration (or
//! refuses to start).
//!
//! Everything the request path needs (lowercased header names, the route index,
//! the list of claims to read) is prepared here, once.

mod access;
mod build;
mod claims;
mod client_auth;
mod connections;
mod consent;
mod error;
mod fields;
mod http_url;
/// The JSON reader the configuration is built from (public for the fuzz target,
/// which checks it reads what `serde_json::Value` reads).
pub mod json;
mod lexical;
mod names;
mod providers;
mod routes;
mod secret_values;
mod secrets;
mod stores;

/// The router's own match types, which a [`Route`] holds.
pub use crate::router::{PathMatch, RouteMatch};
pub use build::TOP_LEVEL_FIELDS;
pub use error::{ConfigError, ErrorKind};

use crate::router::Router;
use crate::secret::Secret;
use std::rc::Rc;

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub claims: ClaimsConfig,
    /// Secrets read from a store at run time (Key Vault, Vault), by [`SecretRef::Store`].
    pub stores: Vec<Store>,
    pub providers: Vec<Provider>,
    pub connections: Vec<Connection>,
    pub routes: Vec<Route>,
    pub router: Router,
    pub unmatched: Unmatched,
    /// Claims read per request: `[0]` is the subject, `[1]` the groups, the rest
    /// are those named in `access.claims` policies (deduplicated).
    pub claim_paths: Vec<ClaimPath>,
    /// Things worth a warning in the log at load time (inline secrets). No values.
    pub warnings: Vec<String>,
    /// Worth an info line at load time (a default that changed).
    pub notes: Vec<String>,
    /// Write `latchkey.route`, `.connection`, `.decision` filter state for access
    /// logs (`filter_state`, default false: three host writes per request).
    pub filter_state: bool,
    /// Requests one worker (VM) may hold paused waiting for a credential
    /// (`max_paused_requests`, default 1024); past it they get 503 at once.
    pub max_paused_requests: usize,
    /// `discovery.path`: a GET of it is answered with what the caller may use.
    pub discovery: Option<String>,
    /// Every `cluster_header` routes use (lowercased): removed from every request
    /// a client sends, so that no client picks a cluster or certificate itself.
    pub cluster_headers: Vec<String>,
    /// `token_stores`: where authorization_code connections keep refresh tokens.
    pub token_stores: Vec<TokenStore>,
    /// `consent`: the login, callback and disconnect endpoints (SPEC v1.2).
    pub consent: Option<Consent>,
    /// The `iss` claim's index in `claim_paths`, read per request when a
    /// per-user connection needs to know who the caller is.
    pub issuer_claim: Option<usize>,
}

pub const SUBJECT_CLAIM: usize = 0;
pub const GROUPS_CLAIM: usize = 1;

impl Config {
    /// Parses and validates a configuration document. `env` reads the wasm VM's
    /// environment (secrets `{"env": …}`).
    pub fn parse(text: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        build::build(text, env)
    }

    pub fn route(&self, i: usize) -> Option<&Route> {
        self.routes.get(i)
    }

    pub fn connection(&self, i: usize) -> Option<&Connection> {
        self.connections.get(i)
    }

    pub fn provider_of(&self, c: &Connection) -> Option<&Provider> {
        self.providers.get(c.provider)
    }
}

/// `token_stores.<name>` (SPEC v1.2): one record per authorization_code
/// connection (per caller for `per_user`), holding its refresh token.
#[derive(Debug)]
pub struct TokenStore {
    pub name: String,
    pub kind: TokenStoreKind,
    /// Envoy cluster that reaches the store.
    pub cluster: String,
    /// `:authority` of its calls.
    pub authority: String,
    pub timeout_ms: u64,
}

#[derive(Debug)]
pub enum TokenStoreKind {
    /// Vault / OpenBao KV v2: records at `<base>/v1/<mount>/data/<prefix>/<connection>/<caller>`
    /// (`data_path` is that up to the prefix; `metadata_path` the same under
    /// `metadata/`, where a disconnect deletes every version).
    Vault {
        token: Secret,
        namespace: Option<String>,
        data_path: String,
        metadata_path: String,
    },
    /// Azure Key Vault secrets named `<prefix>-<connection>-<caller>` (in Key
    /// Vault's alphabet), written with a token from connection `identity`.
    KeyVault { identity: usize, prefix: String },
}

/// The `consent` section (SPEC v1.2): where people give and take back consent.
#[derive(Debug)]
pub struct Consent {
    /// `GET <path>/<connection>/login`, `DELETE <path>/<connection>`.
    pub path: String,
    /// Sent to the authorization server as is.
    pub redirect_uri: String,
    /// The path of `redirect_uri`: the callback latchkey answers.
    pub callback_path: String,
    /// Signs states and derives PKCE verifiers (at least 32 bytes).
    pub state_key: Secret,
    /// Prefixes a `return_to` must start with.
    pub return_to: Vec<String>,
}

/// A secret as the configuration uses it: a value known at load (`env`,
/// `inline`), or a store read at run time and followed as it rotates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Value(Secret),
    /// Index into [`Config::stores`].
    Store(usize),
}

/// A secret kept in a secret store (`secrets.<name>` with `azure_key_vault` or `vault`).
#[derive(Debug)]
pub struct Store {
    /// The secret's name in the configuration (stats, logs).
    pub name: String,
    pub kind: StoreKind,
    /// Envoy cluster that reaches the store.
    pub cluster: String,
    /// `:authority` and `:path` of the read.
    pub authority: String,
    pub path: String,
    /// Re-read period; `None` for a pinned version (read once).
    pub refresh_ms: Option<u64>,
    pub timeout_ms: u64,
}

#[derive(Debug)]
pub enum StoreKind {
    /// Azure Key Vault: `GET <identifier>?api-version=7.4` with a bearer token
    /// from connection `identity` (its index in [`Config::connections`]).
    KeyVault { identity: usize },
    /// HashiCorp Vault / OpenBao KV v2: `data.data.<field>`.
    Vault {
        auth: VaultAuth,
        namespace: Option<String>,
        field: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// `X-Vault-Token` from a secret.
    Token(Secret),
    /// AppRole login (`POST <login_path>`); its token is cached for its lease.
    AppRole {
        role_id: String,
        secret_id: Secret,
        login_path: String,
    },
}

/// Where the caller's claims come from (`claims.from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimsSource {
    /// `jwt_authn`'s `payload_in_metadata: <key>`.
    /// With several keys (Envoy Gateway writes each provider's payload under
    /// its name) the first one present is read.
    JwtMetadata { keys: Vec<String> },
    /// A header holding base64url JSON (`forward_payload_header`), lowercased.
    Header { name: String },
    /// No identity: every caller is anonymous.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimsConfig {
    pub source: ClaimsSource,
}

/// A claim name, possibly dotted (`realm_access.roles`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    pub dotted: String,
    pub segments: Vec<String>,
}

impl AsRef<[String]> for ClaimPath {
    fn as_ref(&self) -> &[String] {
        &self.segments
    }
}

impl ClaimPath {
    /// `dotted` is a checked claim name ([`lexical::claim_name`]); one that
    /// isn't is taken as a single segment.
    pub fn new(dotted: &str) -> Self {
        ClaimPath {
            dotted: dotted.to_string(),
            segments: lexical::claim_segments(dotted).unwrap_or_else(|_| vec![dotted.to_string()]),
        }
    }
}

#[derive(Debug)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
}

#[derive(Debug)]
pub enum ProviderKind {
    ApiKey,
    OAuth2(OAuth2Provider),
    /// Azure Instance Metadata Service tokens (`azure_managed_identity`).
    ManagedIdentity(ManagedIdentityProvider),
    /// Client certificates held by Envoy clusters (mTLS); connections name the cluster.
    ClientCertificate,
}

#[derive(Debug)]
pub struct ManagedIdentityProvider {
    pub cluster: String,
    /// `:authority` and `:path` (without query) of the IMDS token endpoint.
    pub authority: String,
    pub path: String,
    /// A user-assigned identity; `None`: the system-assigned one.
    pub client_id: Option<String>,
    pub timeout_ms: u64,
    pub default_expires_in_s: u64,
    pub refresh_margin_s: u64,
    /// An upstream 401 refreshes a token only once it is this old.
    pub drop_on_401_after_s: u64,
}

#[derive(Debug)]
pub struct OAuth2Provider {
    /// Envoy cluster that reaches the token server.
    pub cluster: String,
    pub token_url: String,
    /// `:authority` of the token request: the URL's host (and port if given).
    pub authority: String,
    /// `:path` of the token request: the URL's path and query.
    pub path: String,
    pub client_id: String,
    /// With `client_secret_basic` or `client_secret_post` only.
    pub client_secret: Option<SecretRef>,
    pub auth_method: AuthMethod,
    pub timeout_ms: u64,
    /// Lifetime assumed when a token response has no `expires_in`.
    pub default_expires_in_s: u64,
    /// A token is refreshed at half its lifetime, and at least this long before it expires.
    pub refresh_margin_s: u64,
    /// An upstream 401 refreshes a token only once it is this old (SPEC v1.2).
    pub drop_on_401_after_s: u64,
    /// Where a person consents (authorization_code connections): an absolute
    /// URL the browser is sent to, query kept.
    pub authorization_url: Option<String>,
    /// RFC 9207: the `iss` a consent callback must carry, when set.
    pub issuer: Option<String>,
    /// RFC 7009 token revocation, through `cluster`.
    pub revocation: Option<Endpoint>,
}

impl OAuth2Provider {
    /// The store its client secret is read from, if it is in one.
    pub fn secret_store(&self) -> Option<usize> {
        match self.client_secret {
            Some(SecretRef::Store(i)) => Some(i),
            _ => None,
        }
    }

    /// Whether its client authenticates with nothing read at run time (a
    /// secret known at load, or a certificate): such a client may fetch the
    /// token a store or another client needs without needing it back.
    pub fn gets_tokens_alone(&self) -> bool {
        match self.auth_method {
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => {
                matches!(self.client_secret, Some(SecretRef::Value(_)))
            }
            AuthMethod::TlsClientAuth => true,
            AuthMethod::ClientAssertion { .. } | AuthMethod::PrivateKeyJwt(_) => false,
        }
    }
}

/// An HTTP endpoint reached through a provider's cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub authority: String,
    /// `:path`, query included.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// RFC 6749 §2.3.1: HTTP Basic with form-urlencoded id and secret.
    ClientSecretBasic,
    /// RFC 6749 §2.3.1: `client_id` and `client_secret` in the form body.
    ClientSecretPost,
    /// RFC 8705 §2: the cluster presents a client certificate; `client_id` only.
    TlsClientAuth,
    /// RFC 7521: another connection's token is the client assertion (SPEC v1.2).
    ClientAssertion { connection: usize },
    /// RFC 7523 §2.2: a JWT signed by a key service (SPEC v1.2).
    PrivateKeyJwt(Box<SigningKey>),
}

/// The key a `private_key_jwt` client signs its assertions with; it never
/// enters the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub alg: JwsAlg,
    /// The JWT header's `kid`.
    pub kid: String,
    /// The JWT header's `x5t#S256`, when set.
    pub x5t_s256: Option<String>,
    /// The assertion's `aud` (`assertion_audience`); the token URL when `None`.
    pub audience: Option<String>,
    pub service: SigningService,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsAlg {
    Rs256,
    Ps256,
    Es256,
}

impl JwsAlg {
    pub fn name(self) -> &'static str {
        match self {
            JwsAlg::Rs256 => "RS256",
            JwsAlg::Ps256 => "PS256",
            JwsAlg::Es256 => "ES256",
        }
    }
}

/// Where the signature is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningService {
    /// Azure Key Vault `POST <key>/sign?api-version=7.4`, with a token from
    /// connection `identity`.
    KeyVault {
        cluster: String,
        authority: String,
        path: String,
        identity: usize,
    },
    /// Vault / OpenBao Transit `POST /v1/<mount>/sign/<key>/sha2-256`, with a
    /// Vault token, or one from an AppRole login.
    VaultTransit {
        cluster: String,
        authority: String,
        path: String,
        auth: VaultAuth,
        namespace: Option<String>,
    },
}

impl SigningService {
    /// What a sign call needs before it can be made, as a failure kind:
    /// Key Vault's identity token, or Transit's AppRole login.
    pub fn credential_kind(&self) -> &'static str {
        match self {
            SigningService::KeyVault { .. } => "identity",
            SigningService::VaultTransit { .. } => "login",
        }
    }
}

#[derive(Debug)]
pub struct Connection {
    pub name: String,
    /// Index into [`Config::providers`].
    pub provider: usize,
    pub credential: Credential,
    /// `None` only for connections no route uses (a secret store's identity).
    pub access: Option<Access>,
}

#[derive(Debug)]
pub enum Credential {
    ApiKey(SecretRef),
    OAuth2(OAuth2Connection),
    /// A managed-identity token for `resource`.
    ManagedIdentity {
        resource: String,
    },
    /// The Envoy cluster whose TLS transport socket presents the certificate
    /// (shared with every request that injects it).
    ClientCertificate {
        cluster: Rc<str>,
    },
}

impl Credential {
    /// Whether this credential is a token from a token cache (OAuth2 or IMDS).
    pub fn is_token(&self) -> bool {
        matches!(
            self,
            Credential::OAuth2(_) | Credential::ManagedIdentity { .. }
        )
    }
}

#[derive(Debug)]
pub struct OAuth2Connection {
    pub grant: Grant,
    pub scopes: Vec<String>,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub extra_params: Vec<(String, String)>,
}

#[derive(Debug)]
pub enum Grant {
    ClientCredentials,
    /// A pre-consented connection: the refresh token is a secret (perhaps in a store).
    RefreshToken(SecretRef),
    /// RFC 8693: the caller's bearer token is the subject token.
    TokenExchange {
        subject_token_type: String,
    },
    /// SPEC v1.2: a person consented (authorization code with PKCE); the
    /// refresh token is kept in token store `store`.
    AuthorizationCode {
        /// Every caller consents for themselves; otherwise one consent serves all.
        per_user: bool,
        store: usize,
        /// Who may give (and take back) the shared consent; `None` for per_user.
        consent: Option<Access>,
    },
}

/// Who may use a route or a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub public: bool,
    pub authenticated: bool,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    /// Claim (index into [`Config::claim_paths`]) and its accepted values.
    pub claims: Vec<(usize, Vec<String>)>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub access: Option<Access>,
    pub inject: Vec<Injection>,
    /// Lowercased header names removed before forwarding.
    pub strip: Vec<String>,
    /// Drop a latchkey token from the cache when the upstream answers 401 to it.
    pub drop_token_on_401: bool,
    /// Whether any policy on this route (its own, or a connection it may use)
    /// looks at claims; when none does, the filter doesn't read them.
    pub needs_claims: bool,
    /// Whether a connection it may inject is a token exchange: then the
    /// verified token's `iss`, `sub`, `exp`, `iat` and `jti` are read too.
    pub binds_caller: bool,
    /// Whether a connection it may inject is a per-user consent: then the
    /// request needs to know who the caller is.
    pub per_user: bool,
    /// The decision and credentials of every request on this route, when they
    /// can't differ between requests ([`crate::policy::fixed`]); set once the
    /// configuration is built.
    pub fixed: Option<Fixed>,
}

/// What every request on a route gets when no claim, caller or cache plays a
/// part: the connection per inject entry and its configured value (an API key,
/// or a client certificate's cluster).
#[derive(Debug)]
pub struct Fixed {
    pub picks: Vec<usize>,
    pub values: Vec<Secret>,
}

/// The router reads a route's match, and nothing else of it.
impl AsRef<RouteMatch> for Route {
    fn as_ref(&self) -> &RouteMatch {
        &self.matcher
    }
}

#[derive(Debug)]
pub struct Injection {
    /// Indices into [`Config::connections`], in order of preference.
    pub connections: Vec<usize>,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Lowercased header name; `prefix` as configured (None: the connection's default).
    Header {
        name: Rc<str>,
        prefix: Option<String>,
    },
    /// Query parameter name, as configured.
    Query { name: String },
    /// Lowercased header naming the upstream cluster (client certificates): set to
    /// the chosen connection's cluster; the Envoy route picks its cluster from it.
    ClusterHeader { name: Rc<str> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Allow,
    Deny,
}

#[cfg(test)]
mod tests;
