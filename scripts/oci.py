#!/usr/bin/env python3
"""Package latchkey.wasm as a Wasm OCI image in the "compat" format (behind `make oci`).

The image is what `FROM scratch` + `COPY plugin.wasm ./` builds: one
`application/vnd.oci.image.layer.v1.tar+gzip` layer holding `plugin.wasm`. Istio's agent
(WasmPlugin `url: oci://…`) and Envoy Gateway pull this format. (Istio's other format,
`application/vnd.module.wasm.content.layer.v1+wasm`, needs exactly two layers.)

Written to OUT (default target/oci):
  latchkey/                 an OCI image layout (oci-layout, index.json, blobs/sha256/…),
                            the image tagged TAG (`oci:target/oci/latchkey:0.1.0` for skopeo)
  latchkey-TAG.oci.tar      the same layout as one tarball (`oci-archive:` for skopeo)

Reproducible: no timestamps (tar and gzip mtime 0), uid/gid 0, no user names, sorted
entries, fixed compression level. The same module gives the same image digest.

  wasmplugin.yaml           with --wasmplugin FILE: FILE with its `sha256:` set to this
                            image's digest, ready to apply once the image is pushed

With --pin PATH (a file or a directory of YAML files, repeatable; `make oci` passes the
committed manifests: deploy/, envoy/, compose.yaml), every `sha256: <64 hex>` line and
every `oci://…@sha256:<64 hex>` reference in them is rewritten in place: in a YAML
document that pulls from an `oci://` URL with the image digest, in any other (`https://`,
`file://`, Envoy's remote source) with the module sha256. Files with nothing pinned are
left alone. So a committed manifest never carries a digest of an older module:
tests/integration/test_pinned_digests.py fails when one differs from the built module's.

Prints the digests:
  module sha256    of latchkey.wasm itself: a WasmPlugin with `url: https://…/latchkey.wasm`
                   or `file://…` checks `sha256` against this
  image digest     of the image manifest: a WasmPlugin with `url: oci://…` checks `sha256`
                   against this (Istio compares the manifest digest it pulled), and
                   `oci://…@sha256:<digest>` pins it

Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_NAME = "plugin.wasm"
REPO = Path(__file__).resolve().parent.parent


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    """A deterministic ustar archive of regular files (name, content), sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0: the gzip header holds neither a name nor a time.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def build_image(wasm: bytes) -> dict:
    """The image as blobs: {"blobs": {hex: bytes}, "manifest": hex, "config": hex, "layer": hex}."""
    if wasm[:4] != b"\0asm":
        raise ValueError("not a wasm module (no \\0asm magic)")
    layer_tar = _tar([(WASM_NAME, wasm)])
    layer = _gzip(layer_tar)
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha256(layer_tar)]},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": "sha256:" + sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": "sha256:" + sha256(layer),
                    "size": len(layer)}],
        # The Wasm image spec's variant marker, and the standard title.
        "annotations": {"module.wasm.image/variant": "compat",
                        "org.opencontainers.image.title": WASM_NAME},
    })
    blobs = {sha256(b): b for b in (layer, config, manifest)}
    return {"blobs": blobs, "manifest": sha256(manifest), "config": sha256(config),
            "layer": sha256(layer), "manifest_size": len(manifest)}


def layout_files(image: dict, tag: str) -> list[tuple[str, bytes]]:
    """The files of an OCI image layout holding `image` tagged `tag`."""
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": "sha256:" + image["manifest"],
            "size": image["manifest_size"],
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    })
    files = [("oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"})),
             ("index.json", index)]
    files += [(f"blobs/sha256/{h}", b) for h, b in image["blobs"].items()]
    return sorted(files)


def cargo_version() -> str:
    text = (REPO / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else "latest"


def write(wasm_path: Path, out: Path, name: str, tag: str) -> dict:
    wasm = wasm_path.read_bytes()
    image = build_image(wasm)
    files = layout_files(image, tag)
    layout = out / name
    if layout.exists():
        shutil.rmtree(layout)
    for rel, data in files:
        p = layout / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    tarball = out / f"{name}-{tag}.oci.tar"
    tarball.write_bytes(_tar(files))
    return {
        "module_sha256": sha256(wasm),
        "module_size": len(wasm),
        "image_digest": "sha256:" + image["manifest"],
        "layout": str(layout),
        "tarball": str(tarball),
        "tarball_sha256": sha256(tarball.read_bytes()),
        "tag": tag,
    }


def pin_wasmplugin(text: str, image_digest: str) -> str:
    """`text` (a WasmPlugin manifest) with its spec.sha256 set to `image_digest`.

    Only the value on the `sha256:` line changes; comments and layout stay.
    """
    hexdigest = image_digest.removeprefix("sha256:")
    out, n = re.subn(r'^(\s+sha256:\s*)"?[0-9a-f]{64}"?', lambda m: m.group(1) + hexdigest, text,
                     flags=re.M)
    if n != 1:
        raise ValueError(f"expected one `sha256:` line in the WasmPlugin, found {n}")
    return out


_PIN_LINE = re.compile(r'^(\s+sha256:[ \t]*)("?)[0-9a-f]{64}\2(?=[ \t]*(?:#.*)?$)', re.M)
_OCI_URL = re.compile(r'^[ \t]*-?[ \t]*(?:url|uri):[ \t]*["\']?oci://', re.M)
_PIN_REF = re.compile(r'(oci://[^\s"\'#]*@sha256:)[0-9a-f]{64}')
_DOC_SEP = re.compile(r'(^---[^\n]*\n)', re.M)


def pin_manifest(text: str, image_digest: str, module_sha256: str) -> tuple[str, int]:
    """`text` (YAML, one or more documents) with every pinned digest set; and how many.

    A document whose `url:` is an `oci://` URL gets the image digest (Istio's agent compares the
    manifest digest it pulled); any other gets the module's sha256 (https://, file://,
    Envoy's remote source compare the module's bytes). Only the hex digits change.
    """
    image_hex = image_digest.removeprefix("sha256:")
    parts, count = [], 0
    for part in _DOC_SEP.split(text):
        if _DOC_SEP.fullmatch(part):
            parts.append(part)
            continue
        want = image_hex if _OCI_URL.search(part) else module_sha256
        part, n1 = _PIN_LINE.subn(lambda m: m.group(1) + m.group(2) + want + m.group(2), part)
        part, n2 = _PIN_REF.subn(lambda m: m.group(1) + image_hex, part)
        parts.append(part)
        count += n1 + n2
    return "".join(parts), count


def pin_paths(paths: list[Path], image_digest: str, module_sha256: str) -> list[tuple[Path, bool]]:
    """Rewrite the pinned digests in `paths` (files, or directories searched for *.yaml and
    *.yml) in place. Returns (file, changed) for every file that pins a digest."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--pin {p}: no such file or directory")
    done = []
    for f in files:
        text = f.read_text()
        new, n = pin_manifest(text, image_digest, module_sha256)
        if n == 0:
            continue
        if new != text:
            f.write_text(new)
        done.append((f, new != text))
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, required=True, help="the built latchkey.wasm")
    ap.add_argument("--out", type=Path, default=REPO / "target" / "oci")
    ap.add_argument("--name", default="latchkey", help="layout directory name (default latchkey)")
    ap.add_argument("--tag", default=None, help="image tag (default: the crate version)")
    ap.add_argument("--wasmplugin", type=Path, default=None,
                    help="a WasmPlugin manifest to write to OUT/wasmplugin.yaml with this image's sha256")
    ap.add_argument("--pin", type=Path, action="append", default=[], metavar="PATH",
                    help="rewrite the pinned digests in this committed file, or in the YAML files "
                         "under this directory, in place (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if not args.wasm.is_file():
        print(f"{args.wasm} not found: run `make build` first", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    r = write(args.wasm, args.out, args.name, args.tag or cargo_version())
    if args.wasmplugin:
        pinned = args.out / "wasmplugin.yaml"
        pinned.write_text(pin_wasmplugin(args.wasmplugin.read_text(), r["image_digest"]))
        r["wasmplugin"] = str(pinned)
    if args.pin:
        pinned_files = pin_paths(args.pin, r["image_digest"], r["module_sha256"])
        r["pinned"] = [{"file": str(f), "changed": changed} for f, changed in pinned_files]
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    rel = lambda p: os.path.relpath(p)  # noqa: E731
    print(f"""latchkey Wasm OCI image (compat: one tar+gzip layer with {WASM_NAME})
  layout         {rel(r['layout'])}  (tag {r['tag']})
  tarball        {rel(r['tarball'])}
  module sha256  {r['module_sha256']}  ({r['module_size']} bytes; WasmPlugin sha256 for url https://… or file://…)
  image digest   {r['image_digest']}  (WasmPlugin sha256 for url oci://…, without "sha256:")

Push it (any registry; skopeo or crane copy the layout as it is):
  skopeo copy oci:{rel(r['layout'])}:{r['tag']} docker://REGISTRY/latchkey:{r['tag']}
  crane push {rel(r['layout'])} REGISTRY/latchkey:{r['tag']}
then in the WasmPlugin:
  url: oci://REGISTRY/latchkey:{r['tag']}
  sha256: {r['image_digest'].removeprefix('sha256:')}""")
    if "wasmplugin" in r:
        print(f"  (written into {rel(r['wasmplugin'])})")
    for p in r.get("pinned", []):
        state = "updated: commit it" if p["changed"] else "already current"
        print(f"pinned digest in {rel(p['file'])}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
