#!/usr/bin/env python3
"""Give the JSON Schemas in schema/ the `$id` of the release that publishes them.

A commit is not a release, and the repository does not know where it is hosted, so the
committed schemas carry a template `$id`:

    https://github.com/OWNER/REPO/releases/download/UNRELEASED/<file name>

For tag vX.Y.Z of owner/name, the release workflow (.github/workflows/release.yml) runs

    python3 scripts/release_schemas.py --repository owner/name --tag vX.Y.Z [--out DIR]

which writes every schema/*.json with `$id` set to the URL GitHub serves that release
asset at, https://github.com/owner/name/releases/download/vX.Y.Z/<file name>: in place
(before the checker is built: it embeds latchkey.schema.json, so a released
`latchkey schema` prints the released copy), or into DIR (the release assets). A relative
`$ref` between the files (the wrappers' "latchkey.schema.json") then resolves to the
asset of the same release. Only the `$id` line changes.

Refused, with nothing written: a repository or tag of another form, a schema whose `$id`
is not the template, a relative `$ref` to a file that is not one of them.
Standard library only; Python 3.8 or later.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
TEMPLATE = "https://github.com/OWNER/REPO/releases/download/UNRELEASED/"
REPOSITORY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}")
TAG = re.compile(r"v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?")


def base_url(repository: str, tag: str) -> str:
    if not REPOSITORY.fullmatch(repository):
        raise ValueError(f"repository {repository!r} is not OWNER/NAME")
    if not TAG.fullmatch(tag):
        raise ValueError(f"tag {tag!r} is not vMAJOR.MINOR.PATCH or vMAJOR.MINOR.PATCH-PRE")
    return f"https://github.com/{repository}/releases/download/{tag}/"


def relative_refs(node) -> list[str]:
    """Every `$ref` that names another file (not a fragment of the same one)."""
    found = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            found.append(ref.split("#", 1)[0])
        for v in node.values():
            found.extend(relative_refs(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(relative_refs(v))
    return found


def released(schema_dir: Path, base: str) -> dict[str, str]:
    """{file name: released text} for every schema in schema_dir."""
    files = sorted(schema_dir.glob("*.json"))
    if not files:
        raise ValueError(f"no schema in {schema_dir}")
    names = {f.name for f in files}
    out = {}
    for f in files:
        text = f.read_text(encoding="utf-8")
        doc = json.loads(text)
        template_id = TEMPLATE + f.name
        if doc.get("$id") != template_id:
            raise ValueError(f"{f}: $id is {doc.get('$id')!r}, not the template {template_id!r}")
        line = f'"$id": {json.dumps(template_id)}'
        if text.count(line) != 1:
            raise ValueError(f"{f}: the line {line} is not there exactly once")
        for ref in relative_refs(doc):
            if "/" in ref or ":" in ref or ref not in names:
                raise ValueError(f"{f}: $ref {ref!r} is not a file published beside it")
        new = text.replace(line, f'"$id": {json.dumps(base + f.name)}')
        assert json.loads(new)["$id"] == base + f.name
        out[f.name] = new
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="OWNER/NAME (GITHUB_REPOSITORY)")
    parser.add_argument("--tag", required=True, help="vX.Y.Z (the release's tag)")
    parser.add_argument("--schema-dir", type=Path, default=SCHEMA_DIR, help="default: schema/")
    parser.add_argument("--out", type=Path, help="write here instead of in place")
    args = parser.parse_args(argv)
    try:
        base = base_url(args.repository, args.tag)
        texts = released(args.schema_dir, base)
    except ValueError as e:
        print(f"release_schemas: {e}", file=sys.stderr)
        return 1
    out = args.out or args.schema_dir
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: $id {base}{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
