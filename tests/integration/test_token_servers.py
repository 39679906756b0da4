"""Self-checks of the token servers in token_servers.py, without Envoy or latchkey.

OidcProvider (real oidc-provider under node) must behave as the latchkey tests assume;
FaultTokenServer (a fake) must inject each fault exactly as documented.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
import time

import jwt
import pytest

from harness import LOOPBACK, Signer, http_request
from token_servers import (
    DEFAULT_RESOURCE,
    OPAQUE_RESOURCE,
    TOKEN_EXCHANGE_GRANT,
    TOKEN_TYPE_ACCESS_TOKEN,
    FaultTokenServer,
    OidcProvider,
    basic_auth_header,
    closed_port,
)

TTL = 10
EXCHANGE_TTL = 7


@pytest.fixture(scope="module")
def idp():
    with OidcProvider(ttl=TTL, exchange_ttl=EXCHANGE_TTL) as provider:
        yield provider


@pytest.fixture
def fresh_idp(idp):
    """The shared provider with zeroed stats and default subject-token handling."""
    idp.reset_stats()
    idp.set_subject_jwks(None)
    yield idp
    idp.set_subject_jwks(None)


def _form_post(port: int, path: str, fields: dict, headers: dict | None = None):
    body = "&".join(f"{k}={v}" for k, v in fields.items())
    hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    return http_request(port, "POST", path, headers=hdrs, body=body, timeout=10)


# --------------------------------------------------------------------------- oidc-provider


def test_discovery_and_jwks(fresh_idp):
    meta = fresh_idp.discovery()
    assert meta["issuer"] == fresh_idp.issuer == f"http://127.0.0.1:{fresh_idp.port}"
    assert meta["token_endpoint"] == fresh_idp.token_url
    assert meta["jwks_uri"] == fresh_idp.jwks_url
    assert meta["introspection_endpoint"] == fresh_idp.introspection_url
    for grant in ("client_credentials", "refresh_token", TOKEN_EXCHANGE_GRANT):
        assert grant in meta["grant_types_supported"]
    keys = fresh_idp.jwks()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "RSA" and keys[0]["alg"] == "RS256"
    assert "d" not in keys[0]


@pytest.mark.parametrize("client_id", ["gw-basic", "gw-post"])
def test_client_credentials_jwt(fresh_idp, client_id):
    resp = fresh_idp.client_credentials(client_id, scope="orders.read")
    assert resp.status == 200, resp.body
    body = resp.body
    assert set(body) == {"access_token", "expires_in", "scope", "token_type"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == TTL
    assert body["scope"] == "orders.read"
    assert resp.header("Cache-Control") == "no-store"

    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
    claims = fresh_idp.verify_access_token(body["access_token"])
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["aud"] == DEFAULT_RESOURCE and claims["iss"] == fresh_idp.issuer
    assert claims["scope"] == "orders.read" and claims["exp"] - claims["iat"] == TTL

    (rec,) = fresh_idp.last_token_requests(1)
    assert rec["grant_type"] == "client_credentials" and rec["client_id"] == client_id
    auth = [v for k, v in rec["headers"] if k.lower() == "authorization"]
    if client_id == "gw-basic":
        assert auth == [basic_auth_header("gw-basic", "gw-basic-secret")]
        assert "client_secret" not in rec["form"]
    else:
        assert auth == []
        assert rec["form"]["client_id"] == "gw-post"
        assert rec["form"]["client_secret"] == "gw-post-secret"


def test_jwt_signed_by_another_key_is_rejected(fresh_idp):
    token = fresh_idp.client_credentials().body["access_token"]
    head, payload, _sig = token.split(".")
    forged = Signer(kid=jwt.get_unverified_header(token)["kid"]).token(
        json.loads(base64.urlsafe_b64decode(payload + "==")))
    with pytest.raises(jwt.InvalidSignatureError):
        fresh_idp.verify_access_token(forged)


def test_scope_resource_and_audience_params(fresh_idp):
    both = fresh_idp.client_credentials(scope="orders.read orders.write").body
    assert both["scope"] == "orders.read orders.write"
    # No scope: a token without scope (no `scope` member in the response).
    none = fresh_idp.client_credentials(scope=None)
    assert none.status == 200 and "scope" not in none.body
    # Unknown (non-registered) scope values are silently dropped, not rejected.
    odd = fresh_idp.client_credentials(scope="orders.read admin")
    assert odd.status == 200 and odd.body["scope"] == "orders.read"
    # resource= the default resource works; `audience` is not a client_credentials
    # parameter for oidc-provider: it is ignored (aud stays the resource).
    res = fresh_idp.client_credentials(scope="orders.read", resource=DEFAULT_RESOURCE,
                                       audience="https://elsewhere.test")
    assert res.status == 200, res.body
    assert fresh_idp.verify_access_token(res.body["access_token"])["aud"] == DEFAULT_RESOURCE
    # An unknown resource is an error.
    bad = fresh_idp.client_credentials(resource="https://unknown.test")
    assert (bad.status, bad.body["error"]) == (400, "invalid_target")
    # The opaque resource gives an introspectable opaque token.
    opaque = fresh_idp.client_credentials(resource=OPAQUE_RESOURCE).body["access_token"]
    assert opaque.count(".") == 0
    info = fresh_idp.introspect(opaque)
    assert info["active"] is True and info["aud"] == OPAQUE_RESOURCE
    assert info["client_id"] == "gw-basic" and info["scope"] == "orders.read"
    assert fresh_idp.introspect("no-such-token") == {"active": False}
    # JWT access tokens are not stored, so not introspectable.
    with pytest.raises(RuntimeError, match="unsupported_token_type"):
        fresh_idp.introspect(both["access_token"])


def test_bad_client_authentication(fresh_idp):
    wrong = fresh_idp.token_request({"grant_type": "client_credentials"}, "gw-basic", secret="nope")
    assert wrong.status == 401
    assert wrong.body == {"error": "invalid_client", "error_description": "client authentication failed"}
    assert wrong.header("WWW-Authenticate").startswith('Basic realm="')
    post = fresh_idp.token_request({"grant_type": "client_credentials"}, "gw-post", secret="nope")
    assert (post.status, post.body["error"]) == (401, "invalid_client")
    unknown = fresh_idp.token_request({"grant_type": "client_credentials"}, "nobody", secret="x")
    assert (unknown.status, unknown.body["error"]) == (401, "invalid_client")
    anonymous = fresh_idp.token_request({"grant_type": "client_credentials"}, None)
    assert (anonymous.status, anonymous.body["error"]) == (400, "invalid_request")
    two = fresh_idp.token_request(
        {"grant_type": "client_credentials", "client_secret": "gw-basic-secret"}, "gw-basic")
    assert (two.status, two.body["error"]) == (400, "invalid_request")
    unsupported = fresh_idp.token_request({"grant_type": "password"})
    assert (unsupported.status, unsupported.body["error"]) == (400, "unsupported_grant_type")
    # oidc-provider treats client_secret_basic and client_secret_post as interchangeable:
    # the registered method is NOT enforced, so tests must check the recorded request.
    swapped = fresh_idp.token_request({"grant_type": "client_credentials"}, "gw-basic", auth="post")
    assert swapped.status == 200
    json_body = http_request(fresh_idp.port, "POST", "/token", body='{"grant_type":"client_credentials"}',
                             headers={"Content-Type": "application/json",
                                      "Authorization": basic_auth_header("gw-basic", "gw-basic-secret")})
    assert json_body.status == 400 and json_body.json()["error"] == "invalid_request"


def test_refresh_token_grant_rotates_and_detects_reuse(fresh_idp):
    rt0 = fresh_idp.mint_refresh_token()
    first = fresh_idp.refresh(rt0)
    assert first.status == 200, first.body
    body = first.body
    assert set(body) == {"access_token", "expires_in", "id_token", "refresh_token", "scope",
                         "token_type"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == TTL
    assert body["scope"] == "orders.read"
    rt1 = body["refresh_token"]
    assert rt1 != rt0
    claims = fresh_idp.verify_access_token(body["access_token"])
    assert claims["sub"] == "svc-orders" and claims["client_id"] == "gw-basic"
    assert claims["scope"] == "orders.read"

    second = fresh_idp.refresh(rt1)
    assert second.status == 200 and second.body["refresh_token"] not in (rt0, rt1)
    rt2 = second.body["refresh_token"]

    # Another client may not use it.
    other = fresh_idp.refresh(rt2, client_id="gw-post")
    assert (other.status, other.body["error"]) == (400, "invalid_grant")
    # Reusing a rotated-out token fails AND revokes the whole grant (rt2 dies too).
    reuse = fresh_idp.refresh(rt0)
    assert reuse.status == 400
    assert reuse.body == {"error": "invalid_grant", "error_description": "grant request is invalid"}
    assert fresh_idp.refresh(rt2).status == 400

    # A scope narrower than the grant is allowed; a wider one is invalid_scope.
    rt = fresh_idp.mint_refresh_token(scope="offline_access orders.read orders.write")
    narrow = fresh_idp.refresh(rt, scope="orders.write")
    assert narrow.status == 200 and narrow.body["scope"] == "orders.write"
    assert "id_token" not in narrow.body
    wide = fresh_idp.refresh(fresh_idp.mint_refresh_token(), scope="orders.write")
    assert (wide.status, wide.body["error"]) == (400, "invalid_scope")

    stats = fresh_idp.stats()
    assert stats["by_grant_type"] == {"refresh_token": 7}
    assert stats["ok_by_grant_type"] == {"refresh_token": 3}


def test_token_exchange(fresh_idp):
    signer = Signer()
    subject = signer.token({"sub": "alice"})
    fresh_idp.set_subject_jwks(signer.jwks())
    resp = fresh_idp.exchange(subject, scope="orders.read")
    assert resp.status == 200, resp.body
    assert resp.body["issued_token_type"] == TOKEN_TYPE_ACCESS_TOKEN
    assert resp.body["token_type"] == "Bearer" and resp.body["expires_in"] == EXCHANGE_TTL
    assert resp.body["scope"] == "orders.read"
    claims = fresh_idp.verify_access_token(resp.body["access_token"])
    assert claims["sub"] == "alice" and claims["act"] == {"sub": "gw-basic"}
    assert claims["exp"] - claims["iat"] == EXCHANGE_TTL

    aud = fresh_idp.exchange(signer.token({"sub": "bob"}), client_id="gw-post",
                             audience="https://orders.internal")
    assert aud.status == 200, aud.body
    assert "scope" not in aud.body
    assert fresh_idp.verify_access_token(aud.body["access_token"],
                                         audience="https://orders.internal")["sub"] == "bob"

    def error(token, **form):
        r = fresh_idp.exchange(token, **form)
        return r.status, r.body["error"]

    assert error(Signer().token({"sub": "mallory"})) == (400, "invalid_grant")
    assert error(signer.token({"sub": "alice"}, exp_in=-60)) == (400, "invalid_grant")
    assert error(signer.token({"name": "no sub"})) == (400, "invalid_grant")
    assert error(subject, subject_token_type="urn:example:weird") == (400, "invalid_request")
    assert error(subject, resource="https://unknown.test") == (400, "invalid_target")
    missing = fresh_idp.token_request({"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": subject})
    assert (missing.status, missing.body["error"]) == (400, "invalid_request")

    fresh_idp.set_subject_jwks(None)  # decode-only: any signature, `sub` still required
    assert fresh_idp.exchange(Signer().token({"sub": "carol"})).status == 200
    assert fresh_idp.stats()["by_grant_type"] == {TOKEN_EXCHANGE_GRANT: 9}


def test_stats_and_recorded_requests(fresh_idp):
    fresh_idp.client_credentials()
    fresh_idp.client_credentials("gw-post")
    fresh_idp.token_request({"grant_type": "client_credentials"}, "gw-basic", secret="bad")
    fresh_idp.refresh(fresh_idp.mint_refresh_token())
    fresh_idp.introspect("x")
    stats = fresh_idp.stats()
    assert stats["token_requests"] == 4
    assert stats["by_grant_type"] == {"client_credentials": 3, "refresh_token": 1}
    assert stats["ok_by_grant_type"] == {"client_credentials": 2, "refresh_token": 1}
    assert stats["errors"] == {"invalid_client": 1}
    assert stats["by_status"] == {"200": 3, "401": 1}
    assert stats["introspection_requests"] == 1
    assert fresh_idp.token_request_count("client_credentials", ok_only=True) == 2
    recs = fresh_idp.last_token_requests()
    assert [r["status"] for r in recs] == [200, 200, 401, 200]
    assert [r["error"] for r in recs] == [None, None, "invalid_client", None]
    assert len(fresh_idp.last_token_requests(2)) == 2
    fresh_idp.reset_stats()
    assert fresh_idp.stats()["token_requests"] == 0 and fresh_idp.last_token_requests() == []


def test_provider_stops_by_pid():
    with OidcProvider(ttl=5) as p:
        pid, port = p.pid, p.port
        assert p.client_credentials().status == 200
    assert not p.running
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    assert pid is not None


def test_provider_start_failures(monkeypatch, tmp_path):
    import token_servers

    p = OidcProvider(ttl=5, env={"OAUTH_EXCHANGE_TTL": "soon"}, log_dir=tmp_path)
    with pytest.raises(token_servers.OidcStartError, match="invalid OAUTH_EXCHANGE_TTL"):
        p.start()
    assert not p.running
    monkeypatch.setattr(token_servers, "OAUTH_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="npm ci --prefix tests/oauth"):
        OidcProvider().start()


# ------------------------------------------- oidc-provider: clients without a secret (v1.2)

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _assertion(key, alg, client_id, aud, *, kid="k1", jti=None, lifetime=60, **claims):
    now = int(time.time())
    payload = {"iss": client_id, "sub": client_id, "aud": aud, "jti": jti or os.urandom(16).hex(),
               "iat": now, "exp": now + lifetime, **claims}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})


def _with_assertion(idp, client_id, assertion):
    return idp.token_request({"grant_type": "client_credentials", "scope": "orders.read",
                              "client_id": client_id, "client_assertion_type": JWT_BEARER,
                              "client_assertion": assertion}, client_id=None)


@pytest.fixture(scope="module")
def mtls_ca():
    from secret_stores import LocalCA
    ca = LocalCA(hosts=("localhost",))
    yield ca
    ca.cleanup()


@pytest.fixture(scope="module")
def keyed_idp(mtls_ca):
    """oidc-provider with private_key_jwt clients (an RSA key, RS256 and PS256; an EC key,
    ES256) and a tls_client_auth client on its mTLS port."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from secret_stores import public_jwk
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    gateway = mtls_ca.issue_client("latchkey-gateway", "gateway", org="latchkey tests")
    stranger = mtls_ca.issue_client("someone-else", "stranger", org="latchkey tests")
    clients = {
        "pk-rs256": {"jwks": {"keys": [public_jwk(rsa_key.public_key(), kid="k1")]}, "alg": "RS256"},
        "pk-ps256": {"jwks": {"keys": [public_jwk(rsa_key.public_key(), kid="k1")]}, "alg": "PS256"},
        "pk-es256": {"jwks": {"keys": [public_jwk(ec_key.public_key(), kid="k1")]}, "alg": "ES256"},
    }
    with OidcProvider(ttl=TTL, private_key_jwt_clients=clients,
                      tls_client_auth_clients={"gw-mtls": gateway.subject_dn},
                      mtls=(mtls_ca.cert_path, mtls_ca.key_path, mtls_ca.ca_path)) as provider:
        provider.keys = {"RS256": rsa_key, "PS256": rsa_key, "ES256": ec_key}
        provider.gateway, provider.stranger = gateway, stranger
        yield provider


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_private_key_jwt_client_is_verified_by_oidc_provider(keyed_idp, alg):
    idp, client = keyed_idp, f"pk-{alg.lower()}"
    key = idp.keys[alg]
    good = _assertion(key, alg, client, idp.token_url)
    resp = _with_assertion(idp, client, good)
    assert resp.status == 200, resp.body
    assert idp.verify_access_token(resp.body["access_token"])["client_id"] == client
    rec = idp.last_token_requests(1)[0]
    assert rec["client_id"] == client and rec["form"]["client_assertion"] == good
    assert rec["tls"] is None
    # The same assertion again: oidc-provider's replay detection (jti) refuses it.
    assert _with_assertion(idp, client, good).body["error"] == "invalid_client"
    # Its issuer is an accepted audience too.
    assert _with_assertion(idp, client, _assertion(key, alg, client, idp.issuer)).status == 200
    other_alg = "PS256" if alg == "RS256" else "RS256" if alg == "PS256" else None
    refused = [
        _assertion(key, alg, client, "https://elsewhere.test/token"),         # aud
        _assertion(key, alg, client, idp.token_url, kid="k2"),                # unknown kid
        _assertion(key, alg, client, idp.token_url, iss="someone-else"),      # iss != client_id
        _assertion(key, alg, client, idp.token_url, lifetime=-30),            # expired
    ]
    if other_alg:  # signed right, but not with the registered token_endpoint_auth_signing_alg
        refused.append(_assertion(key, other_alg, client, idp.token_url))
    for bad in refused:
        resp = _with_assertion(idp, client, bad)
        assert (resp.status, resp.body["error"]) == (401, "invalid_client"), (bad, resp)
    # A secret is no way in for such a client.
    assert idp.token_request({"grant_type": "client_credentials"}, client, secret="x").status in (400, 401)


def _mtls_post(idp, cert, fields, ca):
    import ssl
    import urllib.parse
    ctx = ssl.create_default_context(cafile=str(ca.ca_path))
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    conn = http.client.HTTPSConnection("localhost", idp.mtls_port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/token", body=urllib.parse.urlencode(fields),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_tls_client_auth_client_needs_its_certificate(keyed_idp, mtls_ca):
    idp = keyed_idp
    form = {"grant_type": "client_credentials", "client_id": "gw-mtls", "scope": "orders.read"}
    status, body = _mtls_post(idp, idp.gateway, form, mtls_ca)
    assert status == 200, body
    assert idp.verify_access_token(body["access_token"])["client_id"] == "gw-mtls"
    rec = idp.last_token_requests(1)[0]
    assert rec["tls"]["authorized"] is True
    assert rec["tls"]["subject"] == idp.gateway.subject_dn == "CN=latchkey-gateway,O=latchkey tests"
    assert rec["tls"]["port"] == idp.mtls_port
    # Another certificate of the same CA, no certificate, or the plain port: refused.
    assert _mtls_post(idp, idp.stranger, form, mtls_ca)[1]["error"] == "invalid_client"
    assert _mtls_post(idp, None, form, mtls_ca)[1]["error"] == "invalid_client"
    assert idp.last_token_requests(1)[0]["tls"] == {"authorized": False, "subject": None,
                                                     "fingerprint256": None, "port": idp.mtls_port}
    assert idp.token_request(form, client_id=None).body["error"] == "invalid_client"
    # The other clients still work on the plain port.
    assert idp.client_credentials().status == 200


def test_federated_credential_server_checks_the_managed_identity_assertion():
    from secret_stores import FEDERATION_AUDIENCE, ImdsServer
    from token_servers import FederatedCredentialServer
    app = "6a0e2d9c-1111-4222-8333-944455566677"
    with ImdsServer() as imds, FederatedCredentialServer(imds.jwks) as entra:
        mi = imds.system_identity
        entra.add_credential(app, imds.issuer, mi.object_id)
        assertion = imds.token_for(FEDERATION_AUDIENCE)
        claims = jwt.decode(assertion, jwt.PyJWK(imds.jwks()["keys"][0]).key, algorithms=["RS256"],
                            audience=FEDERATION_AUDIENCE, issuer=imds.issuer)
        assert claims["sub"] == claims["oid"] == mi.object_id and claims["azp"] == mi.client_id
        # Other resources still get opaque tokens.
        assert imds.token_for("https://vault.azure.net").count(".") == 0

        def post(**form):
            fields = {"grant_type": "client_credentials", "client_id": app,
                      "scope": "https://graph.microsoft.com/.default",
                      "client_assertion_type": JWT_BEARER, "client_assertion": assertion, **form}
            fields = {k: v for k, v in fields.items() if v is not None}
            return _form_post(entra.port, entra.token_path,
                              {k: __import__("urllib.parse").parse.quote(v, safe="") for k, v in fields.items()})

        resp = post()
        assert resp.status == 200, resp.body
        assert resp.json()["access_token"] == entra.issued()[-1][1]
        assert entra.last().verified and entra.last().claims["aud"] == FEDERATION_AUDIENCE
        cases = [
            ({"client_id": "unknown-app"}, 400, 700016),
            ({"client_secret": "s"}, 401, 7000215),
            ({"client_assertion": None}, 401, 7000218),
            ({"scope": "https://graph.microsoft.com"}, 400, 1002012),
            # An opaque token (IMDS gives JWTs only for the federation audience here).
            ({"client_assertion": imds.token_for("api://another-audience")}, 401, 5002727),
        ]
        # Signed by a key the issuer doesn't publish, under the issuer's kid.
        from cryptography.hazmat.primitives.asymmetric import rsa
        forged = jwt.encode(jwt.decode(assertion, options={"verify_signature": False}),
                            rsa.generate_private_key(public_exponent=65537, key_size=2048),
                            algorithm="RS256", headers={"kid": imds.jwt_kid})
        cases.append(({"client_assertion": forged}, 401, 700027))
        # A valid token of the identity, but for another audience: no federated record.
        imds.jwt_resources.add("api://another-audience")
        cases.append(({"client_assertion": imds.token_for("api://another-audience")}, 400, 70021))
        other = imds.add_identity(name="other-mi")
        cases.append(({"client_assertion": imds.token_for(FEDERATION_AUDIENCE, other.client_id)}, 400, 70021))
        for form, status, code in cases:
            resp = post(**form)
            assert (resp.status, entra.last().error_code) == (status, code), (form, resp.body)
            assert resp.json()["error_description"].startswith(f"AADSTS{code}: ")


# --------------------------------------------------------------------------- the fake


@pytest.fixture
def fake():
    with FaultTokenServer(ttl=120) as server:
        yield server


def _post(server: FaultTokenServer, fields: dict | None = None, path: str = "/token",
          headers: dict | None = None):
    return _form_post(server.port, path, fields or {"grant_type": "client_credentials"}, headers)


def test_fake_default_tokens_and_recording(fake):
    r1 = _post(fake, headers={"Authorization": basic_auth_header("gw", "s3cr+t")})
    r2 = _post(fake, {"grant_type": "client_credentials", "scope": "a+b"})
    assert r1.status == r2.status == 200 and r1.header("Content-Type") == "application/json"
    assert r1.json() == {"access_token": "fake-1", "token_type": "Bearer", "expires_in": 120}
    assert r2.json()["access_token"] == "fake-2" and fake.issued == 2
    assert fake.count() == 2
    first, second = fake.requests()
    assert first.method == "POST" and first.path == "/token"
    assert first.basic_auth() == ("gw", "s3cr+t")
    assert first.form == {"grant_type": "client_credentials"}
    assert second.form["scope"] == "a b" and second.form_all["scope"] == ["a b"]
    assert second.body == b"grant_type=client_credentials&scope=a+b"
    assert fake.last() == second and first.at <= second.at
    assert fake.url == f"http://127.0.0.1:{fake.port}/token"
    other = _post(fake, path="/elsewhere")
    assert other.status == 404 and fake.count() == 3
    fake.clear()
    assert fake.count() == 0 and fake.requests() == []


def test_fake_keep_alive_connection(fake):
    conn = http.client.HTTPConnection(LOOPBACK, fake.port, timeout=5)
    try:
        for i in (1, 2):
            conn.request("POST", "/token", body="grant_type=client_credentials",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            assert json.loads(resp.read())["access_token"] == f"fake-{i}"
    finally:
        conn.close()


def test_fake_delay(fake):
    fake.set_mode(delay_s=0.4)
    t0 = time.monotonic()
    assert _post(fake).status == 200
    assert time.monotonic() - t0 >= 0.4
    with pytest.raises(ValueError):
        fake.set_mode(delay_s=1000)


def test_fake_status_and_error_json(fake):
    fake.set_mode(status=503)
    r = _post(fake)
    assert (r.status, r.body) == (503, b"fault 503")
    fake.set_mode(status=500, body={"oops": True})
    r = _post(fake)
    assert r.status == 500 and r.json() == {"oops": True}
    fake.set_mode(error_json=True)
    r = _post(fake)
    assert r.status == 400 and r.json()["error"] == "invalid_client"
    assert set(r.json()) == {"error", "error_description"}
    fake.set_mode(error_json="invalid_grant", status=401)
    r = _post(fake)
    assert r.status == 401 and r.json()["error"] == "invalid_grant"
    assert fake.issued == 0


def test_fake_malformed_success_bodies(fake):
    fake.set_mode(garbage=True)
    r = _post(fake)
    assert r.status == 200
    with pytest.raises(ValueError):
        r.json()
    fake.set_mode(missing_token=True)
    assert _post(fake).json() == {"token_type": "Bearer", "expires_in": 120}
    fake.set_mode(wrong_type=True)
    assert _post(fake).json()["token_type"] == "mac"
    fake.set_mode(wrong_type="DPoP")
    assert _post(fake).json()["token_type"] == "DPoP"
    fake.set_mode(no_expires_in=True)
    assert "expires_in" not in _post(fake).json()
    fake.set_mode(expires_in_string=True, ttl=3600)
    assert _post(fake).json()["expires_in"] == "3600"
    fake.set_mode(ttl=5, token_prefix="tok-", rotate_refresh=True)
    body = _post(fake).json()
    assert body["expires_in"] == 5 and body["access_token"] == f"tok-{fake.issued}"
    assert body["refresh_token"] == f"rt-{fake.issued}"


def test_fake_huge_body(fake):
    size = 2 * 1024 * 1024
    fake.set_mode(huge=size)
    r = _post(fake)
    assert r.status == 200 and len(r.body) == size
    assert r.header("Content-Length") == str(size)
    assert r.json()["access_token"].startswith("fake-")


def test_fake_close_without_answer(fake):
    fake.set_mode(close=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        _post(fake)
    assert fake.count() == 1


def test_fake_times_then_back_to_normal(fake):
    fake.set_mode(status=503, times=2)
    assert [_post(fake).status for _ in range(3)] == [503, 503, 200]
    fake.update_mode(ttl=9)
    fake.update_mode(token_prefix="p-")
    body = _post(fake).json()
    assert body["expires_in"] == 9 and body["access_token"].startswith("p-")
    fake.reset_mode()
    assert fake.mode().ttl is None


def test_fake_stop_and_closed_ports():
    server = FaultTokenServer().start()
    server.set_mode(delay_s=30)
    port = server.port
    errors: list[BaseException] = []

    def slow():
        try:
            _post(server)
        except BaseException as e:  # noqa: BLE001 - the dropped connection is the point
            errors.append(e)

    t = threading.Thread(target=slow)
    t.start()
    server.wait_for_count(1, timeout=5)
    t0 = time.monotonic()
    server.stop()
    t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert errors and isinstance(errors[0], (http.client.RemoteDisconnected, ConnectionError))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    server.stop()  # idempotent
    refused = closed_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, refused), timeout=2).close()
