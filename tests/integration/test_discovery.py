"""Discovery (SPEC v1.1): a GET of `discovery.path`, answered by latchkey in a real Envoy
with jwt_authn in front, lists what this caller may use and nothing else."""

from __future__ import annotations

import json

import pytest

from harness import bearer

KEY = "pk-discovery-secret-0Q"
ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]
CONFIG = {
    "secrets": {"k": {"env": "KEY"}},
    "providers": {"partner": {"type": "api_key"}},
    "connections": {
        "billing": {"provider": "partner", "api_key": "k", "access": {"groups": ["billing"]}},
        "open": {"provider": "partner", "api_key": "k", "access": {"public": True}},
        "ops": {"provider": "partner", "api_key": "k", "access": {"users": ["olga"]}},
    },
    "routes": [
        {"name": "partner", "match": {"path_prefix": "/partner/", "methods": ["GET"]},
         "inject": [{"connections": ["billing"], "query": "api_key"}]},
        {"name": "weather", "match": {"path_prefix": "/weather"},
         "inject": [{"connections": ["open"], "header": "x-key"}]},
        {"name": "orders", "match": {"route_name": "orders"}, "access": {"authenticated": True},
         "inject": [{"connections": ["ops", "billing"], "header": "x-api-key"}]},
        {"name": "admin", "match": {"path_prefix": "/admin/"}, "access": {"groups": ["admins"]}},
    ],
    "discovery": {"path": "/.well-known/latchkey"},
}

WEATHER = {"name": "weather", "match": {"path_prefix": "/weather"},
           "inject": [{"connection": "open", "provider": "partner", "type": "api_key",
                       "header": "x-key"}]}


@pytest.fixture
def envoy(envoy_factory):
    return envoy_factory(CONFIG, wasm_env={"KEY": KEY}, routes=ROUTES)


def discover(envoy, headers=()):
    resp = envoy.request("GET", "/.well-known/latchkey", headers=list(headers))
    assert resp.status == 200, resp
    assert resp.header("content-type") == "application/json"
    assert resp.header("cache-control") == "no-store"
    assert KEY not in resp.body.decode()
    return json.loads(resp.body)


def test_anonymous_caller_sees_public_routes_only(envoy, upstream):
    assert discover(envoy) == {"authenticated": False, "routes": [WEATHER]}
    assert upstream.requests() == []


def test_group_member_sees_its_routes_and_connections(envoy, upstream, signer):
    bob = bearer(signer.token({"sub": "bob", "groups": ["billing"]}))
    assert discover(envoy, [bob]) == {"authenticated": True, "routes": [
        {"name": "partner", "match": {"path_prefix": "/partner/", "methods": ["GET", "HEAD"]},
         "inject": [{"connection": "billing", "provider": "partner", "type": "api_key",
                     "query": "api_key"}]},
        WEATHER,
        {"name": "orders", "match": {"route_name": "orders"},
         "inject": [{"connection": "billing", "provider": "partner", "type": "api_key",
                     "header": "x-api-key"}]},
    ]}


def test_other_caller_sees_no_route_it_may_not_use(envoy, upstream, signer):
    sam = bearer(signer.token({"sub": "sam", "groups": ["support"]}))
    doc = discover(envoy, [sam])
    # `orders` needs ops (olga) or billing: neither admits sam, so it is not listed.
    assert doc == {"authenticated": True, "routes": [WEATHER]}
    text = json.dumps(doc)
    for hidden in ("olga", "admins", "billing", "groups", "users"):
        assert hidden not in text
    assert envoy.stat("wasmcustom.latchkey.requests.discovery") == 1


def test_ten_thousand_routes_answer_capped_and_fast(envoy_factory, upstream, signer):
    """Discovery is answered from a per-configuration index, capped at 1,000 routes /
    256 KiB with "truncated": true. At 10,000 routes the old per-request rebuild took
    milliseconds and answered 2 MB; the time of 20 GETs is printed."""
    import time

    cfg = {
        "secrets": {"k": {"env": "KEY"}},
        "providers": {"partner": {"type": "api_key"}},
        "connections": {"open": {"provider": "partner", "api_key": "k", "access": {"public": True}}},
        "routes": [{"name": f"r{i}", "match": {"path_prefix": f"/api/v1/service-{i}/"},
                    "inject": [{"connections": ["open"], "header": "x-key"}]} for i in range(10_000)],
        "discovery": {"path": "/.well-known/latchkey"},
    }
    envoy = envoy_factory(cfg, wasm_env={"KEY": KEY}, routes=ROUTES)
    times = []
    for _ in range(20):
        t0 = time.monotonic()
        doc = discover(envoy)
        times.append(time.monotonic() - t0)
    times.sort()
    resp = envoy.request("GET", "/.well-known/latchkey")
    print(f"\ndiscovery at 10,000 routes: {len(resp.body)} bytes, {len(doc['routes'])} routes, "
          f"GET median {times[10] * 1000:.2f} ms (min {times[0] * 1000:.2f} ms) over 20")
    assert doc["truncated"] is True
    assert len(doc["routes"]) == 1000
    assert doc["routes"][0]["name"] == "r0" and doc["routes"][-1]["name"] == "r999"
    assert len(resp.body) <= 256 * 1024
