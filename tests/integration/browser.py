"""A scripted browser for sign-in and consent flows against the real oidc-provider.

What a browser does with cookies and redirects, minus the rendering: every redirect is
followed by hand (``get``/``post`` never follow one), cookies are kept the way a browser
keeps them, and the IdP's login and consent forms (oidc-provider's devInteractions, see
tests/oauth/server.mjs) are read from its HTML and posted.

    b = Browser()
    resp = b.get(url)                         # one request, no redirect followed
    nxt, resp = b.follow(resp, url)           # GET the Location of a 30x answer
    url, resp = b.follow_all(url, resp, until=lambda u: u.startswith(app))

    # latchkey's consent: from its login answer's Location to the IdP's redirect back
    callback = consent_at_idp(b, authorize_url, "alice")    # ...?code=&state=&iss= (not followed)
    refused = deny_at_idp(b, authorize_url, "alice")        # ...?error=access_denied&state=&iss=
    sign_out_at_idp(b, issuer)                              # end the IdP session (its logout page)
    run = idp_flow(b, authorize_url, "alice")               # the same, with the prompts seen

Only http://127.0.0.1 URLs (any port) are allowed; every request is bounded by
http_request's timeout and every walk by MAX_IDP_HOPS.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Callable

from harness import LOOPBACK, Response, http_request

MAX_IDP_HOPS = 12
# devInteractions accepts any password for any login.
ANY_PASSWORD = "any password: devInteractions accepts any"
# oidc-provider's own cookies: the browser session at the IdP and the interaction cookies.
IDP_COOKIE_PREFIXES = ("_session", "_interaction")


@dataclass
class Cookie:
    value: str
    path: str
    attrs: dict[str, str]


@dataclass
class Hop:
    method: str
    url: str
    status: int
    location: str | None


class Browser:
    """What a browser does with cookies and redirects, minus the rendering.

    One cookie jar for host 127.0.0.1 (cookies do not depend on the port, so Envoy's and
    the IdP's cookies share it, as in a browser); Path is honoured, Max-Age=0 or an
    Expires in the past deletes. `Secure` cookies are sent over http here: browsers treat
    127.0.0.1 as a secure context too. Every request is recorded in `hops`.
    `idp_account` is the account this browser last signed in as at the IdP (None: never,
    or its IdP session was forgotten)."""

    def __init__(self):
        self.jar: dict[str, Cookie] = {}
        self.hops: list[Hop] = []
        self.idp_account: str | None = None

    def store(self, resp: Response) -> dict[str, Cookie]:
        """Take the response's Set-Cookie headers; return what they set (deletions too).
        (`request` already stores every answer; calling it again changes nothing.)"""
        set_now: dict[str, Cookie] = {}
        for line in resp.header_values("set-cookie"):
            first, *rest = [p.strip() for p in line.split(";")]
            name, _, value = first.partition("=")
            attrs = {}
            for part in rest:
                k, _, v = part.partition("=")
                attrs[k.strip().lower()] = v.strip()
            cookie = Cookie(value, attrs.get("path") or "/", attrs)
            set_now[name] = cookie
            if self._expired(attrs):
                self.jar.pop(name, None)
            else:
                self.jar[name] = cookie
        return set_now

    @staticmethod
    def _expired(attrs: dict[str, str]) -> bool:
        if "max-age" in attrs:
            return int(attrs["max-age"]) <= 0
        if "expires" in attrs:
            return parsedate_to_datetime(attrs["expires"]).timestamp() <= time.time()
        return False

    def cookie_header(self, path: str) -> str | None:
        def matches(cpath: str) -> bool:
            return (path == cpath or cpath == "/" or
                    (path.startswith(cpath) and (cpath.endswith("/") or path[len(cpath)] == "/")))
        pairs = [f"{n}={c.value}" for n, c in self.jar.items() if matches(c.path)]
        return "; ".join(pairs) or None

    def forget_idp_session(self) -> None:
        """Drop oidc-provider's cookies (as after signing out there): the next authorization
        request asks for a login again. Other cookies (Envoy's) stay."""
        for name in [n for n in self.jar if n.startswith(IDP_COOKIE_PREFIXES)]:
            del self.jar[name]
        self.idp_account = None

    def request(self, method: str, url: str, form: dict[str, str] | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """One request, cookies sent and stored; a redirect is returned, never followed."""
        u = urllib.parse.urlsplit(url)
        assert u.scheme == "http" and u.hostname == LOOPBACK, url
        target = u.path + (f"?{u.query}" if u.query else "")
        hdrs = dict(headers or {})
        if (cookies := self.cookie_header(u.path)):
            hdrs["Cookie"] = cookies
        body = None
        if form is not None:
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
            body = urllib.parse.urlencode(form)
        resp = http_request(u.port, method, target, headers=hdrs, body=body)
        self.hops.append(Hop(method, url, resp.status, resp.header("location")))
        self.store(resp)
        return resp

    def get(self, url: str, **kw) -> Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, form: dict[str, str], **kw) -> Response:
        return self.request("POST", url, form=form, **kw)

    def follow(self, resp: Response, url: str) -> tuple[str, Response]:
        """GET the Location of `resp` (a 302/303 answer to `url`): (its absolute URL, answer)."""
        nxt = location(resp, url)
        return nxt, self.get(nxt)

    def follow_all(self, url: str, resp: Response | None = None,
                   until: Callable[[str], bool] | None = None,
                   max_hops: int = MAX_IDP_HOPS) -> tuple[str, Response | None]:
        """Follow redirects from `url` (GET it unless `resp`, its answer, is given) until an
        answer is not a redirect: (its URL, answer). With `until`: a Location for which
        until(url) is true is returned NOT fetched, as (that URL, None)."""
        if resp is None:
            resp = self.get(url)
        for _ in range(max_hops):
            if resp.status not in (301, 302, 303, 307, 308):
                return url, resp
            url = location(resp, url)
            if until is not None and until(url):
                return url, None
            resp = self.get(url)
        raise AssertionError(f"still redirected after {max_hops} hops: {self.hops[-max_hops:]}")


def location(resp: Response, base: str) -> str:
    """The absolute Location of a 302/303 answer (asserts it is one)."""
    loc = resp.header("location")
    assert resp.status in (302, 303) and loc, (resp.status, resp.headers, resp.body[:300])
    return urllib.parse.urljoin(base, loc)


def query(url: str) -> dict[str, str]:
    """The URL's query parameters (the last of repeated ones)."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


def origin(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


# --------------------------------------------------------------------------- at the IdP


@dataclass
class IdpRun:
    """One walk through the IdP: where it sent the browser back to, and what it asked."""

    location: str                                   # the redirect leaving the IdP (not fetched)
    prompts: list[str] = field(default_factory=list)  # forms seen, in order: "login", "consent"
    denied_at: str | None = None                    # the form whose [ Cancel ] was followed


def idp_flow(browser: Browser, url: str, account: str | None, *,
             resp: Response | None = None, until: Callable[[str], bool] | None = None,
             deny_at: str | None = None, max_hops: int = MAX_IDP_HOPS) -> IdpRun:
    """Walk oidc-provider's authorization flow as `account`, starting at `url` (an
    authorization request; GET it unless `resp`, its answer, is given).

    /auth -> /interaction/<uid> (login form: POST prompt=login&login=<account>&password=...)
    -> /auth/<uid> -> /interaction/<uid2> (consent form: POST prompt=consent) -> /auth/<uid2>
    -> a redirect that leaves the IdP. Which forms come depends on the browser's IdP session
    and grants (none, login only, consent only, both); they are answered as they come.
    The first redirect for which until(url) is true (default: one to another origin than
    `url`'s, i.e. the client's redirect_uri) is returned, not fetched.

    `deny_at`: "login", "consent" or "first" (whichever form comes first): follow that form's
    [ Cancel ] link instead of submitting it (oidc-provider then answers the client with
    error=access_denied). AssertionError if that form never came.
    """
    if deny_at not in (None, "login", "consent", "first"):
        raise ValueError(f"deny_at must be login, consent or first, not {deny_at!r}")
    idp = origin(url)
    leaves = until or (lambda u: origin(u) != idp)
    run = IdpRun(location="")
    if resp is None:
        resp = browser.get(url)
    for _ in range(max_hops):
        if resp.status in (302, 303):
            url = location(resp, url)
            if leaves(url):
                run.location = url
                return run
            resp = browser.get(url)
            continue
        assert resp.status == 200, (url, resp.status, resp.body[:500])
        html = resp.body.decode()
        action = re.search(r'<form[^>]*action="([^"]+)"', html)
        prompt = re.search(r'name="prompt" value="([a-z]+)"', html)
        assert action and prompt, html[:1000]
        name = prompt.group(1)
        run.prompts.append(name)
        if deny_at in (name, "first"):
            cancel = re.search(r'<a href="([^"]+/abort)"', html)
            assert cancel, html[:1000]
            run.denied_at = name
            url = urllib.parse.urljoin(url, _unescape(cancel.group(1)))
            resp = browser.get(url)
            continue
        form = {"prompt": name}
        if name == "login":
            assert account is not None, "the IdP asks for a login and no account was given"
            form.update(login=account, password=ANY_PASSWORD)
        url = urllib.parse.urljoin(url, _unescape(action.group(1)))
        resp = browser.post(url, form)
        if name == "login" and resp.status in (302, 303):
            browser.idp_account = account
    raise AssertionError(f"no redirect away from the IdP after {max_hops} hops: {browser.hops}")


def _unescape(attr: str) -> str:
    return (attr.replace("&amp;", "&").replace("&#x2F;", "/").replace("&#47;", "/")
            .replace("&quot;", '"').replace("&#39;", "'"))


def _sign_in_as(browser: Browser, account: str) -> None:
    # A session at the IdP for someone else would be used without a login form: forget it.
    if browser.idp_account is not None and browser.idp_account != account:
        browser.forget_idp_session()
    elif browser.idp_account is None:
        # IdP cookies the browser got without our login (never, normally): not ours to trust.
        browser.forget_idp_session()


def consent_at_idp(browser: Browser, authorize_url: str, account: str) -> str:
    """From an authorization URL (latchkey's login answer's Location) to the IdP's redirect
    back: signs in at oidc-provider as `account` (unless this browser's IdP session is
    already `account`'s; one of another account is forgotten first) and approves consent
    (when asked: a grant that already covers the request is not asked again).

    Returns the Location the IdP redirects to, NOT followed: the client's redirect_uri with
    code, state and iss (RFC 9207) on success, or with error=... (e.g. invalid_request for a
    request without PKCE), so a test can replay or tamper with it."""
    _sign_in_as(browser, account)
    return idp_flow(browser, authorize_url, account).location


def deny_at_idp(browser: Browser, authorize_url: str, account: str | None = None,
                at: str = "consent") -> str:
    """Like consent_at_idp, but the user refuses: follows the [ Cancel ] link of the consent
    form (at="consent": signs in as `account` first if asked) or of the login form
    (at="login", no account needed) or of whichever form comes first (at="first").
    oidc-provider then redirects to the client with error=access_denied,
    error_description, state and iss; that Location is returned, not followed.

    at="consent" needs a consent form: a browser whose grant already covers the request is
    not asked (AssertionError); use a fresh Browser, or at="first". at="login" needs a login
    form: the browser's IdP session is forgotten first."""
    if at == "login" or account is None:
        browser.forget_idp_session()
    else:
        _sign_in_as(browser, account)
    run = idp_flow(browser, authorize_url, account, deny_at=at)
    assert run.denied_at is not None, (
        f"the IdP asked for no {at} form (prompts: {run.prompts}); nothing to cancel")
    return run.location


def sign_out_at_idp(browser: Browser, issuer: str) -> Response:
    """End the browser's session at oidc-provider through its own logout page (GET
    /session/end, then POST its form with the xsrf value and logout=yes); returns the last
    answer. Grants of clients whose tokens do not expire with the session (the consent
    clients) survive it; the browser's next authorization request asks for a login."""
    url = issuer + "/session/end"
    resp = browser.get(url)
    assert resp.status == 200, (resp.status, resp.body[:300])
    html = resp.body.decode()
    action = re.search(r'<form id="op.logoutForm" method="post" action="([^"]+)"', html)
    xsrf = re.search(r'name="xsrf" value="([^"]+)"', html)
    assert action and xsrf, html[:1000]
    url = urllib.parse.urljoin(url, _unescape(action.group(1)))
    resp = browser.post(url, {"xsrf": xsrf.group(1), "logout": "yes"})
    url, resp = browser.follow_all(url, resp, max_hops=4)
    browser.idp_account = None
    return resp
