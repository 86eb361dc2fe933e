"""Ingest end to end through a real mosquitto: simulated devices' births, telemetry, deaths, rejections."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent_fleet import Simulation
from ctl_helpers import fleet, rejection_total, telemetry_keys, until

from nanofleet.controller.service import ControllerService
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


async def test_births_telemetry_shutdown_and_last_will(broker, tmp_path: Path, reader: str) -> None:
    cfg = fleet("ing1", broker.url, "devices: {sim-0000: {group: lab}}\ngroups: {lab: {}}")
    svc = await ControllerService(cfg, tmp_path / "ctl", sweep_every_s=0.1, ingest_reader=reader).start()
    sim = await Simulation(broker.url, 3, fleet="ing1", interval_s=0.1, data_dir=tmp_path / "sim").start()
    store = svc.store
    try:
        await until(lambda: len([d for d in store.list_devices() if d.state == "online"]) == 3, 10, "3 births")
        await until(lambda: all(len(store.telemetry(d.device_id)) >= 5 for d in store.list_devices()), 10,
                    "telemetry rows")
        d0 = store.get_device("sim-0000")
        assert store.get_device("sim-0001").group == "default"  # not listed: the group of the defaults
        assert d0.group == "lab" and d0.model_name == "tiny-test" and d0.model_availability == "available"
        assert d0.temp_max_c is not None and d0.ram_total_mb == 4096 and d0.route_counts.get("local") is not None
        assert svc.ingest.stats.rejected == 0
        # policy reaches every device and the controller sees the version applied
        def converged() -> bool:
            published = store.published_policies()
            return len(published) == 3 and all(d.policy_version == published[d.device_id].version
                                               for d in store.list_devices())

        await until(converged, 10, "every device applied the policy published for it")
        assert sum(store.policy_convergence().values()) == 3
        assert sim.devices[0].hooks.policies[-1].group == "lab"
        # a clean stop: offline with reason shutdown; a cut: offline through the last will
        await sim.devices[1].session.stop()
        await sim.devices[2].session.client.abort()
        await until(lambda: store.get_device("sim-0001").state == "offline"
                    and store.get_device("sim-0002").state == "offline", 10, "two offline")
        reasons = {d: store.device_events(d)[-1].reason for d in ("sim-0001", "sim-0002")}
        assert reasons == {"sim-0001": "shutdown", "sim-0002": "last_will"}
        assert store.get_device("sim-0000").state == "online"
        keys = telemetry_keys(store)
        assert len(keys) == len(set(keys))
    finally:
        await sim.stop()
        await svc.stop()


async def test_malformed_payloads_are_counted_and_ingest_keeps_going(
    broker, tmp_path: Path, reader: str
) -> None:
    cfg = fleet("ing2", broker.url)
    svc = await ControllerService(cfg, tmp_path / "ctl", ingest_reader=reader).start()
    await svc.ingest.wait_subscribed(5)
    async with MqttClient(broker.url) as pub:
        await pub.wait_connected(5)
        bad = [(topics.telemetry("ing2", "d1"), b"{oops"), (topics.status("ing2", "d1"), b"[]"),
               (topics.cmd_result("ing2", "d1"), b'{"status": "ok"}'),
               (topics.telemetry("ing2", "d1"), b'{"deviceId": "d2", "tsMs": "1"}')]
        for t, p in bad:
            await pub.publish(t, p, qos=1)
        await pub.publish(topics.telemetry("ing2", "d1"), b'{"tsMs": "1000", "seq": 0, "cpuPercent": 3}', qos=1)
        store = svc.store
        await until(lambda: rejection_total(store) == 4 and telemetry_keys(store, "d1"), 10, "4 rejections + 1 row")
        reasons = sorted(r.reason for r in store.rejections())
        assert reasons == ["command result without id", "device_id does not match the topic", "invalid json",
                           "not a JSON object"]
        assert all(r.device_id == "d1" for r in store.rejections())
    await svc.stop()


async def test_share_group_splits_between_two_controllers(broker, tmp_path: Path, reader: str) -> None:
    cfg = fleet("ing3", broker.url)
    a = await ControllerService(cfg, tmp_path / "a", share_group="g", ingest_reader=reader).start()
    b = await ControllerService(cfg, tmp_path / "b", share_group="g", ingest_reader=reader).start()
    await asyncio.gather(a.ingest.wait_subscribed(5), b.ingest.wait_subscribed(5))
    await asyncio.sleep(0.2)  # SUBACKs: both subscriptions in place before the burst
    async with MqttClient(broker.url) as pub:
        await pub.wait_connected(5)
        futs = [pub.publish(topics.telemetry("ing3", f"d{i % 10}"), f'{{"tsMs": "{1000 + i}", "seq": {i % 256}}}',
                            qos=1) for i in range(400)]
        await asyncio.gather(*futs)
    await until(lambda: a.ingest.stats.telemetry + b.ingest.stats.telemetry == 400, 10, "400 split")
    assert a.ingest.stats.telemetry > 0 and b.ingest.stats.telemetry > 0
    await a.stop()
    await b.stop()
