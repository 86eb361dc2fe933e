"""The controller's Prometheus metrics, read from `ControllerService.status()` at each scrape — one source of truth,
no second set of counters to keep in step. The web layer serves `render(registry)` at `/metrics`.

Exposed (all prefixed `nanofleet_controller_`): `up` (0 once a fatal part died), `broker_connected`,
`ingest_received_total`, `ingest_stored_total`, `ingest_duplicates_total`, `ingest_rejected_total`, `ingest_gaps_total`,
`ingest_batches_total`, `ingest_write_retries_total`, `ingest_dropped_total{reason}` (messages lost after the
retries, by SQLite error name), `ingest_backlog`, `task_running{task}`, `task_deaths_total{task}`,
`store_errors_total{kind}` (commit, housekeeping, checkpoint), `store_state_reloads_total`,
`policy_failures_total` (policy publishing rounds that failed), `command_issues_total{reason}` (fire_not_sent,
results_rejected, results_unclaimed) and, from the web layer, `web_errors_total{code}`
(answers given for bugs: 500 internal_error, each logged with an error id).
Rejections by reason are not labels (a reason may quote the payload's schema error): the dashboard lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "ControllerCollector", "WebErrorsCollector", "registry_for", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "nanofleet_controller_"
_INGEST_COUNTERS = (("received", "MQTT messages ingest took from the broker"),
                    ("stored", "telemetry rows written"),
                    ("duplicates", "telemetry rows already stored (replays)"),
                    ("rejected", "payloads refused (malformed, wrong topic); listed by reason on the dashboard"),
                    ("gaps", "Sparkplug seq gaps seen"),
                    ("batches", "batches committed"),
                    ("write_retries", "store writes tried again after a failure"))


class ControllerCollector(Collector):
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        yield _gauge("up", "1 while no part the controller needs has died", 0 if s.get("failed") else 1)
        yield _gauge("broker_connected", "1 while the ingest subscription is up", int(bool(s.get("broker_connected"))))
        ingest = s.get("ingest") or {}
        for key, doc in _INGEST_COUNTERS:
            yield CounterMetricFamily(f"{_P}ingest_{key}", doc, value=ingest.get(key, 0))
        dropped = CounterMetricFamily(f"{_P}ingest_dropped", "messages lost: their batch could not be written after "
                                      "the retries, by SQLite error name", labels=["reason"])
        for reason, n in sorted((ingest.get("dropped_by_reason") or {}).items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield _gauge("ingest_backlog", "messages received and not yet decoded", ingest.get("backlog", 0))
        tasks = s.get("tasks") or {}
        running = GaugeMetricFamily(f"{_P}task_running", "1 while the supervised task runs", labels=["task"])
        deaths = CounterMetricFamily(f"{_P}task_deaths", "times the supervised task died", labels=["task"])
        names = set(tasks.get("running", ())) | set(tasks.get("deaths", {}))
        for name in sorted(names):
            running.add_metric([name], int(name in tasks.get("running", ())))
            deaths.add_metric([name], tasks.get("deaths", {}).get(name, {}).get("count", 0))
        yield running
        yield deaths
        store = s.get("store") or {}
        errors = CounterMetricFamily(f"{_P}store_errors", "store failures by kind (each logged)", labels=["kind"])
        for kind in ("commit", "housekeeping", "checkpoint"):
            errors.add_metric([kind], store.get(f"{kind}_errors", 0))
        yield errors
        yield CounterMetricFamily(f"{_P}store_state_reloads", "device state reloaded from the file after a rollback",
                                  value=store.get("state_reloads", 0))
        policy = s.get("policy") or {}
        yield CounterMetricFamily(f"{_P}policy_failures", "policy publishing rounds that failed (each logged)",
                                  value=policy.get("failures", 0))
        issues = CounterMetricFamily(f"{_P}command_issues", "commands not sent and results not used, by reason",
                                     labels=["reason"])
        commands = s.get("commands") or {}
        for reason in ("fire_not_sent", "results_rejected", "results_unclaimed"):
            issues.add_metric([reason], commands.get(reason, 0))
        yield issues


class WebErrorsCollector(Collector):
    """The web layer's answers for bugs, by code (`app.state.errors`), read live at each scrape."""

    def __init__(self, errors: Mapping[str, int]) -> None:
        self._errors = errors

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(f"{_P}web_errors", "answers the dashboard/API gave for bugs (500, logged with "
                                     "an error id), by code", labels=["code"])
        counts = {"internal_error": 0, **self._errors}  # the series exists before the first bug: alerts can rate() it
        for code, n in sorted(counts.items()):
            family.add_metric([code], n)
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{_P}{name}", doc, value=value)


def registry_for(status: Callable[[], Mapping[str, Any]] | None,
                 web_errors: Mapping[str, int] | None = None) -> CollectorRegistry:
    """A registry holding only the controller's collectors (not the process-global default one): the service's
    status when given, the web layer's error counts when given."""
    registry = CollectorRegistry(auto_describe=True)
    if status is not None:
        registry.register(ControllerCollector(status))
    if web_errors is not None:
        registry.register(WebErrorsCollector(web_errors))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format, served with CONTENT_TYPE."""
    return generate_latest(registry)
