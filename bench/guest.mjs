// The guest's own cost per request, without Envoy: proxy-wasm modules run in
// node's V8 (TurboFan, as Envoy runs them) behind a host written here, each
// request the callbacks Envoy makes for one stream (context create, request
// headers, response headers, delete). Variants run in one process, interleaved
// round by round; the report is each variant's median ns per request and its
// spread, and each latchkey variant minus its floor (bench/floor).
//
// What it measures is what latchkey's own code costs in V8, for attribution and
// A/B while changing it: the host here answers from JS arrays, far cheaper than
// Envoy's, so only differences between modules mean anything, never a ratio to
// Envoy's figures (`make bench-quick` measures those).
//
//   node bench/guest.mjs --wasm latchkey.wasm --floor floor.wasm [--compare old.wasm]
//        [--rounds 15] [--requests 20000] [--only header,query,oauth] [--profile]
//        [--cold KIB] [--copies N]
//
// --cold KIB: before each stream, touch KIB of other memory and time the stream
// alone: the caches as Envoy's own work between two requests leaves them (2048
// evicts this machine's L2). Slower, noisier; what a change does to the memory a
// request touches shows here and not in the hot loop.
//
// --copies N: N plugins of the same configuration in one VM, each stream through
// all of them as a filter chain (request headers in order, response headers in
// reverse), as `make bench-quick` runs 8 copies; figures are per copy. With
// --cold, code and stack stay warm across the chain while each copy's
// configuration is its own, as in Envoy.
//
// --profile: one variant's loop only (run under `node --cpu-prof` with an
// unstripped module for names).

import fs from 'node:fs';
import crypto from 'node:crypto';

const args = { rounds: 15, requests: 20000, only: 'header,query,oauth' };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
  const k = a.slice(2);
  if (k === 'profile' || k === 'check') args[k] = true;
  else args[k] = process.argv[++i];
}
if (!args.wasm) throw new Error('--wasm is required');

const API_KEY = 'bench-api-key-0123456789abcdef';
const enc = new TextEncoder();
const dec = new TextDecoder();

// A JWT payload as jwt_authn would put it in dynamic metadata (claims as a Struct).
const CLAIMS = { iss: 'https://issuer.bench', sub: 'bench', aud: 'bench', groups: ['bench'],
  exp: 4102444800, iat: 1700000000 };

// ---------------------------------------------------------------- protobuf (Struct)
function varint(n) {
  const out = [];
  while (n > 127) { out.push((n & 127) | 128); n = Math.floor(n / 128); }
  out.push(n);
  return out;
}
function field(num, wire, bytes) {
  return [...varint((num << 3) | wire), ...(wire === 2 ? varint(bytes.length) : []), ...bytes];
}
function pbValue(v) {
  if (typeof v === 'string') return field(3, 2, [...enc.encode(v)]);
  if (typeof v === 'number') {
    const b = Buffer.alloc(8); b.writeDoubleLE(v);
    return [...varint((2 << 3) | 1), ...b];
  }
  if (typeof v === 'boolean') return [...varint(4 << 3), v ? 1 : 0];
  if (Array.isArray(v)) return field(6, 2, v.flatMap((x) => field(1, 2, pbValue(x))));
  return field(5, 2, pbStruct(v));
}
function pbStruct(obj) {
  return Object.entries(obj).flatMap(([k, v]) =>
    field(1, 2, [...field(1, 2, [...enc.encode(k)]), ...field(2, 2, pbValue(v))]));
}
// envoy.config.core.v3.Metadata: filter_metadata (1) map<string, Struct>.
function metadata(filter, key, claims) {
  const inner = pbStruct({ [key]: claims });
  return Uint8Array.from(field(1, 2, [...field(1, 2, [...enc.encode(filter)]), ...field(2, 2, inner)]));
}

// ---------------------------------------------------------------- the host
class Host {
  constructor(bytes, plugin, env, request) {
    this.plugin = enc.encode(typeof plugin === 'string' ? plugin : JSON.stringify(plugin));
    this.env = Object.entries(env).map(([k, v]) => enc.encode(`${k}=${v}\0`));
    this.request = request; // [[name, value]]
    this.requestPairs = this.serializePairs(request);
    this.responsePairs = this.serializePairs([[':status', '200'], ['content-length', '0']]);
    this.props = new Map(); // "a\0b" -> Uint8Array
    this.shared = new Map(); // key -> {value, cas}
    this.edits = 0;
    this.replies = 0;
    this.calls = [];
    this.log = [];
    const env_ = {};
    const self = this;
    const ok = () => 0;
    const names = WebAssembly.Module.imports(new WebAssembly.Module(bytes));
    for (const imp of names) {
      if (imp.module === 'env') env_[imp.name] = ok;
    }
    Object.assign(env_, {
      proxy_log(level, ptr, len) { if (args.check) self.log.push(self.str(ptr, len)); return 0; },
      proxy_get_log_level(ret) { self.u32(ret, args.check ? 1 : 2); return 0; },
      proxy_get_current_time_nanoseconds(ret) {
        self.view().setBigUint64(ret, BigInt(Date.now()) * 1000000n, true); return 0;
      },
      proxy_define_metric(type, ptr, len, ret) { self.u32(ret, ++self.metrics); return 0; },
      proxy_get_header_map_pairs(map, retPtr, retSize) {
        if (map === 0) self.give(self.requestPairs, retPtr, retSize);
        else self.give(self.responsePairs, retPtr, retSize);
        return 0;
      },
      proxy_get_header_map_value(map, kp, kl, retPtr, retSize) {
        const name = self.str(kp, kl);
        const pairs = map === 0 ? self.request : [[':status', '200']];
        const hit = pairs.find(([k]) => k === name);
        if (!hit) return 1; // NotFound
        self.give(enc.encode(hit[1]), retPtr, retSize); return 0;
      },
      proxy_replace_header_map_value() { self.edits++; return 0; },
      proxy_remove_header_map_value(map, kp, kl) {
        self.edits++; if (args.check) self.log.push(`remove ${self.str(kp, kl)}`); return 0;
      },
      proxy_add_header_map_value() { self.edits++; return 0; },
      proxy_send_local_response() { self.replies++; return 0; },
      proxy_get_buffer_bytes(type, start, max, retPtr, retSize) {
        if (type === 7) { self.give(self.plugin, retPtr, retSize); return 0; }
        if (type === 6) { self.give(new Uint8Array(0), retPtr, retSize); return 0; }
        if (type === 4 && self.body) { self.give(self.body, retPtr, retSize); return 0; }
        return 1;
      },
      proxy_get_property(pp, pl, retPtr, retSize) {
        const v = self.props.get(self.str(pp, pl));
        if (!v) return 1;
        self.give(v, retPtr, retSize); return 0;
      },
      proxy_get_shared_data(kp, kl, retPtr, retSize, casPtr) {
        const e = self.shared.get(self.str(kp, kl));
        if (!e) return 1;
        self.give(e.value, retPtr, retSize); self.u32(casPtr, e.cas); return 0;
      },
      proxy_set_shared_data(kp, kl, vp, vl, cas) {
        const key = self.str(kp, kl);
        const e = self.shared.get(key);
        if (cas !== 0 && e && e.cas !== cas) return 8; // CasMismatch
        self.shared.set(key, { value: self.bytes(vp, vl).slice(), cas: (e ? e.cas : 0) + 1 });
        return 0;
      },
      proxy_http_call(up, ul, hp, hs, bp, bl, tp, ts, timeout, retToken) {
        const token = ++self.tokens;
        self.calls.push(token); self.u32(retToken, token); return 0;
      },
    });
    this.metrics = 0;
    this.tokens = 0;
    this.counts = {};
    if (args.check) {
      for (const [k, f] of Object.entries(env_)) {
        env_[k] = (...a) => { self.counts[k] = (self.counts[k] || 0) + 1; return f(...a); };
      }
    }
    const wasi = {
      random_get(ptr, len) { crypto.randomFillSync(new Uint8Array(self.mem().buffer, ptr, len)); return 0; },
      environ_sizes_get(countPtr, sizePtr) {
        self.u32(countPtr, self.env.length);
        self.u32(sizePtr, self.env.reduce((n, e) => n + e.length, 0));
        return 0;
      },
      environ_get(ptrs, buf) {
        let at = buf;
        self.env.forEach((e, i) => {
          self.u32(ptrs + 4 * i, at);
          new Uint8Array(self.mem().buffer, at, e.length).set(e);
          at += e.length;
        });
        return 0;
      },
      fd_write(fd, iovs, n, ret) { self.u32(ret, 0); return 0; },
      proc_exit(code) { throw new Error(`proc_exit(${code})`); },
    };
    for (const imp of names) {
      if (imp.module === 'wasi_snapshot_preview1' && !wasi[imp.name]) wasi[imp.name] = () => 52;
    }
    this.instance = new WebAssembly.Instance(new WebAssembly.Module(bytes),
      { env: env_, wasi_snapshot_preview1: wasi });
    this.x = this.instance.exports;
  }
  mem() { return this.x.memory; }
  view() { return new DataView(this.x.memory.buffer); }
  u32(ptr, v) { this.view().setUint32(ptr, v, true); }
  bytes(ptr, len) { return new Uint8Array(this.x.memory.buffer, ptr, len); }
  str(ptr, len) { return dec.decode(this.bytes(ptr, len)); }
  give(data, retPtr, retSize) {
    const p = data.length ? this.x.proxy_on_memory_allocate(data.length) : 0;
    if (data.length) this.bytes(p, data.length).set(data);
    this.u32(retPtr, p); this.u32(retSize, data.length);
  }
  serializePairs(pairs) {
    const e = pairs.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
    const size = 4 + e.length * 8 + e.reduce((n, [k, v]) => n + k.length + v.length + 2, 0);
    const out = new Uint8Array(size);
    const dv = new DataView(out.buffer);
    dv.setUint32(0, e.length, true);
    let at = 4 + e.length * 8;
    e.forEach(([k, v], i) => {
      dv.setUint32(4 + i * 8, k.length, true); dv.setUint32(8 + i * 8, v.length, true);
      out.set(k, at); at += k.length + 1; out.set(v, at); at += v.length + 1;
    });
    return out;
  }
  start() {
    const x = this.x;
    if (x._initialize) x._initialize();
    x.proxy_on_context_create(1, 0);
    if (x.proxy_on_vm_start && !x.proxy_on_vm_start(1, 0)) throw new Error('vm_start refused');
    if (!x.proxy_on_configure(1, this.plugin.length)) throw new Error('configure refused');
    // --copies: more plugins of the same configuration in this VM, as Envoy's bench
    // chain has (each its own root context and configuration).
    this.roots = [1];
    for (let r = 2; r <= Number(args.copies || 1); r++) {
      x.proxy_on_context_create(r, 0);
      if (!x.proxy_on_configure(r, this.plugin.length)) throw new Error('configure refused');
      this.roots.push(r);
    }
    this.next = this.roots.length + 1;
    return this;
  }
  // One stream, as Envoy drives it.
  stream() {
    const x = this.x;
    if (this.roots.length > 1) return this.chain();
    const id = this.next++;
    x.proxy_on_context_create(id, 1);
    const a = x.proxy_on_request_headers(id, this.request.length, 1);
    if (x.proxy_on_response_headers) x.proxy_on_response_headers(id, 2, 1);
    if (x.proxy_on_done) x.proxy_on_done(id);
    x.proxy_on_delete(id);
    return a;
  }
  // One stream through every plugin, as a filter chain: request headers in
  // order, response headers in reverse. The first action that isn't 0 is returned.
  chain() {
    const x = this.x;
    const ids = this.roots.map((root) => { const id = this.next++; x.proxy_on_context_create(id, root); return id; });
    let a = 0;
    for (const id of ids) { const r = x.proxy_on_request_headers(id, this.request.length, 1); if (r !== 0 && a === 0) a = r; }
    if (x.proxy_on_response_headers) for (let i = ids.length - 1; i >= 0; i--) x.proxy_on_response_headers(ids[i], 2, 1);
    for (const id of ids) x.proxy_on_delete(id);
    return a;
  }
  // Answer every pending call with `body` (a token server's answer).
  answerCalls(body, status = '200') {
    const x = this.x;
    for (const token of this.calls.splice(0)) {
      this.body = enc.encode(body);
      this.props.set('response_code', (() => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(status)); return b; })());
      const respHeaders = [[':status', status], ['content-type', 'application/json']];
      const saved = this.request;
      x.proxy_on_http_call_response(1, token, respHeaders.length, this.body.length, 0);
      this.request = saved;
      this.body = null;
    }
  }
}

// ---------------------------------------------------------------- variants
const REQUEST = [[':authority', '127.0.0.1:10000'], [':path', '/bench'], [':method', 'GET'],
  [':scheme', 'http'], ['user-agent', 'curl/8.5.0'], ['accept', '*/*'],
  ['x-forwarded-proto', 'http'], ['x-request-id', '5f0f6b1e-7c2a-4f5e-9a51-0c4c1b7d9e21']];
const withPath = (p) => REQUEST.map(([k, v]) => [k, k === ':path' ? p : v]);
const BEARER = ['authorization', 'Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2ln'];

function keyPlugin(conn, target) {
  return { secrets: { k: { env: 'BENCH_KEY' } }, providers: { p: { type: 'api_key' } },
    connections: { [conn]: { provider: 'p', api_key: 'k', access: { public: true } } },
    routes: [{ name: 'bench', match: { path_prefix: '/' }, inject: [{ connections: [conn], ...target }] }] };
}
const OAUTH_ACCESS = { claims: { groups: ['bench'] } };
function oauthPlugin() {
  return { secrets: { s: { env: 'BENCH_CLIENT_SECRET' } },
    providers: { idp: { type: 'oauth2', cluster: 'idp', client_id: 'gw', client_secret: 's',
      token_url: 'http://127.0.0.1:9/token', timeout_ms: 3000 } },
    connections: { oauth: { provider: 'idp', grant: 'client_credentials', scopes: ['orders.read'],
      access: OAUTH_ACCESS } },
    routes: [{ name: 'bench', match: { path_prefix: '/' }, access: OAUTH_ACCESS,
      inject: [{ connections: ['oauth'], header: 'authorization' }] }] };
}
const ENV = { BENCH_KEY: API_KEY, BENCH_CLIENT_SECRET: 'bench-client-secret' };
const META = metadata('envoy.filters.http.jwt_authn', 'payload', CLAIMS);

function make(kind, wasmPath, isFloor) {
  const bytes = fs.readFileSync(wasmPath);
  let plugin; let request = REQUEST;
  if (kind === 'header') plugin = isFloor ? 'header' : keyPlugin('header', { header: 'x-api-key' });
  if (kind === 'query') {
    plugin = isFloor ? 'query' : keyPlugin('query', { query: 'api_key' });
    request = withPath('/bench?q=1&api_key=client');
  }
  if (kind === 'oauth') { plugin = isFloor ? 'oauth' : oauthPlugin(); request = [...REQUEST, BEARER]; }
  const h = new Host(bytes, plugin, ENV, request).start();
  if (kind === 'oauth') {
    h.props.set('metadata', META);
    if (!isFloor) {
      // The first request starts the fetch; the token server answers it.
      h.stream();
      for (let i = 0; i < 3 && h.calls.length === 0; i++) h.x.proxy_on_tick(1);
      h.answerCalls(JSON.stringify({ access_token: 'bench-token', token_type: 'Bearer', expires_in: 3600 }));
    }
  }
  return h;
}

function check(h, name) {
  h.stream(); h.stream();
  h.edits = 0; h.replies = 0; h.counts = {}; h.log = [];
  const a = h.stream();
  if (args.check) console.log(`${name}: host calls per stream ${JSON.stringify(h.counts)}\n  ${h.log.join('\n  ')}`);
  if (a !== 0 || h.replies !== 0 || h.edits < 1) {
    throw new Error(`${name}: action ${a}, ${h.replies} replies, ${h.edits} edits: not forwarded with a credential\n${h.log.join('\n')}`);
  }
}

const kinds = args.only.split(',');
const variants = [];
for (const kind of kinds) {
  if (args.floor) variants.push({ name: `floor_${kind}`, h: make(kind, args.floor, true) });
  variants.push({ name: `latchkey_${kind}`, floor: `floor_${kind}`, h: make(kind, args.wasm, false) });
  if (args.compare) variants.push({ name: `latchkey_${kind}_b`, floor: `floor_${kind}`, base: `latchkey_${kind}`, h: make(kind, args.compare, false) });
}
for (const v of variants) check(v.h, v.name);

const N = Number(args.requests);
const COPIES = Number(args.copies || 1);
// --cold: see the top.
const cold = args.cold ? new Uint8Array(Number(args.cold) * 1024) : null;
let sink = 0;
const sweep = () => { for (let j = 0; j < cold.length; j += 64) { cold[j] += 1; sink ^= cold[j]; } };
if (args.profile) {
  const v = variants.find((x) => x.name.startsWith('latchkey'));
  for (let i = 0; i < Number(args.rounds) * N; i++) { if (cold) sweep(); v.h.stream(); }
  process.exit(0);
}
// Warm up: TurboFan compiles the hot functions.
for (const v of variants) for (let i = 0; i < N; i++) v.h.stream();
const per = Object.fromEntries(variants.map((v) => [v.name, []]));
for (let r = 0; r < Number(args.rounds); r++) {
  const order = r % 2 ? [...variants].reverse() : variants;
  for (const v of order) {
    if (cold) {
      // Each stream timed alone, after a sweep that evicts the caches it used.
      let t = 0n;
      for (let i = 0; i < N; i++) {
        sweep();
        const t0 = process.hrtime.bigint();
        v.h.stream();
        t += process.hrtime.bigint() - t0;
      }
      per[v.name].push(Number(t) / N / COPIES);
      continue;
    }
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) v.h.stream();
    per[v.name].push(Number(process.hrtime.bigint() - t0) / N / COPIES);
  }
}
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const q = (xs, f) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(f * s.length))]; };
const fmt = (x) => x.toFixed(0).padStart(6);
console.log(`${Number(args.rounds)} rounds x ${N} requests${COPIES > 1 ? ` through ${COPIES} copies` : ''}; ns per request (median [IQR]); paired differences per round`);
for (const v of variants) {
  const xs = per[v.name];
  let line = `${v.name.padEnd(22)} ${fmt(median(xs))} [${fmt(q(xs, 0.25))},${fmt(q(xs, 0.75))}]`;
  for (const other of [v.floor, v.base]) {
    if (other && per[other]) {
      const d = xs.map((x, i) => x - per[other][i]);
      line += `   - ${other}: ${fmt(median(d))} [${fmt(q(d, 0.25))},${fmt(q(d, 0.75))}]`;
    }
  }
  console.log(line);
}
