"""pytest fixtures for latchkey's integration tests (real Envoy, see harness.py).

Fixtures:
  signer         session   RSA key + JWKS for jwt_authn; `signer.token({"sub": "alice"})`
  upstream       function  started echo server recording requests
  wasm_path      session   $LATCHKEY_WASM or target/wasm32-wasip1/release/latchkey.wasm
  envoy_factory  function  `envoy_factory(plugin_config, **kw) -> Envoy` (started; all
                           stopped at teardown, log tails printed if the test failed)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (REPO_ROOT, Envoy, EnvoyStartError, Signer, Upstream,  # noqa: E402
                     envoy_config, free_port)

# What Envoy logs when a wasm VM traps (a panic is an abort, i.e. `unreachable`).
VM_FAILURE = re.compile(r"Uncaught RuntimeError|Wasm VM failed|failed: Uncaught|panicked at|Plugin configured to fail")

DEFAULT_WASM = REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "latchkey.wasm"
_DEFAULT = object()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def signer() -> Signer:
    """The key jwt_authn trusts (issuer https://issuer.test, audience latchkey-tests)."""
    return Signer()


@pytest.fixture
def upstream():
    """A started echo upstream on 127.0.0.1; stopped after the test."""
    with Upstream() as up:
        yield up


@pytest.fixture(scope="session")
def wasm_path() -> Path:
    """The latchkey module under test ($LATCHKEY_WASM overrides the default path)."""
    path = Path(os.environ.get("LATCHKEY_WASM") or DEFAULT_WASM)
    if not path.is_file():
        pytest.fail(f"latchkey wasm module not found at {path}: build it first "
                    f"(cargo build --release --target wasm32-wasip1) or set LATCHKEY_WASM",
                    pytrace=False)
    return path


@pytest.fixture
def envoy_factory(request, signer, upstream, tmp_path):
    """Start Envoys: `envoy_factory(plugin_config, **kwargs) -> Envoy` (already ready).

    kwargs: `wasm_path` (default: the wasm_path fixture; None = no wasm filter),
    `upstream_port` (default: the `upstream` fixture), `jwks` (default: signer's),
    `log_level`, `component_log_level` (e.g. "wasm:debug"), `concurrency`, `extra_args`,
    `env` (Envoy process env additions); everything else goes to `envoy_config`
    (routes, extra_clusters, wasm_env, failure_policy, claims_header_forward, ...).
    The access log is written to <workdir>/access.log.
    """
    started: list[Envoy] = []
    healthy: list[Envoy] = []  # those that came up: their wasm VMs must never fail

    def start(plugin_config=None, *, wasm_path=_DEFAULT, upstream_port=None, jwks=None,
              log_level="info", component_log_level=None, concurrency=2, extra_args=(),
              env=None, **config_kwargs) -> Envoy:
        if wasm_path is _DEFAULT:
            wasm_path = request.getfixturevalue("wasm_path")
        # free_port() is "free a moment ago": another process may bind the port before
        # Envoy does. Then Envoy exits with "Address already in use"; try new ports.
        for attempt in range(3):
            workdir = tmp_path / f"envoy{len(started)}"
            workdir.mkdir()
            kwargs = dict(config_kwargs)
            kwargs.setdefault("access_log_path", workdir / "access.log")
            config = envoy_config(
                listener_port=free_port(), admin_port=free_port(),
                upstream_port=upstream_port if upstream_port is not None else upstream.port,
                wasm_path=wasm_path, plugin_config=plugin_config,
                jwks=jwks if jwks is not None else signer.jwks(), **kwargs)
            envoy = Envoy(config, workdir, log_level=log_level,
                          component_log_level=component_log_level, concurrency=concurrency,
                          extra_args=extra_args, env=env)
            started.append(envoy)
            try:
                envoy.start()
            except EnvoyStartError as e:
                if "Address already in use" in str(e) and attempt < 2:
                    continue
                raise
            healthy.append(envoy)
            return envoy

    yield start

    failed = any(getattr(request.node, f"rep_{w}", None) is not None
                 and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))
    vm_failures = []
    for envoy in healthy:
        if envoy.running:
            stats = envoy.stats(settle=False)
            reloads = {k: v for k, v in stats.items() if k.startswith("wasm.") and "vm_reload" in k and v}
            if reloads:
                vm_failures.append(f"{envoy.workdir}: {reloads}")
        for line in envoy.log_text().splitlines():
            if VM_FAILURE.search(line):
                vm_failures.append(line)
    for envoy in started:
        if failed and envoy.pid is not None:
            print(f"\n=== envoy pid {envoy.pid} workdir {envoy.workdir} ===\n{envoy.diagnostics()}")
        envoy.stop()
    # After every test: no wasm VM crashed or was reloaded (a panic aborts the VM).
    assert vm_failures == [], "wasm VM failure:\n" + "\n".join(vm_failures[:10])


# --------------------------------------------------------------------------- secret stores (v1.1)
# Servers in secret_stores.py; contract tests in test_secret_store_servers.py.


def _test_failed(request) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None
               and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))


@pytest.fixture
def keyvault_stack(request):
    """A started IMDS stand-in (`.imds`, plain HTTP) and Key Vault stand-in (`.kv`, HTTPS
    with a fresh test CA `.ca`), sharing tokens; both stopped after the test. See
    secret_stores.KeyVaultStack. `.clusters()` -> Envoy clusters "keyvault" (TLS, SNI
    kv-test.vault.azure.net, trusted_ca) and "imds"."""
    from secret_stores import KeyVaultStack
    with KeyVaultStack() as stack:
        yield stack
        if stack.errors:
            print("\n=== secret-store stand-in errors ===\n" + "\n".join(stack.errors))
    assert stack.errors == [], "a stand-in handler raised (see output)"


@pytest.fixture
def openbao(request):
    """A started real OpenBao dev server (KV v2 at secret/, audit log on), one per test
    (it starts in well under a second); stopped after the test. See secret_stores.OpenBao."""
    from secret_stores import OpenBao
    bao = OpenBao(keep_workdir=True)
    bao.start()
    try:
        yield bao
    finally:
        if _test_failed(request):
            print(f"\n=== bao pid {bao.pid} {bao.url} ===\n{bao.diagnostics()}")
        bao.stop()
        bao._cleanup_workdir(force=True)
