"""Helpers for controller tests (`until` is the shared one from tests/conftest.py), and the store inspections only
tests need: they read through the store's public `read()` rather than widening the store's API for tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanofleet.config import FleetConfig, parse_fleet
from nanofleet.controller.service import ControllerService
from nanofleet.controller.store import Batch, Store
from tests.conftest import until, wait_for

__all__ = ["StoreUrls", "command_results", "fleet", "flush_rollups", "prune", "reject", "rejection_total",
           "telemetry_count", "telemetry_keys", "until", "wait_for"]


def fleet(name: str, broker_url: str, extra: str = "") -> FleetConfig:
    return parse_fleet(f"fleet: {name}\nbroker: {{url: {broker_url}}}\n{extra}")


async def start_service(name: str, broker_url: str, tmp_path: Path,
                        **kw: object) -> tuple[ControllerService, str, str]:
    """A running ControllerService of fleet `name`, its dashboard on a loopback port the kernel picks at bind (no
    race for a free one): (service, base url, the operator token it printed)."""
    lines: list[str] = []
    svc = await ControllerService(fleet(name, broker_url), tmp_path / "ctl", listen="127.0.0.1:0",
                                  echo=lines.append, **kw).start()  # type: ignore[arg-type]
    token = next(line.split()[2] for line in lines if line.startswith("operator token:"))
    return svc, f"http://127.0.0.1:{svc.web_port}", token


def telemetry_keys(store: Store, device_id: str | None = None) -> list[tuple[str, int, int, int]]:
    """(device_id, bd_seq, seq, ts_ms) of every stored row: what tests use to prove nothing is stored twice."""
    sql, args = "SELECT device_id, bd_seq, seq, ts_ms FROM telemetry", ()
    if device_id is not None:
        sql, args = sql + " WHERE device_id = ?", (device_id,)
    return [tuple(r) for r in store.read(lambda c: c.execute(sql + " ORDER BY device_id, ts_ms", args).fetchall())]


def telemetry_count(store: Store) -> int:
    return store.read(lambda c: c.execute("SELECT count(*) FROM telemetry").fetchone()[0])


def rejection_total(store: Store) -> int:
    return store.read(lambda c: c.execute("SELECT coalesce(sum(count), 0) FROM rejections").fetchone()[0])


def command_results(store: Store, command_id: str) -> list[tuple[str, str, dict[str, str]]]:
    rows = store.read(lambda c: c.execute(
        "SELECT status, message, data_json FROM command_results WHERE id = ? ORDER BY ts_ms", (command_id,)).fetchall())
    return [(r[0], r[1], json.loads(r[2])) for r in rows]


def reject(store: Store, device_id: str | None, topic: str, reason: str, at_ms: int | None = None) -> None:
    """A rejection as ingest records it (through a batch)."""
    at = int(time.time() * 1000) if at_ms is None else at_ms
    store.apply(Batch("", at, rejections=[(device_id, topic, reason)]))


def flush_rollups(store: Store) -> None:
    """Roll up now what the writer's housekeeping would roll up on its next tick."""
    store.submit(lambda c: store._flush_rollups(c)).result()


def prune(store: Store, at_ms: int) -> Any:
    """Apply retention as of `at_ms`, chunk after chunk, as the housekeeping does."""
    while store.submit(lambda c: store._prune(c, at_ms)).result():
        pass


class StoreUrls:
    """Fresh, empty store URLs on one backend (`backend`: 'sqlite' or 'postgresql'), one per call."""

    def __init__(self, backend: str, make: Callable[[], str]) -> None:
        self.backend, self._make = backend, make

    def __call__(self) -> str:
        return self._make()
