"""Token servers for latchkey's OAuth2 integration tests.

Three servers, all on 127.0.0.1 only, every wait bounded, every process stopped by pid:

``OidcProvider``
    The REAL one: npm ``oidc-provider`` (OpenID Certified) run by ``node tests/oauth/server.mjs``.
    client_credentials (JWT access tokens for ``https://api.test``, opaque ones for
    ``https://opaque.api.test``), refresh_token with rotation and reuse detection, RFC 8693
    token exchange, JWKS, introspection, revocation. Test endpoints under ``/__test/`` count
    and record token requests and mint pre-consented refresh tokens. Optional clients for the
    authorization code flow with PKCE: Envoy's browser sign-in (``browser_redirect_uris``)
    and latchkey's user-delegated connections (``consent_redirect_uris``; browser.py's
    consent_at_idp plays the user). Clients without a secret: ``private_key_jwt_clients``
    (a JWK set each; oidc-provider verifies the signed assertion) and
    ``tls_client_auth_clients`` (a subject DN each; served over mutual TLS on a second port,
    ``mtls``). Needs ``npm ci --prefix tests/oauth`` once.

``FaultTokenServer``
    A FAKE token endpoint in Python, used only to inject the faults a real server will not
    produce on demand (delays, 5xx, garbage, huge bodies, dropped connections...).

``FederatedCredentialServer``
    A FAKE Entra ID token endpoint that checks a client assertion against an app's
    federated identity credentials (workload identity federation: a managed identity's
    token for ``api://AzureADTokenExchange`` authenticates another app). No real server
    here can do that check (see its docstring); it verifies the assertion's signature
    against the issuer's JWKS (the IMDS stand-in's), its lifetime, issuer, subject and
    audience.

Typical use::

    with OidcProvider(ttl=10) as idp:
        status, body, _ = idp.client_credentials(scope="orders.read")
        claims = idp.verify_access_token(body["access_token"])

    with FaultTokenServer() as fake:
        fake.set_mode(status=503, times=2)   # two 503s, then normal tokens again
        ...
        assert fake.count() == 3
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import warnings
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import jwt

from harness import (STALL_SLACK_S, BacklogHTTPServer, RequestLog, LOOPBACK, REPO_ROOT,
                     StartupDeadline, http_request, pid_alive, proc_summary, wait_until)

OAUTH_DIR = REPO_ROOT / "tests" / "oauth"
SERVER_SCRIPT = OAUTH_DIR / "server.mjs"
NPM_INSTALL_HINT = "run `npm ci --prefix tests/oauth --no-audit --no-fund` (from the repo root)"

# What tests/oauth/server.mjs registers.
CLIENTS: dict[str, str] = {"gw-basic": "gw-basic-secret", "gw-post": "gw-post-secret"}
CLIENT_AUTH_METHODS: dict[str, str] = {"gw-basic": "client_secret_basic",
                                       "gw-post": "client_secret_post",
                                       "gw-consent": "client_secret_basic",
                                       "gw-consent-post": "client_secret_post",
                                       "gw-browser": "client_secret_basic"}
# The browser sign-in client, registered only when OidcProvider(browser_redirect_uris=...)
# is given (authorization code + PKCE, client_secret_basic; not in CLIENTS).
BROWSER_CLIENT_ID = "gw-browser"
BROWSER_CLIENT_SECRET = "gw-browser-secret"
# latchkey's authorization-code (user-delegated) connections: registered only when
# OidcProvider(consent_redirect_uris=...) is given. Confidential, PKCE S256 required, grants
# authorization_code + refresh_token; every code grant also issues a refresh token (not tied
# to the IdP's browser session), so scope CONSENT_SCOPE alone is what latchkey must request.
CONSENT_CLIENT_ID = "gw-consent"                 # client_secret_basic
CONSENT_CLIENT_SECRET = "gw-consent-secret"
CONSENT_POST_CLIENT_ID = "gw-consent-post"       # client_secret_post
CONSENT_POST_CLIENT_SECRET = "gw-consent-post-secret"
CONSENT_CLIENTS: dict[str, str] = {CONSENT_CLIENT_ID: CONSENT_CLIENT_SECRET,
                                   CONSENT_POST_CLIENT_ID: CONSENT_POST_CLIENT_SECRET}
CONSENT_CALLBACK_PATH = "/.latchkey/callback"
CONSENT_SCOPE = "orders.read"
DEFAULT_RESOURCE = "https://api.test"          # JWT access tokens, the default resource
OPAQUE_RESOURCE = "https://opaque.api.test"    # opaque (introspectable) access tokens
RESOURCE_SCOPES = ("orders.read", "orders.write")
REFRESH_ACCOUNT = "svc-orders"
REFRESH_SCOPE = "openid offline_access orders.read"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"

MAX_DELAY_S = 120.0


def _form_encode(fields: dict[str, Any] | list[tuple[str, Any]]) -> str:
    items = fields.items() if isinstance(fields, dict) else fields
    return urllib.parse.urlencode([(k, v) for k, v in items if v is not None])


def client_secret(client_id: str) -> str:
    """The registered secret of a client of server.mjs ("" for an unknown one)."""
    return {**CLIENTS, **CONSENT_CLIENTS, BROWSER_CLIENT_ID: BROWSER_CLIENT_SECRET}.get(client_id, "")


def pkce_pair(length: int = 64) -> tuple[str, str]:
    """(code_verifier, code_challenge) for PKCE S256 (RFC 7636 §4.1-4.2): a random verifier of
    `length` (43..128) unreserved characters and base64url(SHA-256(verifier)) unpadded."""
    if not 43 <= length <= 128:
        raise ValueError("a code_verifier has 43 to 128 characters")
    verifier = base64.urlsafe_b64encode(os.urandom(96)).rstrip(b"=").decode()[:length]
    return verifier, pkce_challenge(verifier)


def pkce_challenge(verifier: str) -> str:
    """base64url(SHA-256(verifier)) without padding (code_challenge_method S256)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def basic_auth_header(client_id: str, secret: str) -> str:
    """`Basic ...` per RFC 6749 §2.3.1 (id and secret form-urlencoded, then base64)."""
    raw = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening: connecting to it is refused.

    The port stays bound (never listening) by this process until it exits, so nothing else
    can start listening on it meanwhile. For "token server unreachable" tests.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((LOOPBACK, 0))
    _RESERVED_SOCKETS.append(s)
    return s.getsockname()[1]


_RESERVED_SOCKETS: list[socket.socket] = []


# --------------------------------------------------------------------------- the real server


def node_modules_ready() -> Path:
    """Check tests/oauth/node_modules holds oidc-provider; raise RuntimeError saying how to
    install it if not. Returns the node binary's path."""
    node = os.environ.get("NODE") or shutil.which("node")
    if not node:
        raise RuntimeError("node (Node.js >= 20) is not on PATH; needed for tests/oauth/server.mjs")
    if not (OAUTH_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        raise RuntimeError(f"tests/oauth/node_modules is missing oidc-provider: {NPM_INSTALL_HINT}")
    return Path(node)


class TokenResponse(NamedTuple):
    """A token-endpoint answer: (status, body parsed as JSON, headers)."""

    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


HANG_S = 15.0  # a start normally takes 0.2-1.5 s


class OidcStartWarning(UserWarning):
    """A hung oidc-provider start that was retried (with node's report attached)."""


class OidcStartError(RuntimeError):
    """node exited or never printed READY; the message carries how it ended, its stdout and
    its stderr."""


_READY_POLL_S = 0.25  # one round of the READY wait


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


_LIVE_PROVIDERS: "weakref.WeakSet[OidcProvider]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_providers() -> None:
    for p in list(_LIVE_PROVIDERS):
        p.stop()


class OidcProvider:
    """oidc-provider run as ``node tests/oauth/server.mjs <port> <ttl>`` (cwd tests/oauth).

    ``ttl``: access-token lifetime (s). ``exchange_ttl``: token-exchange access tokens (s,
    default ttl). ``refresh_ttl``: refresh tokens (s). ``subject_jwks``: JWKS (dict or JSON)
    the token-exchange grant verifies subject tokens with (default: decoded only, `sub`,
    `exp` and `nbf` still checked). ``port``: 0 lets node bind any free port (no race).
    ``debug``: let oidc-provider log to the stderr file (``stderr_path``, in ``log_dir`` or
    the temp dir; an empty one in the temp dir is deleted by stop()). ``browser_redirect_uris``:
    register the browser sign-in client BROWSER_CLIENT_ID with these redirect URIs and turn
    on oidc-provider's login and consent forms (/interaction/<uid>; see server.mjs).
    ``accounts``: extra claims per account id, e.g. {"alice": {"groups": ["billing"]}}
    (released with scope ``groups``). ``consent_redirect_uris``: register latchkey's
    authorization-code clients CONSENT_CLIENT_ID / CONSENT_POST_CLIENT_ID with these redirect
    URIs (latchkey's ``consent.redirect_uri``, path CONSENT_CALLBACK_PATH) and turn on the
    same login and consent forms (with or without ``browser_redirect_uris``).
    ``private_key_jwt_clients``: {client_id: {"jwks": <JWK set of public keys>, "alg":
    "RS256"|"PS256"|"ES256" (optional), "consent": True (optional)}}: clients that
    authenticate with a signed JWT (token_endpoint_auth_method private_key_jwt,
    token_endpoint_auth_signing_alg = alg; oidc-provider verifies the assertion itself,
    replay detection included). With "consent" (needs ``consent_redirect_uris``) the client
    is a consent client as CONSENT_CLIENT_ID is (authorization code + PKCE, refresh tokens),
    authenticating so instead of with a secret.
    ``tls_client_auth_clients``: {client_id: subject DN (RFC 4514, e.g. ClientCert.subject_dn)}:
    clients that authenticate with their TLS client certificate (RFC 8705 §2.1,
    tls_client_auth_subject_dn); needs ``mtls``. ``mtls``: (server cert chain, server key,
    CA) PEM paths: node also serves HTTPS on a second port (``mtls_port``, ``mtls_url``,
    ``mtls_token_url``) asking for a client certificate verified against that CA; recorded
    token requests then say how they came (``tls``: None, or {authorized, subject,
    fingerprint256, port}). ``startup_timeout``:
    how long node may take to print READY, not counting time this process was suspended
    (see harness.StartupDeadline); a failure stops node first, then reports its state, how
    it ended, its stdout (read to the end) and its stderr.
    """

    def __init__(self, ttl: int = 300, *, exchange_ttl: int | None = None,
                 refresh_ttl: int | None = None, subject_jwks: dict | str | None = None,
                 port: int = 0, history: int = 50, debug: bool = False,
                 startup_timeout: float = 30.0, env: dict[str, str] | None = None,
                 log_dir: str | os.PathLike | None = None,
                 browser_redirect_uris: list[str] | None = None,
                 accounts: dict[str, dict[str, Any]] | None = None,
                 consent_redirect_uris: list[str] | None = None,
                 private_key_jwt_clients: dict[str, dict[str, Any]] | None = None,
                 tls_client_auth_clients: dict[str, str] | None = None,
                 mtls: tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike] | None = None):
        self.ttl = int(ttl)
        self.exchange_ttl = exchange_ttl
        self.refresh_ttl = refresh_ttl
        self.subject_jwks = subject_jwks
        self.requested_port = int(port)
        self.history = history
        self.debug = debug
        self.startup_timeout = startup_timeout
        self.extra_env = env or {}
        self.log_dir = Path(log_dir) if log_dir else None
        self.browser_redirect_uris = list(browser_redirect_uris or [])
        self.accounts = accounts
        self.consent_redirect_uris = list(consent_redirect_uris or [])
        self.private_key_jwt_clients = dict(private_key_jwt_clients or {})
        self.tls_client_auth_clients = dict(tls_client_auth_clients or {})
        self.mtls = tuple(str(p) for p in mtls) if mtls else None
        if self.tls_client_auth_clients and not self.mtls:
            raise ValueError("tls_client_auth_clients need mtls=(cert, key, ca)")
        self.proc: subprocess.Popen | None = None
        self._port: int | None = None
        self._mtls_port: int | None = None
        self._stderr_file = None
        self.stderr_path: Path | None = None

    node_modules_ready = staticmethod(node_modules_ready)

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "OidcProvider":
        """Start node and wait (bounded) for its `READY <port>` line.

        node has been seen, rarely, to stop before READY with its main thread asleep in
        a futex and no output (0.5 s of CPU, then nothing for 30 s; not reproduced in
        hundreds of starts). The cause is not known yet. Such a start is given up after
        HANG_S, with a node diagnostic report (JS stack, native stack, libuv handles)
        attached to a pytest warning so the next occurrence says where it hung, and
        node is started once more."""
        try:
            return self._start_once(min(self.startup_timeout, HANG_S))
        except OidcStartError as e:
            if "not READY" not in str(e):
                raise
            warnings.warn(OidcStartWarning(f"oidc-provider start hung; starting again:\n{e}"))
            self.proc = None
            return self._start_once(self.startup_timeout)

    def _start_once(self, timeout: float) -> "OidcProvider":
        if self.proc is not None:
            raise RuntimeError("OidcProvider already started")
        node = node_modules_ready()
        env = {**os.environ, **self.extra_env, "OAUTH_TOKEN_TTL": str(self.ttl),
               "OAUTH_HISTORY": str(self.history)}
        env.pop("OAUTH_PORT", None)
        if self.exchange_ttl is not None:
            env["OAUTH_EXCHANGE_TTL"] = str(int(self.exchange_ttl))
        if self.refresh_ttl is not None:
            env["OAUTH_REFRESH_TTL"] = str(int(self.refresh_ttl))
        if self.subject_jwks is not None:
            env["OAUTH_SUBJECT_JWKS"] = (self.subject_jwks if isinstance(self.subject_jwks, str)
                                         else json.dumps(self.subject_jwks))
        if self.browser_redirect_uris:
            env["OAUTH_BROWSER_REDIRECT_URIS"] = " ".join(self.browser_redirect_uris)
        if self.consent_redirect_uris:
            env["OAUTH_CONSENT_REDIRECT_URIS"] = " ".join(self.consent_redirect_uris)
        if self.accounts is not None:
            env["OAUTH_ACCOUNTS"] = json.dumps(self.accounts)
        for name in ("OAUTH_PRIVATE_KEY_JWT_CLIENTS", "OAUTH_TLS_CLIENT_AUTH_CLIENTS",
                     "OAUTH_MTLS_CERT", "OAUTH_MTLS_KEY", "OAUTH_MTLS_CA"):
            env.pop(name, None)
        if self.private_key_jwt_clients:
            env["OAUTH_PRIVATE_KEY_JWT_CLIENTS"] = json.dumps(self.private_key_jwt_clients)
        if self.tls_client_auth_clients:
            env["OAUTH_TLS_CLIENT_AUTH_CLIENTS"] = json.dumps(
                {cid: {"subject_dn": dn} for cid, dn in self.tls_client_auth_clients.items()})
        if self.mtls:
            env["OAUTH_MTLS_CERT"], env["OAUTH_MTLS_KEY"], env["OAUTH_MTLS_CA"] = self.mtls
        if self.debug:
            env["OAUTH_DEBUG"] = "1"
        else:
            env.pop("OAUTH_DEBUG", None)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="oidc-provider-", suffix=".stderr",
                                    dir=self.log_dir)
        os.close(fd)
        self.stderr_path = Path(name)
        self._stderr_file = open(self.stderr_path, "wb")
        self._report_dir = Path(tempfile.mkdtemp(prefix="oidc-report-"))
        self.proc = subprocess.Popen(
            [str(node), "--report-on-signal", "--report-signal=SIGUSR2", "--report-compact",
             f"--report-directory={self._report_dir}",
             str(SERVER_SCRIPT), str(self.requested_port), str(self.ttl)],
            cwd=OAUTH_DIR, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=self._stderr_file)
        _LIVE_PROVIDERS.add(self)
        try:
            self._port = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_report(self) -> str:
        """Ask a running node for its diagnostic report (SIGUSR2) and summarise it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return ""
        try:
            proc.send_signal(signal.SIGUSR2)
        except OSError:
            return ""
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            files = sorted(self._report_dir.glob("*.json"))
            if files:
                try:
                    report = json.loads(files[-1].read_text())
                except ValueError:
                    time.sleep(0.1)
                    continue
                js = report.get("javascriptStack", {})
                native = [f.get("symbol", "") for f in report.get("nativeStack", [])][:12]
                handles = [f"{h.get('type')}{' active' if h.get('is_active') else ''}"
                           for h in report.get("libuv", [])]
                return (f"node report: js stack: {js.get('message')!r} {js.get('stack', [])[:12]}\n"
                        f"native stack: {native}\nlibuv handles: {handles}")
            time.sleep(0.1)
        return "node report: none written within 3 s (the main thread is blocked)\n" + self._gdb_stacks()

    def _gdb_stacks(self) -> str:
        """Every thread's native stack of the running node, from gdb (when installed)."""
        gdb = shutil.which("gdb")
        if gdb is None or self.proc is None or self.proc.poll() is not None:
            return "gdb: not available"
        try:
            r = subprocess.run([gdb, "-p", str(self.proc.pid), "-batch", "-nx",
                                "-ex", "thread apply all bt 12"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"gdb: {e}"
        frames = [l for l in r.stdout.splitlines() if l.startswith(("Thread ", "#"))]
        return "gdb, all threads:\n" + "\n".join(frames[:120])

    def _wait_ready(self, timeout: float) -> int:
        lines: "queue.Queue[bytes | None]" = queue.Queue()
        stdout = self.proc.stdout

        def pump() -> None:  # keeps draining stdout so node can never block on it
            try:
                for line in iter(stdout.readline, b""):
                    lines.put(line)
            except (OSError, ValueError):
                pass
            lines.put(None)

        threading.Thread(target=pump, name=f"oidc-stdout-{self.proc.pid}", daemon=True).start()
        # Every round reads what node printed BEFORE the deadline is looked at: a READY line
        # that is already in the pipe always counts, however late this loop gets to it.
        deadline = StartupDeadline(timeout, max_round=_READY_POLL_S + STALL_SLACK_S)
        seen: list[str] = []
        while True:
            try:
                line = lines.get(timeout=_READY_POLL_S)
            except queue.Empty:
                line = b""
            if line is None:  # EOF: node is exiting (or closed its stdout)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise self._start_error("oidc-provider exited before READY", lines, seen, deadline)
            if line:
                text = line.decode(errors="replace").strip()
                seen.append(text)
                parts = text.split()
                if len(parts) == 2 and parts[0] == "MTLS" and parts[1].isdigit():
                    self._mtls_port = int(parts[1])
                if len(parts) == 2 and parts[0] == "READY" and parts[1].isdigit():
                    return int(parts[1])
            elif self.proc.poll() is not None and lines.empty():
                raise self._start_error("oidc-provider exited before READY", lines, seen, deadline)
            if deadline.expired():
                raise self._start_error(f"oidc-provider not READY after {timeout:g}s",
                                        lines, seen, deadline, report=self._node_report())

    def _start_error(self, what: str, lines: "queue.Queue[bytes | None]", seen: list[str],
                     deadline: StartupDeadline, report: str = "") -> OidcStartError:
        """Stop node, THEN describe the failure: its state while we waited, how it ended,
        everything it printed on stdout (read to EOF) and its stderr, complete by then."""
        proc = self.proc
        waited = deadline.describe()
        state = proc_summary(proc.pid) if proc.poll() is None else None
        ended = self._terminate()
        drain_until = time.monotonic() + 2.0  # the pump sees EOF once node is gone
        while (left := drain_until - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line.decode(errors="replace").strip())
        parts = [f"{what} (pid {proc.pid}; {waited})"]
        if state:
            parts.append(f"node while waited for: {state}")
        parts += [f"node {ended}", f"stdout: {seen!r}", self.diagnostics()]
        if report:
            parts.append(report)
        return OidcStartError("\n".join(parts))

    def _terminate(self, timeout: float = 5.0) -> str:
        """SIGTERM the pid, SIGKILL after `timeout`, reap it; says how it ended."""
        proc = self.proc
        if proc is None:
            return "not started"
        if proc.poll() is not None:
            return f"had exited: {_exit_text(proc.returncode)}"
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
            return f"stopped by SIGTERM: {_exit_text(proc.returncode)}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
            return f"ignored SIGTERM for {timeout:.0f}s, then SIGKILL: {_exit_text(proc.returncode)}"
        except ProcessLookupError:
            proc.wait(timeout=timeout)
            return f"had exited: {_exit_text(proc.returncode)}"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` (idempotent)."""
        proc = self.proc
        if proc is not None:
            self._terminate(timeout)
            if proc.stdout:
                proc.stdout.close()
            assert not pid_alive(proc.pid), f"oidc-provider pid {proc.pid} survived stop()"
        report_dir = getattr(self, "_report_dir", None)
        if report_dir is not None:
            shutil.rmtree(report_dir, ignore_errors=True)
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
            # An empty stderr file in the temp dir is noise; anything written is kept.
            if self.log_dir is None and self.stderr_path is not None:
                try:
                    if self.stderr_path.stat().st_size == 0:
                        self.stderr_path.unlink()
                except OSError:
                    pass
        _LIVE_PROVIDERS.discard(self)

    def __enter__(self) -> "OidcProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def diagnostics(self, lines: int = 60) -> str:
        """The tail of node's stderr."""
        if not self.stderr_path:
            return "stderr: <not started>"
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError as e:
            return f"stderr: <{self.stderr_path} unreadable: {e}>"
        if not text:
            return "stderr: <empty>"
        return f"stderr ({self.stderr_path}):\n" + "\n".join(text.splitlines()[-lines:])

    # -- addresses
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OidcProvider not started")
        return self._port

    @property
    def issuer(self) -> str:
        """http://127.0.0.1:<port> (no trailing slash): the `iss` of its tokens."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def mtls_port(self) -> int:
        """The HTTPS (client certificate) port (only with ``mtls``)."""
        if self._mtls_port is None:
            raise RuntimeError("OidcProvider has no mTLS port (start it with mtls=...)")
        return self._mtls_port

    @property
    def mtls_url(self) -> str:
        return f"https://{LOOPBACK}:{self.mtls_port}"

    @property
    def mtls_token_url(self) -> str:
        """https://127.0.0.1:<mtls_port>/token: the token endpoint over mutual TLS."""
        return self.mtls_url + "/token"

    url = issuer

    @property
    def token_path(self) -> str:
        return "/token"

    @property
    def token_url(self) -> str:
        return self.issuer + "/token"

    @property
    def introspection_url(self) -> str:
        return self.issuer + "/token/introspection"

    @property
    def revocation_url(self) -> str:
        return self.issuer + "/token/revocation"

    @property
    def jwks_url(self) -> str:
        return self.issuer + "/jwks"

    @property
    def authorization_endpoint(self) -> str:
        return self.issuer + "/auth"

    def authorization_url(self, *, redirect_uri: str, state: str, code_challenge: str | None,
                          scope: str | None = CONSENT_SCOPE, client_id: str = CONSENT_CLIENT_ID,
                          code_challenge_method: str | None = "S256", **extra: Any) -> str:
        """An authorization-code request URL, built as latchkey's login answer builds it
        (response_type=code, client_id, redirect_uri, scope, state, PKCE; `extra` params
        appended, None values left out)."""
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                  "scope": scope, "state": state, "code_challenge": code_challenge,
                  "code_challenge_method": code_challenge_method if code_challenge else None,
                  **extra}
        return self.authorization_endpoint + "?" + _form_encode(params)

    # -- HTTP helpers
    def _get_json(self, path: str) -> Any:
        resp = http_request(self.port, "GET", path, timeout=10)
        if resp.status != 200:
            raise RuntimeError(f"GET {path} -> {resp.status} {resp.body[:300]!r}")
        return resp.json()

    def _post_json(self, path: str, payload: Any = None) -> Any:
        body = json.dumps(payload if payload is not None else {})
        resp = http_request(self.port, "POST", path, timeout=10,
                            headers={"Content-Type": "application/json"}, body=body)
        if resp.status != 200:
            raise RuntimeError(f"POST {path} -> {resp.status} {resp.body[:300]!r}")
        return resp.json()

    def discovery(self) -> dict[str, Any]:
        return self._get_json("/.well-known/openid-configuration")

    def jwks(self) -> dict[str, Any]:
        """Its JWKS (RS256 signing key, fresh per process)."""
        return self._get_json("/jwks")

    def jwks_json(self) -> str:
        """The JWKS as a JSON string (e.g. for an Envoy jwt_authn local_jwks)."""
        return json.dumps(self.jwks())

    def stats(self) -> dict[str, Any]:
        """Token-endpoint counts: {token_requests, by_grant_type, ok_by_grant_type, errors,
        by_status, introspection_requests, revocation_requests}."""
        return self._get_json("/__test/stats")

    def token_request_count(self, grant_type: str | None = None, ok_only: bool = False) -> int:
        s = self.stats()
        if grant_type is None:
            return sum(s["ok_by_grant_type"].values()) if ok_only else s["token_requests"]
        return s["ok_by_grant_type" if ok_only else "by_grant_type"].get(grant_type, 0)

    def last_token_requests(self, n: int | None = None) -> list[dict[str, Any]]:
        """The last `n` (default all kept) token requests, oldest first: {time, method, path,
        headers: [[name, value]...], form: {field: value}, grant_type, client_id, status,
        error, id_token, tls}. `form` is the parsed body (secrets included: test-only);
        `id_token` is the ID token the answer carried, or None; `tls` None on the plain
        port, else {authorized, subject, fingerprint256, port} of the client certificate
        (subject None without one)."""
        return self._get_json("/__test/token-requests" + (f"?n={int(n)}" if n is not None else ""))

    def last_revocation_requests(self, n: int | None = None) -> list[dict[str, Any]]:
        """The last `n` (default all kept) RFC 7009 revocation requests, oldest first:
        {time, method, path, headers, form, client_id, status, error} (as token requests)."""
        return self._get_json("/__test/revocation-requests" + (f"?n={int(n)}" if n is not None else ""))

    def wait_for_token_requests(self, count: int, grant_type: str | None = None,
                                timeout: float = 10.0) -> int:
        """Wait until at least `count` token requests (of `grant_type`) arrived."""
        wait_until(lambda: self.token_request_count(grant_type) >= count, timeout,
                   message=f"{count} token request(s) at oidc-provider")
        return self.token_request_count(grant_type)

    def reset_stats(self) -> None:
        """Zero the counts and forget recorded requests."""
        self._post_json("/__test/reset")

    def mint_refresh_token(self, client_id: str = "gw-basic", account_id: str = REFRESH_ACCOUNT,
                           scope: str = REFRESH_SCOPE, resource: str = DEFAULT_RESOURCE) -> str:
        """A pre-consented refresh token (Grant + RefreshToken made by oidc-provider's own
        models) as a gateway would hold it. Refreshing it yields JWT access tokens for
        `resource` with sub=`account_id` (plus an id_token while `openid` is in scope)."""
        return self._post_json("/__test/refresh-token", {
            "client_id": client_id, "account_id": account_id, "scope": scope,
            "resource": resource})["refresh_token"]

    def set_subject_jwks(self, jwks: dict | str | None) -> None:
        """Verify token-exchange subject tokens against `jwks` (dict or JSON) from now on
        (None: decode only)."""
        if isinstance(jwks, str):
            jwks = json.loads(jwks)
        self._post_json("/__test/subject-jwks", jwks or {})

    def token_request(self, form: dict[str, Any], client_id: str | None = "gw-basic",
                      secret: str | None = None, auth: str | None = None,
                      headers: dict[str, str] | None = None) -> TokenResponse:
        """POST form to /token, authenticating as `client_id` (secret from CLIENTS unless
        given) with its registered method, or `auth` = "basic" | "post" | "none"."""
        fields = dict(form)
        hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if client_id is not None:
            secret = client_secret(client_id) if secret is None else secret
            method = auth or ("post" if CLIENT_AUTH_METHODS.get(client_id) == "client_secret_post"
                              else "basic")
            if method == "basic":
                hdrs["Authorization"] = basic_auth_header(client_id, secret)
            elif method == "post":
                fields = {"client_id": client_id, "client_secret": secret, **fields}
            elif method != "none":
                raise ValueError(f"unknown auth {method!r}")
        resp = http_request(self.port, "POST", "/token", headers=hdrs, body=_form_encode(fields),
                            timeout=10)
        try:
            body = resp.json()
        except ValueError:
            body = {"_raw": resp.body.decode(errors="replace")}
        return TokenResponse(resp.status, body, resp.headers)

    def client_credentials(self, client_id: str = "gw-basic", scope: str | None = "orders.read",
                           **form: Any) -> TokenResponse:
        return self.token_request({"grant_type": "client_credentials", "scope": scope, **form},
                                  client_id)

    def refresh(self, refresh_token: str, client_id: str = "gw-basic", **form: Any) -> TokenResponse:
        return self.token_request({"grant_type": "refresh_token",
                                   "refresh_token": refresh_token, **form}, client_id)

    def redeem_code(self, code: str, redirect_uri: str, code_verifier: str | None,
                    client_id: str = CONSENT_CLIENT_ID, **form: Any) -> TokenResponse:
        """grant_type=authorization_code (code_verifier None: left out)."""
        return self.token_request({"grant_type": "authorization_code", "code": code,
                                   "redirect_uri": redirect_uri, "code_verifier": code_verifier,
                                   **form}, client_id)

    def revoke(self, token: str, client_id: str = CONSENT_CLIENT_ID,
               token_type_hint: str | None = "refresh_token", secret: str | None = None) -> int:
        """RFC 7009 revocation as `client_id` (its registered authentication); the status
        (200 also for an unknown token, as the RFC says)."""
        secret = client_secret(client_id) if secret is None else secret
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
        fields: dict[str, Any] = {"token": token, "token_type_hint": token_type_hint}
        if CLIENT_AUTH_METHODS.get(client_id) == "client_secret_post":
            fields = {"client_id": client_id, "client_secret": secret, **fields}
        else:
            hdrs["Authorization"] = basic_auth_header(client_id, secret)
        resp = http_request(self.port, "POST", "/token/revocation", headers=hdrs,
                            body=_form_encode(fields), timeout=10)
        return resp.status

    def exchange(self, subject_token: str, client_id: str = "gw-basic",
                 subject_token_type: str = TOKEN_TYPE_JWT, **form: Any) -> TokenResponse:
        return self.token_request({"grant_type": TOKEN_EXCHANGE_GRANT,
                                   "subject_token": subject_token,
                                   "subject_token_type": subject_token_type, **form}, client_id)

    def introspect(self, token: str, client_id: str = "gw-basic",
                   secret: str | None = None) -> dict[str, Any]:
        """RFC 7662 introspection of an opaque access token or a refresh token. (JWT access
        tokens are not stored: oidc-provider answers 400 unsupported_token_type for them.)"""
        secret = client_secret(client_id) if secret is None else secret
        resp = http_request(self.port, "POST", "/token/introspection",
                            headers={"Content-Type": "application/x-www-form-urlencoded",
                                     "Authorization": basic_auth_header(client_id, secret)},
                            body=_form_encode({"token": token}), timeout=10)
        body = resp.json()
        if resp.status != 200:
            raise RuntimeError(f"introspection -> {resp.status} {body}")
        return body

    def verify_access_token(self, token: str, audience: str | None = DEFAULT_RESOURCE,
                            leeway: float = 0) -> dict[str, Any]:
        """Verify a JWT access token against this server's JWKS (RS256 signature, `exp`,
        `iss`, and `aud` unless audience=None); return its claims. Raises jwt.PyJWTError."""
        header = jwt.get_unverified_header(token)
        keys = [k for k in self.jwks()["keys"] if k.get("kid") == header.get("kid")]
        if not keys:
            raise jwt.InvalidKeyError(f"no JWKS key with kid {header.get('kid')!r}")
        key = jwt.PyJWK(keys[0]).key
        return jwt.decode(token, key, algorithms=["RS256"], issuer=self.issuer,
                          audience=audience, leeway=leeway,
                          options={"require": ["exp", "iat", "iss", "sub"],
                                   "verify_aud": audience is not None})


# --------------------------------------------------------------------------- the fake server


@dataclasses.dataclass(frozen=True)
class FaultMode:
    """How FaultTokenServer answers. Defaults = a well-behaved token endpoint.

    delay_s            sleep this long before acting (capped at 120 s; stop() cuts it short)
    status             answer this HTTP status with `body` (default b"fault <status>", text)
    body               body for `status` (bytes / str / dict as JSON)
    error_json         400 + {"error": <code>, "error_description": ...} (RFC 6749 §5.2);
                       True means "invalid_client"; `status` overrides the 400
    garbage            200 + a non-JSON body
    missing_token      200 JSON without access_token
    wrong_type         token_type "mac" (or the string given) instead of "Bearer"
    huge               200 + a valid JSON token response padded to exactly this many bytes
    no_expires_in      omit expires_in
    expires_in_string  expires_in as a JSON string ("3600")
    ttl                expires_in value (None: the server's ttl)
    token_prefix       access_token prefix (None: the server's, "fake-")
    rotate_refresh     include refresh_token "rt-<n>"
    close              read the request, then close the connection without any answer
    times              apply this mode to the next `times` requests, then revert to default
    """

    delay_s: float = 0.0
    status: int | None = None
    body: bytes | str | dict | None = None
    error_json: bool | str = False
    garbage: bool = False
    missing_token: bool = False
    wrong_type: bool | str = False
    huge: int = 0
    no_expires_in: bool = False
    expires_in_string: bool = False
    ttl: int | None = None
    token_prefix: str | None = None
    rotate_refresh: bool = False
    close: bool = False
    times: int | None = None


class FaultRequest(NamedTuple):
    """One request as FaultTokenServer received it (header values latin-1 decoded)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    form: dict[str, str]              # first value per field
    form_all: dict[str, list[str]]
    at: float                         # time.monotonic() on arrival

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def basic_auth(self) -> tuple[str, str] | None:
        """(client_id, secret) from an Authorization: Basic header (RFC 6749 §2.3.1 decoding)."""
        value = self.header("Authorization") or ""
        scheme, _, cred = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            raw = base64.b64decode(cred.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        cid, sep, secret = raw.partition(":")
        if not sep:
            return None
        return urllib.parse.unquote_plus(cid), urllib.parse.unquote_plus(secret)


class FaultTokenServer:
    """A FAKE OAuth2 token endpoint, used ONLY to inject faults that a real server
    (OidcProvider) won't produce on demand: delays, 5xx, RFC 6749 error JSON, non-JSON or
    huge bodies, missing/odd fields, dropped connections. It authenticates nobody and
    checks nothing; use OidcProvider for protocol correctness.

    ThreadingHTTPServer (HTTP/1.1, keep-alive) on 127.0.0.1. `path` (default "/token", None
    = any path) answers POST; other paths/methods get 404/405 (recorded too). By default:
    200 {"access_token": "<prefix><n>", "token_type": "Bearer", "expires_in": ttl} with n
    counting issued tokens from 1. Every request is recorded (thread-safe):
    requests(), count(), clear(), wait_for_count(). set_mode(...) changes the behaviour
    (see FaultMode) at any time, from any thread.
    """

    def __init__(self, path: str | None = "/token", ttl: int = 3600, token_prefix: str = "fake-",
                 port: int = 0):
        self.path = path
        self.ttl = int(ttl)
        self.token_prefix = token_prefix
        self._lock = threading.Lock()
        self._log = RequestLog("fault token server")
        self._mode = FaultMode()
        self._mode_left: int | None = None
        self._issued = 0
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server = BacklogHTTPServer((LOOPBACK, port), self._make_handler())
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle
    @property
    def port(self) -> int:
        """The bound port (still known after stop(): then nothing listens there)."""
        return self._port

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port><path> (path "/token" when any path is accepted)."""
        return f"http://{LOOPBACK}:{self._port}{self.path or '/token'}"

    def start(self) -> "FaultTokenServer":
        if self._closed:
            raise RuntimeError("FaultTokenServer cannot be restarted; make a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name=f"fault-token-{self._port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (idempotent). The port is then
        closed: connections to it are refused (unless something else grabs it)."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        if not self._closed:
            self._server.server_close()
            self._closed = True
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "FaultTokenServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- behaviour
    def set_mode(self, **kwargs: Any) -> FaultMode:
        """Replace the mode: FaultMode(**kwargs) (unnamed fields back to defaults)."""
        mode = FaultMode(**kwargs)
        if mode.delay_s < 0 or mode.delay_s > MAX_DELAY_S:
            raise ValueError(f"delay_s must be within 0..{MAX_DELAY_S}")
        if mode.huge < 0:
            raise ValueError("huge must be >= 0")
        with self._lock:
            self._mode = mode
            self._mode_left = mode.times
        return mode

    def update_mode(self, **kwargs: Any) -> FaultMode:
        """Change only the named fields of the current mode."""
        with self._lock:
            fields = dataclasses.asdict(self._mode)
        fields.update(kwargs)
        return self.set_mode(**fields)

    def reset_mode(self) -> None:
        """Back to well-behaved."""
        self.set_mode()

    def mode(self) -> FaultMode:
        with self._lock:
            return self._mode

    @property
    def issued(self) -> int:
        """How many access tokens were issued (the last n)."""
        with self._lock:
            return self._issued

    # -- recorded requests
    def requests(self) -> list[FaultRequest]:
        return self._log.all()

    def count(self) -> int:
        return self._log.count()

    def last(self) -> FaultRequest:
        return self._log.last()

    def clear(self) -> None:
        """Forget recorded requests (mode and token counter stay)."""
        self._log.clear()

    def wait_for_count(self, count: int, timeout: float = 10.0) -> list[FaultRequest]:
        return self._log.wait_for(count, timeout)

    # -- internals
    def _take_mode(self) -> FaultMode:
        """The mode for one request (counts down `times`)."""
        with self._lock:
            mode = self._mode
            if self._mode_left is not None:
                self._mode_left -= 1
                if self._mode_left <= 0:
                    self._mode = FaultMode()
                    self._mode_left = None
            return mode

    def _next_token(self, mode: FaultMode) -> tuple[int, str]:
        with self._lock:
            self._issued += 1
            n = self._issued
        prefix = self.token_prefix if mode.token_prefix is None else mode.token_prefix
        return n, f"{prefix}{n}"

    def _answer(self, mode: FaultMode) -> tuple[int, bytes, str]:
        """(status, body, content type) for a request to the token path, or (-1, ...) to drop."""
        if mode.close:
            return -1, b"", ""
        if mode.error_json:
            code = mode.error_json if isinstance(mode.error_json, str) else "invalid_client"
            body = {"error": code, "error_description": f"injected {code} fault"}
            return mode.status or 400, json.dumps(body).encode(), "application/json"
        if mode.status is not None:
            body = mode.body
            ctype = "text/plain"
            if body is None:
                body = f"fault {mode.status}".encode()
            elif isinstance(body, dict):
                body, ctype = json.dumps(body).encode(), "application/json"
            elif isinstance(body, str):
                body = body.encode()
            return mode.status, body, ctype
        if mode.garbage:
            return 200, b"<html>this is not json {", "application/json"
        n, token = self._next_token(mode)
        ttl = self.ttl if mode.ttl is None else mode.ttl
        resp: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expires_in": ttl}
        if mode.missing_token:
            del resp["access_token"]
        if mode.wrong_type:
            resp["token_type"] = mode.wrong_type if isinstance(mode.wrong_type, str) else "mac"
        if mode.no_expires_in:
            del resp["expires_in"]
        elif mode.expires_in_string:
            resp["expires_in"] = str(ttl)
        if mode.rotate_refresh:
            resp["refresh_token"] = f"rt-{n}"
        body = json.dumps(resp).encode()
        if mode.huge:
            # still a valid token response; the padding field makes it exactly `huge` bytes
            resp["padding"] = ""
            base = len(json.dumps(resp, separators=(",", ":")).encode())
            resp["padding"] = "x" * max(0, mode.huge - base)
            body = json.dumps(resp, separators=(",", ":")).encode()
        return 200, body, "application/json"

    def _make_handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "latchkey-fault-token-server"
            timeout = 60  # idle keep-alive connections end eventually

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with server._lock:
                    server._conns.add(self.connection)

            def finish(self):
                with server._lock:
                    server._conns.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = bytearray()
                    while len(out) < (16 << 20):
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    return bytes(out)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(min(length, 16 << 20)) if length else b""

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self):
                body = self._read_body()
                form_all: dict[str, list[str]] = {}
                ctype = (self.headers.get("Content-Type") or "").lower()
                if not ctype or "x-www-form-urlencoded" in ctype:
                    try:
                        form_all = urllib.parse.parse_qs(body.decode("utf-8"),
                                                         keep_blank_values=True)
                    except UnicodeDecodeError:
                        form_all = {}
                headers = [(k, v) for k, v in self.headers.items()]
                rec = FaultRequest(self.command, self.path, headers, body,
                                   {k: v[0] for k, v in form_all.items()}, form_all,
                                   time.monotonic())
                server._log.append(rec)
                path_only = self.path.split("?", 1)[0]
                if server.path is not None and path_only != server.path:
                    self._send(404, b'{"error":"not_found"}', "application/json")
                    return
                if self.command != "POST":
                    self._send(405, b'{"error":"method_not_allowed"}', "application/json")
                    return
                mode = server._take_mode()
                if mode.delay_s > 0:
                    server._stopping.wait(min(mode.delay_s, MAX_DELAY_S))
                    if server._stopping.is_set():
                        self.close_connection = True
                        return
                status, payload, ctype = server._answer(mode)
                if status < 0:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self._send(status, payload, ctype)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        return Handler


# --------------------------------------------------------------------------- federated credentials

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"


@dataclasses.dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential of an app registration, as Entra ID holds it:
    an assertion from `issuer` about `subject`, for `audience`, authenticates the app."""

    client_id: str
    issuer: str
    subject: str
    audience: str = FEDERATION_AUDIENCE
    name: str = "latchkey-gateway"


class FederatedRequest(NamedTuple):
    """One request as FederatedCredentialServer received it, and what it decided.

    `form` holds the assertion as sent (test-only); `header` and `claims` are the
    assertion's, decoded without verification (None when it wasn't a JWT); `verified`
    says whether its signature, issuer, audience, subject and lifetime all passed."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    form: dict[str, str]
    status: int
    error: str | None
    error_code: int | None          # the AADSTS number of a refusal
    header: dict[str, Any] | None
    claims: dict[str, Any] | None
    verified: bool
    access_token: str | None
    at: float

    def get(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class FederatedCredentialServer:
    """A FAKE Microsoft Entra ID token endpoint (v2.0, client credentials) that checks a
    client assertion against the app's federated identity credentials: Entra workload
    identity federation with a managed identity as the credential (SPEC v1.2,
    ``auth_method: client_assertion``).

    It stands in for Entra's federated-credential check because no real server here can do
    it: oidc-provider (the real server the other tests use) authenticates a
    ``private_key_jwt`` client only with an assertion whose ``iss`` and ``sub`` equal the
    client_id and whose ``aud`` is its own issuer or token endpoint, signed by a key
    registered for that client. A federated assertion is none of that: a managed identity's
    token, issued by the tenant (``iss`` https://login.microsoftonline.com/<tenant>/v2.0),
    about the identity (``sub`` = its object id), for ``api://AzureADTokenExchange``, used
    by an app whose client_id is neither. So this server does what Entra documents:

    ``POST /<tenant>/oauth2/v2.0/token`` (form) with ``grant_type=client_credentials``,
    ``client_id``, ``client_assertion_type`` = jwt-bearer, ``client_assertion`` and a
    ``scope`` ending in ``/.default``. The assertion's signature is verified (RS256/ES256...)
    against the issuer's JWKS (`jwks`: a dict, or a callable giving one, e.g. the IMDS
    stand-in's ``jwks``, so a key rotation is followed), its ``exp``/``nbf``/``iat``
    checked, and (``iss``, ``sub``, ``aud``) must match a FederatedCredential registered
    for ``client_id`` (``add_credential``). Then 200 ``{"token_type": "Bearer",
    "expires_in", "ext_expires_in", "access_token"}`` (an opaque random token, recorded in
    ``issued``). Refusals in Entra's shape (``error``, ``error_description`` starting
    "AADSTS<n>: ", ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``), codes as
    Entra documents them: 700016 unknown app (400 unauthorized_client), 70021 no matching
    federated identity record (400 invalid_client), 700024 assertion outside its valid time
    (400 invalid_client), 700027 / 5002727 bad signature or assertion (401 invalid_client),
    900144 a missing parameter, 1002012 scope without /.default, 7000218 neither assertion
    nor secret, 70011 invalid scope; the message wording is the stand-in's approximation.
    A ``client_secret`` is refused (7000215) and recorded: a test can see none was sent.

    Every request is recorded (``requests()``), with the assertion decoded.
    """

    def __init__(self, jwks: Any, *, tenant_id: str | None = None, ttl: int = 3599,
                 port: int = 0, leeway_s: int = 60):
        import uuid  # noqa: PLC0415
        self._jwks = jwks
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.ttl = int(ttl)
        self.leeway_s = int(leeway_s)
        self._lock = threading.Lock()
        self._credentials: list[FederatedCredential] = []
        self._apps: set[str] = set()
        self._issued: list[tuple[str, str]] = []   # (client_id, access token)
        self._log = RequestLog("federated-credential token server")
        self._server = BacklogHTTPServer((LOOPBACK, port), self._make_handler())
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle
    @property
    def port(self) -> int:
        return self._port

    @property
    def token_path(self) -> str:
        return f"/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def token_url(self) -> str:
        return f"http://{LOOPBACK}:{self._port}{self.token_path}"

    def start(self) -> "FederatedCredentialServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            kwargs={"poll_interval": 0.1},
                                            name=f"federated-{self._port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> "FederatedCredentialServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- registrations
    def add_app(self, client_id: str) -> None:
        """An app registration with no federated credential (yet)."""
        with self._lock:
            self._apps.add(client_id)

    def add_credential(self, client_id: str, issuer: str, subject: str,
                       audience: str = FEDERATION_AUDIENCE) -> FederatedCredential:
        cred = FederatedCredential(client_id, issuer, subject, audience)
        with self._lock:
            self._apps.add(client_id)
            self._credentials.append(cred)
        return cred

    def remove_credentials(self, client_id: str) -> None:
        with self._lock:
            self._credentials = [c for c in self._credentials if c.client_id != client_id]

    # -- records
    def requests(self) -> list[FederatedRequest]:
        return self._log.all()

    def count(self) -> int:
        return self._log.count()

    def last(self) -> FederatedRequest:
        return self._log.last()

    def clear(self) -> None:
        self._log.clear()

    def wait_for_count(self, count: int, timeout: float = 10.0) -> list[FederatedRequest]:
        return self._log.wait_for(count, timeout)

    def issued(self) -> list[tuple[str, str]]:
        """(client_id, access token) of every token it issued, oldest first."""
        with self._lock:
            return list(self._issued)

    # -- protocol
    def _keys(self) -> dict[str, Any]:
        return self._jwks() if callable(self._jwks) else self._jwks

    def _refuse(self, status: int, error: str, code: int, text: str) -> tuple[int, dict[str, Any]]:
        import uuid  # noqa: PLC0415
        return status, {"error": error, "error_description": f"AADSTS{code}: {text}",
                        "error_codes": [code],
                        "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                        "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())}

    def _decide(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any], bool]:
        """(status, answer, assertion verified)."""
        if path != self.token_path:
            return 404, {"error": "not_found"}, False
        for field in ("grant_type", "client_id"):
            if not form.get(field):
                return (*self._refuse(400, "invalid_request", 900144,
                                      f"The request body must contain the following parameter: '{field}'."), False)
        if form["grant_type"] != "client_credentials":
            return (*self._refuse(400, "unsupported_grant_type", 70003,
                                  "The app requested an unsupported grant type."), False)
        scope = form.get("scope", "")
        if not scope:
            return (*self._refuse(400, "invalid_request", 900144,
                                  "The request body must contain the following parameter: 'scope'."), False)
        if not all(s.endswith("/.default") for s in scope.split()):
            return (*self._refuse(400, "invalid_scope", 1002012,
                                  f"The provided value for scope {scope} is not valid. Client credential "
                                  "flows must have a scope value with /.default suffixed to the resource "
                                  "identifier (application ID URI)."), False)
        client_id = form["client_id"]
        with self._lock:
            known = client_id in self._apps
            creds = [c for c in self._credentials if c.client_id == client_id]
        if not known:
            return (*self._refuse(400, "unauthorized_client", 700016,
                                  f"Application with identifier '{client_id}' was not found in the "
                                  "directory."), False)
        if "client_secret" in form:
            return (*self._refuse(401, "invalid_client", 7000215,
                                  "Invalid client secret provided."), False)
        assertion = form.get("client_assertion")
        if not assertion:
            return (*self._refuse(401, "invalid_client", 7000218,
                                  "The request body must contain the following parameter: "
                                  "'client_assertion' or 'client_secret'."), False)
        if form.get("client_assertion_type") != JWT_BEARER_ASSERTION:
            return (*self._refuse(400, "invalid_request", 900144,
                                  "The request body must contain the following parameter: "
                                  "'client_assertion_type'."), False)
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return (*self._refuse(401, "invalid_client", 5002727,
                                  "Client assertion is not a valid JWT."), False)
        keys = [k for k in self._keys().get("keys", []) if k.get("kid") == header.get("kid")]
        if not keys:
            return (*self._refuse(401, "invalid_client", 700027,
                                  "Client assertion failed signature validation: no key "
                                  f"'{header.get('kid')}' at the issuer."), False)
        try:
            jwt.decode(assertion, jwt.PyJWK(keys[0]).key,
                       algorithms=["RS256", "RS384", "RS512", "PS256", "ES256", "ES384"],
                       options={"verify_aud": False, "require": ["exp", "iat", "iss", "sub", "aud"]},
                       leeway=self.leeway_s)
        except jwt.ExpiredSignatureError:
            return (*self._refuse(400, "invalid_client", 700024,
                                  "Client assertion is not within its valid time range."), False)
        except jwt.ImmatureSignatureError:
            return (*self._refuse(400, "invalid_client", 700024,
                                  "Client assertion is not within its valid time range."), False)
        except jwt.PyJWTError as e:
            return (*self._refuse(401, "invalid_client", 700027,
                                  f"Client assertion failed signature validation: {e}."), False)
        auds = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        match = any(c.issuer == claims["iss"] and c.subject == claims["sub"] and c.audience in auds
                    for c in creds)
        if not match:
            return (*self._refuse(400, "invalid_client", 70021,
                                  "No matching federated identity record found for presented assertion. "
                                  f"Assertion Issuer: '{claims['iss']}'. Assertion Subject: "
                                  f"'{claims['sub']}'. Assertion Audience: '{','.join(auds)}'."), True)
        token = "entra-" + base64.urlsafe_b64encode(os.urandom(24)).rstrip(b"=").decode()
        with self._lock:
            self._issued.append((client_id, token))
        return 200, {"token_type": "Bearer", "expires_in": self.ttl, "ext_expires_in": self.ttl,
                     "access_token": token}, True

    def _make_handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "latchkey-federated-credential-stand-in"
            timeout = 60

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 20)) if length else b""
                try:
                    form = {k: v[0] for k, v in urllib.parse.parse_qs(
                        body.decode("utf-8"), keep_blank_values=True).items()}
                except UnicodeDecodeError:
                    form = {}
                path = self.path.split("?", 1)[0]
                status, answer, verified = server._decide(path, form)
                header = claims = None
                if form.get("client_assertion"):
                    try:
                        header = jwt.get_unverified_header(form["client_assertion"])
                        claims = jwt.decode(form["client_assertion"], options={"verify_signature": False})
                    except jwt.PyJWTError:
                        pass
                server._log.append(FederatedRequest(
                    self.command, self.path, list(self.headers.items()), form, status,
                    answer.get("error"), (answer.get("error_codes") or [None])[0], header, claims,
                    verified, answer.get("access_token"), time.monotonic()))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Cache-Control", "no-store, no-cache")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                data = b'{"error":"not_found"}'
                self.send_response(404 if self.path.split("?", 1)[0] != "/" else 405)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
