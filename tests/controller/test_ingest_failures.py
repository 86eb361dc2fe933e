"""Ingest when the store cannot write: a real store made full (`PRAGMA max_page_count` on the writer's connection)
behind real mosquitto. A failed write is retried with backoff; what still fails is counted per reason — nothing the
broker handed over disappears without a count."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ctl_helpers import telemetry_count, until

from nanofleet.controller.ingest import Ingest, failure_reason
from nanofleet.controller.store import Store
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


def _cap(store: Store, extra_pages: int | None) -> None:
    """Caps the file's growth (None: lifts the cap). The job can share a batch with an ingest write that hits the cap:
    SQLite then rolls the whole transaction back and every job of the batch gets that write's SQLITE_FULL, this one
    included, run or not (nanofleet/sqlite_db.py), so it is sent again until it ran in a batch that committed."""
    def run(c: sqlite3.Connection) -> None:
        size = c.execute("PRAGMA page_count").fetchone()[0]
        c.execute(f"PRAGMA max_page_count = {size + extra_pages if extra_pages is not None else 2**30}")

    deadline = time.monotonic() + 10
    while True:
        try:
            store.submit(run).result()
            return
        except sqlite3.OperationalError as exc:
            if "full" not in str(exc) or time.monotonic() > deadline:
                raise


@contextlib.asynccontextmanager
async def _running(broker_url: str, tmp_path: Path, reader: str, attempts: int) -> AsyncIterator[Ingest]:
    store = Store(tmp_path / "full.db")
    ing = Ingest(store, "ingf", broker_url, transport=reader, write_attempts=attempts, write_retry_s=(0.1, 0.4))  # type: ignore[arg-type]
    await ing.start()
    await ing.wait_subscribed(5)
    try:
        yield ing
    finally:
        await ing.stop()
        store.close()


@pytest.fixture
async def ingest(broker, tmp_path: Path, reader: str) -> AsyncIterator[Ingest]:
    async with _running(broker.url, tmp_path, reader, 4) as ing:
        yield ing


async def _publish(broker_url: str, n: int, start: int) -> None:
    async with MqttClient(broker_url) as pub:
        await pub.wait_connected(5)
        for i in range(start, start + n):
            body = f'{{"tsMs": "{1_000_000 + i}", "seq": {i % 256}, "bdSeq": "1", "cpuPercent": 3}}'
            await pub.publish(topics.telemetry("ingf", f"d{i % 50:03d}"), body, qos=1)


async def test_writes_that_keep_failing_are_counted_per_reason(ingest: Ingest, broker) -> None:
    await _publish(broker.url, 1, 0)
    await until(lambda: ingest.stats.stored == 1, 10, "first row stored")
    _cap(ingest.store, 0)  # the file may not grow by a single page
    await _publish(broker.url, 300, 1)
    stats = ingest.stats
    await until(lambda: stats.dropped + stats.stored == 301, 20, f"every message stored or counted: {stats}")
    assert stats.dropped > 0 and set(stats.dropped_by_reason) == {"sqlite_full"}
    assert stats.write_retries >= 3  # each lost batch was tried write_attempts times
    assert telemetry_count(ingest.store) == stats.stored
    _cap(ingest.store, None)  # room again: ingest goes on
    await _publish(broker.url, 10, 400)
    await until(lambda: stats.stored + stats.dropped == 311, 10, "ingest works again")
    assert ingest.stats.as_dict()["dropped_by_reason"] == {"sqlite_full": stats.dropped}


@pytest.fixture
async def patient(broker, tmp_path: Path, reader: str) -> AsyncIterator[Ingest]:
    """Retries for ~10 s: "a moment" must outlast the test's own reaction on a loaded machine (with 4 attempts,
    all were spent before the test lifted the cap, and the batch was dropped)."""
    async with _running(broker.url, tmp_path, reader, 30) as ing:
        yield ing


async def test_a_write_that_fails_for_a_moment_is_retried_and_nothing_is_lost(patient: Ingest, broker) -> None:
    ingest = patient
    await _publish(broker.url, 1, 0)
    await until(lambda: ingest.stats.stored == 1, 10, "first row stored")
    _cap(ingest.store, 0)
    await _publish(broker.url, 300, 1)
    await until(lambda: ingest.stats.write_retries > 0, 10, "a failed write being retried")
    _cap(ingest.store, None)
    await until(lambda: ingest.stats.stored == 301, 20, f"all stored after the retry: {ingest.stats}")
    assert ingest.stats.dropped == 0 and telemetry_count(ingest.store) == 301


def test_failure_reasons_are_short_and_stable() -> None:
    conn = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.Error) as err:
        conn.execute("INSERT INTO nope VALUES (1)")
    assert failure_reason(err.value) == "sqlite_error"
    assert failure_reason(RuntimeError("x")) == "RuntimeError"


async def test_dropped_writes_show_in_status_and_metrics(broker, tmp_path: Path) -> None:
    """What the dashboard and /metrics read: the service's status() and its Prometheus registry."""
    from ctl_helpers import fleet

    from nanofleet.controller.metrics import render
    from nanofleet.controller.service import ControllerService

    # the stale sweep (every 0.5 s by default) is not what this test is about: a sweep job sharing a batch with a write
    # that fills the file gets its SQLITE_FULL too (nanofleet/sqlite_db.py), the sweep task dies and restarts, and a
    # death just as stop() begins is raised by stop(): it runs once an hour here
    svc = await ControllerService(fleet("ingf", broker.url), tmp_path / "ctl", sweep_every_s=3600).start()
    try:
        await svc.ingest.wait_subscribed(5)
        _cap(svc.store, 0)
        await _publish(broker.url, 200, 1)
        await until(lambda: svc.ingest.stats.dropped > 0 and not svc.ingest.backlog, 30, "a batch dropped")
        status = svc.status()
        assert status["ingest"]["dropped_by_reason"] == {"sqlite_full": svc.ingest.stats.dropped}
        assert status["store"]["commit_errors"] + status["store"]["state_reloads"] > 0
        text = render(svc.metrics).decode()
        assert f'nanofleet_controller_ingest_dropped_total{{reason="sqlite_full"}} {svc.ingest.stats.dropped}.0' in text
        # a stale sweep that shared a transaction with a failed batch failed with it (logged, counted, restarted
        # after 0.5 s): running again by then, and the controller up all along
        await until(lambda: 'nanofleet_controller_task_running{task="sweep"} 1.0' in render(svc.metrics).decode(),
                    10, "the sweep task running")
        assert "nanofleet_controller_up 1.0" in render(svc.metrics).decode()
    finally:
        _cap(svc.store, None)
        await svc.stop()
