"""User-delegated consent (SPEC v1.2) with a real browser session in front.

SPEC "Callback ... session binding: the callback needs the same identity, so a browser
session in front, such as Envoy's oauth2 filter, is part of the setup". test_consent.py
drives the consent with a bearer JWT that the test adds to the callback by hand; here the
callback comes from a browser that carries nothing but its cookies, as a real one does
when the IdP redirects it back.

The Envoy is envoy/browser-signin.yaml, rendered by test_browser_signin.render (this
test's ports, the built module, SDS secret files), with three changes: a route `orders`,
a cluster `vault`, and latchkey's configuration replaced by a per-user authorization_code
connection (test_consent.consent_config: client gw-consent, PKCE, rotation on) whose
refresh tokens go to a real OpenBao. The filter chain stays as shipped:

    oauth2     the browser session (gw-browser; its own callback is /oauth2/callback only),
               forwards the session's ID token in x-id-token
    jwt_authn  verifies x-id-token (the IdP's JWKS, aud gw-browser): claims -> "payload"
    latchkey   the consent endpoints (/.latchkey/connections/..., /.latchkey/callback) and
               the `orders` route, which injects the caller's own access token

One oidc-provider is both IdPs (gw-browser for the sign-in, gw-consent for the consent),
so the browser's IdP session from the sign-in is reused at the consent. Every hop is
followed by hand (browser.py); the hops are printed (pytest -s shows them).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from browser import Browser, Hop, consent_at_idp, idp_flow, location, query
from harness import LOOPBACK, Envoy, EnvoyStartError, Upstream, free_port, static_cluster
from secret_stores import OpenBao
from test_browser_signin import VM_FAILURE, access_log_line, render, sign_in, write_oauth2_secrets
from test_consent import CONSENT_PATH, STATE_KEY, consent_config
from token_servers import (BROWSER_CLIENT_ID, CONSENT_CALLBACK_PATH, CONSENT_CLIENT_ID,
                           CONSENT_CLIENT_SECRET, OidcProvider)

SIGNIN_CALLBACK = "/oauth2/callback"          # the oauth2 filter's own redirect path
ACCOUNTS = {"alice": {"groups": ["billing"]}, "bob": {"groups": ["support"]}}
LOGIN_PATH = f"{CONSENT_PATH}/mine/login"


@dataclass
class ConsentStack:
    envoy: Envoy
    idp: OidcProvider
    upstream: Upstream
    bao: OpenBao
    base: str                      # http://127.0.0.1:<envoy port>

    @property
    def redirect_uri(self) -> str:
        return self.base + CONSENT_CALLBACK_PATH

    def record(self, sub: str) -> str:
        """The OpenBao path of `sub`'s record: keyed by a hash of the ID token's iss and sub."""
        h = hashlib.sha256(b"latchkey.caller\0" + self.idp.issuer.encode() + b"\0"
                           + sub.encode()).hexdigest()[:32]
        return f"latchkey/connections/mine/{h}"


def plugin_config(idp: OidcProvider, bao: OpenBao, base: str) -> dict:
    cfg = consent_config(idp, bao)      # per_user "mine" on gw-consent, OpenBao store
    cfg["claims"] = {"from": "jwt_metadata", "key": "payload", "subject": "sub", "groups": "groups"}
    cfg["consent"].update(redirect_uri=base + CONSENT_CALLBACK_PATH, return_to=[base + "/"])
    cfg["routes"].append({"name": "app", "match": {"route_name": "app"},
                          "access": {"authenticated": True}})
    cfg["unmatched"] = "deny"
    cfg["filter_state"] = True          # route/connection/decision in the access log
    return cfg


def envoy_bootstrap(*, wasm: Path, listen: int, admin: int, idp: OidcProvider, bao: OpenBao,
                    upstream: Upstream, secrets_dir: Path) -> dict:
    """envoy/browser-signin.yaml as shipped, plus the `orders` route, the `vault` cluster and
    latchkey's consent configuration (see the module docstring)."""
    base = f"http://{LOOPBACK}:{listen}"
    cfg = render(wasm=wasm, listen=listen, admin=admin, idp_port=idp.port,
                 upstream_port=upstream.port, secrets_dir=secrets_dir)
    (listener,) = cfg["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    assert list(filters) == ["envoy.filters.http.oauth2", "envoy.filters.http.jwt_authn",
                             "envoy.filters.http.wasm", "envoy.filters.http.router"]
    # The oauth2 filter's own callback is /oauth2/callback, exactly: latchkey's callback
    # (/.latchkey/callback) is an ordinary request to it, passed on when there is a session.
    oauth2 = filters["envoy.filters.http.oauth2"]["config"]
    assert oauth2["redirect_path_matcher"] == {"path": {"exact": SIGNIN_CALLBACK}}
    assert "pass_through_matcher" not in oauth2
    assert oauth2["forward_id_token"] == {"header": "x-id-token"}
    # jwt_authn reads the ID token the oauth2 filter forwards, and requires it everywhere.
    jwt_authn = filters["envoy.filters.http.jwt_authn"]
    assert jwt_authn["providers"]["signin"]["from_headers"] == [{"name": "x-id-token"}]
    assert jwt_authn["providers"]["signin"]["audiences"] == [BROWSER_CLIENT_ID]
    assert jwt_authn["rules"] == [{"match": {"prefix": "/"}, "requires": {"provider_name": "signin"}}]

    (vhost,) = hcm["route_config"]["virtual_hosts"]
    assert [r["name"] for r in vhost["routes"]] == ["partner", "app"]
    vhost["routes"].insert(0, {"name": "orders", "match": {"prefix": "/orders/"},
                               "route": {"cluster": "echo"}})
    wasm_cfg = filters["envoy.filters.http.wasm"]["config"]
    wasm_cfg["vm_config"]["environment_variables"]["key_values"] = {
        "CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": STATE_KEY,
        "VAULT_TOKEN": bao.token_store_token()}
    wasm_cfg["configuration"]["value"] = json.dumps(plugin_config(idp, bao, base))
    cfg["static_resources"]["clusters"].append(static_cluster("vault", bao.port))
    return cfg


@pytest.fixture
def stack(request, tmp_path, wasm_path):
    """Upstream, OpenBao, oidc-provider (both clients, redirect URIs on Envoy's port) and
    Envoy, all on 127.0.0.1; each stopped by its own pid at teardown."""
    started: list = []
    try:
        upstream = Upstream().start()
        started.append(upstream)
        bao = OpenBao().start()
        started.append(bao)
        envoy = None
        # The redirect URIs name Envoy's port, so the IdP starts after it is chosen;
        # free_port() is "free a moment ago": on "Address already in use" try new ports.
        for attempt in range(3):
            work = tmp_path / f"stack{attempt}"
            listen, admin = free_port(), free_port()
            base = f"http://{LOOPBACK}:{listen}"
            idp = OidcProvider(ttl=300, accounts=ACCOUNTS, log_dir=work,
                               browser_redirect_uris=[base + SIGNIN_CALLBACK],
                               consent_redirect_uris=[base + CONSENT_CALLBACK_PATH]).start()
            started.append(idp)
            write_oauth2_secrets(work / "oauth2")
            cfg = envoy_bootstrap(wasm=wasm_path, listen=listen, admin=admin, idp=idp, bao=bao,
                                  upstream=upstream, secrets_dir=work / "oauth2")
            envoy = Envoy(cfg, work / "envoy")
            try:
                envoy.start()
                break
            except EnvoyStartError as e:
                idp.stop()
                if "Address already in use" in str(e) and attempt < 2:
                    continue
                raise
        started.append(envoy)
        yield ConsentStack(envoy, idp, upstream, bao, base)
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            print(f"\n=== envoy pid {envoy.pid} ===\n{envoy.diagnostics()}"
                  f"\n=== oidc-provider pid {idp.pid} ===\n{idp.diagnostics()}"
                  f"\n=== bao pid {bao.pid} ===\n{bao.diagnostics()}")
        failures = [l for l in envoy.log_text().splitlines() if VM_FAILURE.search(l)]
        assert failures == [], "wasm VM failure:\n" + "\n".join(failures[:10])
    finally:
        for proc in reversed(started):
            proc.stop()


# --------------------------------------------------------------------------- helpers


def hop_lines(hops: list[Hop]) -> list[str]:
    """The hops as a user would read them: request, status, where it went (queries cut)."""
    def short(url: str | None) -> str:
        if not url:
            return ""
        u = urllib.parse.urlsplit(url)
        where = f":{u.port}" if u.netloc else ""
        keys = [k for k, _ in urllib.parse.parse_qsl(u.query, keep_blank_values=True)]
        return f"{where}{u.path}" + (f"?{'&'.join(keys)}" if keys else "")
    return [f"{h.method:4} {short(h.url):60} {h.status}" + (f" -> {short(h.location)}" if h.location else "")
            for h in hops]


def start_login(st: ConsentStack, b: Browser, return_to: str | None = None) -> str:
    """GET latchkey's login URL with the browser's session: the authorization URL it sends to."""
    url = st.base + LOGIN_PATH
    if return_to:
        url += "?return_to=" + urllib.parse.quote(return_to, safe="")
    resp = b.get(url)
    assert resp.status == 302, (resp.status, resp.body[:300])
    return location(resp, url)


def versions(st: ConsentStack, sub: str) -> list[int]:
    return st.bao.kv_versions(st.record(sub))


def code_redemptions(st: ConsentStack) -> int:
    """Authorization codes of the consent client sent to the IdP's token endpoint (the
    sign-ins' codes, client gw-browser, are not counted)."""
    return sum(1 for r in st.idp.last_token_requests()
               if (r["grant_type"], r["client_id"]) == ("authorization_code", CONSENT_CLIENT_ID))


# --------------------------------------------------------------------------- tests


def test_consent_with_the_browser_session_then_the_users_own_token(stack):
    st = stack
    # 1. alice signs in to Envoy: the oauth2 filter -> the IdP (login, consent for
    #    gw-browser) -> /oauth2/callback -> back where she started, with session cookies.
    s = sign_in(st, "alice", "/orders/x")
    b = s.browser
    assert s.prompts == ["login", "consent"]
    assert location(s.callback_resp, st.base) == st.base + "/orders/x"
    assert {"OauthHMAC", "OauthExpires", "IdToken"} <= set(b.jar)

    # 2. The app: no consent yet. 403 with where to give it; nothing forwarded.
    resp = b.get(st.base + "/orders/x")
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert resp.json() == {"error": "consent_required", "route": "orders", "connection": "mine",
                           "login_url": LOGIN_PATH}
    assert st.upstream.requests() == []

    # 3. The login URL (the app adds where to come back to): 302 to the same IdP, now for
    #    the consent client, with PKCE S256 and latchkey's signed state.
    return_to = st.base + "/orders/x"
    authorize = start_login(st, b, return_to)
    q = query(authorize)
    assert authorize.split("?")[0] == st.idp.authorization_endpoint
    assert (q["client_id"], q["response_type"], q["redirect_uri"], q["scope"]) == \
        (CONSENT_CLIENT_ID, "code", st.redirect_uri, "orders.read")
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43

    # 4. At the IdP: the browser's IdP session from the sign-in is alice's, so only the
    #    consent form comes. The IdP sends the browser back to latchkey's callback.
    run = idp_flow(b, authorize, "alice")
    assert run.prompts == ["consent"]
    callback = run.location
    assert callback.split("?")[0] == st.redirect_uri
    cb = query(callback)
    assert cb["state"] == q["state"] and cb["iss"] == st.idp.issuer and cb["code"]

    # 5. The browser follows it with its cookies and nothing else (no Authorization):
    #    the oauth2 filter lets the session through, jwt_authn verifies its ID token,
    #    latchkey sees the caller who started the login, redeems the code, stores the
    #    refresh token, and sends the browser back to return_to.
    assert versions(st, "alice") == []
    done = b.get(callback)
    assert done.status == 302, (done.status, done.body[:300])
    assert location(done, callback) == return_to
    data, version = st.bao.kv_read(st.record("alice"))
    assert version == 1 and data["refresh_token"] and data["scopes"] == "orders.read"
    (tr,) = [r for r in st.idp.last_token_requests() if r["form"].get("code") == cb["code"]]
    assert (tr["grant_type"], tr["client_id"], tr["status"]) == ("authorization_code", CONSENT_CLIENT_ID, 200)
    assert tr["form"]["redirect_uri"] == st.redirect_uri
    assert "decision=consent_connected" in access_log_line(st, '"GET /.latchkey/callback" 302 user=alice')
    assert st.upstream.requests() == []

    # 6. Back at the app: 200, and the upstream got alice's own access token (gw-consent's,
    #    signed by the IdP), not her session's cookies or ID token.
    resp = b.get(return_to)
    assert resp.status == 200, (resp.status, resp.body[:300])
    (up,) = st.upstream.requests()
    assert up.path == "/orders/x"
    value = up.header("authorization")
    assert value and value.startswith("Bearer "), value
    token = value[len("Bearer "):]
    claims = st.idp.verify_access_token(token)
    assert claims["sub"] == "alice" and claims["client_id"] == CONSENT_CLIENT_ID, claims
    for h in ("cookie", "x-id-token"):
        assert up.header(h) is None, h
    assert "route=orders connection=mine decision=allowed" in \
        access_log_line(st, '"GET /orders/x" 200 user=alice')
    # The refresh token was rotated on use and written back (compare-and-set).
    assert versions(st, "alice") == [1, 2]

    hops = hop_lines(b.hops)
    print("\nalice's browser, hop by hop:\n  " + "\n  ".join(hops))
    # The shape a user sees: Envoy -> IdP -> Envoy, twice, then the app. Every hop is to
    # Envoy or to the IdP; Envoy's hops, in order:
    assert {urllib.parse.urlsplit(h.url).port for h in b.hops} == {st.envoy.port, st.idp.port}
    at_envoy = [(urllib.parse.urlsplit(h.url).path, h.status) for h in b.hops
                if urllib.parse.urlsplit(h.url).port == st.envoy.port]
    assert at_envoy == [("/orders/x", 302),              # no session: to the IdP (gw-browser)
                        (SIGNIN_CALLBACK, 302),          # the sign-in done: back to /orders/x
                        ("/orders/x", 403),              # consent_required
                        (LOGIN_PATH, 302),               # to the IdP (gw-consent)
                        (CONSENT_CALLBACK_PATH, 302),    # stored: back to return_to
                        ("/orders/x", 200)], hops        # alice's own token upstream


def test_another_users_session_cannot_finish_the_login(stack):
    """alice is connected; she starts a new login and consents at the IdP, and the IdP's
    redirect back (her code and state) is opened in bob's browser: 403 wrong_caller, the
    code is not redeemed, nothing is stored for bob and alice's record is unchanged.
    The refused attempt does not use up the state: alice can still finish her login."""
    st = stack
    alice = sign_in(st, "alice", "/orders/a")
    bob = sign_in(st, "bob", "/orders/b")
    assert alice.browser.jar["IdToken"].value != bob.browser.jar["IdToken"].value

    # alice connected once already (her record: version 1).
    first = consent_at_idp(alice.browser, start_login(st, alice.browser), "alice")
    done = alice.browser.get(first)
    assert done.status == 200 and done.json() == {"connected": "mine"}, done
    record_before = st.bao.kv_read(st.record("alice"))
    assert record_before[1] == 1

    # A second login of alice's, consented at the IdP; the redirect back goes to bob.
    callback = consent_at_idp(alice.browser, start_login(st, alice.browser), "alice")
    assert callback.split("?")[0] == st.redirect_uri and query(callback)["code"]
    redeemed = code_redemptions(st)
    resp = bob.browser.get(callback)
    assert resp.status == 403, (resp.status, resp.body[:300])
    assert resp.header("content-type") == "application/json"
    assert resp.json() == {"error": "consent_failed", "reason": "wrong_caller", "connection": "mine"}
    assert "decision=consent_failed" in access_log_line(st, '"GET /.latchkey/callback" 403 user=bob')
    # Nothing redeemed, nothing stored for either of them.
    assert code_redemptions(st) == redeemed
    assert versions(st, "bob") == []
    assert st.bao.kv_read(st.record("alice")) == record_before
    assert versions(st, "alice") == [1]
    # bob still has no consent of his own; nothing reached the upstream for him.
    resp = bob.browser.get(st.base + "/orders/b")
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp
    assert st.upstream.requests() == []
    print("\nbob's browser, hop by hop:\n  " + "\n  ".join(hop_lines(bob.browser.hops)))

    # alice, in her own browser: the same callback finishes (version 2, a new refresh token).
    done = alice.browser.get(callback)
    assert done.status == 200 and done.json() == {"connected": "mine"}, done
    data, version = st.bao.kv_read(st.record("alice"))
    assert version == 2 and data["refresh_token"] != record_before[0]["refresh_token"]
    assert code_redemptions(st) == redeemed + 1
    assert versions(st, "bob") == []


def test_a_callback_without_a_session_is_sent_to_sign_in(stack):
    """The IdP's redirect back (alice's code and state) opened in a fresh browser, without
    any cookie: the oauth2 filter answers it (302 to the IdP's sign-in for gw-browser),
    latchkey never sees it, nothing is redeemed or stored. Signing in there as bob brings
    that browser back to the callback, where latchkey refuses him (wrong_caller)."""
    st = stack
    alice = sign_in(st, "alice", "/orders/a")
    callback = consent_at_idp(alice.browser, start_login(st, alice.browser), "alice")
    redeemed = code_redemptions(st)

    fresh = Browser()
    resp = fresh.get(callback)
    assert resp.status == 302, (resp.status, resp.body[:300])
    signin = location(resp, callback)
    sq = query(signin)
    assert signin.split("?")[0] == st.idp.authorization_endpoint
    assert (sq["client_id"], sq["redirect_uri"]) == (BROWSER_CLIENT_ID, st.base + SIGNIN_CALLBACK)
    assert b"consent_failed" not in resp.body and b"connected" not in resp.body
    # No user (jwt_authn never ran) and no latchkey decision: the oauth2 filter answered.
    line = access_log_line(st, '"GET /.latchkey/callback" 302 user=-')
    assert "decision=-" in line, line
    assert code_redemptions(st) == redeemed
    assert versions(st, "alice") == [] and versions(st, "bob") == []
    assert st.upstream.requests() == []

    # The oauth2 filter keeps the URL it was asked for (the callback, alice's code and
    # state in it) in its own state through the sign-in. Signing in there as bob brings the
    # browser back to it with bob's session: refused, still nothing redeemed or stored.
    run = idp_flow(fresh, signin, "bob")
    assert run.prompts == ["login", "consent"]
    back = fresh.get(run.location)
    assert back.status == 302 and run.location.split("?")[0] == st.base + SIGNIN_CALLBACK
    assert location(back, run.location) == callback
    resp = fresh.get(callback)
    assert resp.status == 403 and resp.json()["reason"] == "wrong_caller", resp
    assert code_redemptions(st) == redeemed
    assert versions(st, "alice") == [] and versions(st, "bob") == []
    print("\nthe fresh browser, hop by hop:\n  " + "\n  ".join(hop_lines(fresh.hops)))
