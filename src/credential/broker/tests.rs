//! The broker natively, over an in-memory proxy: each credential kind's call
//! and answer, the shared cache across two "workers" (two brokers on one shared
//! data), a paused request resumed or refused, a refresh an upstream 401 starts.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::json;

use super::*;
use crate::config::Config;
use crate::proxy::MetricKind;

/// Shared data, calls, logs and stats in memory. Two brokers given clones of
/// one `Shared` see one proxy's shared data, as two workers do.
/// Shared data: value and CAS per key.
type SharedMap = Rc<RefCell<HashMap<String, (Vec<u8>, u32)>>>;

#[derive(Default, Clone)]
struct Fake {
    shared: SharedMap,
    calls: Rc<RefCell<Vec<(u32, HttpCall)>>>,
    next_id: Rc<Cell<u32>>,
    logs: Rc<RefCell<Vec<(Level, String)>>>,
    stats: Rc<RefCell<Vec<String>>>,
    counts: Rc<RefCell<HashMap<u32, u64>>>,
    refuse_dispatch: Rc<Cell<bool>>,
    /// Shared-data reads so far.
    gets: Rc<Cell<usize>>,
    /// Compare-and-set writes to refuse, as if another worker wrote first.
    conflicts: Rc<Cell<u32>>,
}

impl Proxy for Fake {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostFault> {
        self.gets.set(self.gets.get() + 1);
        Ok(self.shared.borrow().get(key).cloned())
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, HostFault> {
        let mut m = self.shared.borrow_mut();
        let current = m.get(key).map_or(0, |(_, c)| *c);
        if cas != 0 && cas != current {
            return Ok(false);
        }
        if cas != 0 && self.conflicts.get() > 0 {
            self.conflicts.set(self.conflicts.get() - 1);
            return Ok(false);
        }
        m.insert(key.to_string(), (value.to_vec(), current + 1));
        Ok(true)
    }

    fn dispatch(&self, call: &HttpCall) -> Result<u32, HostFault> {
        if self.refuse_dispatch.get() {
            return Err(HostFault(2));
        }
        let id = self.next_id.get() + 1;
        self.next_id.set(id);
        self.calls.borrow_mut().push((id, call.clone()));
        Ok(id)
    }

    fn log(&self, level: Level, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }

    fn log_enabled(&self, _level: Level) -> bool {
        true
    }

    fn define(&self, _kind: MetricKind, name: &str) -> Option<u32> {
        let mut s = self.stats.borrow_mut();
        s.push(name.to_string());
        Some(s.len() as u32 - 1)
    }

    fn count(&self, id: Option<u32>) {
        if let Some(id) = id {
            *self.counts.borrow_mut().entry(id).or_insert(0) += 1;
        }
    }

    fn record(&self, id: Option<u32>, value: u64) {
        if let Some(id) = id {
            self.counts.borrow_mut().insert(id, value);
        }
    }
}

impl Fake {
    fn stat(&self, name: &str) -> u64 {
        let stats = self.stats.borrow();
        let Some(i) = stats.iter().position(|n| n == name) else {
            return 0;
        };
        self.counts.borrow().get(&(i as u32)).copied().unwrap_or(0)
    }

    fn take_calls(&self) -> Vec<(u32, HttpCall)> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    fn logged(&self, part: &str) -> bool {
        self.logs.borrow().iter().any(|(_, m)| m.contains(part))
    }
}

fn header<'a>(call: &'a HttpCall, name: &str) -> Option<&'a str> {
    call.headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

fn config() -> Config {
    let v = json!({
        "secrets": {
            "cs": { "inline": "client-secret-1" },
            "rt": { "inline": "rt-configured" },
            "kv_secret": { "azure_key_vault": "https://kv.vault.azure.net/secrets/partner",
                           "cluster": "keyvault", "identity": "kv_reader", "refresh_s": 60 },
            "vault_secret": { "vault": { "cluster": "vault", "url": "http://vault:8200",
                                         "mount": "secret", "path": "orders", "field": "key",
                                         "approle": { "role_id": "role-1", "secret_id": "cs" } } }
        },
        "providers": {
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp.test/token",
                     "client_id": "gw", "client_secret": "cs", "drop_on_401_after_s": 0 },
            "mi": { "type": "azure_managed_identity", "cluster": "imds" },
            "keys": { "type": "api_key" }
        },
        "connections": {
            "orders": { "provider": "idp", "grant": "client_credentials", "scopes": ["orders.read"],
                        "access": { "public": true } },
            "rotating": { "provider": "idp", "grant": "refresh_token", "refresh_token": "rt",
                          "access": { "public": true } },
            "obo": { "provider": "idp", "grant": "token_exchange",
                     "access": { "authenticated": true } },
            "backend": { "provider": "mi", "resource": "api://backend-app",
                         "access": { "public": true } },
            "kv_reader": { "provider": "mi", "resource": "https://vault.azure.net" },
            "partner": { "provider": "keys", "api_key": "kv_secret", "access": { "public": true } },
            "vaulted": { "provider": "keys", "api_key": "vault_secret", "access": { "public": true } }
        },
        "routes": [ { "name": "orders", "match": { "path_prefix": "/orders" },
                      "inject": [ { "connections": ["orders"], "header": "authorization" } ] } ]
    });
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn setup() -> (Broker<Fake>, Rc<Runtime>) {
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, config(), "test"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    (b, loaded)
}

fn conn(loaded: &Runtime, name: &str) -> usize {
    loaded
        .config
        .connections
        .iter()
        .position(|c| c.name == name)
        .unwrap()
}

fn token_answer(token: &str, extra: serde_json::Value) -> Vec<u8> {
    let mut v = json!({ "access_token": token, "token_type": "Bearer", "expires_in": 3600 });
    if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    v.to_string().into_bytes()
}

fn ready(r: Resolution) -> Vec<EntryCredential> {
    match r {
        Resolution::Ready(c) => c,
        Resolution::Wait { .. } => panic!("waits"),
        Resolution::Reject { .. } => panic!("rejected"),
    }
}

/// Connection "orders" with its first token ("at-1") fetched (asked at 0 ms, sent
/// at 1, answered at 2) and resolved at 3 ms: the connection and its credentials.
fn orders_with_token(b: &mut Broker<Fake>, loaded: &Rc<Runtime>) -> (usize, Vec<EntryCredential>) {
    let c = conn(loaded, "orders");
    let _ = b.resolve(loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    let (id, _) = b.proxy.take_calls()[0].clone();
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 2);
    (
        c,
        ready(b.resolve(loaded, &[c], Who::default(), 3, true).unwrap()),
    )
}

fn waits(r: &Resolution) -> bool {
    matches!(r, Resolution::Wait { .. })
}

#[test]
fn a_client_credentials_token_is_fetched_once_sent_as_built_and_cached() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "orders");
    let r = b
        .resolve(&loaded, &[c], Who::default(), 1_000, true)
        .unwrap();
    assert!(waits(&r));
    // A second request on the other worker waits for the same fetch.
    let mut other = Broker::new(b.proxy.clone());
    assert!(waits(
        &other
            .resolve(&loaded, &[c], Who::default(), 1_001, true)
            .unwrap()
    ));
    assert_eq!(other.wanted_tick_ms(), IDLE_MS);
    assert_eq!(b.wanted_tick_ms(), KICK_MS);
    b.dispatch_due(1_002);
    other.dispatch_due(1_002);
    let calls = b.proxy.take_calls();
    assert_eq!(calls.len(), 1, "one fetch for both workers");
    let (id, call) = &calls[0];
    assert_eq!(call.cluster, "idp");
    assert_eq!(header(call, ":method"), Some("POST"));
    assert_eq!(header(call, ":path"), Some("/token"));
    assert_eq!(header(call, ":authority"), Some("idp.test"));
    assert_eq!(
        call.body.as_ref().unwrap().expose(),
        "grant_type=client_credentials&scope=orders.read"
    );
    assert!(b.awaits(*id));
    let generation = b.proxy.shared_get(COPY_GENERATION).unwrap();
    b.on_answer(*id, Some(200), Some(token_answer("at-1", json!({}))), 1_050);
    // An ordinary fetch leaves other workers' copies alone.
    assert_eq!(b.proxy.shared_get(COPY_GENERATION).unwrap(), generation);
    assert!(!b.awaits(*id));
    let creds = ready(
        other
            .resolve(&loaded, &[c], Who::default(), 1_060, true)
            .unwrap(),
    );
    assert_eq!(creds[0].secret.expose(), "at-1");
    assert_eq!(creds[0].default_prefix, "Bearer ");
    assert_eq!(b.proxy.stat("latchkey.connection.orders.token.requests"), 1);
    assert_eq!(b.proxy.stat("latchkey.connection.orders.token.success"), 1);
    assert_eq!(
        b.proxy.stat("latchkey.connection.orders.token.cache_hit"),
        1
    );
    assert_eq!(b.proxy.stat("latchkey.connection.orders.token.state"), 2);
    // No secret in any log line.
    assert!(!b
        .proxy
        .logs
        .borrow()
        .iter()
        .any(|(_, m)| m.contains("at-1") || m.contains("client-secret-1")));
}

fn waiter(loaded: &Rc<Runtime>, c: usize, deadline_ms: u64, keys: Vec<String>) -> Waiter {
    Waiter {
        loaded: loaded.clone(),
        needed: Needed {
            route: 0,
            picks: vec![c],
            subject: None,
            caller: None,
            edits: Vec::new(),
        },
        deadline_ms,
        sent: vec!["authorization".into()],
        path: b"/orders/1".to_vec(),
        keys,
        seen: Vec::new(),
    }
}

fn keys_of(r: Resolution) -> (u64, Vec<String>) {
    match r {
        Resolution::Wait { deadline_ms, keys } => (deadline_ms, keys),
        _ => panic!("not waiting"),
    }
}

#[test]
fn a_paused_request_resumes_with_the_token_once_its_key_moves() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "orders");
    let (deadline, keys) = keys_of(b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap());
    assert_eq!(deadline, 5_000);
    assert_eq!(keys.len(), 1);
    b.wait(7, waiter(&loaded, c, deadline, keys));
    assert_eq!(b.paused(), 1);
    b.prefetch_due = false; // (this configuration's stores are not this test's)
    assert_eq!(b.wanted_tick_ms(), KICK_MS);
    b.dispatch_due(1);
    assert_eq!(b.wanted_tick_ms(), POLL_MS);
    // Nothing moved: no outcome yet.
    assert!(b.due_waiters(2).is_empty());
    let (id, _) = b.proxy.take_calls()[0].clone();
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 10);
    let resumed = b.due_waiters(11);
    assert_eq!(resumed.len(), 1);
    let r = &resumed[0];
    assert_eq!(r.id, 7);
    assert_eq!(r.outcome.verdict, crate::request::Verdict::Allowed);
    assert!(r.outcome.edits.iter().any(|e| matches!(e,
        crate::inject::Edit::Set { name, value } if &**name == "authorization" && value.expose() == "Bearer at-1")));
    assert_eq!(r.used.len(), 1, "the token it carries, for an upstream 401");
    assert_eq!(b.paused(), 0);
    assert_eq!(b.wanted_tick_ms(), IDLE_MS);
}

#[test]
fn a_failed_fetch_refuses_the_paused_request_and_backs_off() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "orders");
    let (deadline, keys) = keys_of(b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap());
    b.wait(3, waiter(&loaded, c, deadline, keys));
    b.dispatch_due(1);
    let (id, _) = b.proxy.take_calls()[0].clone();
    b.on_answer(id, Some(500), Some(b"oops".to_vec()), 20);
    let resumed = b.due_waiters(21);
    assert_eq!(resumed.len(), 1);
    let o = &resumed[0].outcome;
    assert_eq!(o.verdict, crate::request::Verdict::Unavailable);
    let reply = o.reply.as_ref().unwrap();
    assert_eq!(reply.status, 503);
    assert!(reply.body.contains(r#""connection":"orders""#));
    assert!(b
        .proxy
        .logged("connection orders: token fetch failed: status"));
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.orders.token.failure.status"),
        1
    );
    // Backing off: the next request is refused at once, with no call.
    match b.resolve(&loaded, &[c], Who::default(), 30, true).unwrap() {
        Resolution::Reject {
            connection,
            retry_after_ms,
            consent_required: false,
        } => {
            assert_eq!(connection, c);
            assert!(retry_after_ms > 0 && retry_after_ms <= 1000);
        }
        _ => panic!("not rejected"),
    }
    b.dispatch_due(31);
    assert!(b.proxy.take_calls().is_empty());
}

#[test]
fn a_paused_request_past_its_deadline_is_refused() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "orders");
    let (deadline, keys) = keys_of(b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap());
    b.wait(9, waiter(&loaded, c, deadline, keys));
    b.dispatch_due(1);
    assert!(b.due_waiters(deadline - 1).is_empty());
    let resumed = b.due_waiters(deadline);
    assert_eq!(
        resumed[0].outcome.verdict,
        crate::request::Verdict::Unavailable
    );
    // A dispatch the host refuses fails the fetch at once.
    let (mut b, loaded) = setup();
    b.proxy.refuse_dispatch.set(true);
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap()
    ));
    b.dispatch_due(1);
    assert!(b
        .proxy
        .logged("connection orders: can't call cluster \"idp\": BadArgument"));
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.orders.token.failure.dispatch"),
        1
    );
}

#[test]
fn a_managed_identity_token_is_asked_of_imds_with_the_resource_encoded() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "backend");
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap()
    ));
    b.dispatch_due(1);
    let (id, call) = b.proxy.take_calls()[0].clone();
    assert_eq!(call.cluster, "imds");
    assert_eq!(header(&call, ":method"), Some("GET"));
    assert_eq!(
        header(&call, ":path"),
        Some("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=api%3A%2F%2Fbackend-app")
    );
    assert_eq!(header(&call, "metadata"), Some("true"));
    // IMDS sends expires_in as a string.
    let answer = json!({ "access_token": "mi-1", "token_type": "Bearer", "expires_in": "3599" });
    b.on_answer(id, Some(200), Some(answer.to_string().into_bytes()), 5);
    let creds = ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap());
    assert_eq!(creds[0].secret.expose(), "mi-1");
}

#[test]
fn a_key_vault_value_waits_for_its_identity_token_then_is_read_and_copied() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "partner");
    b.on_tick(Some(&loaded), 0); // prefetch: every store read starts
    let r = b.resolve(&loaded, &[c], Who::default(), 1, true).unwrap();
    assert!(waits(&r));
    b.dispatch_due(2);
    // First the identity token (the read is deferred until it comes).
    let calls = b.proxy.take_calls();
    let imds: Vec<&(u32, HttpCall)> = calls.iter().filter(|(_, c)| c.cluster == "imds").collect();
    assert_eq!(imds.len(), 1);
    assert!(header(&imds[0].1, ":path")
        .unwrap()
        .contains("resource=https%3A%2F%2Fvault.azure.net"));
    b.on_answer(
        imds[0].0,
        Some(200),
        Some(token_answer("kv-token", json!({}))),
        3,
    );
    b.dispatch_due(4);
    let calls = b.proxy.take_calls();
    let kv: Vec<&(u32, HttpCall)> = calls
        .iter()
        .filter(|(_, c)| c.cluster == "keyvault")
        .collect();
    assert_eq!(kv.len(), 1);
    let call = &kv[0].1;
    assert_eq!(header(call, ":authority"), Some("kv.vault.azure.net"));
    assert_eq!(
        header(call, ":path"),
        Some("/secrets/partner?api-version=7.4")
    );
    assert_eq!(call.secret_headers[0].1.expose(), "Bearer kv-token");
    let answer =
        json!({ "value": "pk-from-kv", "id": "https://kv.vault.azure.net/secrets/partner/v1" });
    b.on_answer(kv[0].0, Some(200), Some(answer.to_string().into_bytes()), 5);
    let creds = ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap());
    assert_eq!(creds[0].secret.expose(), "pk-from-kv");
    assert_eq!(creds[0].default_prefix, "");
    // This VM keeps a copy: the next request needs no clock.
    assert_eq!(
        loaded.store_value(0).map(|s| s.expose().to_string()),
        Some("pk-from-kv".into())
    );
    assert!(b.proxy.logged("secret kv_secret: read version \"v1\""));
    assert_eq!(b.proxy.stat("latchkey.secret.kv_secret.success"), 1);
}

#[test]
fn a_key_vault_401_drops_the_identity_token_and_reads_once_more() {
    let (mut b, loaded) = setup();
    b.on_tick(Some(&loaded), 0);
    b.dispatch_due(0); // the identity token's fetch, queued by the read
    let calls = b.proxy.take_calls();
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(
        imds.0,
        Some(200),
        Some(token_answer("old-kv-token", json!({}))),
        1,
    );
    b.dispatch_due(2);
    let kv = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "keyvault")
        .unwrap();
    assert_eq!(kv.1.secret_headers[0].1.expose(), "Bearer old-kv-token");
    b.on_answer(kv.0, Some(401), Some(b"{}".to_vec()), 3);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.kv_reader.token.dropped_on_401"),
        1
    );
    // The read again needs a new identity token first: two ticks.
    b.dispatch_due(4);
    b.dispatch_due(4);
    let calls = b.proxy.take_calls();
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(
        imds.0,
        Some(200),
        Some(token_answer("new-kv-token", json!({}))),
        5,
    );
    b.dispatch_due(6);
    let kv = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "keyvault")
        .unwrap();
    assert_eq!(kv.1.secret_headers[0].1.expose(), "Bearer new-kv-token");
}

#[test]
fn a_vault_value_is_read_after_an_approle_login() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "vaulted");
    b.on_tick(Some(&loaded), 0);
    let _ = b.resolve(&loaded, &[c], Who::default(), 1, true).unwrap();
    b.dispatch_due(2);
    let calls = b.proxy.take_calls();
    let login = calls
        .iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap()
        .clone();
    assert_eq!(header(&login.1, ":method"), Some("POST"));
    assert_eq!(header(&login.1, ":path"), Some("/v1/auth/approle/login"));
    let body: serde_json::Value =
        serde_json::from_str(login.1.body.as_ref().unwrap().expose()).unwrap();
    assert_eq!(
        body,
        json!({ "role_id": "role-1", "secret_id": "client-secret-1" })
    );
    let answer = json!({ "auth": { "client_token": "hvs.login", "lease_duration": 3600 } });
    b.on_answer(login.0, Some(200), Some(answer.to_string().into_bytes()), 3);
    assert_eq!(b.proxy.stat("latchkey.secret.vault_secret.logins"), 1);
    b.dispatch_due(4);
    let read = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap();
    assert_eq!(header(&read.1, ":path"), Some("/v1/secret/data/orders"));
    assert_eq!(read.1.secret_headers[0].1.expose(), "hvs.login");
    let answer =
        json!({ "data": { "data": { "key": "vault-value" }, "metadata": { "version": 3 } } });
    b.on_answer(read.0, Some(200), Some(answer.to_string().into_bytes()), 5);
    let creds = ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap());
    assert_eq!(creds[0].secret.expose(), "vault-value");
}

#[test]
fn a_rotated_refresh_token_is_kept_and_used_next() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "rotating");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    let (id, call) = b.proxy.take_calls()[0].clone();
    assert_eq!(
        call.body.as_ref().unwrap().expose(),
        "grant_type=refresh_token&refresh_token=rt-configured"
    );
    b.on_answer(
        id,
        Some(200),
        Some(token_answer("at-1", json!({ "refresh_token": "rt-2" }))),
        2,
    );
    let creds = ready(b.resolve(&loaded, &[c], Who::default(), 3, true).unwrap());
    // The upstream refuses it: a refresh starts (the window is 0 here), with rt-2.
    b.on_upstream_401(&loaded, &EntryCredential::tokens(&creds), 4);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.rotating.token.dropped_on_401"),
        1
    );
    b.dispatch_due(5);
    let (id, call) = b.proxy.take_calls()[0].clone();
    assert_eq!(
        call.body.as_ref().unwrap().expose(),
        "grant_type=refresh_token&refresh_token=rt-2"
    );
    // Meanwhile the old token serves.
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap())[0]
            .secret
            .expose(),
        "at-1"
    );
    let generation = b.proxy.shared_get(COPY_GENERATION).unwrap().map(|(_, c)| c);
    b.on_answer(id, Some(200), Some(token_answer("at-2", json!({}))), 7);
    // Installed: every worker's copy of the refused token goes.
    assert_ne!(
        b.proxy.shared_get(COPY_GENERATION).unwrap().map(|(_, c)| c),
        generation
    );
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 8, true).unwrap())[0]
            .secret
            .expose(),
        "at-2"
    );
    // A second 401, to a token that is no longer the cached one, is ignored.
    b.on_upstream_401(&loaded, &EntryCredential::tokens(&creds), 9);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.rotating.token.ignored_401"),
        1
    );
}

#[test]
fn token_exchange_is_cached_per_subject_and_sends_the_subject_token() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "obo");
    let alice = Secret::new("a.alice.s");
    let bob = Secret::new("b.bob.s");
    assert!(waits(
        &b.resolve(
            &loaded,
            &[c],
            Who {
                subject: Some(&alice),
                caller: None
            },
            0,
            true
        )
        .unwrap()
    ));
    assert!(waits(
        &b.resolve(
            &loaded,
            &[c],
            Who {
                subject: Some(&bob),
                caller: None
            },
            0,
            true
        )
        .unwrap()
    ));
    b.dispatch_due(1);
    let calls = b.proxy.take_calls();
    assert_eq!(calls.len(), 2, "one exchange per caller");
    for (i, (id, call)) in calls.iter().enumerate() {
        let body = call.body.as_ref().unwrap().expose();
        let subject = if i == 0 { "a.alice.s" } else { "b.bob.s" };
        assert!(body.contains(&format!("subject_token={subject}")), "{body}");
        assert!(body
            .starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"));
        b.on_answer(
            *id,
            Some(200),
            Some(token_answer(&format!("x-{i}"), json!({}))),
            2,
        );
    }
    assert_eq!(
        ready(
            b.resolve(
                &loaded,
                &[c],
                Who {
                    subject: Some(&alice),
                    caller: None
                },
                3,
                true
            )
            .unwrap()
        )[0]
        .secret
        .expose(),
        "x-0"
    );
    assert_eq!(
        ready(
            b.resolve(
                &loaded,
                &[c],
                Who {
                    subject: Some(&bob),
                    caller: None
                },
                3,
                true
            )
            .unwrap()
        )[0]
        .secret
        .expose(),
        "x-1"
    );
    // Without a subject token there is nothing to exchange: refused.
    assert!(matches!(
        b.resolve(&loaded, &[c], Who::default(), 4, true).unwrap(),
        Resolution::Reject { .. }
    ));
}

#[test]
fn a_token_copy_serves_without_shared_reads_until_a_worker_replaces_it() {
    let (mut b, loaded) = setup();
    let (c, _) = orders_with_token(&mut b, &loaded);
    assert!(loaded.has_token_copy(c));
    // Another worker's write of the generation drops this VM's copies.
    b.proxy.shared_set(COPY_GENERATION, b"", 0).unwrap();
    loaded.check_copy_generation(&b.proxy);
    assert!(!loaded.has_token_copy(c));
    // The tick takes a new copy from the shared cache.
    b.on_tick(Some(&loaded), 2_000);
    ready(
        b.resolve(&loaded, &[c], Who::default(), 2_001, true)
            .unwrap(),
    );
    assert!(loaded.has_token_copy(c));
}

/// A configuration whose client secret and refresh token are read from Vault
/// (token auth), re-read every 60 s.
fn stored_secrets_config() -> Config {
    let v = json!({
        "secrets": {
            "vault_token": { "inline": "hvs.static" },
            "cs": { "vault": { "cluster": "vault", "url": "http://vault:8200", "mount": "secret",
                               "path": "idp", "field": "client_secret", "token": "vault_token" },
                    "refresh_s": 60 },
            "rt": { "vault": { "cluster": "vault", "url": "http://vault:8200", "mount": "secret",
                               "path": "idp-consent", "field": "refresh_token", "token": "vault_token" },
                    "refresh_s": 60 }
        },
        "providers": {
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp.test/token",
                     "client_id": "gw", "client_secret": "cs" }
        },
        "connections": {
            "rotating": { "provider": "idp", "grant": "refresh_token", "refresh_token": "rt",
                          "access": { "public": true } }
        },
        "routes": []
    });
    Config::parse(v.to_string().as_bytes(), &|_| None).unwrap()
}

fn vault_answer(field: &str, value: &str, version: u64) -> Vec<u8> {
    json!({ "data": { "data": { field: value }, "metadata": { "version": version } } })
        .to_string()
        .into_bytes()
}

/// Answers every call sent so far, all Vault reads of one path: each answer
/// holds both fields, and each store takes its own.
/// Answers every call sent so far, all Vault reads: the client secret at
/// version 1, the refresh token `rt` at `rt_version`.
fn answer_vault_reads(b: &mut Broker<Fake>, rt_version: u64, rt: &str, now: u64) {
    for (id, call) in b.proxy.take_calls() {
        assert_eq!(call.cluster, "vault");
        assert_eq!(call.secret_headers[0].1.expose(), "hvs.static");
        let body = match header(&call, ":path") {
            Some("/v1/secret/data/idp") => vault_answer("client_secret", "cs-1", 1),
            Some("/v1/secret/data/idp-consent") => vault_answer("refresh_token", rt, rt_version),
            other => panic!("unexpected read of {other:?}"),
        };
        b.on_answer(id, Some(200), Some(body), now);
    }
}

#[test]
fn a_token_fetch_waits_for_its_client_secret_and_refresh_token_from_a_store() {
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, stored_secrets_config(), "t"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    assert_eq!(b.wanted_tick_ms(), KICK_MS);
    let c = conn(&loaded, "rotating");
    // The request waits on the two stores first.
    let (_, keys) = keys_of(b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap());
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.starts_with("latchkey.v1.t.sec.")));
    b.dispatch_due(1);
    answer_vault_reads(&mut b, 1, "rt-from-vault", 2);
    assert_eq!(b.proxy.stat("latchkey.secret.cs.success"), 1);
    assert_eq!(b.proxy.stat("latchkey.secret.rt.success"), 1);
    // Now the token request, with both.
    assert!(waits(
        &b.resolve(&loaded, &[c], Who::default(), 3, true).unwrap()
    ));
    b.dispatch_due(4);
    let (id, call) = b.proxy.take_calls()[0].clone();
    assert_eq!(call.cluster, "idp");
    assert_eq!(
        call.body.as_ref().unwrap().expose(),
        "grant_type=refresh_token&refresh_token=rt-from-vault"
    );
    assert_eq!(
        call.secret_headers[0].1.expose(),
        format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "gw:cs-1")
        )
    );
    b.on_answer(
        id,
        Some(200),
        Some(token_answer(
            "at-1",
            json!({ "refresh_token": "rt-rotated" }),
        )),
        5,
    );
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 6, true).unwrap())[0]
            .secret
            .expose(),
        "at-1"
    );
    // A new refresh token in the store (re-consented) makes the rotated one stale:
    // the next refresh uses the store's.
    b.on_tick(Some(&loaded), 61_000);
    b.dispatch_due(61_001);
    answer_vault_reads(&mut b, 2, "rt-reconsented", 61_002);
    assert!(b.proxy.logged("secret rt: new version \"2\" (was \"1\")"));
    assert_eq!(b.proxy.stat("latchkey.secret.rt.version_changes"), 1);
    assert_eq!(b.proxy.stat("latchkey.secret.cs.version_changes"), 0);
    // The token's own refresh is due (3600 s token, refreshed at half life): the
    // tick drops this VM's copy first, then a request starts the refresh.
    b.on_tick(Some(&loaded), 1_799_000);
    let _ = b
        .resolve(&loaded, &[c], Who::default(), 1_800_010, true)
        .unwrap();
    b.dispatch_due(1_800_011);
    let calls = b.proxy.take_calls();
    let idp = calls.iter().find(|(_, c)| c.cluster == "idp").unwrap();
    assert_eq!(
        idp.1.body.as_ref().unwrap().expose(),
        "grant_type=refresh_token&refresh_token=rt-reconsented"
    );
}

#[test]
fn a_failed_store_refresh_keeps_the_last_good_value_and_logs_the_status() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "vaulted");
    b.on_tick(Some(&loaded), 0);
    b.dispatch_due(0);
    let login = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap();
    let answer = json!({ "auth": { "client_token": "hvs.login", "lease_duration": 3600 } });
    b.on_answer(login.0, Some(200), Some(answer.to_string().into_bytes()), 1);
    b.dispatch_due(2);
    let read = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap();
    b.on_answer(read.0, Some(200), Some(vault_answer("key", "v-1", 1)), 3);
    assert_eq!(
        ready(b.resolve(&loaded, &[c], Who::default(), 4, true).unwrap())[0]
            .secret
            .expose(),
        "v-1"
    );
    // A re-read that finds the same version changes nothing.
    b.on_tick(Some(&loaded), 301_000);
    b.dispatch_due(301_001);
    let read = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap();
    b.on_answer(
        read.0,
        Some(200),
        Some(vault_answer("key", "v-1", 1)),
        301_002,
    );
    assert_eq!(
        b.proxy.stat("latchkey.secret.vault_secret.version_changes"),
        0
    );
    assert!(!b.proxy.logged("new version"));
    // The next refresh is due after refresh_s (default 300 s); Vault answers 500.
    b.on_tick(Some(&loaded), 602_000);
    b.dispatch_due(602_001);
    let read = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "vault")
        .unwrap();
    b.on_answer(read.0, Some(500), Some(b"internal".to_vec()), 602_002);
    assert!(b.proxy.logged(
        "secret vault_secret: read failed: status (HTTP 500); the last good value stays in use"
    ));
    // Per kind only: no total beside them (it would double a Prometheus sum()).
    assert_eq!(b.proxy.stat("latchkey.secret.vault_secret.failure"), 0);
    assert!(!b
        .proxy
        .stats
        .borrow()
        .iter()
        .any(|n| n == "latchkey.secret.vault_secret.failure"));
    assert_eq!(
        b.proxy.stat("latchkey.secret.vault_secret.failure.status"),
        1
    );
    assert_eq!(
        ready(
            b.resolve(&loaded, &[c], Who::default(), 602_003, true)
                .unwrap()
        )[0]
        .secret
        .expose(),
        "v-1"
    );
    // The age gauge counts from the last good read.
    b.on_tick(Some(&loaded), 604_000);
    assert_eq!(
        b.proxy.stat("latchkey.secret.vault_secret.age_seconds"),
        302
    );
}

#[test]
fn answers_that_are_too_large_or_unknown_change_nothing_else() {
    let (mut b, loaded) = setup();
    let c = conn(&loaded, "orders");
    let _ = b.resolve(&loaded, &[c], Who::default(), 0, true).unwrap();
    b.dispatch_due(1);
    let (id, _) = b.proxy.take_calls()[0].clone();
    // An answer for a call that isn't this VM's is ignored.
    b.on_answer(
        id + 100,
        Some(200),
        Some(token_answer("nope", json!({}))),
        2,
    );
    assert!(b.awaits(id));
    // A body past the limit is a failure of kind too_large.
    b.on_answer(id, Some(200), None, 3);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.orders.token.failure.too_large"),
        1
    );
    assert!(matches!(
        b.resolve(&loaded, &[c], Who::default(), 4, true).unwrap(),
        Resolution::Reject { .. }
    ));
}

#[test]
fn a_young_token_is_not_refreshed_on_a_401_and_a_gone_request_is_forgotten() {
    let fake = Fake::default();
    let mut cfg = config();
    // The default window: 10 s.
    if let crate::config::ProviderKind::OAuth2(p) = &mut cfg.providers[0].kind {
        p.drop_on_401_after_s = 10;
    }
    let loaded = Rc::new(Runtime::new(&fake, cfg, "test"));
    let mut b = Broker::new(fake);
    let (_, creds) = orders_with_token(&mut b, &loaded);
    b.record_used(5, EntryCredential::tokens(&creds));
    let used = b.take_used(5);
    assert_eq!(used.len(), 1);
    assert!(b.take_used(5).is_empty());
    b.on_upstream_401(&loaded, &used, 9_000);
    assert_eq!(
        b.proxy.stat("latchkey.connection.orders.token.ignored_401"),
        1
    );
    b.dispatch_due(9_001);
    assert!(b.proxy.take_calls().is_empty());
    // Old enough: one refresh.
    b.on_upstream_401(&loaded, &used, 10_002);
    b.on_upstream_401(&loaded, &used, 10_003);
    assert_eq!(
        b.proxy
            .stat("latchkey.connection.orders.token.dropped_on_401"),
        1
    );
    b.dispatch_due(10_004);
    assert_eq!(b.proxy.take_calls().len(), 1);
    // A request that goes away while it waits is forgotten.
    let (deadline, keys) = keys_of(
        b.resolve(
            &loaded,
            &[conn(&loaded, "backend")],
            Who::default(),
            0,
            true,
        )
        .unwrap(),
    );
    b.wait(8, waiter(&loaded, conn(&loaded, "backend"), deadline, keys));
    b.record_used(8, used);
    b.forget(8);
    assert_eq!(b.paused(), 0);
    assert!(b.take_used(8).is_empty());
}

#[test]
fn a_token_copy_costs_one_generation_read_and_no_cache_read() {
    let (mut b, loaded) = setup();
    let (c, _) = orders_with_token(&mut b, &loaded);
    assert_eq!(
        loaded.token_copy(c).map(|t| t.cached.token.clone()),
        Some("at-1".to_string())
    );
    let before = b.proxy.gets.get();
    for now in 4..10 {
        let creds = ready(b.resolve(&loaded, &[c], Who::default(), now, true).unwrap());
        assert_eq!(creds[0].secret.expose(), "at-1");
    }
    // Six requests: six reads of the generation key, none of the token's key.
    assert_eq!(b.proxy.gets.get() - before, 6);
    assert_eq!(
        b.proxy.stat("latchkey.connection.orders.token.cache_hit"),
        7
    );
}

#[test]
fn every_shared_key_is_created_when_the_configuration_loads() {
    let fake = Fake::default();
    let loaded = Runtime::new(&fake, config(), "test");
    let keys: Vec<String> = fake.shared.borrow().keys().cloned().collect();
    // One per token connection (orders, rotating and its rotated refresh token,
    // backend, kv_reader), 256 sets for token exchange, one per store and the
    // Vault login, and the copies' generation.
    let tokens = loaded.tokens.iter().flatten().count();
    assert_eq!(tokens, 5);
    assert_eq!(keys.len(), 4 + 1 + 256 + 2 + 1 + 1, "{}", keys.len());
    assert!(keys.contains(&COPY_GENERATION.to_string()));
    assert!(keys
        .iter()
        .all(|k| k == COPY_GENERATION || k.starts_with("latchkey.v1.test.")));
    assert!(fake.shared.borrow().values().all(|(v, _)| v.is_empty()));
    // Loading again keeps what is there (another worker may have written it).
    fake.shared_set(COPY_GENERATION, b"", 0).unwrap();
    let cas = fake.shared_get(COPY_GENERATION).unwrap().unwrap().1;
    let again = Runtime::new(&fake, config(), "test");
    assert_eq!(fake.shared_get(COPY_GENERATION).unwrap().unwrap().1, cas);
    assert_eq!(again.copy_generation.get(), cas);
}

#[test]
fn the_clock_is_read_only_for_what_this_vm_holds_no_copy_of() {
    let (mut b, loaded) = setup();
    let (orders, partner) = (conn(&loaded, "orders"), conn(&loaded, "partner"));
    let reads = std::cell::Cell::new(0);
    let mut clock = || {
        reads.set(reads.get() + 1);
        Ok(reads.get())
    };
    // Nothing to resolve: no clock.
    ready(
        b.resolve_with(&loaded, &[], Who::default(), &mut clock, true)
            .unwrap(),
    );
    assert_eq!(reads.get(), 0);
    // No copy: the clock is read, once however many entries need it.
    let _ = b
        .resolve_with(
            &loaded,
            &[orders, partner],
            Who::default(),
            &mut clock,
            true,
        )
        .unwrap();
    assert_eq!(reads.get(), 1);
    b.dispatch_due(1);
    let (id, _) = b.proxy.take_calls()[0].clone();
    b.on_answer(id, Some(200), Some(token_answer("at-1", json!({}))), 2);
    ready(
        b.resolve(&loaded, &[orders], Who::default(), 3, true)
            .unwrap(),
    );
    // The token and the store value are copies now: no clock at all.
    loaded.set_store_value(0, Secret::new("pk"));
    let before = reads.get();
    ready(
        b.resolve_with(
            &loaded,
            &[orders, partner],
            Who::default(),
            &mut clock,
            true,
        )
        .unwrap(),
    );
    assert_eq!(reads.get(), before);
    // Another worker moved the copy generation: the copies go, and the clock is
    // read before the shared cache is (a wait's deadline is never counted from 0).
    b.proxy.shared_set(COPY_GENERATION, b"", 0).unwrap();
    ready(
        b.resolve_with(&loaded, &[orders], Who::default(), &mut clock, true)
            .unwrap(),
    );
    assert_eq!(reads.get(), before + 1);
}

#[test]
fn an_injection_is_counted_per_connection_on_a_stat_defined_when_first_used() {
    let (b, loaded) = setup();
    let orders = conn(&loaded, "orders");
    let name = "latchkey.connection.orders.injected";
    assert!(!b.proxy.stats.borrow().iter().any(|n| n == name));
    loaded.stats.allowed(&b.proxy, &[orders, orders]);
    loaded.stats.allowed(&b.proxy, &[orders]);
    assert_eq!(b.proxy.stat(name), 3);
    assert_eq!(b.proxy.stat("latchkey.requests.allowed"), 2);
    assert_eq!(
        b.proxy.stats.borrow().iter().filter(|n| *n == name).count(),
        1
    );
}

#[test]
fn every_request_stat_has_its_documented_name() {
    use crate::stats::stat_segment;
    let (b, loaded) = setup();
    let s = &loaded.stats;
    let p = &b.proxy;
    let named = [
        (s.allowed, "latchkey.requests.allowed"),
        (s.unmatched, "latchkey.requests.unmatched"),
        (
            s.denied_unauthenticated,
            "latchkey.requests.denied.unauthenticated",
        ),
        (s.denied_forbidden, "latchkey.requests.denied.forbidden"),
        (s.denied_unmatched, "latchkey.requests.denied.unmatched"),
        (s.denied_bad_claims, "latchkey.requests.denied.bad_claims"),
        (s.denied_bad_path, "latchkey.requests.denied.bad_path"),
        (s.denied_bad_subject, "latchkey.requests.denied.bad_subject"),
        (s.discovery, "latchkey.requests.discovery"),
        (s.unavailable, "latchkey.requests.unavailable"),
        (s.paused_limit, "latchkey.requests.paused_limit"),
        (s.internal_errors, "latchkey.requests.internal_error"),
    ];
    for (i, (id, name)) in named.iter().enumerate() {
        for _ in 0..=i {
            p.count(*id);
        }
        assert_eq!(p.stat(name), i as u64 + 1, "{name}");
    }
    // Waits count per connection.
    let orders = conn(&loaded, "orders");
    s.waits(p, &[orders, orders]);
    assert_eq!(p.stat("latchkey.connection.orders.token.wait"), 2);
    // Names from configuration are made safe for a stat name.
    assert_eq!(stat_segment("a.b c/d_e-F9"), "a_b_c_d_e-F9");
    assert_eq!(stat_segment("é"), "_");
}

#[test]
fn the_tick_renews_copies_about_once_a_second_and_keeps_good_ones() {
    let (mut b, loaded) = setup();
    b.prefetch_due = false;
    let (c, _) = orders_with_token(&mut b, &loaded);
    // A token good for an hour: the tick keeps the copy.
    b.last_copies_ms = 0;
    b.on_tick(Some(&loaded), 1_000);
    assert!(loaded.has_token_copy(c));
    // Token copies are looked at every half second, not more often.
    // (Only connections that hold a copy are looked at: give it a stale one.)
    let stale = Cached::new("stale".into(), 99, 3_600_000, 0, &Policy::new(1000, 5000));
    loaded.set_token_copy(c, Some(stale));
    b.on_tick(Some(&loaded), 1_499);
    assert_eq!(
        loaded.token_copy(c).map(|t| t.cached.token.clone()),
        Some("stale".into())
    );
    b.on_tick(Some(&loaded), 1_500);
    assert_eq!(
        loaded.token_copy(c).map(|t| t.cached.token.clone()),
        Some("at-1".into())
    );
    // Store copies (and ages) once a second.
    let store = b
        .proxy
        .shared
        .borrow()
        .keys()
        .find(|k| k.contains(".sec.kv_secret."))
        .cloned()
        .unwrap();
    let value = CacheState::Ready {
        token: Cached::stored("pk-shared".into(), 1, "v1".into(), Some(300_000), 0),
        failures: 0,
    };
    b.proxy.shared_set(&store, &value.encode(), 0).unwrap();
    b.last_ages_ms = 5_000;
    b.on_tick(Some(&loaded), 5_999);
    assert!(loaded.store_value(0).is_none());
    b.on_tick(Some(&loaded), 6_000);
    assert_eq!(
        loaded.store_value(0).map(|v| v.expose().to_string()),
        Some("pk-shared".into())
    );
    assert_eq!(b.proxy.stat("latchkey.secret.kv_secret.age_seconds"), 6);
}

#[test]
fn a_read_waits_for_its_identity_token_until_its_own_timeout() {
    let (mut b, loaded) = setup();
    b.on_tick(Some(&loaded), 0); // the reads start; the Key Vault one needs a token
    b.dispatch_due(0);
    let imds: Vec<_> = b
        .proxy
        .take_calls()
        .into_iter()
        .filter(|(_, c)| c.cluster == "imds")
        .collect();
    assert_eq!(imds.len(), 1);
    // The identity token never comes: the read stays deferred for its timeout (5 s)...
    b.dispatch_due(4_999);
    assert_eq!(
        b.proxy.stat("latchkey.secret.kv_secret.failure.identity"),
        0
    );
    assert!(!b
        .proxy
        .take_calls()
        .iter()
        .any(|(_, c)| c.cluster == "keyvault"));
    // ...then fails for want of it, and backs off.
    b.dispatch_due(5_000);
    assert_eq!(
        b.proxy.stat("latchkey.secret.kv_secret.failure.identity"),
        1
    );
    assert!(b.proxy.logged("secret kv_secret: read failed: identity"));
    assert!(!b
        .proxy
        .take_calls()
        .iter()
        .any(|(_, c)| c.cluster == "keyvault"));
}

#[test]
fn a_key_vault_read_refused_twice_fails_after_one_retry() {
    let (mut b, loaded) = setup();
    b.on_tick(Some(&loaded), 0);
    b.dispatch_due(0);
    let calls = b.proxy.take_calls();
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(
        imds.0,
        Some(200),
        Some(token_answer("kv-token-1", json!({}))),
        1,
    );
    b.dispatch_due(2);
    let kv = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "keyvault")
        .unwrap();
    // Refused long after the read began: the retry has a timeout of its own.
    b.on_answer(kv.0, Some(401), Some(b"{}".to_vec()), 20_000);
    b.dispatch_due(20_001);
    b.dispatch_due(20_002);
    let calls = b.proxy.take_calls();
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(
        imds.0,
        Some(200),
        Some(token_answer("kv-token-2", json!({}))),
        20_003,
    );
    b.dispatch_due(20_004);
    let kv = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "keyvault")
        .unwrap();
    assert_eq!(kv.1.secret_headers[0].1.expose(), "Bearer kv-token-2");
    // Refused again: no third read, a failure.
    b.on_answer(kv.0, Some(401), Some(b"{}".to_vec()), 20_005);
    b.dispatch_due(20_006);
    b.dispatch_due(20_007);
    assert!(b.proxy.take_calls().is_empty());
    assert_eq!(
        b.proxy
            .stat("latchkey.secret.kv_secret.failure.unauthorized"),
        1
    );
}

#[test]
fn a_key_vault_retry_waits_twice_the_timeout_for_a_new_identity_token() {
    let (mut b, loaded) = setup();
    b.on_tick(Some(&loaded), 0);
    b.dispatch_due(0);
    let calls = b.proxy.take_calls();
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(
        imds.0,
        Some(200),
        Some(token_answer("kv-token-1", json!({}))),
        1,
    );
    b.dispatch_due(2);
    let kv = b
        .proxy
        .take_calls()
        .into_iter()
        .find(|(_, c)| c.cluster == "keyvault")
        .unwrap();
    b.on_answer(kv.0, Some(401), Some(b"{}".to_vec()), 20_000);
    // The new identity token never comes: the retry waits 2 x 5 s for it.
    b.dispatch_due(20_001);
    b.dispatch_due(29_999);
    assert_eq!(
        b.proxy.stat("latchkey.secret.kv_secret.failure.identity"),
        0
    );
    b.dispatch_due(30_000);
    assert_eq!(
        b.proxy.stat("latchkey.secret.kv_secret.failure.identity"),
        1
    );
}

#[test]
fn a_paused_request_keeps_waiting_while_one_of_its_credentials_is_missing() {
    let (mut b, loaded) = setup();
    b.prefetch_due = false;
    let (orders, backend) = (conn(&loaded, "orders"), conn(&loaded, "backend"));
    let (deadline, keys) = keys_of(
        b.resolve(&loaded, &[orders, backend], Who::default(), 0, true)
            .unwrap(),
    );
    assert_eq!(keys.len(), 2);
    // The two keys' CAS tokens differ (one more write of the same value).
    let (value, _) = b.proxy.shared_get(&keys[0]).unwrap().unwrap();
    b.proxy.shared_set(&keys[0], &value, 0).unwrap();
    let mut w = waiter(&loaded, orders, deadline, keys.clone());
    w.needed.picks = vec![orders, backend];
    b.wait(4, w);
    // A second request waits on the same keys.
    let mut w2 = waiter(&loaded, orders, deadline, keys);
    w2.needed.picks = vec![orders, backend];
    b.wait(5, w2);
    b.dispatch_due(1);
    let calls = b.proxy.take_calls();
    assert_eq!(calls.len(), 2);
    // Nothing moved: one read of each key for both requests, and no other look.
    let before = b.proxy.gets.get();
    assert!(b.due_waiters(2).is_empty());
    assert_eq!(b.proxy.gets.get() - before, 2);
    // One credential arrives: both look again, and keep waiting for the other.
    let idp = calls.iter().find(|(_, c)| c.cluster == "idp").unwrap();
    b.on_answer(idp.0, Some(200), Some(token_answer("at-1", json!({}))), 3);
    assert!(b.due_waiters(4).is_empty());
    assert_eq!(b.paused(), 2);
    // The other arrives: both go on with both credentials.
    let imds = calls.iter().find(|(_, c)| c.cluster == "imds").unwrap();
    b.on_answer(imds.0, Some(200), Some(token_answer("mi-1", json!({}))), 5);
    let resumed = b.due_waiters(6);
    assert_eq!(resumed.len(), 2);
    assert!(resumed
        .iter()
        .all(|r| r.outcome.verdict == crate::request::Verdict::Allowed));
    assert_eq!(b.paused(), 0);
}

/// authorization_code fetches and consent tasks (SPEC v1.2), over this fake proxy.
#[path = "delegated_tests.rs"]
mod delegated_tests;

/// private_key_jwt, client_assertion and tls_client_auth fetches (SPEC v1.2).
#[path = "signing_tests.rs"]
mod signing_tests;

/// private_key_jwt on authorization_code connections: the stored consent's
/// redemption, the callback's code and the disconnect's revocation are each
/// authenticated with a freshly signed assertion (SPEC v1.2).
#[path = "consent_signing_tests.rs"]
mod consent_signing_tests;

/// Every route the request path serves from a [`crate::config::Fixed`] plan gets
/// exactly what the decision and the broker would give it; every other route
/// has no plan.
#[test]
fn a_fixed_plan_is_what_the_decision_and_the_broker_give() {
    let v = json!({
        "secrets": {
            "k1": { "inline": "key-one" }, "k2": { "inline": "key-two" },
            "cs": { "inline": "client-secret-1" },
            "stored": { "vault": { "cluster": "vault", "url": "http://vault:8200", "mount": "secret",
                                   "path": "p", "field": "key", "token": "cs" } }
        },
        "providers": {
            "keys": { "type": "api_key" },
            "mtls": { "type": "client_certificate" },
            "idp": { "type": "oauth2", "cluster": "idp", "token_url": "https://idp.test/token",
                     "client_id": "gw", "client_secret": "cs" }
        },
        "connections": {
            "one": { "provider": "keys", "api_key": "k1", "access": { "public": true } },
            "two": { "provider": "keys", "api_key": "k2", "access": { "public": true } },
            "members": { "provider": "keys", "api_key": "k2", "access": { "groups": ["g"] } },
            "closed": { "provider": "keys", "api_key": "k2", "access": { "users": ["nobody"] } },
            "cert": { "provider": "mtls", "cluster": "partner_a", "access": { "public": true } },
            "vaulted": { "provider": "keys", "api_key": "stored", "access": { "public": true } },
            "token": { "provider": "idp", "grant": "client_credentials", "access": { "public": true } }
        },
        "routes": [
            { "name": "header", "match": { "path_prefix": "/h" },
              "inject": [ { "connections": ["one"], "header": "x-key", "prefix": "Key " },
                          { "connections": ["two"], "query": "k" } ] },
            { "name": "first_public", "match": { "path_prefix": "/f" },
              "inject": [ { "connections": ["two", "one"], "header": "x-key" } ] },
            { "name": "cert", "match": { "path_prefix": "/c" },
              "inject": [ { "connections": ["cert"], "cluster_header": "x-latchkey-cluster" } ] },
            { "name": "claims", "match": { "path_prefix": "/g" },
              "inject": [ { "connections": ["members", "one"], "header": "x-key" } ] },
            { "name": "denied", "match": { "path_prefix": "/d" },
              "inject": [ { "connections": ["closed"], "header": "x-key" } ] },
            { "name": "route_access", "match": { "path_prefix": "/r" }, "access": { "users": ["u"] },
              "inject": [ { "connections": ["one"], "header": "x-key" } ] },
            { "name": "stored", "match": { "path_prefix": "/s" },
              "inject": [ { "connections": ["vaulted"], "header": "x-key" } ] },
            { "name": "token", "match": { "path_prefix": "/t" },
              "inject": [ { "connections": ["token"], "header": "authorization" } ] }
        ]
    });
    let config = Config::parse(v.to_string().as_bytes(), &|_| None).unwrap();
    let fake = Fake::default();
    let loaded = Rc::new(Runtime::new(&fake, config, "test"));
    let mut b = Broker::new(fake);
    b.configured(&loaded);
    let config = &loaded.config;
    let planned: Vec<&str> = config
        .routes
        .iter()
        .filter(|r| r.fixed.is_some())
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(planned, ["header", "first_public", "cert"]);
    /// A fixed route reads nothing lazily (no route name, no claims).
    struct NoReads;
    impl crate::request::Lazy for NoReads {
        fn route_name(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
            panic!("route name read")
        }
        fn metadata(&mut self) -> Result<Option<Vec<u8>>, HostFault> {
            panic!("metadata read")
        }
        fn now_ms(&mut self) -> Result<u64, HostFault> {
            panic!("clock read")
        }
        fn random(&mut self) -> u64 {
            0
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        let Some(f) = &r.fixed else { continue };
        let crate::policy::Decision::Allowed { picks, .. } =
            crate::policy::decide(config, Some(i), None)
        else {
            panic!("{}: not allowed", r.name);
        };
        assert_eq!(f.picks, picks, "{}", r.name);
        // What start() answers at once is what the decision, the broker and
        // finish() make of the same request: the same edits, verdict and picks.
        let path = format!("/{}x?k=evil&z=1", &r.name[..1]);
        let headers: Vec<(&str, &[u8])> = vec![
            (":method", b"GET"),
            (":path", path.as_bytes()),
            (":authority", b"api.test"),
            ("x_key", b"client"),
            ("x-latchkey-cluster", b"chosen-by-client"),
        ];
        let crate::request::Step::Done(fast) =
            crate::request::start(config, None, &headers, &mut NoReads).unwrap()
        else {
            panic!("{}: not answered at once", r.name);
        };
        let creds = ready(b.resolve(&loaded, &picks, Who::default(), 1, true).unwrap());
        assert!(creds
            .iter()
            .all(|c| c.token.is_none() && c.with_default.is_none()));
        let mut edits = Vec::new();
        for name in &config.cluster_headers {
            crate::inject::remove_all(name, headers.iter().map(|(k, _)| *k), &mut edits);
        }
        let needed = Needed {
            route: i,
            picks: picks.clone(),
            subject: None,
            caller: None,
            edits,
        };
        let shared = crate::request::finish(
            config,
            needed,
            EntryCredential::resolved(&creds),
            &headers[..],
            path.as_bytes(),
        );
        assert_eq!(fast.verdict, crate::request::Verdict::Allowed, "{}", r.name);
        assert_eq!(fast.edits, shared.edits, "{}", r.name);
        assert_eq!((fast.route, &fast.picks), (Some(i), &picks), "{}", r.name);
        assert!(fast.reply.is_none(), "{}", r.name);
        assert!(!fast.edits.is_empty(), "{}", r.name);
    }
    assert_eq!(
        config.routes[1].fixed.as_ref().map(|f| f.picks.clone()),
        Some(vec![conn(&loaded, "two")])
    );
}

/// A stream that goes away (proxy_on_delete) leaves nothing behind: neither its
/// paused request nor the tokens it carried; other streams keep theirs.
#[test]
fn a_stream_that_goes_away_leaves_no_waiter_and_no_used_token() {
    let (mut b, loaded) = setup();
    let (c, creds) = orders_with_token(&mut b, &loaded);
    assert_eq!(EntryCredential::tokens(&creds).len(), 1);
    b.record_used(7, EntryCredential::tokens(&creds));
    b.record_used(8, EntryCredential::tokens(&creds));
    b.wait(9, waiter(&loaded, c, 10_000, vec![]));
    b.wait(10, waiter(&loaded, c, 10_000, vec![]));
    assert_eq!(b.paused(), 2);
    b.forget(9);
    b.forget(7);
    assert_eq!(b.paused(), 1);
    assert!(b.take_used(7).is_empty());
    assert_eq!(b.take_used(8).len(), 1);
    assert!(b.take_used(8).is_empty());
}
