"""latchkey in a real Envoy configured the way Envoy Gateway configures one.

Envoy Gateway is not run here; its xDS translator is (internal/xds/translator/jwt.go and
wasm.go, Envoy Gateway 1.7 to 1.9, the shapes its testdata/out/xds-ir/{wasm,authn-*}
files show). What it builds from these resources, in namespace `shop`:

- a Gateway with an HTTP listener for api.example.com, and the HTTPRoutes
  `orders` (rule 0: PathPrefix /orders; rule 1: Exact /orders/export), `invoices`
  (PathPrefix /invoices), `orders-archive` (PathPrefix /archive) and `public`
  (PathPrefix /public);
- a SecurityPolicy on the Gateway, `jwt.optional: true`, with two providers `team-a` and
  `team-b` (two issuers, two keys);
- an EnvoyExtensionPolicy `latchkey` with one Wasm entry, targeting the HTTPRoutes
  `orders`, `invoices` and `orders-archive`, not `public`.

becomes:

- jwt_authn with one provider per SecurityPolicy provider, keyed `<name>_<hash>`, each
  writing the verified payload into the request's metadata under the provider's *name*
  (`payload_in_metadata: team-a`), `forward: true`; no `rules`, but a `requirement_map`
  entry (`requires_any` of both providers and `allow_missing`) that every route names in
  its `typed_per_filter_config`;
- the wasm filter `envoy.filters.http.wasm/envoyextensionpolicy/shop/latchkey/wasm/0`,
  `disabled: true` in the HCM, enabled on the targeted routes only, each with
  `envoy.config.route.v3.FilterConfig` `{"config": {}}` (Envoy: "configured but empty:
  the filter is enabled explicitly"); vm_id per policy entry, the configuration as a JSON
  StringValue, the secrets from the Envoy container's environment (`host_env_keys`);
- routes named `httproute/<ns>/<name>/rule/<n>/match/<m>/<host with _>`, exact paths
  before prefixes, each to cluster `httproute/<ns>/<name>/rule/<n>`; Envoy Gateway's HCM
  path settings (normalize, merge slashes, unescape and redirect escaped slashes) and
  `headers_with_underscores_action: REJECT_REQUEST`.

latchkey reads `claims.key: ["team-a", "team-b"]` (v1.2: the first key present) and
matches `route_name_prefix: "httproute/shop/orders/"` (v1.2) and one exact `route_name`.
(deploy/envoy-gateway attaches its policy to the Gateway instead, which enables the
filter on every route: the same shape with every route enabled.)
"""

from __future__ import annotations

import hashlib
import json

import pytest

import harness
from harness import Signer, bearer, static_cluster

NS = "shop"
HOST = "api.example.com"
AUDIENCE = "shop-api"
BILLING_KEY = "eg-billing-key-4f1a"
INVOICES_KEY = "eg-invoices-key-9c2e"
HOST_ENV = {"BILLING_API_KEY": BILLING_KEY, "INVOICES_API_KEY": INVOICES_KEY}

WASM_FILTER = f"envoy.filters.http.wasm/envoyextensionpolicy/{NS}/latchkey/wasm/0"
JWT_FILTER = "envoy.filters.http.jwt_authn"


def route_name(httproute: str, rule: int, match: int = 0) -> str:
    return f"httproute/{NS}/{httproute}/rule/{rule}/match/{match}/{HOST.replace('.', '_')}"


LATCHKEY = {
    "claims": {"key": ["team-a", "team-b"]},
    "filter_state": True,  # the access-log lines below read latchkey_decision
    "secrets": {"billing_key": {"env": "BILLING_API_KEY"},
                "invoices_key": {"env": "INVOICES_API_KEY"}},
    "providers": {"partner": {"type": "api_key"}},
    "connections": {
        "billing": {"provider": "partner", "api_key": "billing_key", "access": {"groups": ["billing"]}},
        "invoices": {"provider": "partner", "api_key": "invoices_key", "access": {"authenticated": True}},
    },
    "routes": [
        # Every rule of HTTPRoute shop/orders; the trailing "/" keeps shop/orders-archive out.
        {"name": "orders", "match": {"route_name_prefix": f"httproute/{NS}/orders/"},
         "access": {"authenticated": True},
         "inject": [{"connections": ["billing"], "header": "x-api-key"}]},
        {"name": "invoices", "match": {"route_name": route_name("invoices", 0)},
         "inject": [{"connections": ["invoices"], "header": "authorization", "prefix": "Key "}]},
    ],
    "unmatched": "deny",
}


# --------------------------------------------------------------------------- the translation


def _hash(message: dict) -> str:
    """Stands in for Envoy Gateway's protoHash (16 hex digits of a SHA-256)."""
    return hashlib.sha256(json.dumps(message, sort_keys=True).encode()).hexdigest()[:16]


def jwt_authn(signers: dict[str, Signer]) -> dict:
    """jwt.go: providers keyed `<name>_<hash>`, payload under the name, one requirement."""
    providers, requirements = {}, []
    for name, signer in signers.items():
        provider = {
            "issuer": signer.issuer,
            "audiences": [AUDIENCE],
            "local_jwks": {"inline_string": signer.jwks()},
            "payload_in_metadata": name,
            "forward": True,
            "normalize_payload_in_metadata": {"space_delimited_claims": ["scope", "scp"]},
        }
        key = f"{name}_{_hash(provider)}"
        providers[key] = provider
        requirements.append({"provider_name": key})
    requirements.append({"allow_missing": {}})  # SecurityPolicy jwt.optional: true
    requirement = {"requires_any": {"requirements": requirements}}
    requirement_name = "-or-".join([*signers, "missing"]) + "_" + _hash(requirement)
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "requirement_map": {requirement_name: requirement},
        },
    }, requirement_name


def wasm(wasm_path) -> dict:
    """wasm.go: one filter per policy entry, disabled by default."""
    return {
        "name": WASM_FILTER,
        "disabled": True,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "latchkey",  # the policy's wasm[0].name
                "root_id": "latchkey",
                "fail_open": False,
                "vm_config": {
                    "vm_id": f"envoyextensionpolicy/{NS}/latchkey/wasm/0",
                    "runtime": "envoy.wasm.runtime.v8",
                    # Envoy Gateway serves the pulled image's module over HTTP; here a file.
                    "code": {"local": {"filename": str(wasm_path)}},
                    "environment_variables": {"host_env_keys": sorted(HOST_ENV)},
                },
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps(LATCHKEY)},
            },
        },
    }


# (HTTPRoute, rule, Envoy match, EnvoyExtensionPolicy targets it), in Envoy Gateway's route
# order: an exact path before prefixes.
RULES = [
    ("orders", 1, {"path": "/orders/export"}, True),
    ("orders", 0, {"path_separated_prefix": "/orders"}, True),
    ("invoices", 0, {"path_separated_prefix": "/invoices"}, True),
    ("orders-archive", 0, {"path_separated_prefix": "/archive"}, True),
    ("public", 0, {"path_separated_prefix": "/public"}, False),
]


def routes(requirement_name: str) -> list[dict]:
    out = []
    for httproute, rule, match, latchkey in RULES:
        per_filter = {JWT_FILTER: {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig",
            "requirement_name": requirement_name}}
        if latchkey:
            per_filter[WASM_FILTER] = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                       "config": {}}
        out.append({"name": route_name(httproute, rule), "match": match,
                    "route": {"cluster": f"httproute/{NS}/{httproute}/rule/{rule}", "timeout": "15s"},
                    "typed_per_filter_config": per_filter})
    return out


def clusters(upstream_port: int) -> list[dict]:
    names = sorted({f"httproute/{NS}/{r}/rule/{n}" for r, n, _, _ in RULES})
    return [static_cluster(name, upstream_port) for name in names]


def hcm(signers: dict[str, Signer], wasm_path) -> dict:
    """The HttpConnectionManager fields Envoy Gateway sets (for envoy_config's hcm_extra)."""
    jwt_filter, requirement_name = jwt_authn(signers)
    return {
        "http_filters": [jwt_filter, wasm(wasm_path), {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "route_config": {
            "name": f"{NS}/shop-gateway/http",
            "ignore_port_in_host_matching": True,
            "virtual_hosts": [{"name": f"{NS}/shop-gateway/http/{HOST.replace('.', '_')}",
                               "domains": [HOST], "routes": routes(requirement_name)}],
        },
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    return {"team-a": Signer(issuer="https://team-a.example", audience=AUDIENCE),
            "team-b": Signer(issuer="https://team-b.example", audience=AUDIENCE)}


@pytest.fixture
def gateway(envoy_factory, upstream, signers, wasm_path):
    # The harness's listener, access log and "upstream" cluster, with Envoy Gateway's
    # filters and routes as the HCM's (hcm_extra replaces envoy_config's). env: the Envoy
    # container's environment (the EnvoyProxy's env), read through host_env_keys.
    return envoy_factory(None, wasm_path=None, extra_clusters=clusters(upstream.port),
                         hcm_extra=hcm(signers, wasm_path), env=HOST_ENV)


def get(envoy, path, token=None, headers=()):
    return envoy.request("GET", path, headers=[("host", HOST), *([bearer(token)] if token else []),
                                               *headers])


def latchkey_stats(envoy) -> dict[str, int]:
    """latchkey's request and connection counters that are not zero."""
    stats = envoy.stats(filter=r"^wasmcustom\.latchkey\.(requests|connection)\.")
    return {k.removeprefix("wasmcustom.latchkey."): v for k, v in stats.items() if v}


def assert_json_reply(resp, status, body):
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json"
    assert resp.json() == body


def log_line(envoy, n: int) -> str:
    return envoy.wait_for_access_log(n)[n - 1]


# --------------------------------------------------------------------------- tests


def test_envoy_validates_the_configuration_and_keeps_the_filter_disabled_by_default(gateway, monkeypatch):
    # Validation starts the VM and loads latchkey's configuration: it needs the environment.
    for k, v in HOST_ENV.items():
        monkeypatch.setenv(k, v)
    r = harness.validate(gateway.config_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # Envoy logs the plugin's name and the VM id Envoy Gateway gives it.
    gateway.wait_for_log(rf"wasm log latchkey envoyextensionpolicy/{NS}/latchkey/wasm/0: "
                         r"configuration loaded: 2 routes, 2 connections, 1 providers")
    # As Envoy holds it (config_dump): the wasm filter is off unless a route turns it on.
    status, body = gateway.admin_get("/config_dump?resource=static_listeners")
    assert status == 200
    [listener] = json.loads(body)["configs"]
    [hcm_config] = [f["typed_config"] for f in listener["listener"]["filter_chains"][0]["filters"]]
    filters = {f["name"]: f for f in hcm_config["http_filters"]}
    assert filters[WASM_FILTER]["disabled"] is True
    assert "disabled" not in filters[JWT_FILTER]
    status, body = gateway.admin_get("/config_dump?resource=static_route_configs")
    assert status == 200
    [route_config] = json.loads(body)["configs"]
    vhosts = route_config["route_config"]["virtual_hosts"]
    enabled = {r["name"] for r in vhosts[0]["routes"]
               if WASM_FILTER in r.get("typed_per_filter_config", {})}
    assert enabled == {route_name(r, n) for r, n, _, on in RULES if on}


def test_payloads_under_either_providers_name_get_the_key_on_every_rule_of_the_route(
        gateway, upstream, signers):
    a = signers["team-a"].token({"sub": "alice", "groups": ["billing"]})
    b = signers["team-b"].token({"sub": "bob", "groups": "staff billing"})
    forged = [("x-api-key", "client-own"), ("x-latchkey-cluster", "forged")]
    sent = [(a, "/orders/42", route_name("orders", 0)), (a, "/orders/export", route_name("orders", 1)),
            (b, "/orders/7", route_name("orders", 0)), (b, "/orders/export", route_name("orders", 1))]
    for n, (token, path, envoy_route) in enumerate(sent, start=1):
        resp = get(gateway, path, token, forged)
        assert resp.status == 200, resp
        got = upstream.last()
        assert got.path == path
        assert got.header_values("x-api-key") == [BILLING_KEY]
        # latchkey ran: it removes its documented cluster header from every request.
        assert got.header("x-latchkey-cluster") is None
        # Envoy Gateway's jwt_authn forwards the caller's JWT.
        assert got.header("authorization") == f"Bearer {token}"
        line = log_line(gateway, n)
        assert f"route={envoy_route} latchkey_route=orders latchkey_connection=billing " \
               "latchkey_decision=allowed details=via_upstream" in line, line
    assert latchkey_stats(gateway) == {"requests.allowed": 4, "connection.billing.injected": 4}


def test_a_caller_outside_billing_is_403_with_the_reason_in_the_response_details(
        gateway, upstream, signers):
    carol = signers["team-b"].token({"sub": "carol", "groups": ["staff"]})
    assert_json_reply(get(gateway, "/orders/1", carol), 403, {"error": "forbidden", "route": "orders"})
    assert upstream.requests() == []
    line = log_line(gateway, 1)
    assert f"route={route_name('orders', 0)} " in line
    assert line.rstrip().endswith("latchkey_decision=denied_forbidden details=latchkey_denied_forbidden"), line
    assert latchkey_stats(gateway) == {"requests.denied.forbidden": 1}


def test_no_token_is_401_from_latchkey_and_a_bad_token_401_from_jwt_authn(gateway, upstream, signers):
    # SecurityPolicy jwt.optional: jwt_authn lets a request without a JWT through, and
    # latchkey's route (access: authenticated) refuses it.
    resp = get(gateway, "/orders/1")
    assert_json_reply(resp, 401, {"error": "unauthenticated", "route": "orders"})
    assert resp.header("www-authenticate") == "Bearer"
    assert log_line(gateway, 1).rstrip().endswith("details=latchkey_denied_unauthenticated")
    # A JWT neither provider verifies (team-a's issuer, another key) never reaches latchkey.
    impostor = Signer(issuer=signers["team-a"].issuer, audience=AUDIENCE)
    resp = get(gateway, "/orders/1", impostor.token({"sub": "mallory", "groups": ["billing"]}))
    assert resp.status == 401 and resp.header("content-type") != "application/json", resp
    line = log_line(gateway, 2)
    assert "latchkey_decision=- " in line and "details=jwt_authn_access_denied" in line, line
    assert upstream.requests() == []
    assert latchkey_stats(gateway) == {"requests.denied.unauthenticated": 1}


def test_an_exact_route_name_matches_its_one_rule(gateway, upstream, signers):
    bob = signers["team-b"].token({"sub": "bob", "groups": ["staff"]})
    resp = get(gateway, "/invoices/2026-11", bob)
    assert resp.status == 200, resp
    # The injection replaces the forwarded JWT.
    assert upstream.last().header_values("authorization") == [f"Key {INVOICES_KEY}"]
    assert upstream.last().header("x-api-key") is None
    assert f"route={route_name('invoices', 0)} latchkey_route=invoices latchkey_connection=invoices " \
           "latchkey_decision=allowed" in log_line(gateway, 1)
    assert_json_reply(get(gateway, "/invoices/2026-11"), 401, {"error": "unauthenticated", "route": "invoices"})
    assert latchkey_stats(gateway) == {"requests.allowed": 1, "requests.denied.unauthenticated": 1,
                                       "connection.invoices.injected": 1}


def test_the_prefix_ends_at_a_slash_so_a_longer_httproute_name_is_unmatched(gateway, upstream, signers):
    """httproute/shop/orders-archive/... starts with "httproute/shop/orders" but not with
    "httproute/shop/orders/": the filter runs there, no latchkey route matches, and
    `unmatched: deny` refuses the request."""
    alice = signers["team-a"].token({"sub": "alice", "groups": ["billing"]})
    assert_json_reply(get(gateway, "/archive/2019", alice), 403, {"error": "forbidden"})
    line = log_line(gateway, 1)
    assert f"route={route_name('orders-archive', 0)} latchkey_route=- " in line, line
    assert line.rstrip().endswith("details=latchkey_denied_unmatched"), line
    assert upstream.requests() == []
    assert latchkey_stats(gateway) == {"requests.denied.unmatched": 1}


def test_latchkey_does_nothing_on_a_route_its_policy_does_not_target(gateway, upstream, signers):
    alice = signers["team-a"].token({"sub": "alice", "groups": ["billing"]})
    forged = [("x-api-key", "client-own"), ("x-latchkey-cluster", "forged")]
    for n, token in enumerate([alice, None], start=1):
        resp = get(gateway, "/public/status", token, forged)
        assert resp.status == 200, resp  # unmatched: deny would have refused it
        got = upstream.last()
        # Nothing injected, nothing removed: the client's headers arrive as sent.
        assert got.header_values("x-api-key") == ["client-own"]
        assert got.header_values("x-latchkey-cluster") == ["forged"]
        line = log_line(gateway, n)
        assert f"route={route_name('public', 0)} latchkey_route=- latchkey_connection=- " \
               "latchkey_decision=- details=via_upstream" in line, line
    # The SecurityPolicy still covers the route: jwt_authn refuses a bad JWT there.
    impostor = Signer(issuer=signers["team-a"].issuer, audience=AUDIENCE)
    assert get(gateway, "/public/status", impostor.token({"sub": "m"})).status == 401
    # No latchkey counter moved. Then one request on a targeted route: once its count has
    # reached Envoy (counts are flushed together on latchkey's tick), it is the only one.
    assert latchkey_stats(gateway) == {}
    assert get(gateway, "/orders/1", alice).status == 200
    gateway.wait_for_stat("wasmcustom.latchkey.requests.allowed", 1, timeout=5)
    assert latchkey_stats(gateway) == {"requests.allowed": 1, "connection.billing.injected": 1}
    assert len(upstream.requests()) == 3
