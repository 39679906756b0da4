"""Client authentication without a stored secret (SPEC v1.2) in a real Envoy 1.40.

Three `auth_method`s of oauth2 providers, each against a server that really checks it:

- `private_key_jwt`: latchkey has a key service sign a fresh client assertion for every
  token request; the key never enters the proxy. Signed by the real OpenBao's Transit
  engine (RS256, PS256, ES256; a token whose policy allows only `update` on
  transit/sign/<key>/*) and by the Key Vault stand-in (`POST <key>/sign`, with a managed
  identity token from the IMDS stand-in; the stand-in's answers are those of Key Vault as
  azure-keyvault-keys' CryptographyClient reads them, see test_secret_store_servers.py).
  The token server is the real oidc-provider, with the client registered with the key's
  public JWK (exported from Transit / the vault): it verifies signature, alg, kid, iss =
  sub = client_id, aud, exp, and refuses a jti it has seen.
- `tls_client_auth` (RFC 8705 §2): Envoy's cluster to the token server presents a client
  certificate; oidc-provider (features.mTLS, tlsClientAuth) serves its token endpoint over
  mutual TLS and authenticates the client by the certificate's subject DN.
- `client_assertion`: the assertion is another connection's token: an
  `azure_managed_identity` connection for `api://AzureADTokenExchange` (Entra workload
  identity federation). The IMDS stand-in issues it as a signed JWT; a stand-in for
  Entra's federated-credential check (token_servers.FederatedCredentialServer: no real
  server here can do that check) verifies its signature against the IMDS JWKS, its
  audience, issuer and subject.

And what goes wrong: a key service down, refusing (403), sealed (503), slow or answering
garbage is a 503 with retry-after and backoff, counted and logged with the connection and
the kind of failure, and the token server never sees a request (no secret to fall back
on). No assertion, signature or key identifier reaches Envoy's log.

A Key Vault 401 to a sign call drops the identity token Key Vault refused and signs once
more with a fresh one, as a Key Vault secret read does.

Each method's token request as the token server received it is printed (assertion
decoded, signature redacted): run with `-s` to see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import time
import types
import urllib.parse

import jwt
import pytest
from cryptography.hazmat.primitives import hashes

from harness import static_cluster, wait_until
from secret_stores import (FEDERATION_AUDIENCE, KEY_VAULT_RESOURCE, KeyVaultStack, LocalCA,
                           OpenBao, b64url_decode, tls_cluster)
from token_servers import (DEFAULT_RESOURCE, FaultTokenServer, FederatedCredentialServer,
                           OidcProvider, closed_port)

ROUTES = [{"name": "orders", "prefix": "/orders"}, {"name": "default", "prefix": "/"}]
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
UNAVAILABLE = {"error": "credential_unavailable", "route": "orders", "connection": "orders"}
# Every kind of signing failure latchkey counts (src/stats.rs SIGNING_FAILURES).
SIGNING_KINDS = ("connect", "timeout", "forbidden", "status", "malformed", "identity")

# Transit keys and the clients oidc-provider registers for them.
TRANSIT_RSA, TRANSIT_EC = "lk-transit-rsa", "lk-transit-ec"
KV_RSA, KV_EC = "lk-kv-rsa", "lk-kv-ec"
# An explicit kid (signing_key.kid): a value that appears nowhere else, to look for in logs.
EXPLICIT_KID = "kid-" + secrets.token_hex(8)
ENTRA_APP = "9c2f6a1e-5b7d-4e3a-8f10-2a4b6c8d0e12"     # the app registration's client_id


# --------------------------------------------------------------------------- the servers


@pytest.fixture(scope="module")
def world():
    """Started once for the module: a real OpenBao with Transit keys, the Key Vault + IMDS
    stand-ins with vault keys, a test CA with the gateway's client certificate, the
    federated-credential stand-in, and oidc-provider with a client per key and method."""
    with contextlib.ExitStack() as stack:
        bao = OpenBao()
        bao.start()
        stack.callback(bao.stop)
        bao.enable_transit()
        bao.transit_key(TRANSIT_RSA, "rsa-2048")
        bao.transit_key(TRANSIT_EC, "ecdsa-p256")
        transit_token = bao.transit_sign_token(TRANSIT_RSA, TRANSIT_EC)

        kvs = KeyVaultStack()
        kvs.start()
        stack.callback(kvs.stop)
        kv = kvs.kv
        kv.create_key(KV_RSA, "RSA")
        kv_ec_version = kv.create_key(KV_EC, "EC")

        ca = LocalCA(hosts=("localhost",))
        stack.callback(ca.cleanup)
        gateway = ca.issue_client("latchkey-gateway", "gateway", org="latchkey tests")
        # A certificate of the Key Vault EC key (its x5t#S256 goes in the assertion header).
        kv_cert = ca.issue_client("latchkey-gateway-signer", "kv-ec-cert", org="latchkey tests",
                                  public_key=kv.public_key(KV_EC))

        entra = FederatedCredentialServer(kvs.imds.jwks, tenant_id=kvs.imds.tenant_id)
        entra.start()
        stack.callback(entra.stop)

        kv_ec_url = kv.key_id(KV_EC, kv_ec_version)
        keys = {
            # client_id: (JWK, alg); the JWK's kid is what latchkey sends by default:
            # the Transit key's name, the Key Vault key identifier as configured.
            "gw-transit-rs256": (bao.transit_jwk(TRANSIT_RSA), "RS256"),
            "gw-transit-ps256": (bao.transit_jwk(TRANSIT_RSA), "PS256"),
            "gw-transit-es256": (bao.transit_jwk(TRANSIT_EC), "ES256"),
            "gw-transit-kid": (bao.transit_jwk(TRANSIT_EC, kid=EXPLICIT_KID), "ES256"),
            "gw-kv-rs256": (kv.key_jwk(KV_RSA, kid=kv.key_id(KV_RSA)), "RS256"),
            "gw-kv-ps256": (kv.key_jwk(KV_RSA, kid=kv.key_id(KV_RSA)), "PS256"),
            "gw-kv-es256": ({**kv.key_jwk(KV_EC, kid=kv_ec_url), "x5t#S256": kv_cert.thumbprint_s256},
                            "ES256"),
        }
        oidc = OidcProvider(
            ttl=300, history=100,
            private_key_jwt_clients={cid: {"jwks": {"keys": [jwk]}, "alg": alg}
                                     for cid, (jwk, alg) in keys.items()},
            tls_client_auth_clients={"gw-mtls": gateway.subject_dn},
            mtls=(ca.cert_path, ca.key_path, ca.ca_path))
        oidc.start()
        stack.callback(oidc.stop)
        yield types.SimpleNamespace(bao=bao, transit_token=transit_token, kvs=kvs, kv=kv,
                                    imds=kvs.imds, ca=ca, gateway=gateway, kv_cert=kv_cert,
                                    kv_ec_url=kv_ec_url, entra=entra, oidc=oidc, keys=keys)
        assert kvs.errors == [], kvs.errors


@pytest.fixture
def w(world):
    """The module's servers, with oidc-provider's and the stand-ins' records cleared and
    every injected fault undone after the test."""
    world.oidc.reset_stats()
    world.kv.clear()
    world.imds.clear()
    world.entra.clear()
    yield world
    world.kv.clear_faults()
    world.kv.allow("*")
    for name in (KV_RSA, KV_EC):
        world.kv.allow(name)
    world.imds.recover()


# --------------------------------------------------------------------------- configurations


def clusters(w, **extra):
    out = [static_cluster("idp", w.oidc.port), w.bao.envoy_cluster("vault"), *w.kvs.clusters(),
           tls_cluster("idp_mtls", w.oidc.mtls_port, sni="localhost", ca_path=w.ca.ca_path,
                       client_cert=(w.gateway.cert_path, w.gateway.key_path)),
           tls_cluster("idp_no_cert", w.oidc.mtls_port, sni="localhost", ca_path=w.ca.ca_path),
           static_cluster("entra", w.entra.port)]
    out += [static_cluster(name, port) for name, port in extra.items()]
    return out


def config(provider: dict, *, grant="client_credentials", connections=None, providers=None,
           secrets_=None, conn_extra=None) -> dict:
    """One route "orders" injecting connection "orders" of provider "idp"."""
    conn = {"provider": "idp", "grant": grant, "scopes": ["orders.read"],
            "resource": DEFAULT_RESOURCE, "access": {"public": True}, **(conn_extra or {})}
    if grant == "refresh_token":
        conn["refresh_token"] = "rt"
        conn.pop("scopes")
    return {
        "secrets": secrets_ or {},
        "providers": {"idp": {"type": "oauth2", "timeout_ms": 3000,
                              # A 401 refreshes at once (the default waits 10 s).
                              "drop_on_401_after_s": 0, **provider}, **(providers or {})},
        "connections": {"orders": conn, **(connections or {})},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["orders"], "header": "authorization"}],
                    "drop_token_on_401": True}],
    }


def transit_provider(w, client_id, key, alg, *, url=None, cluster="vault", **signing):
    return {"cluster": "idp", "token_url": w.oidc.token_url, "client_id": client_id,
            "auth_method": "private_key_jwt",
            "signing_key": {"vault_transit": {"cluster": cluster, "url": url or w.bao.url,
                                              "key": key, "token": "transit_token"},
                            "alg": alg, **signing}}


TRANSIT_SECRETS = {"transit_token": {"env": "TRANSIT_TOKEN"}}


def kv_setup(w, client_id, key_url, alg, **signing):
    """(provider, extra providers, extra connections) for a Key Vault signing key."""
    provider = {"cluster": "idp", "token_url": w.oidc.token_url, "client_id": client_id,
                "auth_method": "private_key_jwt",
                "signing_key": {"azure_key_vault_key": key_url, "cluster": "keyvault",
                                "identity": "kv_signer", "alg": alg, **signing}}
    providers = {"azure_mi": {"type": "azure_managed_identity", "cluster": "imds",
                              "endpoint": w.imds.endpoint}}
    connections = {"kv_signer": {"provider": "azure_mi", "resource": KEY_VAULT_RESOURCE}}
    return provider, providers, connections


def start_transit(envoy_factory, w, client_id, key, alg, *, token=None, grant="client_credentials",
                  rt=None, extra_clusters=None, component_log_level="wasm:debug", **kw):
    env = {"TRANSIT_TOKEN": token or w.transit_token}
    secrets_ = dict(TRANSIT_SECRETS)
    if rt is not None:
        env["REFRESH_TOKEN"] = rt
        secrets_["rt"] = {"env": "REFRESH_TOKEN"}
    cfg = config(transit_provider(w, client_id, key, alg, **kw), grant=grant, secrets_=secrets_)
    return envoy_factory(cfg, routes=ROUTES, wasm_env=env, component_log_level=component_log_level,
                         extra_clusters=clusters(w, **(extra_clusters or {})))


def start_kv(envoy_factory, w, client_id, key_url, alg, **signing):
    provider, providers, connections = kv_setup(w, client_id, key_url, alg, **signing)
    cfg = config(provider, providers=providers, connections=connections)
    return envoy_factory(cfg, routes=ROUTES, component_log_level="wasm:debug", extra_clusters=clusters(w))


# --------------------------------------------------------------------------- checks


def stat(envoy, name, settle=True):
    return envoy.stat(f"wasmcustom.latchkey.{name}", settle=settle)


def upstream_token(upstream) -> str:
    scheme, _, token = upstream.last().header("authorization").partition(" ")
    assert scheme == "Bearer"
    return token


def requests_of(oidc, client_id):
    return [r for r in oidc.last_token_requests() if r["client_id"] == client_id
            or r["form"].get("client_id") == client_id]


def check_assertion(rec: dict, *, client_id: str, aud: str, alg: str, kid: str, jwk: dict,
                    x5t: str | None = None) -> tuple[dict, dict]:
    """The token request carries client_id and a jwt-bearer client_assertion, nothing
    secret; the assertion's header and claims are what SPEC v1.2 says; its signature
    verifies with the registered JWK. Returns (header, claims)."""
    form = rec["form"]
    headers = {k.lower(): v for k, v in rec["headers"]}
    assert "authorization" not in headers, headers
    assert "client_secret" not in form
    assert form["client_id"] == client_id
    assert form["client_assertion_type"] == JWT_BEARER
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header == {"alg": alg, "typ": "JWT", "kid": kid, **({"x5t#S256": x5t} if x5t else {})}
    claims = jwt.decode(assertion, jwt.PyJWK(jwk).key, algorithms=[alg], audience=aud,
                        issuer=client_id, options={"require": ["iss", "sub", "aud", "jti", "iat", "exp"]})
    assert set(claims) == {"iss", "sub", "aud", "jti", "iat", "exp"}
    assert claims["sub"] == client_id
    assert re.fullmatch(r"[0-9a-f]{32}", claims["jti"]), claims["jti"]
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert abs(claims["iat"] - time.time()) < 60
    return header, claims


def as_received(rec: dict) -> dict:
    """A recorded token request for the closing note: the assertion decoded, its
    signature redacted (only its length shown)."""
    form = dict(rec["form"])
    if "client_assertion" in form:
        assertion = form["client_assertion"]
        parts = assertion.split(".")
        form["client_assertion"] = {
            "header": jwt.get_unverified_header(assertion),
            "claims": jwt.decode(assertion, options={"verify_signature": False}),
            "signature": f"<redacted: {len(b64url_decode(parts[2]))} bytes>"}
    for name in ("refresh_token",):
        if name in form:
            form[name] = "<redacted>"
    keep = {"content-type", "host", "authorization"}
    return {"method": rec["method"], "path": rec["path"], "tls": rec.get("tls"),
            "headers": {k.lower(): v for k, v in rec["headers"] if k.lower() in keep},
            "form": form, "status": rec["status"], "client_id": rec["client_id"]}


def show(title: str, received: dict) -> None:
    print(f"\n=== TOKEN REQUEST AS RECEIVED: {title} ===\n" + json.dumps(received, indent=2))


def assert_nothing_secret_in_log(envoy, *values):
    text = envoy.log_text() + envoy.access_log_text()
    for v in values:
        assert v and v not in text, f"{v[:40]!r}... reached Envoy's log"


def assertion_parts(rec) -> list[str]:
    """What of an assertion must never be logged: all of it, its signed part and its
    signature (header and claims alone are base64url of JSON that has the jti)."""
    a = rec["form"]["client_assertion"]
    head, body, sig = a.split(".")
    return [a, f"{head}.{body}", sig, body]


# --------------------------------------------------------------------------- private_key_jwt


@pytest.mark.parametrize("client_id,key,alg,size", [
    ("gw-transit-rs256", TRANSIT_RSA, "RS256", 256),
    ("gw-transit-ps256", TRANSIT_RSA, "PS256", 256),
    ("gw-transit-es256", TRANSIT_EC, "ES256", 64),
], ids=["RS256", "PS256", "ES256"])
def test_private_key_jwt_signed_by_openbao_transit(envoy_factory, upstream, w, client_id, key, alg, size):
    audited = len(w.bao.audit_requests(f"transit/sign/{key}/sha2-256", "update"))
    envoy = start_transit(envoy_factory, w, client_id, key, alg)
    for i in range(3):
        resp = envoy.request("GET", f"/orders/{i}")
        assert resp.status == 200, resp
    # The token oidc-provider issued to this client reached the upstream.
    claims = w.oidc.verify_access_token(upstream_token(upstream))
    assert claims["client_id"] == client_id and claims["scope"] == "orders.read"
    (rec,) = requests_of(w.oidc, client_id)
    assert rec["status"] == 200 and rec["grant_type"] == "client_credentials" and rec["tls"] is None
    jwk, _ = w.keys[client_id]
    check_assertion(rec, client_id=client_id, aud=w.oidc.token_url, alg=alg, kid=key, jwk=jwk)
    assert len(b64url_decode(rec["form"]["client_assertion"].split(".")[2])) == size
    assert set(rec["form"]) == {"grant_type", "scope", "resource", "client_id",
                                "client_assertion_type", "client_assertion"}
    show(f"private_key_jwt, OpenBao Transit {alg}", as_received(rec))
    # One signature for the one token request, by the token with only the sign policy.
    signs = w.bao.wait_for_audit(audited + 1, f"transit/sign/{key}/sha2-256", "update")
    assert len(signs) == audited + 1
    assert signs[-1]["auth"]["policies"] == [f"transit-sign-{TRANSIT_RSA}-{TRANSIT_EC}"]
    assert stat(envoy, "provider.idp.signing.requests") == 1
    assert all(stat(envoy, f"provider.idp.signing.failure.{k}") == 0 for k in SIGNING_KINDS)
    assert stat(envoy, "connection.orders.token.requests") == 1
    assert stat(envoy, "connection.orders.token.success") == 1
    # Nor the assertion, nor the key identifier (here the Transit key's name), nor tokens.
    assert_nothing_secret_in_log(envoy, *assertion_parts(rec), key, w.transit_token, upstream_token(upstream))


@pytest.mark.parametrize("client_id,key,alg,pinned,x5t", [
    ("gw-kv-rs256", KV_RSA, "RS256", False, False),
    ("gw-kv-ps256", KV_RSA, "PS256", False, False),
    ("gw-kv-es256", KV_EC, "ES256", True, True),
], ids=["RS256", "PS256", "ES256-pinned-x5t"])
def test_private_key_jwt_signed_by_key_vault(envoy_factory, upstream, w, client_id, key, alg, pinned, x5t):
    key_url = w.kv_ec_url if pinned else w.kv.key_id(key)
    extra = {"x5t#S256": w.kv_cert.thumbprint_s256} if x5t else {}
    envoy = start_kv(envoy_factory, w, client_id, key_url, alg, **extra)
    for i in range(3):
        resp = envoy.request("GET", f"/orders/{i}")
        assert resp.status == 200, resp
    assert w.oidc.verify_access_token(upstream_token(upstream))["client_id"] == client_id
    (rec,) = requests_of(w.oidc, client_id)
    assert rec["status"] == 200
    jwk, _ = w.keys[client_id]
    # kid: the key identifier as configured (with its version when pinned).
    check_assertion(rec, client_id=client_id, aud=w.oidc.token_url, alg=alg, kid=key_url, jwk=jwk,
                    x5t=w.kv_cert.thumbprint_s256 if x5t else None)
    show(f"private_key_jwt, Azure Key Vault {alg}" + (" (x5t#S256)" if x5t else ""), as_received(rec))
    # Key Vault signed the SHA-256 of exactly the assertion's first two parts, once, for
    # the managed identity whose token IMDS gave latchkey.
    signing_input = rec["form"]["client_assertion"].rsplit(".", 1)[0]
    (made,) = w.kv.signs(key)
    assert made.alg == alg and made.digest == hashlib.sha256(signing_input.encode()).digest()
    assert made.client_id == w.imds.system_identity.client_id
    (sign_req,) = [r for r in w.kv.requests() if r.operation == "sign"]
    # The latest version (no version in the key URL) is an empty segment, as Azure's SDKs send it.
    key_path = urllib.parse.urlsplit(key_url).path
    assert sign_req.path == key_path + ("//sign" if key_path.count("/") == 2 else "/sign")
    assert sign_req.query == {"api-version": "7.4"} and sign_req.sni == "kv-test.vault.azure.net"
    assert sign_req.header("content-type") == "application/json"
    (imds_req,) = w.imds.requests()
    assert imds_req.query["resource"] == KEY_VAULT_RESOURCE
    assert stat(envoy, "provider.idp.signing.requests") == 1
    assert stat(envoy, "connection.kv_signer.token.requests") == 1
    assert_nothing_secret_in_log(envoy, *assertion_parts(rec), key_url, key, w.imds.issued()[-1].token)


def test_transit_in_a_namespace_and_mount_with_an_assertion_audience(envoy_factory, upstream, w, openbao):
    """`namespace` (sent as X-Vault-Namespace), a `mount` of its own, an explicit `kid`
    and `assertion_audience` (the token server's issuer instead of its token URL)."""
    ns = openbao.namespace("team-a", kv_mount=None)
    openbao.enable_transit("signing", namespace=ns)
    openbao._ok("POST", "signing/keys/gw", {"type": "ecdsa-p256"}, namespace=ns)
    token = openbao.transit_sign_token("gw", mount="signing", namespace=ns)
    jwk = openbao.transit_jwk("gw", kid="team-a/gw", mount="signing", namespace=ns)
    with OidcProvider(private_key_jwt_clients={"gw-team-a": {"jwks": {"keys": [jwk]}, "alg": "ES256"}}) as oidc:
        provider = {"cluster": "team_idp", "token_url": oidc.token_url, "client_id": "gw-team-a",
                    "auth_method": "private_key_jwt", "assertion_audience": oidc.issuer,
                    "signing_key": {"vault_transit": {"cluster": "team_vault", "url": openbao.url,
                                                      "mount": "signing", "key": "gw",
                                                      "namespace": ns, "token": "transit_token"},
                                    "alg": "ES256", "kid": "team-a/gw"}}
        envoy = envoy_factory(config(provider, secrets_=TRANSIT_SECRETS), routes=ROUTES,
                              wasm_env={"TRANSIT_TOKEN": token},
                              extra_clusters=clusters(w, team_idp=oidc.port, team_vault=openbao.port))
        assert envoy.request("GET", "/orders/x").status == 200
        assert oidc.verify_access_token(upstream_token(upstream))["client_id"] == "gw-team-a"
        (rec,) = oidc.last_token_requests()
        _, claims = check_assertion(rec, client_id="gw-team-a", aud=oidc.issuer, alg="ES256",
                                    kid="team-a/gw", jwk=jwk)
        assert claims["aud"] == oidc.issuer
    (signed,) = openbao.wait_for_audit(1, path="signing/sign/gw/sha2-256", operation="update")
    assert signed["request"]["namespace"]["path"].rstrip("/") == ns


def test_a_refresh_token_grant_signs_every_refresh(envoy_factory, upstream, w):
    """grant refresh_token with a private_key_jwt client: each refresh carries a new
    assertion (new jti, new signature) and the rotated refresh token."""
    client_id = "gw-transit-es256"
    rt = w.oidc.mint_refresh_token(client_id=client_id)
    envoy = start_transit(envoy_factory, w, client_id, TRANSIT_EC, "ES256", grant="refresh_token", rt=rt)
    assert envoy.request("GET", "/orders/a").status == 200
    first = upstream_token(upstream)
    for n in (2, 3):
        upstream.respond_with(401, path_prefix="/orders/reject", times=1)
        assert envoy.request("GET", "/orders/reject").status == 401
        wait_until(lambda: envoy.request("GET", "/orders/b").status == 200 and upstream_token(upstream) != first,
                   timeout=10, interval=0.05, message=f"refresh {n}")
        first = upstream_token(upstream)
    recs = requests_of(w.oidc, client_id)
    assert [(r["grant_type"], r["status"]) for r in recs] == [("refresh_token", 200)] * 3
    jwk, _ = w.keys[client_id]
    claims = [check_assertion(r, client_id=client_id, aud=w.oidc.token_url, alg="ES256",
                              kid=TRANSIT_EC, jwk=jwk)[1] for r in recs]
    assert len({c["jti"] for c in claims}) == 3
    assert len({r["form"]["client_assertion"].split(".")[2] for r in recs}) == 3
    # Rotation kept: oidc-provider revokes the grant if an old refresh token came back.
    rts = [r["form"]["refresh_token"] for r in recs]
    assert rts[0] == rt and len(set(rts)) == 3
    assert w.oidc.verify_access_token(upstream_token(upstream))["sub"] == "svc-orders"
    show("private_key_jwt, OpenBao Transit ES256, grant refresh_token (a refresh)", as_received(recs[-1]))
    assert stat(envoy, "provider.idp.signing.requests") == 3
    assert_nothing_secret_in_log(envoy, *rts, *[p for r in recs for p in assertion_parts(r)])


def test_thirty_fetches_thirty_distinct_jtis(envoy_factory, upstream, w):
    """Every token request gets its own assertion: 30 refreshes (each forced by an upstream
    401) give 31 accepted token requests with 31 different jtis (oidc-provider would also
    refuse a repeated one). The 100,000-assertion uniqueness check is a unit test."""
    client_id = "gw-transit-rs256"
    envoy = start_transit(envoy_factory, w, client_id, TRANSIT_RSA, "RS256", component_log_level=None)
    assert envoy.request("GET", "/orders/a").status == 200
    for n in range(2, 32):
        upstream.respond_with(401, path_prefix="/orders/reject", times=1)
        assert envoy.request("GET", "/orders/reject").status == 401
        wait_until(lambda: len(requests_of(w.oidc, client_id)) >= n, timeout=10, interval=0.02,
                   message=f"token request {n}")
    recs = requests_of(w.oidc, client_id)
    assert len(recs) == 31 and {r["status"] for r in recs} == {200}
    jtis = [jwt.decode(r["form"]["client_assertion"], options={"verify_signature": False})["jti"] for r in recs]
    assert len(set(jtis)) == 31
    assert stat(envoy, "provider.idp.signing.requests") == 31


# --------------------------------------------------------------------------- tls_client_auth


def mtls_config(w, cluster="idp_mtls"):
    return config({"cluster": cluster, "token_url": w.oidc.mtls_token_url, "client_id": "gw-mtls",
                   "auth_method": "tls_client_auth"})


def test_tls_client_auth_presents_the_cluster_certificate(envoy_factory, upstream, w):
    envoy = envoy_factory(mtls_config(w), routes=ROUTES, extra_clusters=clusters(w),
                          component_log_level="wasm:debug")
    for i in range(3):
        resp = envoy.request("GET", f"/orders/{i}")
        assert resp.status == 200, resp
    assert w.oidc.verify_access_token(upstream_token(upstream))["client_id"] == "gw-mtls"
    (rec,) = requests_of(w.oidc, "gw-mtls")
    assert rec["status"] == 200
    # Over mutual TLS, with the gateway's certificate (verified, the registered subject)...
    assert rec["tls"]["authorized"] is True and rec["tls"]["port"] == w.oidc.mtls_port
    assert rec["tls"]["subject"] == w.gateway.subject_dn == "CN=latchkey-gateway,O=latchkey tests"
    fingerprint = w.gateway.certificate.fingerprint(hashes.SHA256())
    assert rec["tls"]["fingerprint256"].replace(":", "").lower() == fingerprint.hex()
    # ...and client_id in the form, with no secret and no assertion anywhere.
    assert rec["form"] == {"grant_type": "client_credentials", "scope": "orders.read",
                           "resource": DEFAULT_RESOURCE, "client_id": "gw-mtls"}
    assert "authorization" not in {k.lower() for k, _ in rec["headers"]}
    show("tls_client_auth", as_received(rec))
    assert stat(envoy, "connection.orders.token.success") == 1


def test_tls_client_auth_without_the_certificate_is_refused_by_the_server(envoy_factory, upstream, w):
    """The same provider through a cluster that presents no certificate: oidc-provider
    refuses the client (invalid_client), latchkey answers 503 and logs it."""
    envoy = envoy_factory(mtls_config(w, cluster="idp_no_cert"), routes=ROUTES, extra_clusters=clusters(w))
    resp = envoy.request("GET", "/orders/x")
    assert resp.status == 503 and resp.json() == UNAVAILABLE and int(resp.header("retry-after")) >= 1
    envoy.wait_for_log('token fetch failed: oauth_error: token server answered 401 with error "invalid_client"')
    (rec,) = requests_of(w.oidc, "gw-mtls")
    assert rec["status"] == 401 and rec["tls"]["subject"] is None
    assert "client_secret" not in rec["form"] and "client_assertion" not in rec["form"]


# --------------------------------------------------------------------------- client_assertion


def federated_config(w, mi_client_id=None):
    mi = {"type": "azure_managed_identity", "cluster": "imds", "endpoint": w.imds.endpoint}
    if mi_client_id:
        mi["client_id"] = mi_client_id
    return {
        "providers": {
            "azure_mi": mi,
            "entra": {"type": "oauth2", "cluster": "entra", "token_url": w.entra.token_url,
                      "client_id": ENTRA_APP, "auth_method": "client_assertion",
                      "assertion": "fic_assertion", "timeout_ms": 3000},
        },
        "connections": {
            # Used only as the assertion: no access of its own.
            "fic_assertion": {"provider": "azure_mi", "resource": FEDERATION_AUDIENCE},
            "orders": {"provider": "entra", "grant": "client_credentials",
                       "scopes": ["https://graph.microsoft.com/.default"], "access": {"public": True}},
        },
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["orders"], "header": "authorization"}]}],
    }


def test_client_assertion_is_the_managed_identity_token(envoy_factory, upstream, w):
    """Entra workload identity federation: the app's client assertion is the managed
    identity's token for api://AzureADTokenExchange; the token server verifies it
    against the issuer's JWKS and the app's federated credential."""
    uai = w.imds.add_identity(name="gateway-mi")
    w.entra.add_credential(ENTRA_APP, w.imds.issuer, uai.object_id)
    try:
        envoy = envoy_factory(federated_config(w, uai.client_id), routes=ROUTES,
                              extra_clusters=clusters(w), component_log_level="wasm:debug")
        for i in range(3):
            resp = envoy.request("GET", f"/orders/{i}")
            assert resp.status == 200, resp
        (issued_app, access) = w.entra.issued()[-1]
        assert issued_app == ENTRA_APP and upstream_token(upstream) == access
        (imds_req,) = w.imds.requests()
        assert imds_req.query["resource"] == FEDERATION_AUDIENCE and imds_req.query["client_id"] == uai.client_id
        (rec,) = w.entra.requests()
        assert rec.status == 200 and rec.verified
        assert rec.form["client_assertion"] == imds_req.token           # exactly the MI's token
        assert set(rec.form) == {"grant_type", "scope", "client_id", "client_assertion_type",
                                 "client_assertion"}
        assert rec.form["client_id"] == ENTRA_APP and rec.form["client_assertion_type"] == JWT_BEARER
        assert rec.get("authorization") is None
        assert rec.header == {"alg": "RS256", "kid": w.imds.jwt_kid, "typ": "JWT"}
        assert (rec.claims["iss"], rec.claims["sub"], rec.claims["aud"]) == (
            w.imds.issuer, uai.object_id, FEDERATION_AUDIENCE)
        show("client_assertion (managed identity, Entra federated credential)", as_received({
            "method": rec.method, "path": rec.path, "tls": None, "headers": rec.headers,
            "form": rec.form, "status": rec.status, "client_id": rec.form.get("client_id")}))
        assert stat(envoy, "connection.fic_assertion.token.requests") == 1
        assert stat(envoy, "connection.orders.token.success") == 1
        head, body, sig = imds_req.token.split(".")
        assert_nothing_secret_in_log(envoy, imds_req.token, sig, body, access)
    finally:
        w.entra.remove_credentials(ENTRA_APP)


def test_client_assertion_without_a_matching_federated_credential_is_503(envoy_factory, upstream, w):
    """The app trusts another subject: Entra's AADSTS70021, a 503 at latchkey, logged as
    the token server's refusal; nothing else was tried (no secret exists)."""
    w.entra.add_credential(ENTRA_APP, w.imds.issuer, "00000000-0000-0000-0000-0000000000aa")
    try:
        envoy = envoy_factory(federated_config(w), routes=ROUTES, extra_clusters=clusters(w))
        resp = envoy.request("GET", "/orders/x")
        assert resp.status == 503 and resp.json() == UNAVAILABLE
        envoy.wait_for_log('token fetch failed: oauth_error: token server answered 400 with error "invalid_client"')
        (rec,) = w.entra.requests()
        assert rec.error_code == 70021 and rec.verified and "client_secret" not in rec.form
        assert rec.claims["sub"] == w.imds.system_identity.object_id
    finally:
        w.entra.remove_credentials(ENTRA_APP)


# --------------------------------------------------------------------------- signing failures


def assert_signing_failure(envoy, w, kind: str, attempts=None, *, requests: int = 4) -> None:
    """The route answers 503 + retry-after; requests right after it too, at once, with no
    new signing call (backoff; `attempts()`: the signing calls the key service saw); the
    failure is counted by kind for the provider and as `signing` for the connection; a
    warning names the connection and the kind; the token server saw no request at all."""
    resp = envoy.request("GET", "/orders/x")
    assert resp.status == 503, resp
    assert resp.json() == UNAVAILABLE and int(resp.header("retry-after")) >= 1
    for _ in range(requests - 1):
        t0 = time.monotonic()
        again = envoy.request("GET", "/orders/y")
        assert again.status == 503 and int(again.header("retry-after")) >= 1
        assert time.monotonic() - t0 < 0.4, "a request in backoff waited"
    if attempts is not None:
        assert attempts() == 1, "a request in backoff made a new signing call"
    # The kind, and the HTTP status when the signing service answered one.
    line = re.compile(re.escape(f"connection orders: provider idp: the client assertion could not be signed: {kind}")
                      + r"( \(HTTP \d+\))?" + re.escape("; no token request sent"))
    envoy.wait_for_log(line.pattern)
    lines = [l for l in envoy.log_text().splitlines() if line.search(l)]
    assert lines and all("[warning]" in l for l in lines), lines
    wait_until(lambda: stat(envoy, f"provider.idp.signing.failure.{kind}", settle=False) >= 1, timeout=5,
               message=f"signing.failure.{kind}")
    failed = stat(envoy, f"provider.idp.signing.failure.{kind}")
    # Every signing call failed so; without an identity token no call was made at all.
    assert stat(envoy, "provider.idp.signing.requests") == (0 if kind == "identity" else failed)
    assert stat(envoy, "connection.orders.token.failure.signing") == failed
    assert stat(envoy, "connection.orders.token.success") == 0
    others = {k: stat(envoy, f"provider.idp.signing.failure.{k}") for k in SIGNING_KINDS if k != kind}
    assert set(others.values()) == {0}, others
    # No token request: no client secret (there is none) and no unsigned assertion.
    assert w.oidc.token_request_count() == 0, w.oidc.last_token_requests()


def test_transit_down_is_503_and_no_token_request(envoy_factory, upstream, w):
    port = closed_port()
    envoy = start_transit(envoy_factory, w, "gw-transit-es256", TRANSIT_EC, "ES256",
                          url=f"http://127.0.0.1:{port}", cluster="transit_down",
                          extra_clusters={"transit_down": port})
    assert_signing_failure(envoy, w, "connect")


def test_transit_403_is_503_and_no_token_request(envoy_factory, upstream, w):
    """A real refusal: the signing token was revoked (OpenBao answers 403 permission denied)."""
    token = w.bao.transit_sign_token(TRANSIT_EC, policy="short-lived-signer")
    w.bao.revoke_token(token)
    path = f"transit/sign/{TRANSIT_EC}/sha2-256"
    before = len(w.bao.audit_requests(path, "update"))
    envoy = start_transit(envoy_factory, w, "gw-transit-es256", TRANSIT_EC, "ES256", token=token)
    assert_signing_failure(envoy, w, "forbidden",
                           lambda: len(w.bao.wait_for_audit(before + 1, path, "update")) - before)
    assert_nothing_secret_in_log(envoy, token)


def test_transit_sealed_is_503_and_no_token_request(envoy_factory, upstream, w, openbao):
    """A real 503 from the key service: a sealed OpenBao."""
    openbao.enable_transit()
    openbao.transit_key(TRANSIT_EC, "ecdsa-p256")
    token = openbao.transit_sign_token(TRANSIT_EC)
    openbao.seal()
    envoy = start_transit(envoy_factory, w, "gw-transit-es256", TRANSIT_EC, "ES256", token=token,
                          url=openbao.url, cluster="sealed", extra_clusters={"sealed": openbao.port})
    assert_signing_failure(envoy, w, "status")


@pytest.mark.parametrize("mode,kind", [
    ({"garbage": True}, "malformed"),
    ({"status": 200, "body": {"data": {"signature": "vault:v1:c2hvcnQ"}}}, "malformed"),     # too short
    ({"status": 200, "body": {"data": {"signature": "not-a-vault-signature"}}}, "malformed"),
    ({"status": 200, "body": {"data": {}}}, "malformed"),
    ({"status": 500}, "status"),
    ({"delay_s": 3}, "timeout"),
    ({"close": True}, "connect"),
], ids=["garbage", "short-signature", "no-prefix", "no-signature", "500", "timeout", "dropped"])
def test_transit_faults_are_503_and_no_token_request(envoy_factory, upstream, w, mode, kind):
    """Faults a real OpenBao won't produce on demand, from a fake Transit endpoint."""
    with FaultTokenServer(path=None) as fake:
        fake.set_mode(**mode)
        envoy = start_transit(envoy_factory, w, "gw-transit-es256", TRANSIT_EC, "ES256",
                              url=fake.url.rsplit("/token", 1)[0], cluster="fake_transit",
                              extra_clusters={"fake_transit": fake.port}, timeout_ms=500)
        assert_signing_failure(envoy, w, kind, fake.count)
        sent = fake.last()
        assert (sent.method, sent.path) == ("POST", f"/v1/transit/sign/{TRANSIT_EC}/sha2-256")
        assert sent.header("x-vault-token") == w.transit_token
        body = json.loads(sent.body)
        assert body["marshaling_algorithm"] == "jws" and set(body) == {"input", "marshaling_algorithm"}


@pytest.mark.parametrize("kind", ["forbidden", "status", "malformed", "truncated", "identity"])
def test_key_vault_signing_failures_are_503_and_no_token_request(envoy_factory, upstream, w, kind):
    if kind == "forbidden":
        w.kv.deny(KV_RSA, operations=["sign"])       # no Key Vault Crypto User role: a real-shaped 403
    elif kind == "status":
        w.kv.fail_next(50, 503, methods=("POST",))
    elif kind == "malformed":
        w.kv.fail_next(50, 200, {"kid": w.kv.key_id(KV_RSA), "value": "!!not base64url!!"}, methods=("POST",))
    elif kind == "truncated":
        w.kv.fail_next(50, 200, b'{"kid": "x", "value": "abc', methods=("POST",))
    else:
        w.imds.fail("refuse")                         # no identity token: nothing to sign with
    envoy = start_kv(envoy_factory, w, "gw-kv-rs256", w.kv.key_id(KV_RSA), "RS256")
    signs = None if kind == "identity" else (lambda: len([r for r in w.kv.requests() if r.operation == "sign"]))
    assert_signing_failure(envoy, w, {"truncated": "malformed"}.get(kind, kind), signs)
    if kind == "identity":
        assert w.kv.requests() == []


def test_key_vault_503_then_recovery_after_the_backoff(envoy_factory, upstream, w):
    w.kv.fail_next(1, 503, methods=("POST",))
    envoy = start_kv(envoy_factory, w, "gw-kv-rs256", w.kv.key_id(KV_RSA), "RS256")
    assert envoy.request("GET", "/orders/x").status == 503
    wait_until(lambda: envoy.request("GET", "/orders/y").status == 200, timeout=15, interval=0.1,
               message="a token once Key Vault signs again")
    assert stat(envoy, "provider.idp.signing.failure.status") == 1
    assert stat(envoy, "provider.idp.signing.requests") == 2
    (rec,) = requests_of(w.oidc, "gw-kv-rs256")
    assert rec["status"] == 200


# --------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize("service,key,alg,kind", [
    ("transit", TRANSIT_EC, "RS256", "malformed"),   # Transit signs ECDSA anyway: 64 bytes, not RSA's
    ("transit", TRANSIT_RSA, "ES256", "malformed"),  # ...and RSA-PSS for an ES256 asked of an RSA key
    ("key_vault", KV_EC, "RS256", "status"),          # Key Vault refuses: 400 BadParameter
    ("key_vault", KV_RSA, "ES256", "status"),
], ids=["transit-ec-key-RS256", "transit-rsa-key-ES256", "kv-ec-key-RS256", "kv-rsa-key-ES256"])
def test_alg_that_does_not_fit_the_key_is_a_signing_failure(envoy_factory, upstream, w, service, key, alg, kind):
    """`alg` and the key's type disagree: only the key service can tell. What latchkey
    does with each service's answer: Key Vault answers 400 (kind `status`); Transit signs
    with the key's own algorithm, and the signature's size gives it away (`malformed`)."""
    if service == "transit":
        envoy = start_transit(envoy_factory, w, "gw-transit-es256", key, alg)
    else:
        envoy = start_kv(envoy_factory, w, "gw-kv-rs256", w.kv.key_id(key), alg)
    assert_signing_failure(envoy, w, kind)
    if service == "key_vault":
        (req,) = w.kv.requests()
        assert (req.operation, req.status, req.error_code) == ("sign", 400, "BadParameter")


def test_alg_the_server_did_not_register_is_refused_by_the_server(envoy_factory, upstream, w):
    """Signed right (PS256 with the RSA key) but the client is registered for RS256:
    oidc-provider refuses it (invalid_client); latchkey logs the token server's refusal."""
    envoy = start_transit(envoy_factory, w, "gw-transit-rs256", TRANSIT_RSA, "PS256")
    resp = envoy.request("GET", "/orders/x")
    assert resp.status == 503 and resp.json() == UNAVAILABLE
    envoy.wait_for_log('token fetch failed: oauth_error: token server answered 401 with error "invalid_client"')
    (rec,) = requests_of(w.oidc, "gw-transit-rs256")
    assert rec["status"] == 401 and jwt.get_unverified_header(rec["form"]["client_assertion"])["alg"] == "PS256"
    assert stat(envoy, "provider.idp.signing.requests") == 1
    assert stat(envoy, "connection.orders.token.failure.oauth_error") == 1


def test_a_client_secret_with_private_key_jwt_is_refused_at_load(envoy_factory, w):
    from harness import EnvoyStartError
    provider = transit_provider(w, "gw-transit-es256", TRANSIT_EC, "ES256")
    provider["client_secret"] = "cs"
    cfg = config(provider, secrets_={**TRANSIT_SECRETS, "cs": {"env": "CS"}})
    with pytest.raises(EnvoyStartError) as err:
        envoy_factory(cfg, routes=ROUTES, wasm_env={"TRANSIT_TOKEN": w.transit_token, "CS": "s3cret"},
                      extra_clusters=clusters(w))
    assert ("latchkey: configuration rejected: providers.idp.client_secret: "
            "this auth_method sends no client secret") in str(err.value), str(err.value)[-2000:]


# --------------------------------------------------------------------------- what is logged


def test_debug_log_has_no_assertion_signature_or_key_identifier(envoy_factory, upstream, w):
    """wasm at debug level, an explicit kid that appears nowhere else, a fetch and a
    refresh: Envoy's log (and access log) hold no assertion, no signature, no jti, no kid,
    no Transit token and no access token; nor do the 503 bodies of a failing signer."""
    client_id = "gw-transit-kid"
    envoy = start_transit(envoy_factory, w, client_id, TRANSIT_EC, "ES256", kid=EXPLICIT_KID)
    assert envoy.request("GET", "/orders/a").status == 200
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject").status == 401
    wait_until(lambda: len(requests_of(w.oidc, client_id)) >= 2, timeout=10, message="the refresh")
    assert envoy.request("GET", "/orders/b").status == 200
    recs = requests_of(w.oidc, client_id)
    jwk, _ = w.keys[client_id]
    for rec in recs:
        check_assertion(rec, client_id=client_id, aud=w.oidc.token_url, alg="ES256", kid=EXPLICIT_KID, jwk=jwk)
    jtis = [jwt.decode(r["form"]["client_assertion"], options={"verify_signature": False})["jti"] for r in recs]
    envoy.wait_for_access_log(3)
    text = envoy.log_text()
    assert "[debug][wasm]" in text, "no wasm debug line: the log level did not apply"
    assert_nothing_secret_in_log(envoy, EXPLICIT_KID, w.transit_token, *jtis, upstream_token(upstream),
                                 *[p for r in recs for p in assertion_parts(r)])
    # Error bodies: a failing signer's 503s say only which route and connection.
    with FaultTokenServer(path=None) as fake:
        fake.set_mode(status=400, body={"errors": [f"bad key {EXPLICIT_KID}"]})
        failing = start_transit(envoy_factory, w, client_id, TRANSIT_EC, "ES256", kid=EXPLICIT_KID,
                                url=fake.url.rsplit("/token", 1)[0], cluster="fake_transit",
                                extra_clusters={"fake_transit": fake.port})
        resp = failing.request("GET", "/orders/x")
        assert resp.status == 503 and resp.json() == UNAVAILABLE
        failing.wait_for_log(re.escape("could not be signed: status"))
        assert EXPLICIT_KID.encode() not in resp.body
        assert_nothing_secret_in_log(failing, EXPLICIT_KID, w.transit_token)


def test_key_vault_401_gets_a_fresh_identity_token_for_the_next_signature(envoy_factory, upstream, w):
    """Key Vault no longer accepts the identity token (401, as when it was revoked): as
    for a Key Vault secret read (docs/credentials.md: "A 401 ... drops that token and reads again once
    with a fresh one"), the signature is made again with a fresh identity token."""
    envoy = start_kv(envoy_factory, w, "gw-kv-rs256", w.kv.key_id(KV_RSA), "RS256")
    assert envoy.request("GET", "/orders/a").status == 200
    first = upstream_token(upstream)
    w.kv.expire_tokens()                 # every identity token issued so far: 401 TokenExpired
    upstream.respond_with(401, path_prefix="/orders/reject", times=1)
    assert envoy.request("GET", "/orders/reject").status == 401     # starts a refresh
    try:
        wait_until(lambda: envoy.request("GET", "/orders/b").status == 200
                   and upstream_token(upstream) != first, timeout=8, interval=0.2,
                   message="a token signed with a fresh identity token")
    finally:
        signs = [(r.status, r.error_code) for r in w.kv.requests() if r.operation == "sign"]
        log = [l.split("wasm log latchkey ")[-1] for l in envoy.log_text().splitlines()
               if "could not be signed" in l or "fetch failed" in l]
        print(f"sign calls (status, error): {signs}; IMDS requests: "
              f"{[r.status for r in w.imds.requests()]}; latchkey logged: {log}")
    assert [r.status for r in w.imds.requests()] == [200, 200]
    assert [s for s, _ in signs] == [200, 401, 200]
