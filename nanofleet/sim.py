"""Simulated devices: N real MQTT sessions in one process (each its own connection, broker account and last will),
speaking the agent's protocol (see `nanofleet.sim_device`).

Scenarios: `steady` (cool, light load), `heatwave` (temperatures climb ~1.5 °C a sample to past throttling and
stay there), `flaky-network` (now and then a device's connection is cut without a clean disconnect).
Scale: the sessions are asyncio (gmqtt), not paho's thread per client, so 10,000 fit in one process; one ticker
spreads the devices' samples evenly over the interval; connection handshakes run at most `connect_slots` at a time.
`run_simulation(...)` is what `nanofleet up --simulate N` runs (as `nanofleet sim`); `nanofleet sim` is the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import click

from nanofleet.backoff import Backoff
from nanofleet.mqtt import parse_broker_url
from nanofleet.params import BROKER_URL, FLEET_ID
from nanofleet.sim_device import BD_SEQ_PER_RUN, SCENARIOS, Counters, Scenario, SimDevice
from nanofleet.tasks import TaskSupervisor
from nanofleet.tcp import raise_nofile

__all__ = ["SCENARIOS", "Scenario", "SimDevice", "Simulation", "argv", "device_ids", "run_simulation"]
log = logging.getLogger("nanofleet.sim")


def device_ids(n: int, prefix: str = "sim") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


class Simulation:
    def __init__(self, broker_url: str, n: int, *, fleet: str = "demo", scenario: Scenario = "steady",
                 interval_s: float = 1.0, data_dir: Path | None = None, prefix: str = "sim",
                 username: str | None = None, password: str | None = None,
                 passwords: Mapping[str, str] | None = None, seed: int = 0, keepalive: int = 30,
                 backoff: tuple[float, float] = (0.2, 5.0), connect_slots: int = 256, telemetry_qos: int = 1) -> None:
        """`passwords`: each device's own broker password (user name = device id), as `nanofleet up` enrolls them;
        else `username` ("{device}" is replaced by the device id) and one `password` (e.g. an open test broker)."""
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
        self.host, self.port, tls = parse_broker_url(broker_url)
        if tls:
            raise ValueError("the simulator speaks plain MQTT on loopback; mqtts:// is not supported")
        self.scenario, self.interval_s, self.keepalive = scenario, interval_s, keepalive
        self._backoff, self._slots_n = backoff, connect_slots
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="nanofleet-sim-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.counters = Counters()
        ids = device_ids(n, prefix)
        if passwords is not None:
            missing = [d for d in ids if d not in passwords]
            if missing:
                raise ValueError(f"no broker password for {len(missing)} devices (first: {missing[0]})")
        epoch = self._next_epoch()
        self.devices: list[SimDevice] = []
        for i, device_id in enumerate(ids):
            user: str | None = device_id
            pw = passwords[device_id] if passwords is not None else password
            if passwords is None:
                user = username.format(device=device_id) if username else None
            d = SimDevice(fleet, device_id, random.Random(seed * 1_000_003 + i), scenario, self.counters,
                          password=pw, username=user, interval_s=interval_s, bd_seq=epoch * BD_SEQ_PER_RUN,
                          telemetry_qos=telemetry_qos)
            self.devices.append(d)
        self._tasks = TaskSupervisor("sim")
        self.started_at = 0.0
        self.tick_lag_s = 0.0  # how far the ticker fell behind its schedule at worst (CPU-bound when > 0)

    def _next_epoch(self) -> int:
        """This run's number, kept in the data dir (atomically) so bdSeqs grow across restarts, even after kill -9."""
        path = self.data_dir / "sim_state.json"
        try:
            epoch = int(json.loads(path.read_text())["epoch"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            epoch = 1
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"epoch": epoch}))
            os.replace(tmp, path)
        except OSError as exc:
            raise ValueError(f"data dir {self.data_dir}: cannot keep the run counter: {exc}") from None
        return epoch

    async def start(self) -> Simulation:
        raise_nofile()
        slots = asyncio.Semaphore(self._slots_n)
        self.started_at = time.monotonic()
        for d in self.devices:
            b = Backoff(*self._backoff)
            self._tasks.spawn(lambda d=d, b=b: d.run(self.host, self.port, slots=slots, backoff=b,  # type: ignore[misc]
                                                     keepalive=self.keepalive),
                              d.device_id)
        self._tasks.spawn(self._ticker, "ticker")
        if self.scenario == "flaky-network":
            self._tasks.spawn(self._flake, "flaky-network")
        return self

    @property
    def connected(self) -> int:
        return sum(1 for d in self.devices if d.connected)

    async def wait_connected(self, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while self.connected < len(self.devices):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.connected} of {len(self.devices)} devices connected after {within}s "
                                   f"(last error: {self.counters.last_error or 'none'})")
            await asyncio.sleep(0.05)

    async def _ticker(self) -> None:
        """Every device samples once per interval, at its own phase: the load is spread, not a burst a second."""
        loop = asyncio.get_running_loop()
        n = len(self.devices)
        slots = max(1, min(n, int(self.interval_s / 0.02)))
        groups = [self.devices[i::slots] for i in range(slots)]
        step = self.interval_s / slots
        at = loop.time()
        while True:
            for group in groups:
                for d in group:
                    d.tick()
                at += step
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.tick_lag_s = max(self.tick_lag_s, -delay)
                    await asyncio.sleep(0)

    async def _flake(self) -> None:
        rng = random.Random(7)
        while True:
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            victim = rng.choice(self.devices)
            if victim.session is not None and victim.connected:
                victim.session.cut()

    async def stop(self) -> None:
        await self._tasks.stop()
        await asyncio.gather(*(d.stop() for d in self.devices))
        if self._tmp is not None:
            self._tmp.cleanup()

    def summary(self) -> str:
        c = self.counters
        return (f"{self.connected}/{len(self.devices)} connected; connects {c.connects}, failed {c.connect_failures}, "
                f"drops {c.disconnects}; births {c.births}; telemetry {c.telemetry} "
                f"(skipped while offline {c.skipped_offline}); policies {c.policies} (refused {c.policies_refused}); "
                f"commands {c.commands}; bad messages {c.bad_messages}; ticker lag {self.tick_lag_s:.2f}s"
                + (f"; last error: {c.last_error}" if c.last_error else ""))


async def run_simulation(broker_url: str, n: int, *, fleet: str = "demo", scenario: Scenario = "steady",
                         interval_s: float = 1.0, data_dir: Path | None = None, duration_s: float | None = None,
                         username: str | None = None, password: str | None = None,
                         passwords: Mapping[str, str] | None = None, stop: asyncio.Event | None = None,
                         report_every_s: float | None = None, telemetry_qos: int = 1) -> Simulation:
    """Run N simulated devices until `stop` is set or `duration_s` passed; returns the stopped simulation."""
    sim = await Simulation(broker_url, n, fleet=fleet, scenario=scenario, interval_s=interval_s, data_dir=data_dir,
                           username=username, password=password, passwords=passwords,
                           telemetry_qos=telemetry_qos).start()
    stop = stop or asyncio.Event()
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        while not stop.is_set():
            wait = report_every_s or 3600.0
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            if report_every_s and not stop.is_set():
                log.info("sim: %s", sim.summary())
    finally:
        await sim.stop()
    return sim


def argv(broker_url: str, n: int, *, fleet: str = "demo", scenario: Scenario = "steady",
         interval_s: float = 1.0) -> Sequence[str]:
    """The `nanofleet sim` command line for a supervisor to run as a child process."""
    return ["sim", "--devices", str(n), "--broker-url", broker_url, "--fleet", fleet, "--scenario", scenario,
            "--interval", str(interval_s)]


def read_credentials(path: Path) -> dict[str, str]:
    """The {device id: password} file `nanofleet up` writes (0600) for its simulated devices."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: cannot read a JSON object of device passwords: {exc}",
                                 param_hint="--credentials") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise click.BadParameter(f"{path}: expected a JSON object of device id -> password", param_hint="--credentials")
    return data


@click.command()
@click.option("--devices", "n", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--scenario", type=click.Choice(SCENARIOS), default="steady", show_default=True)
@click.option("--broker-url", type=BROKER_URL, default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--fleet", type=FLEET_ID, default="demo", show_default=True)
@click.option("--interval", "interval_s", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between telemetry samples.")
@click.option("--telemetry-qos", type=click.IntRange(0, 1), default=1, show_default=True,
              help="QoS of live telemetry: 1 as an agent sends it; 0 costs the simulator less than half the CPU "
                   "(no PUBACK per message), for load tests past ~8,000 msg/s on one core.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the run counter (for bdSeq) is kept. Default: a temporary folder.")
@click.option("--credentials", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON {device id: password}: each device logs in as itself (what `nanofleet up` writes).")
@click.option("--mqtt-username", envvar="NANOFLEET_MQTT_USERNAME", default=None,
              help='One user name for all ("{device}" is replaced by the device id).')
@click.option("--mqtt-password", envvar="NANOFLEET_MQTT_PASSWORD", default=None)
def sim(n: int, scenario: Scenario, broker_url: str, fleet: str, interval_s: float, telemetry_qos: int,
        duration_s: float | None, data_dir: Path | None, credentials: Path | None, mqtt_username: str | None,
        mqtt_password: str | None) -> None:
    """Run N simulated devices (each its own MQTT session) against a broker, for demos and load."""
    import signal

    passwords = read_credentials(credentials) if credentials else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("gmqtt", "nanofleet.sim.gmqtt"):  # a log line per connection (and per drop) at 10,000 devices
        logging.getLogger(noisy).setLevel(logging.ERROR)

    async def main() -> Simulation:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        click.echo(f"simulating {n} devices ({scenario}) on {broker_url}, fleet {fleet!r}; Ctrl-C stops")
        return await run_simulation(broker_url, n, fleet=fleet, scenario=scenario, interval_s=interval_s,
                                    data_dir=data_dir, duration_s=duration_s, username=mqtt_username,
                                    password=mqtt_password, passwords=passwords, stop=stop, report_every_s=30,
                                    telemetry_qos=telemetry_qos)

    try:
        done = asyncio.run(main())
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"stopped: {done.summary()}")
