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
])
def test_the_schema_refuses_what_the_filter_refuses(doc, where):
    errors = cu.schema_errors(doc)
    assert errors, doc
    assert cu.check("check", "-", stdin=json.dumps(doc)).returncode == 1


def test_exit_codes_and_messages(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"unmatched": "deny"}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(BAD))
    r = cu.check("check", str(good))
    assert (r.returncode, r.stdout) == (0, f"{good}: ok (0 routes, 0 connections, 0 providers)\n")
    r = cu.check("check", str(bad))
    assert r.returncode == 1
    assert r.stdout == f'{bad}: error: connections.c.provider: unknown provider "pp"\n'
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
    assert 'wasm filter "latchkey": ok (3 routes, 3 connections, 3 providers)' in r.stdout
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
    assert r.stdout.strip() == f"-: error: {m.group(1).strip()}"
