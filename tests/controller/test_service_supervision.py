"""The controller's tasks are supervised: a dying sweep is restarted and shown in status(), a dead ingest thread
stops the service loudly, and stop() raises what failed while stopping instead of swallowing it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ctl_helpers import fleet, until

from nanofleet.controller.service import ControllerService
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


async def test_a_dying_sweep_is_restarted_and_its_death_shown(broker, tmp_path: Path) -> None:
    svc = await ControllerService(fleet("sup1", broker.url), tmp_path / "ctl", sweep_every_s=0.05).start()
    try:
        store = svc.store
        real, calls = store.sweep_stale, []

        def flaky(at_ms: int | None = None) -> list:  # type: ignore[type-arg]
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("sweep bug")
            return real(at_ms)

        store.sweep_stale = flaky  # type: ignore[method-assign]
        await until(lambda: len(calls) >= 3, 10, "the sweep running again after its death")
        status = svc.status()
        assert status["tasks"]["deaths"]["sweep"]["count"] == 1
        assert "RuntimeError: sweep bug" in status["tasks"]["deaths"]["sweep"]["error"]
        assert "sweep" in status["tasks"]["running"] and status["ok"]
    finally:
        await svc.stop()


async def test_a_dead_ingest_thread_fails_the_service(broker, tmp_path: Path) -> None:
    svc = await ControllerService(fleet("sup2", broker.url), tmp_path / "ctl").start()
    try:
        await svc.ingest.wait_subscribed(5)

        def broken(items: list) -> None:  # type: ignore[type-arg]
            raise TypeError("decode bug")

        svc.ingest.decode = broken  # type: ignore[method-assign]
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            await pub.publish(topics.telemetry("sup2", "d1"), b'{"tsMs": "1"}', qos=1)
        name, exc = await asyncio.wait_for(svc.wait_failed(), 10)
        assert name == "ingest" and isinstance(exc, TypeError)
        assert svc.status()["ok"] is False and svc.status()["failed"]["task"] == "ingest"
    finally:
        await svc.stop()


async def test_stop_raises_what_failed_while_stopping_and_still_closes_the_store(broker, tmp_path: Path) -> None:
    svc = await ControllerService(fleet("sup3", broker.url), tmp_path / "ctl").start()
    started = asyncio.Event()

    async def bad_cleanup() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            raise OSError("flush on the way out failed")

    svc.tasks.spawn(bad_cleanup, "flusher")
    await started.wait()
    with pytest.raises(ExceptionGroup) as err:
        await svc.stop()
    assert [str(e) for e in err.value.exceptions] == ["flush on the way out failed"]
    assert svc.store.db.closed


async def test_policy_publishing_that_fails_is_logged_and_counted(make_broker, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    b = make_broker()
    svc = await ControllerService(fleet("sup4", b.url, "devices: {d1: {}}"), tmp_path / "ctl").start()
    try:
        await until(lambda: "d1" in svc.store.published_policies(), 10, "d1's first policy published")
        b.stop()
        await until(lambda: not svc.ingest.connected, 10, "controller sees the broker gone")
        await svc._publish_policies(republish=True)  # what a (re)connect runs; the broker is gone: refused at once
        assert svc.status()["policy"]["failures"] == 1
        assert "policy publishing failed (MqttNotConnected" in caplog.text
    finally:
        await svc.stop()
