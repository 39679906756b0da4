"""OAuth2 tokens in a real Envoy (concurrency 2), against the fault-injecting fake
token server (token_servers.FaultTokenServer) for everything a real server won't do
on demand. Interop with a real OAuth server is in test_oauth_interop.py.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse

import pytest

from harness import free_port, note_request_sent, static_cluster, wait_until
from token_servers import FaultTokenServer, closed_port

CLIENT_SECRET = "cs-9f8e7d-very-secret"
REFRESH_TOKEN = "rt-configured-0"
ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]
UNAVAILABLE = {"error": "credential_unavailable", "route": "orders", "connection": "orders_read"}


def oauth_config(port, *, timeout_ms=1000, auth_method="client_secret_basic", grant="client_credentials",
                 cluster="idp", drop_token_on_401=True, **provider_extra):
    """`provider_extra`: more provider fields (e.g. drop_on_401_after_s)."""
    conn = {"provider": "idp", "grant": grant, "scopes": ["orders.read"],
            "audience": "https://api.test", "access": {"public": True}}
    if grant == "refresh_token":
        conn["refresh_token"] = "rt"
    return {
        "filter_state": True,  # an access-log assertion reads it
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"}, "rt": {"env": "REFRESH_TOKEN"}},
        "providers": {"idp": {"type": "oauth2", "cluster": cluster,
                              "token_url": f"http://127.0.0.1:{port}/token",
                              "client_id": "gw client", "client_secret": "client_secret",
                              "auth_method": auth_method, "timeout_ms": timeout_ms, **provider_extra}},
        "connections": {"orders_read": conn},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["orders_read"], "header": "authorization"}],
                    "drop_token_on_401": drop_token_on_401}],
    }


@pytest.fixture
def idp():
    with FaultTokenServer(ttl=3600) as server:
        yield server


def start(envoy_factory, idp_port, **kw):
    envoy_kw = {k: kw.pop(k) for k in ("component_log_level",) if k in kw}
    return envoy_factory(oauth_config(idp_port, **kw), routes=ROUTES,
                         wasm_env={"CLIENT_SECRET": CLIENT_SECRET, "REFRESH_TOKEN": REFRESH_TOKEN},
                         extra_clusters=[static_cluster("idp", idp_port)], **envoy_kw)


def tstat(envoy, name):
    return envoy.stat(f"wasmcustom.latchkey.connection.orders_read.token.{name}")


def token_failures(envoy) -> dict:
    """orders_read's failed fetches by kind (there is no total beside the kinds)."""
    prefix = "wasmcustom.latchkey.connection.orders_read.token.failure."
    found = envoy.stats(filter="^" + prefix.replace(".", r"\."))
    assert found, f"no {prefix}<kind> stats"
    return {k[len(prefix):]: v for k, v in found.items() if v}


def assert_unavailable(resp):
    assert resp.status == 503, resp
    assert resp.header("content-type") == "application/json"
    assert json.loads(resp.body) == UNAVAILABLE
    assert int(resp.header("retry-after")) >= 1


# ---------------------------------------------------------------- fetch, inject, reuse


def test_token_fetched_once_injected_and_reused(envoy_factory, upstream, idp):
    envoy = start(envoy_factory, idp.port)
    for i in range(3):
        resp = envoy.request("GET", f"/orders/{i}", headers=[("authorization", "Basic Y2xpZW50Om93bg==")])
        assert resp.status == 200, resp
        assert upstream.last().header_values("authorization") == ["Bearer fake-1"]
    assert idp.count() == 1
    req = idp.last()
    assert (req.method, req.path) == ("POST", "/token")
    assert req.body == b"grant_type=client_credentials&scope=orders.read&audience=https%3A%2F%2Fapi.test"
    assert req.header("content-type") == "application/x-www-form-urlencoded"
    assert req.header("host") == f"127.0.0.1:{idp.port}"
    assert req.basic_auth() == ("gw client", CLIENT_SECRET)
    raw = base64.b64decode(req.header("authorization").split(" ", 1)[1]).decode()
    assert raw == "gw+client:" + urllib.parse.quote_plus(CLIENT_SECRET)  # RFC 6749 §2.3.1
    assert tstat(envoy, "requests") == 1
    assert tstat(envoy, "success") == 1
    assert tstat(envoy, "wait") == 1
    assert tstat(envoy, "cache_hit") == 2
    assert envoy.stat("wasmcustom.latchkey.connection.orders_read.token.state") == 2  # ready
    assert envoy.stat("wasmcustom.latchkey.connection.orders_read.injected") == 3


def test_client_secret_post(envoy_factory, upstream, idp):
    envoy = start(envoy_factory, idp.port, auth_method="client_secret_post")
    assert envoy.request("GET", "/orders").status == 200
    req = idp.last()
    assert req.header("authorization") is None
    assert req.body == (b"grant_type=client_credentials&scope=orders.read&audience=https%3A%2F%2Fapi.test"
                        b"&client_id=gw+client&client_secret=" + urllib.parse.quote_plus(CLIENT_SECRET).encode())


def test_fifty_concurrent_cold_requests_make_one_token_request(envoy_factory, upstream, idp):
    idp.set_mode(delay_s=0.5)
    envoy = start(envoy_factory, idp.port, timeout_ms=5000)
    results = []

    def one(i):
        resp = envoy.request("GET", f"/orders/{i}")
        results.append(resp.status)
        if resp.status != 200:
            print("non-200:", resp.status, resp.headers, resp.body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [200] * 50, envoy.access_log_text()
    assert idp.count() == 1
    assert {r.header("authorization") for r in upstream.requests()} == {"Bearer fake-1"}
    assert tstat(envoy, "requests") == 1


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("mode,kind", [
    ({"status": 500}, "status"),
    ({"error_json": "invalid_client"}, "oauth_error"),
    ({"garbage": True}, "malformed"),
    ({"missing_token": True}, "missing_token"),
    ({"wrong_type": True}, "wrong_token_type"),
    ({"huge": 100_000}, "too_large"),
    ({"delay_s": 3}, "timeout"),
    ({"close": True}, "connect"),
])
def test_each_fault_is_a_503_within_the_timeout(envoy_factory, upstream, idp, mode, kind):
    idp.set_mode(**mode)
    envoy = start(envoy_factory, idp.port, timeout_ms=1000)
    t0 = time.monotonic()
    resp = envoy.request("GET", "/orders")
    elapsed = time.monotonic() - t0
    assert_unavailable(resp)
    assert elapsed < 2.5, elapsed
    assert upstream.requests() == []
    # The request's deadline and the call's timeout are both timeout_ms: the 503 may
    # go out a moment before the failed fetch is counted.
    prefix = "wasmcustom.latchkey.connection.orders_read.token"
    envoy.wait_for_stat(f"{prefix}.failure.{kind}", 1)
    assert token_failures(envoy) == {kind: 1}
    assert envoy.stat("wasmcustom.latchkey.requests.unavailable") == 1
    line = envoy.wait_for_access_log(1)[-1]
    assert "latchkey_connection=orders_read latchkey_decision=credential_unavailable" in line
    envoy.wait_for_log(f"token fetch failed: {kind}")


def test_closed_port_is_a_connect_failure(envoy_factory, upstream):
    port = closed_port()
    envoy = start(envoy_factory, port)
    assert_unavailable(envoy.request("GET", "/orders"))
    assert tstat(envoy, "failure.connect") == 1


def test_unknown_cluster_fails_fast(envoy_factory, upstream, idp):
    envoy = start(envoy_factory, idp.port, cluster="no_such_cluster")
    assert_unavailable(envoy.request("GET", "/orders"))
    assert tstat(envoy, "failure.dispatch") == 1
    assert idp.count() == 0


def test_backoff_rejects_at_once_without_stampede_then_recovers(envoy_factory, upstream, idp):
    idp.set_mode(status=503)
    envoy = start(envoy_factory, idp.port)
    assert_unavailable(envoy.request("GET", "/orders"))
    assert idp.count() == 1
    t0 = time.monotonic()
    for _ in range(20):
        resp = envoy.request("GET", "/orders")
        assert_unavailable(resp)
    assert time.monotonic() - t0 < 0.5  # answered at once: nothing waited on the token server
    assert idp.count() == 1  # no stampede during backoff
    assert tstat(envoy, "backoff_rejected") >= 20
    idp.reset_mode()
    # The first backoff lasts 0.5-1 s; the first request after it fetches again.
    wait_until(lambda: envoy.request("GET", "/orders").status == 200, timeout=5, interval=0.2,
               message="recovery after backoff")
    assert idp.count() == 2
    assert upstream.last().header("authorization") == "Bearer fake-1"


def test_client_leaving_while_waiting_is_forgotten(envoy_factory, upstream, idp):
    idp.set_mode(delay_s=1.0, times=1)
    envoy = start(envoy_factory, idp.port, timeout_ms=3000)
    import socket
    with socket.create_connection(("127.0.0.1", envoy.port)) as s:
        s.sendall(b"GET /orders HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
    wait_until(lambda: idp.count() == 1, timeout=5)
    time.sleep(1.2)  # the token arrives after the client left
    resp = envoy.request("GET", "/orders")
    assert resp.status == 200
    assert upstream.last().header("authorization") == "Bearer fake-1"
    assert envoy.stat("wasmcustom.latchkey.requests.internal_error") == 0


# ---------------------------------------------------------------- upstream 401, refresh tokens


def next_token(envoy, upstream, want, path="/orders/b"):
    """Requests until the upstream receives token `want` (an upstream 401 refreshes
    in the background: the old token serves until the new one is installed)."""
    wait_until(lambda: envoy.request("GET", path).status == 200
               and upstream.last().header("authorization") == f"Bearer {want}",
               timeout=5, interval=0.05, message=f"token {want} in use")


def test_upstream_401_refreshes_the_token(envoy_factory, upstream, idp):
    envoy = start(envoy_factory, idp.port, drop_on_401_after_s=0)
    assert envoy.request("GET", "/orders/a").status == 200
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject").status == 401
    next_token(envoy, upstream, "fake-2")
    assert idp.count() == 2
    assert tstat(envoy, "dropped_on_401") == 1


def test_upstream_401_drops_every_workers_copy(envoy_factory, upstream, idp):
    """Each worker VM serves a token from its own copy (no shared-data read per
    request); a 401 seen by one worker must end every worker's use of that token at
    once, not at their next tick. 16 keep-alive connections spread over both workers
    (checked from the worker thread ids in the debug log); one of them gets the 401;
    the very next request on each connection carries the new token."""
    import http.client
    import re

    envoy = start(envoy_factory, idp.port, component_log_level="wasm:debug", drop_on_401_after_s=0)
    conns = [http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10) for _ in range(16)]

    def get(conn, path):
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            note_request_sent()

    try:
        for rnd in range(2):  # the second round is served from each worker's copy
            for i, c in enumerate(conns):
                assert get(c, f"/orders/warm-{rnd}-{i}") == 200
        assert {r.header("authorization") for r in upstream.requests()} == {"Bearer fake-1"}
        assert idp.count() == 1
        line = re.compile(r"\]\[(\d+)\]\[debug\]\[wasm\].*route=orders connection=orders_read decision=allowed")
        workers = {m.group(1) for m in line.finditer(envoy.log_text())}
        assert len(workers) == 2, f"the 16 connections all landed on one worker: {workers}"

        # Three times, from a different connection each time: a worker's tick
        # (about once a second) would also drop its copy, so one round alone could
        # pass by luck without the generation check.
        for rnd, first in enumerate((0, 5, 11)):
            upstream.respond_with(401, path_prefix="/orders/reject", times=1)
            assert get(conns[first], "/orders/reject") == 401
            # The refresh runs in the background; once the worker that saw the 401
            # serves the new token, it is installed, and every worker must use it.
            want = f"Bearer fake-{rnd + 2}"
            wait_until(lambda: get(conns[first], f"/orders/probe-{rnd}") == 200
                       and upstream.last().header("authorization") == want,
                       timeout=5, interval=0.02, message=f"{want} installed")
            seen = len(upstream.requests())
            for i, c in enumerate(conns):
                assert get(c, f"/orders/after-{rnd}-{i}") == 200
            after = upstream.requests()[seen:]
            assert [r.header("authorization") for r in after] == [f"Bearer fake-{rnd + 2}"] * len(conns), rnd
    finally:
        for c in conns:
            c.close()
    assert idp.count() == 4
    assert tstat(envoy, "dropped_on_401") == 3


def test_upstream_401_keeps_the_token_when_disabled(envoy_factory, upstream, idp):
    envoy = start(envoy_factory, idp.port, drop_token_on_401=False)
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject").status == 401
    assert envoy.request("GET", "/orders/b").status == 200
    assert upstream.last().header("authorization") == "Bearer fake-1"
    assert idp.count() == 1


def test_refresh_token_grant_uses_the_rotated_token(envoy_factory, upstream, idp):
    idp.set_mode(rotate_refresh=True)
    envoy = start(envoy_factory, idp.port, grant="refresh_token", drop_on_401_after_s=0)
    assert envoy.request("GET", "/orders/a").status == 200
    assert idp.last().body == (b"grant_type=refresh_token&refresh_token=" + REFRESH_TOKEN.encode()
                               + b"&scope=orders.read&audience=https%3A%2F%2Fapi.test")
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject").status == 401
    next_token(envoy, upstream, "fake-2")
    assert idp.count() == 2
    assert idp.last().form["refresh_token"] == "rt-1"


# ---------------------------------------------------------------- refresh ahead


def test_refresh_ahead_under_steady_traffic(envoy_factory, upstream, idp):
    """30 s of traffic, 10 s tokens, a token server that takes 1 s: after the first
    request nobody waits, no request carries an expired token, a handful of fetches."""
    idp.ttl = 10
    idp.set_mode(delay_s=1.0)
    envoy = start(envoy_factory, idp.port, timeout_ms=3000)
    slow = []
    t_end = time.monotonic() + 30
    n = 0
    while time.monotonic() < t_end and n < 1500:
        t0 = time.monotonic()
        assert envoy.request("GET", f"/orders/{n}").status == 200
        if n > 0 and time.monotonic() - t0 > 0.5:
            slow.append(n)
        n += 1
        time.sleep(0.02)
    assert slow == []
    assert tstat(envoy, "wait") == 1
    # fake-k was requested at issued[k] and lived 10 s from when the server sent it
    # (after its 1 s delay); requests must carry it only before issued[k] + 10 s,
    # a bound stricter than its real expiry.
    issued = {f"Bearer fake-{i + 1}": r.at for i, r in enumerate(idp.requests())}
    used = upstream.requests()
    assert len(used) == n
    for rec in used:
        token = rec.header("authorization")
        assert token in issued
        assert rec.at < issued[token] + 10, (token, rec.at - issued[token])
    # One fetch to start, then one refresh about every 5 s (half the lifetime).
    assert 5 <= idp.count() <= 9, idp.count()
    assert token_failures(envoy) == {}


# ---------------------------------------------------------------- secrets


def test_no_secret_or_token_in_debug_log(envoy_factory, upstream, idp):
    idp.set_mode(rotate_refresh=True)
    envoy = start(envoy_factory, idp.port, grant="refresh_token", component_log_level="wasm:debug",
                  drop_on_401_after_s=0)
    assert envoy.request("GET", "/orders").status == 200
    idp.set_mode(status=500)
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    envoy.request("GET", "/orders/reject")
    envoy.wait_for_log("token fetch failed: status")
    # The refresh the 401 started failed: the token, still valid, keeps serving.
    assert envoy.request("GET", "/orders").status == 200
    assert upstream.last().header("authorization") == "Bearer fake-1"
    text = envoy.log_text() + envoy.access_log_text()
    for secret in [CLIENT_SECRET, REFRESH_TOKEN, "rt-1", "fake-1",
                   base64.b64encode(f"gw+client:{CLIENT_SECRET}".encode()).decode()]:
        assert secret not in text, f"{secret} reached the log"
