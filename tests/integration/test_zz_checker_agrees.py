"""The checker and the schema agree with the filter on every configuration the suite ran.

At collection this module wraps `harness.Envoy.start` (behaviour unchanged) to record, for
every Envoy started with latchkey, its configuration, the VM's environment and what the
filter did: loaded it, or refused it (`configuration rejected: <message>`). It runs last
(file order) and checks each recorded configuration:

- the checker, given the same environment (`--env`), accepts what the filter loaded and
  refuses what the filter refused, with the same message;
- the schema accepts every configuration the filter loaded (it is never stricter than the
  filter), and refuses what the filter refused unless the reason is one a schema can't
  express (a name defined elsewhere, a duplicate, a field that doesn't apply to this
  provider type, the environment; `checker_util.BEYOND_A_SCHEMA`) — those are listed in
  the test output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import checker_util as cu
import harness

RECORDED: list[dict] = []
_original_start = harness.Envoy.start


def _record(envoy: harness.Envoy, started: bool) -> None:
    for cfg in cu.wasm_filters(envoy.config):
        code = cfg.get("vm_config", {}).get("code", {}).get("local", {}).get("filename", "")
        if "latchkey" not in Path(code).name:  # e.g. the harness's no-op module
            continue
        text = cu.filter_configuration(cfg)
        if text is None:
            continue
        env_cfg = cfg.get("vm_config", {}).get("environment_variables", {})
        env = dict(env_cfg.get("key_values", {}))
        for k in env_cfg.get("host_env_keys", []):
            if envoy.env and k in envoy.env:
                env[k] = envoy.env[k]
        m = re.search(r"configuration rejected: (.*)", envoy.log_text())
        RECORDED.append({"text": text, "env": env, "started": started,
                         "message": m.group(1).strip() if m and not started else None,
                         "where": str(envoy.workdir)})


def _recording_start(self):
    try:
        result = _original_start(self)
    except harness.EnvoyStartError:
        _record(self, False)
        raise
    _record(self, True)
    return result


harness.Envoy.start = _recording_start


def test_checker_and_schema_agree_with_the_filter():
    if len(RECORDED) < 10:
        pytest.skip("run with the rest of the integration suite (it records what Envoy ran)")
    seen = set()
    beyond, checked = [], 0
    for rec in RECORDED:
        key = (rec["text"], json.dumps(rec["env"], sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        try:
            doc = json.loads(rec["text"])
        except ValueError:
            doc = None
        r = cu.check("check", "--env", "-", stdin=rec["text"], env=rec["env"])
        if rec["started"]:
            assert r.returncode == 0, (rec["where"], r.stdout, rec["text"][:500])
            assert cu.schema_errors(doc) == [], (rec["where"], rec["text"][:500])
        elif rec["message"] is not None:
            assert r.returncode == 1, (rec["where"], r.stdout)
            assert r.stdout.strip().endswith(f"error: {rec['message']}"), (r.stdout, rec["message"])
            if doc is not None and cu.schema_errors(doc) == []:
                assert cu.BEYOND_A_SCHEMA.search(rec["message"]), (
                    f"the schema accepts a configuration the filter refuses: {rec['message']}")
                beyond.append(rec["message"])
        checked += 1
    print(f"\n{checked} distinct configurations checked against what the filter did; "
          f"{len(beyond)} refused for reasons beyond a schema: {sorted(set(beyond))[:8]}")
