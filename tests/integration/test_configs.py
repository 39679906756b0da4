"""Every Envoy config in envoy/ is valid for Envoy 1.40, and `make run`'s demo works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT, free_port, validate

CONFIGS = sorted((REPO_ROOT / "envoy").glob("*.yaml"))


def test_there_are_configs():
    assert [c.name for c in CONFIGS if c.name == "demo.yaml"] == ["demo.yaml"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_envoy_validates(config: Path, wasm_path, tmp_path):
    # The configs name the module where the compose demo mounts it.
    text = config.read_text().replace("/opt/latchkey/latchkey.wasm", str(wasm_path))
    if "/etc/latchkey/certs/" in text:
        # The client-certificate example's SDS files, with a real certificate each.
        from test_client_certs import CA, write_sds
        ca = CA(tmp_path)
        for name in ("partner-a", "partner-b"):
            d = tmp_path / "certs" / name
            d.mkdir(parents=True)
            cert, key = ca.issue(name, name)
            write_sds(d, name.replace("-", "_cert_"), cert, key)
            (d / "sds.json").rename(d / "sds.yaml")
        text = text.replace("/etc/latchkey/certs/", f"{tmp_path}/certs/")
    if "/etc/latchkey/oauth2/" in text:
        # The browser sign-in example's SDS files: the oauth2 filter's client and HMAC secrets.
        from test_browser_signin import write_oauth2_secrets
        write_oauth2_secrets(tmp_path / "oauth2")
        text = text.replace("/etc/latchkey/oauth2", f"{tmp_path}/oauth2")
    rendered = tmp_path / config.name
    rendered.write_text(text)
    result = validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in (result.stdout + result.stderr)


def test_demo_self_test(wasm_path):
    ports = [free_port() for _ in range(5)]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--wasm", str(wasm_path),
         "--self-test", "--listen", str(ports[0]), "--admin", str(ports[1]),
         "--upstream", str(ports[2]), "--idp", str(ports[3]), "--vault", str(ports[4])],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "10 passed, 0 failed" in result.stdout
    assert "PASS oauth token fetched with private_key_jwt signed by OpenBao Transit" in result.stdout
    assert "PASS rotated key used with no restart" in result.stdout
    assert "PASS alice's own token injected" in result.stdout


def test_module_exports_only_the_callbacks_latchkey_uses(wasm_path):
    """make build prunes the SDK's unused callbacks (scripts/wasm_exports.py); Envoy
    then never enters the VM for request/response bodies, trailers or logs."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import wasm_exports

    names = set()
    for sid, body, _ in wasm_exports.sections(wasm_path.read_bytes()):
        if sid == wasm_exports.EXPORT_SECTION:
            names = {name for name, _ in wasm_exports.exports(body)}
    assert names == wasm_exports.KEEP
    assert "proxy_on_log" not in names and "proxy_on_response_body" not in names
