// The docker-compose demo's token server registration for client gw-basic (compose.yaml):
// prints OAUTH_PRIVATE_KEY_JWT_CLIENTS (tests/oauth/server.mjs) with the public JWK of the
// OpenBao Transit key that signs gw-basic's client assertions, read from OpenBao
// (GET /v1/transit/keys/<key>: the public key, as PEM). `make run` does the same in Python
// (scripts/demo.py, tests/integration/secret_stores.py OpenBao.transit_jwk).
//
//   node transit_client.mjs [<OpenBao address> <token> <key> <client_id> <alg>]
//
// Defaults: the demo's, http://127.0.0.1:18200 demo-vault-root-token gw-basic gw-basic ES256.
// The JWK's kid is the key's name: what latchkey sends by default for a Transit key.

import crypto from 'node:crypto';

const [addr, token, key, clientId, alg] = [
  'http://127.0.0.1:18200', 'demo-vault-root-token', 'gw-basic', 'gw-basic', 'ES256',
].map((d, i) => process.argv[2 + i] || d);

const resp = await fetch(`${addr}/v1/transit/keys/${encodeURIComponent(key)}`, {
  headers: { 'x-vault-token': token },
});
if (!resp.ok) {
  process.stderr.write(`transit key ${key}: HTTP ${resp.status} ${await resp.text()}\n`);
  process.exit(1);
}
const { data } = await resp.json();
const pem = data.keys[String(data.latest_version)].public_key;
const jwk = { ...crypto.createPublicKey(pem).export({ format: 'jwk' }), kid: key, use: 'sig' };
process.stdout.write(JSON.stringify({ [clientId]: { jwks: { keys: [jwk] }, alg } }));
