"""latchkey in a real Envoy 1.40: jwt_authn in front, an echo upstream behind.

Each test starts its own Envoy (concurrency 2) with the freshly built module and
asserts what the client got (status, headers, body), what the upstream received,
and Envoy's stats.
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse

import pytest

from harness import REPO_ROOT, EnvoyStartError, bearer

PARTNER_KEY = "pk-live-7Hq2xNw9-partner"
OPS_KEY = "ops-inline-K3y-value"
QUERY_KEY = "qk/with space&=+é"
WASM_ENV = {"PARTNER_KEY": PARTNER_KEY, "QUERY_KEY": QUERY_KEY}
SECRETS = [PARTNER_KEY, OPS_KEY, QUERY_KEY, urllib.parse.quote(QUERY_KEY, safe="")]

ROUTES = [
    {"name": "orders", "prefix": "/orders"},
    {"name": "default", "prefix": "/"},
]


def plugin_config(**overrides):
    cfg = {
        "filter_state": True,  # the access-log assertions below read it
        "secrets": {
            "partner_key": {"env": "PARTNER_KEY"},
            "query_key": {"env": "QUERY_KEY"},
            "ops_key": {"inline": OPS_KEY},
        },
        "providers": {"partner": {"type": "api_key"}},
        "connections": {
            "ops": {"provider": "partner", "api_key": "ops_key", "access": {"users": ["olga"]}},
            "billing": {"provider": "partner", "api_key": "partner_key",
                        "access": {"groups": ["billing"]}},
            "open_search": {"provider": "partner", "api_key": "query_key",
                            "access": {"public": True}},
            "tiered": {"provider": "partner", "api_key": "partner_key",
                       "access": {"claims": {"org.tier": ["2", "3"], "beta": ["true"]}}},
        },
        "routes": [
            {"name": "orders", "match": {"route_name": "orders"},
             "access": {"authenticated": True},
             "inject": [{"connections": ["ops", "billing"], "header": "x-api-key"}],
             "strip": ["x-debug"]},
            {"name": "search", "match": {"path_prefix": "/search", "methods": ["GET"]},
             "inject": [{"connections": ["open_search"], "query": "api_key"}]},
            {"name": "tier", "match": {"path_exact": "/tier"},
             "inject": [{"connections": ["tiered"], "header": "authorization", "prefix": "Key "}]},
            {"name": "hosted", "match": {"host": "API.example.com", "path_prefix": "/h"},
             "access": {"groups": ["ops"]}},
        ],
        "unmatched": "allow",
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def envoy(envoy_factory):
    return envoy_factory(plugin_config(), wasm_env=WASM_ENV, routes=ROUTES,
                         hcm_extra={"max_request_headers_kb": 96})


def stat(envoy, name):
    return envoy.stat(f"wasmcustom.latchkey.{name}")


def assert_local_reply(resp, status, body):
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json"
    assert json.loads(resp.body) == body
    assert resp.body == json.dumps(body, separators=(",", ":")).encode()


# ---------------------------------------------------------------- header injection


def test_header_key_injected_for_group_member_and_client_copies_removed(envoy, upstream, signer):
    token = signer.token({"sub": "bob", "groups": ["staff", "billing"]})
    resp = envoy.request("GET", "/orders/1", headers=[
        bearer(token), ("x-api-key", "evil-1"), ("X-Api-Key", "evil-2"), ("x_api_key", "evil-3"),
        ("X_API-KEY", "evil-4"), ("x-debug", "1"), ("x-keep", "yes")])
    assert resp.status == 200, resp
    got = upstream.last()
    assert got.path == "/orders/1"
    assert got.header_values("x-api-key") == [PARTNER_KEY]
    names = [n.lower() for n, _ in got.headers]
    assert "x_api_key" not in names and "x_api-key" not in names
    assert "x-debug" not in names
    assert got.header("x-keep") == "yes"
    assert stat(envoy, "requests.allowed") == 1
    assert stat(envoy, "connection.billing.injected") == 1
    assert stat(envoy, "connection.ops.injected") == 0


def test_first_admitting_connection_wins(envoy, upstream, signer):
    token = signer.token({"sub": "olga", "groups": ["billing"]})
    assert envoy.request("GET", "/orders", headers=[bearer(token)]).status == 200
    assert upstream.last().header_values("x-api-key") == [OPS_KEY]
    line = envoy.wait_for_access_log(1)[-1]
    assert "latchkey_route=orders latchkey_connection=ops latchkey_decision=allowed" in line


def test_counters_reach_envoy_within_a_second(envoy, upstream):
    """Counts are kept in the VM and flushed on its 1 s tick (docs/operations.md, Stats)."""
    import time
    sent = time.monotonic()
    for _ in range(5):
        assert envoy.request("GET", "/search?q=1").status == 200
    envoy.wait_for_stat("wasmcustom.latchkey.requests.allowed", 5, timeout=5)
    assert time.monotonic() - sent < 3.0
    assert stat(envoy, "connection.open_search.injected") == 5


def test_filter_state_is_off_unless_asked_for(envoy_factory, upstream, signer):
    """v1.1: no filter state without "filter_state": true, and the load says so."""
    cfg = plugin_config()
    del cfg["filter_state"]
    envoy = envoy_factory(cfg, wasm_env=WASM_ENV, routes=ROUTES)
    envoy.wait_for_log(r"info.*filter_state is not set: access logs get no wasm\.latchkey\.route")
    token = signer.token({"sub": "olga", "groups": ["billing"]})
    assert envoy.request("GET", "/orders", headers=[bearer(token)]).status == 200
    assert upstream.last().header_values("x-api-key") == [OPS_KEY]
    line = envoy.wait_for_access_log(1)[-1]
    assert "latchkey_route=- latchkey_connection=- latchkey_decision=-" in line
    assert envoy.request("GET", "/orders").status == 401
    line = envoy.wait_for_access_log(2)[-1]
    assert "latchkey_route=- latchkey_connection=- latchkey_decision=-" in line


def test_local_replies_say_why_in_the_response_details(envoy, upstream, signer):
    """%RESPONSE_CODE_DETAILS% (Istio's default access log has it) names latchkey's
    decision for every reply it writes itself; a forwarded request keeps Envoy's own."""
    eve = bearer(signer.token({"sub": "eve", "groups": ["staff"]}))
    olga = bearer(signer.token({"sub": "olga", "groups": ["billing"]}))
    cases = [([], 401, "latchkey_denied_unauthenticated"),
             ([eve], 403, "latchkey_denied_forbidden"),
             ([olga], 200, "via_upstream")]
    for n, (headers, status, details) in enumerate(cases, start=1):
        assert envoy.request("GET", "/orders", headers=headers).status == status
        line = envoy.wait_for_access_log(n)[-1]
        assert line.rstrip().endswith(f"details={details}"), line


def test_groups_as_space_separated_string(envoy, upstream, signer):
    token = signer.token({"sub": "bob", "groups": "staff billing"})
    assert envoy.request("GET", "/orders", headers=[bearer(token)]).status == 200
    assert upstream.last().header_values("x-api-key") == [PARTNER_KEY]


def test_nested_number_and_boolean_claims(envoy, upstream, signer):
    ok = signer.token({"sub": "t", "org": {"tier": 2}, "beta": True})
    resp = envoy.request("GET", "/tier", headers=[bearer(ok)])
    assert resp.status == 200, resp
    assert upstream.last().header_values("authorization") == [f"Key {PARTNER_KEY}"]
    for claims in ({"sub": "t", "org": {"tier": 4}, "beta": True},
                   {"sub": "t", "org": {"tier": 2}, "beta": False},
                   {"sub": "t", "tier": 2, "beta": True}):
        resp = envoy.request("GET", "/tier", headers=[bearer(signer.token(claims))])
        assert_local_reply(resp, 403, {"error": "forbidden", "route": "tier"})
    assert len(upstream.requests()) == 1


# ---------------------------------------------------------------- refusals


def test_no_claims_is_401_and_nothing_forwarded(envoy, upstream):
    resp = envoy.request("GET", "/orders/1", headers=[("x-api-key", "mine")])
    assert_local_reply(resp, 401, {"error": "unauthenticated", "route": "orders"})
    assert resp.header("www-authenticate") == "Bearer"
    assert upstream.requests() == []
    assert stat(envoy, "requests.denied.unauthenticated") == 1
    line = envoy.wait_for_access_log(1)[-1]
    assert "latchkey_route=orders latchkey_connection=- latchkey_decision=denied_unauthenticated" in line


def test_claims_without_an_admitting_connection_is_403(envoy, upstream, signer):
    token = signer.token({"sub": "carol", "groups": ["staff"]})
    resp = envoy.request("GET", "/orders/1", headers=[bearer(token)])
    assert_local_reply(resp, 403, {"error": "forbidden", "route": "orders"})
    assert resp.header("www-authenticate") is None
    assert upstream.requests() == []
    assert stat(envoy, "requests.denied.forbidden") == 1


def test_invalid_jwt_is_rejected_by_jwt_authn_before_latchkey(envoy, upstream):
    from harness import Signer
    other = Signer()
    resp = envoy.request("GET", "/orders", headers=[bearer(other.token({"sub": "bob", "groups": ["billing"]}))])
    assert resp.status == 401
    assert upstream.requests() == []


def test_route_access_checked_by_host_case_insensitive_port_ignored(envoy, upstream, signer):
    ops = signer.token({"sub": "x", "groups": ["ops"]})
    resp = envoy.request("GET", "/h/1", headers=[("host", "api.EXAMPLE.com:8443"), bearer(ops)])
    assert resp.status == 200, resp
    resp = envoy.request("GET", "/h/1", headers=[("host", "api.example.com")])
    assert_local_reply(resp, 401, {"error": "unauthenticated", "route": "hosted"})
    resp = envoy.request("GET", "/h/1", headers=[("host", "other.example.com")])
    assert resp.status == 200  # no route matches: unmatched allow
    assert len(upstream.requests()) == 2


def test_unmatched_deny(envoy_factory, upstream):
    envoy = envoy_factory(plugin_config(unmatched="deny"), wasm_env=WASM_ENV, routes=ROUTES)
    resp = envoy.request("POST", "/search")
    assert_local_reply(resp, 403, {"error": "forbidden"})
    assert upstream.requests() == []
    assert stat(envoy, "requests.denied.unmatched") == 1
    assert envoy.request("GET", "/search").status == 200


# ---------------------------------------------------------------- query injection


def test_query_key_replaces_every_client_variant_and_keeps_the_rest(envoy, upstream):
    path = ("/search/x?q=a%20b+c&api_key=evil&API_KEY=e2&api%5Fkey=e3&%61pi_key=e4"
            "&z=%zz;api_key=e5;k=2&api_keys=keep&empty=&&")
    resp = envoy.request("GET", path)
    assert resp.status == 200, resp
    enc = urllib.parse.quote(QUERY_KEY, safe="")
    assert upstream.last().path == f"/search/x?q=a%20b+c&z=%zz;k=2&api_keys=keep&empty=&&&api_key={enc}"
    parsed = urllib.parse.parse_qs(upstream.last().path.split("?", 1)[1])
    assert parsed["api_key"] == [QUERY_KEY]
    assert stat(envoy, "connection.open_search.injected") == 1


def test_query_key_on_path_without_query(envoy, upstream):
    assert envoy.request("GET", "/search").status == 200
    assert upstream.last().path == "/search?api_key=" + urllib.parse.quote(QUERY_KEY, safe="")


def test_method_not_listed_is_unmatched_and_gets_nothing(envoy, upstream):
    assert envoy.request("POST", "/search?api_key=client", body=b"x").status == 200
    assert upstream.last().path == "/search?api_key=client"
    assert stat(envoy, "requests.unmatched") == 1


def test_64k_query_string(envoy, upstream):
    pad = "p" * (64 * 1024)
    resp = envoy.request("GET", f"/search?pad={pad}&api_key=evil&tail=1")
    assert resp.status == 200, resp
    enc = urllib.parse.quote(QUERY_KEY, safe="")
    assert upstream.last().path == f"/search?pad={pad}&tail=1&api_key={enc}"


# ---------------------------------------------------------------- hostile input


def test_non_utf8_header_values(envoy, upstream, signer):
    token = signer.token({"sub": "bob", "groups": ["billing"]})
    resp = envoy.request("GET", "/orders/x", headers=[
        bearer(token), ("x-api-key", b"\xff\xfe"), ("x-other", b"\xc3\x28\xff")])
    assert resp.status == 200, resp
    got = upstream.last()
    assert got.header_values("x-api-key") == [PARTNER_KEY]
    assert got.header("x-other").encode("latin-1") == b"\xc3\x28\xff"
    # Unmatched requests with odd bytes pass untouched too.
    assert envoy.request("GET", "/else", headers=[("x-other", b"\x80")]).status == 200


def test_forged_claims_header_is_ignored_with_jwt_metadata(envoy, upstream):
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "olga", "groups": ["billing"]}).encode())
    resp = envoy.request("GET", "/orders", headers=[("x-jwt-payload", forged)])
    assert_local_reply(resp, 401, {"error": "unauthenticated", "route": "orders"})


def test_many_requests_on_both_workers_leave_the_vm_healthy(envoy, upstream, signer):
    token = signer.token({"sub": "bob", "groups": ["billing"]})
    statuses = [envoy.request("GET", f"/orders/{i}", headers=[bearer(token)]).status for i in range(40)]
    statuses += [envoy.request("GET", "/orders").status for _ in range(20)]
    assert statuses == [200] * 40 + [401] * 20
    assert stat(envoy, "requests.allowed") == 40
    assert stat(envoy, "requests.denied.unauthenticated") == 20
    assert stat(envoy, "requests.internal_error") == 0
    assert_vm_healthy(envoy)


def assert_vm_healthy(envoy):
    stats = envoy.stats()
    failures = {k: v for k, v in stats.items()
                if k.startswith("wasm.") and ("fail" in k or "crash" in k) and v}
    assert failures == {}
    assert stats.get("wasm.envoy.wasm.runtime.v8.active", 0) >= 1


# ---------------------------------------------------------------- header claims source


def header_source_config():
    return plugin_config(claims={"from": "header", "key": "x-jwt-payload"})


def strip_client_payload_filter():
    return {
        "name": "envoy.filters.http.header_mutation",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"remove": "x-jwt-payload"}]},
        },
    }


def test_header_source_reads_forwarded_payload_and_removes_it(envoy_factory, upstream, signer):
    envoy = envoy_factory(header_source_config(), wasm_env=WASM_ENV, routes=ROUTES,
                          claims_header_forward=True, pre_filters=[strip_client_payload_filter()])
    token = signer.token({"sub": "bob", "groups": ["billing"]})
    assert envoy.request("GET", "/orders", headers=[bearer(token)]).status == 200
    got = upstream.last()
    assert got.header_values("x-api-key") == [PARTNER_KEY]
    assert got.header("x-jwt-payload") is None
    # A forged copy without a JWT is removed before jwt_authn: no claims, 401.
    forged = base64.urlsafe_b64encode(json.dumps({"sub": "olga"}).encode())
    resp = envoy.request("GET", "/orders", headers=[("x-jwt-payload", forged)])
    assert_local_reply(resp, 401, {"error": "unauthenticated", "route": "orders"})
    # Matched or not, the header never reaches the upstream.
    assert envoy.request("GET", "/elsewhere", headers=[bearer(token)]).status == 200
    assert upstream.last().header("x-jwt-payload") is None


@pytest.mark.parametrize("value", [b"%%%not-base64", base64.urlsafe_b64encode(b"{not json"),
                                   base64.urlsafe_b64encode(b"[1,2]"), b"\xff\xfe"])
def test_malformed_claims_header_is_401_never_a_crash(envoy_factory, upstream, value):
    envoy = envoy_factory(header_source_config(), wasm_env=WASM_ENV, routes=ROUTES)
    resp = envoy.request("GET", "/orders", headers=[("x-jwt-payload", value)])
    assert_local_reply(resp, 401, {"error": "unauthenticated", "route": "orders"})
    assert stat(envoy, "requests.denied.bad_claims") == 1
    # Unmatched: the header is dropped, the request goes on.
    assert envoy.request("GET", "/x", headers=[("x-jwt-payload", value)]).status == 200
    assert upstream.last().header("x-jwt-payload") is None
    assert_vm_healthy(envoy)


# ---------------------------------------------------------------- configuration refusal


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c["connections"]["billing"].update(provider="nope"),
     'connections.billing.provider: unknown provider "nope"'),
    (lambda c: c["secrets"]["partner_key"].update(env="UNSET_VAR"),
     'secrets.partner_key.env: environment variable "UNSET_VAR" is not set'),
    (lambda c: c["routes"][0].update(access={}),
     "routes[0].access: access policy admits no one"),
])
def test_bad_configuration_stops_startup_with_the_message(envoy_factory, mutate, message):
    cfg = plugin_config()
    mutate(cfg)
    with pytest.raises(EnvoyStartError) as err:
        envoy_factory(cfg, wasm_env=WASM_ENV, routes=ROUTES)
    text = str(err.value)
    assert f"latchkey: configuration rejected: {message}" in text
    for secret in SECRETS:
        assert secret not in text


# ---------------------------------------------------------------- secrets stay secret


def test_no_secret_in_debug_logs(envoy_factory, upstream, signer):
    envoy = envoy_factory(plugin_config(), wasm_env=WASM_ENV, routes=ROUTES,
                          component_log_level="wasm:debug")
    token = signer.token({"sub": "olga", "groups": ["billing"]})
    assert envoy.request("GET", "/orders", headers=[bearer(token)]).status == 200
    assert envoy.request("GET", "/search?api_key=x").status == 200
    assert envoy.request("GET", "/orders").status == 401
    envoy.wait_for_access_log(3)
    envoy.wait_for_log(r"latchkey: route=search connection=open_search decision=allowed")
    text = envoy.log_text() + envoy.access_log_text()
    assert "configuration loaded" in text
    # Which module version runs: from Cargo.toml, in the load line.
    version = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "Cargo.toml").read_text(), re.M).group(1)
    assert re.search(rf"configuration loaded: .*; module version {re.escape(version)}\b", text), text[-3000:]
    assert 'secret \\"ops_key\\" is inline' in text or 'secret "ops_key" is inline' in text
    for secret in SECRETS:
        assert secret not in text, "a secret value reached Envoy's log"
