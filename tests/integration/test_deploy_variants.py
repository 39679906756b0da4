"""The Istio variants (TrafficExtension and WasmPlugin; selector, Gateway API gateway and
waypoint targetRefs) and the Envoy Gateway manifests, checked as a platform team's CI would
before `kubectl apply`. docs/deploy.md is their guide.

Schemas (all installed by npm from tests/istio/package-lock.json, or pip):
- Istio kinds: npm @kubernetes-models/istio 3.0.1, validators generated from Istio 1.29.2's
  crd-all.gen.yaml. The kinds used here (WasmPlugin, RequestAuthentication, ServiceEntry,
  DestinationRule, Gateway, VirtualService) are byte-identical in Istio 1.30.3's CRDs.
  WasmPlugins also against PyPI cloudcoil-models-istio (Istio 1.24's CRDs), no unknown field.
- TrafficExtension (Istio 1.30): no package usable here ships its schema (tests/istio/
  models.mjs says which exist and why they can't be used). Checked twice, both weaker than
  a published schema: its WasmPlugin projection (the `wasm` block lifted into `spec`)
  against the published WasmPlugin schema, whose sub-schemas TrafficExtension reuses; and
  the whole document against tests/istio/trafficextension.schema.json, HAND-WRITTEN from
  Istio's API reference (its validation rules included, unknown fields refused).
- Envoy Gateway kinds: npm @kubernetes-models/envoy-gateway 2.0.0, generated from Envoy
  Gateway v1.7.3's API types (types, enums, required fields; the CRDs' CEL rules are not
  in it: the ones these manifests touch are asserted below).
- Gateway API kinds: npm @kubernetes-models/gateway-api 2.0.0 (Gateway API v1.5.1's types).
- Core kinds: npm kubernetes-models 5.1.0.
- Unknown fields: tests/istio/strict.mjs type-checks every document against the interface
  the same package declares (TypeScript's excess property check), since the validators
  above let unknown fields through.

Then what a schema can't see: the pluginConfigs agree with each other and with
../deploy/istio/wasmplugin.yaml, route names are HTTPRoute rule names, clusters are the
ones Istio or Envoy Gateway build, the secrets reach the proxy, `latchkey check` accepts
every configuration, and the Envoy Gateway bootstrap cluster and filter pass Envoy 1.40's
own validation.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

import harness
from harness import REPO_ROOT
from test_deploy_istio import _cloudcoil_model, _dropped

ISTIO = REPO_ROOT / "deploy" / "istio"
EG = REPO_ROOT / "deploy" / "envoy-gateway"
TESTS_ISTIO = REPO_ROOT / "tests" / "istio"
VARIANT_DIRS = [ISTIO / "trafficextension", ISTIO / "gateway-api", ISTIO / "waypoint"]
FILES = sorted(f for d in VARIANT_DIRS for f in d.glob("*.yaml")) + sorted(EG.glob("*.yaml"))
TE_SCHEMA = json.loads((TESTS_ISTIO / "trafficextension.schema.json").read_text())
LATCHKEY_SCHEMA = json.loads((REPO_ROOT / "schema" / "latchkey.schema.json").read_text())
CHECKER = os.environ.get("LATCHKEY_CHECKER") or str(REPO_ROOT / "target" / "debug" / "latchkey")
PLUGIN_KINDS = ("WasmPlugin", "TrafficExtension")


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs(*paths: Path) -> list[dict]:
    return [d for p in paths for d in docs(p)]


def one(items: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in items if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def node(script: str, *files: Path) -> list[dict]:
    r = subprocess.run(["node", str(TESTS_ISTIO / script), *map(str, files)], capture_output=True,
                       text=True, timeout=180, cwd=REPO_ROOT)
    assert r.returncode in (0, 1), r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def plugin(path: Path) -> dict:
    [d] = [d for d in docs(path) if d["kind"] in PLUGIN_KINDS]
    return d


def module_settings(d: dict) -> dict:
    """A WasmPlugin's or TrafficExtension's module settings, in WasmPlugin's shape."""
    spec = copy.deepcopy(d["spec"])
    if d["kind"] == "TrafficExtension":
        spec.update(spec.pop("wasm"))
    return spec


def plugin_config(d: dict) -> dict:
    return module_settings(d)["pluginConfig"]


def plugins() -> list[Path]:
    return sorted(f for d in VARIANT_DIRS for f in d.glob("*.yaml")
                  if any(x["kind"] in PLUGIN_KINDS for x in docs(f)))


# --- schemas -------------------------------------------------------------------------


def test_every_manifest_validates_against_the_published_schemas():
    results = node("validate.mjs", *FILES)
    bad = [r for r in results if r["status"] != "valid"]
    assert bad == [], bad
    by_kind = {(r["kind"], r["schema"]) for r in results}
    assert {("TrafficExtension", "@kubernetes-models/istio"), ("WasmPlugin", "@kubernetes-models/istio"),
            ("RequestAuthentication", "@kubernetes-models/istio"),
            ("Gateway", "@kubernetes-models/gateway-api"), ("HTTPRoute", "@kubernetes-models/gateway-api"),
            ("EnvoyExtensionPolicy", "@kubernetes-models/envoy-gateway"),
            ("SecurityPolicy", "@kubernetes-models/envoy-gateway"),
            ("EnvoyProxy", "@kubernetes-models/envoy-gateway"), ("Secret", "kubernetes-models")} <= by_kind
    # TrafficExtension: by its WasmPlugin projection, said so in the output.
    assert all(r.get("projected") == "WasmPlugin" for r in results if r["kind"] == "TrafficExtension")


def test_no_manifest_has_an_unknown_field():
    results = node("strict.mjs", *FILES)
    assert len(results) == len(all_docs(*FILES))
    bad = [r for r in results if r["status"] != "valid"]
    assert bad == [], bad


@pytest.mark.parametrize("path", [p for p in plugins() if plugin(p)["kind"] == "TrafficExtension"],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_trafficextensions_fit_the_hand_written_schema(path):
    jsonschema.Draft202012Validator.check_schema(TE_SCHEMA)
    jsonschema.Draft202012Validator(TE_SCHEMA).validate(plugin(path))


@pytest.mark.parametrize("path", [p for p in plugins() if plugin(p)["kind"] == "WasmPlugin"],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_wasmplugins_fit_cloudcoils_models_with_no_unknown_field(path):
    doc = plugin(path)
    model = _cloudcoil_model(doc).model_validate(doc)
    dumped = json.loads(model.model_dump_json(by_alias=True, exclude_none=True))
    assert dumped["spec"]["pluginConfig"] == doc["spec"]["pluginConfig"]
    assert _dropped(doc, dumped) == []


def _mutated(tmp_path: Path, path: Path, kind: str, change) -> Path:
    out, done = [], False
    for d in docs(path):
        if d["kind"] == kind and not done:
            change(d)
            done = True
        out.append(d)
    f = tmp_path / f"{kind}.yaml"
    f.write_text(yaml.safe_dump_all(out))
    return f


BAD = [
    # (file, kind, change, which checker refuses it, words in the error)
    (EG / "envoyextensionpolicy.yaml", "EnvoyExtensionPolicy",
     lambda d: d["spec"]["wasm"][0]["code"].update(type="OCI"), "validate.mjs", "allowed values"),
    (EG / "envoyextensionpolicy.yaml", "EnvoyExtensionPolicy",
     lambda d: d["spec"]["wasm"][0]["code"]["image"].update(
         pullSecretref=d["spec"]["wasm"][0]["code"]["image"].pop("pullSecretRef")),
     "strict.mjs", "pullSecretref"),
    (EG / "securitypolicy.yaml", "SecurityPolicy",
     lambda d: d["spec"]["jwt"].pop("providers"), "validate.mjs", "providers"),
    (EG / "gateway.yaml", "EnvoyProxy",
     lambda d: d["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"].update(
         envs=[]), "strict.mjs", "envs"),
    (ISTIO / "gateway-api" / "trafficextension.yaml", "TrafficExtension",
     lambda d: d["spec"]["wasm"].update(failStrategy="FAIL_SOMETIMES"), "validate.mjs", "failStrategy"),
    (ISTIO / "gateway-api" / "trafficextension.yaml", "TrafficExtension",
     lambda d: d["spec"]["wasm"].update(imagePullSecrets=["latchkey-pull"]), "strict.mjs",
     "imagePullSecrets"),
    (ISTIO / "waypoint" / "mesh.yaml", "HTTPRoute",
     lambda d: d["spec"]["rules"][0].update(backendRef={}), "strict.mjs", "backendRef"),
    (ISTIO / "waypoint" / "wasmplugin.yaml", "WasmPlugin",
     lambda d: d["spec"].update(phase="AUTHZZ"), "validate.mjs", "phase"),
]


@pytest.mark.parametrize("path,kind,change,script,words", BAD,
                         ids=[f"{b[1]}-{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_the_checks_refuse_a_bad_manifest(tmp_path, path, kind, change, script, words):
    bad = _mutated(tmp_path, path, kind, change)
    results = [r for r in node(script, bad) if r["kind"] == kind]
    invalid = [r for r in results if r["status"] == "invalid"]
    assert len(invalid) == 1, results
    assert words in " ".join(invalid[0]["errors"])


@pytest.mark.parametrize("change,words", [
    (lambda s: s.update(lua={"inlineCode": "function envoy_on_request(h) end"}), "is valid under each of"),
    (lambda s: s.update(selector={"matchLabels": {"istio": "latchkey-gateway"}}), "should not be valid"),
    (lambda s: s["targetRefs"][0].update(namespace="other"), "expected to be empty"),
    (lambda s: s["wasm"]["vmConfig"]["env"][0].update(value="inline"), "should not be valid"),
    (lambda s: s["wasm"].update(url="s3://bucket/latchkey.wasm"), "does not match"),
    (lambda s: s["wasm"].update(pluginconfig={}), "Additional properties"),
    (lambda s: s.update(failStrategy="FAIL_CLOSE"), "Additional properties"),
    (lambda s: s.pop("wasm"), "is not valid under any of the given schemas"),
], ids=["wasm-and-lua", "selector-and-targetRefs", "cross-namespace", "host-env-with-value",
        "url-scheme", "typo", "wasmplugin-field-at-top", "neither-wasm-nor-lua"])
def test_the_hand_written_schema_refuses_what_istio_refuses(change, words):
    doc = copy.deepcopy(plugin(ISTIO / "gateway-api" / "trafficextension.yaml"))
    change(doc["spec"])
    with pytest.raises(jsonschema.ValidationError) as e:
        jsonschema.Draft202012Validator(TE_SCHEMA).validate(doc)
    assert words in str(e.value)


# --- Istio: what the schemas can't see ---------------------------------------------------

BASE = yaml.safe_load((ISTIO / "wasmplugin.yaml").read_text())


def test_every_variant_has_a_wasmplugin_and_a_trafficextension():
    kinds = {(p.parent.name, plugin(p)["kind"], "selector" in plugin(p)["spec"]) for p in plugins()}
    assert kinds == {("trafficextension", "TrafficExtension", True),
                     ("gateway-api", "TrafficExtension", False), ("gateway-api", "WasmPlugin", False),
                     ("waypoint", "TrafficExtension", False), ("waypoint", "WasmPlugin", False)}


@pytest.mark.parametrize("path", plugins(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_module_settings_match_deploy_istio_wasmplugin(path):
    d = plugin(path)
    spec, base = module_settings(d), BASE["spec"]
    for key in ("url", "sha256", "imagePullPolicy", "pluginName", "phase", "failStrategy", "vmConfig"):
        assert spec[key] == base[key], key
    assert spec["imagePullSecret"] == "latchkey-pull"
    cfg = spec["pluginConfig"]
    if path.parent.name == "waypoint":
        # The two differences mesh.yaml explains.
        assert cfg["providers"]["orders_idp"]["cluster"] == "inbound-vip|80|http|login.example.com"
        assert cfg["unmatched"] == "allow"
        cfg = copy.deepcopy(cfg)
        cfg["providers"]["orders_idp"]["cluster"] = base["pluginConfig"]["providers"]["orders_idp"]["cluster"]
        cfg["unmatched"] = base["pluginConfig"]["unmatched"]
    assert cfg == base["pluginConfig"]


@pytest.mark.parametrize("variant", ["gateway-api", "waypoint"])
def test_wasmplugin_and_trafficextension_of_a_variant_are_the_same_plugin(variant):
    te, wp = plugin(ISTIO / variant / "trafficextension.yaml"), plugin(ISTIO / variant / "wasmplugin.yaml")
    assert module_settings(te) == module_settings(wp)
    assert te["metadata"] == wp["metadata"]


@pytest.mark.parametrize("variant,gateway", [("gateway-api", "latchkey-gateway"),
                                             ("waypoint", "latchkey-waypoint")])
def test_plugins_and_jwt_authentication_target_the_same_gateway(variant, gateway):
    manifests = all_docs(*sorted((ISTIO / variant).glob("*.yaml")))
    gw = one(manifests, "Gateway", gateway)
    ref = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}]
    for d in manifests:
        if d["kind"] in (*PLUGIN_KINDS, "RequestAuthentication"):
            assert d["spec"]["targetRefs"] == ref, d["kind"]
            assert "selector" not in d["spec"]
            assert d["metadata"]["namespace"] == gw["metadata"]["namespace"]
    assert gw["spec"]["gatewayClassName"] == {"gateway-api": "istio", "waypoint": "istio-waypoint"}[variant]


@pytest.mark.parametrize("variant", ["gateway-api", "waypoint"])
def test_route_names_are_httproute_rule_names(variant):
    manifests = all_docs(*sorted((ISTIO / variant).glob("*.yaml")))
    rules = {r["name"] for d in manifests if d["kind"] == "HTTPRoute" for r in d["spec"]["rules"]}
    for p in (ISTIO / variant).glob("*.yaml"):
        for d in docs(p):
            if d["kind"] in PLUGIN_KINDS:
                names = {r["match"]["route_name"] for r in plugin_config(d)["routes"]}
                assert names and names <= rules


def test_gateway_api_clusters_are_outbound_clusters_of_deploy_istio_service_entries():
    entries = [d for d in all_docs(*sorted(ISTIO.glob("*.yaml"))) if d["kind"] == "ServiceEntry"]
    clusters = {f"outbound|{p['number']}||{h}" for e in entries for h in e["spec"]["hosts"]
                for p in e["spec"]["ports"]}
    for name in ("trafficextension.yaml", "wasmplugin.yaml"):
        cfg = plugin_config(plugin(ISTIO / "gateway-api" / name))
        assert {p["cluster"] for p in cfg["providers"].values() if "cluster" in p} <= clusters


def test_waypoint_clusters_are_inbound_vip_clusters_of_services_bound_to_it():
    mesh = docs(ISTIO / "waypoint" / "mesh.yaml")
    bound = [d for d in mesh if d["metadata"].get("labels", {}).get("istio.io/use-waypoint") == "latchkey-waypoint"]
    # Istio 1.30 (pilot/pkg/networking/core/cluster_waypoint.go): one cluster per bound
    # service and HTTP port, `inbound-vip|<port>|http|<host>`.
    clusters = {f"inbound-vip|{p['number']}|http|{h}" for d in bound if d["kind"] == "ServiceEntry"
                for h in d["spec"]["hosts"] for p in d["spec"]["ports"] if p["protocol"] == "HTTP"}
    cfg = plugin_config(plugin(ISTIO / "waypoint" / "trafficextension.yaml"))
    used = {p["cluster"] for p in cfg["providers"].values() if "cluster" in p}
    assert used and used <= clusters
    # TLS to the token server is originated by the waypoint (latchkey sends plain HTTP).
    host = cfg["providers"]["orders_idp"]["cluster"].split("|")[3]
    rule = one(mesh, "DestinationRule", "login-example-com")
    assert rule["spec"]["host"] == host and rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "sni": host}
    # Every service a route reaches is bound to the waypoint, or latchkey never sees it.
    for route in (d for d in mesh if d["kind"] == "HTTPRoute"):
        for ref in route["spec"]["parentRefs"]:
            target = one(mesh, ref["kind"], ref["name"])
            assert target in bound


@pytest.mark.parametrize("variant,options", [("gateway-api", "latchkey-gateway-options"),
                                             ("waypoint", "latchkey-waypoint-options")])
def test_host_env_secrets_are_set_on_the_istio_proxy_container(variant, options):
    manifests = all_docs(*sorted((ISTIO / variant).glob("*.yaml")))
    gw = next(d for d in manifests if d["kind"] == "Gateway")
    ref = gw["spec"]["infrastructure"]["parametersRef"]
    assert ref == {"group": "", "kind": "ConfigMap", "name": options}
    overlay = yaml.safe_load(one(manifests, "ConfigMap", options)["data"]["deployment"])
    [proxy] = overlay["spec"]["template"]["spec"]["containers"]
    assert proxy["name"] == "istio-proxy"
    on_proxy = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in proxy["env"]}
    assert {r["name"] for r in on_proxy.values()} == {"latchkey-secrets"}
    stats = yaml.safe_load(overlay["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    assert "wasmcustom.latchkey." in stats["proxyStatsMatcher"]["inclusionPrefixes"]
    for d in manifests:
        if d["kind"] in PLUGIN_KINDS:
            host = {e["name"] for e in module_settings(d)["vmConfig"]["env"] if e.get("valueFrom") == "HOST"}
            assert host and host <= set(on_proxy)


@pytest.mark.parametrize("path", plugins(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_checker_accepts_every_istio_variant(tmp_path, path):
    jsonschema.Draft202012Validator(LATCHKEY_SCHEMA).validate(plugin_config(plugin(path)))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(plugin_config(plugin(path))))
    r = subprocess.run([CHECKER, "check", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok (2 routes, 2 connections, 2 providers)" in r.stdout


# --- Envoy Gateway -------------------------------------------------------------------

EG_DOCS = all_docs(*sorted(EG.glob("*.yaml")))
EEP = one(EG_DOCS, "EnvoyExtensionPolicy")
[WASM] = EEP["spec"]["wasm"]
GATEWAY = one(EG_DOCS, "Gateway")
PROXY = one(EG_DOCS, "EnvoyProxy")
SECURITY = one(EG_DOCS, "SecurityPolicy")
BOOTSTRAP = yaml.safe_load(PROXY["spec"]["bootstrap"]["value"])


def test_one_policy_on_the_gateway_not_per_route():
    gateway_ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY["metadata"]["name"]}
    for policy in (EEP, SECURITY):
        assert policy["spec"]["targetRefs"] == [gateway_ref]
        assert policy["metadata"]["namespace"] == GATEWAY["metadata"]["namespace"]
    assert [d for d in EG_DOCS if d["kind"] == "EnvoyExtensionPolicy"] == [EEP]
    # The CRD's CEL rules these manifests touch (not in the npm validators).
    code = WASM["code"]
    assert code["type"] == "Image" and "image" in code and "http" not in code
    assert code["image"]["pullSecretRef"].get("kind", "Secret") == "Secret"
    assert "targetRef" not in EEP["spec"] and "targetSelectors" not in EEP["spec"]


def test_image_is_pinned_like_the_istio_plugins():
    image = WASM["code"]["image"]
    assert image["url"] == BASE["spec"]["url"]  # oci://…: `make oci` pins the image digest
    assert image["sha256"] == BASE["spec"]["sha256"]
    assert WASM["rootID"] == BASE["spec"]["pluginName"]
    assert WASM["failOpen"] is False


def test_secrets_reach_the_vm_from_the_secret():
    ref = GATEWAY["spec"]["infrastructure"]["parametersRef"]
    assert ref == {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": PROXY["metadata"]["name"]}
    env = PROXY["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]
    on_envoy = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env}
    cfg_env = {s["env"] for s in WASM["config"]["secrets"].values() if "env" in s}
    assert cfg_env and cfg_env <= set(WASM["env"]["hostKeys"]) <= set(on_envoy)
    secret = one(EG_DOCS, "Secret")
    for r in on_envoy.values():
        assert r["name"] == secret["metadata"]["name"] and r["key"] in secret["stringData"]
    # Empty on purpose: latchkey refuses an empty variable and names it.
    assert set(secret["stringData"].values()) == {""}


def test_claims_key_is_the_jwt_providers_name():
    [provider] = SECURITY["spec"]["jwt"]["providers"]
    assert WASM["config"]["claims"]["key"] == provider["name"]
    assert SECURITY["spec"]["jwt"]["optional"] is True


def test_routes_match_the_httproute_hosts_and_paths_not_generated_route_names():
    route = one(EG_DOCS, "HTTPRoute")
    paths = {m["path"]["value"] for r in route["spec"]["rules"] for m in r["matches"]}
    for r in WASM["config"]["routes"]:
        assert "route_name" not in r["match"]
        assert r["match"]["host"] in route["spec"]["hostnames"]
        assert r["match"]["path_prefix"] in paths


def test_token_server_cluster_is_the_bootstrap_cluster():
    clusters = {c["name"] for c in BOOTSTRAP["static_resources"]["clusters"]}
    used = {p["cluster"] for p in WASM["config"]["providers"].values() if "cluster" in p}
    assert used and used <= clusters
    # Envoy Gateway refuses a bootstrap that changes dynamic_resources or xds_cluster.
    assert set(BOOTSTRAP) == {"static_resources"} and set(BOOTSTRAP["static_resources"]) == {"clusters"}
    assert "xds_cluster" not in clusters


def test_checker_accepts_the_envoy_gateway_configuration(tmp_path):
    jsonschema.Draft202012Validator(LATCHKEY_SCHEMA).validate(WASM["config"])
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(WASM["config"]))
    r = subprocess.run([CHECKER, "check", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok (2 routes, 2 connections, 2 providers)" in r.stdout
    # As secret.yaml ships (empty values): refused, naming the variable.
    env = {**os.environ, "PARTNER_API_KEY": "", "IDP_CLIENT_SECRET": ""}
    r = subprocess.run([CHECKER, "check", "--env", str(cfg)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'environment variable "' in r.stdout and '" is empty' in r.stdout


def test_envoy_accepts_the_bootstrap_cluster_and_the_filter_as_envoy_gateway_builds_them(tmp_path, wasm_path):
    """Envoy 1.40's own validation of the EnvoyProxy's bootstrap cluster, next to a listener
    with the jwt_authn and wasm filters as Envoy Gateway builds them from the two policies
    (internal/xds/translator/jwt.go and wasm.go: payload under the provider's name, vm_id
    per policy entry, root_id, host_env_keys, the configuration as a JSON StringValue; the
    module as Envoy Gateway serves it, here a local file)."""
    [provider] = SECURITY["spec"]["jwt"]["providers"]
    wasm_filter = {
        "name": "envoy.filters.http.wasm/envoyextensionpolicy/latchkey/latchkey/wasm/0",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": WASM["name"], "root_id": WASM["rootID"], "fail_open": WASM["failOpen"],
                "vm_config": {
                    "vm_id": "envoyextensionpolicy/latchkey/latchkey/wasm/0",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm_path)}},
                    "environment_variables": {"host_env_keys": WASM["env"]["hostKeys"]},
                },
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps(WASM["config"])},
            },
        },
    }
    jwt_filter = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {provider["name"]: {
                "issuer": provider["issuer"], "audiences": provider["audiences"], "forward": True,
                "payload_in_metadata": provider["name"],
                "remote_jwks": {"http_uri": {"uri": provider["remoteJWKS"]["uri"], "cluster": "latchkey_idp",
                                             "timeout": "5s"}},
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": provider["name"]}, {"allow_missing": {}}]}}}],
        },
    }
    listener = {
        "name": "http", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "http",
                "route_config": {"virtual_hosts": [{"name": "api", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": "latchkey_idp"}}]}]},
                "http_filters": [jwt_filter, wasm_filter, {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }
    bootstrap = copy.deepcopy(BOOTSTRAP)
    bootstrap["static_resources"]["listeners"] = [listener]
    bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    path = tmp_path / "envoy-gateway-shaped.yaml"
    path.write_text(yaml.safe_dump(bootstrap))

    def validate(**env):
        # Envoy's validate mode starts the VM and runs latchkey's on_configure.
        return subprocess.run(
            [str(harness.envoy_bin()), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id",
             "--log-level", "warn"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, env={**os.environ, **env})

    r = validate(PARTNER_API_KEY="partner-key", IDP_CLIENT_SECRET="idp-secret")
    assert r.returncode == 0, r.stdout + r.stderr
    # With secret.yaml as it ships (empty values), latchkey refuses and names the variable,
    # and Envoy does not take the listener.
    r = validate(PARTNER_API_KEY="", IDP_CLIENT_SECRET="")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "configuration rejected" in out and '" is empty' in out, out
