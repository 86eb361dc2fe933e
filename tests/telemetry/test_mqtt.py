"""nanofleet.mqtt against a real mosquitto: publish/receive, acks, last will on a cut connection, reconnect."""

from __future__ import annotations

import asyncio

import pytest

from nanofleet.mqtt import MqttClient, MqttNotConnected, MqttUrlError, Will, parse_broker_url


def test_parse_broker_url() -> None:
    assert parse_broker_url("mqtt://127.0.0.1") == ("127.0.0.1", 1883, False)
    assert parse_broker_url("mqtts://h:1") == ("h", 1, True)
    for bad in ("http://h", "mqtt://", "mqtt://h:x"):
        with pytest.raises(MqttUrlError, match="broker url"):
            parse_broker_url(bad)


async def test_publish_subscribe_and_acks(broker) -> None:
    async with MqttClient(broker.url) as sub, MqttClient(broker.url) as pub:
        sub.subscribe([("t/mqtt1/#", 1)])
        await asyncio.gather(sub.wait_connected(5), pub.wait_connected(5))
        await asyncio.sleep(0)  # subscription was sent in on_connect or just now; SUBACK below proves it
        await asyncio.wait_for(pub.publish("t/mqtt1/probe", b"x", qos=1, retain=True), 5)
        it = sub.messages()
        first = await asyncio.wait_for(anext(it), 5)
        assert first.topic == "t/mqtt1/probe"
        futs = [pub.publish("t/mqtt1/a", str(i).encode(), qos=1) for i in range(50)]
        await asyncio.wait_for(asyncio.gather(*futs), 5)
        got = [int((await asyncio.wait_for(anext(it), 5)).payload) for _ in range(50)]
        assert got == list(range(50))
        await pub.publish("t/mqtt1/probe", b"", qos=1, retain=True)


async def test_qos0_publish_while_disconnected_raises(make_broker) -> None:
    b = make_broker()
    lost = asyncio.Event()
    c = MqttClient(b.url, backoff=(0.05, 0.2), on_disconnect=lost.set)
    await c.start()
    await c.wait_connected(5)
    b.stop()
    await asyncio.wait_for(lost.wait(), 5)
    with pytest.raises(MqttNotConnected):
        c.publish("t/x", b"1", qos=0)
    b.start()
    await c.wait_connected(10)
    assert c.connects == 2
    await c.stop()


async def test_last_will_fires_on_abort_not_on_stop(broker) -> None:
    async with MqttClient(broker.url) as watcher:
        watcher.subscribe([("t/will/+", 1)])
        await watcher.wait_connected(5)
        it = watcher.messages()
        wills = iter(range(100))
        a = MqttClient(broker.url, will=lambda: Will("t/will/a", f"dead{next(wills)}".encode(), 1, False))
        b = MqttClient(broker.url, will=Will("t/will/b", b"dead", 1, False))
        await a.start()
        await b.start()
        await asyncio.gather(a.wait_connected(5), b.wait_connected(5))
        await b.stop()  # clean: no will
        await a.abort()  # cut: will
        msg = await asyncio.wait_for(anext(it), 5)
        assert (msg.topic, msg.payload) == ("t/will/a", b"dead0")
        # b's clean stop came first: had it fired a will, that would be here before a marker sent now
        await watcher.publish("t/will/marker", b"m", qos=1)
        assert (await asyncio.wait_for(anext(it), 5)).topic == "t/will/marker"
