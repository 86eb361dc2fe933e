"""The simulator's scenarios as the controller sees them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ctl_helpers import fleet, until

from nanofleet.controller.service import ControllerService
from nanofleet.sim import Simulation, argv, run_simulation


async def test_heatwave_heats_devices_to_severe_and_throttled(broker, tmp_path: Path) -> None:
    svc = await ControllerService(fleet("sim1", broker.url), tmp_path / "ctl").start()
    sim = await Simulation(broker.url, 2, fleet="sim1", scenario="heatwave", interval_s=0.05,
                           data_dir=tmp_path / "sim").start()
    try:
        await until(lambda: (d := svc.store.get_device("sim-0001")) is not None and d.thermal_level == "severe"
                    and d.throttled, 15, "sim-0001 severe and throttled")
        temps = [p.temp_max_c for p in svc.store.telemetry("sim-0001")]
        assert temps[-1] > temps[0] + 20
    finally:
        await sim.stop()
        await svc.stop()


async def test_flaky_network_drops_fire_last_wills_and_devices_come_back(broker, tmp_path: Path) -> None:
    svc = await ControllerService(fleet("sim2", broker.url), tmp_path / "ctl").start()
    sim = await Simulation(broker.url, 3, fleet="sim2", scenario="flaky-network", interval_s=0.1,
                           data_dir=tmp_path / "sim", backoff=(0.05, 0.3)).start()
    store = svc.store
    try:
        def dropped_and_back() -> bool:
            for d in store.list_devices():
                ev = [(e.state, e.reason) for e in store.device_events(d.device_id)]
                if ("offline", "last_will") in ev and ev[-1] == ("online", "birth") and d.bd_seq >= 2:
                    return True
            return False

        await until(dropped_and_back, 20, "a device dropped (last will) and reborn with a new bd_seq")
    finally:
        await sim.stop()
        await svc.stop()


async def test_run_simulation_for_a_duration_and_argv(broker, tmp_path: Path) -> None:
    sim = await asyncio.wait_for(run_simulation(broker.url, 2, fleet="sim3", interval_s=0.05, duration_s=0.5,
                                                data_dir=tmp_path), 10)
    assert all(d.session is None for d in sim.devices)  # stopped
    assert argv("mqtt://h:1", 3, scenario="heatwave")[:3] == ["sim", "--devices", "3"]
    with pytest.raises(ValueError, match="unknown scenario"):
        Simulation(broker.url, 1, scenario="meteor")  # type: ignore[arg-type]


def test_telemetry_template_is_exactly_the_proto3_json_an_agent_writes() -> None:
    """The simulator's fast encoding must be what json_format writes for the same message, field for field."""
    import json
    import random

    from google.protobuf import json_format

    from nanofleet.protos import fleet_pb2
    from nanofleet.sim_device import Counters, SimDevice

    for i in range(200):
        d = SimDevice("f", f"d-{i}", random.Random(i), "heatwave" if i % 2 else "steady", Counters(), bd_seq=i * 7)
        for _ in range(i % 40):
            d.tick()  # not connected: advances the state, counts a skipped sample
        d.seq, d.policy_version, d.available = i % 256, i % 3, i % 5 != 0
        if i % 4 == 0:  # a device on a rollout's model reports it as an agent does
            d.model_sha256, d.previous_sha256 = f"{i:064x}", "" if i % 8 else "f" * 64
            d.model_requests, d.model_errors = i * 3, i % 7
        fast = d.telemetry_json()
        msg = json_format.Parse(fast, fleet_pb2.Telemetry())
        assert json.loads(fast) == json.loads(json_format.MessageToJson(msg, indent=None)), fast
        assert msg.device_id == f"d-{i}" and msg.bd_seq == i * 7 and msg.seq == i % 256
    assert d.counters.skipped_offline > 0


def test_simulated_devices_report_a_plausible_generation_speed_lower_when_throttled() -> None:
    """`nanofleet up --simulate` charts tokens/s: a Pi-class rate while the device generated locally in the last
    interval, 0 (no measurement: the proto's absent value) when it did not, and less while thermally throttled."""
    import random

    from nanofleet.sim_device import Counters, SimDevice

    cool, hot = [], []
    for i in range(40):
        d = SimDevice("f", f"d-{i}", random.Random(i), "heatwave" if i % 2 else "steady", Counters())
        for _ in range(30):
            d.tick()
            s = d.sample()
            (hot if s.throttled else cool).append(s.model.tokens_per_s)
    measured_cool = [r for r in cool if r]
    assert hot and measured_cool and 0 in cool  # some intervals generated nothing locally
    assert all(8 <= r <= 30 for r in measured_cool)
    assert max(hot) < min(measured_cool)
    d = SimDevice("f", "down", random.Random(1), "steady", Counters())
    d.available = False
    d.tick()
    assert d.sample().model.tokens_per_s == 0  # no model, no speed


async def test_a_device_follows_its_own_policy_refuses_others_and_answers_commands(broker, tmp_path: Path) -> None:
    import json

    from google.protobuf import json_format

    from nanofleet.mqtt import MqttClient
    from nanofleet.protos import fleet_pb2, topics

    sim = await Simulation(broker.url, 1, fleet="sim4", interval_s=0.2, data_dir=tmp_path).start()
    await sim.wait_connected(10)
    dev = sim.devices[0]
    ctl = await MqttClient(broker.url).start()
    try:
        await ctl.wait_connected(10)
        ctl.subscribe([(topics.cmd_result("sim4", "sim-0000"), 1), (topics.status("sim4", "sim-0000"), 1)])
        await until(lambda: ctl._filters and ctl.connected, 5)

        def policy(version: int, device: str) -> bytes:
            return json_format.MessageToJson(fleet_pb2.RoutingPolicy(fleet="sim4", device_id=device,
                                                                     version=version)).encode()

        await ctl.publish(topics.policy("sim4", "sim-0000"), policy(50, "other"), 1, retain=True)
        await until(lambda: sim.counters.policies_refused == 1, 5, "the stray policy refused")
        assert dev.policy_version == 0
        await ctl.publish(topics.policy("sim4", "sim-0000"), policy(5, "sim-0000"), 1, retain=True)
        await until(lambda: dev.policy_version == 5, 5, "its own policy applied")
        cmd = fleet_pb2.Command(id="c1", kind="ping")
        await ctl.publish(topics.cmd("sim4", "sim-0000"), json_format.MessageToJson(cmd).encode(), 1)
        seen: list[tuple[str, dict]] = []

        async def collect() -> None:
            async for m in ctl.messages():
                seen.append((m.topic, json.loads(m.payload) if m.payload else {}))

        reader = asyncio.create_task(collect())
        try:
            await until(lambda: [b.get("status") for t, b in seen if t.endswith("cmd/result")] == ["ack", "ok"], 5,
                        "ack then ok for the ping")
            births = [b for t, b in seen if t.endswith("/status") and b.get("online")]
            assert births and births[-1]["policyVersion"] == "5"  # the rebirth told the controller
        finally:
            reader.cancel()
    finally:
        await ctl.publish(topics.policy("sim4", "sim-0000"), b"", 1, retain=True)
        await ctl.stop()
        await sim.stop()
