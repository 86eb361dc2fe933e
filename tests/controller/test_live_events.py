"""`GET /events` over real HTTP (uvicorn on loopback, real mosquitto, real SQLite, the real ingest path): operator
auth, telemetry that changes a device's thermal level arrives as an event, a stale device too, `Last-Event-ID`
resumes, and stopping the controller ends open streams instead of hanging its graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from ctl_helpers import start_service, until

from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Parse text/event-stream into {"id", "event", "data", "retry", "comment"} dicts, one per blank-line block."""
    block: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if block:
                yield block
            block = {}
            continue
        field, _, value = line.partition(":")
        block[field or "comment"] = value.removeprefix(" ")


async def _next_device_event(stream: AsyncIterator[dict[str, str]]) -> dict[str, str]:
    """The next `device` event (alert and audit events — a policy published to a new device — pass by)."""
    async for event in stream:
        if event.get("event") == "device":
            return event
    raise AssertionError("the stream ended")


def _telemetry(device: str, seq: int, thermal: int) -> bytes:
    return json.dumps({"deviceId": device, "bdSeq": "0", "seq": seq, "tsMs": str(int(time.time() * 1000)),
                       "tempMaxC": 40 + 10 * thermal, "thermalLevel": thermal}).encode()


async def test_events_need_the_operator(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("live1", broker.url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            r = await c.get("/events")
            assert r.status_code == 401 and r.json()["error"] == "missing_token"
            r = await c.get("/events", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401 and r.json()["error"] == "invalid_token"
            r = await c.get("/events", headers={"Authorization": f"Bearer {token}", "Last-Event-ID": "x" * 65})
            assert r.status_code == 422 and "last-event-id" in r.text.lower()
            # a fragment carries the header's open-alert count (outside <main>) for the live page to update
            r = await c.get("/", headers={"Authorization": f"Bearer {token}", "X-Fragment": "1"})
            assert r.status_code == 200 and r.headers["x-open-alerts"] == "0" and "<header" not in r.text
    finally:
        await svc.stop()


async def test_a_device_heating_up_arrives_as_an_event_and_a_reconnect_resumes(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("live2", broker.url, tmp_path, sweep_every_s=0.1)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        await svc.ingest.wait_subscribed(5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as c, MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            async with c.stream("GET", "/events", headers=auth) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                stream = _events(r)
                first = await anext(stream)
                assert first["retry"] == "2000"
                await pub.publish(topics.telemetry("live2", "pi-hot"), _telemetry("pi-hot", 0, 0), qos=1)
                event = await asyncio.wait_for(_next_device_event(stream), 10)  # a new device: its state shown
                assert json.loads(event["data"])["ids"] == ["pi-hot"]
                await pub.publish(topics.telemetry("live2", "pi-hot"), _telemetry("pi-hot", 1, 0), qos=1)
                await pub.publish(topics.telemetry("live2", "pi-hot"), _telemetry("pi-hot", 2, 3), qos=1)
                sent = time.monotonic()
                event = await asyncio.wait_for(_next_device_event(stream), 10)
                took = time.monotonic() - sent
                assert json.loads(event["data"])["ids"] == ["pi-hot"]
                assert took < 2, f"telemetry to event took {took:.2f}s"
                assert svc.store.get_device("pi-hot").thermal_level == "severe"  # type: ignore[union-attr]
                last_id = event["id"]
            # the same thermal level again changes nothing shown: no event; missed events come back on a reconnect
            await pub.publish(topics.telemetry("live2", "pi-hot"), _telemetry("pi-hot", 3, 3), qos=1)
            await pub.publish(topics.telemetry("live2", "pi-cool"), _telemetry("pi-cool", 0, 0), qos=1)
            await until(lambda: svc.store.get_device("pi-cool") is not None, 10, "the second device")
            async with c.stream("GET", "/events", headers={**auth, "Last-Event-ID": last_id}) as r:
                stream = _events(r)
                await anext(stream)  # retry
                missed = await asyncio.wait_for(_next_device_event(stream), 10)
                assert json.loads(missed["data"])["ids"] == ["pi-cool"]
                # silence makes both stale (the sweep, told a device is stale after 0.2 s): one event names both
                svc.store.stale_factor = 0.02
                stale = await asyncio.wait_for(_next_device_event(stream), 10)
                assert sorted(json.loads(stale["data"])["ids"]) == ["pi-cool", "pi-hot"]
        assert svc.status()["events"]["sent"] >= 4
    finally:
        await svc.stop()


async def test_stopping_the_controller_ends_open_streams(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("live3", broker.url, tmp_path)
    auth = {"Authorization": f"Bearer {token}"}
    ended = asyncio.Event()

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as c, c.stream("GET", "/events", headers=auth) as r:
            async for _ in r.aiter_lines():
                pass
        ended.set()

    watchers = [asyncio.create_task(watch()) for _ in range(3)]
    stopped = False
    try:
        await until(lambda: svc.events.stats.subscribers == 3, 10, "three open streams")
        started = time.monotonic()
        await asyncio.wait_for(svc.stop(), 8)
        stopped = True
        assert time.monotonic() - started < 5
        await asyncio.wait_for(asyncio.gather(*watchers), 5)
        assert ended.is_set() and svc.events.stats.subscribers == 0
    finally:
        for w in watchers:
            w.cancel()
        if not stopped:
            svc.events.close()
            await svc.stop()
