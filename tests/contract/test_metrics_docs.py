"""docs/operations.md's "Monitoring" tables name every metric the controller and the gateway expose, with its type,
and nothing they do not expose."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from nanofleet.controller.gateway.metrics import GatewayMetrics
from nanofleet.controller.metrics import FleetCounts, registry_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _exposed(registry: CollectorRegistry) -> dict[str, str]:
    """Metric name as a scrape shows it (counters with `_total`) -> type."""
    return {m.name + ("_total" if m.type == "counter" else ""): m.type for m in registry.collect()}


def _documented() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    part = text[text.index("## Monitoring"):text.index("### Live dashboard")]
    return {name: kind for name, kind in re.findall(r"^\| `(nanofleet_[a-z_]+)` \| (\w+)", part, flags=re.M)}


def test_every_exposed_metric_is_documented_with_its_type_and_nothing_else() -> None:
    controller = registry_for(lambda: {}, web_errors={}, fleet=lambda: FleetCounts(alerts={}))
    gateway = GatewayMetrics()
    gateway.watch(lambda: 0, lambda: 0)
    exposed = _exposed(controller) | _exposed(gateway.registry)
    assert len(exposed) > 30
    documented = _documented()
    assert sorted(set(exposed) - set(documented)) == [], "metrics docs/operations.md does not name"
    assert sorted(set(documented) - set(exposed)) == [], "documented metrics nobody exposes"
    assert {n: t for n, t in exposed.items() if documented[n] != t} == {}, "documented with another type"
