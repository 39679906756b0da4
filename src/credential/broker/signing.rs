//! `private_key_jwt` in the broker (SPEC v1.2): before each token request of
//! such a provider, its assertion is signed by the key service (one signature per
//! token request, dispatched as part of the same fetch: single-flight, lease
//! and backoff are the token's). A signing failure fails the fetch (503 and
//! backoff, logged with the provider and the kind of failure); no client secret
//! is ever sent instead.

use super::delegated::Phase;
use super::*;
use crate::config::{OAuth2Provider, SigningKey, SigningService};
use crate::credential::assertion;

impl<P: Proxy> Broker<P> {
    /// The credential a signing call carries: the Vault token, or the Key Vault
    /// identity's token (`Err(Some)`: not yet, `Err(None)`: not in time).
    /// With Key Vault, also where its token is cached (a 401 drops it).
    fn signing_credential(
        &mut self,
        loaded: &Rc<Runtime>,
        key: &SigningKey,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<(Secret, Option<Used>), Option<()>> {
        match &key.service {
            SigningService::VaultTransit { token, .. } => Ok((token.clone(), None)),
            SigningService::KeyVault { identity, .. } => {
                let owner = Owner::Connection(*identity);
                match self.acquire(loaded, owner, None, now, false) {
                    Ok(Lookup::Ready(t)) => {
                        let used = Self::entry(loaded, owner, None).map(|(addr, _)| Used {
                            addr,
                            id: t.id,
                            subject: None,
                        });
                        Ok((Secret::new(t.token), used))
                    }
                    Ok(Lookup::Wait) if now < defer_until_ms => Err(Some(())),
                    _ => Err(None),
                }
            }
        }
    }

    /// Has fetch `f`'s assertion signed; its token request follows the signature.
    pub(super) fn sign_then_request(
        &mut self,
        mut f: Fetch,
        op: &OAuth2Provider,
        key: &SigningKey,
        refresh_token: Option<Secret>,
        now: u64,
    ) -> Sent {
        let loaded = f.loaded.clone();
        let credential = match self.signing_credential(&loaded, key, f.defer_until_ms, now) {
            Ok((c, used)) => {
                f.identity = used;
                c
            }
            Err(Some(())) => return Sent::Deferred(Box::new(f)),
            Err(None) => {
                self.signing_failed(&f, "identity", "identity", now);
                return Sent::Done;
            }
        };
        let jti = assertion::jti(crate::consent::random_u64(), crate::consent::random_u64());
        let input = assertion::signing_input(op, key, now / 1000, &jti);
        let call = assertion::sign_call(key, &credential, &input);
        if let Some(p) = self.provider_of_fetch(&f) {
            loaded.stats.signing(&self.proxy, p, None);
        }
        f.phase = Phase::Sign {
            input,
            refresh_token,
        };
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
        let Phase::Sign {
            input,
            refresh_token,
        } = std::mem::replace(&mut f.phase, Phase::Start)
        else {
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
        let signature = match body {
            None => Err(assertion::SignError::Malformed),
            Some(b) => assertion::parse_signature(key, status, &b),
        };
        // Key Vault refused the identity's token (expired, or for another
        // resource): drop it and sign once more, after a new one.
        if let (Err(assertion::SignError::Forbidden(401)), false) = (&signature, f.retried) {
            if let Some(identity) = f.identity.take() {
                self.drop_refused(&loaded, &identity, now);
                let again = Fetch {
                    retried: true,
                    defer_until_ms: now
                        + Self::entry(&loaded, f.addr.owner, f.subject.as_ref())
                            .map_or(5000, |(_, p)| p.fetch_timeout_ms),
                    ..f
                };
                self.pending.push(again);
                return;
            }
        }
        match signature {
            Ok(sig) => {
                let client = ClientCredential::Assertion(assertion::assemble(&input, &sig));
                let call = grant_call(op, &client, oc, refresh_token.as_ref(), f.subject.as_ref());
                loaded
                    .stats
                    .token(&self.proxy, connection, TokenStat::Requests);
                self.send(f, call, now);
            }
            Err(e) => self.signing_failed(&f, e.kind(), &e.to_string(), now),
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
        let config = &f.loaded.config;
        if let Some(p) = self.provider_of_fetch(f) {
            f.loaded.stats.signing(&self.proxy, p, Some(kind));
            let name = config.providers.get(p).map_or("?", |p| p.name.as_str());
            let connection = match f.addr.owner {
                Owner::Connection(c) => config.connection(c).map_or("?", |c| c.name.as_str()),
                _ => "?",
            };
            self.proxy.log(
                Level::Warn,
                &format!(
                    "connection {connection}: provider {name}: the client assertion could not be signed: {what}; no token request sent"
                ),
            );
        }
        self.complete(f, Err(FetchError::Signing), now);
    }
}
