"""Integration-test harness for latchkey: a real Envoy, an echo upstream, a JWT signer.

Everything binds 127.0.0.1 only, every process is started and stopped by pid, and every
wait is a bounded poll (no blind sleeps). Standard library plus pyjwt and cryptography.

Typical use (see conftest.py for the pytest fixtures)::

    with Upstream() as up:
        cfg = envoy_config(free_port(), free_port(), up.port, wasm_path, plugin, signer.jwks())
        with Envoy(cfg, workdir=tmp) as envoy:
            status, headers, body = envoy.request("GET", "/orders/1")
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import jwt
from jwt.algorithms import RSAAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

DEFAULT_ISSUER = "https://issuer.test"
DEFAULT_AUDIENCE = "latchkey-tests"
DEFAULT_ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]
JWT_PROVIDER = "test"
JWT_PAYLOAD_METADATA_KEY = "payload"
JWT_PAYLOAD_HEADER = "x-jwt-payload"
HCM_STAT_PREFIX = "ingress_http"
ACCESS_LOG_FORMAT = (
    "[%START_TIME%] \"%REQ(:METHOD)% %REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%\" "
    "%RESPONSE_CODE% %RESPONSE_FLAGS% route=%ROUTE_NAME% "
    "latchkey_route=%FILTER_STATE(wasm.latchkey.route:PLAIN)% "
    "latchkey_connection=%FILTER_STATE(wasm.latchkey.connection:PLAIN)% "
    "latchkey_decision=%FILTER_STATE(wasm.latchkey.decision:PLAIN)% "
    "details=%RESPONSE_CODE_DETAILS%\n"
)

# %REQ_WITHOUT_QUERY% keeps a query-injected API key out of the access log.
LOG_FORMAT = {
    "text_format_source": {"inline_string": ACCESS_LOG_FORMAT},
    "formatters": [{"name": "envoy.formatter.req_without_query", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery"}}],
}

_FILE_ACCESS_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


# --------------------------------------------------------------------------- utilities


class BacklogHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer listens with a backlog of 5: a burst of connections from
    Envoy (50 requests resumed at once) would overflow it and time out."""

    request_queue_size = 512
    daemon_threads = True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (and is not a zombie we could see)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


# How much later than it could have a polling round may end before the delay counts as this
# process not running (scheduling delays on a loaded 2-core machine stay well below this).
STALL_SLACK_S = 2.0


class StartupDeadline:
    """The timeout of a start-up wait, counting only time this process was running.

    The waiting loop calls `expired()` once per round; a round never takes longer than
    `max_round` seconds while this process runs. A round that took longer means this process
    (and usually the whole machine: a paused or snapshotted VM, a cgroup freeze, SIGSTOP) was
    not running; the server being waited for could not make progress either, so that gap is
    not charged against `timeout`. Without this, the first check after such a pause finds the
    whole budget gone and reports a start-up failure that never happened. Still bounded: at
    most `hard_factor` x `timeout` of wall-clock time in all.
    """

    def __init__(self, timeout: float, max_round: float, hard_factor: float = 4.0):
        self.timeout = timeout
        self.max_round = max_round
        self.start = self._last = time.monotonic()
        self._end = self.start + timeout
        self._hard_end = self.start + timeout * hard_factor
        self.suspended = 0.0  # seconds not charged (this process was not running)
        self.longest_gap = 0.0

    def expired(self) -> bool:
        now = time.monotonic()
        gap = now - self._last
        self._last = now
        self.longest_gap = max(self.longest_gap, gap)
        if gap > self.max_round:
            self.suspended += gap - self.max_round
            self._end += gap - self.max_round
        return now >= min(self._end, self._hard_end)

    def describe(self) -> str:
        """For failure messages: how long the wait really took, and how long it stalled."""
        elapsed = time.monotonic() - self.start
        text = f"waited {elapsed:.1f}s wall-clock"
        if self.suspended:
            text += (f", of which {self.suspended:.1f}s not counted: this process did not run"
                     f" (longest gap between polls {self.longest_gap:.1f}s)")
        return text


_PROC_STATES = {"R": "running", "S": "sleeping", "D": "uninterruptible (disk) sleep",
                "T": "stopped", "t": "stopped by a tracer", "Z": "zombie", "I": "idle"}


def proc_summary(pid: int) -> str:
    """One line on a live process from /proc, for failure messages: state, CPU time used,
    threads and where it sleeps in the kernel; says so if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return f"pid {pid}: no longer in /proc"
    state = fields[0].decode()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        wchan = "?"
    return (f"pid {pid}: state {state} ({_PROC_STATES.get(state, '?')}), {cpu:.2f}s CPU used, "
            f"{int(fields[17])} threads, wchan {wchan}")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} unreadable>"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- client side


class Response(NamedTuple):
    """An HTTP response: unpacks as (status, headers, body)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of header `name` (case-insensitive), in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


# latchkey keeps its counters in the VM and hands them to Envoy on a 1 s tick
# (docs/operations.md, Stats). Reading stats waits until that tick has passed since the
# last request this process sent: the flush period is the documented contract.
STATS_FLUSH_S = 1.0
_last_request = [0.0]


def note_request_sent() -> None:
    """For requests sent by other means than http_request (a kept-alive connection):
    stats read after this wait for their counts too."""
    _last_request[0] = time.monotonic()


def settle_wasm_stats() -> None:
    """Wait until counts of the requests sent so far have reached Envoy's stats."""
    wait = _last_request[0] + STATS_FLUSH_S + 0.3 - time.monotonic()
    if wait > 0:
        time.sleep(wait)


HeaderValue = str | bytes
Headers = Iterable[tuple[str | bytes, HeaderValue]] | dict[str, HeaderValue] | None


def http_request(port: int, method: str, path: str, headers: Headers = None,
                 body: bytes | str | None = None, timeout: float = 15.0,
                 host: str = LOOPBACK) -> Response:
    """Send one HTTP/1.1 request with http.client, exactly as given.

    `path` goes on the request line unchanged (no normalization or quoting; it must be
    ASCII without spaces or controls: use `raw_http_request` for anything else).
    `headers` is a dict or a list of (name, value) pairs: duplicates are sent as given and
    values may be bytes (sent verbatim, e.g. b"\\xff\\xfe"). A Host header is added unless
    one is given; Content-Length is added for a body unless given.
    """
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {(k.decode("latin-1") if isinstance(k, bytes) else k).lower() for k, _ in items}
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if "host" not in names:
            conn.putheader("Host", f"{host}:{port}")
        for name, value in items:
            conn.putheader(name, value)
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()
        _last_request[0] = time.monotonic()


def raw_http_request(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and return everything read until close/timeout.

    For requests http.client refuses to build (spaces or non-ASCII in the path, bad
    framing). Send `Connection: close` in `data` so the read ends promptly.
    """
    chunks = []
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.sendall(data)
            try:
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            except socket.timeout:
                pass
    finally:
        _last_request[0] = time.monotonic()
    return b"".join(chunks)


# --------------------------------------------------------------------------- upstream


class RecordedRequest(NamedTuple):
    """A request as the upstream received it. Header values are latin-1 decoded text:
    `value.encode("latin-1")` gives the exact bytes on the wire."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    at: float = 0.0  # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """All values of header `name` (case-insensitive), in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def to_json(self) -> dict[str, Any]:
        """JSON-able form, as echoed back in the response body."""
        return {
            "method": self.method,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers],
            "body": self.body.decode("utf-8", errors="replace"),
            "body_b64": base64.b64encode(self.body).decode(),
        }


class _Rule(NamedTuple):
    path_prefix: str
    status: int
    body: bytes | None
    headers: list[tuple[str, str]]
    remaining: list[int | None]  # mutable count, None = unlimited


class RequestLog:
    """Thread-safe record of the requests a test server received, oldest first
    (shared by the echo upstream and the fake token server)."""

    def __init__(self, what: str):
        self._what = what
        self._lock = threading.Lock()
        self._items: list[Any] = []

    def append(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)

    def all(self) -> list[Any]:
        with self._lock:
            return list(self._items)

    def count(self) -> int:
        with self._lock:
            return len(self._items)

    def last(self) -> Any:
        with self._lock:
            assert self._items, f"{self._what} received no request"
            return self._items[-1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        """Wait until at least `count` requests were recorded; return them all."""
        wait_until(lambda: self.count() >= count, timeout, message=f"{count} request(s) at the {self._what}")
        return self.all()


class Upstream:
    """Echo HTTP/1.1 server on 127.0.0.1 that records every request it receives.

    Answers 200 with a JSON echo of the request ({method, path, headers, body, body_b64})
    unless a `respond_with` rule matches the path.
    """

    def __init__(self, port: int = 0):
        self._lock = threading.Lock()
        self._log = RequestLog("upstream")
        self._rules: list[_Rule] = []
        self._server = BacklogHTTPServer((LOOPBACK, port), self._make_handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        return self._server.server_address[1]

    def start(self) -> "Upstream":
        """Start serving in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name=f"upstream-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "Upstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- recorded requests
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        return self._log.all()

    def last(self) -> RecordedRequest:
        """The most recent request (AssertionError if none)."""
        return self._log.last()

    def clear(self) -> None:
        """Forget recorded requests (response rules stay)."""
        self._log.clear()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until at least `count` requests were recorded; return them."""
        return self._log.wait_for(count, timeout)

    def respond_with(self, status: int, path_prefix: str = "/", body: bytes | str | dict | None = None,
                     headers: dict[str, str] | list[tuple[str, str]] | None = None,
                     times: int | None = None) -> None:
        """Answer requests whose path starts with `path_prefix` with `status`.

        `body` defaults to the JSON echo; a dict is sent as JSON. `times` limits how many
        requests the rule answers (None = all). The most recently added matching rule wins.
        """
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        with self._lock:
            self._rules.append(_Rule(path_prefix, status, body, hdrs, [times]))

    def reset_responses(self) -> None:
        """Drop every `respond_with` rule (back to 200 echo)."""
        with self._lock:
            self._rules.clear()

    # -- internals
    def _record_and_choose(self, rec: RecordedRequest) -> tuple[int, bytes | None, list]:
        self._log.append(rec)
        with self._lock:
            for rule in reversed(self._rules):
                if rec.path.startswith(rule.path_prefix) and rule.remaining[0] != 0:
                    if rule.remaining[0] is not None:
                        rule.remaining[0] -= 1
                    return rule.status, rule.body, rule.headers
        return 200, None, []

    def _make_handler(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "latchkey-test-upstream"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def handle_one_request(self):
                """As http.server's, but request lines up to 1 MiB (it stops at 64 KiB)."""
                try:
                    self.raw_requestline = self.rfile.readline(1 << 20)
                    if not self.raw_requestline:
                        self.close_connection = True
                        return
                    if not self.parse_request():
                        return
                    method = getattr(self, "do_" + self.command, None)
                    if method is None:
                        self.send_error(501)
                        return
                    method()
                    self.wfile.flush()
                except TimeoutError:
                    self.close_connection = True

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                rec = RecordedRequest(self.command, self.path, list(self.headers.items()),
                                      self._read_body(), time.monotonic())
                status, body, headers = upstream._record_and_choose(rec)
                if body is None:
                    body = json.dumps(rec.to_json()).encode()
                    headers = [("Content-Type", "application/json"), *headers]
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

        return Handler


# --------------------------------------------------------------------------- JWTs


class Signer:
    """An RSA-2048 key that signs RS256 JWTs and publishes its JWKS."""

    def __init__(self, kid: str | None = None, issuer: str = DEFAULT_ISSUER,
                 audience: str = DEFAULT_AUDIENCE):
        self.kid = kid or f"test-{uuid.uuid4().hex[:8]}"
        self.issuer = issuer
        self.audience = audience
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK dict (with kid, alg, use)."""
        jwk = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": "RS256", "use": "sig"})
        return jwk

    def jwks(self) -> str:
        """The JWKS document (JSON string) holding this key."""
        return json.dumps({"keys": [self.jwk()]})

    def token(self, claims: dict[str, Any] | None = None, exp_in: int = 3600,
              headers: dict[str, Any] | None = None) -> str:
        """A signed RS256 JWT: iss/aud/iat/exp defaulted, `claims` override them.

        A negative `exp_in` gives an expired token.
        """
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "iat": now, "exp": now + exp_in}
        payload.update(claims or {})
        return jwt.encode(payload, self._key, algorithm="RS256",
                          headers={"kid": self.kid, **(headers or {})})


def bearer(token: str) -> tuple[str, str]:
    """An ("authorization", "Bearer <token>") header pair."""
    return ("authorization", f"Bearer {token}")


# --------------------------------------------------------------------------- config


def static_cluster(name: str, port: int, host: str = LOOPBACK, connect_timeout: str = "1s",
                   **extra: Any) -> dict[str, Any]:
    """A STATIC cluster with one endpoint (for `extra_clusters`, e.g. a token server)."""
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }
    cluster.update(extra)
    return cluster


def _route_entry(spec: dict[str, Any]) -> dict[str, Any]:
    """Turn {"name", "prefix"|"path", "cluster"?, "disable_wasm"?, "metadata"?, "timeout"?}
    into an Envoy route."""
    known = {"name", "prefix", "path", "cluster", "disable_wasm", "metadata", "timeout"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown route keys {sorted(unknown)}")
    match = {"path": spec["path"]} if "path" in spec else {"prefix": spec.get("prefix", "/")}
    route: dict[str, Any] = {
        "name": spec["name"],
        "match": match,
        "route": {"cluster": spec.get("cluster", "upstream"), "timeout": spec.get("timeout", "15s")},
    }
    if spec.get("disable_wasm"):
        route["typed_per_filter_config"] = {"envoy.filters.http.wasm": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}}
    if "metadata" in spec:
        route["metadata"] = {"filter_metadata": spec["metadata"]}
    return route


def jwt_authn_filter(jwks: str, claims_header_forward: bool = False,
                     forward_jwt: bool = False) -> dict[str, Any]:
    """jwt_authn: provider "test" with an inline JWKS; no JWT passes (no claims), an
    invalid JWT is rejected 401; the payload goes to metadata key "payload"."""
    provider: dict[str, Any] = {
        "issuer": DEFAULT_ISSUER,
        "audiences": [DEFAULT_AUDIENCE],
        "local_jwks": {"inline_string": jwks},
        "payload_in_metadata": JWT_PAYLOAD_METADATA_KEY,
        "forward": forward_jwt,
    }
    if claims_header_forward:
        provider["forward_payload_header"] = JWT_PAYLOAD_HEADER
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {JWT_PROVIDER: provider},
            "rules": [{
                "match": {"prefix": "/"},
                "requires": {"requires_any": {"requirements": [
                    {"provider_name": JWT_PROVIDER},
                    {"allow_missing": {}},
                ]}},
            }],
        },
    }


def wasm_filter(wasm_path: str | os.PathLike, plugin_config: dict | str,
                wasm_env: dict[str, str] | None = None,
                failure_policy: str | None = None) -> dict[str, Any]:
    """envoy.filters.http.wasm running latchkey (name/root_id/vm_id "latchkey", V8)."""
    plugin_json = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    vm_config: dict[str, Any] = {
        "vm_id": "latchkey",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm_path)}},
    }
    if wasm_env:
        vm_config["environment_variables"] = {"key_values": dict(wasm_env)}
    config: dict[str, Any] = {
        "name": "latchkey",
        "root_id": "latchkey",
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": plugin_json},
        "vm_config": vm_config,
    }
    if failure_policy:
        config["failure_policy"] = failure_policy
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                         "config": config},
    }


def envoy_config(listener_port: int, admin_port: int, upstream_port: int,
                 wasm_path: str | os.PathLike | None, plugin_config: dict | str | None,
                 jwks: str, extra_clusters: list[dict] | None = None,
                 routes: list[dict] | None = None, claims_header_forward: bool = False,
                 wasm_env: dict[str, str] | None = None, failure_policy: str | None = None,
                 *, access_log_path: str | os.PathLike | None = None,
                 forward_jwt: bool = False, pre_filters: list[dict] | None = None,
                 virtual_hosts: list[dict] | None = None,
                 hcm_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Envoy bootstrap (a dict: dump it as JSON) for a latchkey test.

    Listener on 127.0.0.1:listener_port with an HCM (normalize_path, merge_slashes) and
    http_filters: `pre_filters` (if any), jwt_authn, latchkey wasm (omitted when
    `wasm_path` is None), router. `routes` (default DEFAULT_ROUTES) are dicts for
    `_route_entry` in a single virtual host "*"; `virtual_hosts` replaces that entirely.
    Cluster "upstream" is 127.0.0.1:upstream_port; `extra_clusters` are appended as given
    (see `static_cluster`). `failure_policy` is e.g. "FAIL_RELOAD" / "FAIL_OPEN".
    `access_log_path` (None: stdout) gets ACCESS_LOG_FORMAT lines. `forward_jwt` keeps the
    caller's Authorization header (jwt_authn removes it by default). `hcm_extra` adds or
    overrides HttpConnectionManager fields (e.g. max_request_headers_kb).
    """
    http_filters = list(pre_filters or [])
    http_filters.append(jwt_authn_filter(jwks, claims_header_forward, forward_jwt))
    if wasm_path is not None:
        http_filters.append(wasm_filter(wasm_path, plugin_config if plugin_config is not None else {},
                                        wasm_env, failure_policy))
    http_filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })

    if access_log_path is None:
        access_log = {"name": "envoy.access_loggers.stdout", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": LOG_FORMAT}}
    else:
        access_log = {"name": "envoy.access_loggers.file", "typed_config": {
            "@type": _FILE_ACCESS_LOG_TYPE,
            "path": str(access_log_path),
            "log_format": LOG_FORMAT}}

    if virtual_hosts is None:
        virtual_hosts = [{"name": "all", "domains": ["*"],
                          "routes": [_route_entry(r) for r in (routes or DEFAULT_ROUTES)]}]

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": HCM_STAT_PREFIX,
        "codec_type": "AUTO",
        "normalize_path": True,
        "merge_slashes": True,
        "access_log": [access_log],
        "route_config": {"name": "local", "virtual_hosts": virtual_hosts},
        "http_filters": http_filters,
    }
    hcm.update(hcm_extra or {})
    return {
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": LOOPBACK, "port_value": listener_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": [static_cluster("upstream", upstream_port), *(extra_clusters or [])],
        },
    }


def envoy_bin() -> Path:
    """The Envoy binary: $ENVOY_BIN, else <repo>/.venv/bin/envoy."""
    return Path(os.environ.get("ENVOY_BIN") or REPO_ROOT / ".venv" / "bin" / "envoy")


def validate(config_path: str | os.PathLike, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `envoy --mode validate -c config_path`; returncode 0 means valid.

    stdout/stderr are captured (text). Uses a dynamic base id so it never collides.
    """
    return subprocess.run(
        [str(envoy_bin()), "--mode", "validate", "-c", str(config_path),
         "--use-dynamic-base-id", "--log-level", "warn"],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _find_file_access_log_paths(node: Any) -> list[str]:
    """Every FileAccessLog `path` in a config (dict/list tree)."""
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("@type") == _FILE_ACCESS_LOG_TYPE and "path" in node:
            found.append(node["path"])
        for v in node.values():
            found.extend(_find_file_access_log_paths(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_find_file_access_log_paths(v))
    return found


def wasm_module(funcs: list[tuple[str, int, int | None]]) -> bytes:
    """A hand-assembled wasm module: one exported function per (export name, number of
    i32 params, constant i32 result or None for no result), and one exported memory of
    one page. Enough for stand-in proxy-wasm modules."""
    def uleb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def sleb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
            out.append(byte | (0 if done else 0x80))
            if done:
                return bytes(out)

    def vec(items: list[bytes]) -> bytes:
        return uleb(len(items)) + b"".join(items)

    def name(s: str) -> bytes:
        return uleb(len(s)) + s.encode()

    def section(section_id: int, payload: bytes) -> bytes:
        return bytes([section_id]) + uleb(len(payload)) + payload

    i32 = b"\x7f"
    types = [b"\x60" + vec([i32] * params) + vec([i32] if result is not None else [])
             for _, params, result in funcs]
    bodies = []
    for _, _, result in funcs:
        body = b"\x00" + (b"\x41" + sleb(result) if result is not None else b"") + b"\x0b"
        bodies.append(uleb(len(body)) + body)
    exports = [name(n) + b"\x00" + uleb(i) for i, (n, _, _) in enumerate(funcs)]
    exports.append(name("memory") + b"\x02" + uleb(0))
    return (b"\x00asm\x01\x00\x00\x00"
            + section(1, vec(types))
            + section(3, vec([uleb(i) for i in range(len(funcs))]))
            + section(5, vec([b"\x00\x01"]))  # one memory, min 1 page
            + section(7, vec(exports))
            + section(10, vec(bodies)))


def noop_proxy_wasm_module(configure_ok: bool = True) -> bytes:
    """A minimal proxy-wasm (ABI 0.2.1) module that does nothing, hand-assembled.

    For harness self-checks of the wasm filter config without the latchkey build:
    requests pass untouched; with `configure_ok=False` on_configure returns false, so
    Envoy refuses to start ("Unable to create Wasm plugin").
    """
    return wasm_module([
        ("proxy_abi_version_0_2_1", 0, None),
        ("proxy_on_memory_allocate", 1, 1024),
        ("proxy_on_context_create", 2, None),
        ("proxy_on_vm_start", 2, 1),
        ("proxy_on_configure", 2, 1 if configure_ok else 0),
        ("proxy_on_request_headers", 3, 0),
        ("proxy_on_response_headers", 3, 0),
    ])


# --------------------------------------------------------------------------- envoy

_LIVE_ENVOYS: "weakref.WeakSet[Envoy]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_envoys() -> None:
    for envoy in list(_LIVE_ENVOYS):
        envoy.stop()


class EnvoyStartError(RuntimeError):
    """Envoy exited or never became ready; the message carries the log tail."""


class Envoy:
    """A real Envoy process running `config` (a bootstrap dict, written as JSON).

    Ports come from the config (admin address, first listener). Files in `workdir`:
    envoy.json (config), envoy.log (--log-path), envoy.out (stdout+stderr, where the stdout
    access log goes), and whatever access log path the config names.
    """

    def __init__(self, config: dict[str, Any], workdir: str | os.PathLike | None = None, *,
                 log_level: str = "info", component_log_level: str | None = None,
                 concurrency: int = 2, base_id: int | None = None,
                 extra_args: Iterable[str] = (), ready_timeout: float = 30.0,
                 binary: str | os.PathLike | None = None, env: dict[str, str] | None = None):
        self.config = config
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="latchkey-envoy-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.admin_port: int = config["admin"]["address"]["socket_address"]["port_value"]
        self.port: int = (config["static_resources"]["listeners"][0]["address"]
                          ["socket_address"]["port_value"])
        # Distinct per running instance: the admin port is held while it runs.
        self.base_id = base_id if base_id is not None else 20000 + self.admin_port
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.binary = Path(binary) if binary else envoy_bin()
        self.env = env
        self.config_path = self.workdir / "envoy.json"
        self.log_path = self.workdir / "envoy.log"
        self.out_path = self.workdir / "envoy.out"
        paths = _find_file_access_log_paths(config)
        self.access_log_path = Path(paths[0]) if paths else self.out_path
        self.proc: subprocess.Popen | None = None

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        """The Envoy process id (None before start)."""
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<listener port>"""
        return f"http://{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        """The command line used to start Envoy."""
        cmd = [str(self.binary), "-c", str(self.config_path),
               "--concurrency", str(self.concurrency),
               "--base-id", str(self.base_id),
               "--log-level", self.log_level,
               "--log-path", str(self.log_path),
               "--file-flush-interval-msec", "100"]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        return cmd + self.extra_args

    def start(self) -> "Envoy":
        """Write the config, start Envoy, and wait (bounded) for admin /ready and the listener."""
        if self.proc is not None:
            raise RuntimeError("Envoy already started")
        if not self.binary.exists():
            raise EnvoyStartError(f"Envoy binary not found at {self.binary} (set ENVOY_BIN)")
        self.config_path.write_text(json.dumps(self.config, indent=2))
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        _LIVE_ENVOYS.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # A round: the admin GET (connect + read, 1 s each at most), the listener connect
        # (1 s) and the 50 ms pause; more than that plus slack means this process was not
        # running, and that time is not charged (see StartupDeadline).
        deadline = StartupDeadline(self.ready_timeout, max_round=3.05 + STALL_SLACK_S)
        while True:
            if self.proc.poll() is not None:
                raise EnvoyStartError(
                    f"Envoy exited with {self.proc.returncode} before ready\n{self.diagnostics()}")
            try:
                status, body = self.admin_get("/ready", timeout=1.0)
                if status == 200 and body.strip() == b"LIVE" and self._listener_accepts():
                    return
            except OSError:
                pass
            if deadline.expired():
                raise EnvoyStartError(
                    f"Envoy not ready after {self.ready_timeout:.0f}s ({deadline.describe()};"
                    f" {proc_summary(self.proc.pid)})\n{self.diagnostics()}")
            time.sleep(0.05)

    def _listener_accepts(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=1.0).close()
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the pid, SIGKILL after `timeout`, reap it; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                self.proc.wait(timeout=timeout)
        _LIVE_ENVOYS.discard(self)
        return self.proc.returncode

    def __enter__(self) -> "Envoy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- logs
    def log_text(self) -> str:
        """The Envoy application log (--log-path) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log_text(self) -> str:
        """The access log so far (file from the config, else Envoy's stdout)."""
        try:
            return self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log_lines(self) -> list[str]:
        """Access log lines so far (only lines that look like ACCESS_LOG_FORMAT output)."""
        return [l for l in self.access_log_text().splitlines() if l.startswith("[") and '"' in l]

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait until the application log matches regex `pattern`; return the match."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log_text()), timeout,
                          message=f"log /{pattern}/ in {self.log_path}")

    def wait_for_access_log(self, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Wait until at least `count` access log lines were flushed; return all lines."""
        wait_until(lambda: len(self.access_log_lines()) >= count, timeout,
                   message=f"{count} access log line(s) in {self.access_log_path}")
        return self.access_log_lines()

    def diagnostics(self, lines: int = 60) -> str:
        """Tails of the application log and stdout/stderr, for failure messages."""
        return (f"--- {self.log_path} ---\n{_tail(self.log_path, lines)}\n"
                f"--- {self.out_path} ---\n{_tail(self.out_path, lines)}")

    # -- admin
    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET an admin endpoint; returns (status, body). A Prometheus scrape first waits
        for latchkey's counters to be flushed (`settle_wasm_stats`)."""
        if path.startswith("/stats/prometheus"):
            settle_wasm_stats()
        conn = http.client.HTTPConnection(LOOPBACK, self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def admin_post(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """POST an admin endpoint (e.g. /reset_counters); returns (status, body)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.admin_port, timeout=timeout)
        try:
            conn.request("POST", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def stats(self, filter: str | None = None, settle: bool = True) -> dict[str, int | float]:
        """Counters and gauges from /stats?format=json as {name: value} (no histograms).

        `filter` is Envoy's regex filter (e.g. "wasmcustom\\."). `settle`: first wait
        until latchkey's counters of the requests sent so far are flushed.
        """
        if settle:
            settle_wasm_stats()
        path = "/stats?format=json"
        if filter:
            path += "&filter=" + urllib.parse.quote(filter, safe="")
        status, body = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"admin {path} -> {status}: {body[:200]!r}")
        out: dict[str, int | float] = {}
        for entry in json.loads(body).get("stats", []):
            if "name" in entry and "value" in entry:
                out[entry["name"]] = entry["value"]
        return out

    def stat(self, name: str, default: int | float | None = 0,
             settle: bool = True) -> int | float | None:
        """One counter/gauge by exact name (`default` if absent)."""
        return self.stats(filter="^" + re.escape(name) + "$", settle=settle).get(name, default)

    def wait_for_stat(self, name: str, predicate: Callable[[Any], bool] | int,
                      timeout: float = 10.0) -> int | float:
        """Wait until stat `name` satisfies `predicate` (an int means ">= that value")."""
        check = (lambda v: v is not None and v >= predicate) if isinstance(predicate, int) else predicate
        box: list[Any] = []

        def ok() -> bool:
            # Polling for a condition needs no settling: it waits for the flush itself.
            box[:] = [self.stat(name, None, settle=False)]
            return check(box[0])
        try:
            wait_until(ok, timeout, message=f"stat {name}")
        except TimeoutError as e:
            raise TimeoutError(f"{e} (last value {box[0] if box else None!r})") from None
        return box[0]

    # -- data plane
    def request(self, method: str, path: str, headers: Headers = None,
                body: bytes | str | None = None, timeout: float = 15.0) -> Response:
        """Send one request to the listener (see `http_request`); returns a Response,
        which unpacks as (status, headers, body)."""
        return http_request(self.port, method, path, headers, body, timeout)

    def raw_request(self, data: bytes, timeout: float = 15.0) -> bytes:
        """Send raw bytes to the listener (see `raw_http_request`)."""
        return raw_http_request(self.port, data, timeout)
