"""User-delegated connections (SPEC v1.2, issue #18) when things go wrong, in a real Envoy
with the real oidc-provider and a real OpenBao (or the Key Vault stand-in), on the helpers
of test_consent.py.

Each refusal is checked where it shows: what the client got (status, JSON reason,
retry-after), what the upstream received (consent endpoints are never forwarded), what
the token store holds afterwards (nothing, or the version it had), what the token server
was asked, and latchkey's counters (`latchkey.consent.*`).

A consent state is minted here when a test needs one latchkey did not sign (expired,
another key, another connection): its format is SPEC's, checked against a state latchkey
issued (`mint_state`, `pkce_verifier`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse

import pytest

from browser import Browser, consent_at_idp, deny_at_idp
from harness import DEFAULT_ISSUER, REPO_ROOT, static_cluster, wait_until
from secret_stores import KeyVaultStack, read_policy_hcl, token_store_policy_hcl
from test_consent import (CONSENT_PATH, PORTAL, REDIRECT_URI, ROUTES, STATE_KEY, auth,  # noqa: F401
                          bao, connect, consent_config, oidc, path_of, record_path,
                          upstream_sub)
from token_servers import CONSENT_CLIENT_ID, CONSENT_CLIENT_SECRET

sys.path.insert(0, str(REPO_ROOT / "tests" / "soak"))
from soak import FaultRelay  # noqa: E402

CALLBACK = urllib.parse.urlsplit(REDIRECT_URI).path
LOGIN = f"{CONSENT_PATH}/mine/login"
OPAQUE_RESOURCE = "https://opaque.api.test"   # oidc-provider issues opaque access tokens for it


# --------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def caller_hash(sub: str, iss: str = DEFAULT_ISSUER) -> str:
    """SPEC: 128 bits of SHA-256 over the caller's iss and subject, hex."""
    return hashlib.sha256(b"latchkey.caller\0" + iss.encode() + b"\0" + sub.encode()).hexdigest()[:32]


def state_tag(payload_b64: str, key: str = STATE_KEY) -> str:
    return b64url(hmac.new(key.encode(), b"latchkey.state\0" + payload_b64.encode(),
                           hashlib.sha256).digest())


def mint_state(sub: str, *, connection: str = "mine", nonce: str | None = None,
               expires_ms: int | None = None, return_to: str | None = None,
               key: str = STATE_KEY) -> str:
    """A consent state as latchkey signs one: base64url(JSON {"c","u","n","e"[,"r"]}) "."
    base64url(HMAC-SHA256(key, "latchkey.state\\0" + payload_b64))."""
    payload = {"c": connection, "u": caller_hash(sub), "n": nonce or secrets.token_hex(16),
               "e": int(time.time() * 1000) + 600_000 if expires_ms is None else expires_ms}
    if return_to is not None:
        payload["r"] = return_to
    p = b64url(json.dumps(payload, separators=(",", ":")).encode())
    return f"{p}.{state_tag(p, key)}"


def state_payload(state: str) -> dict:
    return json.loads(b64url_decode(state.split(".")[0]))


def pkce_verifier(nonce: str) -> str:
    """latchkey's PKCE verifier of a login: base64url(HMAC-SHA256(state key,
    "latchkey.pkce\\0" + nonce)), no padding."""
    return b64url(hmac.new(STATE_KEY.encode(), b"latchkey.pkce\0" + nonce.encode(),
                           hashlib.sha256).digest())


def flip(text: str, i: int) -> str:
    """`text` with its i-th character changed to another base64url character."""
    c = text[i]
    return text[:i] + ("A" if c != "A" else "B") + text[i + 1:]


def callback(**params) -> str:
    """The callback path with these query parameters (None values left out), in order."""
    q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return CALLBACK + ("?" + q if q else "")


def begin(envoy, signer, sub, *, browser=None, return_to=None):
    """Login and consent at the IdP, without the callback: (callback params, the callback
    path the IdP redirected to)."""
    login = LOGIN + ("?return_to=" + urllib.parse.quote(return_to, safe="") if return_to else "")
    resp = envoy.request("GET", login, headers=auth(signer, sub))
    assert resp.status == 302, resp
    url = consent_at_idp(browser or Browser(), resp.header("location"), sub)
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)), path_of(url)


def refused(resp, status: int, reason: str, connection: str | None = "mine",
            spent: bool = False) -> None:
    """latchkey's JSON refusal of a consent endpoint. `spent`: the callback's code was
    redeemed but its refresh token couldn't be kept: `"retry": "login"` (start again),
    and no retry-after (sending the same callback again can't help)."""
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json", resp
    want = {"error": "consent_failed", "reason": reason}
    if connection is not None:
        want["connection"] = connection
    if spent:
        want["retry"] = "login"
    assert resp.json() == want, resp
    if status == 503 and not spent:
        assert resp.header("retry-after") == "1", resp
    else:
        assert resp.header("retry-after") is None, resp
    assert resp.header("location") is None, resp


def consent_stats(envoy) -> dict:
    prefix = "wasmcustom.latchkey.consent."
    return {k[len(prefix):]: v for k, v in envoy.stats(filter=r"^wasmcustom\.latchkey\.consent\.").items()
            if k.startswith(prefix)}


def nonzero(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if v}


def start_with(envoy_factory, oidc, bao, cfg=None, *, idp_port=None, vault_port=None, **kw):
    """test_consent.start, with the config given and the clusters' ports overridable (a
    relay in front of a server)."""
    return envoy_factory(
        cfg if cfg is not None else consent_config(oidc, bao), routes=ROUTES,
        wasm_env={"CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": STATE_KEY,
                  "VAULT_TOKEN": kw.pop("vault_token", None) or bao.token_store_token()},
        extra_clusters=[static_cluster("idp", idp_port or oidc.port),
                        static_cluster("vault", vault_port or bao.port)], **kw)


def all_versions(bao, path: str) -> list[dict]:
    """The data of every version of a KV v2 path, oldest first."""
    out = []
    for v in bao.kv_versions(path):
        resp = bao.kv_get(path, version=v)
        out.append((resp.body or {}).get("data", {}).get("data"))
    return out


class RacingStoreRelay(FaultRelay):
    """soak.py's FaultRelay (a TCP relay that forwards bytes unchanged) in front of the
    REAL OpenBao, plus the one fault a real server won't produce on cue by itself: another
    writer landing between latchkey's read of a token record and its write. When it sees
    latchkey's `POST /v1/secret/data/latchkey/connections/...` (a record write, with its
    compare-and-set), it first calls `racer(path)` (which writes to OpenBao directly, as
    another proxy would), then forwards latchkey's request unchanged: OpenBao itself then
    refuses latchkey's check-and-set. Armed for the next `times` writes only."""

    WRITE = re.compile(rb"POST /v1/secret/data/(latchkey/connections/[^ ?]+) HTTP/1\.1\r\n")

    def __init__(self, target_port: int):
        super().__init__("store", target_port)
        self._racer_lock = threading.Lock()
        self._racer = None
        self._times = 0
        self.writes_seen: list[str] = []
        self.raced: list[tuple[str, object]] = []
        self.errors: list[str] = []

    def race_next_writes(self, racer, times: int = 1) -> None:
        with self._racer_lock:
            self._racer, self._times = racer, times

    def _on_write(self, path: str) -> None:
        with self._racer_lock:
            self.writes_seen.append(path)
            racer = self._racer if self._times > 0 else None
            if racer is not None:
                self._times -= 1
        if racer is not None:
            try:
                self.raced.append((path, racer(path)))
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            to_store = dst.getpeername()[1] == self.target_port
        except OSError:
            to_store = False
        if not to_store:
            return super()._pump(src, dst)
        tail = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                window = tail + data
                for m in self.WRITE.finditer(window):
                    if m.end() > len(tail):
                        self._on_write(m.group(1).decode())
                tail = window[-512:]
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            gone = [s for s in (src, dst) if s in self._conns]
            self._conns.difference_update(gone)
        for s in gone:
            s.close()


@pytest.fixture
def store_relay(bao):
    relay = RacingStoreRelay(bao.port).start()
    try:
        yield relay
    finally:
        relay.stop()
    assert relay.errors == [], relay.errors


# --------------------------------------------------------------------------- refusals


def test_callback_refusals_store_nothing_and_spend_nothing(envoy_factory, upstream, signer, oidc, bao):
    """Every callback latchkey refuses before redeeming the code: a JSON reason, nothing
    forwarded, nothing redeemed, nothing stored. The genuine callback still completes
    afterwards: none of those refusals spent its state or its code."""
    envoy = start_with(envoy_factory, oidc, bao)
    cb, genuine = begin(envoy, signer, "alice", return_to=PORTAL + "app")
    state, code = cb["state"], cb["code"]

    # The state latchkey issued has SPEC's format, so the states minted below are faithful.
    payload_b64, tag = state.split(".")
    assert tag == state_tag(payload_b64)
    p = state_payload(state)
    assert set(p) == {"c", "u", "n", "e", "r"}
    assert p["c"] == "mine" and p["u"] == caller_hash("alice") and p["r"] == PORTAL + "app"
    assert re.fullmatch(r"[0-9a-f]{32}", p["n"])
    assert abs(p["e"] - (time.time() * 1000 + 600_000)) < 60_000

    alice = auth(signer, "alice")
    cases = [
        # (callback path, who sends it, status, reason, connection named in the answer)
        (callback(code=code, state=flip(state, 5), iss=oidc.issuer), alice, 400, "state_invalid", None),
        (callback(code=code, state=flip(state, len(payload_b64) + 10), iss=oidc.issuer), alice,
         400, "state_invalid", None),
        (callback(code=code, state=state.replace(".", ""), iss=oidc.issuer), alice, 400, "state_invalid", None),
        (callback(code=code, state=mint_state("alice", key="x" * 40), iss=oidc.issuer), alice,
         400, "state_invalid", None),
        (callback(code=code, state=mint_state("alice", connection="nope"), iss=oidc.issuer), alice,
         400, "state_invalid", None),
        (callback(code=code, state=mint_state("alice", nonce=p["n"], expires_ms=int(time.time() * 1000) - 1000),
                  iss=oidc.issuer), alice, 400, "state_expired", None),
        (genuine, auth(signer, "bob"), 403, "wrong_caller", "mine"),
        (callback(code=code, state=state, iss="https://evil.test"), alice, 400, "wrong_issuer", "mine"),
        (callback(code=code, state=state), alice, 400, "wrong_issuer", "mine"),
        (callback(state=state, iss=oidc.issuer), alice, 400, "bad_request", "mine"),
        (callback(code="", state=state, iss=oidc.issuer), alice, 400, "bad_request", "mine"),
        (callback(code=code, iss=oidc.issuer), alice, 400, "bad_request", None),
        (genuine + "&code=other", alice, 400, "bad_request", None),
        (genuine + "&state=" + urllib.parse.quote(state), alice, 400, "bad_request", None),
        (callback(error="temporarily_unavailable", state=state, iss=oidc.issuer), alice,
         400, "bad_request", "mine"),
    ]
    for path, who, status, reason, connection in cases:
        resp = envoy.request("GET", path, headers=who)
        refused(resp, status, reason, connection)
        assert code not in resp.body.decode()

    # The user says no at the IdP (a fresh browser: asked for consent again).
    login = envoy.request("GET", LOGIN, headers=alice)
    denied = deny_at_idp(Browser(), login.header("location"), "alice")
    dq = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(denied).query))
    assert dq["error"] == "access_denied" and "code" not in dq
    refused(envoy.request("GET", path_of(denied), headers=alice), 400, "access_denied")

    assert upstream.requests() == []
    assert oidc.token_request_count("authorization_code") == 0
    assert bao.kv_versions(record_path(bao, "alice")) == []
    assert bao.kv_versions(record_path(bao, "bob")) == []

    # The genuine callback, after all that: its state and code are intact.
    done = envoy.request("GET", genuine, headers=alice)
    assert done.status == 302 and done.header("location") == PORTAL + "app", done
    data, version = bao.kv_read(record_path(bao, "alice"))
    assert version == 1 and data["refresh_token"]
    assert oidc.token_request_count("authorization_code", ok_only=True) == 1
    resp = envoy.request("GET", "/orders/1", headers=alice)
    assert resp.status == 200 and upstream_sub(upstream) == "alice", resp

    stats = consent_stats(envoy)
    assert stats["completed"] == 1 and stats["logins_started"] == 2 and stats["redemptions"] == 1


def test_callback_refusals_are_counted_by_reason(envoy_factory, upstream, signer, oidc, bao):
    """`latchkey.consent.failed.<reason>` (and no total beside it) counts every refused
    callback, as src/stats.rs CONSENT_FAILURES says, those decided on the request path
    (request.rs consent_endpoint) as well as the broker's.

    Regression test: found failing on f248130 / bf458f3, where only the broker's task
    failures (delegated.rs job_failed) were counted and ConsentFailed outcomes from the
    request path were not counted anywhere (filter/mod.rs apply), so these six counters
    stayed 0; fixed by 3a15c41 ("Consent refusals counted in one place")."""
    envoy = start_with(envoy_factory, oidc, bao)
    cb, genuine = begin(envoy, signer, "alice")
    alice = auth(signer, "alice")
    sends = [
        (callback(code=cb["code"], state=flip(cb["state"], 5), iss=oidc.issuer), alice, "state_invalid"),
        (callback(code=cb["code"], state=mint_state("alice", expires_ms=1000), iss=oidc.issuer), alice,
         "state_expired"),
        (genuine, auth(signer, "bob"), "wrong_caller"),
        (callback(code=cb["code"], state=cb["state"], iss="https://evil.test"), alice, "wrong_issuer"),
        (callback(error="access_denied", state=cb["state"], iss=oidc.issuer), alice, "access_denied"),
        (callback(state=cb["state"], iss=oidc.issuer), alice, "bad_request"),
    ]
    for path, who, reason in sends:
        assert envoy.request("GET", path, headers=who).json()["reason"] == reason
    stats = consent_stats(envoy)
    got = {r: stats.get(f"failed.{r}", 0) for _, _, r in sends}
    assert got == {r: 1 for _, _, r in sends}, got
    assert "failed" not in stats, stats


def test_login_refusals(envoy_factory, upstream, signer, oidc, bao):
    """The login: return_to only under an allowed prefix (else 400 return_to, no
    redirect), a caller the connection doesn't admit gets 403, no caller 401 (jwt_authn
    lets a request without a token through in this harness; latchkey refuses it), a bad
    token 401 from jwt_authn itself; paths under consent.path that are no endpoint 404.
    Nothing forwarded; only the 302s count as logins started."""
    cfg = consent_config(oidc, bao)
    # A shared connection only alice may consent to; bob may use it.
    cfg["connections"]["team"] = {"provider": "idp", "grant": "authorization_code",
                                  "scopes": ["orders.read"], "store": "user_tokens",
                                  "consent": {"users": ["alice"]}, "access": {"users": ["alice", "bob"]}}
    envoy = start_with(envoy_factory, oidc, bao, cfg)
    alice, bob = auth(signer, "alice"), auth(signer, "bob")

    bad = ["https://evil.test/", "https://portal.test", "https://portal.test.evil.test/",
           "http://portal.test/", "//portal.test/", "/relative", "https://portal.test/a b",
           "https://portal.test/a\\b", "https://portal.test/\u00e9", "javascript:alert(1)",
           PORTAL + "x" * 2100]
    for r in bad:
        resp = envoy.request("GET", LOGIN + "?return_to=" + urllib.parse.quote(r, safe=""), headers=alice)
        refused(resp, 400, "return_to")
    resp = envoy.request("GET", f"{LOGIN}?return_to={urllib.parse.quote(PORTAL)}&return_to={urllib.parse.quote(PORTAL)}",
                         headers=alice)
    refused(resp, 400, "bad_request")

    good = PORTAL + "settings/connections?tab=1"
    resp = envoy.request("GET", LOGIN + "?return_to=" + urllib.parse.quote(good, safe=""), headers=alice)
    assert resp.status == 302, resp
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(resp.header("location")).query))
    assert state_payload(q["state"])["r"] == good
    # ... and the finished consent sends the browser back there.
    url = consent_at_idp(Browser(), resp.header("location"), "alice")
    done = envoy.request("GET", path_of(url), headers=alice)
    assert done.status == 302 and done.header("location") == good, done

    # The shared connection: bob may use it, not consent to it (login or disconnect).
    for method, path in (("GET", f"{CONSENT_PATH}/team/login"), ("DELETE", f"{CONSENT_PATH}/team")):
        resp = envoy.request(method, path, headers=bob)
        assert resp.status == 403 and resp.json()["error"] == "forbidden", resp
    resp = envoy.request("GET", f"{CONSENT_PATH}/team/login", headers=alice)
    assert resp.status == 302, resp
    # A state alice started, finished by bob: refused before anything is redeemed.
    team_cb = consent_at_idp(Browser(), resp.header("location"), "alice")
    refused(envoy.request("GET", path_of(team_cb), headers=bob), 403, "wrong_caller", "team")
    assert bao.kv_versions("latchkey/connections/team/shared") == []

    # No caller: 401 from latchkey (jwt_authn lets a request without a token pass).
    for method, path in (("GET", LOGIN), ("DELETE", f"{CONSENT_PATH}/mine"), ("GET", path_of(team_cb))):
        resp = envoy.request(method, path)
        assert resp.status == 401 and resp.json()["error"] == "unauthenticated", resp
        resp = envoy.request(method, path, headers=[("authorization", "Bearer not.a.jwt")])
        assert resp.status == 401 and b"Jwt" in resp.body, resp   # jwt_authn's own answer
    # Under consent.path but no endpoint: 404, never forwarded.
    for method, path in (("GET", f"{CONSENT_PATH}/nope/login"), ("POST", LOGIN),
                         ("GET", f"{CONSENT_PATH}/mine"), ("GET", CONSENT_PATH),
                         ("PUT", f"{CONSENT_PATH}/mine"), ("POST", CALLBACK)):
        resp = envoy.request(method, path, headers=alice)
        assert resp.status == 404 and resp.json() == {"error": "consent_failed", "reason": "not_found"}, \
            (method, path, resp)

    assert upstream.requests() == []
    stats = envoy.stats()
    failed = {k.split(".")[-1]: v for k, v in stats.items()
              if k.startswith("wasmcustom.latchkey.consent.failed.") and v}
    assert failed == {"return_to": len(bad), "bad_request": 1, "wrong_caller": 1, "not_found": 6}, failed
    assert stats["wasmcustom.latchkey.consent.logins_started"] == 2
    assert stats["wasmcustom.latchkey.consent.completed"] == 1
    assert stats["wasmcustom.latchkey.requests.denied.forbidden"] == 2
    assert stats["wasmcustom.latchkey.requests.denied.unauthenticated"] == 3


def test_reused_code_is_rejected_and_the_consent_kept(envoy_factory, upstream, signer, oidc, bao):
    """A code already redeemed, brought back under a fresh valid state (new nonce): the
    token server refuses it (400 code_rejected), the record keeps its version and value,
    and alice's consent keeps working (the PKCE verifier of the new nonce doesn't match,
    so oidc-provider refuses before treating it as a reused code: no grant revoked)."""
    envoy = start_with(envoy_factory, oidc, bao)
    alice = auth(signer, "alice")
    _, cb_url, done = connect(envoy, oidc, signer, "alice")
    assert done.status == 200, done
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb_url).query))["code"]
    before = bao.kv_read(record_path(bao, "alice"))
    assert before[1] == 1

    for c in (code, "not-a-code-the-server-issued"):
        resp = envoy.request("GET", callback(code=c, state=mint_state("alice"), iss=oidc.issuer), headers=alice)
        refused(resp, 400, "code_rejected")
    reqs = [r for r in oidc.last_token_requests() if r["grant_type"] == "authorization_code"]
    assert [(r["status"], r["error"]) for r in reqs] == [(200, None), (400, "invalid_grant"), (400, "invalid_grant")]
    assert reqs[1]["form"]["code"] == code
    assert bao.kv_versions(record_path(bao, "alice")) == [1]
    assert bao.kv_read(record_path(bao, "alice")) == before

    resp = envoy.request("GET", "/orders/1", headers=alice)
    assert resp.status == 200 and upstream_sub(upstream) == "alice", resp
    stats = consent_stats(envoy)
    assert stats["failed.code_rejected"] == 2 and stats["redemptions"] == 3 and stats["completed"] == 1


def test_state_nonces_differ_across_fresh_proxies(envoy_factory, upstream, signer, oidc, bao):
    """Three fresh Envoys (new VMs), four logins each for the same caller: twelve different
    nonces, so twelve different PKCE challenges. A nonce sequence that restarted with each
    VM (a host whose random_get is not random) would make a new proxy's login collide
    with states used before."""
    nonces, challenges = [], []
    for _ in range(3):
        envoy = start_with(envoy_factory, oidc, bao)
        for _ in range(4):
            resp = envoy.request("GET", LOGIN, headers=auth(signer, "alice"))
            assert resp.status == 302, resp
            q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(resp.header("location")).query))
            nonces.append(state_payload(q["state"])["n"])
            challenges.append(q["code_challenge"])
            assert q["code_challenge"] == b64url(hashlib.sha256(pkce_verifier(nonces[-1]).encode()).digest())
        envoy.stop()
    assert len(set(nonces)) == 12 and len(set(challenges)) == 12, nonces


# --------------------------------------------------------------------------- failures while storing


def test_token_server_down_at_the_callback(envoy_factory, upstream, signer, oidc, bao):
    """The token server goes away between the consent and the callback: 503 token_server
    with retry-after, nothing stored. The code was never redeemed, so the state is
    released: sending the same callback again is tried again (503 while the server is
    still down), not refused as a replay; meanwhile the consent is simply still required. A disconnect meanwhile removes the
    record and says the refresh token was not revoked."""
    envoy = start_with(envoy_factory, oidc, bao)
    alice, bob = auth(signer, "alice"), auth(signer, "bob")
    _, _, done = connect(envoy, oidc, signer, "bob")
    assert done.status == 200, done
    _, cb = begin(envoy, signer, "alice")
    oidc.stop()
    resp = envoy.request("GET", cb, headers=alice)
    refused(resp, 503, "token_server")
    assert bao.kv_versions(record_path(bao, "alice")) == []
    # The code was never redeemed: the state is released, the same callback may be
    # sent again (and fails the same way while the server is down).
    again = envoy.request("GET", cb, headers=alice)
    refused(again, 503, "token_server")
    resp = envoy.request("GET", "/orders/1", headers=alice)
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp
    assert upstream.requests() == []
    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=bob)
    assert gone.status == 200 and gone.json() == {"disconnected": "mine", "revoked": False}, gone
    assert bao.kv_versions(record_path(bao, "bob")) == []
    stats = consent_stats(envoy)
    assert stats["failed.token_server"] == 2 and stats.get("failed.state_replayed", 0) == 0
    assert stats["completed"] == 1 and stats["store_writes"] == 1
    assert stats["disconnects"] == 1 and stats["revocations"] == 0


def test_token_store_down_at_the_callback(envoy_factory, upstream, signer, oidc, bao):
    """OpenBao stops between the consent and the callback: the code is redeemed, the
    record can't be read or written: 503 token_store saying to log in again (the code is
    spent: not a success, not a silent loss)."""
    envoy = start_with(envoy_factory, oidc, bao)
    _, cb = begin(envoy, signer, "alice")
    bao.stop()
    resp = envoy.request("GET", cb, headers=auth(signer, "alice"))
    refused(resp, 503, "token_store", spent=True)
    assert oidc.token_request_count("authorization_code", ok_only=True) == 1
    # A disconnect while the store is down: refused the same way, not "disconnected".
    refused(envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=auth(signer, "alice")), 503, "token_store")
    stats = consent_stats(envoy)
    assert stats["failed.token_store"] == 2 and stats["completed"] == 0 and stats["disconnects"] == 0


def test_token_store_refusing_the_write_or_the_read_at_the_callback(envoy_factory, upstream, signer, oidc, bao):
    """OpenBao up, but refusing: (1) the token may read but no longer write (its policy
    changed): the version read works, the write gets 403: 503 token_store, nothing
    written; with the policy back, a new consent is stored. (2) the token revoked: the
    read gets 403: 503 token_store, nothing written."""
    token = bao.token_store_token()
    envoy = start_with(envoy_factory, oidc, bao, vault_token=token)
    alice, bob = auth(signer, "alice"), auth(signer, "bob")

    _, cb = begin(envoy, signer, "alice")
    bao.policy("latchkey-token-store", read_policy_hcl("latchkey/connections/*"))
    refused(envoy.request("GET", cb, headers=alice), 503, "token_store", spent=True)
    assert bao.kv_versions(record_path(bao, "alice")) == []
    writes = [e for e in bao.audit_requests(path="secret/data/" + record_path(bao, "alice"))
              if e["request"]["operation"] in ("create", "update")]
    assert len(writes) == 1   # latchkey did try to write it
    bao.policy("latchkey-token-store", token_store_policy_hcl())
    _, _, done = connect(envoy, oidc, signer, "alice")
    assert done.status == 200 and bao.kv_read(record_path(bao, "alice"))[1] == 1, done

    _, cb = begin(envoy, signer, "bob")
    bao.revoke_token(token)
    refused(envoy.request("GET", cb, headers=bob), 503, "token_store", spent=True)
    assert bao.kv_versions(record_path(bao, "bob")) == []
    stats = consent_stats(envoy)
    assert stats["failed.token_store"] == 2 and stats["completed"] == 1


def test_store_conflict_at_the_callback(envoy_factory, upstream, signer, oidc, bao, store_relay):
    """Another writer stores alice's record between latchkey's version read and its
    compare-and-set write: OpenBao refuses latchkey's write, the caller gets 503
    store_conflict saying to log in again, and the record is the other writer's, whole: nothing
    of latchkey's half-written."""
    envoy = start_with(envoy_factory, oidc, bao, vault_port=store_relay.port)
    other = {"refresh_token": "rt-written-by-another-proxy", "scopes": "orders.read", "updated": 1}
    store_relay.race_next_writes(lambda path: bao.kv_write(path, other), times=1)
    _, cb = begin(envoy, signer, "alice")
    refused(envoy.request("GET", cb, headers=auth(signer, "alice")), 503, "store_conflict", spent=True)
    path = record_path(bao, "alice")
    assert store_relay.writes_seen == [path] and store_relay.raced == [(path, 1)]
    assert all_versions(bao, path) == [other]
    assert oidc.token_request_count("authorization_code", ok_only=True) == 1
    stats = consent_stats(envoy)
    assert stats["failed.store_conflict"] == 1 and stats["store_conflicts"] == 1
    assert stats["store_writes"] == 1 and stats["completed"] == 0


def test_rotation_write_back_race_on_use(envoy_factory, upstream, signer, oidc, bao, store_relay):
    """The rotation write-back on the use path loses its compare-and-set (another writer
    stored the caller's record between latchkey's read and its write). latchkey never
    injects the access token of the rotation it could not store; it reads the record
    again and serves from what is there now:

    - alice: the other writer stored a working refresh token (a consent given elsewhere,
      for the opaque resource: its access tokens are opaque, where this connection's are
      JWTs). latchkey redeems that one, stores its rotation (cas 2), and the upstream
      gets an opaque token: the one from the re-read record.
    - bob: the other writer stored a refresh token the server no longer knows: the
      re-read record's redemption is invalid_grant: 403 consent_required, nothing
      forwarded.
    - carol: another writer wins every time: after two re-reads latchkey gives up: 503
      credential_unavailable, nothing forwarded, the store holds the other writer's last
      version."""
    envoy = start_with(envoy_factory, oidc, bao, vault_port=store_relay.port)
    for sub in ("alice", "bob", "carol"):
        _, _, done = connect(envoy, oidc, signer, sub)
        assert done.status == 200, done
    assert store_relay.writes_seen == [record_path(bao, s) for s in ("alice", "bob", "carol")]

    def other_consent(path):
        rt = oidc.mint_refresh_token(client_id=CONSENT_CLIENT_ID, account_id="alice",
                                     scope="orders.read", resource=OPAQUE_RESOURCE)
        return bao.kv_write(path, {"refresh_token": rt, "scopes": "orders.read", "updated": 2})

    # alice
    v1 = bao.kv_read(record_path(bao, "alice"))[0]["refresh_token"]
    store_relay.race_next_writes(other_consent, times=1)
    resp = envoy.request("GET", "/orders/a1", headers=auth(signer, "alice"))
    assert resp.status == 200, resp
    injected = upstream.last().header("authorization")[len("Bearer "):]
    assert injected.count(".") != 2, "a JWT: the access token of the rotation that lost the race"
    info = oidc.introspect(injected, client_id=CONSENT_CLIENT_ID)
    assert info["active"] is True and info["sub"] == "alice" and info["aud"] == OPAQUE_RESOURCE, info
    presented = [r["form"]["refresh_token"] for r in oidc.last_token_requests() if r["grant_type"] == "refresh_token"]
    raced_rt = all_versions(bao, record_path(bao, "alice"))[1]["refresh_token"]
    assert presented == [v1, raced_rt]
    versions = all_versions(bao, record_path(bao, "alice"))
    assert len(versions) == 3 and versions[2]["refresh_token"] not in (v1, raced_rt)
    # The stored rotation is the live one: the next token comes from it.
    rt = versions[2]["refresh_token"]
    assert oidc.refresh(rt, client_id=CONSENT_CLIENT_ID).status == 200

    # bob
    store_relay.race_next_writes(
        lambda path: bao.kv_write(path, {"refresh_token": "rt-the-server-never-issued", "scopes": "orders.read"}),
        times=1)
    n = len(upstream.requests())
    resp = envoy.request("GET", "/orders/b1", headers=auth(signer, "bob"))
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp
    assert len(upstream.requests()) == n
    assert [d["refresh_token"] for d in all_versions(bao, record_path(bao, "bob"))][1:] == ["rt-the-server-never-issued"]

    # carol
    store_relay.race_next_writes(other_consent, times=10)
    resp = envoy.request("GET", "/orders/c1", headers=auth(signer, "carol"))
    assert resp.status == 503 and resp.json()["error"] == "credential_unavailable", resp
    assert len(upstream.requests()) == n
    carol = [p for p, _ in store_relay.raced if p == record_path(bao, "carol")]
    assert len(carol) == 3   # the first write and two re-reads' writes, each lost
    assert len(bao.kv_versions(record_path(bao, "carol"))) == 4
    stats = consent_stats(envoy)
    assert stats["store_conflicts"] == 1 + 1 + 3, stats


def test_concurrent_replays_of_one_callback_redeem_it_once(envoy_factory, upstream, signer, oidc, bao):
    """The same callback sent 12 times at once, each on its own connection (Envoy runs two
    workers): the state is admitted once per proxy, so exactly one is redeemed and
    stored, every other one is 400 state_replayed."""
    envoy = start_with(envoy_factory, oidc, bao)
    _, cb = begin(envoy, signer, "alice")
    headers = auth(signer, "alice")
    results: list = [None] * 12
    go = threading.Barrier(len(results))

    def send(i: int) -> None:
        go.wait(timeout=10)
        results[i] = envoy.request("GET", cb, headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(r is not None for r in results)
    ok = [r for r in results if r.status == 200]
    assert len(ok) == 1 and ok[0].json() == {"connected": "mine"}, [r.status for r in results]
    for r in results:
        if r.status != 200:
            refused(r, 400, "state_replayed")
    assert oidc.token_request_count("authorization_code") == 1
    assert bao.kv_versions(record_path(bao, "alice")) == [1]
    stats = consent_stats(envoy)
    assert stats["completed"] == 1 and stats["failed.state_replayed"] == len(results) - 1


def test_token_store_failures_on_the_use_path(envoy_factory, upstream, signer, oidc, bao):
    """On the use path a store failure is a 503 (credential_unavailable), never a token
    from a rotation that could not be stored, and never "consent_required" while the
    store is only unreachable:

    - alice: the rotated refresh token can't be written (the store token may only read):
      503, nothing injected, an error logged. The refresh token still in the store was
      consumed by that rotation, so once the store takes writes again, alice's next
      request finds it refused (invalid_grant): 403 consent_required.
    - bob: OpenBao down: 503 credential_unavailable, not consent_required."""
    envoy = start_with(envoy_factory, oidc, bao)
    alice, bob = auth(signer, "alice"), auth(signer, "bob")
    for sub in ("alice", "bob"):
        _, _, done = connect(envoy, oidc, signer, sub)
        assert done.status == 200, done

    bao.policy("latchkey-token-store", read_policy_hcl("latchkey/connections/*"))
    resp = envoy.request("GET", "/orders/a1", headers=alice)
    assert resp.status == 503 and resp.json()["error"] == "credential_unavailable", resp
    assert upstream.requests() == []
    assert bao.kv_versions(record_path(bao, "alice")) == [1]
    assert oidc.token_request_count("refresh_token", ok_only=True) == 1
    envoy.wait_for_log("connection mine: can't store the rotated refresh token")
    bao.policy("latchkey-token-store", token_store_policy_hcl())
    # The failed fetch is retried after latchkey's backoff (meanwhile: 503 again).
    resp = wait_until(lambda: (r := envoy.request("GET", "/orders/a2", headers=alice)).status != 503 and r,
                      timeout=15, message="alice's next answer after the store takes writes again")
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp
    assert upstream.requests() == []

    bao.stop()
    resp = envoy.request("GET", "/orders/b1", headers=bob)
    assert resp.status == 503 and resp.json()["error"] == "credential_unavailable", resp
    assert upstream.requests() == []


# --------------------------------------------------------------------------- secrets stay secret


def test_secrets_never_in_the_log_the_answers_or_the_stats(envoy_factory, upstream, signer, oidc, bao):
    """With wasm debug logging, through a consent, uses with rotations, refusals and
    failures: the Envoy log, the access log, every answer latchkey gave and every stat
    name hold none of: the codes, the PKCE verifiers, the state key, the refresh tokens
    (every version stored), the access tokens the upstream received, the client secret,
    the store token."""
    vault_token = bao.token_store_token()
    envoy = start_with(envoy_factory, oidc, bao, vault_token=vault_token,
                       component_log_level="wasm:debug")
    alice = auth(signer, "alice")
    answers, codes, nonces = [], [], []

    def send(method, path, headers=alice):
        resp = envoy.request(method, path, headers=headers)
        if not path.startswith("/orders/"):   # latchkey's own answers (the echo upstream's
            answers.append(resp)              # show what it received: the token, of course)
        return resp

    login, cb_url, done = connect(envoy, oidc, signer, "alice", return_to=PORTAL)
    answers += [login, done]
    cb = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb_url).query))
    codes.append(cb["code"])
    nonces.append(state_payload(cb["state"])["n"])
    assert done.status == 302
    assert send("GET", "/orders/1").status == 200
    refresh_tokens = [d["refresh_token"] for d in all_versions(bao, record_path(bao, "alice"))]
    assert len(refresh_tokens) == 2
    # Refusals and failures that carry a code or a state.
    assert send("GET", path_of(cb_url)).status == 400                                  # replayed
    minted = mint_state("alice")
    nonces.append(state_payload(minted)["n"])
    assert send("GET", callback(code=cb["code"], state=minted, iss=oidc.issuer)).status == 400  # code_rejected
    assert send("GET", callback(code=cb["code"], state=cb["state"] + "x", iss=oidc.issuer)).status == 400
    assert send("GET", path_of(cb_url), headers=auth(signer, "bob")).status == 403
    c2, cb2 = begin(envoy, signer, "bob")
    codes.append(c2["code"])
    nonces.append(state_payload(c2["state"])["n"])
    bao.policy("latchkey-token-store", read_policy_hcl("latchkey/connections/*"))
    assert send("GET", cb2, headers=auth(signer, "bob")).status == 503                 # store refuses
    bao.policy("latchkey-token-store", token_store_policy_hcl())
    # A disconnect revokes; a reconnect, another rotation.
    assert send("DELETE", f"{CONSENT_PATH}/mine").status == 200
    login, cb_url, done = connect(envoy, oidc, signer, "alice")
    answers += [login, done]
    cb = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb_url).query))
    codes.append(cb["code"])
    nonces.append(state_payload(cb["state"])["n"])
    assert send("GET", "/orders/2").status == 200

    refresh_tokens += [d["refresh_token"] for d in all_versions(bao, record_path(bao, "alice"))]
    assert len(set(refresh_tokens)) == 4
    access_tokens = [r.header("authorization")[len("Bearer "):] for r in upstream.requests()]
    assert len(set(access_tokens)) == 2
    # What latchkey sent the token server holds the verifiers this test computes.
    sent = [r["form"].get("code_verifier") for r in oidc.last_token_requests()
            if r["grant_type"] == "authorization_code"]
    verifiers = [pkce_verifier(n) for n in nonces]
    assert sent == verifiers
    secrets_ = {"code": codes, "pkce verifier": verifiers, "state key": [STATE_KEY],
                "refresh token": refresh_tokens, "access token": access_tokens,
                "client secret": [CONSENT_CLIENT_SECRET], "store token": [vault_token]}

    envoy.wait_for_log("consent stored")
    places = {"envoy log": envoy.log_text(), "access log": envoy.access_log_text(),
              "stat names": "\n".join(envoy.stats(settle=True)),
              "answers": "\n".join(f"{r.status} {r.headers} {r.body.decode(errors='replace')}" for r in answers)}
    found = [(what, where) for what, values in secrets_.items() for v in values
             for where, text in places.items() if v in text]
    assert found == []
    assert "consent" in places["envoy log"]  # debug logging was on, and latchkey logged


# --------------------------------------------------------------------------- Key Vault


@pytest.fixture
def kv_stack():
    with KeyVaultStack() as s:
        yield s
    assert s.errors == []


def kv_consent_config(oidc, stack) -> dict:
    return {
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"}, "state_key": {"env": "STATE_KEY"}},
        "providers": {
            "idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                    "authorization_url": oidc.authorization_endpoint, "issuer": oidc.issuer,
                    "revocation_url": oidc.revocation_url,
                    "client_id": CONSENT_CLIENT_ID, "client_secret": "client_secret", "timeout_ms": 3000},
            "azure_mi": {"type": "azure_managed_identity", "cluster": "imds", "endpoint": stack.imds.endpoint},
        },
        "token_stores": {"user_tokens": {"azure_key_vault": stack.kv.vault_url, "cluster": "keyvault",
                                         "identity": "kv_mi", "prefix": "latchkey-connections"}},
        "consent": {"path": CONSENT_PATH, "redirect_uri": REDIRECT_URI, "state_key": "state_key",
                    "return_to": [PORTAL]},
        "connections": {
            "kv_mi": {"provider": "azure_mi", "resource": "https://vault.azure.net"},
            "mine": {"provider": "idp", "grant": "authorization_code", "per_user": True,
                     "scopes": ["orders.read"], "store": "user_tokens", "access": {"authenticated": True}},
        },
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["mine"], "header": "authorization"}]}],
    }


def test_key_vault_token_store(envoy_factory, upstream, signer, oidc, kv_stack):
    """A Key Vault token store (through the stand-in, with the gateway's managed identity):
    the consent is stored as secret latchkey-connections-mine-<caller hash> holding JSON
    {"refresh_token", ...}; a use rotates it (a new version, read back); a disconnect
    writes "{}" (no DELETE: Key Vault keeps deleted names) and the next request needs
    consent; a reconnect writes the same name again. Then a rotation with another writer
    right after latchkey's write (no compare-and-set in Key Vault): the read-back sees the
    other value, latchkey redeems that one and serves its token."""
    kv = kv_stack.kv
    envoy = envoy_factory(kv_consent_config(oidc, kv_stack), routes=ROUTES,
                          wasm_env={"CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": STATE_KEY},
                          extra_clusters=[static_cluster("idp", oidc.port), *kv_stack.clusters()],
                          component_log_level="wasm:debug")
    alice = auth(signer, "alice")
    name = f"latchkey-connections-mine-{caller_hash('alice')}"

    def value(write) -> dict:
        return json.loads(write.value)

    resp = envoy.request("GET", "/orders/0", headers=alice)
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp

    _, _, done = connect(envoy, oidc, signer, "alice")
    assert done.status == 200 and done.json() == {"connected": "mine"}, done
    (w1,) = kv.writes(name)
    assert w1.content_type == "application/json"
    assert w1.client_id == kv_stack.imds.system_identity.client_id
    r1 = value(w1)
    assert set(r1) == {"refresh_token", "scopes", "updated"} and r1["scopes"] == "orders.read"
    assert kv.names() == [name]

    resp = envoy.request("GET", "/orders/1", headers=alice)
    assert resp.status == 200 and upstream_sub(upstream) == "alice", resp
    w1_, w2 = kv.writes(name)
    r2 = value(w2)
    assert r2["refresh_token"] != r1["refresh_token"] and kv.versions(name) == [w1.version, w2.version]
    assert kv.reads(name)[-1].at > w2.at   # read back after the write
    assert oidc.refresh(r1["refresh_token"], client_id=CONSENT_CLIENT_ID).body["error"] == "invalid_grant"

    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=alice)
    assert gone.status == 200 and gone.json() == {"disconnected": "mine", "revoked": True}, gone
    assert kv.deletes() == [] and [r.method for r in kv.requests() if r.method == "DELETE"] == []
    w3 = kv.writes(name)[-1]
    assert w3.value == "{}" and kv.secret_value(name) == "{}"
    resp = envoy.request("GET", "/orders/2", headers=alice)
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp

    _, _, done = connect(envoy, oidc, signer, "alice")
    assert done.status == 200, done
    r4 = value(kv.writes(name)[-1])
    assert r4["refresh_token"] not in (r1["refresh_token"], r2["refresh_token"])
    resp = envoy.request("GET", "/orders/3", headers=alice)
    assert resp.status == 200 and upstream_sub(upstream) == "alice", resp
    assert len(kv.writes(name)) == 5 and len(kv.versions(name)) == 5

    # bob, with another writer landing right after latchkey's rotation write.
    bob = auth(signer, "bob")
    bob_name = f"latchkey-connections-mine-{caller_hash('bob')}"
    _, _, done = connect(envoy, oidc, signer, "bob")
    assert done.status == 200, done
    other_rt = oidc.mint_refresh_token(client_id=CONSENT_CLIENT_ID, account_id="bob",
                                       scope="orders.read", resource=OPAQUE_RESOURCE)
    raced = kv.race_next_write(json.dumps({"refresh_token": other_rt, "scopes": "orders.read"}), name=bob_name)
    resp = envoy.request("GET", "/orders/b", headers=bob)
    assert resp.status == 200, resp
    assert len(raced) == 1
    injected = upstream.last().header("authorization")[len("Bearer "):]
    assert injected.count(".") != 2, "a JWT: the token of the rotation another writer overwrote"
    info = oidc.introspect(injected, client_id=CONSENT_CLIENT_ID)
    assert info["active"] is True and info["sub"] == "bob" and info["aud"] == OPAQUE_RESOURCE, info
    last = value(kv.writes(bob_name)[-1])
    assert kv.latest_version(bob_name) == kv.writes(bob_name)[-1].version
    assert oidc.refresh(last["refresh_token"], client_id=CONSENT_CLIENT_ID).status == 200

    log = envoy.log_text()
    for secret in [r1["refresh_token"], r2["refresh_token"], r4["refresh_token"], other_rt,
                   *(t.token for t in kv_stack.imds.issued())]:
        assert secret not in log
