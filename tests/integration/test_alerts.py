"""deploy/prometheus: latchkey's alert rules are valid, each alert does what its unit test
says, and every metric they read is one a real Envoy exports under that name.

`promtool check rules` and `promtool test rules` (promtool from Debian's prometheus package,
installed by `make integration`) run on the committed files. The unit tests feed promtool
hand-written series, so a live Envoy with the canonical `stats_tags` (envoy/demo.yaml's) is
scraped too: every family an alert or a unit test names must be on its /stats/prometheus, of
the type the rule assumes (rate/increase: counter), with the labels the rule uses. A renamed
stat (or a changed tag) fails here rather than silently never alerting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import prom
from harness import REPO_ROOT, Envoy, envoy_config, free_port, static_cluster
from token_servers import closed_port

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "latchkey-alerts.yaml"
RULE_TESTS = RULES_DIR / "latchkey-alerts.test.yaml"
# What the brief of the rules asks for, by alert name.
ALERTS = {"LatchkeyCredentialUnavailable", "LatchkeyTokenFetchFailing", "LatchkeySecretReadFailing",
          "LatchkeySecretStale", "LatchkeyPausedLimitReached"}
SELECTOR = re.compile(r"\b(latchkey_[a-z0-9_]+)\b(\{[^}]*\})?")
# Labels a scrape target carries, not latchkey.
TARGET_LABELS = {"job", "instance"}


def promtool(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    assert path, "promtool not found: `make integration` installs it (Debian package prometheus)"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    r = promtool("check", "rules", RULES.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in r.stdout, r.stdout


def test_promtool_unit_tests_of_every_alert():
    r = promtool("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired, quiet = set(), set()
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    # Each alert is shown firing, and not firing, by some case.
    assert {r["alert"] for r in rules()} == ALERTS
    assert fired == ALERTS and quiet == ALERTS, (fired, quiet)


def test_promtool_unit_tests_fail_on_a_wrong_expectation(tmp_path):
    """The unit tests compare what they say: a wrong expected label fails promtool."""
    (tmp_path / RULES.name).write_text(RULES.read_text())
    broken = RULE_TESTS.read_text().replace("severity: critical, job: envoy, instance: gw-1}",
                                            "severity: warning, job: envoy, instance: gw-1}", 1)
    assert broken != RULE_TESTS.read_text()
    (tmp_path / RULE_TESTS.name).write_text(broken)
    r = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_alert_is_documented():
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


# ------------------------------------------------------------- against a real Envoy


def scrape_of_a_failing_proxy(upstream, signer, wasm_path, tmp_path) -> prom.Scrape:
    """An Envoy whose token server and secret store are both down, with the stats_tags
    every shipped Envoy configuration has: a token failure and a store failure happen."""
    config = {
        "secrets": {
            "partner_key": {"vault": {"cluster": "vault", "url": "http://vault.test", "path": "partner",
                                      "field": "key", "token": "vault_token"}},
            "vault_token": {"inline": "t"},
            "orders_secret": {"inline": "s"},
        },
        "providers": {"keys": {"type": "api_key"},
                      "idp": {"type": "oauth2", "cluster": "idp", "token_url": "http://idp.test/token",
                              "client_id": "c", "client_secret": "orders_secret", "timeout_ms": 1000}},
        "connections": {
            "partner": {"provider": "keys", "api_key": "partner_key", "access": {"public": True}},
            "orders_token": {"provider": "idp", "grant": "client_credentials", "access": {"public": True}},
        },
        "routes": [
            {"name": "partner", "match": {"path_prefix": "/partner/"},
             "inject": [{"connections": ["partner"], "header": "x-api-key"}]},
            {"name": "orders", "match": {"path_prefix": "/orders/"},
             "inject": [{"connections": ["orders_token"], "header": "authorization"}]},
        ],
        "unmatched": "allow",
    }
    cfg = envoy_config(free_port(), free_port(), upstream.port, wasm_path, config, signer.jwks(),
                       extra_clusters=[static_cluster("idp", closed_port()),
                                       static_cluster("vault", closed_port())])
    cfg["stats_config"] = {
        "stats_tags": yaml.safe_load((REPO_ROOT / "envoy" / "demo.yaml").read_text())["stats_config"]["stats_tags"]}
    with Envoy(cfg, tmp_path / "envoy") as envoy:
        assert envoy.request("GET", "/elsewhere").status == 200
        assert envoy.request("GET", "/orders/1").status == 503
        envoy.wait_for_stat("wasmcustom.latchkey.connection.orders_token.token.failure.connect", 1)
        envoy.wait_for_stat("wasmcustom.latchkey.secret.partner_key.failure.connect", 1)
        return prom.scrape(envoy)


@pytest.fixture
def live(upstream, signer, wasm_path, tmp_path) -> prom.Scrape:
    return scrape_of_a_failing_proxy(upstream, signer, wasm_path, tmp_path)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for m in SELECTOR.finditer(expr):
        matchers = dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', m.group(2) or ""))
        out.append((m.group(1), matchers))
    return out


def test_every_metric_the_alerts_read_is_exported_by_envoy(live):
    seen = set()
    for rule in rules():
        expr, name = rule["expr"], rule["alert"]
        used_labels = set(re.findall(r"\$labels\.(\w+)", str(rule["annotations"]))) - TARGET_LABELS
        for family, matchers in selectors(expr):
            seen.add(family)
            assert family in live.types, f"{name}: {family} is not on Envoy's /stats/prometheus"
            counted = re.search(rf"\b(rate|increase)\(\s*{family}\b", expr)
            assert live.types[family] == ("counter" if counted else "gauge"), (name, family, live.types[family])
            series = live.labelsets(family)
            for label in used_labels:
                assert all(label in s for s in series), f"{name}: {family} has no label {label!r}: {series}"
            for label, value in matchers.items():
                if value == "":
                    # `{reason=""}` keeps the family's total: there must be one, and series
                    # with the label beside it (else the matcher is a no-op or selects nothing).
                    assert [s for s in series if label not in s], (name, family, series)
                    assert [s for s in series if label in s], (name, family, series)
                else:
                    assert [s for s in series if s.get(label) == value], (name, family, series)
    assert len(seen) >= 7, seen


def test_the_unit_tests_feed_series_envoy_exports(live):
    """The unit tests' input series carry real family names and label names."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    for t in tests["tests"]:
        for s in t["input_series"]:
            family, matchers = selectors(s["series"])[0]
            assert family in live.types, f"{s['series']}: {family} is not on Envoy's /stats/prometheus"
            labels = set(matchers) - TARGET_LABELS
            assert any(labels == set(real) for real in live.labelsets(family)), \
                f"{s['series']}: no series of {family} has exactly the labels {sorted(labels)}: " \
                f"{live.labelsets(family)}"
