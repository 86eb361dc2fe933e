"""The simulator at scale: 1,000 devices in one process, each its own MQTT session, all seen by the controller."""

from __future__ import annotations

import time
from pathlib import Path

from ctl_helpers import fleet, telemetry_keys, until

from nanofleet.controller.service import ControllerService
from nanofleet.sim import Simulation
from nanofleet.tcp import raise_nofile

N = 1000


async def test_a_thousand_devices_each_publish_birth_and_telemetry(make_broker, tmp_path: Path) -> None:
    raise_nofile()
    broker = make_broker(["max_queued_messages 1000"])
    svc = await ControllerService(fleet("scale", broker.url), tmp_path / "ctl").start()
    t0 = time.monotonic()
    sim = await Simulation(broker.url, N, fleet="scale", interval_s=2.0, data_dir=tmp_path / "sim").start()
    try:
        def born() -> int:
            return sum(1 for d in svc.store.list_devices() if d.state == "online" and d.birth_ms > 0)

        await until(lambda: born() == N, 45, f"{N} births in the controller")
        born_s = time.monotonic() - t0

        def reporting() -> set[str]:
            return {k[0] for k in telemetry_keys(svc.store)}

        await until(lambda: len(reporting()) == N, 30, f"telemetry from all {N} devices")
        assert reporting() == {f"sim-{i:04d}" for i in range(N)}
        print(f"{N} births in {born_s:.1f}s, telemetry from all in {time.monotonic() - t0:.1f}s")
    finally:
        await sim.stop()
        await svc.stop()

