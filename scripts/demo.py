#!/usr/bin/env python3
"""The latchkey demo behind `make run`.

Starts, all on 127.0.0.1: an echo upstream (it answers with the request it got, as
JSON), OpenBao (the Vault-compatible secret store, in dev mode) holding the partner API
key and the Transit key gw-basic signs its client assertions with, oidc-provider (a real
OAuth server, tests/oauth) as the token server, with client gw-basic registered for
private_key_jwt with that key's public JWK, and Envoy 1.40 running envoy/demo.yaml with
the freshly built latchkey module.
Mints demo JWTs with envoy/demo/demo-signing-key.pem (a key for this demo only),
prints curl lines to try, and runs until Ctrl-C, then stops everything it started.

`--self-test` runs the same requests itself, checks the answers and exits (the
integration tests use it with free ports).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jwt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Upstream, http_request  # noqa: E402
from token_servers import OidcProvider  # noqa: E402
from secret_stores import OpenBao  # noqa: E402

DEMO_CONFIG = REPO / "envoy" / "demo.yaml"
DEMO_KEY = REPO / "envoy" / "demo" / "demo-signing-key.pem"
WASM_PLACEHOLDER = "/opt/latchkey/latchkey.wasm"
DEFAULT_PORTS = {"listen": 10000, "admin": 9901, "upstream": 18080, "idp": 18081,
                 "vault": 18200}
VAULT_ROOT = "demo-vault-root-token"  # envoy/demo.yaml's VAULT_TOKEN
# The OAuth client of provider orders_idp authenticates with private_key_jwt: OpenBao's
# Transit key TRANSIT_KEY signs its assertions (ES256), with TRANSIT_TOKEN (envoy/demo.yaml's
# TRANSIT_TOKEN), a token whose only policy is `update` on transit/sign/<key>/*.
CLIENT_ID = "gw-basic"
TRANSIT_KEY = "gw-basic"
TRANSIT_TOKEN = "demo-transit-sign-token"
TRANSIT_POLICY = f"transit-sign-{TRANSIT_KEY}"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PARTNER_KEY = "demo-partner-key-7f3a"
ROTATED_KEY = "demo-partner-key-rotated-2b9e"


def mint(sub: str, groups: list[str]) -> str:
    now = int(time.time())
    claims = {"iss": "https://demo.latchkey.local", "aud": "latchkey-demo", "sub": sub,
              "groups": groups, "iat": now, "exp": now + 12 * 3600}
    return jwt.encode(claims, DEMO_KEY.read_bytes(), algorithm="RS256",
                      headers={"kid": "latchkey-demo"})


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def render(wasm: Path, ports: dict[str, int], out: Path) -> None:
    text = DEMO_CONFIG.read_text().replace(WASM_PLACEHOLDER, str(wasm.resolve()))
    for name, default in DEFAULT_PORTS.items():
        text = text.replace(f"port_value: {default} ", f"port_value: {ports[name]} ")
    text = text.replace("http://127.0.0.1:18200", f"http://127.0.0.1:{ports['vault']}")
    # The browser follows these two: the IdP's and latchkey's own addresses must be real.
    text = text.replace("http://127.0.0.1:18081", f"http://127.0.0.1:{ports['idp']}")
    text = text.replace("http://127.0.0.1:10000/", f"http://127.0.0.1:{ports['listen']}/")
    out.write_text(text)


def wait_ready(admin: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"Envoy exited with {proc.returncode}; see its output above")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit("Envoy was not ready within 30 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rotate_command(ports: dict[str, int]) -> str:
    return (f"curl -s -H 'X-Vault-Token: {VAULT_ROOT}' "
            f"-d '{{\"data\": {{\"api_key\": \"{ROTATED_KEY}\"}}}}' "
            f"http://127.0.0.1:{ports['vault']}/v1/secret/data/partner")


def instructions(ports: dict[str, int], alice: str, bob: str) -> str:
    base = f"http://127.0.0.1:{ports['listen']}"
    return f"""
latchkey demo is up.  Envoy {base}  (admin http://127.0.0.1:{ports['admin']})
The echo upstream answers with the request it received, so you can see what latchkey
injected. Applications never hold the keys: Envoy's latchkey does.

  export ALICE='{alice}'   # groups: billing
  export BOB='{bob}'       # groups: support

1. API key into a header: alice (group billing) may use the partner connection
   curl -s -H "Authorization: Bearer $ALICE" {base}/partner/invoices | python3 -m json.tool

2. API key into the query: public route; the client's own appid is replaced
   curl -s "{base}/weather?city=Oslo&appid=mine" | python3 -m json.tool

3. No token on a route that needs one: 401
   curl -si {base}/partner/invoices

4. A token without the billing group: 403
   curl -si -H "Authorization: Bearer $BOB" {base}/partner/invoices

5. An OAuth2 token, fetched from the token server, cached and refreshed by latchkey
   curl -s -H "Authorization: Bearer $ALICE" {base}/orders/42 | python3 -m json.tool
   (run it twice: one token request, then the cached token)
   No client secret: latchkey fetches it with private_key_jwt, signed by OpenBao Transit.

6. Rotate the partner key in the secret store (OpenBao, http://127.0.0.1:{ports['vault']}):
   latchkey re-reads it every 5 s; the next requests carry the new key, no restart.
   {rotate_command(ports)}
   curl -s -H "Authorization: Bearer $ALICE" {base}/partner/invoices | grep -i x-api-key

8. Your own account (per-user consent): the token alice's requests carry is hers
   curl -s -H "Authorization: Bearer $ALICE" {base}/me/orders            # 403 consent_required
   curl -si -H "Authorization: Bearer $ALICE" {base}/.latchkey/connections/my_orders/login
   Open the 302's location in a browser, sign in as alice (any password), approve.
   The browser ends on {base}/.latchkey/callback?code=...: it carries no bearer
   token, so latchkey answers 401 there (in production a browser session in front,
   Envoy's oauth2 filter, does). Send that URL as alice yourself:
   curl -s -H "Authorization: Bearer $ALICE" '<the URL the browser ended on>'
   curl -s -H "Authorization: Bearer $ALICE" {base}/me/orders | python3 -m json.tool
   (the upstream gets alice's own token: sub "alice"; the refresh token is in OpenBao)
   curl -s -X DELETE -H "Authorization: Bearer $ALICE" {base}/.latchkey/connections/my_orders

9. What latchkey counted
   curl -s http://127.0.0.1:{ports['admin']}/stats | grep latchkey

Access-log lines (route, connection, decision) appear below. Ctrl-C stops everything.
"""


def seed_store(vault: OpenBao) -> dict:
    """The partner key, and the Transit key gw-basic signs with plus latchkey's sign-only
    token for it; returns the key's public JWK (kid: the key's name, latchkey's default)."""
    vault.kv_put("partner", {"api_key": PARTNER_KEY})
    vault.enable_transit()
    vault.transit_key(TRANSIT_KEY, "ecdsa-p256")
    vault.transit_sign_token(TRANSIT_KEY, policy=TRANSIT_POLICY, ttl="768h", token_id=TRANSIT_TOKEN)
    return vault.transit_jwk(TRANSIT_KEY)


def signed_by_transit(idp: OidcProvider, vault: OpenBao, jwk: dict) -> bool:
    """gw-basic's token requests carried a private_key_jwt assertion and no secret, the
    assertion verifies with the Transit key's public JWK, and OpenBao's audit log shows
    the sign calls, made with the sign-only token."""
    recs = [r for r in idp.last_token_requests() if r["form"].get("client_id") == CLIENT_ID
            or r["client_id"] == CLIENT_ID]
    if not recs:
        return False
    for rec in recs:
        form, headers = rec["form"], {k.lower() for k, _ in rec["headers"]}
        if (rec["status"] != 200 or "client_secret" in form or "authorization" in headers
                or form.get("client_assertion_type") != JWT_BEARER):
            return False
        try:
            jwt.decode(form.get("client_assertion", ""), jwt.PyJWK(jwk).key, algorithms=["ES256"],
                       audience=idp.token_url, issuer=CLIENT_ID)
        except jwt.PyJWTError:
            return False
    path = f"transit/sign/{TRANSIT_KEY}/sha2-256"
    try:
        signs = vault.wait_for_audit(len(recs), path, "update", timeout=5)
    except Exception:  # noqa: BLE001 - wait_until's timeout: reported as a FAIL
        return False
    return all(e["auth"]["policies"] == [TRANSIT_POLICY] for e in signs)


def self_test(ports: dict[str, int], alice: str, bob: str, idp: OidcProvider, vault: OpenBao,
              jwk: dict) -> list[str]:
    """The printed requests, checked. Returns the failures."""
    port = ports["listen"]
    failures = []

    def check(name, cond):
        print(("PASS " if cond else "FAIL ") + name, flush=True)
        if not cond:
            failures.append(name)

    r = http_request(port, "GET", "/partner/invoices", headers=[("authorization", f"Bearer {alice}")])
    echoed = json.loads(r.body) if r.status == 200 else {}
    headers = {k.lower(): v for k, v in echoed.get("headers", [])}
    check("header injection (key from the store)",
          r.status == 200 and headers.get("x-api-key") == PARTNER_KEY)
    r = http_request(port, "GET", "/weather?city=Oslo&appid=mine")
    echoed = json.loads(r.body) if r.status == 200 else {}
    check("query injection", echoed.get("path") == "/weather?city=Oslo&appid=demo-weather-key-19c2")
    r = http_request(port, "GET", "/partner/invoices")
    check("401 without a token", r.status == 401 and json.loads(r.body) ==
          {"error": "unauthenticated", "route": "partner"})
    r = http_request(port, "GET", "/partner/invoices", headers=[("authorization", f"Bearer {bob}")])
    check("403 without the group", r.status == 403 and json.loads(r.body) ==
          {"error": "forbidden", "route": "partner"})
    tokens = []
    for _ in range(2):
        r = http_request(port, "GET", "/orders/42", headers=[("authorization", f"Bearer {alice}")])
        echoed = json.loads(r.body) if r.status == 200 else {}
        headers = {k.lower(): v for k, v in echoed.get("headers", [])}
        tokens.append(headers.get("authorization", ""))
    check("oauth token injected and cached",
          tokens[0].startswith("Bearer ey") and tokens[0] == tokens[1] and tokens[0] != f"Bearer {alice}")
    check("oauth token fetched with private_key_jwt signed by OpenBao Transit",
          signed_by_transit(idp, vault, jwk))
    # The printed rotation command, then the next requests carry the new key.
    subprocess.run(rotate_command(ports), shell=True, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    seen = None
    while time.monotonic() < deadline and seen != ROTATED_KEY:
        r = http_request(port, "GET", "/partner/invoices", headers=[("authorization", f"Bearer {alice}")])
        echoed = json.loads(r.body) if r.status == 200 else {}
        seen = {k.lower(): v for k, v in echoed.get("headers", [])}.get("x-api-key")
        time.sleep(0.25)
    check("rotated key used with no restart", seen == ROTATED_KEY)
    # 8. Per-user consent, as the printed steps do it (the browser scripted hop by hop).
    from browser import Browser, consent_at_idp  # noqa: E402 - tests/integration
    me = [("authorization", f"Bearer {alice}")]
    r = http_request(port, "GET", "/me/orders", headers=me)
    check("consent_required before consent", r.status == 403
          and json.loads(r.body).get("login_url") == "/.latchkey/connections/my_orders/login")
    r = http_request(port, "GET", "/.latchkey/connections/my_orders/login", headers=me)
    callback = consent_at_idp(Browser(), r.header("location"), "alice") if r.status == 302 else ""
    parts = urllib.parse.urlsplit(callback)
    r = http_request(port, "GET", f"{parts.path}?{parts.query}", headers=me)
    check("consent stored", r.status == 200 and json.loads(r.body) == {"connected": "my_orders"})
    r = http_request(port, "GET", "/me/orders", headers=me)
    echoed = json.loads(r.body) if r.status == 200 else {}
    token = {k.lower(): v for k, v in echoed.get("headers", [])}.get("authorization", "")
    payload = token.split(".")[1] if token.count(".") == 2 else ""
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))) if payload else {}
    check("alice's own token injected", claims.get("sub") == "alice")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, required=True, help="the built latchkey.wasm")
    ap.add_argument("--envoy", type=Path, default=REPO / ".venv" / "bin" / "envoy")
    for name, default in DEFAULT_PORTS.items():
        ap.add_argument(f"--{name}", type=int, default=default, help=f"port (default {default})")
    ap.add_argument("--self-test", action="store_true", help="check the demo requests, then exit")
    args = ap.parse_args()
    ports = {name: getattr(args, name) for name in DEFAULT_PORTS}
    if not args.wasm.is_file():
        raise SystemExit(f"{args.wasm} not found: run `make build` first")
    busy = [f"{name} {p}" for name, p in ports.items() if not port_free(p)]
    if busy:
        raise SystemExit("ports in use on 127.0.0.1: " + ", ".join(busy)
                         + " (stop what uses them, or pass --listen/--admin/--upstream)")

    workdir = Path(tempfile.mkdtemp(prefix="latchkey-demo-"))
    config = workdir / "envoy.yaml"
    render(args.wasm, ports, config)
    alice, bob = mint("alice", ["billing"]), mint("bob", ["support"])

    with contextlib.ExitStack() as started:  # stops each server started, in reverse order
        try:
            upstream = Upstream(ports["upstream"]).start()
            started.callback(upstream.stop)
            # OpenBao first: the token server registers gw-basic with the Transit key's JWK.
            vault = OpenBao(port=ports["vault"], root_token=VAULT_ROOT)
            started.callback(vault.stop)
            vault.start()
            jwk = seed_store(vault)
            idp = OidcProvider(ttl=300, port=ports["idp"], consent_redirect_uris=[
                f"http://127.0.0.1:{ports['listen']}/.latchkey/callback"],
                private_key_jwt_clients={CLIENT_ID: {"jwks": {"keys": [jwk]}, "alg": "ES256"}})
            started.callback(idp.stop)
            idp.start()
            cmd = [str(args.envoy), "-c", str(config), "--concurrency", "2", "--base-id",
                   str(30000 + ports["admin"]), "--log-level", "warn"]
            out = subprocess.DEVNULL if args.self_test else None
            envoy = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None)
            started.callback(stop, envoy)
            wait_ready(ports["admin"], envoy)
            if args.self_test:
                failures = self_test(ports, alice, bob, idp, vault, jwk)
                print(f"{10 - len(failures)} passed, {len(failures)} failed")
                return 1 if failures else 0
            print(instructions(ports, alice, bob), flush=True)
            envoy.wait()
            print(f"Envoy exited with {envoy.returncode}", flush=True)
            return 1
        except KeyboardInterrupt:
            print("\nstopping Envoy, the token server, OpenBao and the echo upstream", flush=True)
            return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main())
