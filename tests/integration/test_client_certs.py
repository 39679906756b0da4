"""Client certificates (SPEC v1.1) in a real Envoy 1.40: latchkey picks, per caller,
the cluster whose TLS transport socket presents the right client certificate, by
setting a `cluster_header` that the Envoy route reads. Envoy holds the certificates
(SDS from files it watches) and rotates them without a restart.

The upstream is a real TLS server (Python's ssl) that requires a client certificate
signed by the test CA and answers with the certificate's common name.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from harness import (LOOPBACK, BacklogHTTPServer, Envoy, bearer, envoy_config, free_port,
                     static_cluster)

HEADER = "x-latchkey-cluster"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


class CA:
    """A throwaway CA issuing server and client certificates (PEM files in `dir`)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latchkey test CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, name: str, *, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                 critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(__import__("ipaddress").ip_address(LOOPBACK))]),
                critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert_path, key_path


class MtlsUpstream:
    """A TLS server that requires a client certificate from the CA and answers
    {"cn": <client certificate CN>, "path": ..., "headers": [...]}."""

    def __init__(self, ca: CA):
        cert, key = ca.issue("localhost", "server", server=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca.path)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.seen: list[dict] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                peer = self.connection.getpeercert() or {}
                cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn
                           if k == "commonName"), None)
                seen = {"cn": cn, "path": self.path,
                        "headers": [[k.lower(), v] for k, v in self.headers.items()]}
                with lock:
                    outer.seen.append(seen)
                body = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = BacklogHTTPServer((LOOPBACK, 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def write_sds(directory: Path, name: str, cert: Path, key: Path, tmp_name: str = ".sds.tmp"):
    """Write the SDS file atomically (rename into the watched directory)."""
    doc = {"resources": [{"@type": SECRET, "name": name, "tls_certificate": {
        "certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}}]}
    tmp = directory / tmp_name
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, directory / "sds.json")


def mtls_cluster(name: str, port: int, sds_dir: Path, secret: str, ca: Path) -> dict:
    return static_cluster(name, port, transport_socket={
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": TLS, "sni": "localhost", "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": secret, "sds_config": {
                "path_config_source": {"path": str(sds_dir / "sds.json"),
                                       "watched_directory": {"path": str(sds_dir)}},
                "resource_api_version": "V3"}}],
            "validation_context": {"trusted_ca": {"filename": str(ca)}}}}},
        # One request per upstream connection: a rotated certificate is used at once.
        typed_extension_protocol_options={
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}}}})


CONFIG = {
    "providers": {"partner_mtls": {"type": "client_certificate"}},
    "connections": {
        "partner_cert_a": {"provider": "partner_mtls", "cluster": "partner_a",
                           "access": {"groups": ["billing"]}},
        "partner_cert_b": {"provider": "partner_mtls", "cluster": "partner_b",
                           "access": {"users": ["svc-reports"]}},
    },
    "routes": [{"name": "partner", "match": {"path_prefix": "/partner/"},
                "inject": [{"connections": ["partner_cert_a", "partner_cert_b"],
                            "cluster_header": HEADER}]}],
}


@pytest.fixture
def mtls(tmp_path, signer, upstream, wasm_path):
    ca = CA(tmp_path)
    up = MtlsUpstream(ca)
    dirs = {}
    for n in ("a", "b"):
        d = tmp_path / f"sds_{n}"
        d.mkdir()
        cert, key = ca.issue(f"partner-{n}", f"client_{n}")
        write_sds(d, f"cert_{n}", cert, key)
        dirs[n] = d
    # As envoy/client-certs.yaml: the cluster_header route matches only the clusters
    # latchkey may choose; without one the request gets a 403 of Envoy's.
    vhosts = [{"name": "all", "domains": ["*"], "routes": [
        {"name": "partner", "match": {"prefix": "/partner/", "headers": [
            {"name": HEADER, "string_match": {"safe_regex": {"regex": "partner_a|partner_b"}}}]},
         "route": {"cluster_header": HEADER, "timeout": "10s"}},
        {"name": "partner_unassigned", "match": {"prefix": "/partner/"},
         "direct_response": {"status": 403, "body": {"inline_string": "no certificate chosen"}}},
        {"name": "default", "match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]
    config = envoy_config(free_port(), free_port(), upstream.port, wasm_path, CONFIG,
                          signer.jwks(), virtual_hosts=vhosts, extra_clusters=[
                              mtls_cluster("partner_a", up.port, dirs["a"], "cert_a", ca.path),
                              mtls_cluster("partner_b", up.port, dirs["b"], "cert_b", ca.path)],
                          access_log_path=tmp_path / "access.log")
    config["node"] = {"id": "latchkey-test", "cluster": "latchkey-test"}
    envoy = Envoy(config, tmp_path / "envoy")
    try:
        envoy.start()
        yield envoy, up, ca, dirs
    finally:
        envoy.stop()
        up.stop()


def test_each_caller_gets_its_certificate_and_no_one_picks_one(mtls, upstream, signer):
    envoy, up, _, _ = mtls
    billing = bearer(signer.token({"sub": "bob", "groups": ["billing"]}))
    svc = bearer(signer.token({"sub": "svc-reports"}))
    other = bearer(signer.token({"sub": "eve", "groups": ["staff"]}))
    r = envoy.request("GET", "/partner/x", headers=[billing])
    assert r.status == 200, r
    assert json.loads(r.body)["cn"] == "partner-a"
    r = envoy.request("GET", "/partner/x", headers=[svc])
    assert json.loads(r.body)["cn"] == "partner-b"
    assert envoy.request("GET", "/partner/x", headers=[other]).status == 403
    # A forged cluster header changes nothing.
    r = envoy.request("GET", "/partner/x", headers=[billing, (HEADER, "partner_b")])
    assert json.loads(r.body)["cn"] == "partner-a"
    r = envoy.request("GET", "/partner/x", headers=[other, (HEADER, "partner_b")])
    assert r.status == 403
    assert len(up.seen) == 3
    # Outside the route too: the client's copy never reaches an upstream.
    assert envoy.request("GET", "/elsewhere", headers=[(HEADER, "partner_b")]).status == 200
    assert upstream.last().header(HEADER) is None
    assert all(h[0] != HEADER or h[1] in ("partner_a", "partner_b") for s in up.seen
               for h in s["headers"])


def test_rotated_certificate_used_for_new_connections_without_restart(mtls, signer):
    envoy, up, ca, dirs = mtls
    billing = bearer(signer.token({"sub": "bob", "groups": ["billing"]}))
    stop = threading.Event()
    results: list[tuple[float, int, str | None]] = []

    def load():
        deadline = time.monotonic() + 15
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 3000:
            r = envoy.request("GET", "/partner/load", headers=[billing], timeout=10)
            cn = json.loads(r.body).get("cn") if r.status == 200 else None
            results.append((time.monotonic(), r.status, cn))
            time.sleep(0.01)

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(1.0)
        cert, key = ca.issue("partner-a-rotated", "client_a2")
        rotated = time.monotonic()
        write_sds(dirs["a"], "cert_a", cert, key)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(c == "partner-a-rotated" for _, _, c in results):
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert results and all(s == 200 for _, s, _ in results), [r for r in results if r[1] != 200][:5]
    assert all(c in ("partner-a", "partner-a-rotated") for _, _, c in results)
    first_new = min(ts for ts, _, c in results if c == "partner-a-rotated")
    print(f"rotation to first request with the new certificate: {(first_new - rotated) * 1000:.0f} ms")
    assert first_new - rotated < 5
    assert all(c == "partner-a-rotated" for ts, _, c in results if ts > first_new + 0.2)
