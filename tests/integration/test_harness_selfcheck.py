"""Self-check of the harness with NO wasm filter: jwt_authn + router in a real Envoy."""

from __future__ import annotations

import json

import pytest

from harness import (Envoy, EnvoyStartError, Signer, Upstream, bearer, envoy_config, free_port,
                     http_request, noop_proxy_wasm_module, pid_alive, validate)


def test_jwt_authn_and_router_without_wasm(envoy_factory, upstream, signer):
    envoy = envoy_factory(wasm_path=None)
    pid = envoy.pid
    assert envoy.admin_get("/ready") == (200, b"LIVE\n")

    # No JWT: allowed through with no claims.
    resp = envoy.request("GET", "/orders/1?x=1")
    assert resp.status == 200, resp
    assert resp.json()["path"] == "/orders/1?x=1"
    assert upstream.last().path == "/orders/1?x=1"
    assert upstream.last().header("authorization") is None

    # A valid JWT: verified, then removed by jwt_authn (forward: false) before upstream.
    upstream.clear()
    token = signer.token({"sub": "alice", "groups": ["billing"]})
    status, _, body = envoy.request("GET", "/anything", headers=[bearer(token)])
    assert status == 200, body
    assert [r.path for r in upstream.requests()] == ["/anything"]
    assert upstream.last().header("authorization") is None

    # A JWT from an unknown key, and an expired one: 401 from jwt_authn, upstream untouched.
    upstream.clear()
    foreign = Signer().token({"sub": "mallory"})
    status, headers, body = envoy.request("GET", "/orders/1", headers=[bearer(foreign)])
    assert status == 401, body
    status, _, body = envoy.request("GET", "/orders/1",
                                    headers=[bearer(signer.token({"sub": "a"}, exp_in=-120))])
    assert status == 401, body
    assert upstream.requests() == []
    assert envoy.stat("http.ingress_http.jwt_authn.denied") == 2
    assert envoy.stat("http.ingress_http.jwt_authn.allowed") >= 1

    # Duplicate headers and a non-UTF-8 value reach the upstream byte for byte.
    status, _, body = envoy.request("POST", "/dup", body=b"payload", headers=[
        ("x-dup", "one"), ("x-dup", "two"), ("x-raw", b"\xff\xfe")])
    assert status == 200, body
    rec = upstream.last()
    assert rec.method == "POST" and rec.body == b"payload"
    assert rec.header_values("x-dup") == ["one", "two"]
    assert rec.header("x-raw").encode("latin-1") == b"\xff\xfe"

    # normalize_path + merge_slashes act on the path; the query is kept as sent.
    status, _, _ = envoy.request("GET", "/a/../orders//7?q=%2F..%2F&q=2")
    assert status == 200
    assert upstream.last().path == "/orders/7?q=%2F..%2F&q=2"

    # Canned upstream responses pass through Envoy.
    upstream.respond_with(status=401, path_prefix="/x", body={"err": "nope"}, times=1)
    status, _, body = envoy.request("GET", "/x/1")
    assert (status, json.loads(body)) == (401, {"err": "nope"})
    assert envoy.request("GET", "/x/1").status == 200

    # Access log lines carry the route name; filter state is "-" without latchkey.
    lines = envoy.wait_for_access_log(count=7)
    assert any("route=orders" in line and "latchkey_decision=-" in line for line in lines), lines

    assert envoy.stop() == 0
    assert not pid_alive(pid)
    assert not envoy.running


def test_config_validates_and_context_managers(tmp_path, signer):
    with Upstream() as up:
        config = envoy_config(free_port(), free_port(), up.port, None, None, signer.jwks(),
                              claims_header_forward=True)
        path = tmp_path / "bootstrap.json"
        path.write_text(json.dumps(config))
        result = validate(path)
        assert result.returncode == 0, result.stdout + result.stderr

        with Envoy(config, tmp_path / "e") as envoy:
            pid = envoy.pid
            resp = http_request(envoy.port, "GET", "/", headers={"x-a": "b"})
            assert resp.status == 200 and resp.json()["headers"]
        assert not pid_alive(pid)



def test_wasm_filter_config_loads_with_noop_module(envoy_factory, upstream, tmp_path):
    """The wasm filter config (StringValue configuration, env vars, failure policy) is
    accepted by Envoy, checked with a hand-made no-op module instead of latchkey."""
    module = tmp_path / "noop.wasm"
    module.write_bytes(noop_proxy_wasm_module())
    envoy = envoy_factory({"any": "config"}, wasm_path=module, wasm_env={"K": "v"},
                          failure_policy="FAIL_RELOAD", component_log_level="wasm:debug")
    assert envoy.request("GET", "/orders/1").status == 200
    assert upstream.last().path == "/orders/1"
    assert "latchkey_decision=-" in envoy.wait_for_access_log(1)[0]


def test_plugin_refusing_config_fails_start_with_log(envoy_factory, tmp_path):
    """on_configure returning false makes Envoy exit; the harness raises with the log tail."""
    module = tmp_path / "refuse.wasm"
    module.write_bytes(noop_proxy_wasm_module(configure_ok=False))
    with pytest.raises(EnvoyStartError, match="Unable to create Wasm plugin latchkey"):
        envoy_factory({}, wasm_path=module)
