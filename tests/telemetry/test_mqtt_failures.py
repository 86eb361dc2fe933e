"""nanofleet.mqtt's failures are seen: a failing sink or hook, a refused or abandoned publish, reconnect pacing."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from nanofleet.controller.mqtt_reader import MqttReader
from nanofleet.mqtt import MqttClient, MqttNotConnected
from tests.conftest import until


@pytest.mark.parametrize("kind", ["paho", "reader"])
async def test_reconnects_follow_the_one_backoff_rule(kind: str) -> None:
    """Equal jitter: a retry never comes sooner than half its step (full jitter would allow ~0)."""
    accepts: list[float] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepts.append(time.monotonic())
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    url = f"mqtt://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = (MqttClient(url, backoff=(0.3, 0.3)) if kind == "paho"
              else MqttReader(url, [("x/#", 0)], lambda m: None, backoff=(0.3, 0.3)))
    try:
        await client.start() if isinstance(client, MqttClient) else client.start()
        await until(lambda: len(accepts) >= 9, 20, "nine connection attempts")
        gaps = [b - a for a, b in itertools.pairwise(accepts)]
        assert min(gaps) >= 0.14, gaps
    finally:
        await client.stop() if isinstance(client, MqttClient) else await asyncio.to_thread(client.stop)
        server.close()
        await server.wait_closed()


async def test_a_failing_sink_is_logged_counted_and_messages_keep_coming(broker, caplog) -> None:
    got: list[bytes] = []

    def sink(msg: object) -> None:
        payload = msg.payload  # type: ignore[attr-defined]
        if payload == b"boom":
            raise ValueError("sink bug")
        got.append(payload)

    async with MqttClient(broker.url) as pub:
        await pub.wait_connected(5)
        await asyncio.wait_for(pub.publish("t/fail1/a", b"boom", qos=1, retain=True), 5)  # arrives on subscribe
        async with MqttClient(broker.url, sink=sink) as sub:
            sub.subscribe([("t/fail1/#", 1)])
            await sub.wait_connected(5)
            await until(lambda: sub.failures["sink"] == 1, 10, "the failing message")
            for _ in range(50):  # (a publish may overtake the SUBSCRIBE at the broker: repeat until one is in)
                await asyncio.wait_for(pub.publish("t/fail1/b", b"after", qos=1), 5)
                if b"after" in got:
                    break
                await asyncio.sleep(0.1)
            await until(lambda: b"after" in got, 10, "a message after the failing one")
            assert sub.failures["sink"] == 1
            assert "sink bug" in (sub.last_error or "")
        await pub.publish("t/fail1/a", b"", qos=1, retain=True)
    assert any("sink bug" in r.getMessage() or "sink bug" in (r.exc_text or "") for r in caplog.records
               if r.levelno >= logging.ERROR)


async def test_failing_connection_hooks_are_logged_and_counted(broker, caplog) -> None:
    def sync_hook(session_present: bool) -> None:
        raise RuntimeError("sync hook bug")

    async def async_hook() -> None:
        raise RuntimeError("async hook bug")

    c = MqttClient(broker.url, on_connect=sync_hook, on_disconnect=async_hook)
    await c.start()
    await c.wait_connected(5)
    await until(lambda: c.failures["hook"] >= 1, 5, "the sync hook's failure counted")
    c.drop()
    await until(lambda: c.failures["hook"] >= 2, 10, "the async hook's failure counted")
    await c.stop()
    text = " ".join(r.getMessage() + (r.exc_text or "") for r in caplog.records if r.levelno >= logging.ERROR)
    assert "sync hook bug" in text and "async hook bug" in text


async def test_a_publish_abandoned_by_stop_fails_instead_of_vanishing(make_broker) -> None:
    b = make_broker()
    c = MqttClient(b.url, backoff=(0.05, 0.1))
    await c.start()
    await c.wait_connected(5)
    b.stop()
    await until(lambda: not c.connected, 5, "the client noticed")
    fut = c.publish("t/abandoned", b"x", qos=1)  # queued by paho, never acknowledged
    await c.stop()
    with pytest.raises(MqttNotConnected, match="stopped"):
        await asyncio.wait_for(fut, 1)


async def test_fire_and_forget_while_offline_queued_once_or_refused_loudly(make_broker, caplog) -> None:
    """QoS 1 while offline: paho queues it and sends it on reconnect, so it is reported as taken (a False here made
    callers buffer it a second time); past paho's queue it is refused, counted and logged."""
    b = make_broker()
    c = MqttClient(b.url, backoff=(0.05, 0.1), max_queued=1)
    await c.start()
    await c.wait_connected(5)
    b.stop()
    await until(lambda: not c.connected, 5, "the client noticed")
    results = [c.publish_nowait("t/refused", f"m{i}".encode(), qos=1, retain=True) for i in range(3)]
    assert results == [True, False, False]
    assert c.failures["publish"] == 2
    assert any("t/refused" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    b.start()
    async with MqttClient(b.url) as sub:
        sub.subscribe([("t/refused", 1)])
        await sub.wait_connected(5)
        await c.wait_connected(10)  # (retained: it reaches the subscriber whichever connects first)
        first = await asyncio.wait_for(anext(sub.messages()), 10)
        assert first.payload == b"m0"
    await c.stop()
