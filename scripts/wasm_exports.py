#!/usr/bin/env python3
"""Keep only the proxy-wasm callbacks latchkey uses in the built module's exports.

Envoy's wasm host (proxy-wasm-cpp-host) skips a callback the module does not
export, and each export it calls is one more entry into the VM per request. The
`proxy-wasm` crate's dispatcher exports every callback of the ABI (network, gRPC,
bodies, trailers, logs, queues, foreign functions) whether a filter uses it or not,
and a Rust cdylib can't un-export a dependency's `#[no_mangle]` function. So the
build rewrites the export section of the linked module, keeping `KEEP` below and
dropping the rest. The functions stay in the code section (unreachable now); only
the export entries go.

Why each kept export is needed:
  memory, _initialize, proxy_abi_version_0_2_1, proxy_on_memory_allocate  the ABI
  proxy_on_vm_start, proxy_on_configure, proxy_on_context_create          set-up
  proxy_on_request_headers        the request path
  proxy_on_response_headers       upstream 401 drops a token
  proxy_on_http_call_response     token and secret-store calls
  proxy_on_tick                   dispatching calls, waking waiters, stats
  proxy_on_delete                 frees the SDK's per-context state; dropping an HTTP
                                  context forgets its waiting request, dropping the
                                  root context (also at VM shutdown) flushes the stats
Not kept: proxy_on_done (per stream: one VM entry fewer; the host treats a missing
one as "done", and still calls proxy_on_delete, for root contexts at shutdown too:
proxy-wasm-cpp-host WasmBase::startShutdown).

Usage: wasm_exports.py MODULE OUT        write MODULE with only those exports to OUT
       wasm_exports.py --list MODULE     print its exports
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

KEEP = frozenset({
    "memory", "_initialize", "proxy_abi_version_0_2_1", "proxy_on_memory_allocate",
    "proxy_on_vm_start", "proxy_on_configure", "proxy_on_context_create",
    "proxy_on_request_headers", "proxy_on_response_headers", "proxy_on_http_call_response",
    "proxy_on_tick", "proxy_on_delete",
})
MAGIC = b"\0asm\x01\0\0\0"
EXPORT_SECTION = 7


def uleb(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated LEB128")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return result, i


def enc_uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sections(data: bytes):
    if not data.startswith(MAGIC):
        raise ValueError("not a wasm module")
    i = len(MAGIC)
    while i < len(data):
        sid = data[i]
        size, j = uleb(data, i + 1)
        yield sid, data[j:j + size], data[i:j + size]
        i = j + size


def exports(body: bytes) -> list[tuple[str, bytes]]:
    """(name, raw entry) for each export."""
    n, i = uleb(body, 0)
    out = []
    for _ in range(n):
        start = i
        length, i = uleb(body, i)
        name = body[i:i + length].decode()
        i += length + 1  # kind byte
        _, i = uleb(body, i)  # index
        out.append((name, body[start:i]))
    if i != len(body):
        raise ValueError("malformed export section")
    return out


def prune(data: bytes) -> tuple[bytes, list[str]]:
    out = bytearray(MAGIC)
    dropped: list[str] = []
    for sid, body, raw in sections(data):
        if sid != EXPORT_SECTION:
            out += raw
            continue
        entries = exports(body)
        kept = [e for e in entries if e[0] in KEEP]
        dropped = [name for name, _ in entries if name not in KEEP]
        missing = KEEP - {name for name, _ in entries}
        if missing:
            raise ValueError(f"the module lacks exports latchkey needs: {sorted(missing)}")
        new_body = enc_uleb(len(kept)) + b"".join(raw_entry for _, raw_entry in kept)
        out += bytes([EXPORT_SECTION]) + enc_uleb(len(new_body)) + new_body
    return bytes(out), dropped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("module", type=Path)
    ap.add_argument("out", type=Path, nargs="?", help="where to write the pruned module")
    ap.add_argument("--list", action="store_true", help="print the exports and exit")
    args = ap.parse_args()
    data = args.module.read_bytes()
    if args.list:
        for sid, body, _ in sections(data):
            if sid == EXPORT_SECTION:
                print("\n".join(name for name, _ in exports(body)))
        return 0
    if args.out is None:
        ap.error("give OUT (or --list)")
    pruned, dropped = prune(data)
    # Write a new file and rename it over: never a half-written module, and never
    # through a hard link into cargo's own output.
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=".prune-")
    with os.fdopen(fd, "wb") as f:
        f.write(pruned)
    os.chmod(tmp, 0o644)
    os.replace(tmp, args.out)
    print(f"{args.out}: kept {len(KEEP)} exports, dropped {len(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
