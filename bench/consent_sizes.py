#!/usr/bin/env python3
"""Sizes of per-user consent (issue #18): 10,000 users on one connection.

Real parts: oidc-provider (tests/oauth, refresh tokens rotated on every use), OpenBao
(KV v2), Envoy 1.40 with the built module (two workers), jwt_authn in front. Each user's
consent is a refresh token minted by oidc-provider for the `gw-consent` client and kept
where latchkey keeps it (secret/latchkey/connections/mine/<caller hash>).

Passes, each a request per user over keep-alive connections:
1. cold: all 10,000 users once (every request a cache miss);
2. again: all 10,000 once more (the per-caller cache holds at most 1,024 per connection,
   so most miss again);
3. hot: 500 users, 10 requests each (all hits after their first).
For each pass: store reads and writes and token requests per request (latchkey's and
oidc-provider's counts), and Envoy's RSS. Writes bench/out/consent_sizes.json and prints
a summary. Every process it starts is stopped by pid; every wait is bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Envoy, Signer, Upstream, envoy_config, free_port, static_cluster  # noqa: E402
from secret_stores import OpenBao  # noqa: E402
from token_servers import CONSENT_CLIENT_ID, CONSENT_CLIENT_SECRET, OidcProvider  # noqa: E402

CONSENT_PATH = "/.latchkey/connections"


def record_path(issuer: str, sub: str) -> str:
    h = hashlib.sha256(b"latchkey.caller\0" + issuer.encode() + b"\0" + sub.encode()).hexdigest()[:32]
    return f"latchkey/connections/mine/{h}"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def plugin(oidc: OidcProvider, bao: OpenBao) -> dict:
    return {
        "secrets": {"client_secret": {"env": "CLIENT_SECRET"}, "state_key": {"env": "STATE_KEY"},
                    "vault_token": {"env": "VAULT_TOKEN"}},
        "providers": {"idp": {"type": "oauth2", "cluster": "idp", "token_url": oidc.token_url,
                              "authorization_url": oidc.authorization_endpoint,
                              "client_id": CONSENT_CLIENT_ID, "client_secret": "client_secret",
                              "timeout_ms": 5000}},
        "token_stores": {"user_tokens": {"vault": {"cluster": "vault", "url": bao.url,
                                                   "token": "vault_token"}}},
        "consent": {"path": CONSENT_PATH, "redirect_uri": "https://gateway.test/.latchkey/callback",
                    "state_key": "state_key"},
        "connections": {"mine": {"provider": "idp", "grant": "authorization_code", "per_user": True,
                                 "scopes": ["orders.read"], "store": "user_tokens",
                                 "access": {"authenticated": True}}},
        "routes": [{"name": "orders", "match": {"route_name": "orders"},
                    "inject": [{"connections": ["mine"], "header": "authorization"}]}],
        "max_paused_requests": 4096,
    }


def run_pass(port: int, tokens: list[str], repeat: int, conns: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    jobs = [t for t in tokens for _ in range(repeat)]

    def worker(w: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        got: dict[int, int] = {}
        try:
            for i in range(w, len(jobs), conns):
                c.request("GET", f"/orders/{i}", headers={"authorization": f"Bearer {jobs[i]}"})
                r = c.getresponse()
                r.read()
                got[r.status] = got.get(r.status, 0) + 1
        finally:
            c.close()
        with lock:
            for k, v in got.items():
                statuses[k] = statuses.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1800)
    return statuses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--hot", type=int, default=500)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "consent_sizes.json"))
    args = ap.parse_args()

    signer = Signer()
    started: list = []
    result: dict = {"users": args.users}
    try:
        # oidc-provider's memory store keeps 1,000 records by default: room for every grant.
        oidc = OidcProvider(ttl=3600, consent_redirect_uris=["https://gateway.test/.latchkey/callback"],
                            env={"OAUTH_STORE_MAX": str(20 * args.users + 10_000)}).start()
        started.append(oidc)
        bao = OpenBao(audit=False, log_level="warn").start()
        started.append(bao)
        upstream = Upstream().start()
        started.append(upstream)
        subs = [f"user{i}" for i in range(args.users)]
        t0 = time.monotonic()

        def seed(sub: str) -> None:
            rt = oidc.mint_refresh_token(client_id=CONSENT_CLIENT_ID, account_id=sub, scope="orders.read")
            bao.kv_put(record_path(signer.issuer, sub), {"refresh_token": rt, "scopes": "orders.read"})

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(seed, subs))
        result["seed_s"] = round(time.monotonic() - t0, 1)
        tokens = [signer.token({"sub": s}, exp_in=6 * 3600) for s in subs]

        config = envoy_config(
            listener_port=free_port(), admin_port=free_port(), upstream_port=upstream.port,
            wasm_path=str(Path(args.wasm).resolve()), plugin_config=plugin(oidc, bao), jwks=signer.jwks(),
            routes=[{"name": "orders", "prefix": "/orders"}],
            wasm_env={"CLIENT_SECRET": CONSENT_CLIENT_SECRET, "STATE_KEY": "s" * 40,
                      "VAULT_TOKEN": bao.token_store_token(ttl="6h")},
            extra_clusters=[static_cluster("idp", oidc.port), static_cluster("vault", bao.port)])
        workdir = Path("/tmp") / f"consent-sizes-{int(time.time())}"
        workdir.mkdir(parents=True, exist_ok=True)
        envoy = Envoy(config, workdir, concurrency=2, log_level="warn").start()
        started.append(envoy)
        result["rss_kib_idle"] = rss_kib(envoy.pid)

        def counts() -> dict[str, int]:
            s = envoy.stats(filter=r"wasmcustom\.latchkey\.")
            return {
                "store_reads": int(s.get("wasmcustom.latchkey.consent.store_reads", 0)),
                "store_writes": int(s.get("wasmcustom.latchkey.consent.store_writes", 0)),
                "store_conflicts": int(s.get("wasmcustom.latchkey.consent.store_conflicts", 0)),
                "token_requests": oidc.token_request_count("refresh_token"),
            }

        passes = [("cold", tokens, 1), ("again", tokens, 1), ("hot", tokens[: args.hot], 10)]
        result["passes"] = []
        for name, toks, repeat in passes:
            before = counts()
            t0 = time.monotonic()
            statuses = run_pass(envoy.port, toks, repeat, args.connections)
            elapsed = time.monotonic() - t0
            after = counts()
            n = len(toks) * repeat
            delta = {k: after[k] - before[k] for k in after}
            entry = {"pass": name, "requests": n, "statuses": statuses, "seconds": round(elapsed, 1),
                     **{f"{k}_per_request": round(v / n, 3) for k, v in delta.items()},
                     "rss_kib": rss_kib(envoy.pid)}
            result["passes"].append(entry)
            print(json.dumps(entry), flush=True)
        result["rss_kib_growth"] = result["passes"][-1]["rss_kib"] - result["rss_kib_idle"]
    finally:
        for p in reversed(started):
            try:
                p.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {type(p).__name__}: {e}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
