"""deploy/istio, checked as a platform team's CI would before `kubectl apply`.

- Every manifest validates against Istio's CRD schemas twice, with two independent copies:
  npm @kubernetes-models/istio (validators generated from Istio 1.29's crd-all.gen.yaml;
  core kinds against npm kubernetes-models) and PyPI cloudcoil-models-istio (Istio 1.24's
  CRDs as pydantic models). Unknown fields are errors too (kubectl's strict field
  validation refuses them; the generated validators only prune them).
- The WasmPlugin is the one the Istio-shaped Envoy runs (test_istio_shaped.py reads the same
  file); every `route_name` is a VirtualService http route; the token server's cluster is
  the ServiceEntry's; the env secrets are in vmConfig.env and set on the gateway proxy.
- `latchkey check` accepts the file.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

import istio_shape as ist
from harness import REPO_ROOT

VALIDATE = REPO_ROOT / "tests" / "istio" / "validate.mjs"
FILES = sorted(ist.DEPLOY.glob("*.yaml"))


def node_validate(*files: Path) -> list[dict]:
    r = subprocess.run(["node", str(VALIDATE), *map(str, files)], capture_output=True, text=True,
                       timeout=120, cwd=REPO_ROOT)
    assert r.returncode in (0, 1), r.stderr
    return [json.loads(l) for l in r.stdout.splitlines() if l.strip()]


def test_every_manifest_validates_against_the_crd_schemas():
    results = node_validate(*FILES)
    assert results, "no documents"
    bad = [r for r in results if r["status"] != "valid"]
    assert bad == [], bad
    kinds = {r["kind"] for r in results}
    assert {"WasmPlugin", "RequestAuthentication", "ServiceEntry", "DestinationRule",
            "VirtualService", "Gateway"} <= kinds


def test_the_validator_refuses_a_bad_manifest(tmp_path):
    plugin = copy.deepcopy(ist.wasmplugin())
    plugin["spec"]["phase"] = "AUTHZZ"
    plugin["spec"]["failStrategy"] = "FAIL_SOMETIMES"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(plugin))
    [r] = node_validate(bad)
    assert r["status"] == "invalid" and "phase" in " ".join(r["errors"])


def _cloudcoil_model(doc: dict):
    group, version = doc["apiVersion"].split("/")
    module = __import__(f"cloudcoil.models.istio.{group.split('.')[0]}.{version}",
                        fromlist=[doc["kind"]])
    return getattr(module, doc["kind"])


def _dropped(given, dumped, path="") -> list[str]:
    """Keys in `given` that did not survive the model (unknown to the schema)."""
    out = []
    if isinstance(given, dict) and isinstance(dumped, dict):
        for k, v in given.items():
            if k not in dumped:
                out.append(f"{path}.{k}")
            else:
                out.extend(_dropped(v, dumped[k], f"{path}.{k}"))
    elif isinstance(given, list) and isinstance(dumped, list):
        for i, (a, b) in enumerate(zip(given, dumped)):
            out.extend(_dropped(a, b, f"{path}[{i}]"))
    return out


ISTIO_DOCS = [d for d in ist.manifests() if d["apiVersion"].split("/")[0].endswith(".istio.io")]


@pytest.mark.parametrize("doc", ISTIO_DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_istio_manifests_fit_cloudcoils_models_with_no_unknown_field(doc):
    model = _cloudcoil_model(doc).model_validate(doc)
    dumped = json.loads(model.model_dump_json(by_alias=True, exclude_none=True))
    # pluginConfig is a free-form Struct: compare it whole, not key by key.
    if doc["kind"] == "WasmPlugin":
        assert dumped["spec"]["pluginConfig"] == doc["spec"]["pluginConfig"]
    assert _dropped(doc, dumped) == []


def test_cloudcoil_refuses_an_unknown_field():
    plugin = copy.deepcopy(ist.wasmplugin())
    plugin["spec"]["pluginconfig"] = plugin["spec"].pop("pluginConfig")  # a typo
    model = _cloudcoil_model(plugin).model_validate(plugin)
    dumped = json.loads(model.model_dump_json(by_alias=True, exclude_none=True))
    assert _dropped(plugin, dumped) == [".spec.pluginconfig"]


def test_wasmplugin_settings():
    spec = ist.wasmplugin()["spec"]
    assert spec["phase"] == "AUTHZ"
    assert spec["failStrategy"] == "FAIL_CLOSE"
    assert spec["url"].startswith("oci://")
    assert len(spec["sha256"]) == 64 and int(spec["sha256"], 16) >= 0
    assert spec["pluginName"] == "latchkey"
    cfg = spec["pluginConfig"]
    assert "claims" not in cfg  # Istio >= 1.24: latchkey's defaults are Istio's
    grants = {c.get("grant") for c in cfg["connections"].values()}
    assert "client_credentials" in grants
    env_vars = {s["env"] for s in cfg["secrets"].values() if "env" in s}
    assert env_vars and all("inline" not in s for s in cfg["secrets"].values())
    declared = {e["name"]: e.get("valueFrom") for e in spec["vmConfig"]["env"]}
    assert env_vars <= set(declared)
    # HOST variables are set on the gateway's istio-proxy container (from a Secret).
    proxy = next(c for c in ist.gateway_deployment()["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "istio-proxy")
    on_proxy = {e["name"] for e in proxy["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {n for n, src in declared.items() if src == "HOST"} <= on_proxy


def test_route_names_are_virtualservice_routes_and_clusters_are_service_entries():
    cfg = ist.plugin_config()
    vs_routes = {h["name"] for h in ist.one("VirtualService")["spec"]["http"]}
    for route in cfg["routes"]:
        if "route_name" in route["match"]:
            assert route["match"]["route_name"] in vs_routes
    entries = [d for d in ist.manifests() if d["kind"] == "ServiceEntry"]
    clusters = {ist.cluster_name(h, p["number"]) for e in entries
                for h in e["spec"]["hosts"] for p in e["spec"]["ports"]}
    rules = {d["spec"]["host"]: d for d in ist.manifests() if d["kind"] == "DestinationRule"}
    for p in cfg["providers"].values():
        if p["type"] == "oauth2":
            assert p["cluster"] in clusters
            host = p["cluster"].split("||")[1]
            assert p["token_url"].startswith(f"https://{host}/")
            tls = rules[host]["spec"]["trafficPolicy"]["tls"]
            assert tls == {"mode": "SIMPLE", "sni": host}
    assert "kv-gw.vault.azure.net" in rules  # Key Vault, ready for secret stores


def test_requestauthentication_selects_the_gateway():
    ra = ist.one("RequestAuthentication")
    wp = ist.wasmplugin()
    assert ra["spec"]["selector"] == wp["spec"]["selector"]
    assert ra["spec"]["selector"]["matchLabels"] == ist.one("Gateway")["spec"]["selector"]


def test_checker_accepts_the_deploy_folder():
    checker = os.environ.get("LATCHKEY_CHECKER") or str(REPO_ROOT / "target" / "debug" / "latchkey")
    r = subprocess.run([checker, "check", str(ist.DEPLOY / "wasmplugin.yaml")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WasmPlugin latchkey/latchkey: ok (2 routes, 2 connections, 2 providers)" in r.stdout
    assert "IDP_CLIENT_SECRET, PARTNER_API_KEY taken as set" in r.stdout
