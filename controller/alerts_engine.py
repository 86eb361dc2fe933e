"""The controller's alert engine: evaluates fleet.yaml's `alerts:` rules continuously (never when a page renders)
and stores the transitions (controller/alert_store.py) through the store's one writer.

A round reads, on a read connection, only what can raise or clear an alert: the devices already past a threshold
(the WHERE clause is the rules' pre-filter, so a calm fleet of 10,000 devices costs one scan in SQLite and no Python
per device), the device rejections within the window, the open alerts; every `budget_every_s` the gateway's usage
of today. The pure rules (controller/alerting.py) turn those into raise/clear transitions.

`run()` (a supervised task in ControllerService) evaluates every `every_s`, and sooner — within `poll_s` — when the
`changed()` counter moves (ingest's stored + rejected counts: a batch that changed devices committed), at most once
per `min_gap_s`: a device that heats shows a raised alert well within 2 s of its telemetry arriving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from nanofleet.config import FleetConfig
from nanofleet.protos.names import THERMAL_LEVELS

from . import alerting
from .alert_store import AlertStore, AlertView
from .alerting import DEVICE_KINDS, DeviceFacts

__all__ = ["AlertEngine"]

log = logging.getLogger(__name__)

_FACTS_SQL = """SELECT d.device_id, d.state, d.last_seen_ms, d.thermal_level, d.ram_available_mb, d.queue_depth,
        d.policy_version, p.version, p.published_ms
    FROM devices d LEFT JOIN policies p ON p.device_id = d.device_id
    WHERE d.state = 'stale' OR (d.state != 'online' AND d.last_seen_ms < ?)
       OR d.thermal_level >= ?
       OR (d.ram_available_mb > 0 AND d.ram_available_mb < ?)
       OR d.queue_depth >= ?
       OR (p.version IS NOT NULL AND p.version != d.policy_version AND p.published_ms < ?)"""
# qmark, not named, parameters: the one style both backends take (pg_db translates `?`)
_REJECTIONS_SQL = """SELECT device_id, sum(count), count(*) FROM rejections WHERE last_ms >= ? GROUP BY device_id"""


class AlertEngine:
    def __init__(self, alerts: AlertStore, config: FleetConfig, *,
                 usage: Callable[[str], list[Any] | None] | None = None, budget_every_s: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.alerts, self.config, self.usage = alerts, config, usage
        self.budget_every_s, self.clock = budget_every_s, clock
        self._next_budget = 0.0
        self._budgets: dict[str, int | None] = {}  # device -> its cloud_budget.tokens_per_day (config is frozen)
        self.rounds = 0
        self.failures = 0  # rounds that raised (logged with their traceback; the next round tries again)
        self.raised = 0
        self.cleared = 0
        self.last_round_ms = 0.0  # how long the last round took
        self.open = 0  # open alerts after the last round (for status() and metrics without a read)

    def status(self) -> dict[str, Any]:
        return {"open": self.open, "rounds": self.rounds, "failures": self.failures, "raised": self.raised,
                "cleared": self.cleared,
                "last_round_ms": round(self.last_round_ms, 2), "publish_errors": self.alerts.publish_errors}

    # -- one round (blocking: call from a worker thread) --------------------------------------------------------------
    def evaluate(self, now_ms: int | None = None) -> list[AlertView]:
        """One round: read the facts, decide, store the transitions; return the alerts that changed."""
        started = time.perf_counter()
        now = int(self.clock() * 1000) if now_ms is None else now_ms
        t = self.config.alerts
        args = (now - int(t.offline_after_s * 1000), THERMAL_LEVELS.index(t.thermal_at), t.min_free_ram_mb,
                t.queue_depth, now - int(t.policy_behind_s * 1000))  # silent before, thermal at, RAM, queue, behind
        window_from = now - int(t.rejections_window_s * 1000)

        def read(conn: Any) -> tuple[list[Any], list[Any]]:
            return (conn.execute(_FACTS_SQL, args).fetchall(),
                    conn.execute(_REJECTIONS_SQL, (window_from,)).fetchall())

        facts, rejected = self.alerts.store.read(read)
        conditions = [c for row in facts for c in alerting.device_conditions(DeviceFacts(*row), t, now)]
        conditions += alerting.rejection_conditions(((d or "", int(n), r) for d, n, r in rejected),
                                                    t.rejections_window_s)  # int: PostgreSQL's sum() is numeric
        kinds: set[str] = {*DEVICE_KINDS, "rejections"}
        if self.usage is not None and now / 1000 >= self._next_budget:
            budget = self._budget_conditions(now)
            if budget is not None:
                conditions += budget
                kinds.add("budget")
            self._next_budget = now / 1000 + self.budget_every_s
        open_alerts = self.alerts.open_alerts()
        changes = alerting.transitions(conditions, open_alerts, kinds)
        changed = self.alerts.apply(changes, now)
        self.rounds += 1
        raised = sum(1 for v in changed if v.state == "raised")
        cleared = sum(1 for v in changed if v.state == "cleared")
        self.raised, self.cleared = self.raised + raised, self.cleared + cleared
        self.open = len(open_alerts) + raised - cleared
        self.last_round_ms = (time.perf_counter() - started) * 1000
        return changed

    def _budget_conditions(self, now_ms: int) -> list[alerting.Condition] | None:
        """None when the controller runs without the gateway's usage db (the budget kind is then not evaluated)."""
        from .gateway.rules import utc_day  # the gateway's own rule for when a day's budget rolls over

        assert self.usage is not None
        rows = self.usage(utc_day(now_ms / 1000))
        if rows is None:
            return None
        used: dict[str, int] = {}
        for r in rows:
            used[r.device_id] = used.get(r.device_id, 0) + int(r.input_tokens) + int(r.output_tokens)
        return alerting.budget_conditions(used, _Budgets(self), self.config.gateway.budgets.fleet_tokens_per_day,
                                          self.config.alerts.budget_pct)

    def budget_of(self, device_id: str) -> int | None:
        if device_id not in self._budgets:
            self._budgets[device_id] = self.config.profile_for(device_id).routing.cloud_budget.tokens_per_day
        return self._budgets[device_id]

    # -- the continuous loop -------------------------------------------------------------------------------------
    async def run(self, *, every_s: float = 1.0, poll_s: float = 0.1, min_gap_s: float = 0.2,
                  changed: Callable[[], int] | None = None) -> None:
        """Evaluate forever: every `every_s`, and within `poll_s` of `changed()` moving (at most every min_gap_s).
        A failed round is logged and counted; the loop goes on (its supervisor restarts it if the loop itself dies)."""
        seen = changed() if changed is not None else 0
        last = 0.0
        while True:
            mono = time.monotonic()
            moved = changed is not None and changed() != seen
            if mono - last >= every_s or (moved and mono - last >= min_gap_s):
                seen = changed() if changed is not None else 0
                last = mono
                try:
                    await asyncio.to_thread(self.evaluate)
                except Exception:  # one failed round (e.g. the store busy): logged, counted, retried next tick
                    self.failures += 1
                    log.exception("alerts: evaluation round failed (retried in %.1f s)", every_s)
            await asyncio.sleep(poll_s)


class _Budgets(Mapping[str, int | None]):
    """The per-device budgets as the pure rule's mapping, looked up (and cached) only for devices with usage."""

    def __init__(self, engine: AlertEngine) -> None:
        self._engine = engine

    def __getitem__(self, device_id: str) -> int | None:
        return self._engine.budget_of(device_id)

    def __iter__(self) -> Any:
        return iter(self._engine._budgets)

    def __len__(self) -> int:
        return len(self._engine._budgets)
