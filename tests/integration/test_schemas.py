"""The JSON Schemas in schema/ as editors use them: their https `$id`s, the wrappers that
put latchkey's configuration inside an Istio WasmPlugin or TrafficExtension, and how a
release publishes them.

- schema/latchkey.schema.json (the configuration), schema/wasmplugin.schema.json
  (`spec.pluginConfig` of a WasmPlugin) and schema/trafficextension.schema.json
  (`spec.wasm.pluginConfig` of a TrafficExtension) are draft 2020-12 schemas; the wrappers
  `$ref` "latchkey.schema.json", resolved against their own `$id`.
- Committed, each `$id` is the template https://github.com/OWNER/REPO/releases/download/
  UNRELEASED/<file>; the release (.github/workflows/release.yml) runs
  scripts/release_schemas.py to give each the URL of its own release asset, both for the
  assets and for the checker it builds (which embeds latchkey.schema.json).
- Every WasmPlugin and TrafficExtension under deploy/istio/ fits its wrapper (jsonschema
  with a `referencing` registry, as an editor resolves the `$ref`); an unknown field in
  the pluginConfig does not; the rest of the resource is left open.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from harness import REPO_ROOT
from test_release import RELEASE, load, run_step, step, steps

SCHEMA_DIR = REPO_ROOT / "schema"
SCRIPT = REPO_ROOT / "scripts" / "release_schemas.py"
TEMPLATE = "https://github.com/OWNER/REPO/releases/download/UNRELEASED/"
FILES = {"latchkey.schema.json", "wasmplugin.schema.json", "trafficextension.schema.json"}
WRAPPER = {"WasmPlugin": "wasmplugin.schema.json", "TrafficExtension": "trafficextension.schema.json"}
WHERE = {"WasmPlugin": ("spec", "pluginConfig"), "TrafficExtension": ("spec", "wasm", "pluginConfig")}


def schemas(directory: Path = SCHEMA_DIR) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted(directory.glob("*.json"))}


def validator(name: str, directory: Path = SCHEMA_DIR) -> jsonschema.Draft202012Validator:
    """The schema `name` with every schema of `directory` registered under its `$id`."""
    found = schemas(directory)
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in found.values())
    return jsonschema.Draft202012Validator(found[name], registry=registry)


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO_ROOT / "deploy" / "istio").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in WRAPPER:
                out.append((f"{path.relative_to(REPO_ROOT)}:{doc['kind']}", doc))
    return out


MANIFESTS = manifests()


def at(doc: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        doc = doc[key]
    return doc


def errors(name: str, doc: dict, directory: Path = SCHEMA_DIR) -> list[tuple[tuple, str]]:
    return [(tuple(e.absolute_path), e.message) for e in validator(name, directory).iter_errors(doc)]


def release(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- the committed schemas


def test_the_schemas_are_draft_2020_12_with_the_release_template_as_id():
    found = schemas()
    assert set(found) == FILES
    for name, schema in found.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", name
        assert schema["$id"] == TEMPLATE + name, name
        # Each says where its released copy is and how an editor uses it.
        assert "releases/download/<tag>/" + name in schema["description"], name
    assert found["wasmplugin.schema.json"]["properties"]["spec"]["properties"]["pluginConfig"]["$ref"] \
        == "latchkey.schema.json"
    assert (found["trafficextension.schema.json"]["properties"]["spec"]["properties"]["wasm"]
            ["properties"]["pluginConfig"]["$ref"]) == "latchkey.schema.json"


def test_every_istio_plugin_manifest_fits_its_wrapper():
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == ["TrafficExtension"] * 3 + ["WasmPlugin"] * 3, [n for n, _ in MANIFESTS]
    main = validator("latchkey.schema.json")
    for name, doc in MANIFESTS:
        assert errors(WRAPPER[doc["kind"]], doc) == [], name
        # The pluginConfig is checked by the configuration's own schema, through the $ref.
        assert main.is_valid(at(doc, WHERE[doc["kind"]])), name


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_an_unknown_field_in_the_plugin_config_fails_the_wrapper(name, doc):
    kind, where = doc["kind"], WHERE[doc["kind"]]
    bad = copy.deepcopy(doc)
    at(bad, where)["routez"] = []
    assert (where, "Additional properties are not allowed ('routez' was unexpected)") in errors(WRAPPER[kind], bad)
    # Deeper down too, with the path an editor underlines.
    bad = copy.deepcopy(doc)
    at(bad, where)["routes"][0]["match"]["route_nam"] = "x"
    found = errors(WRAPPER[kind], bad)
    assert any(p == (*where, "routes", 0, "match") and "'route_nam' was unexpected" in m for p, m in found), found
    bad = copy.deepcopy(doc)
    at(bad, where)["unmatched"] = "sometimes"
    assert [p for p, _ in errors(WRAPPER[kind], bad)] == [(*where, "unmatched")]


@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_the_rest_of_the_resource_is_left_open(name, doc):
    """Istio's CRD schema checks the resource; the wrapper only places latchkey's part."""
    kind = doc["kind"]
    open_doc = copy.deepcopy(doc)
    open_doc["metadata"].setdefault("labels", {})["team"] = "shop"
    open_doc["spec"]["someFutureField"] = {"any": ["thing"]}
    open_doc["status"] = {"conditions": []}
    if kind == "TrafficExtension":
        open_doc["spec"]["wasm"]["someFutureField"] = 1
    assert errors(WRAPPER[kind], open_doc) == []
    # But it is that kind of resource.
    other = next(k for k in WRAPPER if k != kind)
    assert ("kind",) in [p for p, _ in errors(WRAPPER[other], doc)]


def test_a_trafficextension_with_a_wasmplugin_style_plugin_config_is_refused():
    name, doc = next((n, d) for n, d in MANIFESTS if d["kind"] == "TrafficExtension")
    moved = copy.deepcopy(doc)
    moved["spec"]["pluginConfig"] = moved["spec"]["wasm"].pop("pluginConfig")
    assert [p for p, _ in errors("trafficextension.schema.json", moved)] == [("spec", "pluginConfig")]


def test_latchkey_schema_prints_the_committed_schema_with_its_id():
    import checker_util as cu
    r = cu.check("schema")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (SCHEMA_DIR / "latchkey.schema.json").read_text()
    assert json.loads(r.stdout)["$id"] == TEMPLATE + "latchkey.schema.json"


# --------------------------------------------------------------------------- released


BASE = "https://github.com/acme/latchkey/releases/download/v1.2.0/"


def test_the_release_gives_each_schema_its_asset_url_and_changes_nothing_else(tmp_path):
    r = release("--repository", "acme/latchkey", "--tag", "v1.2.0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    released = schemas(tmp_path)
    assert set(released) == FILES
    for name, schema in released.items():
        assert schema["$id"] == BASE + name
        before = (SCHEMA_DIR / name).read_text().splitlines()
        after = (tmp_path / name).read_text().splitlines()
        changed = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(before) == len(after) and changed == [(f'  "$id": "{TEMPLATE}{name}",',
                                                          f'  "$id": "{BASE}{name}",')], name
    # The committed files are untouched.
    assert {n: s["$id"] for n, s in schemas().items()} == {n: TEMPLATE + n for n in FILES}


def test_a_released_wrapper_fetches_latchkey_schema_from_the_same_release(tmp_path):
    """As an editor does: only the wrapper is known; its relative $ref resolves against its
    $id to the asset beside it in the same release, fetched on demand."""
    assert release("--repository", "acme/latchkey", "--tag", "v1.2.0", "--out", str(tmp_path)).returncode == 0
    fetched = []

    def retrieve(uri: str) -> Resource:
        fetched.append(uri)
        assert uri.startswith(BASE), uri
        return Resource.from_contents(json.loads((tmp_path / uri.removeprefix(BASE)).read_text()))

    for kind in ("WasmPlugin", "TrafficExtension"):
        wrapper = json.loads((tmp_path / WRAPPER[kind]).read_text())
        v = jsonschema.Draft202012Validator(wrapper, registry=Registry(retrieve=retrieve))
        name, doc = next((n, d) for n, d in MANIFESTS if d["kind"] == kind)
        assert list(v.iter_errors(doc)) == [], name
        bad = copy.deepcopy(doc)
        at(bad, WHERE[kind])["routez"] = []
        assert [deque(WHERE[kind])] == [e.absolute_path for e in v.iter_errors(bad)]
    assert set(fetched) == {BASE + "latchkey.schema.json"}


def test_the_release_rewrites_in_place_once_for_the_checker_build(tmp_path):
    work = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, work)
    r = release("--repository", "acme/latchkey", "--tag", "v1.2.0-rc.1", "--schema-dir", str(work))
    assert r.returncode == 0, r.stderr
    assert {n: s["$id"] for n, s in schemas(work).items()} == \
        {n: f"https://github.com/acme/latchkey/releases/download/v1.2.0-rc.1/{n}" for n in FILES}
    # A second run finds no template to fill in: refused, nothing written.
    before = {f.name: f.read_bytes() for f in work.iterdir()}
    r = release("--repository", "acme/latchkey", "--tag", "v1.2.0", "--schema-dir", str(work))
    assert r.returncode == 1 and "not the template" in r.stderr, r.stderr
    assert {f.name: f.read_bytes() for f in work.iterdir()} == before


@pytest.mark.parametrize("repository,tag,words", [
    ("acme/latchkey", "1.2.0", "is not vMAJOR.MINOR.PATCH"),
    ("acme/latchkey", "v1.2", "is not vMAJOR.MINOR.PATCH"),
    ("acme/latchkey", "v1.2.0/../x", "is not vMAJOR.MINOR.PATCH"),
    ("acme", "v1.2.0", "is not OWNER/NAME"),
    ("acme/latchkey/x", "v1.2.0", "is not OWNER/NAME"),
    ("../latchkey", "v1.2.0", "is not OWNER/NAME"),
])
def test_the_release_refuses_a_tag_or_repository_of_another_form(tmp_path, repository, tag, words):
    r = release("--repository", repository, "--tag", tag, "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref", ["missing.schema.json", "https://example.com/latchkey.schema.json",
                                 "../schema/latchkey.schema.json"])
def test_the_release_refuses_a_ref_to_a_file_it_does_not_publish(tmp_path, ref):
    work = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, work)
    wrapper = work / "wasmplugin.schema.json"
    wrapper.write_text(wrapper.read_text().replace('"$ref": "latchkey.schema.json"', f'"$ref": "{ref}"'))
    r = release("--repository", "acme/latchkey", "--tag", "v1.2.0", "--schema-dir", str(work),
                "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "is not a file published beside it" in r.stderr, r.stderr


# --------------------------------------------------------------------------- the release workflow


def workspace(tmp_path: Path) -> Path:
    """What a job's checkout holds of the files the schema steps use."""
    ws = tmp_path / "ws"
    shutil.copytree(SCHEMA_DIR, ws / "schema")
    (ws / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, ws / "scripts")
    return ws


def test_the_checker_is_built_with_the_released_schema_and_says_so(tmp_path):
    rel = load(RELEASE)
    names = [s.get("name") for s in steps(rel, "checker")]
    assert names.index("Schema $id of this release") < names.index("Build the checker")
    ws = workspace(tmp_path)
    schema_step = step(rel, "checker", "Schema $id of this release")
    assert schema_step["env"] == {"TAG": "${{ github.ref_name }}"}
    env = {"GITHUB_REPOSITORY": "acme/latchkey", "TAG": "v1.2.0"}
    r, _ = run_step(schema_step["run"], ws, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((ws / "schema" / "latchkey.schema.json").read_text())["$id"] == BASE + "latchkey.schema.json"
    # The smoke test: `latchkey schema` prints the released schema. A stand-in checker
    # here (cargo's build embeds the file just rewritten).
    fake = ws / "target" / "T" / "release" / "latchkey"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/bash\ncase "$1" in --version) echo "latchkey 1.2.0";; check) exit 0;;\n'
                    'schema) cat "$(dirname "$0")/embedded.json";; esac\n')
    fake.chmod(0o755)
    smoke = step(rel, "checker", "Run it")["run"]
    smoke_env = {**env, "TARGET": "T", "VERSION": "1.2.0"}
    shutil.copy(ws / "schema" / "latchkey.schema.json", fake.parent / "embedded.json")
    r, _ = run_step(smoke, ws, smoke_env)
    assert r.returncode == 0, r.stdout + r.stderr
    # A checker built from the committed schema fails it, and so does another repository's $id.
    shutil.copy(SCHEMA_DIR / "latchkey.schema.json", fake.parent / "embedded.json")
    assert run_step(smoke, ws, smoke_env)[0].returncode != 0
    shutil.copy(ws / "schema" / "latchkey.schema.json", fake.parent / "embedded.json")
    r, _ = run_step(smoke, ws, {**smoke_env, "GITHUB_REPOSITORY": "other/latchkey"})
    assert r.returncode != 0 and "the schema's $id is not https://github.com/other/latchkey/" in r.stdout, r.stdout


def test_the_release_attaches_the_schemas_and_sums_them(tmp_path):
    rel = load(RELEASE)
    publish = steps(rel, "publish")
    assert publish[0]["uses"].startswith("actions/checkout@")
    assert publish[0]["with"] == {"persist-credentials": False}
    names = [s.get("name") for s in publish]
    assert names.index("JSON Schemas") < names.index("SHA256SUMS") < names.index("Create the release")
    schema_step = step(rel, "publish", "JSON Schemas")
    assert schema_step["env"] == {"TAG": "${{ github.ref_name }}"}
    ws = workspace(tmp_path)
    (ws / "dist").mkdir()
    (ws / "dist" / "latchkey.wasm").write_bytes(b"\0asm")
    r, _ = run_step(schema_step["run"], ws, {"GITHUB_REPOSITORY": "acme/latchkey", "TAG": "v1.2.0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert {n: s["$id"] for n, s in schemas(ws / "dist").items()} == {n: BASE + n for n in FILES}
    sums = step(rel, "publish", "SHA256SUMS")
    r, _ = run_step(sums["run"], ws / sums["working-directory"], {})
    assert r.returncode == 0, r.stderr
    listed = sorted(line.split()[1] for line in (ws / "dist" / "SHA256SUMS").read_text().splitlines())
    assert listed == sorted(FILES | {"latchkey.wasm"})
    # The committed checkout is not what is published.
    assert {n: s["$id"] for n, s in schemas(ws / "schema").items()} == {n: TEMPLATE + n for n in FILES}
