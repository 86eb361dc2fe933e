"""The live-events hub: publish from any thread, coalesced per window, bounded per subscriber (a slow one is dropped
to a resync, never blocks), Last-Event-ID replay or resync, close ends every subscription."""

from __future__ import annotations

import asyncio
import json
import threading

from nanofleet.controller.events import Event, FleetEvents, Subscription
from tests.conftest import until


async def _next(sub: Subscription, within: float = 5.0) -> Event:
    async def first() -> Event:
        async for event in sub:
            if event is not None:
                return event
        raise AssertionError("the subscription ended")

    return await asyncio.wait_for(first(), within)


async def test_device_events_from_many_threads_are_coalesced_into_one_batch() -> None:
    hub = FleetEvents(coalesce_s=0.2)
    async with hub.subscribe() as sub:
        def publish(start: int) -> None:
            for i in range(start, start + 500):
                hub.publish("device", {"device_id": f"d{i % 300:03d}", "state": "online", "thermal_level": "none"})

        threads = [threading.Thread(target=publish, args=(k * 500,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        event = await _next(sub)
        assert event.kind == "device"
        # 2,000 publishes of 300 devices: one event naming each device once (capped, the rest counted)
        assert len(event.data["ids"]) == hub.max_ids and event.data["ids"] == sorted(event.data["ids"])
        assert event.data["more"] == 300 - hub.max_ids
        assert hub.stats.published == 2000 and hub.stats.sent == 1
        text = event.sse()
        assert text.startswith(f"id: {hub.epoch}-1\nevent: device\ndata: ") and text.endswith("\n\n")
        assert json.loads(text.split("data: ", 1)[1])["more"] == 100


async def test_alert_and_audit_events_pass_in_order_after_the_devices() -> None:
    hub = FleetEvents(coalesce_s=0.01)
    async with hub.subscribe() as sub:
        hub.publish("alert", {"id": 1, "state": "raised"})
        hub.publish("device", {"device_id": "pi-1", "state": "online"})
        hub.publish("audit", {"action": "login"})
        kinds = [(await _next(sub)).kind for _ in range(3)]
    assert kinds == ["device", "alert", "audit"]


async def test_bad_events_are_refused_and_counted_not_raised() -> None:
    hub = FleetEvents(coalesce_s=0.01)
    async with hub.subscribe():
        hub.publish("weather", {"device_id": "x"})
        hub.publish("device", {"state": "online"})  # no device_id
    assert hub.stats.rejected == 2 and hub.stats.published == 0


async def test_a_slow_subscriber_is_dropped_to_a_resync_and_never_blocks_the_others() -> None:
    hub = FleetEvents(coalesce_s=0.001, queue_size=4)
    async with hub.subscribe() as slow, hub.subscribe() as fast:
        got: list[Event] = []
        for i in range(10):
            hub.publish("audit", {"n": i})
            got.append(await _next(fast))  # the fast one reads as it goes
        assert [e.data["n"] for e in got] == list(range(10))
        first = await _next(slow)
        assert first.kind == "resync" and first.data == {"reason": "overflow"}
        assert first.id == got[-1].id  # a reconnect after the resync resumes from the latest
        assert hub.stats.dropped == 10 and hub.stats.resyncs == 1
        hub.publish("audit", {"n": 10})
        assert (await _next(slow)).data == {"n": 10}  # back to normal after the resync


async def test_last_event_id_replays_what_was_missed_or_resyncs_when_the_gap_is_gone() -> None:
    hub = FleetEvents(coalesce_s=0.001, history=5)
    async with hub.subscribe() as sub:
        ids = []
        for i in range(8):
            hub.publish("audit", {"n": i})
            ids.append((await _next(sub)).id)
    async with hub.subscribe(ids[5]) as sub:  # within the last 5: events 6 and 7 again
        assert [(await _next(sub)).data["n"] for _ in range(2)] == [6, 7]
    async with hub.subscribe(ids[7]) as sub:  # up to date: nothing replayed
        hub.publish("audit", {"n": 8})
        assert (await _next(sub)).data == {"n": 8}
    for stale, reason in ((ids[0], "gap"), ("0badbeef-3", "restarted"), (f"{hub.epoch}-x", "bad_id"),
                          (f"{hub.epoch}-999", "gap")):
        async with hub.subscribe(stale) as sub:
            event = await _next(sub)
            assert (event.kind, event.data["reason"]) == ("resync", reason), stale


async def test_heartbeat_then_close_ends_every_subscription_from_another_thread() -> None:
    hub = FleetEvents(heartbeat_s=0.05)
    seen: list[object] = []

    async def listen() -> None:
        async with hub.subscribe() as sub:
            async for event in sub:
                seen.append(event)

    task = asyncio.create_task(listen())
    await until(lambda: None in seen, 5, "a heartbeat (None) while nothing happens")
    await asyncio.to_thread(hub.close)
    await asyncio.wait_for(task, 5)
    assert hub.stats.subscribers == 0
    async with hub.subscribe() as sub:  # after close: ends at once
        assert [e async for e in sub] == []
    hub.publish("audit", {"n": 1})  # nobody listens any more: accepted, not kept
    assert hub.stats.sent == 0


async def test_publish_before_any_listener_is_not_kept_and_after_the_loop_closed_does_not_raise() -> None:
    hub = FleetEvents()
    hub.publish("device", {"device_id": "d1"})  # no loop bound yet: nothing to keep
    assert hub.stats.published == 1 and hub.stats.sent == 0
    loop = asyncio.new_event_loop()
    hub.bind(loop)
    loop.close()
    hub.publish("device", {"device_id": "d1"})  # the loop is gone: counted, nothing raised
    hub.publish("device", {"device_id": "d2"})
    hub.close()
    assert hub.stats.published == 3


def test_a_batch_names_the_devices_whose_shown_state_changed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nanofleet.controller.store import Batch, Store, TelemetryRow

    with Store(tmp_path / "s.db") as store:
        def apply(*rows: TelemetryRow, rejections: list[tuple[str | None, str, str]] | None = None) -> dict:  # type: ignore[type-arg]
            return store.apply(Batch("f", 10_000, telemetry=list(rows), rejections=rejections or [])).changed

        first = apply(TelemetryRow("a", 0, 0, 1000), TelemetryRow("b", 0, 0, 1000))
        assert first == {d: {"state": "online", "thermal_level": "none", "throttled": False, "queue_depth": 0}
                         for d in ("a", "b")}
        assert apply(TelemetryRow("a", 0, 1, 2000, cpu_percent=50.0)) == {}  # a new CPU figure: nothing shown changed
        hot = apply(TelemetryRow("a", 0, 2, 3000, thermal_level=4, throttled=True), TelemetryRow("b", 0, 1, 3000))
        assert hot == {"a": {"state": "online", "thermal_level": "critical", "throttled": True, "queue_depth": 0}}
        assert set(apply(TelemetryRow("b", 0, 2, 4000, queue_depth=7))) == {"b"}
        assert set(apply(rejections=[("a", "t", "bad")])) == {"a"}
        stale = store.sweep_stale(at_ms=10_000_000)
        assert sorted(e.device_id for e in stale) == ["a", "b"]


async def test_a_stream_ends_when_its_session_expires_and_the_reconnect_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    import httpx

    from nanofleet.config import parse_fleet
    from nanofleet.controller.auth import ensure_operator_token
    from nanofleet.controller.store import Store
    from nanofleet.controller.web import create_app

    token, token_hash = ensure_operator_token(tmp_path / "data")
    with Store(tmp_path / "s.db") as store:
        app = create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, session_ttl_s=1.0)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            r = await c.post("/login", data={"token": token, "next": "/"})
            assert r.status_code == 303 and "nanofleet_session" in r.cookies
            started = time.monotonic()
            r = await asyncio.wait_for(c.get("/events"), 10)  # the whole stream: it ends at the session's expiry
            assert r.status_code == 200 and r.text.startswith("retry: 2000\n")
            assert 0.5 < time.monotonic() - started < 5
            r = await c.get("/events")  # the cookie has expired too (the client no longer sends it)
            assert r.status_code == 401 and r.json()["error"] in ("session_expired", "missing_token")
