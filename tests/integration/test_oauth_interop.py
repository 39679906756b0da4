"""latchkey against a real OAuth server: oidc-provider 9 (OpenID Certified), run by
tests/oauth/server.mjs on 127.0.0.1. The upstream's received token is verified
against the server's JWKS, as a resource server would.
"""

from __future__ import annotations

import pytest

from harness import static_cluster, wait_until
from token_servers import DEFAULT_RESOURCE, OidcProvider

ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]


@pytest.fixture
def oidc():
    with OidcProvider(ttl=300) as server:
        yield server


def config(oidc, client_id, auth_method, grant="client_credentials"):
    conn = {"provider": "idp", "grant": grant, "scopes": ["orders.read"],
            "resource": DEFAULT_RESOURCE, "access": {"authenticated": True}}
    if grant == "refresh_token":
        conn["refresh_token"] = "rt"
        conn.pop("scopes")
    return {
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"}, "rt": {"env": "REFRESH_TOKEN"}},
        "providers": {"idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                              "client_id": client_id, "client_secret": "client_secret",
                              "auth_method": auth_method, "timeout_ms": 3000,
                              # A 401 refreshes at once here (the default waits 10 s).
                              "drop_on_401_after_s": 0}},
        "connections": {"orders": conn},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["orders"], "header": "authorization"}]}],
    }


def start(envoy_factory, oidc, client_id, secret, auth_method, grant="client_credentials", rt="unused"):
    return envoy_factory(config(oidc, client_id, auth_method, grant), routes=ROUTES,
                         wasm_env={"CLIENT_SECRET": secret, "REFRESH_TOKEN": rt},
                         extra_clusters=[static_cluster("idp", oidc.port)])


def upstream_token(upstream):
    scheme, _, token = upstream.last().header("authorization").partition(" ")
    assert scheme == "Bearer"
    return token


@pytest.mark.parametrize("client_id,secret,auth_method", [
    ("gw-basic", "gw-basic-secret", "client_secret_basic"),
    ("gw-post", "gw-post-secret", "client_secret_post"),
])
def test_client_credentials(envoy_factory, upstream, signer, oidc, client_id, secret, auth_method):
    envoy = start(envoy_factory, oidc, client_id, secret, auth_method)
    caller = signer.token({"sub": "alice"})
    for i in range(3):
        assert envoy.request("GET", f"/orders/{i}", headers=[("authorization", f"Bearer {caller}")]).status == 200
    claims = oidc.verify_access_token(upstream_token(upstream))
    assert claims["client_id"] == client_id
    assert claims["scope"] == "orders.read"
    assert claims["aud"] == DEFAULT_RESOURCE
    assert oidc.token_request_count("client_credentials", ok_only=True) == 1
    sent = oidc.last_token_requests(1)[0]
    assert sent["client_id"] == client_id
    headers = {k.lower(): v for k, v in sent["headers"]}
    if auth_method == "client_secret_basic":
        assert headers["authorization"].startswith("Basic ")
        assert "client_secret" not in sent["form"]
    else:
        assert "authorization" not in headers
        assert sent["form"]["client_secret"] == secret
    # No claims: the route's connection needs an authenticated caller.
    assert envoy.request("GET", "/orders/x").status == 401


def test_wrong_client_secret_is_503_and_logged_as_oauth_error(envoy_factory, upstream, signer, oidc):
    envoy = start(envoy_factory, oidc, "gw-basic", "not-the-secret", "client_secret_basic")
    caller = signer.token({"sub": "alice"})
    resp = envoy.request("GET", "/orders", headers=[("authorization", f"Bearer {caller}")])
    assert resp.status == 503
    assert resp.json() == {"error": "credential_unavailable", "route": "orders", "connection": "orders"}
    envoy.wait_for_log('token fetch failed: oauth_error: token server answered 401 with error "invalid_client"')
    assert "not-the-secret" not in envoy.log_text()


def test_refresh_token_grant_with_rotation(envoy_factory, upstream, signer, oidc):
    rt = oidc.mint_refresh_token()
    envoy = start(envoy_factory, oidc, "gw-basic", "gw-basic-secret", "client_secret_basic",
                  grant="refresh_token", rt=rt)
    caller = [("authorization", f"Bearer {signer.token({'sub': 'alice'})}")]
    assert envoy.request("GET", "/orders/a", headers=caller).status == 200
    first = upstream_token(upstream)
    assert oidc.verify_access_token(first)["sub"] == "svc-orders"
    # The upstream rejects the token: latchkey drops it and refreshes with the
    # rotated refresh token. oidc-provider revokes the whole grant if an old
    # refresh token is reused, so success here proves the rotation was kept.
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject", headers=caller).status == 401
    # The refresh runs in the background; the old token serves until it is done.
    wait_until(lambda: envoy.request("GET", "/orders/b", headers=caller).status == 200
               and upstream_token(upstream) != first, timeout=10, interval=0.05,
               message="the refreshed token")
    second = upstream_token(upstream)
    assert oidc.verify_access_token(second)["sub"] == "svc-orders"
    assert oidc.token_request_count("refresh_token", ok_only=True) == 2
    forms = [r["form"] for r in oidc.last_token_requests() if r.get("grant_type") == "refresh_token"]
    assert forms[0]["refresh_token"] == rt
    assert forms[1]["refresh_token"] != rt
    log = envoy.log_text()
    for secret in (rt, forms[1]["refresh_token"], first, second, "gw-basic-secret"):
        assert secret not in log


# ---------------------------------------------------------------- token exchange (RFC 8693)


def exchange_config(oidc):
    return {
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"}},
        "providers": {"idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                              "client_id": "gw-basic", "client_secret": "client_secret",
                              "timeout_ms": 3000}},
        "connections": {"on_behalf": {"provider": "idp", "grant": "token_exchange",
                                      "scopes": ["orders.read"], "resource": DEFAULT_RESOURCE,
                                      "access": {"authenticated": True}}},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["on_behalf"], "header": "authorization"}]}],
    }


def test_token_exchange_per_caller(envoy_factory, upstream, signer, oidc):
    oidc.set_subject_jwks(signer.jwks())
    # jwt_authn must keep the caller's token (forward: true): it is the subject token.
    envoy = envoy_factory(exchange_config(oidc), routes=ROUTES, forward_jwt=True,
                          wasm_env={"CLIENT_SECRET": "gw-basic-secret"},
                          extra_clusters=[static_cluster("idp", oidc.port)])
    alice, bob = signer.token({"sub": "alice"}), signer.token({"sub": "bob"})
    for caller, sub in [(alice, "alice"), (alice, "alice"), (bob, "bob"), (alice, "alice"), (bob, "bob")]:
        resp = envoy.request("GET", "/orders/x", headers=[("authorization", f"Bearer {caller}")])
        assert resp.status == 200, resp
        token = upstream_token(upstream)
        assert token != caller
        claims = oidc.verify_access_token(token, audience=None)
        assert claims["sub"] == sub
        assert claims["act"] == {"sub": "gw-basic"}
    # One exchange per caller, then cached per caller.
    assert oidc.token_request_count(ok_only=True) == 2
    forms = [r["form"] for r in oidc.last_token_requests()]
    assert [f["subject_token"] for f in forms] == [alice, bob]
    assert {f["grant_type"] for f in forms} == {"urn:ietf:params:oauth:grant-type:token-exchange"}
    assert {f["subject_token_type"] for f in forms} == {"urn:ietf:params:oauth:token-type:access_token"}
    # The subject token is a secret too: never logged.
    assert alice not in envoy.log_text() and bob not in envoy.log_text()


def test_token_exchange_without_the_callers_token_is_401(envoy_factory, upstream, signer, oidc):
    """jwt_authn with forward: false (its default) removes authorization: there is no
    verified token to exchange, so the caller gets 401 (SPEC v1.2) and the token server
    is never called."""
    envoy = envoy_factory(exchange_config(oidc), routes=ROUTES,  # forward: false (default)
                          wasm_env={"CLIENT_SECRET": "gw-basic-secret"},
                          extra_clusters=[static_cluster("idp", oidc.port)])
    resp = envoy.request("GET", "/orders/x", headers=[("authorization", f"Bearer {signer.token({'sub': 'a'})}")])
    assert resp.status == 401
    assert resp.json() == {"error": "unauthenticated", "route": "orders"}
    wait_until(lambda: envoy.stat("wasmcustom.latchkey.requests.denied.bad_subject") == 1, timeout=5)
    assert oidc.token_request_count() == 0
