"""Envoy's /stats/prometheus read with a real Prometheus text-format parser (prometheus-client)."""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Scrape(NamedTuple):
    """{(family, ((label, value), ...)): value} and {family: type}."""

    values: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    types: dict[str, str]

    def get(self, family: str, **labels: str) -> float | None:
        return self.values.get((family, tuple(sorted(labels.items()))))

    def families(self, prefix: str = "") -> dict[str, str]:
        return {f: t for f, t in self.types.items() if f.startswith(prefix)}

    def labelsets(self, family: str) -> list[dict[str, str]]:
        return [dict(ls) for (f, ls) in self.values if f == family]


def parse(text: str) -> Scrape:
    values, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            # Counters' samples are named <family>_total by the parser; keep the family.
            if s.name not in (fam.name, fam.name + "_total"):
                continue
            values[(fam.name, tuple(sorted(s.labels.items())))] = s.value
    return Scrape(values, types)


def scrape(envoy) -> Scrape:
    status, body = envoy.admin_get("/stats/prometheus")
    assert status == 200, body[:200]
    return parse(body.decode())
