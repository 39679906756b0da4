//! `private_key_jwt` in the broker (SPEC v1.2): before each token request of
//! such a provider, its assertion is signed by the key service (one signature per
//! token request, dispatched as part of the same fetch: single-flight, lease
//! and backoff are the token's). A signing failure fails the fetch (503 and
//! backoff, logged with the provider and the kind of failure); no client secret
//! is ever sent instead.

use std::rc::Rc;

use super::delegated::Phase;
use super::*;
use crate::config::{OAuth2Provider, SigningKey, SigningService, VaultAuth};
use crate::credential::assertion;
use crate::credential::store;
use crate::credential::token_store::Record;

/// What a sign call's answer brought.
pub enum SignAnswer {
    /// The client authentication: the signed assertion.
    Signed(ClientCredential),
    /// Sign once more (the identity's token was refused and dropped).
    Again,
    /// No signature.
    Failed(assertion::SignError),
}

/// What a fetch's signed assertion is for: the call that follows the signature.
pub enum Signed {
    /// The grant's token request, with this refresh token (if the grant has one).
    Grant { refresh_token: Option<Secret> },
    /// authorization_code: the redemption of the stored refresh token.
    Redeem { record: Record, rereads: u8 },
}

impl<P: Proxy> Broker<P> {
    /// The credential a signing call carries: the Vault token, or the Key Vault
    /// identity's token (`Err(Some)`: not yet, `Err(None)`: not in time).
    /// With Key Vault, also where its token is cached (a 401 drops it).
    /// With Transit after an AppRole login, the login token (a 403 drops it).
    /// `provider`: the index of the provider whose key this is.
    pub(super) fn signing_credential(
        &mut self,
        loaded: &Rc<Runtime>,
        provider: usize,
        key: &SigningKey,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<(Secret, Option<Used>), Option<()>> {
        let owner = match &key.service {
            SigningService::VaultTransit {
                auth: VaultAuth::Token(token),
                ..
            } => return Ok((token.clone(), None)),
            SigningService::VaultTransit { .. } => Owner::SignerLogin(provider),
            SigningService::KeyVault { identity, .. } => Owner::Connection(*identity),
        };
        match self.acquire(loaded, owner, None, now, false) {
            Ok(Lookup::Ready(t)) => {
                let used = Self::entry(loaded, owner, None).map(|(addr, _)| Used {
                    addr: Rc::new(addr),
                    id: t.id,
                    subject: None,
                });
                Ok((Secret::new(t.token), used))
            }
            Ok(Lookup::Wait) if now < defer_until_ms => Err(Some(())),
            _ => Err(None),
        }
    }

    /// Sends a Transit signing key's AppRole login.
    pub(super) fn dispatch_signer_login(&mut self, f: Fetch, provider: usize, now: u64) -> Sent {
        let call = match f.loaded.config.providers.get(provider).map(|p| &p.kind) {
            Some(ProviderKind::OAuth2(OAuth2Provider {
                auth_method: AuthMethod::PrivateKeyJwt(key),
                ..
            })) => match &key.service {
                SigningService::VaultTransit {
                    cluster,
                    authority,
                    auth,
                    namespace,
                    ..
                } => store::vault_login_call(
                    cluster,
                    authority,
                    auth,
                    namespace.as_deref(),
                    key.timeout_ms,
                ),
                SigningService::KeyVault { .. } => None,
            },
            _ => None,
        };
        match call {
            Some(call) => self.send(f, call, now),
            None => Sent::Done,
        }
    }

    /// A Transit signing key's AppRole login finished: its token is cached for
    /// its lease, or the failure is logged (and the signing calls waiting on it
    /// fail as "login").
    pub(super) fn complete_signer_login(
        &mut self,
        f: &Fetch,
        provider: usize,
        result: Result<(Secret, u64), store::StoreError>,
        now: u64,
    ) {
        let loaded = f.loaded.clone();
        let Some(slot) = loaded.signer_logins.get(provider).and_then(Option::as_ref) else {
            return;
        };
        let outcome = match result {
            Ok((token, lifetime_ms)) => FetchOutcome::Token {
                token: token.expose().to_string(),
                id: random_u64(),
                lifetime_ms,
            },
            Err(e) => {
                let name = loaded
                    .config
                    .providers
                    .get(provider)
                    .map_or("?", |p| p.name.as_str());
                self.proxy.log(
                    Level::Warn,
                    &format!("provider {name}: the signing key's Vault login failed: {e}"),
                );
                FetchOutcome::Failed { kind: e.kind() }
            }
        };
        self.install(f, outcome, now, &slot.policy);
    }

    /// Whether the provider's client authentication can be made now: its
    /// client secret or assertion is there, or (private_key_jwt) the signing
    /// call's credential (`Err(Some)`: not yet, `Err(None)`: not in time).
    pub(super) fn client_ready(
        &mut self,
        loaded: &Rc<Runtime>,
        provider_index: usize,
        provider: &OAuth2Provider,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<(), Option<()>> {
        match &provider.auth_method {
            AuthMethod::PrivateKeyJwt(key) => self
                .signing_credential(loaded, provider_index, key, defer_until_ms, now)
                .map(|_| ()),
            _ => self
                .client_credential(loaded, provider, defer_until_ms, now)
                .map(|_| ()),
        }
    }

    /// A new assertion's signing input, and the key service's call that signs it
    /// (counted as a signing request of `provider`).
    pub(super) fn sign_call(
        &self,
        loaded: &Runtime,
        provider: usize,
        op: &OAuth2Provider,
        key: &SigningKey,
        credential: &Secret,
        now: u64,
    ) -> (String, HttpCall) {
        let jti = assertion::jti(crate::consent::random_u64(), crate::consent::random_u64());
        let input = assertion::signing_input(op, key, now / 1000, &jti);
        let call = assertion::sign_call(key, credential, &input);
        loaded.stats.signing(&self.proxy, provider, None);
        (input, call)
    }

    /// Has fetch `f`'s assertion signed; `then` follows the signature.
    pub(super) fn sign_then_request(
        &mut self,
        mut f: Fetch,
        op: &OAuth2Provider,
        key: &SigningKey,
        then: Signed,
        now: u64,
    ) -> Sent {
        let loaded = f.loaded.clone();
        let Some(provider) = self.provider_of_fetch(&f) else {
            return Sent::Done;
        };
        let credential =
            match self.signing_credential(&loaded, provider, key, f.defer_until_ms, now) {
                Ok((c, used)) => {
                    f.identity = used;
                    c
                }
                Err(Some(())) => return Sent::Deferred(Box::new(f)),
                Err(None) => {
                    let kind = key.service.credential_kind();
                    self.signing_failed(&f, kind, kind, now);
                    return Sent::Done;
                }
            };
        let (input, call) = self.sign_call(&loaded, provider, op, key, &credential, now);
        f.phase = Phase::Sign { input, then };
        self.send(f, call, now)
    }

    /// The key service answered: the token request goes with the signed assertion.
    pub(super) fn on_signature(
        &mut self,
        mut f: Fetch,
        status: Option<u32>,
        body: Option<Vec<u8>>,
        now: u64,
    ) {
        let Phase::Sign { input, then } = std::mem::replace(&mut f.phase, Phase::Start) else {
            return;
        };
        let loaded = f.loaded.clone();
        let Owner::Connection(connection) = f.addr.owner else {
            return;
        };
        let Some(conn) = loaded.config.connection(connection) else {
            return;
        };
        let (Some(ProviderKind::OAuth2(op)), Credential::OAuth2(oc)) = (
            loaded.config.provider_of(conn).map(|p| &p.kind),
            &conn.credential,
        ) else {
            return;
        };
        let AuthMethod::PrivateKeyJwt(key) = &op.auth_method else {
            return;
        };
        let identity = f.identity.take();
        let body = body.unwrap_or_default();
        let may_retry = !f.retried && identity.is_some();
        match Self::signature_answer(key, &input, status, &body, may_retry) {
            SignAnswer::Again => {
                if let Some(refused) = identity {
                    self.retry_refused(f, &refused, 1, now);
                }
            }
            SignAnswer::Signed(client) => match then {
                Signed::Grant { refresh_token } => {
                    let call =
                        grant_call(op, &client, oc, refresh_token.as_ref(), f.subject.as_ref());
                    loaded
                        .stats
                        .token(&self.proxy, connection, TokenStat::Requests);
                    self.send(f, call, now);
                }
                Signed::Redeem { record, rereads } => {
                    self.send_redeem(f, op, oc, &client, record, rereads, now)
                }
            },
            SignAnswer::Failed(e) => self.signing_failed(&f, e.kind(), &e.to_string(), now),
        }
    }

    /// The key service's answer to a sign call of `input`: the client's
    /// assertion, or a failure; `Again` when the service refused a credential
    /// that can be replaced (Key Vault's 401 to an expired identity token,
    /// Vault's 403 to a login it no longer honours) and `may_retry` (the call
    /// carried such a credential, and this was the first try). The caller drops
    /// that credential and signs once more.
    pub(super) fn signature_answer(
        key: &SigningKey,
        input: &str,
        status: Option<u32>,
        body: &[u8],
        may_retry: bool,
    ) -> SignAnswer {
        match assertion::parse_signature(key, status, body) {
            Ok(sig) => SignAnswer::Signed(ClientCredential::Assertion(assertion::assemble(
                input, &sig,
            ))),
            Err(assertion::SignError::Forbidden(code))
                if may_retry
                    && (code == 401
                        || matches!(key.service, SigningService::VaultTransit { .. })) =>
            {
                SignAnswer::Again
            }
            Err(e) => SignAnswer::Failed(e),
        }
    }

    /// The provider (index) of a token fetch.
    fn provider_of_fetch(&self, f: &Fetch) -> Option<usize> {
        let Owner::Connection(c) = f.addr.owner else {
            return None;
        };
        f.loaded.config.connection(c).map(|c| c.provider)
    }

    /// No signature: the fetch fails (backoff), logged and counted by kind.
    /// `what`: the kind, with the HTTP status when the service answered one.
    fn signing_failed(&mut self, f: &Fetch, kind: &'static str, what: &str, now: u64) {
        if let Owner::Connection(c) = f.addr.owner {
            self.unsigned(&f.loaded, c, kind, what);
        }
        self.complete(f, Err(FetchError::Signing), now);
    }

    /// Connection `connection`'s assertion could not be signed: logged with the
    /// connection, its provider and the kind of failure, and counted by kind.
    pub(super) fn unsigned(
        &self,
        loaded: &Runtime,
        connection: usize,
        kind: &'static str,
        what: &str,
    ) {
        let config = &loaded.config;
        let Some(conn) = config.connection(connection) else {
            return;
        };
        loaded.stats.signing(&self.proxy, conn.provider, Some(kind));
        let name = config
            .providers
            .get(conn.provider)
            .map_or("?", |p| p.name.as_str());
        self.proxy.log(
            Level::Warn,
            &format!(
                "connection {}: provider {name}: the client assertion could not be signed: {what}; no token request sent",
                conn.name
            ),
        );
    }
}
