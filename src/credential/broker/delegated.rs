//! authorization_code connections in the broker (SPEC v1.2): the fetch of an
//! access token from a stored consent, and the consent tasks (callback,
//! disconnect) a request waits on.
//!
//! **A fetch** reads the record from the token store, redeems its refresh
//! token, and, when the server rotated it, writes the new one back with the
//! store's compare-and-set *before* the access token is installed; a write
//! another proxy won makes it read the record again (at most [`MAX_REREADS`]
//! times). No record, or `invalid_grant`: "consent required", remembered for
//! a moment ([`crate::credential::cache::NO_CONSENT_RECHECK_MS`]).
//!
//! **A task** belongs to one paused request: a callback admits its state once
//! per proxy, redeems the code, reads the record's version and writes the
//! refresh token; a disconnect reads the record, removes it and revokes its
//! refresh token. Each ends with the request's answer, never a silent failure:
//! anything that stops it is a JSON answer with a reason (503 for what may
//! work when tried again).

use super::signing::{SignAnswer, Signed};
use super::*;
use crate::config::{OAuth2Connection, OAuth2Provider, TokenStore, TokenStoreKind};
use crate::consent::{Replay, Used as UsedStates, SHARED};
use crate::credential::token_store::{self, Record, Written};
use crate::request::{Task, TaskKind};
use crate::stats::ConsentStat;

/// Re-reads after a lost compare-and-set, per fetch.
const MAX_REREADS: u8 = 2;

/// Where an authorization_code fetch is.
pub enum Phase {
    /// Not sent yet (every other kind of fetch stays here).
    Start,
    /// The record is being read (`rereads` so far).
    Record { rereads: u8 },
    /// Its refresh token is being redeemed.
    Redeem { record: Record, rereads: u8 },
    /// The rotated refresh token is being written back; then `token` is installed.
    Save {
        record: Record,
        token: token_response::Token,
        rereads: u8,
    },
    /// private_key_jwt: the assertion is being signed; `then` follows.
    Sign { input: String, then: Signed },
    /// Key Vault: the write is read back (no compare-and-set there).
    Verify {
        written: Secret,
        token: token_response::Token,
        rereads: u8,
    },
}

/// A consent task of one paused request.
pub struct Job {
    pub context_id: u32,
    pub loaded: Rc<Runtime>,
    pub task: Task,
    step: Step,
    /// Give up waiting for the store's identity token after this.
    defer_until_ms: u64,
}

impl Job {
    /// The name of the connection the task is for (its answer names it).
    fn connection_name(&self) -> Option<String> {
        let c = self.loaded.config.connection(self.task.connection)?;
        Some(c.name.clone())
    }
}

enum Step {
    Start,
    /// The gateway's client authentication for `then` is made (with
    /// private_key_jwt, its assertion is signed first). `retried`: after a
    /// signing identity's token Key Vault refused.
    Authenticate {
        then: Then,
        retried: bool,
    },
    /// private_key_jwt: the assertion for `then` is being signed.
    Sign {
        input: String,
        then: Then,
        identity: Option<Used>,
        retried: bool,
    },
    /// The code is being redeemed.
    Redeem,
    /// The record's version is read, to write over it.
    Version {
        refresh_token: Secret,
    },
    Write,
    /// Disconnect: the record is read (for its refresh token), then removed.
    ReadForDisconnect,
    Delete {
        refresh_token: Option<Secret>,
    },
    Revoke,
    /// Discovery: a record is read for its connection's status.
    Status,
}

/// A task's call to the token server (the client authenticates on each).
enum Then {
    /// The callback's code is redeemed.
    Code,
    /// A removed consent's refresh token is revoked.
    Revoke { refresh_token: Secret },
}

/// The grant of an authorization_code connection: its store, and whether per user.
fn delegated(loaded: &Runtime, connection: usize) -> Option<(usize, bool)> {
    match &loaded.config.connection(connection)?.credential {
        Credential::OAuth2(o) => match o.grant {
            Grant::AuthorizationCode {
                store, per_user, ..
            } => Some((store, per_user)),
            _ => None,
        },
        _ => None,
    }
}

impl<P: Proxy> Broker<P> {
    /// The credential a token store's calls carry: the Vault token, or the Key
    /// Vault identity's token (`Err(Some)`: not yet, `Err(None)`: not in time).
    fn store_credential(
        &mut self,
        loaded: &Rc<Runtime>,
        store: &TokenStore,
        defer_until_ms: u64,
        now: u64,
    ) -> Result<Secret, Option<()>> {
        match &store.kind {
            TokenStoreKind::Vault { token, .. } => Ok(token.clone()),
            TokenStoreKind::KeyVault { identity, .. } => {
                match self.acquire(loaded, Owner::Connection(*identity), None, now, false) {
                    Ok(Lookup::Ready(t)) => Ok(Secret::new(t.token)),
                    Ok(Lookup::Wait) if now < defer_until_ms => Err(Some(())),
                    _ => Err(None),
                }
            }
        }
    }

    /// Starts an authorization_code fetch: the record is read first.
    pub(super) fn dispatch_delegated(&mut self, mut f: Fetch, connection: usize, now: u64) -> Sent {
        let loaded = f.loaded.clone();
        let Some((store_i, per_user)) = delegated(&loaded, connection) else {
            return Sent::Done;
        };
        let Some(store) = loaded.config.token_stores.get(store_i) else {
            return Sent::Done;
        };
        let Some(conn) = loaded.config.connection(connection) else {
            return Sent::Done;
        };
        let Some(ProviderKind::OAuth2(provider)) = loaded.config.provider_of(conn).map(|p| &p.kind)
        else {
            return Sent::Done;
        };
        // The client's authentication is needed once the record is read: have
        // it (or, with private_key_jwt, the signing call's credential) first.
        match self.client_ready(&loaded, conn.provider, provider, f.defer_until_ms, now) {
            Ok(_) => {}
            Err(Some(())) => return Sent::Deferred(Box::new(f)),
            Err(None) => {
                self.complete(&f, Err(FetchError::Dispatch), now);
                return Sent::Done;
            }
        }
        let credential = match self.store_credential(&loaded, store, f.defer_until_ms, now) {
            Ok(c) => c,
            Err(Some(())) => return Sent::Deferred(Box::new(f)),
            Err(None) => {
                self.complete(&f, Err(FetchError::TokenStore), now);
                return Sent::Done;
            }
        };
        if per_user && f.subject.is_none() {
            self.complete(&f, Err(FetchError::NoConsent), now);
            return Sent::Done;
        }
        let record = Self::record_of(&f, per_user);
        let name = loaded
            .config
            .connection(connection)
            .map_or("", |c| c.name.as_str());
        let call = self.read_record(&loaded, store, &credential, name, &record);
        f.phase = Phase::Record { rereads: 0 };
        self.send(f, call, now)
    }

    /// The record (`caller` part of its name) of fetch `f`.
    fn record_of(f: &Fetch, per_user: bool) -> String {
        match (&f.subject, per_user) {
            (Some(key), true) => crate::consent::hash_of_key(key.expose()),
            _ => SHARED.to_string(),
        }
    }

    /// An answer to one of an authorization_code fetch's calls.
    pub(super) fn on_delegated_answer(
        &mut self,
        mut f: Fetch,
        status: Option<u32>,
        body: Option<Vec<u8>>,
        now: u64,
    ) {
        let loaded = f.loaded.clone();
        let Owner::Connection(connection) = f.addr.owner else {
            return;
        };
        let Some((store_i, per_user)) = delegated(&loaded, connection) else {
            return;
        };
        let (Some(store), Some(conn)) = (
            loaded.config.token_stores.get(store_i),
            loaded.config.connection(connection),
        ) else {
            return;
        };
        let Credential::OAuth2(oc) = &conn.credential else {
            return;
        };
        let body = body.unwrap_or_default();
        let record_name = Self::record_of(&f, per_user);
        let warn =
            |p: &P, what: &str| p.log(Level::Warn, &format!("connection {}: {what}", conn.name));
        match std::mem::replace(&mut f.phase, Phase::Start) {
            Phase::Start | Phase::Sign { .. } => {}
            Phase::Record { rereads } => {
                match token_store::parse_read(&store.kind, status, &body) {
                    Ok(None) => self.complete(&f, Err(FetchError::NoConsent), now),
                    Err(e) => {
                        warn(
                            &self.proxy,
                            &format!("token store {} read failed: {e}", store.name),
                        );
                        self.complete(&f, Err(FetchError::TokenStore), now)
                    }
                    Ok(Some(record)) => self.redeem(f, record, rereads, now),
                }
            }
            Phase::Redeem { record, rereads } => {
                let default_ms = loaded
                    .tokens
                    .get(connection)
                    .and_then(Option::as_ref)
                    .map_or(300_000, |s| s.default_lifetime_ms);
                match token_response::parse(status, &body, default_ms) {
                    Err(FetchError::OAuth { code, .. }) if code == "invalid_grant" => {
                        self.proxy.log(
                            Level::Info,
                            &format!(
                                "connection {}: the stored refresh token was refused (invalid_grant): consent required",
                                conn.name
                            ),
                        );
                        self.complete(&f, Err(FetchError::NoConsent), now)
                    }
                    Err(e) => self.complete(&f, Err(e), now),
                    Ok(token) => match token.refresh_token.clone() {
                        Some(rt) if rt != record.refresh_token => {
                            let Ok(credential) = self.store_credential(&loaded, store, now, now)
                            else {
                                warn(
                                    &self.proxy,
                                    "no credential to store the rotated refresh token",
                                );
                                self.complete(&f, Err(FetchError::TokenStore), now);
                                return;
                            };
                            let call = token_store::write_call(
                                store,
                                &credential,
                                &conn.name,
                                &record_name,
                                &rt,
                                &oc.scopes.join(" "),
                                now / 1000,
                                record.version,
                            );
                            loaded.stats.consent(&self.proxy, ConsentStat::StoreWrites);
                            f.phase = match store.kind {
                                TokenStoreKind::Vault { .. } => Phase::Save {
                                    record,
                                    token,
                                    rereads,
                                },
                                TokenStoreKind::KeyVault { .. } => Phase::Save {
                                    record: Record {
                                        refresh_token: rt,
                                        version: 0,
                                    },
                                    token,
                                    rereads,
                                },
                            };
                            self.send(f, call, now);
                        }
                        // Not rotated: the stored one stays good.
                        _ => self.complete(&f, Ok(token), now),
                    },
                }
            }
            Phase::Save {
                record,
                token,
                rereads,
            } => match token_store::parse_write(&store.kind, status, &body) {
                Ok(Written::Done) => match store.kind {
                    TokenStoreKind::Vault { .. } => self.complete(&f, Ok(token), now),
                    TokenStoreKind::KeyVault { .. } => {
                        let Ok(credential) = self.store_credential(&loaded, store, now, now) else {
                            self.complete(&f, Ok(token), now);
                            return;
                        };
                        let call =
                            self.read_record(&loaded, store, &credential, &conn.name, &record_name);
                        f.phase = Phase::Verify {
                            written: record.refresh_token,
                            token,
                            rereads,
                        };
                        self.send(f, call, now);
                    }
                },
                Ok(Written::Conflict) => self.reread(f, rereads, now),
                Err(e) => {
                    self.proxy.log(
                        Level::Error,
                        &format!(
                            "connection {}: can't store the rotated refresh token in {}: {e}; \
                             the caller may have to consent again",
                            conn.name, store.name
                        ),
                    );
                    self.complete(&f, Err(FetchError::TokenStore), now)
                }
            },
            Phase::Verify {
                written,
                token,
                rereads,
            } => match token_store::parse_read(&store.kind, status, &body) {
                Ok(Some(r)) if r.refresh_token == written => self.complete(&f, Ok(token), now),
                // Another proxy wrote after this one: its token is the current one.
                Ok(Some(r)) if rereads < MAX_REREADS => {
                    loaded
                        .stats
                        .consent(&self.proxy, ConsentStat::StoreConflicts);
                    self.redeem(f, r, rereads + 1, now)
                }
                Ok(Some(_)) => self.complete(&f, Err(FetchError::TokenStore), now),
                Ok(None) => self.complete(&f, Err(FetchError::NoConsent), now),
                // Written, not read back: the token is good.
                Err(_) => self.complete(&f, Ok(token), now),
            },
        }
    }

    /// Redeems a record's refresh token (with private_key_jwt, once the
    /// assertion is signed).
    fn redeem(&mut self, f: Fetch, record: Record, rereads: u8, now: u64) {
        let loaded = f.loaded.clone();
        let Owner::Connection(connection) = f.addr.owner else {
            return;
        };
        let Some(conn) = loaded.config.connection(connection) else {
            return;
        };
        let (Some(ProviderKind::OAuth2(provider)), Credential::OAuth2(oc)) = (
            loaded.config.provider_of(conn).map(|p| &p.kind),
            &conn.credential,
        ) else {
            return;
        };
        if let AuthMethod::PrivateKeyJwt(key) = &provider.auth_method {
            let then = Signed::Redeem { record, rereads };
            if let Sent::Deferred(f) = self.sign_then_request(f, provider, key, then, now) {
                // The identity's token went meanwhile: the fetch starts over
                // (the record is read again) once a new one is there.
                self.deferred.push(*f);
            }
            return;
        }
        let Ok(client) = self.client_credential(&loaded, provider, now, now) else {
            self.complete(&f, Err(FetchError::Dispatch), now);
            return;
        };
        self.send_redeem(f, provider, oc, &client, record, rereads, now);
    }

    /// Sends the redemption of `record`'s refresh token, authenticated by `client`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_redeem(
        &mut self,
        mut f: Fetch,
        provider: &OAuth2Provider,
        oc: &OAuth2Connection,
        client: &ClientCredential,
        record: Record,
        rereads: u8,
        now: u64,
    ) {
        let req = token_request::build(
            provider,
            client,
            oc,
            GrantInput::RefreshToken(&record.refresh_token),
        );
        if let Owner::Connection(c) = f.addr.owner {
            f.loaded.stats.token(&self.proxy, c, TokenStat::Requests);
        }
        f.phase = Phase::Redeem { record, rereads };
        self.send(f, token_call(req), now);
    }

    /// A write another proxy won: read the record again (bounded).
    fn reread(&mut self, mut f: Fetch, rereads: u8, now: u64) {
        let loaded = f.loaded.clone();
        loaded
            .stats
            .consent(&self.proxy, ConsentStat::StoreConflicts);
        let Owner::Connection(connection) = f.addr.owner else {
            return;
        };
        let found = delegated(&loaded, connection)
            .and_then(|(s, per_user)| Some((loaded.config.token_stores.get(s)?, per_user)));
        let (Some((store, per_user)), Some(conn), true) = (
            found,
            loaded.config.connection(connection),
            rereads < MAX_REREADS,
        ) else {
            self.complete(&f, Err(FetchError::TokenStore), now);
            return;
        };
        let Ok(credential) = self.store_credential(&loaded, store, now, now) else {
            self.complete(&f, Err(FetchError::TokenStore), now);
            return;
        };
        let call = self.read_record(
            &loaded,
            store,
            &credential,
            &conn.name,
            &Self::record_of(&f, per_user),
        );
        f.phase = Phase::Record {
            rereads: rereads + 1,
        };
        self.send(f, call, now);
    }

    /// A consent task for paused request `context_id`: run from the next tick.
    pub fn start_task(&mut self, loaded: &Rc<Runtime>, context_id: u32, task: Task, now: u64) {
        let timeout = loaded
            .config
            .token_stores
            .iter()
            .map(|t| t.timeout_ms)
            .max()
            .unwrap_or(5000);
        self.jobs.push(Job {
            context_id,
            loaded: loaded.clone(),
            task,
            step: Step::Start,
            defer_until_ms: now + timeout,
        });
    }

    /// Ends a task with the request's answer.
    fn finish_job(&mut self, job: Job, outcome: Outcome) {
        self.jobs_done.push(Resumed {
            id: job.context_id,
            loaded: job.loaded,
            outcome,
            used: Vec::new(),
        });
    }

    fn job_failed(&mut self, job: Job, status: u32, reason: &'static str) {
        // Discovery still answers: what couldn't be read is "unknown".
        if let TaskKind::Discover {
            body,
            items,
            statuses,
        } = &job.task.kind
        {
            let mut all = statuses.clone();
            all.extend(
                items
                    .iter()
                    .skip(statuses.len())
                    .map(|(i, _, _)| (*i, "unknown")),
            );
            let outcome = request::discovery_with_statuses(&job.loaded.config, body, &all);
            return self.finish_job(job, outcome);
        }
        let name = job.connection_name();
        self.finish_job(
            job,
            request::consent_failed(status, reason, name.as_deref()),
        );
    }

    /// A callback whose code was redeemed failed to keep its refresh token.
    fn job_lost(&mut self, job: Job, status: u32, reason: &'static str) {
        let name = job.connection_name().unwrap_or_default();
        self.finish_job(job, request::consent_lost(status, reason, &name));
    }

    fn send_job(&mut self, job: Job, call: HttpCall) {
        match self.proxy.dispatch(&call) {
            Ok(id) => {
                self.job_calls.insert(id, job);
            }
            Err(e) => {
                self.proxy.log(
                    Level::Error,
                    &format!("consent: can't call cluster {:?}: {e}", call.cluster),
                );
                match &job.step {
                    // The code was not sent: the same callback may come again.
                    Step::Redeem
                    | Step::Sign {
                        then: Then::Code, ..
                    } => self.not_sent(job, Then::Code),
                    // The record is gone already: disconnected, not revoked.
                    Step::Revoke | Step::Sign { .. } => self.not_revoked(job),
                    _ => self.job_failed(job, 503, "token_store"),
                }
            }
        }
    }

    /// Sends a task's next call (or ends it).
    pub(super) fn run_job(&mut self, mut job: Job, now: u64) {
        let loaded = job.loaded.clone();
        let config = &loaded.config;
        let Some(conn) = config.connection(job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let Some((store_i, _)) = delegated(&loaded, job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let Some(store) = config.token_stores.get(store_i) else {
            return self.job_failed(job, 400, "bad_request");
        };
        if let Step::Authenticate { .. } = job.step {
            return self.authenticate(job, now);
        }
        let credential = match self.store_credential(&loaded, store, job.defer_until_ms, now) {
            Ok(c) => c,
            Err(Some(())) => {
                self.jobs.push(job);
                return;
            }
            Err(None) => return self.job_failed(job, 503, "token_store"),
        };
        match (
            &job.task.kind,
            std::mem::replace(&mut job.step, Step::Start),
        ) {
            (
                TaskKind::Connect {
                    nonce, expires_ms, ..
                },
                Step::Start,
            ) => {
                // Each state once per proxy: a replayed callback redeems nothing.
                match self.admit_state(&loaded, nonce, *expires_ms, now) {
                    Ok(()) => {}
                    Err(Replay::Replayed) => return self.job_failed(job, 400, "state_replayed"),
                    Err(Replay::Full) => return self.job_failed(job, 503, "token_store"),
                }
                job.step = Step::Authenticate {
                    then: Then::Code,
                    retried: false,
                };
                self.authenticate(job, now);
            }
            (TaskKind::Connect { .. }, Step::Version { refresh_token }) => {
                let call =
                    self.read_record(&loaded, store, &credential, &conn.name, &job.task.record);
                job.step = Step::Version { refresh_token };
                self.send_job(job, call);
            }
            (TaskKind::Disconnect, Step::Start) => {
                let call =
                    self.read_record(&loaded, store, &credential, &conn.name, &job.task.record);
                job.step = Step::ReadForDisconnect;
                self.send_job(job, call);
            }
            (TaskKind::Discover { .. }, Step::Start) => {
                let call =
                    self.read_record(&loaded, store, &credential, &conn.name, &job.task.record);
                job.step = Step::Status;
                self.send_job(job, call);
            }
            (TaskKind::Disconnect, Step::Delete { refresh_token }) => {
                let call =
                    token_store::delete_call(store, &credential, &conn.name, &job.task.record);
                job.step = Step::Delete { refresh_token };
                self.send_job(job, call);
            }
            _ => self.job_failed(job, 500, "bad_request"),
        }
    }

    /// A task's `Step::Authenticate`: the client's credential for the token
    /// server call `then` (with private_key_jwt, a sign call first).
    fn authenticate(&mut self, mut job: Job, now: u64) {
        let loaded = job.loaded.clone();
        let Step::Authenticate { then, retried } = std::mem::replace(&mut job.step, Step::Start)
        else {
            return self.job_failed(job, 500, "bad_request");
        };
        let Some(conn) = loaded.config.connection(job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let Some(ProviderKind::OAuth2(provider)) = loaded.config.provider_of(conn).map(|p| &p.kind)
        else {
            return self.job_failed(job, 400, "bad_request");
        };
        // No revocation endpoint: nothing to send, nor to sign.
        if let (Then::Revoke { .. }, None) = (&then, &provider.revocation) {
            return self.not_revoked(job);
        }
        if let AuthMethod::PrivateKeyJwt(key) = &provider.auth_method {
            match self.signing_credential(&loaded, conn.provider, key, job.defer_until_ms, now) {
                Ok((credential, identity)) => {
                    let (input, call) =
                        self.sign_call(&loaded, conn.provider, provider, key, &credential, now);
                    job.step = Step::Sign {
                        input,
                        then,
                        identity,
                        retried,
                    };
                    self.send_job(job, call);
                }
                Err(Some(())) => {
                    job.step = Step::Authenticate { then, retried };
                    self.jobs.push(job);
                }
                Err(None) => {
                    let kind = key.service.credential_kind();
                    self.unsigned(&loaded, job.task.connection, kind, kind);
                    self.not_sent(job, then);
                }
            }
            return;
        }
        match self.client_credential(&loaded, provider, job.defer_until_ms, now) {
            Ok(client) => self.send_authenticated(job, then, &client),
            Err(Some(())) => {
                job.step = Step::Authenticate { then, retried };
                self.jobs.push(job);
            }
            Err(None) => self.not_sent(job, then),
        }
    }

    /// Sends a task's token server call, authenticated by `client`.
    fn send_authenticated(&mut self, mut job: Job, then: Then, client: &ClientCredential) {
        let loaded = job.loaded.clone();
        let config = &loaded.config;
        let Some(conn) = config.connection(job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let (Some(ProviderKind::OAuth2(provider)), Credential::OAuth2(oc)) =
            (config.provider_of(conn).map(|p| &p.kind), &conn.credential)
        else {
            return self.job_failed(job, 400, "bad_request");
        };
        match then {
            Then::Code => {
                let (TaskKind::Connect { code, verifier, .. }, Some(consent)) =
                    (&job.task.kind, &config.consent)
                else {
                    return self.job_failed(job, 400, "bad_request");
                };
                let req = token_request::build(
                    provider,
                    client,
                    oc,
                    GrantInput::Code {
                        code,
                        verifier,
                        redirect_uri: &consent.redirect_uri,
                    },
                );
                loaded.stats.consent(&self.proxy, ConsentStat::Redemptions);
                job.step = Step::Redeem;
                self.send_job(job, token_call(req));
            }
            Then::Revoke { refresh_token } => {
                match token_request::revocation(provider, client, &refresh_token) {
                    Some(req) => {
                        job.step = Step::Revoke;
                        self.send_job(job, token_call(req));
                    }
                    None => self.not_revoked(job),
                }
            }
        }
    }

    /// The token server call `then` was not made (no client authentication, or
    /// the host refused the call): a callback fails, its code unspent, so the
    /// same callback may be sent again; a disconnect, whose record is gone
    /// already, answers "not revoked".
    fn not_sent(&mut self, job: Job, then: Then) {
        match then {
            Then::Code => {
                if let TaskKind::Connect { nonce, .. } = &job.task.kind {
                    self.release_state(&job.loaded, nonce);
                }
                self.job_failed(job, 503, "token_server")
            }
            Then::Revoke { .. } => self.not_revoked(job),
        }
    }

    /// A disconnect whose refresh token was not revoked (the record is removed).
    fn not_revoked(&mut self, job: Job) {
        let name = job.connection_name().unwrap_or_default();
        self.finish_job(job, request::consent_disconnected(&name, false));
    }

    /// Records a consent state as used on this proxy.
    fn admit_state(
        &self,
        loaded: &Runtime,
        nonce: &str,
        expires_ms: u64,
        now: u64,
    ) -> Result<(), Replay> {
        let Some(key) = &loaded.used_states_key else {
            return Err(Replay::Full);
        };
        let state = crate::consent::State {
            connection: String::new(),
            caller: String::new(),
            nonce: nonce.to_string(),
            expires_ms,
            return_to: None,
        };
        let outcome = cas::retry(CAS_TRIES, || {
            let Ok(Some((bytes, cas))) = self.proxy.shared_get(key) else {
                return Attempt::Done(Err(Replay::Full));
            };
            let mut used = UsedStates::decode(&bytes);
            if let Err(e) = used.admit(&state, now) {
                return Attempt::Done(Err(e));
            }
            match self.proxy.shared_set(key, &used.encode(), cas) {
                Ok(true) => Attempt::Done(Ok(())),
                Ok(false) => Attempt::Conflict,
                Err(_) => Attempt::Done(Err(Replay::Full)),
            }
        });
        outcome.unwrap_or(Err(Replay::Full))
    }

    /// Forgets that a state was used (its code was never redeemed), so that the
    /// callback can be sent again. Losing this race only means it can't.
    fn release_state(&self, loaded: &Runtime, nonce: &str) {
        let Some(key) = &loaded.used_states_key else {
            return;
        };
        let _ = cas::retry(CAS_TRIES, || {
            let Ok(Some((bytes, cas))) = self.proxy.shared_get(key) else {
                return Attempt::Done(());
            };
            let mut used = UsedStates::decode(&bytes);
            used.0.retain(|(n, _)| n != nonce);
            match self.proxy.shared_set(key, &used.encode(), cas) {
                Ok(false) => Attempt::Conflict,
                _ => Attempt::Done(()),
            }
        });
    }

    /// An answer to one of a task's calls.
    pub(super) fn on_job_answer(
        &mut self,
        mut job: Job,
        status: Option<u32>,
        body: Option<Vec<u8>>,
        now: u64,
    ) {
        let loaded = job.loaded.clone();
        let config = &loaded.config;
        let body = body.unwrap_or_default();
        let Some(conn) = config.connection(job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let Some((store_i, _)) = delegated(&loaded, job.task.connection) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let Some(store) = config.token_stores.get(store_i) else {
            return self.job_failed(job, 400, "bad_request");
        };
        let m = &loaded.stats;
        let log = |p: &P, level: Level, what: String| {
            p.log(level, &format!("connection {}: {what}", conn.name))
        };
        match std::mem::replace(&mut job.step, Step::Start) {
            Step::Start | Step::Authenticate { .. } => {}
            Step::Sign {
                input,
                then,
                identity,
                retried,
            } => {
                let Some(ProviderKind::OAuth2(op)) = config.provider_of(conn).map(|p| &p.kind)
                else {
                    return self.job_failed(job, 400, "bad_request");
                };
                let AuthMethod::PrivateKeyJwt(key) = &op.auth_method else {
                    return self.job_failed(job, 400, "bad_request");
                };
                let may_retry = !retried && identity.is_some();
                match Self::signature_answer(key, &input, status, &body, may_retry) {
                    SignAnswer::Signed(client) => self.send_authenticated(job, then, &client),
                    SignAnswer::Again => {
                        if let Some(refused) = &identity {
                            self.drop_refused(&loaded, refused, now);
                        }
                        job.defer_until_ms = now
                            + identity
                                .and_then(|u| Self::entry(&loaded, u.addr.owner, None))
                                .map_or(5000, |(_, p)| p.fetch_timeout_ms);
                        job.step = Step::Authenticate {
                            then,
                            retried: true,
                        };
                        self.jobs.push(job);
                    }
                    SignAnswer::Failed(e) => {
                        self.unsigned(&loaded, job.task.connection, e.kind(), &e.to_string());
                        self.not_sent(job, then);
                    }
                }
            }
            Step::Status => {
                let status = match token_store::parse_read(&store.kind, status, &body) {
                    Ok(Some(_)) => "connected",
                    Ok(None) => "consent_required",
                    Err(e) => {
                        log(
                            &self.proxy,
                            Level::Warn,
                            format!("discovery: token store {} read failed: {e}", store.name),
                        );
                        "unknown"
                    }
                };
                let connection = job.task.connection;
                let TaskKind::Discover {
                    body,
                    items,
                    statuses,
                } = &mut job.task.kind
                else {
                    return self.job_failed(job, 500, "bad_request");
                };
                statuses.push((connection, status));
                match items.get(statuses.len()).cloned() {
                    Some((next, record, caller)) => {
                        job.task.connection = next;
                        job.task.record = record;
                        job.task.caller = caller;
                        self.run_job(job, now);
                    }
                    None => {
                        let outcome = request::discovery_with_statuses(config, body, statuses);
                        self.finish_job(job, outcome);
                    }
                }
            }
            Step::Redeem => match token_response::parse(status, &body, 300_000) {
                Ok(t) => match t.refresh_token {
                    Some(rt) => {
                        job.step = Step::Version { refresh_token: rt };
                        self.run_job(job, now);
                    }
                    None => {
                        log(
                            &self.proxy,
                            Level::Warn,
                            "consent: the token server gave no refresh token".into(),
                        );
                        self.job_lost(job, 502, "no_refresh_token")
                    }
                },
                // The gateway's own client was refused: its configuration, not
                // the person's code.
                Err(FetchError::OAuth { code, .. })
                    if code == "invalid_client" || code == "unauthorized_client" =>
                {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!("consent: the token server refused the gateway's client ({code}): check client_id and its authentication"),
                    );
                    self.job_failed(job, 502, "token_server")
                }
                Err(FetchError::OAuth { code, status }) if (400..500).contains(&status) => {
                    log(
                        &self.proxy,
                        Level::Info,
                        format!("consent: the code was refused ({code})"),
                    );
                    self.job_failed(job, 400, "code_rejected")
                }
                Err(e) => {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!("consent: code redemption failed: {e}"),
                    );
                    // The code wasn't redeemed: the same callback may be sent again.
                    if let TaskKind::Connect { nonce, .. } = &job.task.kind {
                        self.release_state(&loaded, nonce);
                    }
                    self.job_failed(job, 503, "token_server")
                }
            },
            Step::Version { refresh_token } => {
                let version = match token_store::parse_version(&store.kind, status, &body) {
                    Ok(v) => v,
                    Err(e) => {
                        log(
                            &self.proxy,
                            Level::Warn,
                            format!("consent: token store {} read failed: {e}", store.name),
                        );
                        return self.job_lost(job, 503, "token_store");
                    }
                };
                let Ok(credential) = self.store_credential(&loaded, store, now, now) else {
                    return self.job_lost(job, 503, "token_store");
                };
                let scopes = match &conn.credential {
                    Credential::OAuth2(o) => o.scopes.join(" "),
                    _ => String::new(),
                };
                let call = token_store::write_call(
                    store,
                    &credential,
                    &conn.name,
                    &job.task.record,
                    &refresh_token,
                    &scopes,
                    now / 1000,
                    version,
                );
                m.consent(&self.proxy, ConsentStat::StoreWrites);
                job.step = Step::Write;
                self.send_job(job, call);
            }
            Step::Write => match token_store::parse_write(&store.kind, status, &body) {
                Ok(Written::Done) => {
                    m.consent(&self.proxy, ConsentStat::Completed);
                    self.forget_consent(
                        &loaded,
                        job.task.connection,
                        job.task.caller.as_ref(),
                        now,
                    );
                    log(&self.proxy, Level::Info, "consent stored".into());
                    let return_to = match &job.task.kind {
                        TaskKind::Connect { return_to, .. } => return_to.clone(),
                        TaskKind::Disconnect | TaskKind::Discover { .. } => None,
                    };
                    let outcome = request::consent_connected(&conn.name, return_to);
                    self.finish_job(job, outcome);
                }
                Ok(Written::Conflict) => {
                    m.consent(&self.proxy, ConsentStat::StoreConflicts);
                    self.job_lost(job, 503, "store_conflict")
                }
                Err(e) => {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!("consent: token store {} write failed: {e}", store.name),
                    );
                    self.job_lost(job, 503, "token_store")
                }
            },
            Step::ReadForDisconnect => match token_store::parse_read(&store.kind, status, &body) {
                Ok(r) => {
                    job.step = Step::Delete {
                        refresh_token: r.map(|r| r.refresh_token),
                    };
                    self.run_job(job, now);
                }
                Err(e) => {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!("disconnect: token store {} read failed: {e}", store.name),
                    );
                    self.job_failed(job, 503, "token_store")
                }
            },
            Step::Delete { refresh_token } => match token_store::parse_delete(status, &body) {
                Ok(()) => {
                    m.consent(&self.proxy, ConsentStat::Disconnects);
                    self.forget_consent(
                        &loaded,
                        job.task.connection,
                        job.task.caller.as_ref(),
                        now,
                    );
                    match refresh_token {
                        Some(refresh_token) => {
                            job.step = Step::Authenticate {
                                then: Then::Revoke { refresh_token },
                                retried: false,
                            };
                            self.authenticate(job, now);
                        }
                        None => self.not_revoked(job),
                    }
                }
                Err(e) => {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!("disconnect: token store {} delete failed: {e}", store.name),
                    );
                    self.job_failed(job, 503, "token_store")
                }
            },
            Step::Revoke => {
                // RFC 7009 §2.2: 200 whether or not the token was valid.
                let revoked = status == Some(200);
                if revoked {
                    m.consent(&self.proxy, ConsentStat::Revocations);
                } else {
                    log(
                        &self.proxy,
                        Level::Warn,
                        format!(
                            "disconnect: revocation answered {status:?}; the record is removed"
                        ),
                    );
                }
                let outcome = request::consent_disconnected(&conn.name, revoked);
                self.finish_job(job, outcome);
            }
        }
    }

    /// A consent was given or taken back: this proxy's cached token for it goes
    /// (and every worker's copy, for a shared connection).
    fn forget_consent(
        &mut self,
        loaded: &Rc<Runtime>,
        connection: usize,
        caller: Option<&Secret>,
        now: u64,
    ) {
        let Some(slot) = loaded.tokens.get(connection).and_then(Option::as_ref) else {
            return;
        };
        let Some(addr) = slot.addr(connection, caller) else {
            return;
        };
        let _ = cas::retry(CAS_TRIES, || {
            let Ok((_, stored)) = load(&self.proxy, &addr) else {
                return Attempt::Done(());
            };
            match store(&self.proxy, loaded, &addr, stored, &CacheState::Empty, now) {
                Ok(false) => Attempt::Conflict,
                _ => Attempt::Done(()),
            }
        });
        // Every worker's copies go before a request uses one again.
        loaded.drop_token_copies();
        bump_generation(&self.proxy);
    }
}

impl<P: Proxy> Broker<P> {
    /// A token store read, counted (`latchkey.consent.store_reads`).
    fn read_record(
        &self,
        loaded: &Runtime,
        store: &TokenStore,
        credential: &Secret,
        connection: &str,
        record: &str,
    ) -> HttpCall {
        loaded.stats.consent(&self.proxy, ConsentStat::StoreReads);
        token_store::read_call(store, credential, connection, record)
    }
}
