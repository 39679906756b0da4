"""An Envoy configured the way Istio configures a gateway proxy for deploy/istio.

Everything is derived from the manifests in deploy/istio, not copied:

- the WasmPlugin becomes what Istio's agent hands Envoy: an ECDS resource (a
  `TypedExtensionConfig` named `extensions.istio.io/wasmplugin/<ns>.<name>`) with the
  pluginConfig as a JSON `StringValue`, `root_id` = pluginName, the module as a local file
  (the agent's cache), `vmConfig.env` as `host_env_keys`/`key_values`, `failStrategy` as
  `failure_policy`; the HTTP filter that names it uses `config_discovery` (here from a file,
  `path_config_source`, where Istio uses ADS) with the Wasm and RBAC type URLs;
- the RequestAuthentication becomes jwt_authn as istiod builds it (provider `origins-0`,
  `payload_in_metadata: payload`, `scope`/`permission` as space-delimited claims, a JWT
  optional, `bypass_cors_preflight`), with the test key's JWKS inline as istiod inlines it;
- the VirtualService's named http routes become the Envoy routes (route names as Istio
  gives them), the ServiceEntry/DestinationRule pairs become `outbound|443||<host>` clusters
  with TLS originated (SNI from the DestinationRule);
- stats: Istio's bootstrap stats_config (its tags and its inclusion list, plus the gateway's
  proxyStatsMatcher), and the ConfigMap's custom_bootstrap.json passed with --config-yaml,
  as the Istio agent passes a bootstrapOverride.

The listener comes from LDS (a file) too, so that a listener update can be tried.
Not modelled: Istio's own `istio_authn` and stats filters (not in upstream Envoy), mTLS.
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
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import LOOPBACK, REPO_ROOT, BacklogHTTPServer, RequestLog, static_cluster

DEPLOY = REPO_ROOT / "deploy" / "istio"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
FAIL_POLICY = {"FAIL_CLOSE": "FAIL_CLOSED", "FAIL_OPEN": "FAIL_OPEN", "FAIL_RELOAD": "FAIL_RELOAD"}

# Istio's bootstrap (tools/packaging/common/envoy_bootstrap.json): its stats tags, and the
# inclusion list pilot-agent always adds (pkg/bootstrap/config.go).
ISTIO_STATS_TAGS = [
    {"tag_name": "cluster_name", "regex": "^cluster\\.((.+?(\\..+?\\.svc\\.cluster\\.local)?)\\.)"},
    {"tag_name": "tcp_prefix", "regex": "^tcp\\.((.*?)\\.)\\w+?$"},
    {"regex": "_rq(_(\\d{3}))$", "tag_name": "response_code"},
    {"tag_name": "response_code_class", "regex": "_rq(_(\\dxx))$"},
    {"tag_name": "http_conn_manager_prefix",
     "regex": "^http\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
    {"regex": "(cache\\.(.+?)\\.)", "tag_name": "cache"},
    {"regex": "(component\\.(.+?)\\.)", "tag_name": "component"},
    {"regex": "(wasm_filter\\.(.+?)\\.)", "tag_name": "wasm_filter"},
]
ISTIO_INCLUSION_PREFIXES = ["reporter=", "cluster_manager", "listener_manager", "server",
                            "cluster.xds-grpc", "wasm"]


def docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of a manifest file (empty ones skipped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    """Every document in deploy/istio."""
    out = []
    for f in sorted(DEPLOY.glob("*.yaml")):
        out.extend(docs(f))
    return out


def one(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/istio, found {len(found)}"
    return found[0]


def wasmplugin() -> dict[str, Any]:
    return one("WasmPlugin")


def plugin_config() -> dict[str, Any]:
    """The WasmPlugin's pluginConfig, read from deploy/istio/wasmplugin.yaml."""
    return wasmplugin()["spec"]["pluginConfig"]


def resource_name(plugin: dict[str, Any]) -> str:
    meta = plugin["metadata"]
    return f"extensions.istio.io/wasmplugin/{meta['namespace']}.{meta['name']}"


def wasm_extension_config(plugin: dict[str, Any], wasm_path: Path,
                          config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ECDS resource Istio's agent gives Envoy for `plugin` (module pulled to a file)."""
    spec, meta = plugin["spec"], plugin["metadata"]
    cfg = spec.get("pluginConfig") if config is None else config
    env = spec.get("vmConfig", {}).get("env", [])
    host_keys = [e["name"] for e in env if e.get("valueFrom") == "HOST"]
    inline = {e["name"]: e.get("value", "") for e in env if e.get("valueFrom", "INLINE") == "INLINE"}
    vm_config: dict[str, Any] = {
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm_path)}},
    }
    if host_keys or inline:
        vm_config["environment_variables"] = {}
        if host_keys:
            vm_config["environment_variables"]["host_env_keys"] = host_keys
        if inline:
            vm_config["environment_variables"]["key_values"] = inline
    wasm_config: dict[str, Any] = {
        "name": f"{meta['namespace']}.{meta['name']}",
        "root_id": spec.get("pluginName", ""),
        "vm_config": vm_config,
        "failure_policy": FAIL_POLICY[spec.get("failStrategy", "FAIL_CLOSE")],
    }
    if cfg:
        # protomarshal.ToJSON of the pluginConfig Struct.
        wasm_config["configuration"] = {"@type": STRING_VALUE,
                                        "value": json.dumps(cfg, separators=(",", ":"), sort_keys=True)}
    return {"name": resource_name(plugin),
            "typed_config": {"@type": WASM_TYPE, "config": wasm_config}}


def discovery_response(resources: list[dict[str, Any]], type_url: str, version: str) -> dict[str, Any]:
    return {"version_info": version,
            "resources": [{"@type": type_url, **r} for r in resources]}


def jwt_authn_filter(request_authentication: dict[str, Any], jwks: str) -> dict[str, Any]:
    """jwt_authn as istiod builds it from a RequestAuthentication (one issuer here)."""
    rules = request_authentication["spec"]["jwtRules"]
    providers = {}
    for i, rule in enumerate(rules):
        providers[f"origins-{i}"] = {
            "issuer": rule["issuer"],
            "audiences": rule.get("audiences", []),
            "forward": bool(rule.get("forwardOriginalToken", False)),
            "payload_in_metadata": "payload",
            "normalize_payload_in_metadata": {"space_delimited_claims": ["permission", "scope"]},
            "local_jwks": {"inline_string": jwks},
        }
    assert len(providers) == 1, "the harness models one issuer"
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
            "bypass_cors_preflight": True,
        },
    }


def cluster_name(host: str, port: int) -> str:
    return f"outbound|{port}||{host}"


def routes_from_virtualservice(vs: dict[str, Any]) -> dict[str, Any]:
    """The gateway's route configuration (RDS `http.80`) for the VirtualService."""
    routes = []
    for http in vs["spec"]["http"]:
        dest = http["route"][0]["destination"]
        for m in http.get("match", [{}]):
            uri = m.get("uri", {"prefix": "/"})
            match = {"prefix": uri["prefix"]} if "prefix" in uri else {"path": uri["exact"]}
            routes.append({
                "name": http["name"],
                "match": match,
                "route": {"cluster": cluster_name(dest["host"], dest["port"]["number"]),
                          "timeout": "15s"},
            })
    hosts = vs["spec"]["hosts"]
    domains = [d for h in hosts for d in (h, f"{h}:*")]
    return {"name": "http.80", "virtual_hosts": [
        {"name": f"{hosts[0]}:80", "domains": domains, "routes": routes}]}


def listener(port: int, plugin: dict[str, Any], request_authentication: dict[str, Any],
             vs: dict[str, Any], jwks: str, ecds_path: Path, *, extra: dict | None = None) -> dict:
    """The gateway listener (an LDS resource): jwt_authn, latchkey by ECDS, router."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_0.0.0.0_80",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "route_config": routes_from_virtualservice(vs),
        "http_filters": [
            jwt_authn_filter(request_authentication, jwks),
            {"name": resource_name(plugin), "config_discovery": {
                "config_source": {
                    "path_config_source": {"path": str(ecds_path),
                                           "watched_directory": {"path": str(ecds_path.parent)}},
                    "resource_api_version": "V3",
                    "initial_fetch_timeout": "0s",
                },
                "type_urls": [WASM_TYPE, RBAC_TYPE],
            }},
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    hcm.update(extra or {})
    return {
        "name": "0.0.0.0_80",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def tls_cluster(host: str, port: int, target_port: int, ca_pem: str, sni: str) -> dict:
    """outbound|port||host with TLS originated as a DestinationRule `tls.mode: SIMPLE` does."""
    return static_cluster(cluster_name(host, port), target_port, transport_socket={
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"inline_string": ca_pem},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": sni}}],
            }},
        },
    })


def gateway_deployment() -> dict[str, Any]:
    return next(d for d in manifests() if d.get("kind") == "Deployment"
                and d["metadata"]["name"] == "latchkey-gateway")


def proxy_stats_prefixes() -> list[str]:
    """proxyStatsMatcher.inclusionPrefixes of the gateway pods' proxy.istio.io/config."""
    ann = gateway_deployment()["spec"]["template"]["metadata"]["annotations"]
    return yaml.safe_load(ann["proxy.istio.io/config"])["proxyStatsMatcher"]["inclusionPrefixes"]


def bootstrap_override() -> str:
    """custom_bootstrap.json of the ConfigMap the gateway's bootstrapOverride names."""
    ann = gateway_deployment()["spec"]["template"]["metadata"]["annotations"]
    name = ann["sidecar.istio.io/bootstrapOverride"]
    cm = next(d for d in manifests() if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == name)
    return cm["data"]["custom_bootstrap.json"]


def istio_stats_config() -> dict[str, Any]:
    return {
        "use_all_default_tags": False,
        "stats_tags": ISTIO_STATS_TAGS,
        "stats_matcher": {"inclusion_list": {"patterns": [
            *({"prefix": p} for p in proxy_stats_prefixes() + ISTIO_INCLUSION_PREFIXES),
            {"suffix": "component"}, {"prefix": "istio"},
        ]}},
    }


def bootstrap(admin_port: int, lds_path: Path, clusters: list[dict]) -> dict[str, Any]:
    return {
        "node": {"id": "router~127.0.0.1~latchkey-gateway-0.latchkey~latchkey.svc.cluster.local",
                 "cluster": "latchkey-gateway.latchkey"},
        "admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}},
        "stats_config": istio_stats_config(),
        "dynamic_resources": {"lds_config": {
            "path_config_source": {"path": str(lds_path), "watched_directory": {"path": str(lds_path.parent)}},
            "resource_api_version": "V3",
        }},
        "static_resources": {"clusters": clusters,
                             # A listener for Envoy's harness: it reads the first static one.
                             "listeners": []},
    }


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Write `doc` as JSON next to `path`, then rename over it (what Envoy's watch sees)."""
    tmp = path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.rename(tmp, path)


# --------------------------------------------------------------------------- TLS token server


def make_ca_and_cert(host: str, tmp: Path) -> tuple[str, Path, Path]:
    """A throwaway CA and a server certificate for `host`: (ca_pem, cert_file, key_file)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "latchkey test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = tmp / f"{host}.crt", tmp / f"{host}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca.public_bytes(serialization.Encoding.PEM).decode(), cert_file, key_file


class TlsTokenServer:
    """A minimal HTTPS OAuth2 token endpoint (client credentials, client_secret_basic).

    Records each request (method, path, headers, body, the TLS SNI it was reached with) and
    answers `{"access_token": "istio-tok-<n>", "token_type": "Bearer", "expires_in": ttl}`.
    """

    def __init__(self, cert_file: Path, key_file: Path, path: str, client_id: str,
                 client_secret: str, ttl: int = 3600):
        self.log = RequestLog("TLS token server")
        self.path, self.ttl = path, ttl
        self._expected_auth = "Basic " + __import__("base64").b64encode(
            f"{client_id}:{client_secret}".encode()).decode()
        self._n = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sni = getattr(self.connection, "latchkey_sni", None)
                server.log.append({"path": self.path, "headers": dict(self.headers.items()),
                                   "body": body.decode(), "sni": sni})
                if self.path != server.path or self.headers.get("Authorization") != server._expected_auth:
                    out, status = b'{"error":"invalid_client"}', 401
                else:
                    with server._lock:
                        server._n += 1
                        n = server._n
                    out, status = json.dumps({"access_token": f"istio-tok-{n}", "token_type": "Bearer",
                                              "expires_in": server.ttl}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        self.sni_seen: list[str | None] = []

        def on_sni(sock, name, _ctx):
            sock.latchkey_sni = name
            self.sni_seen.append(name)
        ctx.sni_callback = on_sni
        self._server = BacklogHTTPServer((LOOPBACK, 0), Handler)
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "TlsTokenServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="tls-token-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
