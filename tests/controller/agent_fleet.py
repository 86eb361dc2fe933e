"""Simulated devices that run the agent's own DeviceSession (paho, a thread each, an on-disk telemetry buffer), for
tests of how the controller meets a real agent session: buffered samples replayed after a broker restart, a paused
device going stale, a session stopped or aborted. `nanofleet.sim` is the scalable simulator (asyncio, no buffer);
this is the faithful one, for a few dozen devices. (The former nanofleet.sim, kept here for these tests.)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nanofleet.agent.device_session import DeviceSession
from nanofleet.agent.device_session.hooks import AgentMetrics
from nanofleet.agent.settings import AgentSettings
from nanofleet.protos import fleet_pb2
from nanofleet.thermal import classify_thermal

Scenario = Literal["steady", "heatwave", "flaky-network"]
SCENARIOS: tuple[Scenario, ...] = ("steady", "heatwave", "flaky-network")


@dataclass
class SimHooks:
    """AgentHooks of a simulated agent: a model that is available, routes that count up, a queue that drains."""

    rng: random.Random
    availability: int = fleet_pb2.MODEL_AVAILABILITY_AVAILABLE
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    policies: list[fleet_pb2.RoutingPolicy] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def model_state(self) -> fleet_pb2.ModelState:
        return fleet_pb2.ModelState(name="tiny-test", availability=self.availability,
                                    loaded=self.availability == fleet_pb2.MODEL_AVAILABILITY_AVAILABLE,
                                    tokens_per_s=500 + self.rng.random() * 50)

    def agent_metrics(self) -> AgentMetrics:
        m = self.metrics
        m.route_counts["local"] = m.route_counts.get("local", 0) + self.rng.randint(0, 3)
        if self.rng.random() < 0.2:
            m.route_counts["cloud"] = m.route_counts.get("cloud", 0) + 1
        m.queue_depth = max(0, m.queue_depth + self.rng.randint(-1, 1))
        return m

    async def apply_policy(self, policy: fleet_pb2.RoutingPolicy) -> None:
        self.policies.append(policy)
        self.metrics.policy_version = policy.version

    async def handle_command(self, command: fleet_pb2.Command) -> fleet_pb2.CommandResult:
        self.commands.append(command.kind)
        if command.kind == "drain-queue":
            drained, self.metrics.queue_depth = self.metrics.queue_depth, 0
            return fleet_pb2.CommandResult(status="ok", message="drained", data={"drained": str(drained)})
        if command.kind == "unload-model":
            self.availability = fleet_pb2.MODEL_AVAILABILITY_DOWNLOADABLE
            return fleet_pb2.CommandResult(status="ok", message="unloaded")
        return fleet_pb2.CommandResult(status="error", message=f"unsupported command {command.kind!r}")


class SimCollector:
    """Samples a simulated machine; `heatwave` heats it up sample by sample."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.scenario, self.rng = scenario, rng
        self.temp = 40 + rng.random() * 8

    def sample(self) -> fleet_pb2.Telemetry:
        r = self.rng
        if self.scenario == "heatwave":
            self.temp = min(92.0, self.temp + 1.5 + r.random())
        else:
            self.temp += (45 - self.temp) * 0.2 + r.uniform(-1, 1)
        throttled = self.temp >= 80
        t = fleet_pb2.Telemetry(
            ts_ms=int(time.time() * 1000), cpu_percent=r.uniform(5, 60), load1=r.uniform(0.1, 2.0),
            ram_total_mb=4096, ram_available_mb=r.randint(1200, 2600), swap_used_mb=0, disk_free_mb=20_000,
            temperatures_c={"cpu-thermal": round(self.temp, 1)}, temp_max_c=round(self.temp, 1),
            throttle_ratio=0.6 if throttled else 1.0, throttled=throttled,
        )
        t.thermal_level = classify_thermal(self.temp, throttled=throttled)
        return t


_HARDWARE = fleet_pb2.Hardware(platform="linux", machine="aarch64", cpu_count=4, ram_total_mb=4096,
                               board="Simulated Raspberry Pi 5")


@dataclass
class SimDevice:
    device_id: str
    hooks: SimHooks
    collector: SimCollector
    session: DeviceSession


class Simulation:
    def __init__(self, broker_url: str, n: int, *, fleet: str = "demo", scenario: Scenario = "steady",
                 interval_s: float = 1.0, data_dir: Path | None = None, prefix: str = "sim",
                 username: str | None = None, password: str | None = None, seed: int = 0,
                 buffer_max: int = 10_000, keepalive: int = 30, backoff: tuple[float, float] = (0.2, 5.0)) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
        self.scenario = scenario
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="nanofleet-sim-")
        base = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.devices: list[SimDevice] = []
        for i in range(n):
            device_id = f"{prefix}-{i:04d}"
            rng = random.Random(seed * 1_000_003 + i)
            # "{device}" in the username gives each simulated device its own broker account, as the ACL expects.
            settings = AgentSettings(fleet=fleet, device_id=device_id, data_dir=base / device_id,
                                     broker_url=broker_url, mqtt_password=password,
                                     mqtt_username=username.format(device=device_id) if username else None,
                                     telemetry_interval_s=interval_s)
            hooks, collector = SimHooks(rng), SimCollector(scenario, rng)
            session = DeviceSession(settings, hooks, collector=collector, buffer_max=buffer_max,
                                    keepalive=keepalive, backoff=backoff, follow_policy_interval=False,
                                    hardware=_HARDWARE)
            self.devices.append(SimDevice(device_id, hooks, collector, session))
        self._flaky: asyncio.Task[None] | None = None

    async def start(self) -> Simulation:
        await asyncio.gather(*(d.session.start() for d in self.devices))
        if self.scenario == "flaky-network":
            self._flaky = asyncio.create_task(self._flake())
        return self

    async def wait_connected(self, within: float = 30) -> None:
        await asyncio.gather(*(d.session.client.wait_connected(within) for d in self.devices  # type: ignore[union-attr]
                               ))

    async def _flake(self) -> None:
        rng = random.Random(7)
        while True:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            victim = rng.choice(self.devices)
            if victim.session.client is not None:
                victim.session.client.drop()

    async def stop(self) -> None:
        if self._flaky is not None:
            self._flaky.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flaky
        await asyncio.gather(*(d.session.stop() for d in self.devices), return_exceptions=True)
        if self._tmp is not None:
            self._tmp.cleanup()
