// Test-only OAuth 2.0 authorization server for latchkey's integration tests.
//
// A REAL server: npm `oidc-provider` (OpenID Certified) with its own token endpoint, client
// authentication, JWT access tokens, refresh-token rotation, JWKS and introspection. Only a
// few test conveniences are added around it (under /__test/), plus an RFC 8693 token-exchange
// grant registered through oidc-provider's own `registerGrantType` extension point.
//
// Usage:  node server.mjs [port] [ttl_seconds]
//   port  argv[2] or $OAUTH_PORT (default 0 = any free port; the bound port is printed)
//   ttl   argv[3] or $OAUTH_TOKEN_TTL: access-token lifetime in seconds (default 300)
// Prints exactly one line `READY <port>` on stdout once listening on 127.0.0.1.
// Issuer: http://127.0.0.1:<port>.  Stops on SIGTERM / SIGINT.
//
// Other environment variables:
//   OAUTH_EXCHANGE_TTL       lifetime of token-exchange access tokens (default: the ttl)
//   OAUTH_REFRESH_TTL        refresh-token lifetime in seconds (default 86400)
//   OAUTH_SUBJECT_JWKS       JSON JWKS: token exchange then verifies subject_token signatures
//   OAUTH_SUBJECT_JWKS_FILE  the same, read from a file
//   OAUTH_HISTORY            how many token requests /__test/token-requests keeps (default 50)
//   OAUTH_KEEPALIVE_MS       idle keep-alive timeout of client connections (default 120000)
//   OAUTH_DEBUG=1            let oidc-provider and this script log (quiet otherwise)
//
// Browser sign-in (authorization code + PKCE), off unless OAUTH_BROWSER_REDIRECT_URIS is set:
//   OAUTH_BROWSER_REDIRECT_URIS  redirect URIs (space- or comma-separated, e.g. Envoy's oauth2
//                            callback http://127.0.0.1:<port>/oauth2/callback): registers the
//                            confidential client gw-browser (response_type code, grants
//                            authorization_code + refresh_token, client_secret_basic, PKCE S256
//                            required: an authorization request without code_challenge is
//                            refused) and turns on oidc-provider's devInteractions: GET
//                            /interaction/<uid> serves a login form (any login, any password:
//                            POST prompt=login&login=<account>&password=...) and then a consent
//                            form (POST prompt=consent). Scope `groups` releases the account's
//                            `groups` claim, also in the ID token.
//   OAUTH_BROWSER_CLIENT_ID / OAUTH_BROWSER_CLIENT_SECRET   (default gw-browser / gw-browser-secret)
// User-delegated connections (latchkey's own authorization-code consent), off unless
// OAUTH_CONSENT_REDIRECT_URIS is set (independent of OAUTH_BROWSER_REDIRECT_URIS; either one
// turns on the devInteractions login and consent forms described above):
//   OAUTH_CONSENT_REDIRECT_URIS  redirect URIs (space- or comma-separated, e.g. latchkey's
//                            http://127.0.0.1:<envoy port>/.latchkey/callback): registers the
//                            confidential clients gw-consent (client_secret_basic) and
//                            gw-consent-post (client_secret_post), both: response_type code,
//                            grants authorization_code + refresh_token, PKCE S256 required,
//                            scopes `openid offline_access orders.read orders.write`.
//                            A refresh token is issued on every authorization_code grant of
//                            these clients (issueRefreshToken hook), so `scope=orders.read`
//                            alone is enough (no offline_access, no prompt=consent), and it
//                            does not end with the IdP browser session (expiresWithSession
//                            hook). Access tokens: JWTs for https://api.test, sub = the
//                            account that signed in. Rotation as for every client: a refresh
//                            returns a new refresh token; presenting the old one again is
//                            invalid_grant AND revokes the whole grant (reuse detection), so
//                            the newest one stops working too. The authorization response
//                            (success or error) always carries `iss` (RFC 9207).
//   OAUTH_CONSENT_CLIENT_SECRET / OAUTH_CONSENT_POST_CLIENT_SECRET
//                            (default gw-consent-secret / gw-consent-post-secret)
//   OAUTH_ACCOUNTS           JSON {"<account>": {<claims>}}, e.g. {"alice": {"groups": ["billing"]}}:
//                            extra claims of those accounts, released where a scope maps them
//                            (scope `groups`: `groups`). Default: none; every account id is
//                            valid and has only `sub`.
//
// Client authentication without a secret (latchkey's private_key_jwt and tls_client_auth):
//   OAUTH_PRIVATE_KEY_JWT_CLIENTS  JSON {"<client_id>": {"jwks": {"keys": [<public JWK>...]},
//                            "alg": "RS256"|"PS256"|"ES256"}}: registers each as a client with
//                            token_endpoint_auth_method private_key_jwt,
//                            token_endpoint_auth_signing_alg = alg (then only that alg is
//                            accepted; omitted: any asymmetric alg oidc-provider enables),
//                            jwks as given (a JWK's kid must equal the assertion's kid),
//                            grants client_credentials + refresh_token + token exchange,
//                            scopes as gw-basic. A static client's id (gw-basic, gw-post,
//                            gw-consent, gw-consent-post) replaces that client (the demo's
//                            gw-basic signs with OpenBao Transit). "consent": true (needs
//                            OAUTH_CONSENT_REDIRECT_URIS) makes it a consent client instead,
//                            as gw-consent is but for its authentication: response_type
//                            code, grants authorization_code + refresh_token, those redirect
//                            URIs, PKCE S256 required, a refresh token on every code grant.
//                            oidc-provider itself checks the assertion: signature, alg,
//                            iss = sub = client_id, aud (its issuer, its token endpoint URL,
//                            or the endpoint called, e.g. revocation), exp, jti present and
//                            never seen before (replay detection).
//   OAUTH_TLS_CLIENT_AUTH_CLIENTS  JSON {"<client_id>": {"subject_dn": "CN=...,O=..."}}:
//                            registers each with token_endpoint_auth_method tls_client_auth
//                            (RFC 8705 §2.1.1) and tls_client_auth_subject_dn; needs
//                            OAUTH_MTLS_*. oidc-provider's features.mTLS (tlsClientAuth)
//                            authenticates them: the TLS peer certificate must be verified
//                            against OAUTH_MTLS_CA and its subject must equal the registered DN
//                            (compared as a set of attribute=value pairs, RFC 4514 strings).
//   OAUTH_MTLS_CERT, OAUTH_MTLS_KEY, OAUTH_MTLS_CA  PEM files: also listen on a second port,
//                            HTTPS with this server certificate, asking every client for a
//                            certificate (requestCert) verified against the CA, not required
//                            by TLS (rejectUnauthorized false: oidc-provider refuses a
//                            tls_client_auth client without one, with invalid_client). The
//                            same provider and recording serve both ports. Prints
//                            `MTLS <port>` on stdout before the READY line.
//   Recorded token requests carry `tls`: null on the plain port, else {authorized,
//   subject (RFC 4514-ish, "CN=...,O=..."), fingerprint256, port} of the peer certificate
//   (subject null without one).
//
// Clients (static): gw-basic / gw-basic-secret (client_secret_basic),
//                   gw-post / gw-post-secret (client_secret_post),
//                   gw-browser (only with OAUTH_BROWSER_REDIRECT_URIS, above),
//                   gw-consent, gw-consent-post (only with OAUTH_CONSENT_REDIRECT_URIS, above).
// Resources: https://api.test (JWT access tokens, the default resource) and
//            https://opaque.api.test (opaque access tokens, introspectable); both carry the
//            scopes `orders.read orders.write`.
//
// Test endpoints (same port, never part of a real deployment):
//   GET  /__test/stats            counts of token-endpoint requests per grant type / outcome
//   GET  /__test/token-requests   last N token requests (?n=) with headers and form fields
//                                 (and the id_token the answer carried, if any)
//   GET  /__test/revocation-requests  last N revocation requests (RFC 7009), recorded the
//                                 same way (no grant_type, no id_token)
//   POST /__test/reset            zero the stats and forget the recorded requests
//   POST /__test/refresh-token    mint a pre-consented refresh token through oidc-provider's
//                                 own Grant and RefreshToken models; JSON body optional:
//                                 {client_id, account_id, scope, resource}
//   POST /__test/subject-jwks     replace the JWKS used to verify token-exchange subject tokens
//                                 (JSON body: a JWKS; `{}` turns verification off again)

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

const DEBUG = !!process.env.OAUTH_DEBUG && process.env.OAUTH_DEBUG !== '0';
const log = DEBUG ? (...a) => process.stderr.write(`[oauth-test] ${a.join(' ')}\n`) : () => {};
if (!DEBUG) {
  // oidc-provider prints notices (console.info, i.e. stdout) and warnings (console.warn) for
  // development defaults and for Node 20 ("prefers Node 22"): keep the READY line alone.
  for (const m of ['log', 'info', 'warn', 'debug']) console[m] = () => {};
} else {
  console.info = console.warn; // never on stdout
  console.log = console.warn;
}

// Imported after console is tamed: the module warns about the Node version at import time.
const { default: Provider, errors } = await import('oidc-provider');

// OAUTH_STORE_MAX: how many records (grants, tokens, sessions...) the in-memory store keeps.
// oidc-provider's own memory adapter keeps the last 1000 (an LRU); bench/consent_sizes.py
// holds 10,000 users' grants at once.
let largeStore = null;
if (process.env.OAUTH_STORE_MAX) {
  const { default: LRU } = await import('oidc-provider/lib/helpers/lru.js');
  largeStore = new LRU({ maxSize: intArg(process.env.OAUTH_STORE_MAX, 1000, 'OAUTH_STORE_MAX') });
}
const { default: MemoryAdapter } = await import('oidc-provider/lib/adapters/memory_adapter.js');

function intArg(value, fallback, name) {
  if (value === undefined || value === '') return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`invalid ${name}: ${value}\n`);
    process.exit(2);
  }
  return n;
}

const PORT = intArg(process.argv[2] ?? process.env.OAUTH_PORT, 0, 'port');
const TTL = intArg(process.argv[3] ?? process.env.OAUTH_TOKEN_TTL, 300, 'ttl') || 300;
const EXCHANGE_TTL = intArg(process.env.OAUTH_EXCHANGE_TTL, TTL, 'OAUTH_EXCHANGE_TTL') || TTL;
const REFRESH_TTL = intArg(process.env.OAUTH_REFRESH_TTL, 86400, 'OAUTH_REFRESH_TTL') || 86400;
const HISTORY = intArg(process.env.OAUTH_HISTORY, 50, 'OAUTH_HISTORY') || 50;
const KEEPALIVE_MS = intArg(process.env.OAUTH_KEEPALIVE_MS, 120000, 'OAUTH_KEEPALIVE_MS') || 120000;
const HOST = '127.0.0.1';

const BROWSER_REDIRECT_URIS = (process.env.OAUTH_BROWSER_REDIRECT_URIS || '').split(/[\s,]+/).filter(Boolean);
const BROWSER = BROWSER_REDIRECT_URIS.length > 0;
const BROWSER_CLIENT_ID = process.env.OAUTH_BROWSER_CLIENT_ID || 'gw-browser';
const BROWSER_CLIENT_SECRET = process.env.OAUTH_BROWSER_CLIENT_SECRET || 'gw-browser-secret';
const CONSENT_REDIRECT_URIS = (process.env.OAUTH_CONSENT_REDIRECT_URIS || '').split(/[\s,]+/).filter(Boolean);
const CONSENT = CONSENT_REDIRECT_URIS.length > 0;
const CONSENT_CLIENT_SECRET = process.env.OAUTH_CONSENT_CLIENT_SECRET || 'gw-consent-secret';
const CONSENT_POST_CLIENT_SECRET = process.env.OAUTH_CONSENT_POST_CLIENT_SECRET || 'gw-consent-post-secret';
const CONSENT_CLIENTS = new Set(CONSENT ? ['gw-consent', 'gw-consent-post'] : []);
// Clients that must send PKCE (S256) although they are confidential.
const PKCE_CLIENTS = new Set([...(BROWSER ? [BROWSER_CLIENT_ID] : []), ...CONSENT_CLIENTS]);
function jsonEnv(name) {
  if (!process.env[name]) return {};
  let value;
  try {
    value = JSON.parse(process.env[name]);
  } catch (e) {
    process.stderr.write(`invalid ${name}: ${e.message}\n`);
    process.exit(2);
  }
  if (!value || typeof value !== 'object' || Array.isArray(value)) {
    process.stderr.write(`invalid ${name}: not a JSON object\n`);
    process.exit(2);
  }
  return value;
}
const PRIVATE_KEY_JWT_CLIENTS = jsonEnv('OAUTH_PRIVATE_KEY_JWT_CLIENTS');
const TLS_CLIENT_AUTH_CLIENTS = jsonEnv('OAUTH_TLS_CLIENT_AUTH_CLIENTS');
const MTLS_FILES = ['OAUTH_MTLS_CERT', 'OAUTH_MTLS_KEY', 'OAUTH_MTLS_CA'].map((n) => process.env[n] || '');
const MTLS = MTLS_FILES.every(Boolean);
if (!MTLS && MTLS_FILES.some(Boolean)) {
  process.stderr.write('OAUTH_MTLS_CERT, OAUTH_MTLS_KEY and OAUTH_MTLS_CA go together\n');
  process.exit(2);
}
if (Object.keys(TLS_CLIENT_AUTH_CLIENTS).length && !MTLS) {
  process.stderr.write('OAUTH_TLS_CLIENT_AUTH_CLIENTS needs OAUTH_MTLS_CERT, OAUTH_MTLS_KEY and OAUTH_MTLS_CA\n');
  process.exit(2);
}
let ACCOUNTS = {};
if (process.env.OAUTH_ACCOUNTS) {
  try {
    ACCOUNTS = JSON.parse(process.env.OAUTH_ACCOUNTS);
  } catch (e) {
    process.stderr.write(`invalid OAUTH_ACCOUNTS: ${e.message}\n`);
    process.exit(2);
  }
  if (!ACCOUNTS || typeof ACCOUNTS !== 'object' || Array.isArray(ACCOUNTS)) {
    process.stderr.write('invalid OAUTH_ACCOUNTS: not a JSON object\n');
    process.exit(2);
  }
}

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TT_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const SUBJECT_TOKEN_TYPES = new Set([
  'urn:ietf:params:oauth:token-type:jwt',
  'urn:ietf:params:oauth:token-type:access_token',
  'urn:ietf:params:oauth:token-type:id_token',
]);

const DEFAULT_RESOURCE = 'https://api.test';
const RESOURCE_SCOPE = 'orders.read orders.write';
const RESOURCES = {
  'https://api.test': { format: 'jwt', audience: 'https://api.test' },
  'https://opaque.api.test': { format: 'opaque', audience: 'https://opaque.api.test' },
};

function resourceServerInfo(resource) {
  const rs = RESOURCES[resource];
  if (!rs) throw new errors.InvalidTarget();
  return {
    scope: RESOURCE_SCOPE,
    audience: rs.audience,
    accessTokenFormat: rs.format,
    accessTokenTTL: TTL,
    ...(rs.format === 'jwt' ? { jwt: { sign: { alg: 'RS256' } } } : {}),
  };
}

// ------------------------------------------------------------------ subject-token checking

let subjectJwks = null;
function loadSubjectJwks() {
  let text = process.env.OAUTH_SUBJECT_JWKS;
  if (!text && process.env.OAUTH_SUBJECT_JWKS_FILE) {
    text = fs.readFileSync(process.env.OAUTH_SUBJECT_JWKS_FILE, 'utf8');
  }
  if (text) setSubjectJwks(JSON.parse(text));
}
function setSubjectJwks(jwks) {
  subjectJwks = jwks && Array.isArray(jwks.keys) && jwks.keys.length ? jwks : null;
}

function b64urlJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

const VERIFY_ALGS = {
  RS256: ['sha256', {}], RS384: ['sha384', {}], RS512: ['sha512', {}],
  PS256: ['sha256', { padding: crypto.constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 }],
  ES256: ['sha256', { dsaEncoding: 'ieee-p1363' }],
  ES384: ['sha384', { dsaEncoding: 'ieee-p1363' }],
};

// Returns the subject token's claims or throws InvalidGrant. Without a configured JWKS the
// token is only decoded (no signature check); `sub` is always required, `exp`/`nbf` checked.
function checkSubjectToken(token) {
  const bad = (why) => new errors.InvalidGrant(`subject_token ${why}`);
  const parts = typeof token === 'string' ? token.split('.') : [];
  if (parts.length !== 3) throw bad('is not a JWS compact JWT');
  let header;
  let claims;
  try {
    header = b64urlJson(parts[0]);
    claims = b64urlJson(parts[1]);
  } catch {
    throw bad('is not decodable');
  }
  if (subjectJwks) {
    const spec = VERIFY_ALGS[header.alg];
    if (!spec) throw bad(`uses an unsupported alg ${header.alg}`);
    const candidates = subjectJwks.keys.filter((k) => !header.kid || k.kid === header.kid);
    const data = Buffer.from(`${parts[0]}.${parts[1]}`);
    const sig = Buffer.from(parts[2], 'base64url');
    const ok = candidates.some((jwk) => {
      try {
        const key = crypto.createPublicKey({ key: jwk, format: 'jwk' });
        return crypto.verify(spec[0], data, { key, ...spec[1] }, sig);
      } catch {
        return false;
      }
    });
    if (!ok) throw bad('signature is invalid');
  }
  const now = Math.floor(Date.now() / 1000);
  if (typeof claims.exp === 'number' && claims.exp <= now) throw bad('is expired');
  if (typeof claims.nbf === 'number' && claims.nbf > now + 5) throw bad('is not yet valid');
  if (typeof claims.sub !== 'string' || !claims.sub) throw bad('has no sub claim');
  return claims;
}

// ------------------------------------------------------------------ provider

// Asynchronous on purpose: Node 20's generateKeyPairSync can deadlock. A garbage
// collection during the synchronous job runs ~KeyGenJob on the main thread, which
// waits for a mutex the same thread holds (seen with gdb: node asleep in
// __lll_lock_wait under KeyGenJob<RsaKeyGenTraits>::~KeyGenJob, no output, forever).
async function signingKey() {
  const { privateKey } = await new Promise((resolve, reject) => {
    crypto.generateKeyPair('rsa', { modulusLength: 2048 }, (err, publicKey, privateKey) => (
      err ? reject(err) : resolve({ publicKey, privateKey })));
  });
  return {
    ...privateKey.export({ format: 'jwk' }), kid: `oauth-test-${crypto.randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig',
  };
}

const clientDefaults = {
  grant_types: ['client_credentials', 'refresh_token', TOKEN_EXCHANGE],
  response_types: [],
  redirect_uris: [],
  scope: 'openid offline_access orders.read orders.write',
};

// latchkey's authorization-code connections (SPEC "User-delegated connections").
const consentClient = {
  response_types: ['code'],
  grant_types: ['authorization_code', 'refresh_token'],
  redirect_uris: CONSENT_REDIRECT_URIS,
  scope: 'openid offline_access orders.read orders.write',
};

const configuration = {
  clients: [
    {
      ...clientDefaults, client_id: 'gw-basic', client_secret: 'gw-basic-secret', token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      ...clientDefaults, client_id: 'gw-post', client_secret: 'gw-post-secret', token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  jwks: { keys: [(await signingKey())] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  scopes: ['openid', 'offline_access', 'orders.read', 'orders.write'],
  findAccount: async (_ctx, id) => ({
    accountId: id,
    claims: async () => ({ ...(Object.hasOwn(ACCOUNTS, id) ? ACCOUNTS[id] : {}), sub: id }),
  }),
  features: {
    devInteractions: { enabled: BROWSER || CONSENT },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async () => true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => (oneOf ? oneOf : DEFAULT_RESOURCE),
      getResourceServerInfo: async (_ctx, resource) => resourceServerInfo(resource),
      useGrantedResource: async () => true,
    },
  },
  formats: {
    customizers: {
      // RFC 8693 §4.1: an exchanged token names the client acting on the subject's behalf.
      jwt: async (_ctx, token, jwt) => {
        if (token.gty === TOKEN_EXCHANGE) jwt.payload.act = { sub: token.clientId };
      },
    },
  },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: (_ctx, token) => token.expiresIn ?? token.resourceServer?.accessTokenTTL ?? TTL,
    ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? TTL,
    RefreshToken: REFRESH_TTL,
    Grant: REFRESH_TTL,
    IdToken: 3600,
    AuthorizationCode: 60,
    Interaction: 3600,
    Session: 86400,
    DeviceCode: 600,
    BackchannelAuthenticationRequest: 600,
  },
};

for (const [clientId, spec] of Object.entries(PRIVATE_KEY_JWT_CLIENTS)) {
  configuration.clients = configuration.clients.filter((c) => c.client_id !== clientId);
  if (spec.consent && !CONSENT) {
    process.stderr.write(`private_key_jwt client ${clientId}: "consent" needs OAUTH_CONSENT_REDIRECT_URIS\n`);
    process.exit(2);
  }
  if (spec.consent) {
    CONSENT_CLIENTS.add(clientId);
    PKCE_CLIENTS.add(clientId);
  }
  configuration.clients.push({
    ...(spec.consent ? consentClient : clientDefaults),
    client_id: clientId,
    token_endpoint_auth_method: 'private_key_jwt',
    ...(spec.alg ? { token_endpoint_auth_signing_alg: spec.alg } : {}),
    jwks: spec.jwks,
  });
}
for (const [clientId, spec] of Object.entries(TLS_CLIENT_AUTH_CLIENTS)) {
  configuration.clients.push({
    ...clientDefaults,
    client_id: clientId,
    token_endpoint_auth_method: 'tls_client_auth',
    tls_client_auth_subject_dn: spec.subject_dn,
  });
}

// ------------------------------------------------------------------ mutual TLS (RFC 8705)

// "CN=a,O=b" (RFC 4514; `\,` escapes a comma) or Node's "CN=a\nO=b": a sorted list of
// "TYPE=value" pairs, so the order of the RDNs doesn't matter.
function dnPairs(dn) {
  const parts = [];
  let cur = '';
  for (let i = 0; i < dn.length; i += 1) {
    const c = dn[i];
    if (c === '\\' && i + 1 < dn.length) {
      cur += dn[i + 1];
      i += 1;
    } else if (c === ',' || c === '\n' || c === '+') {
      parts.push(cur);
      cur = '';
    } else {
      cur += c;
    }
  }
  parts.push(cur);
  return parts.map((p) => {
    const eq = p.indexOf('=');
    return eq < 0 ? p.trim() : `${p.slice(0, eq).trim().toUpperCase()}=${p.slice(eq + 1).trim()}`;
  }).filter(Boolean).sort();
}

function peerCertificate(ctx) {
  const sock = ctx.socket;
  if (!sock || !sock.encrypted || typeof sock.getPeerX509Certificate !== 'function') return undefined;
  return sock.getPeerX509Certificate() || undefined;
}

if (MTLS) {
  configuration.clientAuthMethods = [
    'client_secret_basic', 'client_secret_jwt', 'client_secret_post', 'private_key_jwt', 'none',
    'tls_client_auth',
  ];
  configuration.features.mTLS = {
    enabled: true,
    tlsClientAuth: true,
    // The PEM of the certificate the client presented on this connection.
    getCertificate: (ctx) => peerCertificate(ctx)?.toString(),
    // Verified by Node's TLS against OAUTH_MTLS_CA (requestCert, rejectUnauthorized false).
    certificateAuthorized: (ctx) => ctx.socket?.authorized === true,
    certificateSubjectMatches: (ctx, property, expected) => {
      const cert = peerCertificate(ctx);
      if (!cert) return false;
      if (property === 'tls_client_auth_subject_dn') {
        return JSON.stringify(dnPairs(cert.subject)) === JSON.stringify(dnPairs(expected));
      }
      if (property === 'tls_client_auth_san_dns') {
        return (cert.subjectAltName || '').split(', ').includes(`DNS:${expected}`);
      }
      return false;
    },
  };
}

if (BROWSER) {
  // The browser sign-in client (Envoy's oauth2 filter): confidential, so oidc-provider would
  // not require PKCE by default; it is required here, so a flow that works proves the
  // client sent code_challenge (S256, the only method oidc-provider accepts) and code_verifier.
  configuration.clients.push({
    client_id: BROWSER_CLIENT_ID,
    client_secret: BROWSER_CLIENT_SECRET,
    token_endpoint_auth_method: 'client_secret_basic',
    response_types: ['code'],
    grant_types: ['authorization_code', 'refresh_token'],
    redirect_uris: BROWSER_REDIRECT_URIS,
    scope: 'openid offline_access groups',
  });
  configuration.scopes.push('groups');
  configuration.claims = {
    acr: null, sid: null, auth_time: null, iss: null, openid: ['sub'], groups: ['groups'],
  };
  // The scope's claims go into the ID token too (not only /me): the gateway reads them there.
  configuration.conformIdTokenClaims = false;
}

if (CONSENT) {
  configuration.clients.push(...[
    {
      ...consentClient, client_id: 'gw-consent', client_secret: CONSENT_CLIENT_SECRET, token_endpoint_auth_method: 'client_secret_basic',
    },
    {
      ...consentClient, client_id: 'gw-consent-post', client_secret: CONSENT_POST_CLIENT_SECRET, token_endpoint_auth_method: 'client_secret_post',
    },
  ].filter((c) => !Object.hasOwn(PRIVATE_KEY_JWT_CLIENTS, c.client_id))); // replaced by one
  // oidc-provider's defaults: a refresh token only with scope offline_access (which it drops
  // from an authorization request without prompt=consent), bound to the IdP session without
  // it. For these clients: always a refresh token, never bound to the browser session.
  configuration.issueRefreshToken = async (_ctx, client, code) => client.grantTypeAllowed('refresh_token')
    && (CONSENT_CLIENTS.has(client.clientId) || code.scopes.has('offline_access'));
  configuration.expiresWithSession = async (ctx, code) => !CONSENT_CLIENTS.has(ctx.oidc.client.clientId)
    && !code.scopes.has('offline_access');
}

if (PKCE_CLIENTS.size) {
  // Confidential clients, so oidc-provider would not require PKCE by default; required here,
  // so a flow that works proves the client sent code_challenge (S256, the only method
  // oidc-provider accepts) and code_verifier.
  configuration.pkce = {
    required: (_ctx, client) => client.clientAuthMethod === 'none' || PKCE_CLIENTS.has(client.clientId),
  };
}

// Bind first (port 0 allowed), then build the provider with the real issuer.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(PORT, HOST, resolve);
});
const { port } = server.address();
const ISSUER = `http://${HOST}:${port}`;

loadSubjectJwks();
if (largeStore) {
  configuration.adapter = (model) => new MemoryAdapter(model, largeStore, configuration.clockTolerance ?? 0);
}
const provider = new Provider(ISSUER, configuration);
provider.proxy = false;

// ------------------------------------------------------------------ token exchange (RFC 8693)

provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { params, client } = ctx.oidc;
  if (!params.subject_token) throw new errors.InvalidRequest("missing required parameter 'subject_token'");
  if (!params.subject_token_type) throw new errors.InvalidRequest("missing required parameter 'subject_token_type'");
  if (!SUBJECT_TOKEN_TYPES.has(params.subject_token_type)) {
    throw new errors.InvalidRequest('unsupported subject_token_type');
  }
  if (params.requested_token_type && params.requested_token_type !== TT_ACCESS_TOKEN) {
    throw new errors.InvalidRequest('unsupported requested_token_type');
  }
  const subject = checkSubjectToken(params.subject_token);

  const resource = params.resource || DEFAULT_RESOURCE;
  const rs = new provider.ResourceServer(resource, resourceServerInfo(resource));
  const requested = params.scope ? params.scope.split(' ') : [];
  const allowed = new Set(client.scope.split(' '));
  for (const s of requested) {
    if (!allowed.has(s)) throw new errors.InvalidScope('requested scope is not allowed', s);
  }
  const scope = requested.filter((s) => rs.scopes.has(s)).join(' ') || undefined;

  const at = new provider.AccessToken({
    accountId: subject.sub, client, gty: TOKEN_EXCHANGE, scope, expiresIn: EXCHANGE_TTL,
  });
  at.resourceServer = rs;
  if (params.audience) at.setAudience(params.audience);
  ctx.oidc.entity('AccessToken', at);
  const value = await at.save();

  ctx.body = {
    access_token: value,
    issued_token_type: TT_ACCESS_TOKEN,
    token_type: at.tokenType,
    expires_in: at.expiration,
    ...(scope ? { scope } : {}),
  };
}, ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type', 'requested_token_type', 'scope', 'audience', 'resource']);

// ------------------------------------------------------------------ test endpoints + recording

const stats = {
  token_requests: 0, by_grant_type: {}, ok_by_grant_type: {}, errors: {}, by_status: {},
  introspection_requests: 0, revocation_requests: 0,
};
let history = [];
let revocations = [];
function resetStats() {
  stats.token_requests = 0;
  stats.by_grant_type = {};
  stats.ok_by_grant_type = {};
  stats.errors = {};
  stats.by_status = {};
  stats.introspection_requests = 0;
  stats.revocation_requests = 0;
  history = [];
  revocations = [];
}
const bump = (obj, key) => { obj[key] = (obj[key] || 0) + 1; };

function rawHeaderPairs(req) {
  const out = [];
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) out.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
  return out;
}

async function readJson(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 1 << 20) throw new Error('body too large');
    chunks.push(c);
  }
  const text = Buffer.concat(chunks).toString('utf8').trim();
  if (!text) return {};
  if ((req.headers['content-type'] || '').includes('application/x-www-form-urlencoded')) {
    return Object.fromEntries(new URLSearchParams(text));
  }
  return JSON.parse(text);
}

async function mintRefreshToken(opts) {
  const clientId = opts.client_id || 'gw-basic';
  const accountId = opts.account_id || 'svc-orders';
  const scope = opts.scope || 'openid offline_access orders.read';
  const resource = opts.resource || DEFAULT_RESOURCE;
  const client = await provider.Client.find(clientId);
  if (!client) throw new Error(`unknown client ${clientId}`);
  const info = resourceServerInfo(resource);
  const scopes = scope.split(' ');
  const rsScopes = new Set(info.scope.split(' '));

  const grant = new provider.Grant({ accountId, clientId });
  const oidcScopes = scopes.filter((s) => !rsScopes.has(s));
  if (oidcScopes.length) grant.addOIDCScope(oidcScopes.join(' '));
  const resScopes = scopes.filter((s) => rsScopes.has(s));
  if (resScopes.length) grant.addResourceScope(resource, resScopes.join(' '));
  const grantId = await grant.save();

  const rt = new provider.RefreshToken({
    accountId, client, grantId, scope, resource, gty: 'authorization_code', expiresWithSession: false,
  });
  const value = await rt.save();
  return {
    refresh_token: value, grant_id: grantId, client_id: clientId, account_id: accountId, scope, resource,
  };
}

const json = (ctx, status, body) => {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.body = JSON.stringify(body);
};

provider.use(async (ctx, next) => {
  if (ctx.path.startsWith('/__test/')) {
    try {
      if (ctx.method === 'GET' && ctx.path === '/__test/stats') return json(ctx, 200, stats);
      if (ctx.method === 'GET' && ctx.path === '/__test/token-requests') {
        const n = Math.max(0, parseInt(ctx.query.n ?? `${HISTORY}`, 10) || 0);
        return json(ctx, 200, n ? history.slice(-n) : []);
      }
      if (ctx.method === 'GET' && ctx.path === '/__test/revocation-requests') {
        const n = Math.max(0, parseInt(ctx.query.n ?? `${HISTORY}`, 10) || 0);
        return json(ctx, 200, n ? revocations.slice(-n) : []);
      }
      if (ctx.method === 'POST' && ctx.path === '/__test/reset') {
        resetStats();
        return json(ctx, 200, { ok: true });
      }
      if (ctx.method === 'POST' && ctx.path === '/__test/refresh-token') {
        return json(ctx, 200, await mintRefreshToken(await readJson(ctx.req)));
      }
      if (ctx.method === 'POST' && ctx.path === '/__test/subject-jwks') {
        setSubjectJwks(await readJson(ctx.req));
        return json(ctx, 200, { verifying: !!subjectJwks });
      }
      return json(ctx, 404, { error: 'not_found' });
    } catch (e) {
      log('test endpoint error', e.stack);
      return json(ctx, 400, { error: 'test_endpoint_error', error_description: String(e.message) });
    }
  }

  const isToken = ctx.method === 'POST' && ctx.path === '/token';
  if (ctx.method === 'POST' && ctx.path === '/token/introspection') stats.introspection_requests += 1;
  if (ctx.method === 'POST' && ctx.path === '/token/revocation') stats.revocation_requests += 1;
  if (!isToken) return next();

  const headers = rawHeaderPairs(ctx.req);
  const at = new Date().toISOString();
  try {
    await next();
  } finally {
    let form = {};
    try {
      form = { ...(ctx.oidc?.body || {}) };
    } catch { /* body never parsed */ }
    const grantType = typeof form.grant_type === 'string' ? form.grant_type : '(none)';
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    stats.token_requests += 1;
    bump(stats.by_grant_type, grantType);
    bump(stats.by_status, String(ctx.status));
    if (ctx.status >= 200 && ctx.status < 300) bump(stats.ok_by_grant_type, grantType);
    if (body.error) bump(stats.errors, body.error);
    let tls = null;
    if (ctx.socket?.encrypted) {
      const cert = peerCertificate(ctx);
      tls = {
        authorized: ctx.socket.authorized === true,
        subject: cert ? cert.subject.split('\n').reverse().join(',') : null,
        fingerprint256: cert ? cert.fingerprint256 : null,
        port: ctx.socket.localPort,
      };
    }
    history.push({
      time: at, method: ctx.method, path: ctx.path, headers, form, grant_type: grantType, tls,
      client_id: (() => { try { return ctx.oidc?.client?.clientId ?? null; } catch { return null; } })(),
      status: ctx.status, error: body.error ?? null,
      // The ID token the answer carried (null if none): lets a test decode and verify it.
      id_token: typeof body.id_token === 'string' ? body.id_token : null,
    });
    if (history.length > HISTORY) history = history.slice(-HISTORY);
    log(ctx.method, ctx.path, grantType, ctx.status, body.error ?? '');
  }
});

// Revocation requests (RFC 7009), recorded as token requests are, in their own list.
provider.use(async (ctx, next) => {
  if (ctx.method !== 'POST' || ctx.path !== '/token/revocation') return next();
  const headers = rawHeaderPairs(ctx.req);
  const at = new Date().toISOString();
  try {
    await next();
  } finally {
    let form = {};
    try {
      form = { ...(ctx.oidc?.body || {}) };
    } catch { /* body never parsed */ }
    const body = ctx.body && typeof ctx.body === 'object' ? ctx.body : {};
    revocations.push({
      time: at, method: ctx.method, path: ctx.path, headers, form, status: ctx.status,
      client_id: (() => { try { return ctx.oidc?.client?.clientId ?? null; } catch { return null; } })(),
      error: body.error ?? null,
    });
    if (revocations.length > HISTORY) revocations = revocations.slice(-HISTORY);
  }
});

if (DEBUG) {
  for (const ev of ['grant.error', 'server_error', 'introspection.error', 'revocation.error']) {
    provider.on(ev, (_ctx, err) => log(ev, err?.message, err?.error_description ?? '', err?.error_detail ?? ''));
  }
} else {
  provider.on('server_error', (_ctx, err) => process.stderr.write(`server_error: ${err?.stack}\n`));
}

server.on('request', provider.callback());
// Outlive any client's idle keep-alive: Node's 5 s default races with Envoy reusing a pooled
// connection just as Node closes it (a spurious "connection termination" 503).
server.keepAliveTimeout = KEEPALIVE_MS;
server.headersTimeout = KEEPALIVE_MS + 5000;

let tlsServer = null;
if (MTLS) {
  const [certFile, keyFile, caFile] = MTLS_FILES;
  tlsServer = https.createServer({
    cert: fs.readFileSync(certFile),
    key: fs.readFileSync(keyFile),
    ca: fs.readFileSync(caFile),
    requestCert: true,
    rejectUnauthorized: false,
    minVersion: 'TLSv1.2',
  });
  tlsServer.on('request', provider.callback());
  tlsServer.keepAliveTimeout = KEEPALIVE_MS;
  tlsServer.headersTimeout = KEEPALIVE_MS + 5000;
  await new Promise((resolve, reject) => {
    tlsServer.once('error', reject);
    tlsServer.listen(0, HOST, resolve);
  });
}

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  if (tlsServer) {
    tlsServer.close();
    tlsServer.closeAllConnections?.();
  }
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
// Never outlive the process that started us (e.g. a test runner killed with SIGKILL).
const parentPid = process.ppid;
setInterval(() => { if (process.ppid !== parentPid) shutdown(); }, 1000).unref();

if (tlsServer) process.stdout.write(`MTLS ${tlsServer.address().port}\n`);
process.stdout.write(`READY ${port}\n`);
