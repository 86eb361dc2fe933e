"""The controller against an mqtts:// broker with the fleet's CA (fleet.yaml broker.ca): ingest and publishing."""

from __future__ import annotations

from pathlib import Path

from ctl_helpers import fleet, telemetry_keys, until

from nanofleet.controller.service import ControllerService
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics
from tests.gateway.conftest import Tls, tls  # noqa: F401 — the session's throwaway CA + localhost certificate


async def test_ingest_and_policy_over_tls_with_the_fleet_ca(make_broker, tls: Tls, tmp_path: Path,  # noqa: F811
                                                           reader: str) -> None:
    # (`user root`: as root, mosquitto would drop to its own user before reading pytest's private temp folder)
    b = make_broker([f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}", "user root"])
    url = f"mqtts://localhost:{b.port}"
    cfg = fleet("tls1", f"{url}, ca: {tls.ca}", "devices: {d1: {}}")
    assert cfg.broker.ca == tls.ca
    svc = await ControllerService(cfg, tmp_path / "ctl", ingest_reader=reader).start()  # type: ignore[arg-type]
    try:
        await svc.ingest.wait_subscribed(10)
        async with MqttClient(url, ca=tls.ca) as dev:
            dev.subscribe([(topics.policy("tls1", "d1"), 1)])
            await dev.wait_connected(10)
            await dev.publish(topics.telemetry("tls1", "d1"), b'{"tsMs": "1000", "seq": 0, "cpuPercent": 3}', qos=1)
            await until(lambda: telemetry_keys(svc.store, "d1"), 10, "the telemetry row, read over TLS")
            policy = await until_message(dev)
            assert b'"deviceId": "d1"' in policy or b'"deviceId":"d1"' in policy  # published over TLS too
    finally:
        await svc.stop()


async def until_message(client: MqttClient) -> bytes:
    import asyncio

    return (await asyncio.wait_for(anext(client.messages()), 10)).payload
