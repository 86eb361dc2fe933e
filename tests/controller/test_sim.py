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
    assert all(d.session.client is None for d in sim.devices)  # stopped
    assert argv("mqtt://h:1", 3, scenario="heatwave")[:3] == ["sim", "--devices", "3"]
    with pytest.raises(ValueError, match="unknown scenario"):
        Simulation(broker.url, 1, scenario="meteor")  # type: ignore[arg-type]
