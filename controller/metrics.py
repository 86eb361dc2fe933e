"""The controller's Prometheus metrics, read from `ControllerService.status()` at each scrape — one source of truth,
no second set of counters to keep in step. The web layer serves `render(registry)` at `/metrics`.

Exposed (all prefixed `nanofleet_controller_`): `up` (0 once a fatal part died), `broker_connected`, `leader` (1 while
this controller does the once-per-fleet work, controller/leader.py), `stored_gaps_total` (missing seqs judged from
stored rows under `$share`),
`ingest_received_total`, `ingest_stored_total`, `ingest_duplicates_total`, `ingest_rejected_total`, `ingest_gaps_total`,
`ingest_batches_total`, `ingest_write_retries_total`, `ingest_dropped_total{reason}` (messages lost after the
retries, by SQLite error name), `ingest_backlog`, `task_running{task}`, `task_deaths_total{task}`,
`store_errors_total{kind}` (commit, housekeeping, checkpoint), `store_state_reloads_total`,
`policy_failures_total` (policy publishing rounds that failed), `command_issues_total{reason}` (fire_not_sent,
results_rejected, results_unclaimed) and, from the web layer, `web_errors_total{code}`
(answers given for bugs: 500 internal_error, each logged with an error id); `ingest_hook_errors_total`,
`ingest_lag_seconds{stat}` (the latest batch's received-minus-device-timestamp, mean and max of its live rows),
`events_subscribers`, `events_sent_total`, `events_dropped_total`, `events_resyncs_total` (the live dashboard's
streams, controller/events.py). From the store at scrape time (`FleetCollector`, one GROUP BY each):
`devices{state}`, `devices_thermal{level}` (devices not offline, by their latest thermal level) and
`alerts_open{kind,state}` (raised or acknowledged; absent before the alerts table exists).
Rejections by reason are not labels (a reason may quote the payload's schema error): the dashboard lists them.
docs/operations.md ("Monitoring") names every metric; a test holds it to this exposition.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanofleet.pg_db import dialect
from nanofleet.protos.names import THERMAL_LEVELS, thermal_name

__all__ = ["CONTENT_TYPE", "ControllerCollector", "FleetCollector", "FleetCounts", "WebErrorsCollector",
           "fleet_counts", "registry_for", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_P = "nanofleet_controller_"
_INGEST_COUNTERS = (("received", "MQTT messages ingest took from the broker"),
                    ("stored", "telemetry rows written"),
                    ("duplicates", "telemetry rows already stored (replays)"),
                    ("rejected", "payloads refused (malformed, wrong topic); listed by reason on the dashboard"),
                    ("gaps", "Sparkplug seq gaps seen"),
                    ("batches", "batches committed"),
                    ("write_retries", "store writes tried again after a failure"),
                    ("hook_errors", "the live-events listener failed after a batch (logged)"))
_STATES = ("online", "stale", "offline")
_ALERT_STATES = ("raised", "acknowledged")


class ControllerCollector(Collector):
    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        yield _gauge("up", "1 while no part the controller needs has died", 0 if s.get("failed") else 1)
        yield _gauge("broker_connected", "1 while the ingest subscription is up", int(bool(s.get("broker_connected"))))
        yield _gauge("leader", "1 while this controller leads the fleet (alerts, rollouts, policy, sweep, gaps)",
                     int(bool((s.get("leader") or {}).get("is_leader"))))
        yield CounterMetricFamily(f"{_P}stored_gaps", "missing telemetry seqs judged from the stored rows ($share)",
                                  value=(s.get("gaps") or {}).get("missing", 0))
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
        lag = GaugeMetricFamily(f"{_P}ingest_lag_seconds", "the latest batch's ingest lag (received minus the "
                                "device's timestamp) over its live rows", labels=["stat"])
        for stat in ("mean", "max"):
            value = ingest.get(f"lag_ms_{stat}")
            if value is not None:
                lag.add_metric([stat], value / 1000)
        yield lag
        events = s.get("events") or {}
        yield _gauge("events_subscribers", "open /events streams (live dashboard pages)", events.get("subscribers", 0))
        for key, doc in (("sent", "live events sent (each to every open stream)"),
                         ("dropped", "live events dropped from a slow stream's full queue (it got a resync)"),
                         ("resyncs", "resync events sent (a slow stream, or a reconnect past the history)")):
            yield CounterMetricFamily(f"{_P}events_{key}", doc, value=events.get(key, 0))


@dataclass
class FleetCounts:
    """Devices by state and by thermal level, open alerts by (kind, state); None: no alerts table (yet)."""

    states: dict[str, int] = field(default_factory=dict)
    thermal: dict[str, int] = field(default_factory=dict)
    alerts: dict[tuple[str, str], int] | None = None


def fleet_counts(conn: sqlite3.Connection) -> FleetCounts:
    """One GROUP BY over the devices (and one over the open alerts when the table exists): cheap at each scrape."""
    counts = FleetCounts()
    for state, level, n in conn.execute("SELECT state, thermal_level, count(*) FROM devices GROUP BY 1, 2"):
        counts.states[state] = counts.states.get(state, 0) + n
        if state != "offline":
            name = thermal_name(level)
            counts.thermal[name] = counts.thermal.get(name, 0) + n
    if _has_alerts(conn):
        counts.alerts = {(kind, state): n for kind, state, n in conn.execute(
            "SELECT kind, state, count(*) FROM alerts WHERE state != 'cleared' GROUP BY 1, 2")}
    return counts


def _has_alerts(conn: sqlite3.Connection) -> bool:
    if dialect(conn) == "postgresql":
        return bool(conn.execute("SELECT to_regclass('alerts') IS NOT NULL").fetchone()[0])
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'").fetchone() is not None


class FleetCollector(Collector):
    """The fleet as the store has it, read at each scrape."""

    def __init__(self, read: Callable[[], FleetCounts]) -> None:
        self._read = read

    def describe(self) -> Iterator[Metric]:
        """The families without reading the store (registering must not touch a store that may be closed)."""
        yield GaugeMetricFamily(f"{_P}devices", "devices by state", labels=["state"])
        yield GaugeMetricFamily(f"{_P}devices_thermal", "devices by thermal level", labels=["level"])
        yield GaugeMetricFamily(f"{_P}alerts_open", "open alerts", labels=["kind", "state"])

    def collect(self) -> Iterator[Metric]:
        c = self._read()
        states = GaugeMetricFamily(f"{_P}devices", "devices by state", labels=["state"])
        for state in sorted(set(_STATES) | set(c.states)):
            states.add_metric([state], c.states.get(state, 0))
        yield states
        thermal = GaugeMetricFamily(f"{_P}devices_thermal", "devices not offline by their latest thermal level",
                                    labels=["level"])
        for level in THERMAL_LEVELS:
            thermal.add_metric([level], c.thermal.get(level, 0))
        yield thermal
        if c.alerts is not None:
            alerts = GaugeMetricFamily(f"{_P}alerts_open", "alerts raised or acknowledged, not cleared, by kind",
                                       labels=["kind", "state"])
            for (kind, state), n in sorted(c.alerts.items()):
                alerts.add_metric([kind, state], n)
            yield alerts


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
                 web_errors: Mapping[str, int] | None = None,
                 fleet: Callable[[], FleetCounts] | None = None) -> CollectorRegistry:
    """A registry holding only the controller's collectors (not the process-global default one): the service's
    status, the web layer's error counts and the store's fleet counts, each when given."""
    registry = CollectorRegistry(auto_describe=True)
    if status is not None:
        registry.register(ControllerCollector(status))
    if web_errors is not None:
        registry.register(WebErrorsCollector(web_errors))
    if fleet is not None:
        registry.register(FleetCollector(fleet))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format, served with CONTENT_TYPE."""
    return generate_latest(registry)
