#!/usr/bin/env python3
"""How long latchkey takes to load a large configuration, and the VM memory it then has.

For N routes (each with its own API-key connection, matched by path prefix or by
route name), starts one Envoy (--concurrency 1; Envoy 1.40 then loads the configuration in
three VMs, one after another: twice on the main thread, then on the worker), reads
latchkey's own log line
"configuration loaded: … in X ms; VM memory K KiB" from each VM, and stops it.
Several rounds, the sizes interleaved; prints the median and range per size and
writes bench/out/load.json. VM memory is the wasm linear memory after the load
(what the configuration takes plus the allocator's free space; a VM that loaded
10 routes is the baseline).

Usage: bench/load_time.py [--wasm M] [--rounds 3] [--routes 10,10000]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
from harness import Envoy, free_port, wait_until, wasm_filter  # noqa: E402

LINE = re.compile(r"configuration loaded: (\d+) routes.* in ([\d.]+) ms; VM memory (\d+) KiB")
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def plugin(n: int, kind: str) -> dict:
    return {
        "secrets": {"k": {"env": "BENCH_KEY"}},
        "providers": {"p": {"type": "api_key"}},
        "connections": {f"c{i}": {"provider": "p", "api_key": "k", "access": {"public": True}} for i in range(n)},
        "routes": [{"name": f"r{i}",
                    "match": {"route_name": f"r{i}"} if kind == "route_name" else {"path_prefix": f"/p{i}/"},
                    "inject": [{"connections": [f"c{i}"], "header": "x-api-key"}]} for i in range(n)],
    }


def config(wasm: Path, n: int, kind: str) -> dict:
    filt = wasm_filter(wasm, plugin(n, kind), {"BENCH_KEY": "bench-key"})
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}}},
        "static_resources": {"listeners": [{
            "name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": free_port()}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": {
                "@type": HCM, "stat_prefix": "l",
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                "http_filters": [filt, {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}]},
    }


def one(wasm: Path, n: int, kind: str, work: Path) -> list[tuple[float, int]]:
    envoy = Envoy(config(wasm, n, kind), work, concurrency=1, log_level="warn",
                  component_log_level="wasm:info", ready_timeout=120).start()
    try:
        wait_until(lambda: len(LINE.findall(envoy.log_text())) >= 2, 60, message="two VMs loaded")
        return [(float(ms), int(kib)) for routes, ms, kib in LINE.findall(envoy.log_text()) if int(routes) == n]
    finally:
        envoy.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wasm", type=Path, default=REPO / "target/wasm32-wasip1/release/latchkey.wasm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--routes", default="10,10000")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "load.json")
    args = ap.parse_args()
    args.wasm = args.wasm.resolve()  # Envoy runs elsewhere: an absolute path
    if not args.wasm.is_file():
        raise SystemExit(f"{args.wasm} missing: make build")
    sizes = [int(x) for x in args.routes.split(",")]
    runs: dict[str, list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="latchkey-load-") as tmp:
        for r in range(args.rounds):
            for kind in ("path_prefix", "route_name"):
                for n in sizes:
                    got = one(args.wasm, n, kind, Path(tmp) / f"{kind}-{n}-{r}")
                    runs.setdefault(f"{kind} {n}", []).extend(got)
    report = {}
    for key, vals in runs.items():
        ms = [v[0] for v in vals]
        kib = [v[1] for v in vals]
        report[key] = {"load_ms": {"median": round(statistics.median(ms), 1), "min": min(ms), "max": max(ms)},
                       "vm_memory_kib": {"median": statistics.median(kib), "min": min(kib), "max": max(kib)},
                       "loads": len(vals)}
        print(f"{key:>20}: load {statistics.median(ms):7.1f} ms (range {min(ms):.1f}-{max(ms):.1f}, "
              f"{len(vals)} VM loads); VM memory {statistics.median(kib) / 1024:.1f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "wasm": str(args.wasm), "results": report}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
