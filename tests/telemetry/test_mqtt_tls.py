"""mqtts:// with the fleet's CA file, against a real mosquitto TLS listener: both MQTT clients verify the broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from nanofleet.controller.mqtt_reader import AsyncPublisher, MqttReader
from nanofleet.mqtt import MqttClient, MqttUrlError
from tests.conftest import until
from tests.gateway.conftest import Tls, tls  # noqa: F401 — the session's throwaway CA + localhost certificate


@pytest.fixture
def tls_broker(make_broker, tls: Tls):  # noqa: F811
    # (`user root`: when the tests run as root, mosquitto would drop to its own user before reading the
    # certificates in pytest's private temp folder; run as anyone else, the line is ignored)
    b = make_broker([f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}", "user root"])
    return b, f"mqtts://localhost:{b.port}"


async def test_reader_and_paho_client_over_tls_with_the_fleet_ca(tls_broker, tls: Tls) -> None:  # noqa: F811
    _, url = tls_broker
    got: list[tuple[str, bytes]] = []
    sub = MqttReader(url, [("tls/#", 1)], got.extend, ca=tls.ca, backoff=(0.05, 0.2))
    face = await AsyncPublisher(sub).start()
    try:
        async with MqttClient(url, ca=tls.ca) as pub:
            pub.subscribe([("tls/back", 1)])
            await pub.wait_connected(10)
            await until(lambda: sub.connected, 10, "the reader subscribed over TLS")
            await asyncio.wait_for(asyncio.gather(*(pub.publish(f"tls/{i}", b"x" * i, qos=1) for i in range(50))), 10)
            await until(lambda: len(got) >= 50, 10, "50 messages through TLS")
            assert sorted(p for _, p in got) == sorted(b"x" * i for i in range(50))
            await asyncio.wait_for(face.publish("tls/back", b"from the reader", qos=1), 10)  # write while reading
            msg = await asyncio.wait_for(anext(pub.messages()), 10)
            assert msg.payload == b"from the reader"
    finally:
        await face.stop()


async def test_a_broker_the_ca_does_not_vouch_for_is_refused_visibly(tls_broker, tmp_path: Path) -> None:
    """Without the fleet's CA (system store only) the certificate fails verification: counted, kept, retried."""
    _, url = tls_broker
    sub = MqttReader(url, [("tls/#", 1)], lambda m: None, backoff=(0.05, 0.2)).start()
    try:
        await until(lambda: sub.failures["connection"] >= 2, 10, "failed TLS handshakes, retried")
        assert not sub.connected and "certificate verify failed" in (sub.last_error or "")
    finally:
        await asyncio.to_thread(sub.stop)


def test_a_ca_file_needs_mqtts_and_must_exist(tmp_path: Path, tls: Tls) -> None:  # noqa: F811
    with pytest.raises(MqttUrlError, match="needs an mqtts://"):
        MqttReader("mqtt://127.0.0.1:1", [("x", 0)], lambda m: None, ca=tls.ca)
    with pytest.raises(MqttUrlError, match="does not exist"):
        MqttClient("mqtts://127.0.0.1:1", ca=tmp_path / "missing.pem")
