"""No committed manifest pins a digest of another module than the one built.

deploy/istio/wasmplugin.yaml pins `sha256`; Istio's agent refuses a module whose digest
differs, and with `failStrategy: FAIL_CLOSE` every request on that proxy then fails. The
digest changes with every change under src/, so `make oci` renders it into the committed
manifests (scripts/oci.py --pin, the Makefile's OCI_PINNED: deploy/, envoy/,
compose.yaml) and this test compares them with the module under test ($LATCHKEY_WASM,
freshly built by `make integration`).

Which digest: scripts/oci.py's. For `url: oci://…` Istio compares `sha256` with the
digest of the image *manifest* it pulled (not the .wasm file's, nor the layer's), so a
document pulling from an oci:// URL must carry the image digest oci.py computes (the
registry reports the same one: test_oci.py pushes it). Any other pin (`https://…`,
`file://…`, Envoy's remote source) is checked against the module's own sha256.

The manifests are read as YAML here, not with oci.py's line rewriting: a pin that
`make oci` could not rewrite fails too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from harness import REPO_ROOT

# What `make oci` renders (the Makefile's OCI_PINNED): every YAML file under these.
PINNED_ROOTS = ("deploy", "envoy", "compose.yaml")
HEX64 = re.compile(r"[0-9a-f]{64}")
REF = re.compile(r"oci://\S*@sha256:([0-9a-f]{64})")
FIX = "to fix: run `make oci` and commit {files} (the module changed since the digest was pinned)"


def _oci_module():
    spec = importlib.util.spec_from_file_location("latchkey_oci", REPO_ROOT / "scripts" / "oci.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def digests(wasm_path) -> dict:
    """The digests a manifest must pin for the module under test."""
    wasm = Path(wasm_path).read_bytes()
    image = _oci_module().build_image(wasm)
    return {"image": image["manifest"], "module": hashlib.sha256(wasm).hexdigest()}


def _files() -> list[Path]:
    out = []
    for root in PINNED_ROOTS:
        p = REPO_ROOT / root
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
    return out


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _pins(node, path="") -> list[tuple[str, str]]:
    """(where, hex) of every `sha256: <64 hex>` key in a YAML document."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}"
            if k == "sha256" and isinstance(v, str) and HEX64.fullmatch(v):
                out.append((where, v))
            else:
                out += _pins(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _pins(v, f"{path}[{i}]")
    return out


def pinned_digests() -> list[tuple[str, str, str, str]]:
    """(file, where in it, digest found, which digest it must be: "image" or "module")."""
    found = []
    for f in _files():
        rel = str(f.relative_to(REPO_ROOT))
        for n, doc in enumerate(yaml.safe_load_all(f.read_text())):
            strings = list(_strings(doc))
            kind = "image" if any(s.startswith("oci://") for s in strings) else "module"
            at = f"document {n + 1}"
            found += [(rel, f"{at} {where}", hexd, kind) for where, hexd in _pins(doc)]
            found += [(rel, f"{at} {s}", m.group(1), "image") for s in strings for m in REF.finditer(s)]
    return found


def test_committed_digests_match_the_built_module(digests, wasm_path):
    found = pinned_digests()
    files = {f for f, _, _, _ in found}
    # Not vacuous: the WasmPlugin docs/deploy.md applies is among them.
    assert "deploy/istio/wasmplugin.yaml" in files, \
        f"no pinned sha256 found in deploy/istio/wasmplugin.yaml (found: {sorted(files)})"
    stale = [(f, w, hexd, kind) for f, w, hexd, kind in found if hexd != digests[kind]]
    lines = [f"  {f} {w}: {hexd}, the built module's {kind} digest is {digests[kind]}"
             for f, w, hexd, kind in stale]
    assert not stale, (
        f"committed digests differ from the module built at {wasm_path}; Istio's agent would "
        "refuse it and with FAIL_CLOSE every request would fail:\n" + "\n".join(lines) + "\n"
        + FIX.format(files=", ".join(sorted({f for f, _, _, _ in stale}))))


# Everything under deploy/ that loads latchkey: Istio's two APIs and Envoy Gateway's.
PLUGIN_KINDS = {"WasmPlugin", "TrafficExtension", "EnvoyExtensionPolicy"}


def test_every_plugin_manifest_pins_the_module_where_make_oci_renders_it():
    """Each WasmPlugin, TrafficExtension and EnvoyExtensionPolicy under deploy/ pins the
    module once, with the same image digest as every other, in a form scripts/oci.py --pin
    (`make oci`) rewrites: a new manifest can't be left out of the render, and the test
    above then covers it. Independent of the module built."""
    oci = _oci_module()
    image, module = "e" * 64, "f" * 64
    seen = []
    for f in sorted((REPO_ROOT / "deploy").rglob("*.yaml")):
        text = f.read_text()
        rendered, _ = oci.pin_manifest(text, "sha256:" + image, module)
        for before, after in zip(list(yaml.safe_load_all(text)), list(yaml.safe_load_all(rendered))):
            if not before or before.get("kind") not in PLUGIN_KINDS:
                continue
            rel = f"{f.relative_to(REPO_ROOT)} {before['kind']}"
            seen.append(rel)
            assert len(_pins(before)) == 1, f"{rel}: expected one pinned sha256, found {_pins(before)}"
            # An oci:// image: `make oci` writes the image digest.
            assert [h for _, h in _pins(after)] == [image], f"{rel}: `make oci` does not rewrite its pin"
    assert len(seen) >= 7, seen
    committed = {hexd for f, _, hexd, kind in pinned_digests() if f.startswith("deploy/") and kind == "image"}
    assert len(committed) == 1, f"deploy/ pins different digests: {committed}; run `make oci`"
