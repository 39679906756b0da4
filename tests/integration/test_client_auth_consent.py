"""private_key_jwt on user-delegated connections, and Transit signing with AppRole
(SPEC v1.2) in a real Envoy 1.40, with the real oidc-provider and a real OpenBao.

- A `grant: "authorization_code"` connection (per-user consent, docs/consent.md) whose
  provider authenticates with `private_key_jwt` signed by OpenBao Transit: the callback's
  code redemption, the refresh of the stored refresh token and the disconnect's RFC 7009
  revocation each carry a freshly signed client assertion (its own jti) and no secret.
  oidc-provider registers the client with the Transit key's public JWK as a consent client
  (server.mjs: a private_key_jwt client with "consent": true) and verifies every assertion
  itself; the tests verify them again with the Transit public key.
- A signature that can't be had at the callback (Transit answers 403: the token's policy
  does not cover the key): 503 `token_server`, nothing sent to the token server, and the
  same callback URL works once the policy is fixed (its state was released). A disconnect
  that can't sign its revocation removes the record and says `revoked: false`.
- `signing_key.vault_transit.approle`: latchkey logs in with AppRole, signs with the login
  token (OpenBao's audit log shows both, the sign call made by that token), logs in again
  once the login's lease ran out, or when Transit refuses the login token (403); a wrong
  secret_id is a 503 counted as `signing.failure.login`, with no token request and no
  secret_id in Envoy's log.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import types
import urllib.parse

import pytest

from harness import static_cluster, wait_until
from secret_stores import OpenBao
from test_client_auth import (SIGNING_KINDS, UNAVAILABLE, as_received, assert_nothing_secret_in_log,
                              assertion_parts, check_assertion, config, requests_of, show, stat,
                              transit_provider, upstream_token)
from test_consent import (CONSENT_PATH, REDIRECT_URI, ROUTES, STATE_KEY, auth, connect,
                          consent_config, record_path, upstream_sub)
from test_consent_failures import begin, consent_stats, refused
from test_secret_stores import approle_token_accessors
from token_servers import OidcProvider

KEY, ALG = "lk-consent-ec", "ES256"           # a Transit ecdsa-p256 key; kid = its name
SIGN_POLICY = f"transit-sign-{KEY}"           # what OpenBao.transit_sign_token(KEY) creates
CONSENT_CLIENT = "gw-consent-pkj"             # authorization_code + refresh_token, PKCE
CC_CLIENT = "gw-approle-es256"                # client_credentials
SIGN_PATH, LOGIN_PATH = f"transit/sign/{KEY}/sha2-256", "auth/approle/login"
ROLE = "lk-transit-signer"


@pytest.fixture(scope="module")
def world():
    """One OpenBao (Transit key + sign-only token; KV v2 for the consent records) and one
    oidc-provider with both private_key_jwt clients registered with the key's public JWK."""
    with contextlib.ExitStack() as stack:
        bao = stack.enter_context(OpenBao())
        bao.enable_transit()
        bao.transit_key(KEY, "ecdsa-p256")
        transit_token = bao.transit_sign_token(KEY)
        jwk = bao.transit_jwk(KEY)
        clients = {CONSENT_CLIENT: {"jwks": {"keys": [jwk]}, "alg": ALG, "consent": True},
                   CC_CLIENT: {"jwks": {"keys": [jwk]}, "alg": ALG}}
        oidc = stack.enter_context(OidcProvider(ttl=300, history=100, consent_redirect_uris=[REDIRECT_URI],
                                                private_key_jwt_clients=clients))
        yield types.SimpleNamespace(bao=bao, oidc=oidc, jwk=jwk, transit_token=transit_token,
                                    store_token=bao.token_store_token())


@pytest.fixture
def w(world):
    world.oidc.reset_stats()
    return world


def clusters(w):
    return [static_cluster("idp", w.oidc.port), w.bao.envoy_cluster("vault")]


def start_consent(envoy_factory, w, transit_token):
    """test_consent's per-user connection "mine", its provider authenticating with
    private_key_jwt (Transit, `transit_token`) instead of a client secret."""
    cfg = consent_config(w.oidc, w.bao)
    del cfg["secrets"]["client_secret"], cfg["providers"]["idp"]["client_secret"]
    cfg["providers"]["idp"].update(transit_provider(w, CONSENT_CLIENT, KEY, ALG))
    cfg["secrets"]["transit_token"] = {"env": "TRANSIT_TOKEN"}
    return envoy_factory(cfg, routes=ROUTES, component_log_level="wasm:debug", extra_clusters=clusters(w),
                         wasm_env={"STATE_KEY": STATE_KEY, "VAULT_TOKEN": w.store_token,
                                   "TRANSIT_TOKEN": transit_token})


def start_approle(envoy_factory, w, role_id, secret_id):
    """A client_credentials connection "orders" whose assertion Transit signs with an
    AppRole login's token (test_client_auth's config, `approle` instead of `token`)."""
    provider = transit_provider(w, CC_CLIENT, KEY, ALG)
    transit = provider["signing_key"]["vault_transit"]
    del transit["token"]
    transit["approle"] = {"role_id": role_id, "secret_id": "transit_secret_id", "mount": "approle"}
    cfg = config(provider, secrets_={"transit_secret_id": {"env": "TRANSIT_SECRET_ID"}})
    return envoy_factory(cfg, routes=ROUTES, wasm_env={"TRANSIT_SECRET_ID": secret_id},
                         component_log_level="wasm:debug", extra_clusters=clusters(w))


def assertions(w, recs, title) -> list[str]:
    """Each request carries client_id and an ES256 jwt-bearer assertion verified with the
    Transit key (iss = sub = client_id, aud = the token URL, kid = the key's name), no
    secret; returns their jti, all distinct."""
    jtis = []
    for i, rec in enumerate(recs):
        shown = as_received(rec)
        if "token" in shown["form"]:                 # a revocation's refresh token
            shown["form"]["token"] = "<redacted>"
        show(f"{title} #{i + 1}", shown)
        _, claims = check_assertion(rec, client_id=rec["client_id"], aud=w.oidc.token_url, alg=ALG,
                                    kid=KEY, jwk=w.jwk)
        jtis.append(claims["jti"])
    assert len(set(jtis)) == len(jtis), jtis
    return jtis


def no_signing_failures(envoy, **expected):
    got = {k: stat(envoy, f"provider.idp.signing.failure.{k}") for k in (*SIGNING_KINDS, "login")}
    assert got == {k: expected.get(k, 0) for k in got}, got


def audited(bao, path, kind="request", since=0):
    return [e for e in bao.audit_entries()
            if e.get("type") == kind and e.get("request", {}).get("path") == path][since:]


# --------------------------------------------------------------------------- consent


def test_consent_with_private_key_jwt_signed_by_transit(envoy_factory, upstream, signer, w):
    """login → approve at the IdP → callback (code redeemed with an assertion, refresh
    token stored in OpenBao) → use (the refresh token redeemed with an assertion, alice's
    own token injected) → disconnect (revoked with an assertion). One sign call each."""
    envoy = start_consent(envoy_factory, w, w.transit_token)
    alice = auth(signer, "alice")
    _, callback, done = connect(envoy, w.oidc, signer, "alice")
    assert done.status == 200 and done.json() == {"connected": "mine"}, done
    stored, version = w.bao.kv_read(record_path(w.bao, "alice"))
    assert version == 1 and stored["refresh_token"] and stored["scopes"] == "orders.read"

    resp = envoy.request("GET", "/orders/1", headers=alice)
    assert resp.status == 200, resp
    assert upstream_sub(upstream) == "alice"
    claims = w.oidc.verify_access_token(upstream_token(upstream))
    assert claims["sub"] == "alice" and claims["client_id"] == CONSENT_CLIENT, claims
    rotated, version = w.bao.kv_read(record_path(w.bao, "alice"))
    assert version == 2 and rotated["refresh_token"] != stored["refresh_token"]

    assert w.oidc.introspect(rotated["refresh_token"])["active"] is True
    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=alice)
    assert gone.status == 200 and gone.json() == {"disconnected": "mine", "revoked": True}, gone
    assert w.bao.kv_read(record_path(w.bao, "alice")) is None
    assert w.oidc.introspect(rotated["refresh_token"])["active"] is False     # revoked at the IdP

    code, refresh = requests_of(w.oidc, CONSENT_CLIENT)
    assert (code["grant_type"], code["status"]) == ("authorization_code", 200), code
    assert code["form"]["code"] == dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(callback).query))["code"]
    assert code["form"]["redirect_uri"] == REDIRECT_URI and code["form"]["code_verifier"]
    assert (refresh["grant_type"], refresh["status"]) == ("refresh_token", 200), refresh
    assert refresh["form"]["refresh_token"] == stored["refresh_token"]
    (revocation,) = w.oidc.last_revocation_requests()
    assert (revocation["status"], revocation["client_id"]) == (200, CONSENT_CLIENT), revocation
    assert revocation["form"]["token"] == rotated["refresh_token"]
    jtis = assertions(w, [code, refresh, revocation], "consent (code, refresh, revocation)")
    assert w.oidc.token_request_count() == 2 and w.oidc.stats()["revocation_requests"] == 1

    assert stat(envoy, "provider.idp.signing.requests") == 3      # one per token server call
    no_signing_failures(envoy)
    stats = consent_stats(envoy)
    assert stats["completed"] == 1 and stats["disconnects"] == 1 and stats["revocations"] == 1, stats
    assert_nothing_secret_in_log(envoy, w.transit_token, stored["refresh_token"], rotated["refresh_token"],
                                 *jtis, *[p for r in (code, refresh, revocation) for p in assertion_parts(r)])


def test_signing_refused_at_the_callback_then_the_same_callback_works(envoy_factory, upstream, signer, w):
    """Transit answers 403 (the signing token's policy covers another key): the callback is
    503 token_server with retry-after, nothing is stored and the token server is never
    asked. The policy fixed in OpenBao, the same callback URL is accepted (its state was
    released, not spent). Then, the policy broken again, a disconnect removes the record
    and answers revoked: false, with no revocation request."""
    policy = "consent-signer-" + secrets.token_hex(4)
    w.bao.policy(policy, OpenBao.transit_sign_policy_hcl("another-key"))
    token = w.bao.token([policy], no_default_policy=True)
    envoy = start_consent(envoy_factory, w, token)
    bob = auth(signer, "bob")
    signs = len(audited(w.bao, SIGN_PATH, "response"))
    _, cb = begin(envoy, signer, "bob")

    refused(envoy.request("GET", cb, headers=bob), 503, "token_server")
    assert w.oidc.token_request_count() == 0, w.oidc.last_token_requests()
    assert w.bao.kv_versions(record_path(w.bao, "bob")) == []
    envoy.wait_for_log(re.escape("could not be signed: forbidden (HTTP 403)"))
    envoy.wait_for_stat("wasmcustom.latchkey.provider.idp.signing.failure.forbidden", 1)
    (denied,) = audited(w.bao, SIGN_PATH, "response", since=signs)
    assert "permission denied" in denied["error"], denied
    assert stat(envoy, "provider.idp.signing.requests") == 1
    no_signing_failures(envoy, forbidden=1)

    w.bao.policy(policy, OpenBao.transit_sign_policy_hcl(KEY))
    again = envoy.request("GET", cb, headers=bob)
    assert again.status == 200 and again.json() == {"connected": "mine"}, again
    assert w.bao.kv_versions(record_path(w.bao, "bob")) == [1]
    (code,) = requests_of(w.oidc, CONSENT_CLIENT)
    assert (code["grant_type"], code["status"]) == ("authorization_code", 200), code
    assertions(w, [code], "callback sent again")
    stats = consent_stats(envoy)
    assert stats["failed.token_server"] == 1 and stats["completed"] == 1, stats
    assert stats.get("failed.state_replayed", 0) == 0, stats

    w.bao.policy(policy, OpenBao.transit_sign_policy_hcl("another-key"))
    gone = envoy.request("DELETE", f"{CONSENT_PATH}/mine", headers=bob)
    assert gone.status == 200 and gone.json() == {"disconnected": "mine", "revoked": False}, gone
    assert w.bao.kv_versions(record_path(w.bao, "bob")) == []
    assert w.oidc.last_revocation_requests() == [] and w.oidc.stats()["revocation_requests"] == 0
    assert stat(envoy, "provider.idp.signing.requests") == 3
    no_signing_failures(envoy, forbidden=2)
    assert_nothing_secret_in_log(envoy, token)


# --------------------------------------------------------------------------- AppRole


def logins_and_signs(bao, role_id, logins, signs):
    """The AppRole logins and sign calls OpenBao answered since (logins, signs): each
    login succeeded for `role_id` with the role's policies; each sign call that succeeded
    was made with a login token of the role, allowed by the sign policy. Returns
    ([login client_token HMACs], [(sign call's client_token HMAC, refused)])."""
    done = audited(bao, LOGIN_PATH, "response", since=logins)
    assert all(not e.get("error") and e["request"]["data"]["role_id"] == bao.audit_hash(role_id)
               and e["auth"]["metadata"] == {"role_name": ROLE} and SIGN_POLICY in e["auth"]["policies"]
               for e in done), done
    signed = audited(bao, SIGN_PATH, "response", since=signs)
    assert all(e.get("error") or (e["auth"]["metadata"] == {"role_name": ROLE} and [
        p["name"] for p in e["auth"]["policy_results"]["granting_policies"]] == [SIGN_POLICY])
        for e in signed), signed
    return ([e["auth"]["client_token"] for e in done],
            [(e["request"]["client_token"], bool(e.get("error"))) for e in signed])


def test_transit_approle_login_and_login_again(envoy_factory, upstream, w):
    """Login, sign with the login token, a token. The login's lease (3 s) runs out: the
    next fetch logs in again and signs with the new login. The login revoked in OpenBao
    (Transit answers 403): the next fetch drops it, logs in again and signs once more."""
    role_id, secret_id = w.bao.approle(ROLE, [SIGN_POLICY], token_ttl="3s", token_max_ttl="3s")
    logins, signs = len(audited(w.bao, LOGIN_PATH, "response")), len(audited(w.bao, SIGN_PATH, "response"))
    envoy = start_approle(envoy_factory, w, role_id, secret_id)
    assert envoy.request("GET", "/orders/a").status == 200
    tokens = [upstream_token(upstream)]
    assert w.oidc.verify_access_token(tokens[0])["client_id"] == CC_CLIENT
    w.bao.wait_for_audit(logins + 1, LOGIN_PATH)
    (login1,), sign_calls = logins_and_signs(w.bao, role_id, logins, signs)
    assert sign_calls == [(login1, False)]                  # signed with the login's token

    def fetch_again(why):
        upstream.respond_with(401, path_prefix="/orders/reject", times=1)
        assert envoy.request("GET", "/orders/reject").status == 401       # drops the token
        wait_until(lambda: envoy.request("GET", "/orders/b").status == 200
                   and upstream_token(upstream) not in tokens, timeout=10, interval=0.2, message=why)
        tokens.append(upstream_token(upstream))

    # The login's lease runs out (OpenBao revokes the token: its accessor goes).
    wait_until(lambda: approle_token_accessors(w.bao, ROLE) == [], timeout=15, interval=0.2,
               message="the login token expired")
    fetch_again("a token signed after a new login")
    (_, login2), sign_calls = logins_and_signs(w.bao, role_id, logins, signs)
    assert sign_calls == [(login1, False), (login2, False)]

    # A login OpenBao no longer honours (a role with a long lease, its token revoked).
    w.bao.approle(ROLE, [SIGN_POLICY], token_ttl="1h", token_max_ttl="1h")   # same role_id and secret_id
    wait_until(lambda: approle_token_accessors(w.bao, ROLE) == [], timeout=15, interval=0.2,
               message="the second login token expired")
    fetch_again("a token after a login with the 1 h lease")
    (accessor,) = approle_token_accessors(w.bao, ROLE)
    assert w.bao.api("POST", "auth/token/revoke-accessor", {"accessor": accessor}).status in (200, 204)
    fetch_again("a token signed after Transit refused the revoked login")
    (_, _, login3, login4), sign_calls = logins_and_signs(w.bao, role_id, logins, signs)
    # The revoked login's sign call refused (403), the same call made again with a new login.
    assert sign_calls == [(login1, False), (login2, False), (login3, False), (login3, True), (login4, False)]
    assert "permission denied" in audited(w.bao, SIGN_PATH, "response", since=signs)[3]["error"]
    recs = requests_of(w.oidc, CC_CLIENT)
    assert [r["status"] for r in recs] == [200] * 4 and w.oidc.token_request_count() == 4
    assertions(w, recs, "client_credentials signed with an AppRole login")
    # Five sign calls: one per token request, and the one Transit refused (403), made
    # again after the new login: not a failure.
    assert stat(envoy, "provider.idp.signing.requests") == 5
    no_signing_failures(envoy)
    assert stat(envoy, "connection.orders.token.success") == 4
    assert_nothing_secret_in_log(envoy, secret_id, *tokens)


def test_transit_approle_wrong_secret_id(envoy_factory, upstream, w):
    """A secret_id OpenBao refuses: 503 credential_unavailable with retry-after, counted
    as signing.failure.login, logged with the login's status, no sign call, no token
    request; the secret_id appears nowhere in Envoy's log (wasm at debug level)."""
    role_id, _ = w.bao.approle(ROLE, [SIGN_POLICY], token_ttl="1h")
    wrong = secrets.token_hex(18)
    logins, signs = len(audited(w.bao, LOGIN_PATH, "response")), len(audited(w.bao, SIGN_PATH))
    envoy = start_approle(envoy_factory, w, role_id, wrong)
    resp = envoy.request("GET", "/orders/x")
    assert resp.status == 503 and resp.json() == UNAVAILABLE and int(resp.header("retry-after")) >= 1, resp
    assert upstream.requests() == []
    # OpenBao answers a bad secret_id 400 "invalid role or secret ID": a refusal, as for
    # a secret store's AppRole login (store.rs parse_login).
    envoy.wait_for_log(re.escape("provider idp: the signing key's Vault login failed: forbidden (HTTP 400)"))
    envoy.wait_for_log(re.escape("connection orders: provider idp: the client assertion could not be signed: "
                                 "login; no token request sent"))
    envoy.wait_for_stat("wasmcustom.latchkey.provider.idp.signing.failure.login", 1)
    (failed,) = audited(w.bao, LOGIN_PATH, "response", since=logins)
    assert failed.get("error") and "client_token" not in failed["auth"], failed
    assert failed["request"]["data"]["secret_id"] == w.bao.audit_hash(wrong)
    assert audited(w.bao, SIGN_PATH, since=signs) == []
    assert w.oidc.token_request_count() == 0, w.oidc.last_token_requests()
    no_signing_failures(envoy, login=stat(envoy, "provider.idp.signing.failure.login"))
    assert stat(envoy, "connection.orders.token.failure.signing") >= 1
    assert stat(envoy, "connection.orders.token.success") == 0
    text = envoy.log_text()
    assert "[debug][wasm]" in text, "no wasm debug line: the log level did not apply"
    assert_nothing_secret_in_log(envoy, wrong)
