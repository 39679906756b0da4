"""The token server for latchkey's user-delegated connections, proven without Envoy.

oidc-provider (tests/oauth/server.mjs) with the consent clients gw-consent (client_secret_basic)
and gw-consent-post (client_secret_post): an authorization URL is built by hand as latchkey's
login answer builds it (response_type=code, scope, random state, PKCE S256 computed here),
the scripted browser (browser.py) signs in and consents, and the IdP's redirect back is read
without being followed (nothing listens on the redirect URI's port). What latchkey's callback
and token use will meet: code + state + iss (RFC 9207), PKCE enforced, one-time codes, JWT
access tokens whose `sub` is the user, rotated refresh tokens, RFC 7009 revocation, and the
user's refusal (error=access_denied).
"""

from __future__ import annotations

import secrets
import urllib.parse

import jwt
import pytest

from browser import (Browser, consent_at_idp, deny_at_idp, idp_flow, location, query,
                     sign_out_at_idp)
from harness import LOOPBACK
from token_servers import (BROWSER_CLIENT_ID, CONSENT_CALLBACK_PATH, CONSENT_CLIENT_ID,
                           CONSENT_POST_CLIENT_ID, CONSENT_POST_CLIENT_SECRET, CONSENT_SCOPE,
                           DEFAULT_RESOURCE, OidcProvider, closed_port, pkce_challenge, pkce_pair)

ACCOUNTS = {"alice": {"groups": ["billing"]}, "bob": {"groups": ["support"]}}


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    # Nothing listens on the redirect URI: the browser never follows the IdP's redirect back.
    redirect_uri = f"http://{LOOPBACK}:{closed_port()}{CONSENT_CALLBACK_PATH}"
    with OidcProvider(consent_redirect_uris=[redirect_uri], accounts=ACCOUNTS,
                      log_dir=tmp_path_factory.mktemp("consent-idp")) as p:
        p.redirect_uri = redirect_uri
        yield p


class Login:
    """One authorization request as latchkey would send it."""

    def __init__(self, idp: OidcProvider, scope: str = CONSENT_SCOPE,
                 client_id: str = CONSENT_CLIENT_ID, **extra):
        self.verifier, challenge = pkce_pair()
        # latchkey's state is base64url(payload) "." base64url(mac): same alphabet here.
        self.state = secrets.token_urlsafe(24) + "." + secrets.token_urlsafe(32)
        self.redirect_uri = idp.redirect_uri
        self.url = idp.authorization_url(redirect_uri=idp.redirect_uri, state=self.state,
                                         code_challenge=challenge, scope=scope,
                                         client_id=client_id, **extra)


def consented(idp: OidcProvider, browser: Browser, account: str, **kw) -> tuple[Login, dict]:
    """A login approved by `account`: (the request, the callback's parameters)."""
    login = Login(idp, **kw)
    callback = consent_at_idp(browser, login.url, account)
    assert callback.split("?")[0] == idp.redirect_uri, callback
    q = query(callback)
    assert q.get("code") and q["state"] == login.state and q["iss"] == idp.issuer, q
    return login, q


def tokens_for(idp: OidcProvider, account: str, **kw) -> dict:
    login, q = consented(idp, Browser(), account, **kw)
    r = idp.redeem_code(q["code"], login.redirect_uri, login.verifier,
                        client_id=kw.get("client_id", CONSENT_CLIENT_ID))
    assert r.status == 200, r
    return r.body


def assert_invalid_grant(r) -> None:
    assert (r.status, r.body.get("error")) == (400, "invalid_grant"), r


def test_discovery_advertises_iss_parameter_and_s256(idp):
    disco = idp.discovery()
    assert disco["authorization_response_iss_parameter_supported"] is True
    assert disco["code_challenge_methods_supported"] == ["S256"]
    assert disco["authorization_endpoint"] == idp.authorization_endpoint
    assert disco["revocation_endpoint"] == idp.revocation_url


def test_consent_redeem_with_pkce_and_the_code_is_one_time(idp):
    b = Browser()
    login, q = consented(idp, b, "alice")
    assert set(q) == {"code", "state", "iss"}
    assert b.idp_account == "alice"
    # The callback URL exactly as the IdP sent it: path of latchkey's redirect_uri.
    assert urllib.parse.urlsplit(b.hops[-1].location or "").path == CONSENT_CALLBACK_PATH

    # PKCE: without the verifier, or with another one, the code is refused (and not used up).
    assert_invalid_grant(idp.redeem_code(q["code"], login.redirect_uri, None))
    assert_invalid_grant(idp.redeem_code(q["code"], login.redirect_uri, pkce_pair()[0]))
    # Another redirect_uri than the authorization request's is refused too.
    assert_invalid_grant(idp.redeem_code(q["code"], login.redirect_uri + "x", login.verifier))

    r = idp.redeem_code(q["code"], login.redirect_uri, login.verifier)
    assert r.status == 200, r
    body = r.body
    assert body["token_type"] == "Bearer" and body["scope"] == CONSENT_SCOPE
    assert body["refresh_token"] and "id_token" not in body    # no openid scope asked
    claims = idp.verify_access_token(body["access_token"])     # JWT, aud https://api.test
    assert claims["sub"] == "alice" and claims["client_id"] == CONSENT_CLIENT_ID
    assert claims["aud"] == DEFAULT_RESOURCE and claims["scope"] == CONSENT_SCOPE
    assert 0 < body["expires_in"] <= idp.ttl

    # Recorded as latchkey's request will be: code, redirect_uri, code_verifier, Basic auth.
    rec = idp.last_token_requests(1)[0]
    assert (rec["grant_type"], rec["client_id"], rec["status"]) == ("authorization_code", CONSENT_CLIENT_ID, 200)
    assert pkce_challenge(rec["form"]["code_verifier"]) == query(login.url)["code_challenge"]

    # The code again: refused, and (RFC 6749 §4.1.2) the tokens it gave are revoked.
    assert_invalid_grant(idp.redeem_code(q["code"], login.redirect_uri, login.verifier))
    assert_invalid_grant(idp.refresh(body["refresh_token"], client_id=CONSENT_CLIENT_ID))


def test_refresh_rotates_and_an_old_refresh_token_is_refused(idp):
    rt1 = tokens_for(idp, "alice")["refresh_token"]
    r = idp.refresh(rt1, client_id=CONSENT_CLIENT_ID)
    assert r.status == 200, r
    rt2 = r.body["refresh_token"]
    assert rt2 != rt1
    assert idp.verify_access_token(r.body["access_token"])["sub"] == "alice"
    # The new one works (and rotates again)...
    r = idp.refresh(rt2, client_id=CONSENT_CLIENT_ID)
    assert r.status == 200, r
    rt3 = r.body["refresh_token"]
    assert rt3 not in (rt1, rt2)
    # ...the old one is refused. Reuse detection: presenting a rotated-out refresh token
    # revokes the whole grant, so the newest one is refused from then on too.
    assert_invalid_grant(idp.refresh(rt1, client_id=CONSENT_CLIENT_ID))
    assert_invalid_grant(idp.refresh(rt3, client_id=CONSENT_CLIENT_ID))


def test_the_refresh_token_outlives_the_users_idp_session(idp):
    """Signing out at the IdP does not end the connection (the consent clients' tokens are
    not bound to the browser session); the next login asks for a login again."""
    b = Browser()
    login, q = consented(idp, b, "alice")
    r = idp.redeem_code(q["code"], login.redirect_uri, login.verifier)
    assert r.status == 200, r
    resp = sign_out_at_idp(b, idp.issuer)
    assert resp is not None and resp.status == 200
    r = idp.refresh(r.body["refresh_token"], client_id=CONSENT_CLIENT_ID)
    assert r.status == 200 and idp.verify_access_token(r.body["access_token"])["sub"] == "alice", r
    assert idp_flow(b, Login(idp).url, "alice").prompts[:1] == ["login"]


def test_a_refresh_token_belongs_to_its_client(idp):
    rt = tokens_for(idp, "bob")["refresh_token"]
    assert_invalid_grant(idp.refresh(rt, client_id="gw-basic"))
    r = idp.refresh(rt, client_id=CONSENT_CLIENT_ID)
    assert r.status == 200 and idp.verify_access_token(r.body["access_token"])["sub"] == "bob", r


def test_revocation_of_the_refresh_token(idp):
    body = tokens_for(idp, "bob")
    rt = body["refresh_token"]
    assert idp.revoke(rt) == 200
    assert_invalid_grant(idp.refresh(rt, client_id=CONSENT_CLIENT_ID))
    assert idp.revoke(rt) == 200                      # RFC 7009: an unknown token is fine
    assert idp.stats()["revocation_requests"] >= 2


def test_client_secret_post_client(idp):
    body = tokens_for(idp, "alice", client_id=CONSENT_POST_CLIENT_ID)
    rec = idp.last_token_requests(1)[0]
    assert rec["client_id"] == CONSENT_POST_CLIENT_ID and rec["form"]["client_secret"] == CONSENT_POST_CLIENT_SECRET
    assert not any(k.lower() == "authorization" for k, _ in rec["headers"])
    assert idp.verify_access_token(body["access_token"])["sub"] == "alice"
    r = idp.refresh(body["refresh_token"], client_id=CONSENT_POST_CLIENT_ID)
    assert r.status == 200, r
    assert idp.revoke(r.body["refresh_token"], client_id=CONSENT_POST_CLIENT_ID) == 200
    assert_invalid_grant(idp.refresh(r.body["refresh_token"], client_id=CONSENT_POST_CLIENT_ID))


def test_which_user_consented_is_whose_token(idp):
    """One browser, two users in turn: consent_at_idp signs the second one in (the IdP
    session of the first is forgotten), and each code gives its own user's tokens."""
    b = Browser()
    subs = []
    for account in ("alice", "bob", "alice"):
        login, q = consented(idp, b, account)
        r = idp.redeem_code(q["code"], login.redirect_uri, login.verifier)
        assert r.status == 200, r
        subs.append(idp.verify_access_token(r.body["access_token"])["sub"])
    assert subs == ["alice", "bob", "alice"]


def test_an_existing_idp_session_needs_no_login(idp):
    b = Browser()
    first = idp_flow(b, Login(idp).url, "alice")
    assert first.prompts == ["login", "consent"]
    # Same user again: signed in already, and the grant covers the scope: no form at all.
    login = Login(idp)
    again = idp_flow(b, login.url, "alice")
    assert again.prompts == []
    q = query(again.location)
    assert q["state"] == login.state and q["iss"] == idp.issuer
    r = idp.redeem_code(q["code"], login.redirect_uri, login.verifier)
    assert r.status == 200 and idp.verify_access_token(r.body["access_token"])["sub"] == "alice"
    # A wider scope asks for consent only.
    wider = idp_flow(b, Login(idp, scope="orders.read orders.write").url, "alice")
    assert wider.prompts == ["consent"] and "code" in query(wider.location)


def test_offline_access_and_openid_also_work(idp):
    """offline_access without prompt=consent is dropped by oidc-provider; the refresh token
    comes anyway. With openid an ID token comes too."""
    body = tokens_for(idp, "bob", scope="openid offline_access orders.read")
    assert body["refresh_token"] and body["id_token"]
    assert idp.verify_access_token(body["access_token"])["sub"] == "bob"
    assert jwt.decode(body["id_token"], options={"verify_signature": False})["sub"] == "bob"


def test_the_user_refuses_consent(idp):
    login = Login(idp)
    callback = deny_at_idp(Browser(), login.url, "alice")
    assert callback.split("?")[0] == idp.redirect_uri
    q = query(callback)
    assert q["error"] == "access_denied" and q["state"] == login.state and q["iss"] == idp.issuer, q
    assert "code" not in q

    # At the login form instead (no account needed).
    login = Login(idp)
    q = query(deny_at_idp(Browser(), login.url, at="login"))
    assert (q["error"], q["state"], q["iss"]) == ("access_denied", login.state, idp.issuer), q

    # Nothing to refuse when the grant already covers the request.
    b = Browser()
    consented(idp, b, "alice")
    with pytest.raises(AssertionError, match="no consent form"):
        deny_at_idp(b, Login(idp).url, "alice")


@pytest.mark.parametrize("extra, what", [
    ({"code_challenge": None, "code_challenge_method": None}, "PKCE"),
    ({"code_challenge_method": "plain"}, "code_challenge_method"),
])
def test_pkce_is_required(idp, extra, what):
    login = Login(idp)
    params = {**query(login.url), **extra}
    url = idp.authorization_endpoint + "?" + urllib.parse.urlencode(
        {k: v for k, v in params.items() if v is not None})
    callback = consent_at_idp(Browser(), url, "alice")
    q = query(callback)
    assert q["error"] == "invalid_request" and what in q["error_description"], q
    assert q["state"] == login.state and q["iss"] == idp.issuer


def test_unregistered_redirect_uri_is_not_redirected_to(idp):
    login = Login(idp)
    url = login.url.replace(urllib.parse.quote(CONSENT_CALLBACK_PATH, safe=""),
                            urllib.parse.quote("/elsewhere", safe=""))
    assert url != login.url
    resp = Browser().get(url)
    assert resp.status == 400 and b"redirect_uri" in resp.body


def test_consent_client_next_to_the_browser_client(tmp_path_factory):
    """Both modes at once (Envoy's oauth2 sign-in and latchkey's consent share the IdP
    session): after signing in through gw-browser, gw-consent asks for consent only."""
    port = closed_port()
    consent_uri = f"http://{LOOPBACK}:{port}{CONSENT_CALLBACK_PATH}"
    browser_uri = f"http://{LOOPBACK}:{port}/oauth2/callback"
    with OidcProvider(consent_redirect_uris=[consent_uri], browser_redirect_uris=[browser_uri],
                      accounts=ACCOUNTS, log_dir=tmp_path_factory.mktemp("both-idp")) as p:
        p.redirect_uri = consent_uri
        b = Browser()
        _, challenge = pkce_pair()
        signin = p.authorization_url(redirect_uri=browser_uri, state="s", code_challenge=challenge,
                                     scope="openid groups", client_id=BROWSER_CLIENT_ID)
        run = idp_flow(b, signin, "bob")
        assert run.prompts == ["login", "consent"] and "code" in query(run.location)
        login = Login(p)
        run = idp_flow(b, login.url, "bob")
        assert run.prompts == ["consent"]
        q = query(run.location)
        r = p.redeem_code(q["code"], consent_uri, login.verifier)
        assert r.status == 200 and p.verify_access_token(r.body["access_token"])["sub"] == "bob", r


def test_helpers_refuse_what_they_cannot_do(idp):
    with pytest.raises(ValueError):
        idp_flow(Browser(), Login(idp).url, "alice", deny_at="later")
    # `location` insists on a redirect.
    resp = Browser().get(idp.issuer + "/.well-known/openid-configuration")
    with pytest.raises(AssertionError):
        location(resp, idp.issuer)
