"""The Wasm OCI image `make oci` builds (scripts/oci.py), read back independently.

Media types, digests and sizes of every blob; one tar+gzip layer holding exactly the built
module as plugin.wasm (the "compat" format Istio and Envoy Gateway pull); reproducible
(two builds are byte-identical); the tarball holds the same layout. Then the image is
pushed to a real registry (Distribution, Debian's docker-registry) with skopeo, as the
docs/deploy.md says to, and the registry reports the digest `make oci` printed: the one a
WasmPlugin's sha256 must hold for an oci:// URL.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from harness import LOOPBACK, REPO_ROOT, free_port, wait_until

OCI = REPO_ROOT / "scripts" / "oci.py"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def build(wasm: Path, out: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, str(OCI), "--wasm", str(wasm), "--out", str(out),
                        "--tag", "0.1.0", "--json", *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image(wasm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("oci")
    return build(Path(wasm_path), out, "--wasmplugin", str(REPO_ROOT / "deploy/istio/wasmplugin.yaml"))


def blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":")
    assert algo == "sha256"
    data = (layout / "blobs" / "sha256" / hexd).read_bytes()
    assert sha(data) == hexd, f"blob {digest} does not hash to its name"
    return data


def test_layout_reads_back(image, wasm_path):
    layout = Path(image["layout"])
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [desc] = index["manifests"]
    assert desc["mediaType"] == MANIFEST
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "0.1.0"
    manifest_bytes = blob(layout, desc["digest"])
    assert len(manifest_bytes) == desc["size"]
    assert desc["digest"] == image["image_digest"]
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST
    assert manifest["config"]["mediaType"] == CONFIG
    # Compat format: exactly one tar+gzip layer.
    [layer] = manifest["layers"]
    assert layer["mediaType"] == LAYER
    config_bytes, layer_bytes = blob(layout, manifest["config"]["digest"]), blob(layout, layer["digest"])
    assert len(config_bytes) == manifest["config"]["size"] and len(layer_bytes) == layer["size"]
    # No blob the manifest does not name.
    names = {p.name for p in (layout / "blobs" / "sha256").iterdir()}
    assert names == {d.split(":")[1] for d in (desc["digest"], manifest["config"]["digest"], layer["digest"])}
    # The layer: gzip (no name, no time) of a tar with exactly plugin.wasm, the built module.
    assert layer_bytes[:2] == b"\x1f\x8b" and layer_bytes[4:8] == b"\0\0\0\0"
    tar_bytes = gzip.decompress(layer_bytes)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        assert [(m.name, m.isfile(), m.mtime, m.uid, m.gid) for m in members] == [
            ("plugin.wasm", True, 0, 0, 0)]
        module = tar.extractfile(members[0]).read()
    wasm = Path(wasm_path).read_bytes()
    assert module == wasm
    assert image["module_sha256"] == sha(wasm)
    config = json.loads(config_bytes)
    assert config["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + sha(tar_bytes)]}
    assert (config["architecture"], config["os"]) == ("wasm", "wasip1")


def test_tarball_holds_the_same_layout(image):
    layout = Path(image["layout"])
    with tarfile.open(image["tarball"]) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    on_disk = {str(p.relative_to(layout)): p.read_bytes() for p in layout.rglob("*") if p.is_file()}
    assert files == on_disk


def test_build_is_reproducible(image, wasm_path, tmp_path):
    again = build(Path(wasm_path), tmp_path / "again")
    assert again["image_digest"] == image["image_digest"]
    assert Path(again["tarball"]).read_bytes() == Path(image["tarball"]).read_bytes()


def test_output_names_both_digests(wasm_path, tmp_path):
    r = subprocess.run([sys.executable, str(OCI), "--wasm", str(wasm_path), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    module = sha(Path(wasm_path).read_bytes())
    assert f"module sha256  {module}" in r.stdout
    m = re.search(r"image digest   sha256:([0-9a-f]{64})", r.stdout)
    assert m and f"sha256: {m.group(1)}" in r.stdout
    assert "skopeo copy oci:" in r.stdout and "crane push" in r.stdout


def test_pinned_wasmplugin_has_the_image_digest(image):
    pinned = yaml.safe_load(Path(image["wasmplugin"]).read_text())
    committed = yaml.safe_load((REPO_ROOT / "deploy/istio/wasmplugin.yaml").read_text())
    assert pinned["spec"]["sha256"] == image["image_digest"].removeprefix("sha256:")
    pinned["spec"].pop("sha256"), committed["spec"].pop("sha256")
    assert pinned == committed


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: `make integration` installs it (Debian package {name})"
    return path


@pytest.fixture
def registry(tmp_path):
    """A real OCI registry (CNCF Distribution) on 127.0.0.1, storage in tmp_path."""
    port = free_port()
    cfg = tmp_path / "registry.yml"
    cfg.write_text(json.dumps({"version": 0.1, "log": {"level": "warn"},
                               "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                               "http": {"addr": f"{LOOPBACK}:{port}"}}))
    proc = subprocess.Popen([_tool("docker-registry"), "serve", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        import urllib.request

        def up():
            try:
                return urllib.request.urlopen(f"http://{LOOPBACK}:{port}/v2/", timeout=1).status == 200
            except OSError:
                return False
        wait_until(up, 15, message="registry")
        yield f"{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def skopeo(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([_tool("skopeo"), *args], capture_output=True, text=True, timeout=120,
                       cwd="/tmp")
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_push_to_a_registry_and_pull_back(image, registry, tmp_path, wasm_path):
    ref = f"docker://{registry}/latchkey:0.1.0"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{image['layout']}:0.1.0", ref)
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)
    assert inspected["Digest"] == image["image_digest"]
    # The tarball pushes to the same digest.
    skopeo("copy", "--dest-tls-verify=false", f"oci-archive:{image['tarball']}:0.1.0",
           f"docker://{registry}/latchkey-archive:0.1.0")
    assert json.loads(skopeo("inspect", "--tls-verify=false",
                             f"docker://{registry}/latchkey-archive:0.1.0").stdout)["Digest"] == image["image_digest"]
    # Pulled back, the one layer still holds the module.
    pulled = tmp_path / "pulled"
    skopeo("copy", "--src-tls-verify=false", ref, f"dir:{pulled}")
    manifest = json.loads((pulled / "manifest.json").read_text())
    [layer] = manifest["layers"]
    assert layer["mediaType"] == LAYER
    data = (pulled / layer["digest"].split(":")[1]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        assert tar.extractfile("plugin.wasm").read() == Path(wasm_path).read_bytes()
