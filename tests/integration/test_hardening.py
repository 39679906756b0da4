"""latchkey tried as an attacker would, in a real Envoy 1.40.

Every case runs twice: with Envoy's default HTTP connection manager settings
(`normalize_path` and `merge_slashes` off, escaped slashes kept), which many
deployments keep, and with the settings docs/deploy.md recommends. Whatever Envoy
does first, the outcome must hold: a credential never reaches the upstream on a
path that some upstream resolves outside the credential's route, and no request
that some upstream resolves inside a protected route reaches it unchecked.
"""

from __future__ import annotations

import json
import struct
import urllib.parse

import pytest

from harness import EnvoyStartError, bearer, raw_http_request

PARTNER_KEY = "pk-partner-Zk84-hardening"
WASM_ENV = {"PARTNER_KEY": PARTNER_KEY}

MODES = {
    "envoy_defaults": {"normalize_path": False, "merge_slashes": False},
    "recommended": {"normalize_path": True, "merge_slashes": True,
                    "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"},
}

ENVOY_ROUTES = [
    {"name": "named_admin", "prefix": "/named-admin"},
    {"name": "default", "prefix": "/"},
]


def plugin_config(**overrides):
    cfg = {
        "secrets": {"partner_key": {"env": "PARTNER_KEY"}},
        "providers": {"partner": {"type": "api_key"}},
        "connections": {
            "partner": {"provider": "partner", "api_key": "partner_key",
                        "access": {"groups": ["billing"]}},
        },
        "routes": [
            {"name": "partner", "match": {"path_prefix": "/partner/", "methods": ["GET"]},
             "inject": [{"connections": ["partner"], "query": "api_key"}]},
            {"name": "priv", "match": {"path_prefix": "/priv/"},
             "access": {"groups": ["admins"]}},
            {"name": "admin", "match": {"path_exact": "/admin"},
             "access": {"groups": ["admins"]}},
            {"name": "reports", "match": {"path_prefix": "/reports/", "methods": ["GET"]},
             "access": {"groups": ["admins"]}},
            {"name": "flags", "match": {"path_exact": "/flags"},
             "access": {"claims": {"is_admin": ["true"]}}},
        ],
        "unmatched": "allow",
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(params=sorted(MODES))
def mode(request):
    return request.param


@pytest.fixture
def envoy(envoy_factory, mode):
    return envoy_factory(plugin_config(), wasm_env=WASM_ENV, routes=ENVOY_ROUTES,
                         hcm_extra=MODES[mode])


@pytest.fixture(scope="module")
def billing(signer):
    return bearer(signer.token({"sub": "bob", "groups": ["billing"]}))


@pytest.fixture(scope="module")
def staff(signer):
    return bearer(signer.token({"sub": "sam", "groups": ["staff"]}))


@pytest.fixture(scope="module")
def admin(signer):
    return bearer(signer.token({"sub": "ada", "groups": ["admins"]}))


def stat(envoy, name):
    return envoy.stat(f"wasmcustom.latchkey.{name}")


def assert_bad_path(resp, reasons=("path_ambiguous",)):
    assert resp.status == 400, resp
    assert resp.header("content-type") == "application/json"
    body = json.loads(resp.body)
    assert body["error"] == "bad_request" and body["reason"] in reasons, body
    assert set(body) == {"error", "reason"}


def assert_clean_inside(path, prefix):
    """`path` reads the same to every kind of server, and lies inside `prefix`."""
    bare = path.split("?", 1)[0]
    lowered = bare.lower()
    for marker in ("/./", "/../", "//", ";", "%2e", "%2f", "%5c", "\\", "%25"):
        assert marker not in lowered, (marker, path)
    assert not lowered.endswith(("/.", "/..")), path
    assert bare.startswith(prefix), path


def envoy_refused(resp):
    """Envoy's own answer to a path it will not forward as is (recommended mode):
    a redirect to the unescaped path, or a 400 from its codec/normaliser."""
    return resp.status in (301, 307, 308) or (resp.status == 400 and not resp.body.startswith(b"{"))


# ------------------------------------------------- 1. a key never follows a path out

OUT_OF_ROUTE = [
    "/partner/../admin",
    "/partner/%2e%2e/admin",
    "/partner/%2E%2E/admin",
    "/partner/.%2e/admin",
    "/partner/..%2fadmin",
    "/partner/%2e%2e%2fadmin",
    "/partner/x/../../admin",
    "/partner/..;/admin",
    "/partner/..%5cadmin",
    "/partner//../admin",
]


@pytest.mark.parametrize("path", OUT_OF_ROUTE)
def test_key_never_follows_the_path_out_of_its_route(envoy, upstream, billing, mode, path):
    resp = envoy.request("GET", path, headers=[billing])
    for got in upstream.requests():
        # A key only ever travels on a clean path inside its route (Envoy may have
        # normalised /partner//../admin to /partner/admin, which is inside).
        if PARTNER_KEY in urllib.parse.unquote(got.path):
            assert_clean_inside(got.path, "/partner/")
    if mode == "envoy_defaults":
        assert_bad_path(resp)
        assert upstream.requests() == []
        assert stat(envoy, "requests.denied.bad_path") == 1
    else:
        # Envoy resolved it first (or refused it): latchkey saw the resolved path.
        assert resp.status in (200, 400, 403) or envoy_refused(resp), resp


def test_key_never_follows_a_nul_or_an_absolute_form_out(envoy, upstream, billing, mode):
    resp = envoy.request("GET", "/partner/x%00/../../admin", headers=[billing])
    assert resp.status == 400, resp
    if mode == "envoy_defaults":
        assert json.loads(resp.body) == {"error": "bad_request", "reason": "path_control_character"}
    raw = (f"GET http://127.0.0.1/partner/../admin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
           f"{billing[0]}: {billing[1]}\r\nConnection: close\r\n\r\n").encode()
    answer = raw_http_request(envoy.port, raw)
    status = int(answer.split(b" ", 2)[1])
    if mode == "envoy_defaults":
        assert status == 400 and b'"reason":"path_ambiguous"' in answer, answer
    for got in upstream.requests():
        assert PARTNER_KEY not in got.path


def test_key_still_reaches_its_own_route(envoy, upstream, billing):
    for path in ["/partner/x", "/partner/a%20b/c", "/partner/x;v=1", "/partner/%78"]:
        resp = envoy.request("GET", path + "?q=1", headers=[billing])
        assert resp.status == 200, (path, resp)
        got = upstream.last()
        assert got.path.endswith(f"&api_key={PARTNER_KEY}"), got.path
    assert stat(envoy, "connection.partner.injected") == 4


# --------------------------------------- 2. no encoding skips a protected route

INTO_PROTECTED = [
    "//priv/x", "/./priv/x", "/x/../priv/x", "/%2e/priv/x", "/priv%2Fx", "/%2fpriv/x",
    "/priv;a=b/x", "//admin", "/./admin", "/x/../admin", "/admin;x",
]
DECODED_INTO_PROTECTED = ["/%70riv/x", "/adm%69n", "/%61dmin"]


@pytest.mark.parametrize("path", INTO_PROTECTED + DECODED_INTO_PROTECTED)
def test_no_encoding_skips_an_access_rule(envoy, upstream, staff, mode, path):
    resp = envoy.request("GET", path, headers=[staff])
    # Checked and refused (403), refused as ambiguous (400), or refused by Envoy.
    assert upstream.requests() == [], (path, resp, upstream.requests())
    if path in DECODED_INTO_PROTECTED:
        assert resp.status == 403, resp
        assert stat(envoy, "requests.denied.forbidden") == 1
    elif mode == "envoy_defaults":
        assert_bad_path(resp)
    else:
        assert resp.status in (400, 403) or envoy_refused(resp), resp


def test_decoded_paths_are_checked_and_admitted(envoy, upstream, admin):
    for path in DECODED_INTO_PROTECTED:
        assert envoy.request("GET", path, headers=[admin]).status == 200, path
    assert len(upstream.requests()) == 3


def test_route_name_routes_refuse_paths_envoy_may_have_routed_raw(envoy_factory, upstream,
                                                                  staff, admin, mode):
    cfg = plugin_config(routes=[
        {"name": "named", "match": {"route_name": "named_admin"},
         "access": {"groups": ["admins"]}},
    ])
    envoy = envoy_factory(cfg, wasm_env=WASM_ENV, routes=ENVOY_ROUTES, hcm_extra=MODES[mode])
    for path in ["/x/../named-admin", "/named-admin;x", "//named-admin", "/%6eamed-admin"]:
        resp = envoy.request("GET", path, headers=[staff])
        assert upstream.requests() == [], (path, resp)
        if mode == "envoy_defaults":
            assert_bad_path(resp, ("path_not_normalized",))
        else:
            assert resp.status in (400, 403) or envoy_refused(resp), (path, resp)
    assert envoy.request("GET", "/named-admin/x", headers=[admin]).status == 200
    # Unrelated, clean paths on other routes are not this filter's business.
    assert envoy.request("GET", "/other/a%20b", headers=[staff]).status == 200


def test_odd_paths_outside_any_route_are_forwarded(envoy, upstream, staff, mode):
    resp = envoy.request("GET", "/static/a;v=1/x", headers=[staff])
    assert resp.status == 200, resp
    assert upstream.last().path == "/static/a;v=1/x"


# ------------------------------------------------------------------ 3. HEAD is GET


def test_head_is_checked_like_get(envoy, upstream, staff, admin, billing):
    assert envoy.request("HEAD", "/reports/q1", headers=[staff]).status == 403
    assert upstream.requests() == []
    assert envoy.request("HEAD", "/reports/q1", headers=[admin]).status == 200
    assert upstream.last().method == "HEAD"
    # And a GET-only credential route serves HEAD with its key.
    assert envoy.request("HEAD", "/partner/x", headers=[billing]).status == 200
    assert upstream.last().path == f"/partner/x?api_key={PARTNER_KEY}"


# ------------------------------------------------- 4. array copies of the key go


def test_array_and_folded_copies_of_the_key_are_removed(envoy, upstream, billing):
    query = ("api_key[]=evil1&api_key[0]=evil2&api_key%5B%5D=evil3&api.key=evil4"
             "&api+key=evil5&API_KEY[x][y]=evil6&keep=1&api_key_id=7")
    resp = envoy.request("GET", f"/partner/x?{query}", headers=[billing])
    assert resp.status == 200, resp
    got = upstream.last()
    assert got.path == f"/partner/x?keep=1&api_key_id=7&api_key={PARTNER_KEY}"
    assert "evil" not in got.path
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(got.path).query)["api_key"] == [PARTNER_KEY]


# ----------------------------------------------- 5. claim types are not guessed


def _pairs_list(*items: bytes) -> str:
    """The bytes of the proxy-wasm pairs encoding of a list, as a string claim."""
    head = struct.pack("<I", len(items)) + b"".join(struct.pack("<II", len(i), 0) for i in items)
    return (head + b"".join(i + b"\0\0" for i in items)).decode("latin-1")


@pytest.mark.parametrize("value,status", [
    ("\u0001", 403),
    (_pairs_list(b"true"), 403),
    ([], 403),
    (1, 403),
    (True, 200),
    (["x", "true"], 200),
    ("true", 200),
])
def test_claim_types_come_from_the_token_not_from_bytes(envoy, upstream, signer, value, status):
    token = signer.token({"sub": "eve", "is_admin": value})
    resp = envoy.request("GET", "/flags", headers=[bearer(token)])
    assert resp.status == status, (value, resp)
    assert len(upstream.requests()) == (1 if status == 200 else 0)


# ------------------------------------------ 6. secrets with control characters


# (A NUL never arrives: Envoy cuts the variable there. The unit tests cover it.)
@pytest.mark.parametrize("value", ["pk\r\nx-injected: 1", "pk\x1b[0mtail", "pk\ttab"])
def test_secret_with_a_control_character_is_refused_at_load(envoy_factory, mode, value):
    with pytest.raises(EnvoyStartError) as err:
        envoy_factory(plugin_config(), wasm_env={"PARTNER_KEY": value}, routes=ENVOY_ROUTES,
                      hcm_extra=MODES[mode])
    text = str(err.value)
    assert ("latchkey: configuration rejected: secrets.partner_key.env: the value of "
            "environment variable \"PARTNER_KEY\" has a control character") in text
    assert "x-injected" not in text and "tail" not in text
