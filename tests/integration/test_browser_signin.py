"""Browser sign-in in front of latchkey (envoy/browser-signin.yaml, run as shipped).

Envoy's own oauth2 filter runs the authorization code flow with PKCE against a real
oidc-provider (tests/oauth/server.mjs with the gw-browser client, which oidc-provider is
told to refuse without PKCE); jwt_authn verifies the ID token the sign-in produced (the
oauth2 filter forwards it in x-id-token) and latchkey decides from its claims. The
browser is scripted here hop by hop: every redirect is followed by hand, cookies are kept
the way a browser keeps them (one jar for the host 127.0.0.1, all ports, with paths and
deletions), the IdP's login and consent forms are read from its HTML and posted
(browser.py).

The shipped file is rendered with this test's ports, the built module and SDS files for
its two secrets (write_oauth2_secrets, also used by test_configs.py); nothing else in it
changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from browser import Browser, Cookie, idp_flow, location, query
from harness import LOOPBACK, REPO_ROOT, Envoy, EnvoyStartError, Response, Upstream, free_port
from token_servers import BROWSER_CLIENT_ID, BROWSER_CLIENT_SECRET, OidcProvider

SHIPPED = REPO_ROOT / "envoy" / "browser-signin.yaml"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
PARTNER_KEY = "demo-partner-key-7d41"   # the demo-only value in the shipped file
ACCOUNTS = {"alice": {"groups": ["billing"]}, "bob": {"groups": ["support"]}}
CALLBACK = "/oauth2/callback"
# What Envoy logs when a wasm VM traps (as conftest.VM_FAILURE).
VM_FAILURE = re.compile(r"Uncaught RuntimeError|Wasm VM failed|failed: Uncaught|panicked at|Plugin configured to fail")


def write_oauth2_secrets(directory: Path, client_secret: str = BROWSER_CLIENT_SECRET,
                         hmac_secret: str | None = None) -> None:
    """The two SDS files envoy/browser-signin.yaml reads (token-secret.yaml, hmac-secret.yaml),
    each written atomically (a rename into the watched directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    hmac_secret = hmac_secret or base64.b64encode(os.urandom(32)).decode()
    for file, name, value in (("token-secret.yaml", "oauth2_client_secret", client_secret),
                              ("hmac-secret.yaml", "oauth2_hmac_secret", hmac_secret)):
        doc = {"resources": [{"@type": SECRET_TYPE, "name": name,
                              "generic_secret": {"secret": {"inline_string": value}}}]}
        tmp = directory / f".{file}.tmp"
        tmp.write_text(yaml.safe_dump(doc))
        os.replace(tmp, directory / file)


def render(*, wasm: Path, listen: int, admin: int, idp_port: int, upstream_port: int,
           secrets_dir: Path) -> dict[str, Any]:
    """envoy/browser-signin.yaml with this test's ports, module and secret files."""
    text = SHIPPED.read_text()
    for old, new, least in (("/opt/latchkey/latchkey.wasm", str(wasm), 1),
                            ("http://127.0.0.1:18081", f"http://127.0.0.1:{idp_port}", 4),
                            ("/etc/latchkey/oauth2", str(secrets_dir), 4)):
        assert text.count(old) >= least, f"{SHIPPED.name} no longer has {old!r}"
        text = text.replace(old, new)
    cfg = yaml.safe_load(text)

    def set_port(sa: dict, expected: int, port: int) -> None:
        assert sa["port_value"] == expected, sa
        sa["port_value"] = port

    set_port(cfg["admin"]["address"]["socket_address"], 9903, admin)
    (listener,) = cfg["static_resources"]["listeners"]
    set_port(listener["address"]["socket_address"], 10002, listen)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert set(clusters) == {"idp", "echo"}
    for name, expected, port in (("idp", 18081, idp_port), ("echo", 18080, upstream_port)):
        (ep,) = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        set_port(ep["endpoint"]["address"]["socket_address"], expected, port)
    return cfg


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    envoy: Envoy
    idp: OidcProvider
    upstream: Upstream
    base: str                      # http://127.0.0.1:<envoy port>
    signins: dict[str, "SignIn"] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request):
    wasm = Path(os.environ.get("LATCHKEY_WASM") or
                REPO_ROOT / "target" / "wasm32-wasip1" / "release" / "latchkey.wasm")
    if not wasm.is_file():
        pytest.fail(f"latchkey wasm module not found at {wasm}", pytrace=False)
    upstream = Upstream().start()
    idp = envoy = None
    try:
        # The redirect URI names Envoy's port, so the IdP starts after the port is chosen;
        # free_port() is "free a moment ago": on "Address already in use" try new ports.
        for attempt in range(3):
            work = tmp_path_factory.mktemp(f"browser-signin{attempt}")
            listen, admin = free_port(), free_port()
            idp = OidcProvider(browser_redirect_uris=[f"http://{LOOPBACK}:{listen}{CALLBACK}"],
                               accounts=ACCOUNTS, log_dir=work).start()
            write_oauth2_secrets(work / "oauth2")
            cfg = render(wasm=wasm, listen=listen, admin=admin, idp_port=idp.port,
                         upstream_port=upstream.port, secrets_dir=work / "oauth2")
            envoy = Envoy(cfg, work / "envoy")
            try:
                envoy.start()
                break
            except EnvoyStartError as e:
                idp.stop()
                if "Address already in use" in str(e) and attempt < 2:
                    continue
                raise
        st = Stack(envoy, idp, upstream, f"http://{LOOPBACK}:{envoy.port}")
        yield st
        failures = [l for l in envoy.log_text().splitlines() if VM_FAILURE.search(l)]
        assert failures == [], "wasm VM failure:\n" + "\n".join(failures[:10])
    finally:
        if envoy is not None:
            envoy.stop()
        if idp is not None:
            idp.stop()
        upstream.stop()


# --------------------------------------------------------------------------- the sign-in


@dataclass
class SignIn:
    browser: Browser
    start: str                 # the URL first asked for
    authorize: str             # Envoy's redirect to the authorization endpoint
    callback: str              # the IdP's redirect back to Envoy, with the code
    callback_resp: Response    # Envoy's answer to it
    set_by_start: dict[str, Cookie]
    set_by_callback: dict[str, Cookie]
    prompts: list[str]
    token_request: dict[str, Any]


def sign_in(st: Stack, login: str, start_path: str = "/partner/invoices?page=2") -> SignIn:
    """The whole authorization code flow, as a browser would go through it."""
    b = Browser()
    start = st.base + start_path
    first = b.get(start)
    authorize = location(first, start)
    set_by_start = b.store(first)

    # At the IdP: /auth -> /interaction/<uid> (login form) -> POST -> /auth/<uid>
    # -> /interaction/<uid2> (consent form) -> POST -> /auth/<uid2> -> Envoy's callback.
    run = idp_flow(b, authorize, login, until=lambda u: u.startswith(st.base + "/"))
    prompts, callback = run.prompts, run.location

    code = query(callback)["code"]
    callback_resp = b.get(callback)
    set_by_callback = b.store(callback_resp)
    # The token request Envoy sent for this code, as oidc-provider received it.
    recs = [r for r in st.idp.last_token_requests() if r["form"].get("code") == code]
    assert len(recs) == 1, st.idp.last_token_requests()
    return SignIn(b, start, authorize, callback, callback_resp, set_by_start, set_by_callback,
                  prompts, recs[0])


def signed_in(st: Stack, login: str) -> SignIn:
    """One sign-in per user for the module (the first test that needs it does it)."""
    if login not in st.signins:
        st.signins[login] = sign_in(st, login)
    return st.signins[login]


def upstream_requests_since(st: Stack, n: int):
    return st.upstream.requests()[n:]


def access_log_line(st: Stack, path_and_user: str, timeout: float = 10.0) -> str:
    rx = re.compile(re.escape(path_and_user))
    deadline = time.monotonic() + timeout
    while True:
        lines = [l for l in st.envoy.access_log_lines() if rx.search(l)]
        if lines:
            return lines[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no access log line with {path_and_user!r}:\n"
                                 + "\n".join(st.envoy.access_log_lines()[-20:]))
        time.sleep(0.05)


# --------------------------------------------------------------------------- tests


def test_envoy_redirects_to_the_authorization_endpoint_with_pkce(stack):
    before = len(stack.upstream.requests())
    b = Browser()
    resp = b.get(stack.base + "/partner/invoices")
    assert resp.status == 302
    loc = location(resp, stack.base)
    disco = stack.idp.discovery()
    assert loc.split("?")[0] == disco["authorization_endpoint"] == stack.idp.issuer + "/auth"
    q = query(loc)
    assert q["client_id"] == BROWSER_CLIENT_ID
    assert q["response_type"] == "code"
    assert q["redirect_uri"] == stack.base + CALLBACK
    assert q["scope"].split() == ["openid", "groups"]
    assert q["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", q["code_challenge"])   # base64url(SHA-256)
    assert q["state"]
    assert "S256" in disco["code_challenge_methods_supported"]
    # The verifier waits in a cookie of Envoy's (encrypted: it is not the verifier itself).
    set_now = b.store(resp)
    assert {"CodeVerifier", "OauthNonce"} <= set(set_now)
    assert all("httponly" in c.attrs for c in set_now.values())
    assert len(upstream_requests_since(stack, before)) == 0


def test_the_idp_refuses_this_client_without_pkce(stack):
    """oidc-provider requires PKCE of gw-browser (server.mjs), so the sign-ins here only
    work because Envoy sent code_challenge and code_verifier."""
    params = {"client_id": BROWSER_CLIENT_ID, "response_type": "code", "scope": "openid groups",
              "redirect_uri": stack.base + CALLBACK, "state": "s1"}
    resp = Browser().get(stack.idp.issuer + "/auth?" + urllib.parse.urlencode(params))
    back = location(resp, stack.idp.issuer)
    assert back.startswith(stack.base + CALLBACK + "?")
    q = query(back)
    assert q["error"] == "invalid_request" and "PKCE" in q["error_description"], q


def test_signin_with_pkce_then_latchkey_injects_the_key_for_the_users_group(stack):
    before = len(stack.upstream.requests())
    s = signed_in(stack, "alice")

    # The IdP asked for a login, then for consent.
    assert s.prompts == ["login", "consent"]
    hops = [(h.method, urllib.parse.urlsplit(h.url).path.split("/")[1:2], h.status) for h in s.browser.hops]
    assert hops[0] == ("GET", ["partner"], 302)            # Envoy: no session
    assert hops[1] == ("GET", ["auth"], 303)               # the authorization endpoint
    assert ("POST", ["interaction"], 303) in hops          # the forms
    assert hops[-1] == ("GET", ["oauth2"], 302)            # Envoy's callback

    # The IdP came back to Envoy's callback with a code and Envoy's own state.
    cb = query(s.callback)
    assert s.callback.split("?")[0] == stack.base + CALLBACK
    assert cb["state"] == query(s.authorize)["state"]
    assert cb["code"]

    # Envoy's token request: the code, the redirect URI, client_secret_basic, and the PKCE
    # verifier whose S256 hash is the challenge of the authorization redirect.
    tr = s.token_request
    assert (tr["grant_type"], tr["client_id"], tr["status"]) == ("authorization_code", BROWSER_CLIENT_ID, 200)
    assert tr["form"]["redirect_uri"] == stack.base + CALLBACK
    assert "client_secret" not in tr["form"]
    auth = dict((k.lower(), v) for k, v in tr["headers"])["authorization"]
    assert auth == "Basic " + base64.b64encode(f"{BROWSER_CLIENT_ID}:{BROWSER_CLIENT_SECRET}".encode()).decode()
    verifier = tr["form"]["code_verifier"]
    assert re.fullmatch(r"[A-Za-z0-9._~-]{43,128}", verifier)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == query(s.authorize)["code_challenge"]

    # The ID token the sign-in produced: signed by the IdP, for this client, alice's groups.
    id_token = tr["id_token"]
    claims = jwt.decode(id_token, jwt.PyJWK(next(k for k in stack.idp.jwks()["keys"]
                                                  if k["kid"] == jwt.get_unverified_header(id_token)["kid"])).key,
                        algorithms=["RS256"], audience=BROWSER_CLIENT_ID, issuer=stack.idp.issuer)
    assert claims["sub"] == "alice" and claims["groups"] == ["billing"]

    # The callback: Envoy's session cookies, the one-time ones deleted, and back to the start.
    assert s.callback_resp.status == 302
    assert location(s.callback_resp, stack.base) == s.start
    set_cb = s.set_by_callback
    assert {"OauthHMAC", "OauthExpires", "IdToken"} <= set(set_cb)
    assert "BearerToken" not in set_cb and "RefreshToken" not in set_cb
    for one_time in ("CodeVerifier", "OauthNonce"):
        assert one_time in set_cb and one_time not in s.browser.jar
    # The cookie holds the ID token encrypted (jwt_authn gets it from the x-id-token header).
    assert set_cb["IdToken"].value != id_token and set_cb["IdToken"].value.count(".") != 2
    assert set_cb["IdToken"].attrs["max-age"] == set_cb["OauthExpires"].attrs["max-age"]
    # Nothing reached the upstream during the flow.
    assert len(upstream_requests_since(stack, before)) == 0

    # Now the request itself: latchkey injected the partner key, from alice's claims.
    resp = s.browser.get(s.start)
    assert resp.status == 200, (resp.status, resp.body[:300])
    (up,) = upstream_requests_since(stack, before)
    assert up.path == "/partner/invoices?page=2"
    assert up.header_values("x-api-key") == [PARTNER_KEY]
    # Neither the browser's cookies nor the user's tokens go upstream.
    for h in ("cookie", "x-id-token", "authorization"):
        assert up.header(h) is None, h
    line = access_log_line(stack, '"GET /partner/invoices" 200 user=alice')
    assert "route=partner connection=partner_billing decision=allowed" in line


def test_a_user_without_the_group_gets_latchkeys_403(stack):
    before = len(stack.upstream.requests())
    s = signed_in(stack, "bob")
    assert s.prompts == ["login", "consent"]
    assert s.token_request["status"] == 200
    assert jwt.decode(s.token_request["id_token"], options={"verify_signature": False})["groups"] == ["support"]
    assert location(s.callback_resp, stack.base) == s.start

    resp = s.browser.get(s.start)
    assert resp.status == 403
    assert resp.header("content-type") == "application/json"
    assert json.loads(resp.body) == {"error": "forbidden", "route": "partner"}
    assert PARTNER_KEY.encode() not in resp.body
    line = access_log_line(stack, '"GET /partner/invoices" 403 user=bob')
    assert "decision=denied_forbidden" in line

    # Signed in, bob may use the app route; it gets no key.
    resp = s.browser.get(stack.base + "/home")
    assert resp.status == 200
    (up,) = upstream_requests_since(stack, before)
    assert up.path == "/home" and up.header("x-api-key") is None and up.header("cookie") is None
    assert "decision=allowed" in access_log_line(stack, '"GET /home" 200 user=bob')


def test_a_client_cannot_bring_its_own_id_token(stack):
    alice, bob = signed_in(stack, "alice"), signed_in(stack, "bob")
    alice_token = alice.token_request["id_token"]
    before = len(stack.upstream.requests())
    # Bob's session with alice's (valid, signed) ID token in the header jwt_authn reads:
    # the oauth2 filter replaces it with the session's own.
    resp = bob.browser.get(stack.base + "/partner/x", headers={"x-id-token": alice_token})
    assert resp.status == 403 and json.loads(resp.body)["error"] == "forbidden"
    assert "decision=denied_forbidden" in access_log_line(stack, '"GET /partner/x" 403 user=bob')
    # No session at all: sign in first, whatever the request carries.
    for headers in ({"x-id-token": alice_token}, {"authorization": f"Bearer {alice_token}"}):
        resp = Browser().get(stack.base + "/partner/x", headers=headers)
        assert resp.status == 302
        assert location(resp, stack.base).startswith(stack.idp.issuer + "/auth?")
    # A session cookie that was tampered with is no session.
    forged = Browser()
    forged.jar = {n: Cookie(c.value, c.path, c.attrs) for n, c in bob.browser.jar.items()}
    forged.jar["IdToken"] = alice.browser.jar["IdToken"]
    resp = forged.get(stack.base + "/partner/x")
    assert resp.status == 302
    assert len(upstream_requests_since(stack, before)) == 0


def test_signout_ends_the_session(stack):
    s = sign_in(stack, "alice", "/home")
    assert s.browser.get(stack.base + "/home").status == 200
    resp = s.browser.get(stack.base + "/oauth2/signout")
    assert resp.status == 302
    assert not ({"OauthHMAC", "OauthExpires", "IdToken"} & set(s.browser.jar)), s.browser.jar
    resp = s.browser.get(stack.base + "/partner/x")
    assert resp.status == 302
    assert location(resp, stack.base).startswith(stack.idp.issuer + "/auth?")
