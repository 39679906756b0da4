#!/usr/bin/env python3
"""latchkey's soak test (issue #16): `make soak`, 30 minutes by default (SOAK_S).

One real Envoy 1.40 (--concurrency 2) runs latchkey, delivered by ECDS from a file, in
front of an echo upstream that judges every request it receives. Behind Envoy:

- oidc-provider (the real OAuth server of tests/oauth) issuing client-credentials JWT
  access tokens that live SOAK_TOKEN_TTL (5) seconds, for route /orders (header
  `authorization`);
- OpenBao (the real Vault-compatible store, dev mode) holding the API key injected on
  route /partner (header `x-api-key`), re-read by latchkey every SOAK_STORE_REFRESH_S (5);
- a marker connection injecting `x-soak-gen: gen-<n>` on both routes, so the upstream
  sees which configuration served each request.

Envoy reaches the token server and the store through a FaultRelay each (a TCP relay
written here, whose only job is to inject outages: it refuses connections and cuts the
open ones; the servers behind it are the real ones).

Schedule (seconds from the start of the load; each period can be overridden):
  every SOAK_ROTATE_S (60), at :15   a new store version (written to OpenBao directly)
  every SOAK_SWAP_S (120), at +50    a configuration swap (a new ECDS file): the marker
                                     changes; every second swap also changes vmConfig.env,
                                     so Envoy builds new VMs and drops the old ones
  every SOAK_OUTAGE_EVERY_S (60), at :30  token server and store down SOAK_OUTAGE_S (3) s
  once, SOAK_LONG_OUTAGE_S (min(600, SOAK_S/3)), from about a third of the run: both down
Load: SOAK_RATE (30) requests/s in all, half to each route, at a steady pace from one
client (two threads, keep-alive connections).

Checks (any failure makes the exit status 1):
- no expired token injected: the upstream decodes every injected JWT (signature checked
  against the token server's JWKS) and compares its `exp` with the time it received it;
- no failed request while a valid credential existed: a non-200 on /orders at a time when
  a token the server issued (by its own record, polled from /__test/token-requests) was
  valid and outside its last tenth (where latchkey deliberately stops using it), or any
  non-200 on /partner once the store's value had been read (latchkey keeps the last good
  value through outages);
- every 200 carried a token from the server (/orders) or a value the store held (/partner);
- no wasm VM failure (panic, reload), and every configuration swap reached requests (ECDS
  rejected none);
- Envoy's RSS at the end at most SOAK_RSS_GROWTH_PCT (5) % above the first steady minute
  (the sample at SOAK_RSS_BASE_S, 120 s).
Failures while no valid token existed (the long outage, and backoff after it) are expected
and reported apart. It also reports, per minute: requests, failures by kind, expired tokens
injected, token fetches against the minimum (60 / ttl per minute) and against latchkey's
documented refresh schedule, store reads, and Envoy's RSS; the JSON report goes to
bench/out/soak.json (--out).

Also: SOAK_TOKEN_TIMEOUT_MS (2000, the provider's timeout_ms), SOAK_RSS_BASE_S,
SOAK_RSS_GROWTH_PCT, and SOAK_KEEP=1 to keep the logs of a passing run (a failing run
always keeps them, in the temporary directory it names).

Everything binds 127.0.0.1, ports are free ports, Envoy gets its own --base-id, every
wait is a bounded poll, every process is stopped by its pid.

Usage: tests/soak/soak.py [--wasm M] [--seconds N] [--out F]
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

import jwt  # noqa: E402

from harness import (LOOPBACK, BacklogHTTPServer, Envoy, EnvoyStartError,  # noqa: E402
                     free_port, static_cluster, wait_until, wasm_filter)
from secret_stores import OpenBao, read_policy_hcl  # noqa: E402
from token_servers import CLIENTS, DEFAULT_RESOURCE, OidcProvider  # noqa: E402

# What Envoy logs when a wasm VM traps (the same pattern as tests/integration/conftest.py).
VM_FAILURE = re.compile(r"Uncaught RuntimeError|Wasm VM failed|failed: Uncaught|panicked at|"
                        r"Plugin configured to fail")
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
CLIENT_ID = "gw-basic"
STORE_PATH = "soak/partner"
# A token issued at server time `a` counts as held by latchkey from a + ISSUE_GRACE_S (its
# answer still has to reach latchkey); an issue less than CUT_WINDOW_S before a token-server
# outage began may have been cut by the relay before latchkey read it: not counted.
ISSUE_GRACE_S = 0.25
CUT_WINDOW_S = 0.5


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- fault relay


class FaultRelay:
    """A TCP relay on 127.0.0.1 in front of a REAL server (oidc-provider, OpenBao), used
    ONLY to inject outages: it forwards bytes unchanged both ways, and during an outage it
    stops listening (the port stays bound, so connections are refused) and cuts every open
    connection. It never answers anything itself.

    One thread owns the listening socket (accepts, and switches between listening and
    refusing when asked); two threads per relayed connection copy the bytes.
    """

    def __init__(self, name: str, target_port: int):
        self.name = name
        self.target_port = target_port
        self._listener = self._socket()
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self._reserved: socket.socket | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._want_down = False
        self._state_changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.accepted = 0
        self.upstream_connect_failures = 0
        self.outages: list[tuple[float, float | None]] = []  # (wall start, wall end)

    @staticmethod
    def _socket() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s

    @property
    def down(self) -> bool:
        with self._lock:
            return self._reserved is not None

    def start(self) -> "FaultRelay":
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def outage_begin(self) -> None:
        self._switch(True)
        self.outages.append((time.time(), None))

    def outage_end(self) -> None:
        self._switch(False)
        if self.outages and self.outages[-1][1] is None:
            self.outages[-1] = (self.outages[-1][0], time.time())

    def _switch(self, down: bool) -> None:
        with self._lock:
            self._want_down = down
            self._state_changed.clear()
        if not self._state_changed.wait(5.0) or self.down != down:
            raise RuntimeError(f"relay {self.name}: could not switch to {'down' if down else 'up'}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for s in (self._listener, self._reserved):
                if s is not None:
                    s.close()
            self._listener = self._reserved = None
        self._cut()

    def _cut(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                want_down = self._want_down
            if want_down and self._listener is not None:
                # Stop listening, keep the port bound (refused meanwhile), cut everything.
                self._listener.close()
                reserved = self._socket()
                reserved.bind((LOOPBACK, self.port))
                with self._lock:
                    self._listener, self._reserved = None, reserved
                self._cut()
                self._state_changed.set()
            elif not want_down and self._reserved is not None:
                self._reserved.listen(128)
                with self._lock:
                    self._listener, self._reserved = self._reserved, None
                self._state_changed.set()
            elif not self._state_changed.is_set():
                self._state_changed.set()
            listener = self._listener
            if listener is None:
                self._stop.wait(0.02)
                continue
            ready, _, _ = select.select([listener], [], [], 0.05)
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            self.accepted += 1
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2)
            except OSError:
                self.upstream_connect_failures += 1
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                 name=f"relay-{self.name}-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._lock:
            gone = [s for s in (src, dst) if s in self._conns]
            self._conns.difference_update(gone)
        for s in gone:
            s.close()


# --------------------------------------------------------------------------- judging upstream


class Judge:
    """What the upstream saw, judged as it arrived, bucketed by soak minute."""

    def __init__(self, jwks: dict[str, Any], issuer: str):
        self._lock = threading.Lock()
        self._keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"]}
        self._issuer = issuer
        self._verified: dict[str, dict[str, Any] | None] = {}
        self.t0_mono: float | None = None  # set when the load starts
        self.store_values: dict[str, int] = {}  # value -> version
        self.minutes: dict[int, dict[str, Any]] = {}
        self.expired: list[dict[str, Any]] = []
        self.bad: list[dict[str, Any]] = []  # missing / unknown credentials (examples)
        self.first_key_at: float | None = None  # wall time of the first store value seen
        self.first_seen_version: dict[int, float] = {}  # version -> wall time first injected
        self.first_seen_gen: dict[str, float] = {}
        self.gen_seen: list[tuple[float, str]] = []  # (wall, gen) for late-old-gen checks
        self.tokens_seen = 0
        self.max_lateness = None  # max (receipt - exp) over all injected tokens, seconds

    def bucket(self) -> dict[str, Any]:
        if self.t0_mono is None:
            minute = -1
        else:
            minute = int((time.monotonic() - self.t0_mono) // 60)
        b = self.minutes.get(minute)
        if b is None:
            b = self.minutes[minute] = {"received": 0, "orders": 0, "partner": 0, "expired": 0,
                                        "missing_token": 0, "bad_token": 0, "missing_key": 0,
                                        "unknown_key": 0, "versions": {}, "gens": {},
                                        "min_token_left_s": None}
        return b

    def _claims(self, token: str) -> dict[str, Any] | None:
        if token in self._verified:
            return self._verified[token]
        claims = None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys.get(kid)
            if key is not None:
                claims = jwt.decode(token, key, algorithms=["RS256"], issuer=self._issuer,
                                    audience=DEFAULT_RESOURCE, options={"verify_exp": False})
        except jwt.PyJWTError:
            claims = None
        if len(self._verified) > 4096:
            self._verified.clear()
        self._verified[token] = claims
        if claims is not None:
            self.tokens_seen += 1
        return claims

    def record(self, path: str, headers: dict[str, str]) -> None:
        now = time.time()
        route = "orders" if path.startswith("/orders") else "partner" if path.startswith("/partner") else "other"
        with self._lock:
            b = self.bucket()
            b["received"] += 1
            if route in ("orders", "partner"):
                b[route] += 1
            gen = headers.get("x-soak-gen")
            if gen:
                b["gens"][gen] = b["gens"].get(gen, 0) + 1
                self.first_seen_gen.setdefault(gen, now)
                self.gen_seen.append((now, gen))
                if len(self.gen_seen) > 200_000:
                    del self.gen_seen[:100_000]
            if route == "orders":
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme != "Bearer" or not token:
                    b["missing_token"] += 1
                    self._example(self.bad, {"at": now, "kind": "missing_token", "path": path})
                    return
                claims = self._claims(token)
                if claims is None:
                    b["bad_token"] += 1
                    self._example(self.bad, {"at": now, "kind": "bad_token", "path": path})
                    return
                exp = float(claims["exp"])
                left = exp - now
                if b["min_token_left_s"] is None or left < b["min_token_left_s"]:
                    b["min_token_left_s"] = round(left, 3)
                lateness = now - exp
                if self.max_lateness is None or lateness > self.max_lateness:
                    self.max_lateness = lateness
                if now >= exp:
                    b["expired"] += 1
                    self._example(self.expired, {"at": now, "exp": exp, "iat": claims.get("iat"),
                                                 "late_s": round(lateness, 3), "path": path,
                                                 "jti": claims.get("jti")}, limit=200)
            elif route == "partner":
                key = headers.get("x-api-key")
                if not key:
                    b["missing_key"] += 1
                    self._example(self.bad, {"at": now, "kind": "missing_key", "path": path})
                    return
                version = self.store_values.get(key)
                if version is None:
                    b["unknown_key"] += 1
                    self._example(self.bad, {"at": now, "kind": "unknown_key", "path": path})
                    return
                if self.first_key_at is None:
                    self.first_key_at = now
                self.first_seen_version.setdefault(version, now)
                b["versions"][str(version)] = b["versions"].get(str(version), 0) + 1

    @staticmethod
    def _example(target: list, item: dict, limit: int = 50) -> None:
        if len(target) < limit:
            target.append(item)


class JudgingUpstream:
    """The echo upstream of the soak: answers 200 with a small JSON body and hands every
    request's credentials to the Judge (no request is kept in memory)."""

    def __init__(self, judge: Judge):
        self.judge = judge
        judge_ref = judge

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "latchkey-soak-upstream"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # Headers and body go out in two writes: without this, Nagle's algorithm and
                # Envoy's delayed ACK hold the body back ~40 ms now and then.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                headers = {k.lower(): v for k, v in self.headers.items()}
                judge_ref.record(self.path, headers)
                body = b'{"ok":true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = BacklogHTTPServer((LOOPBACK, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="soak-upstream")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "JudgingUpstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- load


class Load:
    """A steady request rate from one client: one thread per route, each with a few
    keep-alive connections used in turn (so both Envoy workers get some), requests sent on
    a fixed schedule (a slot missed by more than one interval is skipped and counted, never
    made up in a burst)."""

    ROUTES = {"orders": "/orders/soak", "partner": "/partner/soak"}

    def __init__(self, port: int, rate: float, duration: float, conns_per_route: int = 3):
        self.port = port
        self.per_route = rate / len(self.ROUTES)
        self.duration = duration
        self.conns_per_route = conns_per_route
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.t0_mono = 0.0
        self.t0_wall = 0.0
        self.minutes: dict[int, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []  # every non-200 (and client error)
        self.skipped = 0
        self.ok_times: dict[str, list[float]] = {r: [] for r in self.ROUTES}  # wall send times of 200s
        self._threads: list[threading.Thread] = []

    def start(self, t0_mono: float, t0_wall: float) -> None:
        self.t0_mono, self.t0_wall = t0_mono, t0_wall
        for i, route in enumerate(self.ROUTES):
            t = threading.Thread(target=self._run, args=(route, i / (len(self.ROUTES) * self.per_route)),
                                 name=f"load-{route}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)

    def _bucket(self, minute: int) -> dict[str, Any]:
        b = self.minutes.get(minute)
        if b is None:
            b = self.minutes[minute] = {"sent": 0, "ok": {r: 0 for r in self.ROUTES},
                                        "failed": {r: 0 for r in self.ROUTES},
                                        "by_status": {}, "latency_ms": []}
        return b

    def _run(self, route: str, offset: float) -> None:
        interval = 1.0 / self.per_route
        path = self.ROUTES[route]
        conns: list[http.client.HTTPConnection | None] = [None] * self.conns_per_route
        n_max = int(self.duration * self.per_route)  # slots before the end
        i = 0
        while i < n_max and not self._stop.is_set():
            due = self.t0_mono + offset + i * interval
            now = time.monotonic()
            if due - now > 0:
                if self._stop.wait(due - now):
                    break
            elif now - due > interval:
                missed = int((now - due) / interval)
                with self._lock:
                    self.skipped += missed
                i += missed
                continue
            slot = i % self.conns_per_route
            conn = conns[slot]
            if conn is None:
                conn = conns[slot] = http.client.HTTPConnection(LOOPBACK, self.port, timeout=15)
            t_mono, t_wall = time.monotonic(), time.time()
            status, err = 0, ""
            try:
                conn.request("GET", f"{path}?i={i}")
                resp = conn.getresponse()
                body = resp.read()
                status = resp.status
                if status != 200:
                    try:
                        err = json.loads(body).get("error", "") or ""
                    except (ValueError, AttributeError):
                        err = body[:60].decode(errors="replace")
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conns[slot] = None
            except (OSError, http.client.HTTPException) as e:
                err = f"client:{type(e).__name__}"
                conn.close()
                conns[slot] = None
            latency = time.monotonic() - t_mono
            minute = int((t_mono - self.t0_mono) // 60)
            with self._lock:
                b = self._bucket(minute)
                b["sent"] += 1
                b["latency_ms"].append(latency * 1000)
                key = str(status) if status else err
                b["by_status"][key] = b["by_status"].get(key, 0) + 1
                if status == 200:
                    b["ok"][route] += 1
                    self.ok_times[route].append(t_wall)
                else:
                    b["failed"][route] += 1
                    self.failures.append({"route": route, "t_wall": t_wall,
                                          "t": round(t_mono - self.t0_mono, 3), "status": status,
                                          "error": err, "latency_ms": round(latency * 1000, 1)})
            i += 1
        for c in conns:
            if c is not None:
                c.close()


# --------------------------------------------------------------------------- the setup


def plugin_config(oidc: OidcProvider, bao: OpenBao, gen: int, timeout_ms: int,
                  store_refresh_s: int) -> dict[str, Any]:
    return {
        "secrets": {
            "client_secret": {"env": "CLIENT_SECRET"},
            "vault_token": {"env": "VAULT_TOKEN"},
            "partner_key": {"vault": {"cluster": "vault", "url": bao.url, "path": STORE_PATH,
                                      "field": "key", "token": "vault_token"},
                            "refresh_s": store_refresh_s},
            # The configuration's generation, so the upstream sees which one served it.
            "marker": {"inline": f"gen-{gen}"},
        },
        "providers": {
            "idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                    "client_id": CLIENT_ID, "client_secret": "client_secret",
                    "timeout_ms": timeout_ms},
            "keys": {"type": "api_key"},
        },
        "connections": {
            "orders": {"provider": "idp", "grant": "client_credentials", "scopes": ["orders.read"],
                       "resource": DEFAULT_RESOURCE, "access": {"public": True}},
            "partner": {"provider": "keys", "api_key": "partner_key", "access": {"public": True}},
            "marker": {"provider": "keys", "api_key": "marker", "access": {"public": True}},
        },
        "routes": [
            {"name": "orders", "match": {"route_name": "orders"},
             "inject": [{"connections": ["orders"], "header": "authorization"},
                        {"connections": ["marker"], "header": "x-soak-gen"}]},
            {"name": "partner", "match": {"route_name": "partner"},
             "inject": [{"connections": ["partner"], "header": "x-api-key"},
                        {"connections": ["marker"], "header": "x-soak-gen"}]},
        ],
    }


def ecds_document(wasm: Path, plugin: dict, env: dict[str, str], version: str) -> dict[str, Any]:
    typed = wasm_filter(wasm, plugin, env)["typed_config"]
    return {"version_info": version, "resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "latchkey", "typed_config": typed}]}


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.rename(tmp, path)


def bootstrap(listener_port: int, admin_port: int, upstream_port: int, idp_port: int,
              vault_port: int, ecds_path: Path) -> dict[str, Any]:
    routes = [{"name": name, "match": {"prefix": prefix},
               "route": {"cluster": "upstream", "timeout": "15s"}}
              for name, prefix in (("orders", "/orders"), ("partner", "/partner"))]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "soak",
        "codec_type": "AUTO",
        "route_config": {"name": "local", "virtual_hosts": [
            {"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "latchkey", "config_discovery": {
                "config_source": {
                    "path_config_source": {"path": str(ecds_path),
                                           "watched_directory": {"path": str(ecds_path.parent)}},
                    "resource_api_version": "V3"},
                "type_urls": [WASM_TYPE]}},
            ROUTER,
        ],
    }
    return {
        "node": {"id": "latchkey-soak", "cluster": "latchkey-soak"},  # ECDS needs one
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "soak",
                "address": {"socket_address": {"address": LOOPBACK, "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [static_cluster("upstream", upstream_port),
                         static_cluster("idp", idp_port),
                         static_cluster("vault", vault_port)],
        },
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class IssueLog:
    """Every token request oidc-provider recorded (arrival time, status), merged from
    polls of its /__test/token-requests (the last `n` each time)."""

    def __init__(self, oidc: OidcProvider, n: int = 400):
        self.oidc = oidc
        self.n = n
        self.entries: list[tuple[float, int]] = []
        self.gaps = 0  # polls that may have missed entries (more new ones than n)
        self.poll_errors = 0

    def poll(self) -> None:
        try:
            got = self.oidc.last_token_requests(self.n)
        except (OSError, RuntimeError, ValueError):
            self.poll_errors += 1
            return
        new = [(parse_iso(e["time"]), int(e["status"])) for e in got]
        for k in range(min(len(self.entries), len(new)), -1, -1):
            if k == 0 or self.entries[-k:] == new[:k]:
                if k == 0 and self.entries and len(new) >= self.n:
                    self.gaps += 1
                self.entries.extend(new[k:])
                return


def admin_stats(envoy: Envoy) -> dict[str, float]:
    try:
        status, body = envoy.admin_get("/stats?format=json&filter=" +
                                       urllib.parse.quote(r"^(wasmcustom\.latchkey\.|wasm\.|listener\.|"
                                                          r"extension_config_discovery\.)", safe=""),
                                       timeout=5)
    except OSError:
        return {}
    if status != 200:
        return {}
    return {e["name"]: e["value"] for e in json.loads(body).get("stats", [])
            if "name" in e and "value" in e}


# --------------------------------------------------------------------------- the run


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.duration = float(args.seconds)
        self.ttl = int(env_float("SOAK_TOKEN_TTL", 5))
        self.rate = env_float("SOAK_RATE", 30)
        self.rotate_s = env_float("SOAK_ROTATE_S", 60)
        self.swap_s = env_float("SOAK_SWAP_S", 120)
        self.outage_every_s = env_float("SOAK_OUTAGE_EVERY_S", 60)
        self.outage_s = env_float("SOAK_OUTAGE_S", 3)
        self.long_outage_s = env_float("SOAK_LONG_OUTAGE_S",
                                       min(600.0, float(round(self.duration / 3))))
        self.store_refresh_s = int(env_float("SOAK_STORE_REFRESH_S", 5))
        self.timeout_ms = int(env_float("SOAK_TOKEN_TIMEOUT_MS", 2000))
        self.rss_base_s = env_float("SOAK_RSS_BASE_S", 120)
        self.rss_growth_pct = env_float("SOAK_RSS_GROWTH_PCT", 5)
        self.work = Path(tempfile.mkdtemp(prefix="latchkey-soak-"))
        self.events: list[tuple[float, str, Any]] = []
        self.event_log: list[dict[str, Any]] = []
        self.gen = 0
        self.env_epoch = 0
        self.store_version = 0
        self.rss: list[dict[str, Any]] = []
        self.stats_by_minute: dict[int, dict[str, float]] = {}
        self.stats_start: dict[str, float] = {}

    # -- schedule
    def schedule(self) -> None:
        d = self.duration
        long_start = max(60.0, math.floor(d / 3 / 60) * 60) + 5 if self.long_outage_s > 0 else None
        long_end = long_start + self.long_outage_s if long_start is not None else None
        self.long_window = (long_start, long_end)
        ev: list[tuple[float, str, Any]] = []
        t = 15.0
        while self.rotate_s > 0 and t < d - 5:
            ev.append((t, "rotate", None))
            t += self.rotate_s
        t, k = 50.0, 1
        while self.swap_s > 0 and t < d - 10:
            ev.append((t, "swap", k))
            t += self.swap_s
            k += 1
        t = 30.0
        while self.outage_every_s > 0 and self.outage_s > 0 and t + self.outage_s < d - 10:
            inside_long = long_start is not None and long_start - 5 <= t <= long_end + 5
            if not inside_long:
                ev.append((t, "outage_begin", "short"))
                ev.append((t + self.outage_s, "outage_end", "short"))
            t += self.outage_every_s
        if long_start is not None and long_end < d:
            ev.append((long_start, "outage_begin", "long"))
            ev.append((long_end, "outage_end", "long"))
        self.events = sorted(ev, key=lambda e: (e[0], e[1] != "outage_end"))

    # -- servers
    def start_servers(self) -> None:
        log(f"soak: workdir {self.work}")
        self.wasm = self.work / "latchkey.wasm"  # a copy: a rebuild meanwhile changes nothing
        shutil.copyfile(self.args.wasm, self.wasm)
        self.wasm_sha256 = hashlib.sha256(self.wasm.read_bytes()).hexdigest()
        # The commit (and whether the tree had changes) when the module was copied: a
        # commit made while the soak runs must not be taken for the one it tested.
        self.git_commit = git_commit()
        self.oidc = OidcProvider(ttl=self.ttl, env={"OAUTH_HISTORY": "1000"}, log_dir=self.work)
        self.oidc.start()
        log(f"soak: oidc-provider pid {self.oidc.pid} on {self.oidc.port} (tokens live {self.ttl} s)")
        self.bao = OpenBao(audit=False)
        self.bao.start()
        log(f"soak: OpenBao pid {self.bao.pid} on {self.bao.port}")
        self.bao.policy("soak-read", read_policy_hcl(STORE_PATH))
        self.vault_token = self.bao.token(["soak-read"], ttl=f"{int(self.duration) + 7200}s")
        self.judge = Judge(self.oidc.jwks(), self.oidc.issuer)
        self.rotate(initial=True)
        self.upstream = JudgingUpstream(self.judge).start()
        self.token_relay = FaultRelay("token", self.oidc.port).start()
        self.store_relay = FaultRelay("store", self.bao.port).start()
        self.issues = IssueLog(self.oidc)

    def start_envoy(self) -> None:
        (self.work / "ecds").mkdir()
        self.ecds_path = self.work / "ecds" / "latchkey.json"
        for attempt in range(3):
            self.write_ecds()
            config = bootstrap(free_port(), free_port(), self.upstream.port, self.token_relay.port,
                               self.store_relay.port, self.ecds_path)
            self.envoy = Envoy(config, self.work / f"envoy{attempt}", concurrency=2,
                               log_level="info", ready_timeout=60)
            try:
                self.envoy.start()
                break
            except EnvoyStartError as e:
                if "Address already in use" in str(e) and attempt < 2:
                    continue
                raise
        log(f"soak: Envoy pid {self.envoy.pid} (--concurrency 2, --base-id {self.envoy.base_id}) "
            f"on {self.envoy.port}, admin {self.envoy.admin_port}")

    def write_ecds(self) -> None:
        env = {"CLIENT_SECRET": CLIENTS[CLIENT_ID], "VAULT_TOKEN": self.vault_token,
               "SOAK_VM_EPOCH": str(self.env_epoch)}
        plugin = plugin_config(self.oidc, self.bao, self.gen, self.timeout_ms, self.store_refresh_s)
        write_atomically(self.ecds_path, ecds_document(self.wasm, plugin, env, f"soak-{self.gen}"))

    # -- events
    def rotate(self, initial: bool = False) -> None:
        value = f"soak-key-{secrets.token_hex(8)}"
        self.judge.store_values[value] = -1  # known before any request can carry it
        version = self.bao.kv_put(STORE_PATH, {"key": value})
        self.judge.store_values[value] = version
        self.store_version = version
        if not initial:
            self.note("rotate", version=version)

    def swap(self, k: int) -> None:
        self.gen = k
        new_vms = k % 2 == 0
        if new_vms:
            self.env_epoch += 1
        self.write_ecds()
        self.note("swap", gen=f"gen-{k}", new_vms=new_vms)

    def note(self, kind: str, **fields: Any) -> None:
        now = time.monotonic()
        item = {"t": round(now - self.t0_mono, 3), "wall": time.time(), "event": kind, **fields}
        self.event_log.append(item)
        desc = " ".join(f"{k}={v}" for k, v in fields.items())
        log(f"  [{item['t']:7.1f}s] {kind} {desc}")

    def run_event(self, kind: str, arg: Any) -> None:
        if kind == "rotate":
            self.rotate()
        elif kind == "swap":
            self.swap(arg)
        elif kind == "outage_begin":
            self.token_relay.outage_begin()
            self.store_relay.outage_begin()
            self.note("outage_begin", which=arg)
        elif kind == "outage_end":
            self.token_relay.outage_end()
            self.store_relay.outage_end()
            self.note("outage_end", which=arg)

    # -- sampling
    def sample(self, minute: int) -> None:
        rss = rss_kib(self.envoy.pid)
        self.rss.append({"minute": minute, "t": round(time.monotonic() - self.t0_mono, 1),
                         "rss_kib": rss, "envoy_cpu_s": round(cpu_s(self.envoy.pid), 2)})
        self.stats_by_minute[minute] = admin_stats(self.envoy)
        self.issues.poll()

    def warm_up(self) -> None:
        """Both routes answer 200 before the clock starts (bounded)."""
        def ok(path: str) -> bool:
            try:
                return self.envoy.request("GET", path, timeout=5).status == 200
            except OSError:
                return False
        wait_until(lambda: ok("/orders/warmup") and ok("/partner/warmup"), 30, 0.2,
                   message="both routes answering 200")

    def run(self) -> dict[str, Any]:
        self.schedule()
        self.start_servers()
        self.start_envoy()
        self.warm_up()
        self.load = Load(self.envoy.port, self.rate, self.duration)
        self.t0_mono, self.t0_wall = time.monotonic(), time.time()
        self.judge.t0_mono = self.t0_mono
        self.stats_start = admin_stats(self.envoy)
        self.rss.append({"minute": 0, "t": 0.0, "rss_kib": rss_kib(self.envoy.pid),
                         "envoy_cpu_s": round(cpu_s(self.envoy.pid), 2)})
        long_desc = (f"{self.long_outage_s:.0f} s from {self.long_window[0]:.0f} s"
                     if self.long_window[0] is not None and self.long_window[1] < self.duration
                     else "none")
        log(f"soak: {self.duration:.0f} s at {self.rate:g} req/s; tokens {self.ttl} s; rotation every "
            f"{self.rotate_s:g} s; swap every {self.swap_s:g} s; outages {self.outage_s:g} s every "
            f"{self.outage_every_s:g} s; long outage {long_desc}")
        self.print_header()
        self.load.start(self.t0_mono, self.t0_wall)
        events = list(self.events)
        next_minute = 1
        next_poll = 5.0
        end = self.t0_mono + self.duration
        while True:
            now = time.monotonic()
            rel = now - self.t0_mono
            while events and events[0][0] <= rel:
                _, kind, arg = events.pop(0)
                self.run_event(kind, arg)
            if rel >= next_poll:
                self.issues.poll()
                next_poll += 5.0
            if rel >= next_minute * 60 or now >= end:
                self.sample(next_minute)  # the end of minute next_minute (or of the run)
                self.print_row(next_minute - 1)
                next_minute += 1
            if now >= end:
                break
            if not self.envoy.running:
                raise RuntimeError(f"Envoy exited during the soak\n{self.envoy.diagnostics()}")
            if not self.oidc.running or not self.bao.running:
                raise RuntimeError("the token server or the store exited during the soak\n"
                                   f"{self.oidc.diagnostics()}\n{self.bao.diagnostics()}")
            wake = min([self.t0_mono + e[0] for e in events[:1]] +
                       [self.t0_mono + next_minute * 60, self.t0_mono + next_poll, end])
            time.sleep(max(0.0, min(0.2, wake - time.monotonic())))
        self.load.stop()
        for relay in (self.token_relay, self.store_relay):
            if relay.down:
                relay.outage_end()
        time.sleep(1.5)  # the last counters reach Envoy on latchkey's 1 s tick
        self.stats_end = admin_stats(self.envoy)
        self.issues.poll()
        return self.judge_run()

    def stop(self) -> None:
        load = getattr(self, "load", None)
        if load is not None:
            load.stop()
        envoy = getattr(self, "envoy", None)
        if envoy is not None:
            envoy.stop()
        for name in ("token_relay", "store_relay", "upstream"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.stop()
                except Exception as e:  # noqa: BLE001 - best effort at teardown
                    log(f"soak: stopping {name}: {e}")
        for name in ("oidc", "bao"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.stop()

    # -- output
    def print_header(self) -> None:
        log("")
        log(" min |  sent |   200 | failed: expected / last-tenth / FATAL | expired | "
            "fetches (min {}, sched {:.0f}) | lk tries | store reads | RSS MiB | events".format(
                60 // self.ttl, self.expected_fetches_per_min()))

    def expected_fetches_per_min(self) -> float:
        # docs/credentials.md "Refresh ahead": half its lifetime, at least refresh_margin_s (5) before
        # expiry, never before a quarter of its lifetime.
        ttl_ms = self.ttl * 1000
        refresh_in = max(ttl_ms // 4, min(ttl_ms // 2, max(0, ttl_ms - 5000)))
        return 60_000 / refresh_in

    def stat_delta(self, name: str, minute: int) -> float:
        after = self.stats_by_minute.get(minute + 1, {})
        before = self.stats_by_minute.get(minute, self.stats_start) if minute > 0 else self.stats_start
        return after.get(name, 0) - before.get(name, 0)

    def stats_delta(self, prefix: str, minute: int) -> float:
        """The change of every stat named `<prefix>.<something>` (a family's kinds), summed."""
        after = self.stats_by_minute.get(minute + 1, {})
        before = self.stats_by_minute.get(minute, self.stats_start) if minute > 0 else self.stats_start
        return sum(v - before.get(k, 0) for k, v in after.items() if k.startswith(prefix + "."))

    def print_row(self, minute: int) -> None:
        lb = self.load.minutes.get(minute, {"sent": 0, "ok": {}, "failed": {}})
        ok = sum(lb["ok"].values())
        with self.load._lock:
            failures = [f for f in self.load.failures if int(f["t"] // 60) == minute]
        self.classify(failures)
        n = {k: sum(1 for f in failures if f["judged"] == k) for k in
             ("token_none_valid", "key_never_read", "token_last_tenth", "FATAL_token_valid",
              "FATAL_key_was_read")}
        expected = n["token_none_valid"] + n["key_never_read"]
        fatal = n["FATAL_token_valid"] + n["FATAL_key_was_read"]
        jb = self.judge.minutes.get(minute, {})
        start_wall = self.t0_wall + minute * 60
        fetches = sum(1 for a, s in self.issues.entries if start_wall <= a < start_wall + 60 and s == 200)
        tries = self.stat_delta("wasmcustom.latchkey.connection.orders.token.requests", minute)
        reads = self.stat_delta("wasmcustom.latchkey.secret.partner_key.reads", minute)
        rss = next((r["rss_kib"] for r in self.rss if r["minute"] == minute + 1), 0)
        names = []
        for e in self.event_log:
            if not minute * 60 <= e["t"] < (minute + 1) * 60:
                continue
            if e["event"] == "rotate":
                names.append(f"rot v{e['version']}")
            elif e["event"] == "swap":
                names.append(f"swap {e['gen']}{'+VMs' if e['new_vms'] else ''}")
            elif e["event"] == "outage_begin":
                names.append(f"down({e['which']})")
            elif e["event"] == "outage_end":
                names.append(f"up({e['which']})")
        log(f"{minute + 1:4d} | {lb['sent']:5d} | {ok:5d} | {expected:8d} / {n['token_last_tenth']:10d} / "
            f"{fatal:5d} | {jb.get('expired', 0):7d} | {fetches:7d} = {fetches / (60 / self.ttl):4.1f}x min"
            f"{'':9s}| {tries:8.0f} | {reads:11.0f} | {rss / 1024:7.1f} | {', '.join(names)}")

    # -- judging
    def token_windows(self) -> tuple[list[tuple[float, float, float]], int]:
        """Per token the server issued (its own record): (held by latchkey from, usable
        until, valid until), wall-clock seconds; and how many issues were not counted
        because a token-server outage began right after them (the answer may have been cut)."""
        skew = min(self.ttl / 10, 1.0)  # docs/credentials.md: not injected in the last tenth (at most 1 s)
        token_cuts = [s for s, _ in self.token_relay.outages]
        windows, cut = [], 0
        for a, status in self.issues.entries:
            if status != 200:
                continue
            if any(s - CUT_WINDOW_S <= a <= s for s in token_cuts):
                cut += 1
                continue
            exp = math.floor(a) + self.ttl  # exp = floor(issue) + ttl >= floor(arrival) + ttl
            windows.append((a + ISSUE_GRACE_S, exp - skew, exp))
        windows.sort()
        return windows, cut

    def classify(self, failures: list[dict[str, Any]]) -> None:
        """Judge each failed request (sets f["judged"]): on /orders by whether a token the
        server issued was valid when it was sent; on /partner by whether the store's value
        had been read by then."""
        windows, _ = self.token_windows()
        starts = [w[0] for w in windows]
        first_key = self.judge.first_key_at
        for f in failures:
            if f["route"] == "orders":
                state = "token_none_valid"
                i = bisect.bisect_right(starts, f["t_wall"])
                for w in windows[max(0, i - 64):i]:
                    if w[0] <= f["t_wall"] < w[1]:
                        state = "FATAL_token_valid"
                        break
                    if w[0] <= f["t_wall"] < w[2]:
                        state = "token_last_tenth"
                f["judged"] = state
            else:
                f["judged"] = ("FATAL_key_was_read" if first_key is not None and f["t_wall"] > first_key
                               else "key_never_read")

    def judge_run(self) -> dict[str, Any]:
        judge, load = self.judge, self.load
        _, cut = self.token_windows()
        with load._lock:
            failures = list(load.failures)
        self.classify(failures)
        kinds: dict[str, int] = {}
        fatal: list[dict[str, Any]] = []
        per_minute_kinds: dict[int, dict[str, int]] = {}
        for f in failures:
            kind = f["judged"]
            kinds[kind] = kinds.get(kind, 0) + 1
            m = int(f["t"] // 60)
            per_minute_kinds.setdefault(m, {})
            per_minute_kinds[m][kind] = per_minute_kinds[m].get(kind, 0) + 1
            if kind.startswith("FATAL"):
                fatal.append(f)

        # Outage recoveries: first 200 on /orders after each outage ended.
        recoveries = []
        ok_orders = load.ok_times["orders"]
        for relay_start, relay_end in self.token_relay.outages:
            if relay_end is None:
                continue
            i = bisect.bisect_left(ok_orders, relay_end)
            first_ok = ok_orders[i] if i < len(ok_orders) else None
            last_before = ok_orders[bisect.bisect_left(ok_orders, relay_start) - 1] \
                if bisect.bisect_left(ok_orders, relay_start) > 0 else None
            recoveries.append({
                "t_begin": round(relay_start - self.t0_wall, 1),
                "length_s": round(relay_end - relay_start, 1),
                "orders_ok_until_s_after_begin": (round(last_before - relay_start, 2)
                                                  if last_before else None),
                "orders_ok_again_s_after_end": (round(first_ok - relay_end, 2)
                                                if first_ok else None)})

        # Store rotation lag: first request carrying each new version after its write.
        rotation_lag = []
        for e in self.event_log:
            if e["event"] != "rotate":
                continue
            seen = judge.first_seen_version.get(e["version"])
            rotation_lag.append({"version": e["version"], "t": e["t"],
                                 "first_injected_s_after": round(seen - e["wall"], 2) if seen else None})
        swap_lag = []
        for e in self.event_log:
            if e["event"] != "swap":
                continue
            seen = judge.first_seen_gen.get(e["gen"])
            swap_lag.append({"gen": e["gen"], "new_vms": e["new_vms"], "t": e["t"],
                             "first_request_s_after": round(seen - e["wall"], 2) if seen else None})

        # Per minute.
        minutes = []
        expected = self.expected_fetches_per_min()
        n_minutes = int(math.ceil(self.duration / 60))
        for m in range(n_minutes):
            lb = load.minutes.get(m, {"sent": 0, "ok": {}, "failed": {}, "by_status": {}, "latency_ms": []})
            jb = judge.minutes.get(m, {})
            start_wall = self.t0_wall + m * 60
            fetch_ok = sum(1 for a, s in self.issues.entries
                           if start_wall <= a < start_wall + 60 and s == 200)
            fetch_all = sum(1 for a, _ in self.issues.entries if start_wall <= a < start_wall + 60)
            lat = sorted(lb["latency_ms"])
            minutes.append({
                "minute": m + 1,
                "sent": lb["sent"],
                "ok": sum(lb["ok"].values()),
                "failed": sum(lb["failed"].values()),
                "failed_by_status": {k: v for k, v in lb["by_status"].items() if k != "200"},
                "failed_by_kind": per_minute_kinds.get(m, {}),
                "upstream_received": jb.get("received", 0),
                "expired_injected": jb.get("expired", 0),
                "min_token_left_s": jb.get("min_token_left_s"),
                "bad_credentials": sum(jb.get(k, 0) for k in
                                       ("missing_token", "bad_token", "missing_key", "unknown_key")),
                "key_versions": jb.get("versions", {}),
                "gens": jb.get("gens", {}),
                "token_fetches": fetch_ok,
                "token_requests_at_server": fetch_all,
                "fetch_ratio_to_min": round(fetch_ok / (60 / self.ttl), 2),
                "fetch_ratio_to_schedule": round(fetch_ok / expected, 2),
                "latchkey_token_requests": self.stat_delta(
                    "wasmcustom.latchkey.connection.orders.token.requests", m),
                "latchkey_token_failures": self.stats_delta(
                    "wasmcustom.latchkey.connection.orders.token.failure", m),
                "store_reads": self.stat_delta("wasmcustom.latchkey.secret.partner_key.reads", m),
                "store_failures": self.stats_delta("wasmcustom.latchkey.secret.partner_key.failure", m),
                "latency_ms_p50": round(lat[len(lat) // 2], 1) if lat else None,
                "latency_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
                "rss_kib": next((r["rss_kib"] for r in self.rss if r["minute"] == m + 1), None),
                "envoy_cpu_s": next((round(r["envoy_cpu_s"] - q["envoy_cpu_s"], 2)
                                     for q, r in zip(self.rss, self.rss[1:]) if r["minute"] == m + 1), None),
                "events": [f"{e['event']}:{e.get('which') or e.get('gen') or e.get('version')}"
                           for e in self.event_log if m * 60 <= e["t"] < (m + 1) * 60],
            })

        # RSS: the first steady minute against the last sample.
        base_s = min(self.rss_base_s, self.duration / 2)  # a short run: its middle
        base = next((r for r in self.rss if r["t"] >= base_s - 1), None)
        last = self.rss[-1]
        growth = (last["rss_kib"] - base["rss_kib"]) / base["rss_kib"] * 100 if base else None

        # wasm VM health.
        log_text = self.envoy.log_text()
        vm_failures = [l for l in log_text.splitlines() if VM_FAILURE.search(l)][:20]
        reloads = {k: v for k, v in self.stats_end.items() if k.startswith("wasm.") and "reload" in k and v}

        totals_sent = sum(m["sent"] for m in minutes)
        totals_ok = sum(m["ok"] for m in minutes)
        expired_total = sum(m["expired_injected"] for m in minutes)
        bad_total = sum(m["bad_credentials"] for m in minutes)
        long_start, long_end = self.long_window
        # Steady minutes: whole minutes clear of the long outage and of the minute after it
        # (the short outages are part of every minute's routine).
        steady = [m for m in minutes
                  if m["minute"] * 60 <= self.duration
                  and not (long_start is not None and long_end is not None
                           and (m["minute"] - 1) * 60 < long_end + 60 and m["minute"] * 60 > long_start)]
        fetch_steady = [m["token_fetches"] for m in steady]
        ecds = {k: v for k, v in self.stats_end.items() if k.startswith("extension_config_discovery.")}
        ecds_rejected = sum(v for k, v in ecds.items() if k.endswith(("update_rejected", "config_fail")))
        workers = {k: v for k, v in self.stats_end.items()
                   if k.startswith("listener.") and ".worker_" in k and k.endswith("downstream_cx_total")}

        # Each expired token: when the server got the request that issued it, and how long
        # after that latchkey still used it (latchkey's clock starts when the answer arrives).
        issued = sorted(a for a, status in self.issues.entries if status == 200)
        for ex in judge.expired:
            iat = ex.get("iat")
            if iat is None:
                continue
            lo = bisect.bisect_left(issued, float(iat))
            hi = bisect.bisect_left(issued, float(iat) + 1.0)
            if hi > lo:
                a = issued[hi - 1]
                ex["issue_request_at"] = round(a, 3)
                ex["issue_request_s_after_iat"] = round(a - iat, 3)
                ex["used_s_after_issue_request"] = round(ex["at"] - a, 3)
            ex["t"] = round(ex["at"] - self.t0_wall, 3)

        checks = {
            "no_expired_token_injected": expired_total == 0,
            "no_failure_while_valid_credential": not fatal,
            "every_200_carried_a_good_credential": bad_total == 0,
            "no_wasm_vm_failure": not vm_failures and not reloads,
            "rss_growth_within_limit": growth is not None and growth <= self.rss_growth_pct,
            "every_configuration_swap_applied": all(x["first_request_s_after"] is not None
                                                    for x in swap_lag) and not ecds_rejected,
        }
        report = {
            "what": "latchkey soak (issue #16)",
            "command": f"SOAK_S={self.duration:.0f} make soak",
            "started": dt.datetime.fromtimestamp(self.t0_wall, dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": self.git_commit,
            "wasm_sha256": self.wasm_sha256,
            "envoy": {"version": envoy_version(self.envoy.binary), "concurrency": 2,
                      "connections_per_worker": workers},
            "settings": {"seconds": self.duration, "rate_per_s": self.rate, "token_ttl_s": self.ttl,
                         "token_timeout_ms": self.timeout_ms, "store_refresh_s": self.store_refresh_s,
                         "rotate_every_s": self.rotate_s, "swap_every_s": self.swap_s,
                         "outage_every_s": self.outage_every_s, "outage_s": self.outage_s,
                         "long_outage": {"from_s": long_start, "to_s": long_end}
                         if long_start is not None and long_end is not None and long_end < self.duration else None,
                         "rss_base_s": self.rss_base_s, "rss_growth_limit_pct": self.rss_growth_pct},
            "totals": {
                "requests": totals_sent, "ok": totals_ok, "failed": totals_sent - totals_ok,
                "failed_by_kind": kinds,
                "skipped_slots": load.skipped,
                "upstream_received": sum(m["upstream_received"] for m in minutes),
                "expired_tokens_injected": expired_total,
                "max_token_lateness_s": round(judge.max_lateness, 3) if judge.max_lateness is not None else None,
                "bad_credentials": bad_total,
                "distinct_tokens_injected": judge.tokens_seen,
                "token_fetches": sum(m["token_fetches"] for m in minutes),
                "token_issues_not_counted_cut_by_outage": cut,
                "token_history_gaps": self.issues.gaps,
                "fetches_per_min_minimum": 60 / self.ttl,
                "fetches_per_min_schedule": round(expected, 1),
                "fetches_per_min_steady_mean": round(statistics.mean(fetch_steady), 1) if fetch_steady else None,
                "fetch_ratio_steady_to_min": round(statistics.mean(fetch_steady) / (60 / self.ttl), 2)
                if fetch_steady else None,
                "store_versions_written": self.store_version,
                "rss_kib_base": base["rss_kib"] if base else None,
                "rss_base_at_s": base["t"] if base else None,
                "rss_kib_last": last["rss_kib"],
                "rss_growth_pct": round(growth, 2) if growth is not None else None,
            },
            "checks": checks,
            "passed": all(checks.values()),
            "fatal_failures": fatal[:50],
            "expired_examples": judge.expired[:50],
            "bad_credential_examples": judge.bad[:50],
            "vm_failures": vm_failures,
            "vm_reload_stats": reloads,
            "ecds_stats": ecds,
            "outage_recoveries": recoveries,
            "rotation_lag": rotation_lag,
            "swap_lag": swap_lag,
            "rss": self.rss,
            "per_minute": minutes,
            "latchkey_stats_end": {k: v for k, v in self.stats_end.items()
                                   if k.startswith("wasmcustom.latchkey.")},
            "events": self.event_log,
            "workdir": str(self.work),
        }
        return report


def git_commit() -> str | None:
    """HEAD, with "+changes" when src/ differs from it (the module was built from those)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "src"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return f"{head}+changes" if head and dirty else head


def envoy_version(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version: \S+/(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip()[:80]


def summary(report: dict[str, Any]) -> str:
    t = report["totals"]
    lines = [
        "",
        f"soak: {t['requests']} requests, {t['ok']} ok, {t['failed']} failed "
        f"{json.dumps(t['failed_by_kind'], sort_keys=True)}; {t['skipped_slots']} slots skipped",
        f"  expired tokens injected: {t['expired_tokens_injected']} (latest use of a token: "
        f"{t['max_token_lateness_s']} s after its exp; negative = before)",
        f"  credentials the upstream could not match: {t['bad_credentials']}",
        f"  token fetches: {t['token_fetches']} in all; steady minutes {t['fetches_per_min_steady_mean']}/min"
        f" = {t['fetch_ratio_steady_to_min']}x the minimum {t['fetches_per_min_minimum']:g}/min"
        f" (latchkey's refresh schedule: {t['fetches_per_min_schedule']}/min)",
        f"  store: {t['store_versions_written']} versions written; rotation to first use (s): "
        + ", ".join(f"v{r['version']} {r['first_injected_s_after']}" for r in report["rotation_lag"]),
        "  swaps, first request on the new configuration (s): "
        + ", ".join(f"{s['gen']}{'+VMs' if s['new_vms'] else ''} {s['first_request_s_after']}"
                    for s in report["swap_lag"]),
        "  outages (begin s, length s): /orders ok until +s after begin, ok again +s after end: "
        + "; ".join(f"{r['t_begin']:.0f}/{r['length_s']:.0f}: {r['orders_ok_until_s_after_begin']}, "
                    f"{r['orders_ok_again_s_after_end']}" for r in report["outage_recoveries"]),
        f"  Envoy RSS: {t['rss_kib_base'] and t['rss_kib_base'] / 1024:.1f} MiB at "
        f"{t['rss_base_at_s']} s -> {t['rss_kib_last'] / 1024:.1f} MiB at the end "
        f"({t['rss_growth_pct']} %, limit {report['settings']['rss_growth_limit_pct']:g} %)",
        "  checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report["checks"].items()),
        f"soak: {'PASSED' if report['passed'] else 'FAILED'}",
    ]
    if report["fatal_failures"]:
        lines.insert(-1, "  first fatal failures: " + json.dumps(report["fatal_failures"][:5]))
    if report["expired_examples"]:
        lines.insert(-1, "  first expired tokens: " + json.dumps(report["expired_examples"][:5]))
    if report["vm_failures"]:
        lines.insert(-1, "  VM failures: " + json.dumps(report["vm_failures"][:5]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, default=REPO / "target/wasm32-wasip1/release/latchkey.wasm")
    ap.add_argument("--seconds", type=float, default=env_float("SOAK_S", 1800))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "soak.json")
    args = ap.parse_args()
    if not args.wasm.is_file():
        print(f"soak: no module at {args.wasm} (make build)", file=sys.stderr)
        return 2
    if args.seconds < 60:
        print("soak: --seconds must be at least 60", file=sys.stderr)
        return 2

    def on_term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    soak = Soak(args)
    try:
        report = soak.run()
    except KeyboardInterrupt as e:
        print(f"soak: interrupted ({e})", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the soak itself could not run: say why, exit 2
        traceback.print_exc()
        envoy = getattr(soak, "envoy", None)
        if envoy is not None:
            print(envoy.diagnostics(), file=sys.stderr)
        print(f"soak: could not run; logs in {soak.work}", file=sys.stderr)
        return 2
    finally:
        soak.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    log(summary(report))
    if report["passed"] and not os.environ.get("SOAK_KEEP"):
        shutil.rmtree(soak.work, ignore_errors=True)
        log(f"soak: report in {args.out}")
    else:
        log(f"soak: report in {args.out}; Envoy's and the servers' logs in {soak.work}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
