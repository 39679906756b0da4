"""latchkey in an Envoy configured the way Istio configures a gateway for deploy/istio.

The filter arrives by ECDS (from a file), the module is a local file (as the Istio agent
leaves it), jwt_authn is what a RequestAuthentication becomes, the routes are the
VirtualService's, the token server is reached through an `outbound|443||host` cluster with
TLS originated. The pluginConfig is read from deploy/istio/wasmplugin.yaml itself.

Then latchkey's configuration is updated under steady load, as `kubectl apply` of a changed
WasmPlugin would: a good update takes effect within 2 s with no failed request; a bad one
is refused and the old configuration keeps serving; Envoy then keeps the rejected one as
the filter's latest (config_dump) and refuses an LDS update that includes the filter until
a good configuration arrives; 20 updates in a row leave the RSS flat.
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

import istio_shape as ist
import prom
from harness import (LOOPBACK, Envoy, Signer, Upstream, bearer, free_port, http_request,
                     static_cluster, wait_until)

PARTNER_KEY = "istio-partner-key-5d1e"
IDP_SECRET = "istio-idp-secret-0b7c"
HOST = "api.example.com"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class IstioGateway:
    """The Istio-shaped Envoy, its ECDS and LDS files, an echo upstream, a TLS token server."""

    def __init__(self, tmp: Path, wasm_path: Path):
        self.tmp = tmp
        self.wasm_path = wasm_path
        self.plugin = ist.wasmplugin()
        self.ra = ist.one("RequestAuthentication")
        self.vs = ist.one("VirtualService")
        issuer = self.ra["spec"]["jwtRules"][0]["issuer"]
        audience = self.ra["spec"]["jwtRules"][0]["audiences"][0]
        self.signer = Signer(issuer=issuer, audience=audience)
        self.upstream = Upstream().start()
        provider = self.plugin["spec"]["pluginConfig"]["providers"]["orders_idp"]
        token_host = provider["token_url"].split("/")[2]
        ca_pem, cert, key = ist.make_ca_and_cert(token_host, tmp)
        self.tokens = ist.TlsTokenServer(
            cert, key, "/" + provider["token_url"].split("/", 3)[3], provider["client_id"], IDP_SECRET)
        self.tokens.start()
        dr = next(d for d in ist.manifests() if d.get("kind") == "DestinationRule"
                  and d["spec"]["host"] == token_host)
        clusters = [ist.tls_cluster(token_host, 443, self.tokens.port, ca_pem,
                                    dr["spec"]["trafficPolicy"]["tls"]["sni"])]
        assert provider["cluster"] == clusters[0]["name"]
        for http_route in self.vs["spec"]["http"]:
            dest = http_route["route"][0]["destination"]
            clusters.append(static_cluster(ist.cluster_name(dest["host"], dest["port"]["number"]),
                                           self.upstream.port))
        (tmp / "ecds").mkdir()
        (tmp / "lds").mkdir()
        self.ecds_path = tmp / "ecds" / "latchkey.json"
        self.lds_path = tmp / "lds" / "listeners.json"
        self.port = free_port()
        self.ecds_version = 0
        self.lds_version = 0
        self.write_ecds(self.plugin["spec"]["pluginConfig"])
        self.write_lds()
        admin = free_port()
        config = ist.bootstrap(admin, self.lds_path, clusters)
        # Envoy's harness reads the first static listener's port: a plain health listener.
        config["static_resources"]["listeners"] = [health_listener(free_port())]
        self.envoy = Envoy(config, tmp / "envoy", env={"PARTNER_API_KEY": PARTNER_KEY,
                                                        "IDP_CLIENT_SECRET": IDP_SECRET},
                           extra_args=["--config-yaml", ist.bootstrap_override()])

    def write_ecds(self, plugin_config: dict) -> None:
        self.ecds_version += 1
        resource = ist.wasm_extension_config(self.plugin, self.wasm_path, plugin_config)
        ist.write_atomically(self.ecds_path, ist.discovery_response(
            [resource], ist.TYPED_EXTENSION_CONFIG, f"ecds-{self.ecds_version}"))

    def write_lds(self, extra: dict | None = None) -> None:
        self.lds_version += 1
        lis = ist.listener(self.port, self.plugin, self.ra, self.vs, self.signer.jwks(),
                           self.ecds_path, extra=extra)
        ist.write_atomically(self.lds_path, ist.discovery_response(
            [lis], ist.LISTENER_TYPE, f"lds-{self.lds_version}"))

    def start(self) -> "IstioGateway":
        self.envoy.start()
        wait_until(self._listener_up, 30, message="the LDS listener")
        return self

    def _listener_up(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.envoy.stop()
        self.tokens.stop()
        self.upstream.stop()

    def request(self, path: str, token: str | None = None):
        headers = [("host", HOST)] + ([bearer(token)] if token else [])
        return http_request(self.port, "GET", path, headers=headers)

    def stat(self, suffix: str) -> int:
        stats = self.envoy.stats()
        found = [v for k, v in stats.items() if k.endswith(suffix)]
        return sum(found)

    def config_dump(self, resource: str) -> dict:
        status, body = self.envoy.admin_get(f"/config_dump?resource={resource}")
        assert status == 200, body
        return json.loads(body)

    def ecds_version_in_dump(self) -> str:
        dump = self.config_dump("ecds_filters")
        versions = [c.get("version_info") for c in dump.get("configs", [])]
        assert len(versions) == 1, dump
        return versions[0]

    def server_name_in_dump(self) -> str | None:
        """The HCM server_name of the gateway listener that is serving (what the LDS updates
        change; Envoy keeps active_state.version_info at the first version for an in-place
        filter chain update)."""
        dump = self.config_dump("dynamic_listeners")
        active = [c for c in dump.get("configs", []) if "active_state" in c]
        assert len(active) == 1, dump
        hcm = active[0]["active_state"]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
        return hcm.get("server_name")

    def lds_errors_in_dump(self) -> list[str]:
        """details of listener updates Envoy refused (config_dump error_state)."""
        dump = self.config_dump("dynamic_listeners")
        return [c["error_state"].get("details", "") for c in dump.get("configs", []) if "error_state" in c]


def health_listener(port: int) -> dict:
    return {
        "name": "health",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "health",
                "route_config": {"virtual_hosts": [{"name": "h", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            }}]}],
    }


@pytest.fixture
def gateway(tmp_path, wasm_path):
    gw = IstioGateway(tmp_path, Path(wasm_path))
    try:
        yield gw.start()
    finally:
        # A refused update logs "Wasm VM failed Failed to configure base Wasm plugin": that
        # is the refusal itself. A trap or a panic is a failure.
        failures = [l for l in gw.envoy.log_text().splitlines()
                    if re.search(r"Uncaught RuntimeError|panicked at|vm_reload", l)]
        gw.stop()
        assert failures == [], failures


def with_prefix(config: dict, prefix: str) -> dict:
    """The config with the partner injection's header prefix set (a marker per generation)."""
    c = copy.deepcopy(config)
    route = next(r for r in c["routes"] if r["name"] == "partner")
    route["inject"][0]["prefix"] = prefix
    return c


class Load:
    """Steady traffic on route partner-api from 4 threads on keep-alive connections.

    Records (time, status, x-api-key the upstream received) for every request."""

    def __init__(self, gw: IstioGateway, token: str, threads: int = 4):
        self.gw, self.token = gw, token
        self.results: list[tuple[float, int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)

    def _run(self):
        conn = None
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(LOOPBACK, self.gw.port, timeout=10)
                conn.request("GET", "/partner/invoices", headers={
                    "host": HOST, "authorization": f"Bearer {self.token}"})
                resp = conn.getresponse()
                body = resp.read()
                key = None
                if resp.status == 200:
                    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
                    key = headers.get("x-api-key")
                with self._lock:
                    self.results.append((time.monotonic(), resp.status, key))
            except (OSError, http.client.HTTPException) as e:
                with self._lock:
                    self.results.append((time.monotonic(), -1, repr(e)))
                conn = None
            time.sleep(0.002)

    def since(self, t0: float) -> list[tuple[float, int, str | None]]:
        with self._lock:
            return [r for r in self.results if r[0] >= t0]

    def wait_for_key(self, key: str, t0: float, timeout: float = 5.0) -> float:
        """Seconds from t0 to the first response carrying `key`."""
        def first():
            for t, status, k in self.since(t0):
                if k == key:
                    return t
            return None
        return wait_until(first, timeout, 0.01, message=f"x-api-key {key!r}") - t0


def test_the_wasmplugin_document_runs_in_an_istio_shaped_envoy(gateway):
    gw = gateway
    cfg = ist.plugin_config()
    alice = gw.signer.token({"sub": "alice", "groups": ["billing"]})
    bob = gw.signer.token({"sub": "bob", "groups": ["support"]})
    # partner-api: the API key from the proxy's environment (vmConfig.env valueFrom HOST).
    r = gw.request("/partner/invoices", alice)
    assert r.status == 200, r
    assert gw.upstream.last().header("x-api-key") == PARTNER_KEY
    assert gw.request("/partner/invoices").status == 401
    assert gw.request("/partner/invoices", bob).json() == {"error": "forbidden", "route": "partner"}
    # orders-api: an OAuth2 token fetched over TLS through outbound|443||login.example.com.
    for _ in range(2):
        assert gw.request("/orders/42", alice).status == 200
        assert gw.upstream.last().header("authorization") == "Bearer istio-tok-1"
    token_requests = gw.tokens.log.all()
    assert len(token_requests) == 1
    assert token_requests[0]["sni"] == "login.example.com"
    headers = {k.lower(): v for k, v in token_requests[0]["headers"].items()}
    assert headers["host"] == "login.example.com"
    assert "grant_type=client_credentials" in token_requests[0]["body"]
    # Istio's stats matcher keeps latchkey's stats, and the bootstrap override labels them.
    p = prom.scrape(gw.envoy)
    assert p.get("latchkey_requests_denied", reason="forbidden") == 1
    assert p.get("latchkey_requests_denied", reason="unauthenticated") == 1
    assert p.get("latchkey_requests_allowed") == 3
    assert p.get("latchkey_connection_injected", connection="partner_billing") == 1
    assert p.get("latchkey_connection_injected", connection="orders_read") == 2
    assert p.get("latchkey_connection_token_success", connection="orders_read") == 1
    assert p.types["latchkey_connection_token_state"] == "gauge"
    assert cfg["routes"][0]["match"]["route_name"] in {h["name"] for h in gw.vs["spec"]["http"]}


def test_configuration_updates_under_steady_load(gateway, record_property):
    gw = gateway
    base = ist.plugin_config()
    token = gw.signer.token({"sub": "alice", "groups": ["billing"]})
    rejected = lambda: gw.stat(".update_rejected") - gw.stat("lds.update_rejected")  # noqa: E731
    with Load(gw, token) as load:
        wait_until(lambda: len(load.results) > 50, 10, message="steady load")
        # 1. A good update takes effect within 2 s.
        t0 = time.monotonic()
        gw.write_ecds(with_prefix(base, "gen1 "))
        first = load.wait_for_key(f"gen1 {PARTNER_KEY}", t0)
        time.sleep(0.5)
        # The last response still on the old configuration (workers switch one by one).
        t_all = max((t - t0 for t, _, k in load.since(t0) if k != f"gen1 {PARTNER_KEY}"), default=0.0)
        t_all = max(t_all, first)
        assert first < 2.0, first
        assert t_all < 2.0, t_all
        assert gw.ecds_version_in_dump() == "ecds-2"

        # 2. A bad update is refused; the previous configuration keeps serving.
        before = rejected()
        bad = with_prefix(base, "gen2 ")
        bad["connections"]["orders_read"]["provider"] = "orders_idpp"
        t1 = time.monotonic()
        gw.write_ecds(bad)
        wait_until(lambda: rejected() > before, 5, message="ECDS update_rejected")
        gw.envoy.wait_for_log(r'unknown provider \\?"orders_idpp\\?"', timeout=5)
        time.sleep(0.5)
        assert {k for _, s, k in load.since(t1)} == {f"gen1 {PARTNER_KEY}"}
        # Envoy keeps the rejected config as the filter's latest: config_dump shows it...
        assert gw.ecds_version_in_dump() == "ecds-3"
        dumped = gw.config_dump("ecds_filters")["configs"][0]["ecds_filter"]["typed_config"]
        assert "orders_idpp" in dumped["config"]["configuration"]["value"]
        # ...and an LDS update that includes the filter is refused until a good one arrives.
        lds_rejected = gw.stat("listener_manager.lds.update_rejected")
        gw.write_lds(extra={"server_name": "latchkey-gateway-v2"})
        wait_until(lambda: gw.stat("listener_manager.lds.update_rejected") > lds_rejected, 5,
                   message="LDS update_rejected")
        assert gw.server_name_in_dump() is None
        assert any("Unable to create Wasm plugin" in d for d in gw.lds_errors_in_dump())
        assert {k for _, s, k in load.since(t1)} == {f"gen1 {PARTNER_KEY}"}

        # 3. A later good update still applies, and then so does the LDS update.
        t2 = time.monotonic()
        gw.write_ecds(with_prefix(base, "gen3 "))
        third = load.wait_for_key(f"gen3 {PARTNER_KEY}", t2)
        assert third < 2.0, third
        lds_success = gw.stat("listener_manager.lds.update_success")
        gw.write_lds(extra={"server_name": "latchkey-gateway-v3"})
        wait_until(lambda: gw.stat("listener_manager.lds.update_success") > lds_success, 5,
                   message="LDS update_success")
        wait_until(lambda: gw.server_name_in_dump() == "latchkey-gateway-v3", 5,
                   message="the listener of the LDS update")
        assert gw.lds_errors_in_dump() == []
        time.sleep(0.5)
    failed = [r for r in load.results if r[1] != 200]
    assert failed == [], failed[:5]
    keys = {k for _, _, k in load.results}
    assert keys <= {PARTNER_KEY, f"gen1 {PARTNER_KEY}", f"gen3 {PARTNER_KEY}"}, keys
    record_property("ecds_first_response_s", round(first, 3))
    record_property("ecds_all_workers_s", round(t_all, 3))
    record_property("requests", len(load.results))
    print(f"\nECDS good update: first new response after {first * 1000:.0f} ms, every worker "
          f"after {t_all * 1000:.0f} ms; second good update {third * 1000:.0f} ms; "
          f"{len(load.results)} requests, none failed")


def test_twenty_updates_leave_memory_flat(gateway, record_property):
    gw = gateway
    base = ist.plugin_config()
    token = gw.signer.token({"sub": "alice", "groups": ["billing"]})
    pid = gw.envoy.pid
    rss = [_rss_kb(pid)]
    with Load(gw, token, threads=2) as load:
        wait_until(lambda: len(load.results) > 20, 10, message="steady load")
        for i in range(1, 21):
            t0 = time.monotonic()
            gw.write_ecds(with_prefix(base, f"run{i} "))
            load.wait_for_key(f"run{i} {PARTNER_KEY}", t0)
            rss.append(_rss_kb(pid))
    failed = [r for r in load.results if r[1] != 200]
    assert failed == [], failed[:5]
    growth_mb = (rss[-1] - rss[1]) / 1024
    print("\nRSS over 20 ECDS updates (MiB): " + " ".join(f"{v / 1024:.1f}" for v in rss))
    record_property("rss_kb", rss)
    # Flat: the last ten updates together add less than 8 MiB.
    assert (rss[-1] - rss[10]) / 1024 < 8, rss
    assert growth_mb < 16, rss


def test_counts_still_in_a_vm_reach_envoy_when_it_goes_away(gateway):
    """latchkey keeps its counts in the VM and hands them to Envoy on a 1 s tick, and
    when the VM goes away (the root context's proxy_on_delete, which Envoy calls at
    VM shutdown). A vmConfig.env change makes Envoy build new VMs and tear the old ones
    down; the requests served just before it are all counted."""
    gw = gateway
    alice = gw.signer.token({"sub": "alice", "groups": ["billing"]})
    allowed = lambda: prom.scrape(gw.envoy).get("latchkey_requests_allowed") or 0  # noqa: E731
    loads = lambda: len(re.findall(r"latchkey: configuration loaded", gw.envoy.log_text()))  # noqa: E731
    assert gw.request("/partner/invoices", alice).status == 200
    wait_until(lambda: allowed() == 1, 5, message="the first count, on the tick")
    before = loads()
    for _ in range(5):
        assert gw.request("/partner/invoices", alice).status == 200
    # Straight away, well inside the tick: new VMs (an env change), the old ones go.
    gw.plugin["spec"]["vmConfig"]["env"].append({"name": "LATCHKEY_TEST_VM", "value": "2"})
    gw.write_ecds(gw.plugin["spec"]["pluginConfig"])
    wait_until(lambda: loads() > before, 10, message="new VMs loading the configuration")
    wait_until(lambda: gw.request("/partner/invoices", alice).status == 200, 10, message="the new VMs")
    # 6 before the swap, and the one just sent (the new VMs' tick).
    wait_until(lambda: allowed() == 7, 5, message="7 requests counted")
