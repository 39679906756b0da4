"""Contract tests of the secret-store test servers in secret_stores.py (no latchkey).

The Key Vault and IMDS stand-ins are fakes: here the real Azure SDK for Python
(azure-keyvault-secrets' SecretClient with azure-identity's ManagedIdentityCredential)
reads through them, so they speak the protocol real clients speak, and raw requests pin
the exact answers latchkey will parse (`value`, `id`, status codes, error shapes); key
signing (private_key_jwt) goes through azure-keyvault-keys' CryptographyClient. The
OpenBao server is the real one: these tests pin the KV v2 / AppRole / Transit sign answers
latchkey reads.
An Envoy (no wasm filter) proves the TLS cluster builder reaches the KV stand-in.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse

import pytest

from harness import LOOPBACK, http_request, wait_until
from secret_stores import (
    IMDS_TOKEN_PATH,
    KEY_VAULT_RESOURCE,
    BaoError,
    LocalCA,
    tls_cluster,
    read_policy_hcl,
)

azure_core_exceptions = pytest.importorskip("azure.core.exceptions")
identity = pytest.importorskip("azure.identity")
kv_secrets = pytest.importorskip("azure.keyvault.secrets")

HttpResponseError = azure_core_exceptions.HttpResponseError
ResourceNotFoundError = azure_core_exceptions.ResourceNotFoundError

ID_RE = re.compile(r"^https://kv-test\.vault\.azure\.net/secrets/([0-9A-Za-z-]+)/([0-9a-f]{32})$")

# Environment variables that make azure-identity / MSAL pick another managed-identity
# source than IMDS (App Service, Arc, Service Fabric, ML, workload identity, Cloud Shell).
_OTHER_MI_ENV = ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT",
                 "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID",
                 "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST",
                 "AZUREPS_HOST_ENVIRONMENT", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                 "https_proxy", "ALL_PROXY", "all_proxy")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def sdk(keyvault_stack, monkeypatch):
    """Point azure-identity at the IMDS stand-in (AZURE_POD_IDENTITY_AUTHORITY_HOST, read by
    azure-identity's ImdsCredential and MSAL's _obtain_token_on_azure_vm); returns a
    factory of SecretClients on the KV stand-in that trust the test CA."""
    for name in _OTHER_MI_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", keyvault_stack.imds.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    clients = []

    def make(client_id: str | None = None):
        cred = identity.ManagedIdentityCredential(client_id=client_id) if client_id \
            else identity.ManagedIdentityCredential()
        # The vault's real name can't resolve here: use https://localhost:<port> (the
        # certificate names localhost too); the challenge's resource (vault.azure.net)
        # then doesn't match the URL's domain, hence verify_challenge_resource=False.
        client = kv_secrets.SecretClient(
            vault_url=f"https://localhost:{keyvault_stack.kv.port}", credential=cred,
            api_version="7.4", verify_challenge_resource=False,
            connection_verify=str(keyvault_stack.kv.ca_path), retry_total=0)
        clients.append((client, cred))
        return client

    yield make
    for client, cred in clients:
        client.close()
        cred.close()


def kv_request(stack, path: str, token: str | None = None, *, sni: str | None = "kv-test.vault.azure.net",
               method: str = "GET", headers: dict | None = None, timeout: float = 10.0,
               body: bytes | dict | None = None):
    """One HTTPS request to the KV stand-in, trusting only the test CA, with SNI `sni`
    (hostname checked against it, or against 127.0.0.1 when sni is None); a dict `body`
    is sent as JSON (Content-Type application/json).
    Returns (status, headers dict (lower-case names), body bytes)."""
    ctx = stack.ca.client_context()
    sock = socket.create_connection((LOOPBACK, stack.kv.port), timeout=timeout)
    tls = ctx.wrap_socket(sock, server_hostname=sni or LOOPBACK)
    conn = http.client.HTTPSConnection(LOOPBACK, stack.kv.port, timeout=timeout)
    conn.sock = tls
    hdrs = {"Host": sni or LOOPBACK, **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def imds_get(imds, query: dict | str | None = None, headers: dict | None = None, path: str = IMDS_TOKEN_PATH):
    if query is None:
        query = {"api-version": "2018-02-01", "resource": KEY_VAULT_RESOURCE}
    qs = query if isinstance(query, str) else urllib.parse.urlencode(query)
    hdrs = {"Metadata": "true"} if headers is None else headers
    return http_request(imds.port, "GET", f"{path}?{qs}", headers=hdrs, timeout=10)


# --------------------------------------------------------------------------- Key Vault via the Azure SDK


def test_sdk_reads_latest_secret(keyvault_stack, sdk):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    version = kv.set_secret("partner-key", "s3cr3t-value")
    secret = sdk().get_secret("partner-key")
    assert secret.value == "s3cr3t-value"
    assert secret.id == f"https://kv-test.vault.azure.net/secrets/partner-key/{version}"
    assert secret.properties.version == version == secret.id.rsplit("/", 1)[1]
    assert secret.properties.enabled is True and secret.properties.recovery_level == "Recoverable+Purgeable"
    # The SDK's challenge flow: an unauthenticated request first, then the bearer one.
    first, second = kv.requests()
    assert first.status == 401 and first.header("Authorization") is None and first.error_code == "Unauthorized"
    assert second.status == 200 and second.query == {"api-version": "7.4"}
    assert second.client_id == imds.system_identity.client_id and second.identity_kind == "system"
    assert second.served_version == version
    # ...with a token from IMDS for the challenge's resource.
    (req,) = imds.requests()
    assert req.status == 200 and req.header("Metadata") == "true"
    assert req.query["resource"] == KEY_VAULT_RESOURCE and req.query["api-version"] == "2018-02-01"
    assert "client_id" not in req.query
    assert second.header("Authorization") == f"Bearer {req.token}"
    assert keyvault_stack.errors == []


def test_sdk_reads_versions_after_rotation(keyvault_stack, sdk):
    kv = keyvault_stack.kv
    v1 = kv.set_secret("rotating", "one")
    client = sdk()
    assert client.get_secret("rotating").value == "one"
    v2 = kv.set_secret("rotating", "two")
    assert v1 != v2 and kv.versions("rotating") == [v1, v2]
    latest = client.get_secret("rotating")
    assert (latest.value, latest.properties.version) == ("two", v2)
    old = client.get_secret("rotating", v1)
    assert (old.value, old.id.rsplit("/", 1)[1]) == ("one", v1)
    assert client.get_secret("rotating", v2).value == "two"
    assert [r.served_version for r in kv.reads("rotating")] == [v1, v2, v1, v2]


def test_sdk_disabled_secret_is_403_forbidden_secret_disabled(keyvault_stack, sdk):
    kv = keyvault_stack.kv
    v1 = kv.set_secret("switched-off", "value")
    kv.disable("switched-off")
    client = sdk()
    with pytest.raises(HttpResponseError) as err:
        client.get_secret("switched-off")
    assert err.value.status_code == 403
    assert err.value.error.code == "Forbidden"
    assert err.value.error.message == "Operation get is not allowed on a disabled secret."
    assert err.value.error.innererror == {"code": "SecretDisabled"}
    with pytest.raises(HttpResponseError):
        client.get_secret("switched-off", v1)
    v2 = kv.set_secret("switched-off", "new")          # a new enabled version is readable
    assert client.get_secret("switched-off").properties.version == v2
    with pytest.raises(HttpResponseError):
        client.get_secret("switched-off", v1)           # the old one stays disabled


def test_sdk_missing_secret_is_404_secret_not_found(keyvault_stack, sdk):
    kv = keyvault_stack.kv
    client = sdk()
    with pytest.raises(ResourceNotFoundError) as err:
        client.get_secret("no-such-secret")
    assert err.value.status_code == 404 and err.value.error.code == "SecretNotFound"
    kv.set_secret("exists", "x")
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("exists", "0" * 32)
    kv.delete("exists")
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("exists")


def test_sdk_user_assigned_identity(keyvault_stack, sdk):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    user = imds.add_identity(name="kv-reader")
    kv.set_secret("partner-key", "for-the-user")
    kv.deny("partner-key", client_id=imds.system_identity.client_id)  # only the user has a role
    assert sdk(client_id=user.client_id).get_secret("partner-key").value == "for-the-user"
    token_req = imds.last()
    assert token_req.query["client_id"] == user.client_id and token_req.client_id == user.client_id
    read = kv.reads("partner-key")[-1]
    assert read.client_id == user.client_id and read.identity_kind == "user"
    with pytest.raises(HttpResponseError) as err:           # the system identity has no role
        sdk().get_secret("partner-key")
    assert err.value.status_code == 403 and err.value.error.code == "Forbidden"
    assert err.value.error.innererror == {"code": "ForbiddenByRbac"}
    assert kv.last().client_id == imds.system_identity.client_id


def test_sdk_unknown_client_id_fails_at_imds(keyvault_stack, sdk):
    keyvault_stack.kv.set_secret("partner-key", "x")
    with pytest.raises(Exception) as err:
        sdk(client_id="00000000-0000-0000-0000-00000000dead").get_secret("partner-key")
    assert "Identity not found" in str(err.value)
    assert keyvault_stack.imds.last().status == 400
    assert all(r.status == 401 for r in keyvault_stack.kv.requests())


def test_sdk_writes_new_versions_and_reads_them_back(keyvault_stack, sdk):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    name = "latchkey-connections-github-ab12"
    client = sdk()
    first = client.set_secret(name, "refresh-1")
    v1 = first.properties.version
    assert ID_RE.match(first.id).groups() == (name, v1)
    assert first.value == "refresh-1" and first.properties.enabled is True
    assert first.properties.recovery_level == "Recoverable+Purgeable"
    assert first.properties.created_on == first.properties.updated_on is not None
    second = client.set_secret(name, "refresh-2", content_type="application/json",
                               tags={"connection": "github"})
    v2 = second.properties.version
    assert v2 != v1 and kv.versions(name) == [v1, v2]
    assert second.properties.content_type == "application/json"
    assert second.properties.tags == {"connection": "github"}
    latest = client.get_secret(name)
    assert (latest.value, latest.properties.version) == ("refresh-2", v2)
    assert latest.properties.content_type == "application/json"
    old = client.get_secret(name, v1)
    assert (old.value, old.properties.version) == ("refresh-1", v1)
    # What the stand-in recorded: each write with its value and the identity that wrote.
    assert [(w.name, w.version, w.value) for w in kv.writes()] == [(name, v1, "refresh-1"),
                                                                    (name, v2, "refresh-2")]
    assert kv.writes()[1].content_type == "application/json" and kv.writes()[1].tags == {"connection": "github"}
    assert {w.client_id for w in kv.writes()} == {imds.system_identity.client_id}
    # The SDK's challenge flow for a PUT too: unauthenticated first, then with the token.
    assert [r.status for r in kv.puts()] == [401, 200, 200]
    assert [r.served_version for r in kv.puts(status=200)] == [v1, v2]
    assert [r.served_version for r in kv.reads(name)] == [v2, v1]
    # Neither the log nor a write's repr shows a value.
    assert "refresh-1" not in repr(kv.requests()) + repr(kv.writes())
    assert kv.secret_value(name) == "refresh-2" and kv.secret_value(name, v1) == "refresh-1"


def test_sdk_delete_is_soft_and_keeps_the_name_until_purged(keyvault_stack, sdk):
    kv = keyvault_stack.kv
    name = "latchkey-connections-crm-team"
    client = sdk()
    v1 = client.set_secret(name, "a").properties.version
    v2 = client.set_secret(name, "b").properties.version
    poller = client.begin_delete_secret(name, _polling_interval=0)
    deleted = poller.result()
    assert deleted.recovery_id == f"https://kv-test.vault.azure.net/deletedsecrets/{name}"
    assert deleted.id == f"https://kv-test.vault.azure.net/secrets/{name}/{v2}"
    assert deleted.properties.recovery_level == "Recoverable+Purgeable"
    assert (deleted.scheduled_purge_date - deleted.deleted_date).days == 90
    poller.wait()                       # polls GET /deletedsecrets/<name> until it answers 200
    assert poller.done() and kv.is_deleted(name) and kv.versions(name) == []
    assert [r.operation for r in kv.requests()][-1] == "get_deleted"
    for version in (None, v1):
        with pytest.raises(ResourceNotFoundError) as err:
            client.get_secret(name, version)
        assert err.value.error.code == "SecretNotFound"
    # The name stays taken (soft-deleted) until purged or recovered.
    with pytest.raises(HttpResponseError) as err:
        client.set_secret(name, "c")
    assert err.value.status_code == 409 and err.value.error.code == "Conflict"
    assert err.value.error.innererror == {"code": "ObjectIsDeletedButRecoverable"}
    assert client.get_deleted_secret(name).recovery_id == deleted.recovery_id
    client.purge_deleted_secret(name)
    assert not kv.is_deleted(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(name)
    v3 = client.set_secret(name, "c").properties.version
    assert kv.versions(name) == [v3]
    # Delete then recover: every version comes back.
    client.begin_delete_secret(name, _polling_interval=0).wait()
    recovered = client.begin_recover_deleted_secret(name, _polling_interval=0)
    recovered.wait()                    # polls GET /secrets/<name> until 200
    assert recovered.result().id == f"https://kv-test.vault.azure.net/secrets/{name}/{v3}"
    assert client.get_secret(name).value == "c" and not kv.is_deleted(name)
    with pytest.raises(ResourceNotFoundError):
        client.begin_delete_secret("never-written")
    assert [r.status for r in kv.deletes(status=None)] == [200, 200, 404]


def test_sdk_write_refusals(keyvault_stack, sdk):
    kv = keyvault_stack.kv
    kv.set_secret("readable", "x")
    client = sdk()
    kv.deny("*", operations=["set"])                      # a reader role, no write
    with pytest.raises(HttpResponseError) as err:
        client.set_secret("readable", "y")
    assert err.value.status_code == 403 and err.value.error.code == "Forbidden"
    assert err.value.error.innererror == {"code": "ForbiddenByRbac"}
    assert "Microsoft.KeyVault/vaults/secrets/setSecret/action" in err.value.error.message
    assert client.get_secret("readable").value == "x"     # reads still allowed
    kv.allow("*")
    kv.fail_writes(1, 503)
    with pytest.raises(HttpResponseError) as err:
        client.set_secret("readable", "y")
    assert err.value.status_code == 503
    assert client.set_secret("readable", "y").value == "y"
    for bad in ("bad_name", "a" * 128):
        with pytest.raises(HttpResponseError) as err:
            client.set_secret(bad, "v")
        assert err.value.status_code == 400 and err.value.error.code == "BadParameter"
    assert client.set_secret("a" * 127, "v").name == "a" * 127
    assert [w.value for w in kv.writes()] == ["y", "v"]
    assert len(kv.versions("readable")) == 2


# --------------------------------------------------------------------------- Key Vault, raw protocol


# ---------------------------------------------------------------- Key Vault keys (private_key_jwt)


kv_keys = pytest.importorskip("azure.keyvault.keys")
kv_crypto = pytest.importorskip("azure.keyvault.keys.crypto")

KEY_ID_RE = re.compile(r"^https://kv-test\.vault\.azure\.net/keys/([0-9A-Za-z-]+)/([0-9a-f]{32})$")


def _verify_jws(public_key, alg: str, digest: bytes, signature: bytes) -> None:
    """Check a Key Vault signature over `digest` with `cryptography` (raises if bad)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
    if alg == "ES256":
        assert len(signature) == 64
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        public_key.verify(der, digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    else:
        pad = padding.PKCS1v15() if alg == "RS256" else padding.PSS(
            mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        public_key.verify(signature, digest, pad, Prehashed(hashes.SHA256()))


@pytest.mark.parametrize("alg,kty", [("RS256", "RSA"), ("PS256", "RSA"), ("ES256", "EC")])
def test_sdk_signs_a_digest_with_a_key_vault_key(keyvault_stack, sdk, alg, kty):
    """azure-keyvault-keys' CryptographyClient signs through the stand-in as through Key
    Vault: it reads the key (GET /keys/<name>/), then has the vault sign (POST
    /keys/<name>/<version>/sign); the SDK's own local verify (the public key it read)
    and `cryptography` accept the signature."""
    import hashlib
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    version = kv.create_key("gw-signer", kty)
    cred = identity.ManagedIdentityCredential()  # the `sdk` fixture pointed it at the IMDS stand-in
    client = kv_crypto.CryptographyClient(
        f"https://localhost:{kv.port}/keys/gw-signer", cred, api_version="7.4",
        verify_challenge_resource=False, connection_verify=str(kv.ca_path), retry_total=0)
    try:
        digest = hashlib.sha256(b"header.payload").digest()
        result = client.sign(getattr(kv_crypto.SignatureAlgorithm, alg.lower()), digest)
        assert result.key_id.endswith(f"/keys/gw-signer/{version}")
        assert client.verify(getattr(kv_crypto.SignatureAlgorithm, alg.lower()), digest,
                             result.signature).is_valid
        bad = bytes([result.signature[0] ^ 1]) + result.signature[1:]
        assert not client.verify(getattr(kv_crypto.SignatureAlgorithm, alg.lower()), digest, bad).is_valid
    finally:
        client.close()
        cred.close()
    _verify_jws(kv.public_key("gw-signer"), alg, digest, result.signature)
    # What the SDK sent: the challenge, the key read, then the sign call.
    ops = [(r.method, r.status, r.operation, r.key) for r in kv.requests()]
    assert ops[-2:] == [("GET", 200, "get_key", "gw-signer"), ("POST", 200, "sign", "gw-signer")], ops
    (made,) = kv.signs("gw-signer")
    assert (made.alg, made.digest, made.signature, made.version) == (alg, digest, result.signature, version)
    assert made.client_id == imds.system_identity.client_id


def test_kv_sign_answer_is_what_latchkey_reads(keyvault_stack):
    """The raw sign call latchkey makes (POST <key>/sign?api-version=7.4, {"alg","value"}
    with a base64url digest): 200 {"kid": <key id with version>, "value": base64url
    signature}; ES256 as r||s (64 bytes), RS256 one modulus long (256 bytes)."""
    import hashlib
    from secret_stores import b64url, b64url_decode
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    ec_version = kv.create_key("ec-key", "EC")
    rsa_version = kv.create_key("rsa-key", "RSA")
    token = imds.token_for()
    digest = hashlib.sha256(b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0").digest()
    for name, alg, version, size in (("ec-key", "ES256", ec_version, 64), ("rsa-key", "RS256", rsa_version, 256),
                                     ("rsa-key", "PS256", rsa_version, 256)):
        for path in (f"/keys/{name}/sign?api-version=7.4", f"/keys/{name}/{version}/sign?api-version=7.4"):
            status, headers, body = kv_request(keyvault_stack, path, token, method="POST",
                                               body={"alg": alg, "value": b64url(digest)})
            assert status == 200 and headers["content-type"] == "application/json; charset=utf-8", body
            doc = json.loads(body)
            assert set(doc) == {"kid", "value"} and KEY_ID_RE.match(doc["kid"]).groups() == (name, version)
            assert "=" not in doc["value"] and len(b64url_decode(doc["value"])) == size
            _verify_jws(kv.public_key(name), alg, digest, b64url_decode(doc["value"]))
    # The key as Key Vault's KeyBundle shows it (public only).
    status, _, body = kv_request(keyvault_stack, "/keys/ec-key?api-version=7.4", token)
    key = json.loads(body)["key"]
    assert status == 200 and key["kty"] == "EC" and key["crv"] == "P-256" and "d" not in key
    assert key["kid"] == kv.key_id("ec-key", ec_version)

    def sign(path, payload, tok=token):
        status, _, body = kv_request(keyvault_stack, path, tok, method="POST", body=payload)
        return status, json.loads(body)["error"] if status >= 400 else json.loads(body)

    good = {"alg": "ES256", "value": b64url(digest)}
    refusals = [
        ("/keys/ec-key/sign?api-version=7.4", {"alg": "RS256", "value": b64url(digest)}, 400, "BadParameter"),
        ("/keys/rsa-key/sign?api-version=7.4", good, 400, "BadParameter"),             # ES256 with RSA
        ("/keys/ec-key/sign?api-version=7.4", {"alg": "ES256", "value": b64url(digest[:20])}, 400, "BadParameter"),
        ("/keys/ec-key/sign?api-version=7.4", {"alg": "ES256"}, 400, "BadParameter"),
        ("/keys/nope/sign?api-version=7.4", good, 404, "KeyNotFound"),
        (f"/keys/ec-key/{'0' * 32}/sign?api-version=7.4", good, 404, "KeyNotFound"),
        ("/keys/ec-key/sign", good, 400, "BadParameter"),                               # no api-version
    ]
    for path, payload, want_status, code in refusals:
        status, err = sign(path, payload)
        assert (status, err["code"]) == (want_status, code), (path, payload, err)
    assert sign("/keys/ec-key/sign?api-version=7.4", good, tok=None)[0] == 401
    # No Key Vault Crypto User role on the key: 403 ForbiddenByRbac naming the sign action.
    kv.deny("ec-key", operations=["sign"])
    status, err = sign("/keys/ec-key/sign?api-version=7.4", good)
    assert status == 403 and err["innererror"]["code"] == "ForbiddenByRbac"
    assert "Microsoft.KeyVault/vaults/keys/sign/action" in err["message"]
    kv.allow("ec-key")
    kv.disable_key("ec-key")
    status, err = sign("/keys/ec-key/sign?api-version=7.4", good)
    assert status == 403 and err["innererror"]["code"] == "KeyDisabled"
    kv.disable_key("ec-key", enabled=True)
    # Injected faults (only POSTs): 503, a malformed success, then normal again.
    kv.fail_next(1, 503, methods=("POST",))
    kv.fail_next(1, 200, b'{"kid": "x", "value": "not base64url!"}', methods=("POST",))
    assert sign("/keys/ec-key/sign?api-version=7.4", good)[0] == 503
    assert kv_request(keyvault_stack, "/keys/ec-key/sign?api-version=7.4", token, method="POST", body=good)[2] \
        == b'{"kid": "x", "value": "not base64url!"}'
    assert sign("/keys/ec-key/sign?api-version=7.4", good)[0] == 200
    assert keyvault_stack.errors == []


def test_imds_federation_audience_token_is_a_jwt_the_jwks_verifies(keyvault_stack):
    """For api://AzureADTokenExchange the IMDS stand-in issues what Entra issues a managed
    identity: a JWT (iss the tenant's v2.0 issuer, sub = oid = the identity's object id,
    aud the resource), verifiable with `imds.jwks()`; other resources keep opaque tokens."""
    import jwt
    from secret_stores import FEDERATION_AUDIENCE
    imds = keyvault_stack.imds
    uai = imds.add_identity(name="federated-mi")
    resp = imds_get(imds, {"api-version": "2018-02-01", "resource": FEDERATION_AUDIENCE,
                           "client_id": uai.client_id})
    assert resp.status == 200
    token = resp.json()["access_token"]
    (jwk,) = imds.jwks()["keys"]
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": jwk["kid"], "typ": "JWT"}
    claims = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["RS256"], audience=FEDERATION_AUDIENCE,
                        issuer=f"https://login.microsoftonline.com/{imds.tenant_id}/v2.0")
    assert claims["sub"] == claims["oid"] == uai.object_id and claims["azp"] == uai.client_id
    assert claims["exp"] - claims["iat"] == imds.ttl and claims["xms_mirid"].endswith("/federated-mi")
    assert "d" not in jwk and jwk["kty"] == "RSA"
    other = imds_get(imds).json()["access_token"]
    assert other.count(".") == 0
    assert [t.token for t in imds.issued()] == [token, other]


# --------------------------------------------------------------------------- Key Vault (secrets)


def test_kv_answer_is_what_latchkey_reads(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    version = kv.set_secret("Partner-Key", "p\u00e4ss")
    token = imds.token_for()
    status, headers, body = kv_request(keyvault_stack, "/secrets/partner-key?api-version=7.4", token)
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert set(doc) == {"value", "id", "attributes"}
    assert doc["value"] == "p\u00e4ss" and "p\u00e4ss".encode() in body   # UTF-8 on the wire
    name, ver = ID_RE.match(doc["id"]).groups()
    assert (name, ver) == ("Partner-Key", version)        # names are case-insensitive; id keeps the case
    attrs = doc["attributes"]
    assert attrs["enabled"] is True and attrs["recoveryLevel"] == "Recoverable+Purgeable"
    assert isinstance(attrs["created"], int) and isinstance(attrs["updated"], int)
    # Latest with a trailing slash (as SDKs send it) and by version.
    for path in ("/secrets/partner-key/?api-version=7.4", f"/secrets/partner-key/{version}?api-version=7.4",
                 f"/secrets/PARTNER-KEY/{version.upper()}?api-version=7.4"):
        status, _, body = kv_request(keyvault_stack, path, token)
        assert status == 200 and json.loads(body)["id"] == doc["id"]
    rec = kv.last()
    assert rec.sni == "kv-test.vault.azure.net" and rec.header("Host") == "kv-test.vault.azure.net"
    # The log never holds a secret value.
    assert "p\u00e4ss" not in repr(kv.requests()) and "p\u00e4ss" not in repr(kv._secrets)


def test_kv_401_challenge_shapes(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    kv.set_secret("s", "v")
    challenge = (f'Bearer authorization="https://login.microsoftonline.com/{keyvault_stack.tenant_id}", '
                 f'resource="https://vault.azure.net"')
    cases = [
        (None, "AKV10000: Request is missing a Bearer or PoP token."),
        ("not-a-token-it-issued", "[BadSignature]"),
        (imds.token_for(resource="https://management.azure.com"), "AKV10022: Invalid audience."),
    ]
    for token, message in cases:
        status, headers, body = kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)
        assert status == 401 and headers["www-authenticate"] == challenge
        err = json.loads(body)["error"]
        assert err["code"] == "Unauthorized" and err["message"].startswith(message)
    status, _, _ = kv_request(keyvault_stack, "/secrets/s?api-version=7.4", None,
                              headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 401
    # expire_tokens(): a token that worked gets 401 TokenExpired; a new one works.
    token = imds.token_for()
    assert kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)[0] == 200
    assert kv.expire_tokens() >= 1
    status, headers, body = kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)
    assert status == 401 and headers["www-authenticate"] == challenge
    assert json.loads(body)["error"] == {"code": "Unauthorized",
                                         "message": "[TokenExpired] Error validating token: 'S2S12086'."}
    assert kv_request(keyvault_stack, "/secrets/s?api-version=7.4", imds.token_for())[0] == 200


def test_kv_token_lifetime_is_enforced(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    kv.set_secret("s", "v")
    # Times are whole seconds (as Azure's expires_on): a 1 s token issued late in a
    # second expires at the next one, so the first use raced that boundary (it failed
    # under load). A 2 s token is good for at least a whole second.
    imds.configure(ttl=2)
    resp = imds_get(imds)
    assert resp.status == 200 and resp.json()["expires_in"] == "2"
    token = resp.json()["access_token"]
    assert kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)[0] == 200
    wait_until(lambda: kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)[0] == 401,
               timeout=6, message="the 2 s token to expire")
    assert kv.last().error_code == "Unauthorized"


def test_kv_errors_403_404_400(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    token = imds.token_for()
    status, _, body = kv_request(keyvault_stack, "/secrets/missing?api-version=7.4", token)
    err = json.loads(body)["error"]
    assert status == 404 and err["code"] == "SecretNotFound" and "missing" in err["message"]
    kv.set_secret("off", "v")
    kv.disable("off")
    status, _, body = kv_request(keyvault_stack, "/secrets/off?api-version=7.4", token)
    assert status == 403 and json.loads(body) == {"error": {
        "code": "Forbidden", "message": "Operation get is not allowed on a disabled secret.",
        "innererror": {"code": "SecretDisabled"}}}
    kv.enable("off")
    assert kv_request(keyvault_stack, "/secrets/off?api-version=7.4", token)[0] == 200
    kv.deny("off")
    status, _, body = kv_request(keyvault_stack, "/secrets/off?api-version=7.4", token)
    err = json.loads(body)["error"]
    assert status == 403 and err["code"] == "Forbidden" and err["innererror"] == {"code": "ForbiddenByRbac"}
    assert err["message"].startswith("Caller is not authorized to perform action on resource.")
    kv.deny("nonexistent")                                  # RBAC is checked before existence
    assert kv_request(keyvault_stack, "/secrets/nonexistent?api-version=7.4", token)[0] == 403
    kv.allow("off")
    assert kv_request(keyvault_stack, "/secrets/off?api-version=7.4", token)[0] == 200
    for path in ("/secrets/off", "/secrets/off?api-version=banana"):
        status, _, body = kv_request(keyvault_stack, path, token)
        assert status == 400 and json.loads(body)["error"]["code"] == "BadParameter"
    status, _, body = kv_request(keyvault_stack, "/secrets/bad_name?api-version=7.4", token)
    assert status == 400 and json.loads(body)["error"]["code"] == "BadParameter"
    assert kv_request(keyvault_stack, "/keys/k?api-version=7.4", token)[0] == 404
    # DELETE /secrets/<name> deletes (see test_kv_delete_*); no other method is served there.
    assert kv_request(keyvault_stack, "/secrets/off?api-version=7.4", token, method="PATCH")[0] == 405
    assert kv_request(keyvault_stack, "/secrets/off/" + "0" * 32 + "?api-version=7.4", token,
                      method="DELETE")[0] == 405


def test_kv_fault_injection(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    token = imds.token_for()
    kv.set_secret("s", "ok")
    kv.fail_next(2, 500)
    kv.fail_next(1, 200, b'{"value": "trunc')
    statuses = [kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token) for _ in range(4)]
    assert [s for s, _, _ in statuses] == [500, 500, 200, 200]
    assert json.loads(statuses[0][2])["error"]["code"] == "InternalServerError"
    with pytest.raises(ValueError):
        json.loads(statuses[2][2])
    assert json.loads(statuses[3][2])["value"] == "ok"
    assert [r.fault for r in kv.requests()] == [True, True, True, False]
    # A value with control characters arrives JSON-escaped and decodes back exactly.
    nasty = "line1\r\nline2\x00\x1b[31m\u2028\"\\"
    kv.set_secret("nasty", nasty)
    status, _, body = kv_request(keyvault_stack, "/secrets/nasty?api-version=7.4", token)
    assert status == 200 and b"\\u0000" in body and b"\\r\\n" in body and json.loads(body)["value"] == nasty
    # Dropped connection, then a slow answer.
    kv.fail_next(1, None, close=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, ssl.SSLError)):
        kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)
    kv.fail_next(1, None, delay_s=0.3)
    t0 = time.monotonic()
    assert kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)[0] == 200
    assert time.monotonic() - t0 >= 0.3
    kv.fail_next(1, 503, {"error": {"code": "ServiceUnavailable", "message": "busy"}},
                 headers={"Retry-After": "1"})
    status, headers, body = kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token)
    assert status == 503 and headers["retry-after"] == "1" and json.loads(body)["error"]["code"] == "ServiceUnavailable"
    assert keyvault_stack.errors == []


def test_kv_put_answer_is_what_latchkey_reads(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    token = imds.token_for()
    name = "latchkey-connections-github-" + "0f" * 32
    path = f"/secrets/{name}?api-version=7.4"
    before = int(time.time())
    status, headers, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "rt-\u00e4"})
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert set(doc) == {"value", "id", "attributes"} and doc["value"] == "rt-\u00e4"
    got_name, version = ID_RE.match(doc["id"]).groups()
    assert got_name == name and kv.versions(name) == [version]
    created = doc["attributes"]["created"]
    assert before <= created <= int(time.time())
    assert doc["attributes"] == {"enabled": True, "created": created, "updated": created,
                                 "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
    # Read back: latest and by version give the same bundle.
    for p in (path, f"/secrets/{name}/{version}?api-version=7.4"):
        status, _, body = kv_request(keyvault_stack, p, token)
        assert status == 200 and json.loads(body) == doc
    # A second write: a new version, now the latest; contentType and tags are echoed.
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT",
                                 body={"value": "rt-2", "contentType": "text/plain", "tags": {"a": "b"}})
    doc2 = json.loads(body)
    assert status == 200 and set(doc2) == {"value", "id", "attributes", "contentType", "tags"}
    assert doc2["contentType"] == "text/plain" and doc2["tags"] == {"a": "b"}
    v2 = doc2["id"].rsplit("/", 1)[1]
    assert kv.versions(name) == [version, v2]
    assert json.loads(kv_request(keyvault_stack, path, token)[2])["value"] == "rt-2"
    assert [(w.name, w.version, w.value) for w in kv.writes()] == [(name, version, "rt-\u00e4"), (name, v2, "rt-2")]
    # Refusals store nothing: no token (401 challenge), bad bodies and names (400), a version path (405).
    status, headers, _ = kv_request(keyvault_stack, path, None, method="PUT", body={"value": "x"})
    assert status == 401 and "www-authenticate" in headers
    for bad in (b"", b"not json", b"[]", b'{"value": 5}', b'{"valu": "x"}', b'{"value": "x", "tags": {"a": 1}}',
                b'{"value": "x", "attributes": {"enabled": "yes"}}'):
        status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body=bad,
                                     headers={"Content-Type": "application/json"})
        assert status == 400 and json.loads(body)["error"]["code"] == "BadParameter", bad
    for bad_name in ("bad_name", "a" * 128, "a.b", "%C3%A4"):
        status, _, body = kv_request(keyvault_stack, f"/secrets/{bad_name}?api-version=7.4", token,
                                     method="PUT", body={"value": "x"})
        assert status == 400 and json.loads(body)["error"]["code"] == "BadParameter", bad_name
    status, _, _ = kv_request(keyvault_stack, f"/secrets/{name}/{version}?api-version=7.4", token,
                              method="PUT", body={"value": "x"})
    assert status == 405
    assert kv.versions(name) == [version, v2] and len(kv.writes()) == 2
    # Names are case-insensitive: a write in another case is a new version of the same secret.
    status, _, body = kv_request(keyvault_stack, f"/secrets/{name.upper()}?api-version=7.4", token,
                                 method="PUT", body={"value": "rt-3"})
    assert status == 200 and ID_RE.match(json.loads(body)["id"]).group(1) == name
    assert len(kv.versions(name)) == 3 and kv.writes()[-1].name == name.upper()
    assert "rt-2" not in repr(kv.requests())


def test_kv_delete_answers(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    token = imds.token_for()
    name = "latchkey-connections-crm"
    path = f"/secrets/{name}?api-version=7.4"
    kv.set_secret(name, "one")
    latest = kv.set_secret(name, "two", content_type="text/plain")
    before = int(time.time())
    status, headers, body = kv_request(keyvault_stack, path, token, method="DELETE")
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    doc = json.loads(body)
    assert set(doc) == {"recoveryId", "deletedDate", "scheduledPurgeDate", "id", "attributes", "contentType"}
    assert "two" not in body.decode()                                     # no value
    assert doc["recoveryId"] == f"https://kv-test.vault.azure.net/deletedsecrets/{name}"
    assert doc["id"] == f"https://kv-test.vault.azure.net/secrets/{name}/{latest}"
    assert before <= doc["deletedDate"] <= int(time.time())
    assert doc["scheduledPurgeDate"] == doc["deletedDate"] + 90 * 86400
    assert doc["attributes"]["recoveryLevel"] == "Recoverable+Purgeable" and doc["attributes"]["enabled"] is True
    assert kv.deletes(name)[-1].served_version == latest
    # Gone for reads; the name is taken for writes; a second DELETE is 404.
    status, _, body = kv_request(keyvault_stack, path, token)
    assert status == 404 and json.loads(body)["error"]["code"] == "SecretNotFound"
    status, _, body = kv_request(keyvault_stack, path, token, method="DELETE")
    assert status == 404 and json.loads(body)["error"]["code"] == "SecretNotFound"
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "three"})
    assert status == 409 and json.loads(body) == {"error": {
        "code": "Conflict",
        "message": f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
                   "reused; in this state, the secret can only be recovered or purged.",
        "innererror": {"code": "ObjectIsDeletedButRecoverable"}}}
    # /deletedsecrets: read, purge (204, empty), then 404; the name is free again.
    deleted_path = f"/deletedsecrets/{name}?api-version=7.4"
    status, _, body = kv_request(keyvault_stack, deleted_path, token)
    assert status == 200 and json.loads(body) == doc
    status, headers, body = kv_request(keyvault_stack, deleted_path, token, method="DELETE")
    assert status == 204 and body == b""
    status, _, body = kv_request(keyvault_stack, deleted_path, token)
    assert status == 404 and json.loads(body) == {"error": {"code": "SecretNotFound",
                                                            "message": f"Deleted Secret not found: {name}"}}
    assert kv_request(keyvault_stack, path, token, method="PUT", body={"value": "three"})[0] == 200
    assert [r.operation for r in kv.requests()] == ["delete", "get", "delete", "set", "get_deleted",
                                                    "purge", "get_deleted", "set"]
    # A vault without soft-delete: DELETE answers {"id", "attributes"} and frees the name at once.
    kv.soft_delete = False
    status, _, body = kv_request(keyvault_stack, path, token, method="DELETE")
    assert status == 200 and set(json.loads(body)) == {"id", "attributes"}
    assert json.loads(body)["attributes"]["recoveryLevel"] == "Purgeable"
    assert kv_request(keyvault_stack, path, token, method="PUT", body={"value": "four"})[0] == 200
    # DELETE without a token: the 401 challenge, nothing deleted.
    assert kv_request(keyvault_stack, path, None, method="DELETE")[0] == 401
    assert kv.secret_value(name) == "four"


def test_kv_write_faults_and_a_concurrent_writer(keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    token = imds.token_for()
    name = "latchkey-connections-github-ab12"
    path = f"/secrets/{name}?api-version=7.4"
    kv.set_secret(name, "stored")
    # Faults for writes only: reads pass by, the next PUT takes it; nothing is stored.
    kv.fail_writes(1, 503)
    kv.fail_writes(1, 403)
    assert kv_request(keyvault_stack, path, token)[0] == 200
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "new"})
    assert status == 503 and json.loads(body)["error"]["code"] == "InternalServerError"
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "new"})
    assert status == 403 and json.loads(body)["error"]["code"] == "Forbidden"
    assert [r.fault for r in kv.requests()] == [False, True, True]
    assert kv.writes() == [] and kv.secret_value(name) == "stored" and len(kv.versions(name)) == 1
    # RBAC: a role without setSecret / delete, for one identity or everyone.
    kv.deny("*", operations=["set"])
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "new"})
    err = json.loads(body)["error"]
    assert status == 403 and err["innererror"] == {"code": "ForbiddenByRbac"}
    assert "'Microsoft.KeyVault/vaults/secrets/setSecret/action'" in err["message"]
    assert kv_request(keyvault_stack, path, token)[0] == 200
    kv.allow("*")
    kv.deny(name, imds.system_identity.client_id, operations=["delete"])
    status, _, body = kv_request(keyvault_stack, path, token, method="DELETE")
    assert status == 403 and "'Microsoft.KeyVault/vaults/secrets/delete'" in json.loads(body)["error"]["message"]
    kv.allow(name)
    # A concurrent writer: right after our PUT another one lands, so the read-back shows it.
    racer = kv.race_next_write("from-another-proxy")
    status, _, body = kv_request(keyvault_stack, path, token, method="PUT", body={"value": "mine"})
    mine = json.loads(body)
    assert status == 200 and mine["value"] == "mine"
    my_version = mine["id"].rsplit("/", 1)[1]
    assert len(racer) == 1 and racer[0] != my_version
    latest = json.loads(kv_request(keyvault_stack, path, token)[2])
    assert latest["value"] == "from-another-proxy" and latest["id"].endswith("/" + racer[0])
    assert kv.versions(name)[-2:] == [my_version, racer[0]]
    assert [(w.version, w.value) for w in kv.writes()] == [(my_version, "mine")]   # only what came over HTTP
    # The race happens once; on_write hooks can watch every write.
    seen = []
    kv.on_write(seen.append, name=name, times=None)
    kv_request(keyvault_stack, path, token, method="PUT", body={"value": "again"})
    assert json.loads(kv_request(keyvault_stack, path, token)[2])["value"] == "again"
    assert [w.value for w in seen] == ["again"]
    assert keyvault_stack.errors == []


def test_kv_tls_certificate_names(keyvault_stack):
    """The certificate is valid for the vault host, localhost and 127.0.0.1 under the
    test CA, and nothing else; the SNI sent (or none) is logged."""
    token = keyvault_stack.imds.token_for()
    keyvault_stack.kv.set_secret("s", "v")
    for sni in ("kv-test.vault.azure.net", "localhost", None):
        assert kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token, sni=sni)[0] == 200
    assert [r.sni for r in keyvault_stack.kv.requests()] == ["kv-test.vault.azure.net", "localhost", None]
    with pytest.raises(ssl.SSLCertVerificationError):
        kv_request(keyvault_stack, "/secrets/s?api-version=7.4", token, sni="other.vault.azure.net")
    other_ca = LocalCA()
    try:
        sock = socket.create_connection((LOOPBACK, keyvault_stack.kv.port), timeout=5)
        with pytest.raises(ssl.SSLCertVerificationError):
            other_ca.client_context().wrap_socket(sock, server_hostname="kv-test.vault.azure.net")
        sock.close()
    finally:
        other_ca.cleanup()


# --------------------------------------------------------------------------- IMDS, raw protocol


def test_imds_token_answer_shape(keyvault_stack):
    imds = keyvault_stack.imds
    before = int(time.time())
    resp = imds_get(imds)
    assert resp.status == 200 and resp.header("Content-Type") == "application/json; charset=utf-8"
    body = resp.json()
    assert set(body) == {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
                         "not_before", "resource", "token_type"}
    assert all(isinstance(v, str) for v in body.values())      # expires_in too: a string
    assert body["expires_in"] == "3599" and body["ext_expires_in"] == "3599"
    assert before + 3599 <= int(body["expires_on"]) <= int(time.time()) + 3599
    assert body["token_type"] == "Bearer" and body["resource"] == KEY_VAULT_RESOURCE
    assert body["client_id"] == imds.system_identity.client_id
    assert imds.last().token == body["access_token"]
    assert body["access_token"] != imds_get(imds).json()["access_token"]   # fresh every time
    # expires_in as a number instead, and a short lifetime.
    imds.configure(ttl=10, expires_in_number=True)
    body = imds_get(imds).json()
    assert body["expires_in"] == 10 and body["ext_expires_in"] == 10 and isinstance(body["expires_on"], str)
    imds.configure(expires_in_number=False)
    assert imds_get(imds).json()["expires_in"] == "10"
    # reuse_tokens: the same token per identity and resource, with a shrinking expires_in.
    imds.configure(ttl=3599, reuse_tokens=True)
    a, b = imds_get(imds).json(), imds_get(imds).json()
    assert a["access_token"] == b["access_token"] and int(b["expires_in"]) <= 3599


def test_imds_refusals(keyvault_stack):
    imds = keyvault_stack.imds
    resp = imds_get(imds, headers={})
    assert resp.status == 400 and resp.json() == {
        "error": "invalid_request", "error_description": "Required metadata header not specified"}
    assert imds_get(imds, headers={"Metadata": "false"}).status == 400
    resp = imds_get(imds, headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.1"})
    assert resp.status == 400 and resp.json()["error"] == "invalid_request"
    resp = imds_get(imds, {"api-version": "2018-02-01", "resource": KEY_VAULT_RESOURCE,
                           "client_id": "11111111-1111-1111-1111-111111111111"})
    assert resp.status == 400 and resp.json() == {"error": "invalid_request", "error_description": "Identity not found"}
    assert imds_get(imds, {"api-version": "2018-02-01"}).status == 400
    assert imds_get(imds, {"resource": KEY_VAULT_RESOURCE}).status == 400
    assert imds_get(imds, path="/metadata/instance").status == 404
    assert http_request(imds.port, "POST", IMDS_TOKEN_PATH + "?api-version=2018-02-01&resource=x",
                        headers={"Metadata": "true"}).status == 405
    assert all(r.token is None for r in imds.requests()) and imds.issued() == []
    # user-assigned identities by client_id (any case) or object_id
    user = imds.add_identity()
    for key, value in (("client_id", user.client_id.upper()), ("object_id", user.object_id)):
        body = imds_get(imds, {"api-version": "2018-02-01", "resource": KEY_VAULT_RESOURCE, key: value}).json()
        assert body["client_id"] == user.client_id
    assert {t.identity.kind for t in imds.issued()} == {"user"}


def test_imds_outages(keyvault_stack):
    imds = keyvault_stack.imds
    port = imds.port
    imds.fail("refuse")
    assert imds.fault == "refuse" and not imds.listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    imds.recover()
    assert imds.port == port and imds.listening
    assert imds_get(imds).status == 200
    imds.fail(500, times=2)
    assert [imds_get(imds).status for _ in range(3)] == [500, 500, 200]
    imds.fail(503, body={"error": "busy"})
    assert imds_get(imds).json() == {"error": "busy"} and imds_get(imds).status == 503
    imds.fail("garbage", times=1)
    resp = imds_get(imds)
    assert resp.status == 200 and not resp.body.startswith(b"{")
    imds.fail("no_token", times=1)
    assert "access_token" not in imds_get(imds).json()
    imds.fail("close", times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        imds_get(imds)
    imds.fail("delay", delay_s=0.3, times=1)
    t0 = time.monotonic()
    assert imds_get(imds).status == 200 and time.monotonic() - t0 >= 0.3
    imds.fail("refuse")
    imds.fail("refuse")                                     # idempotent
    imds.recover()
    imds.recover()
    assert imds_get(imds).status == 200
    assert [r.status for r in imds.requests()].count(0) == 1   # the dropped one
    assert keyvault_stack.errors == []


# --------------------------------------------------------------------------- through a real Envoy


def kv_virtual_host(cluster: str = "keyvault"):
    """/secrets -> `cluster`, Host rewritten to the vault, Authorization from x-kv-token
    (jwt_authn in the harness chain would refuse an opaque bearer token)."""
    return [{"name": "kv", "domains": ["*"], "routes": [
        {"match": {"prefix": "/secrets"},
         "route": {"cluster": cluster, "timeout": "5s", "host_rewrite_literal": "kv-test.vault.azure.net"},
         "request_headers_to_add": [{"header": {"key": "authorization", "value": "Bearer %REQ(x-kv-token)%"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        {"match": {"prefix": "/metadata"}, "route": {"cluster": "imds", "timeout": "5s"}},
    ]}]


def test_envoy_tls_cluster_reaches_kv_stand_in(envoy_factory, keyvault_stack):
    kv, imds = keyvault_stack.kv, keyvault_stack.imds
    version = kv.set_secret("partner-key", "via-envoy")
    envoy = envoy_factory(None, wasm_path=None, virtual_hosts=kv_virtual_host(),
                          extra_clusters=keyvault_stack.clusters())
    token = imds.token_for()
    resp = envoy.request("GET", "/secrets/partner-key?api-version=7.4", headers={"x-kv-token": token})
    assert resp.status == 200, resp.body
    assert json.loads(resp.body)["id"].endswith(f"/partner-key/{version}")
    rec = kv.last()
    assert rec.sni == "kv-test.vault.azure.net" and rec.header("Host") == "kv-test.vault.azure.net"
    assert rec.client_id == imds.system_identity.client_id
    # IMDS through Envoy's router: this HCM adds no X-Forwarded-For, so IMDS answers.
    resp = envoy.request("GET", IMDS_TOKEN_PATH + "?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net",
                         headers={"Metadata": "true"})
    assert resp.status == 200, resp.body
    assert imds.last().header("X-Forwarded-For") is None


def test_envoy_tls_cluster_refuses_an_untrusted_certificate(envoy_factory, keyvault_stack):
    kv = keyvault_stack.kv
    other_ca = LocalCA()
    try:
        bad = [tls_cluster("keyvault", kv.port, sni=kv.sni, ca_path=other_ca.ca_path),
               keyvault_stack.imds.envoy_cluster("imds")]
        envoy = envoy_factory(None, wasm_path=None, virtual_hosts=kv_virtual_host(), extra_clusters=bad)
        resp = envoy.request("GET", "/secrets/partner-key?api-version=7.4", headers={"x-kv-token": "t"})
        assert resp.status == 503
        assert kv.requests() == []                              # no request got through the handshake
    finally:
        other_ca.cleanup()


# --------------------------------------------------------------------------- OpenBao (the real server)


def test_bao_kv_v2_read_is_what_latchkey_reads(openbao):
    assert openbao.kv_put("orders/idp", {"client_secret": "first", "other": "x"}) == 1
    assert openbao.kv_put("orders/idp", {"client_secret": "second"}) == 2
    resp = openbao.kv_get("orders/idp")
    assert resp.status == 200
    data = resp.body["data"]
    assert data["data"] == {"client_secret": "second"}
    assert data["metadata"]["version"] == 2 and isinstance(data["metadata"]["version"], int)
    assert set(data["metadata"]) >= {"created_time", "deletion_time", "destroyed", "version", "custom_metadata"}
    old = openbao.kv_get("orders/idp", version=1).body["data"]
    assert old["data"]["client_secret"] == "first" and old["metadata"]["version"] == 1
    assert openbao.kv_read("orders/idp", "client_secret") == ("second", 2)
    # Non-ASCII and control characters survive JSON.
    openbao.kv_put("orders/nasty", {"v": "l1\r\nl2\x00\u00e4"})
    assert openbao.kv_read("orders/nasty", "v") == ("l1\r\nl2\x00\u00e4", 1)
    reads = openbao.wait_for_audit(3, path="secret/data/orders/idp", operation="read")
    assert reads[-1]["auth"]["display_name"] == "token"      # audited, HMAC'd values only
    assert "second" not in openbao.audit_path.read_text()


@pytest.mark.parametrize("key_type,alg,params,size", [
    ("rsa-2048", "RS256", {"signature_algorithm": "pkcs1v15"}, 256),
    ("rsa-2048", "PS256", {"signature_algorithm": "pss", "salt_length": "hash"}, 256),
    ("ecdsa-p256", "ES256", {}, 64),
])
def test_bao_transit_signs_a_jws_its_public_jwk_verifies(openbao, key_type, alg, params, size):
    """The sign call latchkey makes (POST /v1/transit/sign/<key>/sha2-256, base64 input,
    marshaling_algorithm jws and, for RSA, the padding of `alg`): data.signature is
    "vault:v<version>:<base64url signature>", the signature a JWS holds; the JWK made
    from Transit's PEM public key verifies it (PyJWT). A token with only the sign policy
    signs with that key and nothing else."""
    import jwt
    from secret_stores import b64url, b64url_decode
    openbao.enable_transit()
    openbao.transit_key("signer", key_type)
    openbao.transit_key("another", key_type)
    token = openbao.transit_sign_token("signer")
    jwk = openbao.transit_jwk("signer", alg=alg)
    assert jwk["kid"] == "signer" and "d" not in jwk
    signing_input = b64url(json.dumps({"alg": alg, "kid": "signer"}).encode()) + "." + b64url(b'{"sub":"x"}')
    resp = openbao.transit_sign("signer", signing_input.encode(), token=token,
                                marshaling_algorithm="jws", **params)
    assert resp.status == 200, resp.raw
    prefix, version, sig = resp.body["data"]["signature"].split(":", 2)
    assert (prefix, version, resp.body["data"]["key_version"]) == ("vault", "v1", 1)
    assert "=" not in sig and len(b64url_decode(sig)) == size
    decoded = jwt.api_jws.decode_complete(f"{signing_input}.{sig}", jwt.PyJWK(jwk).key, algorithms=[alg])
    assert decoded["payload"] == b'{"sub":"x"}'
    # The policy: sign with "signer" only; no read of the key, no other key.
    assert openbao.transit_sign("another", b"x", token=token, marshaling_algorithm="jws").status == 403
    assert openbao.api("GET", "transit/keys/signer", token=token).status == 403
    openbao.revoke_token(token)
    assert openbao.transit_sign("signer", b"x", token=token, marshaling_algorithm="jws").status == 403
    audited = openbao.wait_for_audit(1, path="transit/sign/signer/sha2-256", operation="update")
    assert audited[0]["auth"]["policies"] == ["transit-sign-signer"]


def test_bao_sealed_answers_503(openbao):
    openbao.enable_transit()
    openbao.transit_key("signer", "ecdsa-p256")
    openbao.seal()
    resp = openbao.transit_sign("signer", b"x", marshaling_algorithm="jws")
    assert resp.status == 503 and "sealed" in resp.raw.decode().lower()


def test_bao_approle_login(openbao):
    openbao.kv_put("orders/idp", {"client_secret": "v1"})
    openbao.policy("orders-read", read_policy_hcl("orders/idp"))
    role_id, secret_id = openbao.approle("latchkey", ["orders-read"], token_ttl="10s", token_max_ttl="30s")
    resp = openbao.approle_login(role_id, secret_id)
    assert resp.status == 200
    auth = resp.body["auth"]
    assert auth["lease_duration"] == 10 and isinstance(auth["lease_duration"], int)
    assert auth["client_token"] and auth["policies"] == ["default", "orders-read"]
    assert auth["renewable"] is True and auth["metadata"] == {"role_name": "latchkey"}
    assert openbao.kv_read("orders/idp", "client_secret", token=auth["client_token"]) == ("v1", 1)
    # The same role can log in again (a new token); a wrong secret_id can't.
    again = openbao.approle_login(role_id, secret_id).body["auth"]["client_token"]
    assert again != auth["client_token"]
    bad = openbao.approle_login(role_id, "00000000-0000-0000-0000-000000000000")
    assert bad.status == 400 and any("invalid" in e for e in bad.body["errors"])
    # A second role on the same mount (enable_approle runs once).
    openbao.approle("other", ["default"])


def test_bao_token_without_policy_is_403(openbao):
    openbao.kv_put("orders/idp", {"client_secret": "v1"})
    openbao.policy("elsewhere", read_policy_hcl("payments/*"))
    token = openbao.token(["elsewhere"], ttl="1h")
    resp = openbao.kv_get("orders/idp", token=token)
    assert resp.status == 403 and any("permission denied" in e for e in resp.body["errors"])
    for bad in (None, "s.not-a-token"):
        assert openbao.kv_get("orders/idp", token=bad).status == 403
    # read_policy_hcl with a glob grants it
    openbao.policy("orders-any", read_policy_hcl("orders/*"))
    assert openbao.kv_get("orders/idp", token=openbao.token(["orders-any"])).status == 200


def test_bao_missing_and_deleted_paths_are_404(openbao):
    resp = openbao.kv_get("nothing/here")
    assert resp.status == 404 and resp.body == {"errors": []}
    openbao.kv_put("orders/gone", {"f": "v1"})
    openbao.kv_put("orders/gone", {"f": "v2"})
    openbao.kv_delete("orders/gone")                        # soft delete of the latest version
    resp = openbao.kv_get("orders/gone")
    assert resp.status == 404                               # ...with a body that still has metadata
    assert resp.body["data"]["data"] is None and resp.body["data"]["metadata"]["version"] == 2
    assert resp.body["data"]["metadata"]["deletion_time"] != ""
    assert openbao.kv_read("orders/gone", "f", version=1) == ("v1", 1)
    openbao.kv_destroy("orders/gone", [1])
    resp = openbao.kv_get("orders/gone", version=1)
    assert resp.status == 404 and resp.body["data"]["metadata"]["destroyed"] is True
    openbao.kv_delete_metadata("orders/gone")
    assert openbao.kv_get("orders/gone").body == {"errors": []}
    with pytest.raises(BaoError):
        openbao.kv_read("orders/gone", "f")


def test_bao_token_expiry(openbao):
    openbao.kv_put("orders/idp", {"client_secret": "v1"})
    openbao.policy("orders-read", read_policy_hcl("orders/idp"))
    token = openbao.token(["orders-read"], ttl="2s")
    look = openbao.lookup_token(token).body["data"]
    assert 0 < look["ttl"] <= 2
    assert openbao.kv_get("orders/idp", token=token).status == 200
    wait_until(lambda: openbao.kv_get("orders/idp", token=token).status == 403, timeout=10,
               message="the 2 s token to expire")


def test_bao_namespace_header(openbao):
    ns = openbao.namespace("team-a")
    assert openbao.kv_put("orders/idp", {"client_secret": "in-ns"}, namespace=ns) == 1
    openbao.kv_put("orders/idp", {"client_secret": "root-ns"})
    assert openbao.kv_read("orders/idp", "client_secret", namespace=ns) == ("in-ns", 1)
    assert openbao.kv_read("orders/idp", "client_secret") == ("root-ns", 1)


def test_bao_fixture_facts(openbao):
    assert openbao.running and openbao.url == f"http://127.0.0.1:{openbao.port}"
    assert openbao.startup_seconds is not None and openbao.startup_seconds < 15
    health = openbao.api("GET", "sys/health", token=None).body
    assert health["initialized"] is True and health["sealed"] is False
    mounts = openbao.api("GET", "sys/mounts").body["data"]
    assert mounts["secret/"]["type"] == "kv" and mounts["secret/"]["options"]["version"] == "2"
    cluster = openbao.envoy_cluster("vault")
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"] == {"address": "127.0.0.1", "port_value": openbao.port}


def test_bao_token_store_check_and_set(openbao):
    """latchkey's token-store records in KV v2: create with cas=0, rotate with cas=<version
    read>, disconnect with a metadata delete. Pins OpenBao's CAS refusal exactly."""
    token = openbao.token_store_token()
    path = "latchkey/connections/github_mine/" + "ab" * 32
    record = {"refresh_token": "r1", "scopes": ["repo"], "updated": 1767225600}
    assert openbao.kv_read(path, token=token) is None and openbao.kv_versions(path) == []
    assert openbao.kv_write(path, record, cas=0, token=token) == 1          # absent: created
    # cas=0 when present: refused with exactly this answer.
    resp = openbao.kv_write_raw(path, {"refresh_token": "r2"}, cas=0, token=token)
    assert resp.status == 400 and resp.header("Content-Type") == "application/json"
    assert resp.raw == b'{"errors":["check-and-set parameter did not match the current version"]}\n'
    assert openbao.kv_write(path, {"refresh_token": "r2"}, cas=0, token=token) is None
    assert openbao.kv_write(path, {"refresh_token": "r2"}, cas=2, token=token) is None   # ahead
    rotated = {"refresh_token": "r2", "scopes": ["repo"], "updated": 1767225700}
    assert openbao.kv_write(path, rotated, cas=1, token=token) == 2         # cas=current: ok
    assert openbao.kv_write(path, {"refresh_token": "r3"}, cas=1, token=token) is None  # stale
    assert openbao.kv_read(path, token=token) == (rotated, 2)               # JSON types kept
    assert openbao.kv_versions(path) == [1, 2]
    # The write answer: data.version is the new version.
    resp = openbao.kv_write_raw(path, {"refresh_token": "r3"}, cas=2, token=token)
    assert resp.status == 200 and resp.body["data"]["version"] == 3 and "data" not in resp.body["data"]
    # The token may do nothing outside the prefix.
    openbao.kv_put("orders/idp", {"client_secret": "x"})
    assert openbao.kv_get("orders/idp", token=token).status == 403
    resp = openbao.kv_write_raw("orders/idp", {"x": "y"}, token=token)
    assert resp.status == 403 and any("permission denied" in e for e in resp.body["errors"])
    # Disconnect: the metadata delete removes every version (204, also when nothing is there).
    openbao.kv_delete_all(path, token=token)
    assert openbao.kv_read(path, token=token) is None and openbao.kv_versions(path) == []
    assert openbao.kv_get(path, version=1).status == 404
    openbao.kv_delete_all(path, token=token)
    assert openbao.kv_write(path, record, cas=0, token=token) == 1          # a new consent: version 1
    # A soft-deleted latest version (`bao kv delete`): the read is 404 but still names the
    # version, and cas=0 is refused: the write needs cas=<that version>.
    openbao.kv_delete(path)
    resp = openbao.kv_get(path, token=token)
    assert resp.status == 404 and resp.body["data"]["data"] is None
    assert resp.body["data"]["metadata"]["version"] == 1
    assert openbao.kv_read(path, token=token) is None
    assert openbao.kv_write(path, record, cas=0, token=token) is None
    assert openbao.kv_write(path, record, cas=1, token=token) == 2
    # The same policy through AppRole.
    role_id, secret_id = openbao.token_store_approle()
    login = openbao.approle_login(role_id, secret_id)
    assert login.status == 200 and "latchkey-token-store" in login.body["auth"]["policies"]
    assert openbao.kv_read(path, token=login.body["auth"]["client_token"]) == (record, 2)
