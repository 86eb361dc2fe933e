"""The fast subscriber's packet parser (pure, any split of the byte stream) and the client against mosquitto."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.controller.mqtt_reader import AsyncPublisher, MqttReader, parse, publish_packet
from nanofleet.mqtt import MqttClient
from tests.conftest import until

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


def _feed(stream: bytes, cuts: list[int]) -> tuple[object, ...]:
    """Everything parse() hands out when `stream` arrives in pieces of the `cuts` sizes (then the rest)."""
    from nanofleet.controller.mqtt_reader import MqttProtocolError

    buf, out, acks, pubacks, other = bytearray(), [], [], [], []
    pos, error = 0, None
    for cut in [*cuts, len(stream)]:
        buf += stream[pos:pos + cut]
        pos += cut
        try:
            used, seen = parse(buf, out, acks, pubacks)
        except MqttProtocolError as exc:
            error = str(exc)
            break
        assert 0 <= used <= len(buf)
        del buf[:used]
        other += seen
        if pos >= len(stream):
            break
    return out, acks, pubacks, other, error, bytes(buf) if error is None else b""


@given(st.binary(max_size=400), st.lists(st.integers(1, 60), max_size=20))
def test_parse_arbitrary_bytes_any_split(stream: bytes, cuts: list[int]) -> None:
    """Any bytes, cut anywhere: parse() hands out the same packets and fails (only ever with MqttProtocolError)
    at the same packet as when the bytes arrive at once."""
    assert _feed(stream, cuts) == _feed(stream, [])


@given(messages, st.binary(min_size=1, max_size=40), st.lists(st.integers(1, 60), max_size=20))
def test_parse_valid_stream_then_garbage(msgs: list[tuple[str, bytes, int]], garbage: bytes, cuts: list[int]) -> None:
    """Valid packets then garbage: the valid ones are always handed out, whatever the split and whatever follows."""
    stream = b"".join(publish_packet(t, p, q, False, i + 2) for i, (t, p, q) in enumerate(msgs))
    whole = _feed(stream + garbage, [])
    assert _feed(stream + garbage, cuts) == whole
    assert whole[0][:len(msgs)] == [(t, p) for t, p, _ in msgs]


def test_refused_subscription_is_flagged() -> None:
    _, other = parse(bytearray(b"\x90\x03\x00\x01\x80"), [], [])
    assert -9 in other


async def test_receives_publishes_and_reconnects(make_broker) -> None:
    b = make_broker()
    got: list[tuple[str, bytes]] = []
    ups: list[bool] = []
    sub = MqttReader(b.url, [("fs/#", 1)], got.extend, on_connection=ups.append, backoff=(0.05, 0.2))
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


def test_publish_shorter_than_its_topic_header_is_a_protocol_error() -> None:
    """Remaining length 1 cannot hold the 2-byte topic length: a broker bug or a hostile peer, never an IndexError."""
    from nanofleet.controller.mqtt_reader import MqttProtocolError

    for bad in (b"\x30\x01\x00", b"\x30\x03\x00\x05a", b"\x32\x03\x00\x01a" + b"\x40\x02\x00\x01"):
        with pytest.raises(MqttProtocolError, match="PUBLISH"):
            parse(bytearray(bad), [], [], [])


async def test_reader_thread_survives_a_malformed_packet(caplog) -> None:
    """A peer that sends a PUBLISH too short for its topic: the reader logs, counts, shows last_error, reconnects."""
    connects: list[bytes] = []

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connects.append(await reader.read(1024))
        writer.write(b"\x20\x02\x00\x00")  # CONNACK accepted
        await reader.read(1024)  # SUBSCRIBE
        writer.write(b"\x90\x03\x00\x01\x00" + b"\x30\x01\x00")  # SUBACK granted, then the malformed PUBLISH
        await writer.drain()
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sub = MqttReader(f"mqtt://127.0.0.1:{port}", [("x/#", 0)], lambda m: None, backoff=(0.01, 0.05))
    sub.start()
    try:
        await until(lambda: len(connects) >= 2, 10, "a reconnect after the malformed packet")
        assert sub.failures["protocol"] >= 1
        assert sub.last_error is not None and "PUBLISH" in sub.last_error
        assert any("PUBLISH" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(sub.stop)
        server.close()
        await server.wait_closed()


async def test_a_failing_sink_is_logged_counted_and_reconnects(broker, caplog) -> None:
    """Any other exception in the reader thread (here: a consumer bug) is a counted, logged reconnect, not a death."""
    calls: list[int] = []

    def sink(msgs: list[tuple[str, bytes]]) -> None:
        calls.append(len(msgs))
        if len(calls) == 1:
            raise ValueError("consumer bug")

    sub = MqttReader(broker.url, [("fsbug/#", 0)], sink, backoff=(0.01, 0.05)).start()
    try:
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            await until(lambda: sub.connected, 10, "subscribed")
            await pub.publish("fsbug/1", b"a", qos=1)
            await until(lambda: sub.connects >= 2, 10, "a reconnect after the sink failed")
            await until(lambda: sub.connected, 10, "subscribed again")
            await pub.publish("fsbug/2", b"b", qos=1)
            await until(lambda: len(calls) >= 2, 10, "the next message after the reconnect")
        assert sub.failures["internal"] == 1
        assert sub.last_error is not None and "consumer bug" in sub.last_error
        assert any("consumer bug" in (r.exc_text or "") or "consumer bug" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(sub.stop)


async def test_ingest_shows_its_reader_failures(tmp_path, reader: str) -> None:
    """What the reader counts reaches the controller: a broker that is not there shows as failures + last_error."""
    from nanofleet.controller.ingest import Ingest
    from nanofleet.controller.store import Store
    from nanofleet.tcp import free_port

    store = Store(tmp_path / "c.db")
    ingest = Ingest(store, "f1", f"mqtt://127.0.0.1:{free_port()}", transport=reader)  # type: ignore[arg-type]
    await ingest.start()
    try:
        await until(lambda: sum(ingest.transport_status()["failures"].values()) >= 1, 10, "a counted failure")
        status = ingest.transport_status()
        assert status["reader"] == reader and status["connected"] is False and status["last_error"]
    finally:
        await ingest.stop()
        await asyncio.to_thread(store.close)


async def test_a_failing_connection_observer_is_counted_and_reading_goes_on(broker, caplog) -> None:
    got: list[tuple[str, bytes]] = []

    def observer(up: bool) -> None:
        raise RuntimeError("observer bug")

    sub = MqttReader(broker.url, [("fsobs/#", 1)], got.extend, on_connection=observer).start()
    try:
        await until(lambda: sub.connected, 10, "subscribed")
        assert sub.failures["observer"] == 1 and "observer bug" in (sub.last_error or "")
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            await pub.publish("fsobs/1", b"still reading", qos=1)
            await until(lambda: got, 10, "a message after the observer failed")
        assert sub.connects == 1
        assert any("on_connection failed" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.to_thread(sub.stop)


async def test_ack_after_commit_leaves_what_was_not_stored_with_the_broker(broker) -> None:
    """A durable reader acknowledges a QoS 1 message only when the consumer says it is stored: what a controller had
    received but not stored when it went away is delivered again to its persistent session (the same client id)."""

    def reader(got: list[tuple[str, bytes]]) -> MqttReader:
        return MqttReader(broker.url, [("dur/#", 1)], got.extend, client_id="dur-reader-1", clean_session=False,
                          ack_after_commit=True, backoff=(0.05, 0.2)).start()

    first: list[tuple[str, bytes]] = []
    sub = reader(first)
    await until(lambda: sub.connected, 5)
    async with MqttClient(broker.url) as pub:
        await pub.wait_connected(5)
        await asyncio.gather(*(pub.publish(f"dur/{i}", bytes([i]), qos=1) for i in range(10)))
        await until(lambda: len(first) == 10, 5)
        sub.commit_through(4)  # the first four are stored; the other six were received only
        await asyncio.to_thread(sub.stop)
        again: list[tuple[str, bytes]] = []
        sub = reader(again)
        await until(lambda: len(again) >= 6, 5, "the six unacknowledged messages delivered again")
        assert sorted(p for _, p in again) == [bytes([i]) for i in range(4, 10)]
        sub.commit_through(sub.received)  # all stored now
        await pub.publish("dur/end", b"end", qos=1)
        await until(lambda: any(p == b"end" for _, p in again), 5)
        sub.commit_through(sub.received)
        await asyncio.to_thread(sub.stop)
        last: list[tuple[str, bytes]] = []
        sub = reader(last)
        await until(lambda: sub.connected, 5)
        await pub.publish("dur/marker", b"marker", qos=1)
        await until(lambda: last, 5)
        assert last == [("dur/marker", b"marker")]  # nothing acknowledged came back
        await asyncio.to_thread(sub.stop)
