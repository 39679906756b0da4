"""`latchkey check` and `latchkey schema`: the offline checker, and the JSON Schema.

The checker runs the filter's own configuration code natively (src/bin/latchkey.rs over
latchkey::config), so it must say exactly what the filter says in Envoy. The schema
(schema/latchkey.schema.json) must accept every example configuration the repository
ships; test_zz_checker_agrees.py compares both with every configuration the rest of the
suite ran in Envoy.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

import checker_util as cu
from harness import REPO_ROOT, Envoy, EnvoyStartError, envoy_config, free_port

BAD = {"providers": {"p": {"type": "api_key"}},
       "connections": {"c": {"provider": "pp", "api_key": "k", "access": {"public": True}}}}


def test_schema_command_prints_the_committed_schema():
    r = cu.check("schema")
    assert r.returncode == 0
    assert r.stdout == cu.SCHEMA_PATH.read_text()
    cu.validator()  # a valid draft 2020-12 schema


EXAMPLES = cu.example_configs()


@pytest.mark.parametrize("name,doc,complete", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_every_example_configuration_fits_the_schema_and_the_checker(name, doc, complete):
    assert cu.schema_errors(doc) == [], name
    if complete:  # a fragment names things it does not define
        r = cu.check("check", "-", stdin=json.dumps(doc))
        assert r.returncode == 0, r.stdout + r.stderr


def schema_field_names(node) -> set[str]:
    """Every property name anywhere in a JSON schema (properties of $defs included)."""
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                names.update(value)
            names |= schema_field_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= schema_field_names(item)
    return names


def test_the_configuration_reference_names_every_field_of_the_schema():
    """docs/configuration.md is written by hand next to the schema (the public contract):
    every field the schema knows is in it, as `name` or as the last part of a dotted
    `parent.name`, so a field added to the schema without its reference row fails here."""
    doc = (cu.REPO_ROOT / "docs" / "configuration.md").read_text()
    names = schema_field_names(json.loads(cu.SCHEMA_PATH.read_text()))
    assert len(names) > 80, names
    missing = sorted(n for n in names
                     if f"`{n}`" not in doc and not re.search(rf"`[\w.$\[\]]*\.{re.escape(n)}`", doc))
    assert missing == [], missing


def test_the_specs_examples_fit_the_schema():
    examples = cu.spec_examples()
    if not examples:
        pytest.skip("../shared/SPEC.md not beside the repository")
    checked = 0
    for name, doc, section in examples:
        if section in cu.SPEC_SECTIONS_NOT_BUILT:
            continue  # that feature's issue extends the schema
        assert cu.schema_errors(doc) == [], f"{name} ({section})"
        checked += 1
    assert checked >= 3, "the SPEC's examples were not found"
    # A section listed as not built that the SPEC no longer has is a stale entry.
    headings = set(re.findall(r"^## (.*?)\s*$", cu.SPEC_PATH.read_text(), re.M))
    assert set(cu.SPEC_SECTIONS_NOT_BUILT) <= headings, set(cu.SPEC_SECTIONS_NOT_BUILT) - headings


@pytest.mark.parametrize("doc,where", [
    ({"routes": [{"name": "a", "match": {}, "inject": [{"connections": ["c"], "header": "x", "query": "y"}]}]}, "inject"),
    ({"unmatched": "sometimes"}, "unmatched"),
    ({"claims": {"from": "cookie"}}, "from"),
    ({"routez": []}, "routez"),
    ({"connections": {"c": {"provider": "p", "access": {}}}}, "access"),
    ({"routes": [{"name": "a", "match": {"path_prefix": "/a/../b"}}]}, "path_prefix"),
    ({"providers": {"p": {"type": "api_key", "cluster": "x"}}}, "p"),
    # v1.2: a list of keys only for jwt_metadata; route_name xor route_name_prefix;
    # a backslash escapes only "." or itself; $schema is a string.
    ({"claims": {"from": "header", "key": ["x-a", "x-b"]}}, "key"),
    ({"claims": {"key": []}}, "key"),
    ({"routes": [{"name": "a", "match": {"route_name": "r", "route_name_prefix": "r"}}]}, "route_name_prefix"),
    ({"routes": [{"name": "a", "match": {"route_name_prefix": ""}}]}, "route_name_prefix"),
    ({"claims": {"groups": "a\\b"}}, "groups"),
    ({"claims": {"subject": "a\\"}}, "subject"),
    ({"$schema": 1}, "$schema"),
])
def test_the_schema_refuses_what_the_filter_refuses(doc, where):
    errors = cu.schema_errors(doc)
    assert errors, doc
    assert cu.check("check", "-", stdin=json.dumps(doc)).returncode == 1


@pytest.mark.parametrize("doc", [
    {"$schema": "https://example.test/latchkey.schema.json", "unmatched": "deny"},
    {"claims": {"key": ["team-a", "team-b"], "groups": "https://example\\.com/roles",
                "subject": "kubernetes\\.io/sub"}},
    {"routes": [{"name": "a", "match": {"route_name_prefix": "httproute/shop/orders/"}}]},
])
def test_the_schema_and_the_filter_take_v1_2_forms(doc, envoy_factory):
    assert cu.schema_errors(doc) == [], doc
    r = cu.check("check", "-", stdin=json.dumps(doc))
    assert r.returncode == 0, r.stdout
    envoy_factory(doc)


def test_exit_codes_and_messages(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"unmatched": "deny"}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD))
    r = cu.check("check", str(good))
    assert (r.returncode, r.stdout) == (0, f"{good}:1:1: ok (0 routes, 0 connections, 0 providers)\n")
    r = cu.check("check", str(bad))
    assert r.returncode == 1
    # line:column of the field the error names: `"provider": "pp"`.
    col = bad.read_text().index('"provider": "pp"') + 1
    assert r.stdout == f'{bad}:1:{col}: error: connections.c.provider: unknown provider "pp"\n'
    assert cu.check("check", str(good), str(bad)).returncode == 1
    assert cu.check("check", str(tmp_path / "missing.json")).returncode == 2
    assert cu.check("check").returncode == 2
    assert cu.check("frobnicate").returncode == 2
    assert cu.check("check", "--quiet", str(good)).stdout == ""


def test_env_secrets_placeholder_by_default_and_from_the_environment_with_env():
    doc = json.dumps({"secrets": {"k": {"env": "LK_TEST_KEY"}}, "providers": {"p": {"type": "api_key"}},
                      "connections": {"c": {"provider": "p", "api_key": "k", "access": {"public": True}}}})
    r = cu.check("check", "-", stdin=doc, env={})
    assert r.returncode == 0 and "LK_TEST_KEY taken as set (placeholder value)" in r.stdout
    r = cu.check("check", "--env", "-", stdin=doc, env={})
    assert r.returncode == 1
    assert 'secrets.k.env: environment variable "LK_TEST_KEY" is not set' in r.stdout
    assert cu.check("check", "--env", "-", stdin=doc, env={"LK_TEST_KEY": "v"}).returncode == 0


def test_wasmplugin_yaml_and_envoy_yaml_are_read(tmp_path):
    plugin = yaml.safe_load((REPO_ROOT / "deploy/istio/wasmplugin.yaml").read_text())
    plugin["spec"]["pluginConfig"]["routes"][0]["inject"][0]["connections"] = ["nope"]
    f = tmp_path / "wasmplugin.yaml"
    f.write_text(yaml.safe_dump(plugin))
    r = cu.check("check", str(f))
    assert r.returncode == 1
    assert 'WasmPlugin latchkey/latchkey: error: routes[0].inject[0].connections[0]: unknown connection "nope"' in r.stdout
    r = cu.check("check", str(REPO_ROOT / "envoy" / "demo.yaml"))
    assert r.returncode == 0, r.stdout
    assert 'wasm filter "latchkey": ok (4 routes, 4 connections, 4 providers)' in r.stdout
    assert "warning: secret \"weather_key\" is inline" in r.stdout


def test_checker_says_what_the_filter_says_in_envoy(tmp_path, signer):
    """The same bad configuration: Envoy refuses to start with the filter's message; the
    checker prints the same message."""
    cfg = envoy_config(free_port(), free_port(), free_port(), REPO_ROOT / "target/wasm32-wasip1/release/latchkey.wasm",
                       BAD, signer.jwks())
    envoy = Envoy(cfg, tmp_path / "envoy")
    with pytest.raises(EnvoyStartError):
        envoy.start()
    m = re.search(r"configuration rejected: (.*)", envoy.log_text())
    assert m, envoy.log_text()[-2000:]
    r = cu.check("check", "-", stdin=json.dumps(BAD))
    out = re.fullmatch(r"-:\d+:\d+: error: (.*)", r.stdout.strip())
    assert out, r.stdout
    assert out.group(1) == m.group(1).strip()


# --------------------------------------------------------------------------- a CI gate (issue 21)

LATCHKEY_MANIFESTS = [
    "deploy/istio/wasmplugin.yaml",
    "deploy/istio/trafficextension/trafficextension.yaml",
    "deploy/istio/gateway-api/wasmplugin.yaml",
    "deploy/istio/gateway-api/trafficextension.yaml",
    "deploy/istio/waypoint/wasmplugin.yaml",
    "deploy/istio/waypoint/trafficextension.yaml",
    "deploy/envoy-gateway/envoyextensionpolicy.yaml",
]


def test_the_deploy_directory_passes_strict_with_every_manifest_checked():
    r = cu.check("check", "--strict", str(REPO_ROOT / "deploy"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning:" not in r.stdout and "error:" not in r.stdout, r.stdout
    for f in LATCHKEY_MANIFESTS:
        assert re.search(rf"^{re.escape(str(REPO_ROOT / f))}:\d+:\d+: \S+ [^:]*: ok \(2 routes, 2 connections, 2 providers\)$",
                         r.stdout, re.M), (f, r.stdout)
    # Prometheus rules, Secrets, Gateways: nothing to check, a note.
    assert re.search(r"latchkey-alerts\.yaml: note: nothing to check", r.stdout), r.stdout
    assert re.search(r"virtualservice\.yaml: note: nothing to check", r.stdout), r.stdout


def test_envoy_examples_pass_strict_but_the_demo_which_warns_on_purpose():
    """envoy/demo.yaml keeps an inline secret and a 5 s store refresh to show them off:
    its two warnings are the demo's, so it passes without --strict only."""
    files = sorted(str(f) for f in (REPO_ROOT / "envoy").glob("*.yaml"))
    others = [f for f in files if not f.endswith("/demo.yaml")]
    r = cu.check("check", "--strict", *others)
    assert r.returncode == 0, r.stdout
    assert r.stdout.count(": ok (") == len(others)
    demo = str(REPO_ROOT / "envoy" / "demo.yaml")
    assert cu.check("check", demo).returncode == 0
    r = cu.check("check", "--strict", demo)
    assert r.returncode == 1
    assert r.stdout.count(": warning: ") == 2, r.stdout


def test_a_glob_of_istio_manifests_with_files_without_configuration_passes():
    files = sorted(str(f) for f in (REPO_ROOT / "deploy" / "istio").glob("*.yaml"))
    r = cu.check("check", "--strict", *files)
    assert r.returncode == 0, r.stdout
    assert r.stdout.count("note: nothing to check") == len(files) - 1


def _bad_plugin(tmp_path, name, namespace, connection):
    plugin = yaml.safe_load((REPO_ROOT / "deploy/istio/wasmplugin.yaml").read_text())
    plugin["metadata"]["namespace"] = namespace
    plugin["spec"]["pluginConfig"]["routes"][1]["inject"][0]["connections"] = [connection]
    return plugin


def _line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


def test_every_error_is_reported_at_once_with_its_line(tmp_path):
    a = _bad_plugin(tmp_path, "a", "one", "nope_one")
    b = _bad_plugin(tmp_path, "b", "two", "nope_two")
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump_all([a, b]))
    bare = tmp_path / "bare.yaml"
    bare.write_text("unmatched: sometimes\n")
    good = tmp_path / "good.json"
    good.write_text('{"unmatched": "deny"}')
    r = cu.check("check", str(multi), str(bare), str(good))
    assert r.returncode == 1
    text = multi.read_text()
    for ns, conn in [("one", "nope_one"), ("two", "nope_two")]:
        line = _line_of(text, f"- {conn}")
        assert re.search(rf"^{re.escape(str(multi))}:{line}:\d+: document \d: WasmPlugin {ns}/latchkey: error: "
                         rf'routes\[1\]\.inject\[0\]\.connections\[0\]: unknown connection "{conn}"$',
                         r.stdout, re.M), r.stdout
    assert f"{bare}:1:1: error: unmatched: invalid value" in r.stdout
    assert f"{good}:1:1: ok" in r.stdout

    j = json.loads(cu.check("check", "--format", "json", str(multi), str(bare), str(good)).stdout)
    assert (j["files"], j["errors"], j["warnings"]) == (3, 3, 0)
    errors = [d for d in j["diagnostics"] if d["severity"] == "error"]
    assert [d["line"] for d in errors[:2]] == [_line_of(text, "- nope_one"), _line_of(text, "- nope_two")]
    assert all(d["column"] >= 1 for d in errors)

    r = cu.check("check", "--format", "github", str(multi))
    assert r.returncode == 1
    ann = [ln for ln in r.stdout.splitlines() if ln.startswith("::error ")]
    assert len(ann) == 2, r.stdout
    assert re.fullmatch(rf"::error file={re.escape(str(multi))},line={_line_of(text, '- nope_one')},col=\d+,"
                        r"title=latchkey%3A document 1%3A WasmPlugin one/latchkey::"
                        r'routes\[1\]\.inject\[0\]\.connections\[0\]: unknown connection "nope_one"', ann[0]), ann[0]


def test_a_directory_given_twice_and_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cu.check("check", str(tmp_path / "empty"))
    assert r.returncode == 0 and "note: no YAML or JSON files" in r.stdout
    assert cu.check("check", str(tmp_path / "absent")).returncode == 2


def _as_struct(envoy_yaml: str) -> str:
    """The Envoy configuration with each latchkey filter's StringValue JSON configuration
    rewritten as a google.protobuf.Struct (the configuration as YAML)."""
    doc = yaml.safe_load(envoy_yaml)
    n = 0
    for cfg in cu.wasm_filters(doc):
        c = cfg["configuration"]
        cfg["configuration"] = {"@type": "type.googleapis.com/google.protobuf.Struct",
                                "value": json.loads(c["value"])}
        n += 1
    assert n
    return yaml.safe_dump(doc)


def test_envoy_struct_configurations_are_read(tmp_path):
    for name in ["demo.yaml", "client-certs.yaml", "browser-signin.yaml"]:
        src = (REPO_ROOT / "envoy" / name).read_text()
        want = re.findall(r": ok \(.*\)", cu.check("check", str(REPO_ROOT / "envoy" / name)).stdout)
        f = tmp_path / name
        f.write_text(_as_struct(src))
        r = cu.check("check", str(f))
        assert r.returncode == 0, r.stdout
        assert re.findall(r": ok \(.*\)", r.stdout) == want
    # An error inside a Struct points at its field.
    doc = yaml.safe_load(_as_struct((REPO_ROOT / "envoy" / "demo.yaml").read_text()))
    next(cu.wasm_filters(doc))["configuration"]["value"]["unmatched"] = "sometimes"
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = cu.check("check", str(f))
    assert r.returncode == 1
    line = _line_of(f.read_text(), "unmatched: sometimes")
    assert re.search(rf":{line}:\d+: wasm filter \"latchkey\": error: unmatched: invalid value", r.stdout), r.stdout


def test_route_names_and_clusters_are_checked_against_the_files_given(tmp_path):
    istio = REPO_ROOT / "deploy" / "istio"
    base = [str(istio / "virtualservice.yaml"), str(istio / "token-server.yaml")]
    r = cu.check("check", "--strict", str(istio / "wasmplugin.yaml"), *base)
    assert r.returncode == 0, r.stdout
    plugin = yaml.safe_load((istio / "wasmplugin.yaml").read_text())
    cfg = plugin["spec"]["pluginConfig"]
    cfg["routes"][0]["match"]["route_name"] = "partner"
    cfg["providers"]["orders_idp"]["cluster"] = "outbound|443||login.example.org"
    f = tmp_path / "wasmplugin.yaml"
    f.write_text(yaml.safe_dump(plugin))
    r = cu.check("check", str(f), *base)
    assert r.returncode == 0, r.stdout  # warnings only
    assert 'warning: routes[0].match.route_name "partner" is not a route among the files given' in r.stdout
    # Each warning points at its field.
    text = f.read_text()
    assert re.search(rf"^{re.escape(str(f))}:{_line_of(text, 'route_name: partner')}:\d+: .*: warning: routes\[0\]",
                     r.stdout, re.M), r.stdout
    assert re.search(rf"^{re.escape(str(f))}:{_line_of(text, 'cluster: outbound')}:\d+: .*: warning: providers",
                     r.stdout, re.M), r.stdout
    assert '"partner-api"' in r.stdout
    assert 'warning: providers.orders_idp.cluster "outbound|443||login.example.org" is not a cluster' in r.stdout
    assert cu.check("check", "--strict", str(f), *base).returncode == 1
    # Alone, the file says nothing of routes or clusters: nothing to compare with.
    assert cu.check("check", "--strict", str(f)).returncode == 0


def test_host_variables_are_checked_against_the_proxy_containers_given(tmp_path):
    istio = REPO_ROOT / "deploy" / "istio"
    r = cu.check("check", "--strict", str(istio / "wasmplugin.yaml"), str(istio / "gateway.yaml"))
    assert r.returncode == 0, r.stdout
    plugin = yaml.safe_load((istio / "wasmplugin.yaml").read_text())
    plugin["spec"]["vmConfig"]["env"].append({"name": "PARTNER_API_KEY_V2", "valueFrom": "HOST"})
    plugin["spec"]["pluginConfig"]["secrets"]["partner_key"] = {"env": "PARTNER_API_KEY_V2"}
    f = tmp_path / "wasmplugin.yaml"
    f.write_text(yaml.safe_dump(plugin))
    r = cu.check("check", "--strict", str(f), str(istio / "gateway.yaml"))
    assert r.returncode == 1
    line = _line_of(f.read_text(), "env: PARTNER_API_KEY_V2")
    assert re.search(rf":{line}:\d+: WasmPlugin latchkey/latchkey: warning: environment variable "
                     r'"PARTNER_API_KEY_V2" comes from the proxy\'s environment, but no proxy container', r.stdout), r.stdout


# --------------------------------------------------------------------------- v1.2 consent (issue 18)
# User-delegated connections: token_stores, consent, authorization_code connections and
# their providers' authorization_url, issuer, revocation_url. Each configuration below is
# started in a real Envoy (so test_zz_checker_agrees.py records it too) and given to the
# checker and the schema.

STATE_KEY = "k" * 40


def consent_base() -> dict:
    return {
        "secrets": {"client_secret": {"inline": "s3cret"}, "state_key": {"inline": STATE_KEY},
                    "vault_token": {"inline": "root"}},
        "providers": {
            "idp": {"type": "oauth2", "cluster": "idp", "token_url": "http://127.0.0.1:9/token",
                    "authorization_url": "https://idp.test/authorize?tenant=a",
                    "issuer": "https://idp.test", "revocation_url": "http://127.0.0.1:9/revoke",
                    "client_id": "gw", "client_secret": "client_secret"},
            "mi": {"type": "azure_managed_identity", "cluster": "imds"}},
        "token_stores": {
            "user_tokens": {"vault": {"cluster": "vault", "url": "http://127.0.0.1:8200",
                                      "mount": "secret", "prefix": "latchkey/connections",
                                      "token": "vault_token", "namespace": "team"},
                            "timeout_ms": 2000},
            "kv_tokens": {"azure_key_vault": "https://kv.vault.azure.net", "cluster": "keyvault",
                          "identity": "kv_reader", "prefix": "lk-conn"}},
        "consent": {"path": "/.latchkey/connections",
                    "redirect_uri": "https://gateway.test/.latchkey/callback",
                    "state_key": "state_key", "return_to": ["https://portal.test/", "https://portal.test"]},
        "connections": {
            "mine": {"provider": "idp", "grant": "authorization_code", "per_user": True,
                     "scopes": ["orders.read"], "store": "user_tokens", "access": {"authenticated": True}},
            "team-crm": {"provider": "idp", "grant": "authorization_code", "store": "kv_tokens",
                         "consent": {"users": ["alice"]}, "access": {"groups": ["sales"]}},
            "kv_reader": {"provider": "mi", "resource": "https://vault.azure.net"}},
        "routes": [{"name": "orders", "match": {"path_prefix": "/orders"},
                    "inject": [{"connections": ["mine"], "header": "authorization"}]}],
    }


def _at(doc: dict, path: list):
    for k in path[:-1]:
        doc = doc[k]
    return doc, path[-1]


def _set(path: list, value):
    def f(c):
        node, key = _at(c, path)
        node[key] = value
    return f


def _drop(path: list):
    def f(c):
        node, key = _at(c, path)
        del node[key]
    return f


def _rename_mine(new: str):
    def f(c):
        c["connections"][new] = c["connections"].pop("mine")
        c["routes"][0]["inject"][0]["connections"] = [new]
    return f


def _in_key_vault_as(new: str):
    """`mine` in the Key Vault store, whose prefix is as long as allowed (40), renamed:
    its record names are `<prefix>-<new, - and _ doubled>-<32 hex>`, at most 127."""
    def f(c):
        c["token_stores"]["kv_tokens"]["prefix"] = "a" * 40
        c["connections"]["mine"]["store"] = "kv_tokens"
        _rename_mine(new)(c)
    return f


# name: (change to consent_base(), valid?)
CONSENT_CASES = {
    "full": (None, True),
    "no_return_to": (_drop(["consent", "return_to"]), True),
    "shared_per_user_false": (_set(["connections", "team-crm", "per_user"], False), True),
    "vault_url_with_a_path": (_set(["token_stores", "user_tokens", "vault", "url"], "https://vault.test/proxy/"), True),
    "vault_defaults": (_set(["token_stores", "user_tokens"], {"vault": {"cluster": "vault", "url": "http://127.0.0.1:8200", "token": "vault_token"}}), True),
    "consent_path_trailing_slash": (_set(["consent", "path"], "/connect/"), True),
    "name_of_64": (_rename_mine("m" * 64), True),
    "key_vault_name_of_127": (_in_key_vault_as("m" * 53), True),
    "no_consent_section": (_drop(["consent"]), False),
    "no_authorization_url": (_drop(["providers", "idp", "authorization_url"]), False),
    "no_store": (_drop(["connections", "mine", "store"]), False),
    "unknown_store": (_set(["connections", "mine", "store"], "nope"), False),
    "shared_without_consent": (_drop(["connections", "team-crm", "consent"]), False),
    "per_user_with_consent": (_set(["connections", "mine", "consent"], {"users": ["a"]}), False),
    "store_on_client_credentials": (_set(["connections", "cc"], {"provider": "idp", "grant": "client_credentials", "store": "user_tokens", "access": {"authenticated": True}}), False),
    "per_user_not_a_boolean": (_set(["connections", "mine", "per_user"], "yes"), False),
    "per_user_public": (_set(["connections", "mine", "access"], {"public": True}), False),
    "extra_params_state": (_set(["connections", "mine", "extra_params"], {"state": "x"}), False),
    "extra_params_prompt": (_set(["connections", "mine", "extra_params"], {"prompt": "consent"}), True),
    "key_vault_name_over_127": (_in_key_vault_as("m_" * 27), False),
    "name_with_a_dot": (_rename_mine("mine.x"), False),
    "name_of_65": (_rename_mine("m" * 65), False),
    "consent_path_root": (_set(["consent", "path"], "/"), False),
    "redirect_uri_query": (_set(["consent", "redirect_uri"], "https://gateway.test/cb?x=1"), False),
    "redirect_uri_under_path": (_set(["consent", "redirect_uri"], "https://gateway.test/.latchkey/connections/cb"), False),
    "redirect_uri_dot_segment": (_set(["consent", "redirect_uri"], "https://gateway.test/a/../cb"), False),
    "state_key_short": (_set(["secrets", "state_key"], {"inline": "short"}), False),
    "state_key_unknown": (_set(["consent", "state_key"], "nope"), False),
    "consent_unknown_field": (_set(["consent", "login"], "/x"), False),
    "return_to_not_a_prefix": (_set(["consent", "return_to"], ["https://portal.test/app"]), False),
    "store_both_kinds": (_set(["token_stores", "user_tokens", "azure_key_vault"], "https://kv.vault.azure.net"), False),
    "vault_cluster_beside": (_set(["token_stores", "user_tokens", "cluster"], "vault"), False),
    "vault_approle": (_set(["token_stores", "user_tokens", "vault", "approle"], {"role_id": "r", "secret_id": "vault_token"}), False),
    "vault_mount_dot_segment": (_set(["token_stores", "user_tokens", "vault", "mount"], "a/../b"), False),
    "key_vault_secret_url": (_set(["token_stores", "kv_tokens", "azure_key_vault"], "https://kv.vault.azure.net/secrets/x"), False),
    "key_vault_prefix_underscore": (_set(["token_stores", "kv_tokens", "prefix"], "lk_conn"), False),
    "key_vault_identity_per_user": (_set(["token_stores", "kv_tokens", "identity"], "mine"), False),
    "authorization_url_fragment": (_set(["providers", "idp", "authorization_url"], "https://idp.test/authorize#x"), False),
    "revocation_url_relative": (_set(["providers", "idp", "revocation_url"], "/revoke"), False),
    "authorization_url_on_managed_identity": (_set(["providers", "mi", "authorization_url"], "https://idp.test/a"), False),
}


def built_case(cases: dict, base, name: str) -> tuple[dict, bool]:
    """Case `name` of `cases` ({name: (change or None, valid)}) applied to `base()`."""
    change, valid = cases[name]
    doc = base()
    if change:
        change(doc)
    return doc, valid


def consent_case(name: str) -> tuple[dict, bool]:
    return built_case(CONSENT_CASES, consent_base, name)


def assert_all_agree(doc: dict, valid: bool, envoy_factory, secret: str) -> None:
    """The filter in a real Envoy, the checker and the schema agree on `doc`: all take
    it, or all refuse it, the checker with the filter's own message (the schema too,
    unless why is beyond a schema: names, values, two fields); `secret` is never shown."""
    r = cu.check("check", "-", stdin=json.dumps(doc))
    errors = cu.schema_errors(doc)
    if valid:
        envoy_factory(doc)
        assert r.returncode == 0, r.stdout
        assert errors == [], errors
        return
    with pytest.raises(EnvoyStartError) as err:
        envoy_factory(doc)
    m = re.search(r"configuration rejected: (.*)", str(err.value))
    assert m, str(err.value)[-2000:]
    assert r.returncode == 1, r.stdout
    assert r.stdout.strip().endswith(f"error: {m.group(1).strip()}"), (r.stdout, m.group(1))
    assert errors or cu.BEYOND_A_SCHEMA.search(m.group(1)), m.group(1)
    assert secret not in r.stdout and secret not in str(err.value)


@pytest.mark.parametrize("name", list(CONSENT_CASES))
def test_consent_configurations_the_filter_checker_and_schema_agree_on(name, envoy_factory):
    doc, valid = consent_case(name)
    assert_all_agree(doc, valid, envoy_factory, STATE_KEY)


# --------------------------------------------------------------------------- v1.2 client auth (issue 19)
# Client authentication without a stored secret: an oauth2 provider's auth_method
# private_key_jwt (signing_key: Key Vault or Vault Transit, assertion_audience),
# client_assertion (assertion) and tls_client_auth. Like the consent corpus above, each
# configuration is started in a real Envoy (so test_zz_checker_agrees.py records it too)
# and given to the checker and the schema.

TRANSIT_TOKEN = "hvs.transit-sign-token-not-logged"
X5T = "q3X1dTn1nWZ4fSl9nVbH3zQ2oE7pK8rT5uY6iO0aB1c"


def client_auth_base() -> dict:
    def oauth2(client_id: str, **auth) -> dict:
        return {"type": "oauth2", "cluster": "idp", "token_url": "http://127.0.0.1:9/token",
                "client_id": client_id, **auth}
    return {
        "secrets": {"client_secret": {"inline": "s3cret"}, "transit_token": {"inline": TRANSIT_TOKEN}},
        "providers": {
            "transit": oauth2("gw-transit", auth_method="private_key_jwt",
                              assertion_audience="https://idp.test",
                              signing_key={"vault_transit": {"cluster": "vault", "url": "http://127.0.0.1:8200",
                                                             "mount": "transit", "key": "gw",
                                                             "token": "transit_token", "namespace": "team"},
                                           "alg": "PS256", "kid": "gw-1", "x5t#S256": X5T, "timeout_ms": 2000}),
            "kv": oauth2("gw-kv", auth_method="private_key_jwt",
                         signing_key={"azure_key_vault_key": "https://kv.vault.azure.net/keys/gw-signer",
                                      "cluster": "keyvault", "identity": "kv_signer", "alg": "ES256"}),
            "entra": oauth2("9c2f6a1e-5b7d-4e3a-8f10-2a4b6c8d0e12", auth_method="client_assertion",
                            assertion="fic"),
            "mtls": {**oauth2("gw-mtls", auth_method="tls_client_auth"), "cluster": "idp_mtls"},
            "secret": oauth2("gw", auth_method="client_secret_post", client_secret="client_secret"),
            "mi": {"type": "azure_managed_identity", "cluster": "imds"}},
        "connections": {
            **{c: {"provider": p, "grant": "client_credentials", "scopes": ["orders.read"],
                   "access": {"authenticated": True}}
               for c, p in [("a", "transit"), ("b", "kv"), ("c", "entra"), ("d", "mtls"), ("e", "secret")]},
            # Used only as a signing identity or an assertion: no access of their own.
            "kv_signer": {"provider": "mi", "resource": "https://vault.azure.net"},
            "fic": {"provider": "mi", "resource": "api://AzureADTokenExchange"}},
        "routes": [{"name": "orders", "match": {"path_prefix": "/orders"},
                    "inject": [{"connections": ["a", "b", "c", "d", "e"], "header": "authorization"}]}],
    }


def _provider(name: str, **fields):
    def f(c):
        c["providers"][name].update(fields)
    return f


def _key(name: str, **fields):
    def f(c):
        c["providers"][name]["signing_key"].update(fields)
    return f


def _transit(**fields):
    def f(c):
        c["providers"]["transit"]["signing_key"]["vault_transit"].update(fields)
    return f


def _with_consent(c):
    """The transit provider used by an authorization_code connection (not supported yet)."""
    c["secrets"]["state_key"] = {"inline": STATE_KEY}
    c["providers"]["transit"]["authorization_url"] = "https://idp.test/authorize"
    c["token_stores"] = {"t": {"vault": {"cluster": "vault", "url": "http://127.0.0.1:8200",
                                         "token": "transit_token"}}}
    c["consent"] = {"path": "/.latchkey/connections", "redirect_uri": "https://gw.test/.latchkey/cb",
                    "state_key": "state_key"}
    c["connections"]["mine"] = {"provider": "transit", "grant": "authorization_code", "per_user": True,
                                "store": "t", "access": {"authenticated": True}}


# name: (change to client_auth_base(), valid?)
CLIENT_AUTH_CASES = {
    "full": (None, True),
    "transit_defaults": (_set(["providers", "transit", "signing_key"],
                              {"vault_transit": {"cluster": "vault", "url": "https://vault.test/", "key": "/gw/",
                                                 "token": "transit_token"}}), True),
    "transit_url_with_a_path": (_transit(url="https://vault.test/proxy"), True),
    "key_vault_pinned_version": (_key("kv", azure_key_vault_key="https://kv.vault.azure.net/keys/gw-signer/0a1b2c3d4e5f60718293a4b5c6d7e8f9"), True),
    "key_vault_rs256_x5t": (_key("kv", alg="RS256", **{"x5t#S256": X5T}), True),
    "assertion_from_client_credentials": (_provider("entra", assertion="e"), True),
    "refresh_token_grant_signs": (lambda c: (c["secrets"].update(rt={"inline": "rt"}),
                                             c["connections"]["a"].update(grant="refresh_token", refresh_token="rt"),
                                             c["connections"]["a"].pop("scopes")), True),
    "unknown_auth_method": (_provider("transit", auth_method="private_key"), False),
    "client_secret_with_private_key_jwt": (_provider("transit", client_secret="client_secret"), False),
    "client_secret_with_tls_client_auth": (_provider("mtls", client_secret="client_secret"), False),
    "client_secret_with_client_assertion": (_provider("entra", client_secret="client_secret"), False),
    "no_client_secret_for_post": (_drop(["providers", "secret", "client_secret"]), False),
    "no_signing_key": (_drop(["providers", "kv", "signing_key"]), False),
    "signing_key_on_client_assertion": (_provider("entra", signing_key={"vault_transit": {"cluster": "v", "url": "http://v", "key": "k", "token": "transit_token"}}), False),
    "assertion_on_private_key_jwt": (_provider("kv", assertion="fic"), False),
    "assertion_audience_on_tls_client_auth": (_provider("mtls", assertion_audience="https://idp.test"), False),
    "assertion_audience_blank": (_provider("transit", assertion_audience="  "), False),
    "no_assertion": (_drop(["providers", "entra", "assertion"]), False),
    "unknown_assertion": (_provider("entra", assertion="nope"), False),
    "assertion_per_caller": (lambda c: (c["connections"].update(x={"provider": "secret", "grant": "token_exchange", "access": {"authenticated": True}}),
                                        c["providers"]["entra"].update(assertion="x")), False),
    "assertion_of_itself": (_provider("entra", assertion="c"), False),
    "key_vault_identity_of_itself": (_key("kv", identity="b"), False),
    "both_key_services": (_key("kv", vault_transit={"cluster": "v", "url": "http://v", "key": "k", "token": "transit_token"}), False),
    "no_key_service": (_set(["providers", "kv", "signing_key"], {"alg": "RS256"}), False),
    "transit_with_a_cluster_beside": (_key("transit", cluster="vault"), False),
    "key_vault_without_identity": (_drop(["providers", "kv", "signing_key", "identity"]), False),
    "key_vault_without_cluster": (_drop(["providers", "kv", "signing_key", "cluster"]), False),
    "key_vault_unknown_identity": (_key("kv", identity="nope"), False),
    "key_vault_secret_url": (_key("kv", azure_key_vault_key="https://kv.vault.azure.net/secrets/gw"), False),
    "key_vault_http": (_key("kv", azure_key_vault_key="http://kv.vault.azure.net/keys/gw"), False),
    "key_vault_version_not_hex": (_key("kv", azure_key_vault_key="https://kv.vault.azure.net/keys/gw/v1"), False),
    "key_vault_name_underscore": (_key("kv", azure_key_vault_key="https://kv.vault.azure.net/keys/gw_signer"), False),
    "alg_hs256": (_key("kv", alg="HS256"), False),
    "x5t_too_short": (_key("kv", **{"x5t#S256": X5T[:40]}), False),
    "x5t_padded": (_key("kv", **{"x5t#S256": X5T[:42] + "="}), False),
    "kid_control_character": (_key("transit", kid="gw\n1"), False),
    "kid_leading_space": (_key("transit", kid=" gw"), False),
    "signing_timeout_zero": (_key("transit", timeout_ms=0), False),
    "signing_key_unknown_field": (_key("transit", key_id="x"), False),
    "transit_token_and_approle": (_transit(approle={"role_id": "r", "secret_id": "transit_token"}), False),
    "transit_approle": (lambda c: (c["providers"]["transit"]["signing_key"]["vault_transit"].pop("token"),
                                   c["providers"]["transit"]["signing_key"]["vault_transit"].update(
                                       approle={"role_id": "r", "secret_id": "transit_token", "mount": "ci"})), True),
    "transit_approle_unknown_field": (lambda c: (c["providers"]["transit"]["signing_key"]["vault_transit"].pop("token"),
                                                 c["providers"]["transit"]["signing_key"]["vault_transit"].update(
                                                     approle={"role": "r", "secret_id": "transit_token"})), False),
    "transit_without_token": (_drop(["providers", "transit", "signing_key", "vault_transit", "token"]), False),
    "transit_unknown_token": (_transit(token="nope"), False),
    "transit_key_with_a_slash": (_transit(key="a/b"), False),
    "transit_mount_dot_segment": (_transit(mount="a/../b"), False),
    "transit_url_query": (_transit(url="http://127.0.0.1:8200/?x=1"), False),
    "transit_unknown_field": (_transit(role="x"), False),
    "private_key_jwt_for_authorization_code": (_with_consent, True),
}


def client_auth_case(name: str) -> tuple[dict, bool]:
    return built_case(CLIENT_AUTH_CASES, client_auth_base, name)


@pytest.mark.parametrize("name", list(CLIENT_AUTH_CASES))
def test_client_auth_configurations_the_filter_checker_and_schema_agree_on(name, envoy_factory):
    doc, valid = client_auth_case(name)
    assert_all_agree(doc, valid, envoy_factory, TRANSIT_TOKEN)
