"""The fast subscriber's packet parser (pure, any split of the byte stream) and the client against mosquitto."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from nanofleet.mqtt import MqttClient
from nanofleet.mqtt_subscriber import AsyncPublisher, FastSubscriber, parse, publish_packet

messages = st.lists(st.tuples(st.text(min_size=1, max_size=20).filter(lambda t: "\x00" not in t),
                              st.binary(max_size=300), st.sampled_from([0, 1])), max_size=12)


@given(messages, st.lists(st.integers(1, 50), max_size=30))
def test_parse_any_split(msgs: list[tuple[str, bytes, int]], cuts: list[int]) -> None:
    stream = b"".join(publish_packet(t, p, q, False, i + 2) for i, (t, p, q) in enumerate(msgs))
    stream += b"\x90\x03\x00\x01\x01" + b"\xd0\x00" + b"\x40\x02\x00\x07"  # SUBACK, PINGRESP, PUBACK 7
    buf, out, acks, pubacks, other = bytearray(), [], [], [], []
    pos = 0
    for cut in [*cuts, len(stream)]:
        buf += stream[pos:pos + cut]
        pos += cut
        used, seen = parse(buf, out, acks, pubacks)
        del buf[:used]
        other += seen
        if pos >= len(stream):
            break
    buf += stream[pos:]
    used, seen = parse(buf, out, acks, pubacks)
    del buf[:used]
    other += seen
    assert not buf
    assert out == [(t, p) for t, p, _ in msgs]
    assert acks == [b"\x40\x02" + (i + 2).to_bytes(2, "big") for i, (_, _, q) in enumerate(msgs) if q]
    assert pubacks == [7] and 9 in other and 13 in other and -9 not in other


def test_refused_subscription_is_flagged() -> None:
    _, other = parse(bytearray(b"\x90\x03\x00\x01\x80"), [], [])
    assert -9 in other


async def test_receives_publishes_and_reconnects(make_broker) -> None:
    b = make_broker()
    got: list[tuple[str, bytes]] = []
    ups: list[bool] = []
    sub = FastSubscriber(b.url, [("fs/#", 1)], got.extend, on_connection=ups.append, backoff=(0.05, 0.2))
    pub_face = AsyncPublisher(sub)
    await pub_face.start()
    async with MqttClient(b.url) as other:
        other.subscribe([("fs/echo", 1)])
        await other.wait_connected(5)
        for _ in range(250):
            if sub.connected:  # set on SUBACK: from here on nothing published is missed
                break
            await asyncio.sleep(0.02)
        assert sub.connected
        await asyncio.gather(*(other.publish(f"fs/{i}", bytes([i]) * 100, qos=i % 2) for i in range(200)))
        await asyncio.wait_for(pub_face.publish("fs/echo", b"from the subscriber", qos=1), 5)
        it = other.messages()
        assert (await asyncio.wait_for(anext(it), 5)).payload == b"from the subscriber"
        for _ in range(250):
            if len(got) >= 201:
                break
            await asyncio.sleep(0.02)
        # (mosquitto may interleave QoS 0 and QoS 1 flows differently; each message arrives once)
        assert sorted(p for t, p in got if t != "fs/echo") == sorted(bytes([i]) * 100 for i in range(200))
        b.stop()
        b.start()
        for _ in range(500):
            if sub.connects == 2 and sub.connected:
                break
            await asyncio.sleep(0.02)
        assert ups[:3] == [True, False, True]
    await pub_face.stop()
    assert not sub.connected
