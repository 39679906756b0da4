"""User-delegated connections (SPEC v1.2, issue #18) in a real Envoy: a person consents
at a real oidc-provider (authorization code, PKCE required, refresh tokens rotated on
every use, RFC 9207 `iss`), latchkey keeps the refresh token in a real OpenBao (KV v2,
compare-and-set) and injects the access token of the caller's own consent.

Callers are signed in with a bearer JWT jwt_authn verifies (the `signer` fixture); the
browser at the IdP is browser.py's, driven hop by hop: latchkey's login answers 302 to
the IdP, the IdP's login and consent forms are posted, and the IdP's redirect back (the
callback URL with code, state and iss) is sent to Envoy by the test, with the caller's
bearer token, as the browser would send it with its session.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from browser import Browser, consent_at_idp, deny_at_idp
from harness import static_cluster, wait_until
from secret_stores import OpenBao
from token_servers import CONSENT_CLIENT_ID, CONSENT_CLIENT_SECRET, OidcProvider

REDIRECT_URI = "https://gateway.test/.latchkey/callback"
STATE_KEY = "k" * 40
CONSENT_PATH = "/.latchkey/connections"
PORTAL = "https://portal.test/"
ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]


@pytest.fixture
def oidc():
    with OidcProvider(ttl=300, consent_redirect_uris=[REDIRECT_URI]) as server:
        yield server


@pytest.fixture
def bao():
    with OpenBao() as b:
        yield b


def consent_config(oidc, bao, *, per_user=True, consent=None, issuer=True, revocation=True):
    provider = {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                "authorization_url": oidc.authorization_endpoint,
                "client_id": CONSENT_CLIENT_ID, "client_secret": "client_secret",
                "timeout_ms": 3000}
    if issuer:
        provider["issuer"] = oidc.issuer
    if revocation:
        provider["revocation_url"] = oidc.revocation_url
    connection = {"provider": "idp", "grant": "authorization_code", "scopes": ["orders.read"],
                  "store": "user_tokens", "access": {"authenticated": True}}
    if per_user:
        connection["per_user"] = True
    else:
        connection["consent"] = consent or {"users": ["alice"]}
    return {
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"},
                    "state_key": {"env": "STATE_KEY"},
                    "vault_token": {"env": "VAULT_TOKEN"}},
        "providers": {"idp": provider},
        "token_stores": {"user_tokens": {"vault": {"cluster": "vault", "url": bao.url,
                                                   "token": "vault_token"}}},
        "consent": {"path": CONSENT_PATH, "redirect_uri": REDIRECT_URI, "state_key": "state_key",
                    "return_to": [PORTAL]},
        "connections": {"mine": connection},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["mine"], "header": "authorization"}]}],
    }


def start(envoy_factory, oidc, bao, **kw):
    cfg_kw = {k: kw.pop(k) for k in ("per_user", "consent", "issuer", "revocation") if k in kw}
    return envoy_factory(
        consent_config(oidc, bao, **cfg_kw), routes=ROUTES,
        wasm_env={"CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": STATE_KEY,
                  "VAULT_TOKEN": bao.token_store_token()},
        extra_clusters=[static_cluster("idp", oidc.port), static_cluster("vault", bao.port)], **kw)


def auth(signer, sub):
    return [("authorization", f"Bearer {signer.token({'sub': sub})}")]


def jwt_claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def upstream_sub(upstream) -> str:
    value = upstream.last().header("authorization")
    assert value and value.startswith("Bearer "), value
    return jwt_claims(value[len("Bearer "):])["sub"]


def path_of(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return u.path + ("?" + u.query if u.query else "")


def connect(envoy, oidc, signer, sub, *, browser=None, return_to=None):
    """The whole consent as a user goes through it: login → IdP → callback. Returns
    (login response, callback URL the IdP sent back, callback response)."""
    browser = browser or Browser()
    login = f"{CONSENT_PATH}/mine/login"
    if return_to:
        login += "?return_to=" + urllib.parse.quote(return_to, safe="")
    resp = envoy.request("GET", login, headers=auth(signer, sub))
    assert resp.status == 302, resp
    callback = consent_at_idp(browser, resp.header("location"), sub)
    done = envoy.request("GET", path_of(callback), headers=auth(signer, sub))
    return resp, callback, done


def record_path(bao, sub) -> str:
    import hashlib
    h = hashlib.sha256(b"latchkey.caller\0" + b"https://issuer.test" + b"\0" + sub.encode()).hexdigest()[:32]
    return f"latchkey/connections/mine/{h}"


def test_consent_flow_rotation_and_disconnect(envoy_factory, upstream, signer, oidc, bao):
    """consent_required first; then login (302 to the IdP with PKCE S256 and a signed
    state), consent at the IdP, callback (code redeemed, refresh token stored in
    OpenBao), the caller's own token injected; a full rotation cycle; a disconnect."""
    envoy = start(envoy_factory, oidc, bao, component_log_level="wasm:debug")
    # 1. No consent yet: 403 with where to sign in; nothing forwarded.
    resp = envoy.request("GET", "/orders/1", headers=auth(signer, "alice"))
    assert resp.status == 403, resp
    assert resp.json() == {"error": "consent_required", "route": "orders", "connection": "mine",
                           "login_url": f"{CONSENT_PATH}/mine/login"}
    assert upstream.requests() == []

    # 2. Login: 302 to the IdP's authorization endpoint with every parameter.
    login, callback, done = connect(envoy, oidc, signer, "alice", return_to=PORTAL + "home")
    loc = urllib.parse.urlsplit(login.header("location"))
    q = dict(urllib.parse.parse_qsl(loc.query))
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == oidc.authorization_endpoint
    assert q["response_type"] == "code" and q["client_id"] == CONSENT_CLIENT_ID
    assert q["redirect_uri"] == REDIRECT_URI and q["scope"] == "orders.read"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    cb = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))
    assert cb["state"] == q["state"] and cb["iss"] == oidc.issuer and cb["code"]

    # 3. Callback: back to return_to; the refresh token is in OpenBao, version 1.
    assert done.status == 302, done
    assert done.header("location") == PORTAL + "home"
    data, version = bao.kv_read(record_path(bao, "alice"))
    assert version == 1 and data["refresh_token"] and data["scopes"] == "orders.read"
    assert oidc.token_request_count("authorization_code", ok_only=True) == 1

    # 4. Use: the upstream gets alice's own access token.
    resp = envoy.request("GET", "/orders/2", headers=auth(signer, "alice"))
    assert resp.status == 200, resp
    assert upstream_sub(upstream) == "alice"
    # The refresh token was rotated on use, and written back (CAS) before the token served.
    data2, version2 = bao.kv_read(record_path(bao, "alice"))
    assert version2 == 2 and data2["refresh_token"] != data["refresh_token"]
    # The old one is refused by the server; the new one is the one in use.
    old = oidc.token_request({"grant_type": "refresh_token", "refresh_token": data["refresh_token"]},
                             client_id=CONSENT_CLIENT_ID)
    assert old.status == 400 and old.body["error"] == "invalid_grant"

    # 5. Replaying the callback: refused, nothing stored.
    again = envoy.request("GET", path_of(callback), headers=auth(signer, "alice"))
    assert again.status == 400 and again.json()["reason"] == "state_replayed", again
    assert bao.kv_versions(record_path(bao, "alice")) == [1, 2]

    # 6. Disconnect: the record goes; the next request needs consent again.
    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=auth(signer, "alice"))
    assert gone.status == 200, gone
    assert gone.json()["disconnected"] == "mine"
    assert bao.kv_read(record_path(bao, "alice")) is None
    resp = envoy.request("GET", "/orders/3", headers=auth(signer, "alice"))
    assert resp.status == 403 and resp.json()["error"] == "consent_required", resp

    stats = envoy.stats()
    assert stats.get("wasmcustom.latchkey.consent.logins_started") == 1
    assert stats.get("wasmcustom.latchkey.consent.completed") == 1
    assert stats.get("wasmcustom.latchkey.consent.failed.state_replayed") == 1
    assert stats.get("wasmcustom.latchkey.consent.disconnects") == 1
    log = envoy.log_text()
    for secret in (data["refresh_token"], data2["refresh_token"], cb["code"], q["state"], STATE_KEY):
        assert secret not in log


def test_two_users_interleaved_each_only_ever_get_their_own_token(envoy_factory, upstream, signer,
                                                                   oidc, bao):
    """alice and bob each consent, then 10,000 requests alternate between them over eight
    keep-alive connections (both workers): every request the upstream receives carries
    the access token of the caller who sent it. A disconnect then takes effect on the
    next request on every worker."""
    from test_request_integrity import KeepAlive
    import threading

    envoy = start(envoy_factory, oidc, bao)
    for sub in ("alice", "bob"):
        _, _, done = connect(envoy, oidc, signer, sub)
        assert done.status == 200 and done.json() == {"connected": "mine"}, done
    tokens = {sub: f"Bearer {signer.token({'sub': sub})}" for sub in ("alice", "bob")}
    n, conns = 10_000, 8
    statuses: list[int] = []
    lock = threading.Lock()
    pool = KeepAlive(envoy.port, conns)

    def worker(w: int) -> None:
        got = []
        for i in range(w, n, conns):
            sub = ("alice", "bob")[(i // conns + w) % 2]
            got.append(pool.get(w, f"/orders/{sub}/{i}", {"authorization": tokens[sub]}))
        with lock:
            statuses.extend(got)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        pool.close()
    assert len(statuses) == n and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    seen = upstream.requests()
    assert len(seen) == n
    wrong = [r.path for r in seen
             if jwt_claims(r.header("authorization")[len("Bearer "):])["sub"] != r.path.split("/")[2]]
    assert wrong == []
    # Each consent was redeemed once at the token server for all 10,000 (one refresh each).
    assert oidc.token_request_count("refresh_token", ok_only=True) == 2

    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=auth(signer, "alice"))
    assert gone.status == 200, gone
    # Fresh connections land on both workers: alice is refused on each, bob still served.
    for i in range(8):
        assert envoy.request("GET", f"/orders/alice/after{i}",
                             headers=[("authorization", tokens["alice"])]).status == 403
        resp = envoy.request("GET", f"/orders/bob/after{i}", headers=[("authorization", tokens["bob"])])
        assert resp.status == 200 and upstream_sub(upstream) == "bob"


def test_discovery_shows_each_callers_consent_status(envoy_factory, upstream, signer, oidc, bao):
    """Discovery lists the authorization_code connections the caller may use with their
    status, read from the token store: consent_required (with the login URL) until the
    caller consents, connected after, and consent_required again after a disconnect.
    Another caller's consent changes nothing for this one."""
    cfg = consent_config(oidc, bao)
    cfg["discovery"] = {"path": "/.well-known/latchkey"}
    envoy = envoy_factory(
        cfg, routes=ROUTES,
        wasm_env={"CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": STATE_KEY,
                  "VAULT_TOKEN": bao.token_store_token()},
        extra_clusters=[static_cluster("idp", oidc.port), static_cluster("vault", bao.port)])

    def statuses(sub):
        resp = envoy.request("GET", "/.well-known/latchkey", headers=auth(signer, sub))
        assert resp.status == 200, resp
        doc = resp.json()
        assert [r["name"] for r in doc["routes"]] == ["orders"]
        return doc["connections"]

    required = [{"connection": "mine", "status": "consent_required",
                 "login_url": f"{CONSENT_PATH}/mine/login"}]
    assert statuses("alice") == required
    connect(envoy, oidc, signer, "bob")
    assert statuses("alice") == required
    assert statuses("bob") == [{"connection": "mine", "status": "connected"}]
    connect(envoy, oidc, signer, "alice")
    assert statuses("alice") == [{"connection": "mine", "status": "connected"}]
    assert envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=auth(signer, "alice")).status == 200
    assert statuses("alice") == required
    # Without claims: no connections, and no store read.
    anon = envoy.request("GET", "/.well-known/latchkey")
    assert anon.status == 200 and "connections" not in anon.json()
