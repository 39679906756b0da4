"""Helpers for the offline checker (`latchkey check`) and the JSON Schema tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

from harness import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "schema" / "latchkey.schema.json"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"


def checker() -> str:
    path = os.environ.get("LATCHKEY_CHECKER") or str(REPO_ROOT / "target" / "debug" / "latchkey")
    assert Path(path).is_file(), f"{path} not found: `make check-tool` builds it"
    return path


def check(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = None
    if env is not None:
        full_env = {"PATH": os.environ.get("PATH", ""), **env}
    return subprocess.run([checker(), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator().iter_errors(doc)]


def wasm_filters(node: Any) -> Iterator[dict]:
    """Every wasm HTTP filter `config` in an Envoy configuration tree."""
    if isinstance(node, dict):
        if node.get("@type") == WASM_TYPE and "config" in node:
            yield node["config"]
            return
        for v in node.values():
            yield from wasm_filters(v)
    elif isinstance(node, list):
        for v in node:
            yield from wasm_filters(v)


def filter_configuration(config: dict) -> str | None:
    c = config.get("configuration")
    if isinstance(c, dict):
        return c.get("value")
    return c


def json_blocks(markdown: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", markdown, re.S)


def parse_block(block: str) -> tuple[Any, bool]:
    """A JSON example: (document, complete). A fragment (`"secrets": {…}, …`) is wrapped
    into a document; it may name things it does not define."""
    text = block.strip()
    if text.startswith("{"):
        return json.loads(text), True
    return json.loads("{" + text + "}"), False


def example_configs() -> list[tuple[str, Any, bool]]:
    """Every latchkey configuration the repository ships as an example: (where, doc, complete)."""
    out: list[tuple[str, Any, bool]] = []
    for md in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        for i, block in enumerate(json_blocks(md.read_text())):
            doc, complete = parse_block(block)
            out.append((f"{md.relative_to(REPO_ROOT)} json block {i + 1}", doc, complete))
    for f in sorted((REPO_ROOT / "envoy").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            for cfg in wasm_filters(d):
                out.append((f"envoy/{f.name} wasm filter {cfg.get('name')}",
                            json.loads(filter_configuration(cfg)), True))
    for f in sorted((REPO_ROOT / "deploy").rglob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d and d.get("kind") == "WasmPlugin":
                out.append((f"{f.relative_to(REPO_ROOT)} pluginConfig", d["spec"]["pluginConfig"], True))
            if d and d.get("kind") == "TrafficExtension":
                out.append((f"{f.relative_to(REPO_ROOT)} wasm.pluginConfig", d["spec"]["wasm"]["pluginConfig"], True))
            if d and d.get("kind") == "EnvoyExtensionPolicy":
                for i, w in enumerate(d["spec"].get("wasm", [])):
                    if "config" in w:
                        out.append((f"{f.relative_to(REPO_ROOT)} wasm[{i}].config", w["config"], True))
    return out


SPEC_PATH = REPO_ROOT.parent / "shared" / "SPEC.md"

# SPEC.md sections whose features are not built yet, with their issue: their
# examples use fields the schema (and the filter) don't know until then.
SPEC_SECTIONS_NOT_BUILT: dict[str, int] = {}

# What a JSON Schema can't express: names defined elsewhere, duplicates, fields that apply
# to one provider type only, the VM environment, secret values; v1.2's consent: a
# provider's authorization_url or a token store named by a connection, a callback under
# consent.path (two fields compared), a state key's length, a Key Vault identity's kind,
# a Key Vault record name's length (a connection's name and its store's prefix); v1.2's
# client authentication: what kind of connection an assertion or a signing identity is,
# a chain of client authentications that comes back to its provider, a connection's
# provider's auth_method.
BEYOND_A_SCHEMA = re.compile(
    r"unknown (provider|secret|connection|identity|env or inline secret)|duplicate |"
    r"not allowed for (a|an) |"
    r"environment variable|only allowed when grant|required when grant|control character|"
    r"is inline|no access policy|access.*required|required field is missing|"
    r"needs authorization_url on its provider|not a name in token_stores|"
    r"must not be under consent\.path|shorter than 32 bytes|"
    r"must name an azure_managed_identity connection|would be longer than 127 characters|"
    r"can't give a token on its own|needs this provider's own token|can't use private_key_jwt yet")


def spec_examples() -> list[tuple[str, Any, str]]:
    """The JSON examples of ../shared/SPEC.md (fragments wrapped into a document), each
    with the `## ` section it stands in."""
    spec = SPEC_PATH
    if not spec.is_file():
        return []
    out = []
    section = ""
    n = 0
    for part in re.split(r"(^## .*$)", spec.read_text(), flags=re.M):
        if part.startswith("## "):
            section = part[3:].strip()
            continue
        for block in json_blocks(part):
            n += 1
            out.append((f"SPEC.md json block {n}", parse_block(block)[0], section))
    return out
