"""latchkey's stats on /stats/prometheus carry route, connection and reason as labels.

Envoy's `stats_tags` do it (the first group of each regex leaves the stat name, the second
is the label's value). Every Envoy configuration latchkey ships has the same four, and so
does the Istio bootstrap override (deploy/istio/gateway.yaml); test_istio_shaped.py scrapes
that one through Istio's stats matcher. The scrape is parsed with prometheus-client's
text-format parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

import istio_shape as ist
import prom
from harness import REPO_ROOT, Envoy, bearer, envoy_config, free_port, static_cluster
from token_servers import closed_port

SHIPPED = sorted((REPO_ROOT / "envoy").glob("*.yaml"))


def canonical_tags() -> list[dict]:
    return yaml.safe_load((REPO_ROOT / "envoy" / "demo.yaml").read_text())["stats_config"]["stats_tags"]


def test_every_shipped_envoy_configuration_has_the_same_stats_tags():
    tags = canonical_tags()
    assert [t["tag_name"] for t in tags] == ["route", "connection", "secret", "provider", "reason"]
    for f in SHIPPED:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and "static_resources" in doc:
                assert doc.get("stats_config", {}).get("stats_tags") == tags, f.name
    assert json.loads(ist.bootstrap_override())["stats_config"]["stats_tags"] == tags


def test_prometheus_labels(upstream, signer, wasm_path, tmp_path):
    config = {
        "secrets": {"k": {"inline": "prom-key"}, "s": {"inline": "prom-secret"}},
        "providers": {"keys": {"type": "api_key"},
                      "idp": {"type": "oauth2", "cluster": "idp", "token_url": "http://idp.test/token",
                              "client_id": "c", "client_secret": "s", "timeout_ms": 1000}},
        "connections": {
            "billing_key": {"provider": "keys", "api_key": "k", "access": {"groups": ["billing"]}},
            "orders_token": {"provider": "idp", "grant": "client_credentials",
                             "access": {"authenticated": True}},
        },
        "routes": [
            {"name": "partner", "match": {"path_prefix": "/partner/"},
             "inject": [{"connections": ["billing_key"], "header": "x-api-key"}]},
            {"name": "orders", "match": {"path_prefix": "/orders/"},
             "inject": [{"connections": ["orders_token"], "header": "authorization"}]},
        ],
        "unmatched": "deny",
    }
    cfg = envoy_config(free_port(), free_port(), upstream.port, wasm_path, config, signer.jwks(),
                       extra_clusters=[static_cluster("idp", closed_port())])
    # The canonical tags, given to this Envoy the way demo.yaml gives them.
    cfg["stats_config"] = {"stats_tags": canonical_tags()}
    with Envoy(cfg, tmp_path / "envoy") as envoy:
        check_labels(envoy, signer)


def check_labels(envoy, signer):
    alice = signer.token({"sub": "alice", "groups": ["billing"]})
    bob = signer.token({"sub": "bob", "groups": ["support"]})
    assert envoy.request("GET", "/partner/x", headers=[bearer(alice)]).status == 200
    assert envoy.request("GET", "/partner/x", headers=[bearer(alice)]).status == 200
    assert envoy.request("GET", "/partner/x", headers=[bearer(bob)]).status == 403
    assert envoy.request("GET", "/partner/x").status == 401
    assert envoy.request("GET", "/elsewhere").status == 403
    assert envoy.request("GET", "/orders/1", headers=[bearer(alice)]).status == 503
    envoy.wait_for_stat("wasmcustom.latchkey.connection.orders_token.token.failure.connect", 1)
    p = prom.scrape(envoy)
    assert p.get("latchkey_requests_allowed") == 2
    assert p.get("latchkey_requests_denied", reason="forbidden") == 1
    assert p.get("latchkey_requests_denied", reason="unauthenticated") == 1
    assert p.get("latchkey_requests_denied", reason="unmatched") == 1
    assert p.get("latchkey_requests_unavailable") == 1
    assert p.get("latchkey_connection_injected", connection="billing_key") == 2
    assert p.get("latchkey_connection_token_failure", connection="orders_token", reason="connect") == 1
    # Every series of the family has a reason: no total beside them to double a sum().
    series = p.labelsets("latchkey_connection_token_failure")
    assert series and all("reason" in ls for ls in series), series
    assert all("reason" in ls for ls in p.labelsets("latchkey_secret_failure"))
    assert p.types["latchkey_connection_token_state"] == "gauge"
    # Names are never baked into metric names.
    names = [f for f in p.families("latchkey_")]
    assert names and not [n for n in names if "billing_key" in n or "orders_token" in n
                          or "forbidden" in n or n.endswith("_connect")]


def test_prometheus_labels_of_signing_and_consent_failures(upstream, signer, wasm_path, tmp_path):
    """v1.2's families get the same treatment: a private_key_jwt provider's signing
    failures are `latchkey_provider_signing_failure{provider=…,reason=…}`, refused consent
    callbacks `latchkey_consent_failed{reason=…}`; no name is baked into a metric name."""
    dead = closed_port()
    config = {
        "secrets": {"vt": {"inline": "vault-token"}, "sk": {"inline": "k" * 40},
                    "s": {"inline": "prom-secret"}},
        "providers": {
            "signer": {"type": "oauth2", "cluster": "dead", "token_url": "http://idp.test/token",
                       "client_id": "c", "auth_method": "private_key_jwt", "timeout_ms": 1000,
                       "signing_key": {"vault_transit": {"cluster": "dead", "url": "http://vault.test",
                                                         "key": "gw", "token": "vt"}}},
            "people": {"type": "oauth2", "cluster": "dead", "token_url": "http://idp.test/token",
                       "authorization_url": "https://idp.test/authorize",
                       "client_id": "p", "client_secret": "s"},
        },
        "token_stores": {"ts": {"vault": {"cluster": "dead", "url": "http://vault.test", "token": "vt"}}},
        "consent": {"path": "/.latchkey/connections", "state_key": "sk",
                    "redirect_uri": "https://gw.test/.latchkey/callback"},
        "connections": {
            "signed": {"provider": "signer", "grant": "client_credentials",
                       "access": {"authenticated": True}},
            "mine": {"provider": "people", "grant": "authorization_code", "per_user": True,
                     "store": "ts", "access": {"authenticated": True}},
        },
        "routes": [{"name": "signed", "match": {"path_prefix": "/signed/"},
                    "inject": [{"connections": ["signed"], "header": "authorization"}]}],
    }
    cfg = envoy_config(free_port(), free_port(), upstream.port, wasm_path, config, signer.jwks(),
                       extra_clusters=[static_cluster("dead", dead)])
    cfg["stats_config"] = {"stats_tags": canonical_tags()}
    alice = signer.token({"sub": "alice"})
    with Envoy(cfg, tmp_path / "envoy") as envoy:
        assert envoy.request("GET", "/signed/1", headers=[bearer(alice)]).status == 503
        resp = envoy.request("GET", "/.latchkey/callback?code=c&state=forged.sig", headers=[bearer(alice)])
        assert resp.status == 400 and resp.json()["reason"] == "state_invalid", resp
        envoy.wait_for_stat("wasmcustom.latchkey.provider.signer.signing.failure.connect", 1)
        envoy.wait_for_stat("wasmcustom.latchkey.consent.failed.state_invalid", 1)
        p = prom.scrape(envoy)
        assert p.get("latchkey_provider_signing_failure", provider="signer", reason="connect") == 1
        assert p.get("latchkey_provider_signing_requests", provider="signer") == 1
        assert p.get("latchkey_consent_failed", reason="state_invalid") == 1
        assert p.get("latchkey_connection_token_failure", connection="signed", reason="signing") == 1
        names = list(p.families("latchkey_"))
        assert names and not [n for n in names if "signer" in n or "state_invalid" in n
                              or n.endswith("_connect")]
