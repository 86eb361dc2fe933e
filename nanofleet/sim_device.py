"""One simulated device: its own MQTT session (gmqtt, asyncio — no thread), speaking the agent's protocol.

What it publishes is what `agent/device_session/` publishes: a retained birth (DeviceStatus, online) after every
CONNACK with the last will (offline, reason last_will) carrying the same bdSeq, telemetry with seq 0..255 restarting
at each birth, a retained shutdown status on a clean stop. It follows its policy topic (a policy addressed to another
fleet or device is refused and counted; a new version is applied and announced by a rebirth) and answers commands
(ack first, then the result). What it leaves out: the offline buffer (a simulated sample taken while disconnected is
dropped and counted, not replayed) and waiting for the controller before live telemetry.

Telemetry is encoded by `telemetry_json`, a template over the proto3 JSON that json_format would write (held equal
to it by tests): json_format costs ~60 µs a message, and at 10,000 devices a second that is most of a core.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import gmqtt
from gmqtt.mqtt.constants import MQTTv311
from google.protobuf import json_format
from google.protobuf.message import Message as PbMessage

from nanofleet.backoff import Backoff
from nanofleet.protos import fleet_pb2, topics
from nanofleet.thermal import classify_thermal

log = logging.getLogger("nanofleet.sim")
Scenario = Literal["steady", "heatwave", "flaky-network"]
SCENARIOS: tuple[Scenario, ...] = ("steady", "heatwave", "flaky-network")
CAPABILITIES = ("telemetry", "policy", "commands")
BD_SEQ_PER_RUN = 1_000_000  # bdSeq = run epoch * this + connection number: it grows across restarts, even kill -9
_THERMAL = {v: k.removeprefix("THERMAL_LEVEL_") for k, v in fleet_pb2.ThermalLevel.items()}
_MODEL_UP = ',"model":{"name":"tiny-test","availability":"MODEL_AVAILABILITY_AVAILABLE","loaded":true'
THROTTLED_SPEED = 0.6  # a throttled device generates at about its throttle ratio of its cool speed
_MODEL_DOWN = ',"model":{"name":"tiny-test","availability":"MODEL_AVAILABILITY_DOWNLOADABLE"}'
_HARDWARE = fleet_pb2.Hardware(platform="linux", machine="aarch64", cpu_count=4, ram_total_mb=4096,
                               board="Simulated Raspberry Pi 5")


def to_json(msg: PbMessage) -> bytes:
    return json_format.MessageToJson(msg, indent=None).encode()


@dataclass(slots=True)
class Counters:
    """What the simulation did, for its log line, the tests and the benchmark (nothing is dropped uncounted)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    births: int = 0
    telemetry: int = 0
    skipped_offline: int = 0  # samples due while a device was disconnected (not buffered, see module doc)
    policies: int = 0
    policies_refused: int = 0
    commands: int = 0
    bad_messages: int = 0
    last_error: str = ""


class _Session(gmqtt.Client):
    """A gmqtt client for one connection: where gmqtt would reconnect by itself, it tells its owner instead, so
    every new connection gets a new bdSeq and last will and waits the project's backoff."""

    lost: asyncio.Event

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost = asyncio.Event()

    async def reconnect(self, delay: bool = False) -> None:  # gmqtt calls this when the connection ends
        self.lost.set()

    def cut(self) -> None:
        """Drop the TCP connection without DISCONNECT (a flaky network): the broker publishes the last will."""
        conn = self._connection
        if conn is not None:
            conn._transport.abort()


@dataclass(eq=False)
class SimDevice:
    fleet: str
    device_id: str
    rng: random.Random
    scenario: Scenario
    counters: Counters
    password: str | None = None
    username: str | None = None
    interval_s: float = 1.0
    telemetry_qos: int = 1  # as the agent's live telemetry
    bd_seq: int = 0
    seq: int = 0
    temp: float = 45.0
    policy: fleet_pb2.RoutingPolicy | None = None
    policy_version: int = 0
    route_local: int = 0
    local_last: int = 0  # requests answered locally in the last interval: 0 means no speed measured
    speed: float = 20.0  # tokens/s when cool (set per device: a Pi 5 runs a 270M-1B model at ~8-25)
    route_cloud: int = 0
    queue_depth: int = 0
    available: bool = True
    session: _Session | None = None
    commands: list[str] = field(default_factory=list)
    # the model a policy asked for (rollouts): switched at once, reported as an agent reports it; a sha256 in
    # `bad_models` makes this device fail that share of its local requests and run hot (the canaries to catch)
    model_sha256: str = ""
    previous_sha256: str = ""
    model_requests: int = 0
    model_errors: int = 0
    switches: int = 0
    bad_models: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.temp = 40 + self.rng.random() * 8
        self.speed = 18 + self.rng.random() * 6
        self._t_status = topics.status(self.fleet, self.device_id)
        self._t_telemetry = topics.telemetry(self.fleet, self.device_id)
        self._t_policy = topics.policy(self.fleet, self.device_id)
        self._t_cmd = topics.cmd(self.fleet, self.device_id)
        self._t_result = topics.cmd_result(self.fleet, self.device_id)

    @property
    def connected(self) -> bool:
        s = self.session
        return s is not None and s.is_connected

    # -- connection --------------------------------------------------------------------------------------------
    async def run(self, host: str, port: int, *, slots: asyncio.Semaphore, backoff: Backoff, keepalive: int = 30,
                  connect_timeout: float = 30.0) -> None:
        """Connect, be born, stay until the connection ends, wait the backoff, again; until cancelled."""
        while True:
            self.bd_seq += 1
            session = _Session(f"nanofleet-{self.fleet}-{self.device_id}", clean_session=False,
                               will_message=gmqtt.Message(self._t_status, to_json(self.status(False, "last_will")),
                                                          qos=1, retain=True),
                               logger=_GMQTT_LOG)
            session.on_message = self._on_message
            if self.username is not None:
                session.set_auth_credentials(self.username, self.password)
            try:
                async with slots, asyncio.timeout(connect_timeout):
                    await session.connect(host, port, keepalive=keepalive, version=MQTTv311)
            except asyncio.CancelledError:  # stopped while connecting: no session to leave open
                await _close(session)
                raise
            except (OSError, TimeoutError, gmqtt.MQTTConnectError) as exc:
                self.counters.connect_failures += 1
                self.counters.last_error = f"{self.device_id}: connect: {type(exc).__name__}: {exc}"
                session.lost.set()
                await _close(session)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            self.session = session
            self.counters.connects += 1
            session.subscribe([gmqtt.Subscription(self._t_policy, qos=1), gmqtt.Subscription(self._t_cmd, qos=1)])
            self.publish_birth()
            await session.lost.wait()
            self.session = None
            self.counters.disconnects += 1
            await asyncio.sleep(backoff.next())

    async def stop(self) -> None:
        """Graceful: a retained offline status (reason shutdown) with this bdSeq, then a clean DISCONNECT."""
        session, self.session = self.session, None
        if session is not None:
            if session.is_connected:
                session.publish(self._t_status, to_json(self.status(False, "shutdown")), qos=1, retain=True)
            session.lost.set()
            await _close(session)

    # -- what it publishes -------------------------------------------------------------------------------------
    def status(self, online: bool, reason: str = "") -> fleet_pb2.DeviceStatus:
        s = fleet_pb2.DeviceStatus(fleet=self.fleet, device_id=self.device_id, online=online, bd_seq=self.bd_seq,
                                   ts_ms=int(time.time() * 1000), reason=reason)
        if online:
            s.agent_version = "sim"
            s.model.CopyFrom(self.model_state())
            s.capabilities.extend(CAPABILITIES)
            s.hardware.CopyFrom(_HARDWARE)
            s.policy_version = self.policy_version
            s.telemetry_interval_s = max(1, round(self.interval_s))
        return s

    def model_state(self) -> fleet_pb2.ModelState:
        m = fleet_pb2.ModelState(name="tiny-test", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE
                                 if self.available else fleet_pb2.MODEL_AVAILABILITY_DOWNLOADABLE,
                                 loaded=self.available)
        if self.model_sha256:
            m.sha256, m.update_state, m.update_sha256 = self.model_sha256, "applied", self.model_sha256
            m.previous_sha256, m.requests, m.errors = self.previous_sha256, self.model_requests, self.model_errors
            m.p95_latency_ms = 40.0
        return m

    def publish_birth(self) -> None:
        assert self.session is not None
        self.seq = 0
        self.session.publish(self._t_status, to_json(self.status(True)), qos=1, retain=True)
        self.counters.births += 1

    def tick(self) -> None:
        """One telemetry sample (called by the simulation's ticker at this device's interval)."""
        rand = self.rng.random  # random() arithmetic, not randint: this runs 10,000 times a second
        bad = self.bad_models.get(self.model_sha256, 0.0) if self.model_sha256 else 0.0
        if self.scenario == "heatwave" or bad:
            self.temp = min(92.0, self.temp + 1.5 + rand())
        else:
            self.temp += (45 - self.temp) * 0.2 + rand() * 2 - 1
        self.local_last = int(rand() * 4)
        self.route_local += self.local_last
        if self.model_sha256:
            self.model_requests += self.local_last
            self.model_errors += sum(1 for _ in range(self.local_last) if rand() < bad)
        if rand() < 0.2:
            self.route_cloud += 1
        self.queue_depth = max(0, self.queue_depth + int(rand() * 3) - 1)
        session = self.session
        if session is None or not session.is_connected:
            self.counters.skipped_offline += 1
            return
        session.publish(self._t_telemetry, self.telemetry_json(), qos=self.telemetry_qos)
        self.seq = (self.seq + 1) & 0xFF
        self.counters.telemetry += 1

    def sample(self) -> fleet_pb2.Telemetry:
        """The current sample as a message (what `telemetry_json` encodes)."""
        return json_format.Parse(self.telemetry_json(), fleet_pb2.Telemetry())

    def telemetry_json(self, ts_ms: int | None = None) -> bytes:
        rand, temp = self.rng.random, round(self.temp, 1)
        throttled = temp >= 80
        level = _THERMAL[classify_thermal(temp, throttled=throttled)]
        parts = [f'{{"deviceId":"{self.device_id}"']
        if self.bd_seq:
            parts.append(f',"bdSeq":"{self.bd_seq}"')
        if self.seq:
            parts.append(f',"seq":{self.seq}')
        parts.append(
            f',"tsMs":"{ts_ms or int(time.time() * 1000)}","cpuPercent":{5 + rand() * 55:.1f},'
            f'"load1":{0.1 + rand() * 1.9:.2f},"ramTotalMb":"4096","ramAvailableMb":"{1200 + int(rand() * 1400)}",'
            f'"diskFreeMb":"20000","temperaturesC":{{"cpu-thermal":{temp}}},"tempMaxC":{temp}')
        if level != "NONE":
            parts.append(f',"thermalLevel":"THERMAL_LEVEL_{level}"')
        parts.append(',"throttleRatio":0.6,"throttled":true' if throttled else ',"throttleRatio":1.0')
        rate = ""
        if self.available and self.local_last:  # an interval without local generation reports 0: a chart gap
            speed = self.speed * (THROTTLED_SPEED if throttled else 1.0) * (0.95 + rand() * 0.1)
            rate = f',"tokensPerS":{speed:.1f}'
        if self.model_sha256:
            prev = f',"previousSha256":"{self.previous_sha256}"' if self.previous_sha256 else ""
            if self.model_requests:  # proto3 JSON leaves zeros out
                prev += f',"requests":"{self.model_requests}"'
            if self.model_errors:
                prev += f',"errors":"{self.model_errors}"'
            parts.append(f',"model":{{"name":"tiny-test","sha256":"{self.model_sha256}",'
                         f'"availability":"MODEL_AVAILABILITY_{"AVAILABLE" if self.available else "DOWNLOADABLE"}"'
                         f'{"," + chr(34) + "loaded" + chr(34) + ":true" if self.available else ""},'
                         f'"updateState":"applied","updateSha256":"{self.model_sha256}"{prev},'
                         f'"p95LatencyMs":40.0{rate}}}')
        elif not self.available:
            parts.append(_MODEL_DOWN)
        else:
            parts.append(f"{_MODEL_UP}{rate}}}")
        routes = [f'"local":"{self.route_local}"'] if self.route_local else []
        if self.route_cloud:
            routes.append(f'"cloud":"{self.route_cloud}"')
        if routes:
            parts.append(f',"routeCounts":{{{",".join(routes)}}}')
        if self.queue_depth:
            parts.append(f',"queueDepth":{self.queue_depth}')
        if self.policy_version:
            parts.append(f',"policyVersion":"{self.policy_version}"')
        parts.append("}")
        return "".join(parts).encode()

    # -- what it receives (gmqtt calls this on the event loop) -------------------------------------------------
    def _on_message(self, _client: Any, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        try:
            if topic == self._t_policy:
                if payload:
                    self._on_policy(json_format.Parse(payload, fleet_pb2.RoutingPolicy(), ignore_unknown_fields=True))
            elif topic == self._t_cmd:
                self._on_command(json_format.Parse(payload, fleet_pb2.Command(), ignore_unknown_fields=True))
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            self.counters.bad_messages += 1
            log.warning("%s: ignoring malformed message on %s: %s", self.device_id, topic, exc)
        return 0

    def _on_policy(self, policy: fleet_pb2.RoutingPolicy) -> None:
        if (policy.fleet and policy.fleet != self.fleet) or (policy.device_id and policy.device_id != self.device_id):
            self.counters.policies_refused += 1
            log.warning("%s: refusing a policy addressed to %s/%s", self.device_id, policy.fleet, policy.device_id)
            return
        if policy.version == self.policy_version:
            return  # the broker's retained copy of what is applied
        self.policy, self.policy_version = policy, policy.version
        self.counters.policies += 1
        if policy.model_sha256 and policy.model_sha256 != self.model_sha256:
            self.previous_sha256, self.model_sha256 = self.model_sha256, policy.model_sha256
            self.model_requests = self.model_errors = 0
            self.switches += 1
        elif not policy.model_sha256 and self.model_sha256:  # back on fleet.yaml's (unhashed) model
            self.previous_sha256, self.model_sha256 = self.model_sha256, ""
            self.switches += 1
        if self.connected:
            self.publish_birth()  # the controller sees the applied version at once, as from an agent

    def _on_command(self, cmd: fleet_pb2.Command) -> None:
        self.counters.commands += 1
        self.commands.append(cmd.kind)
        self._result(cmd, "ack")
        kind = cmd.kind
        if kind == "ping":
            self._result(cmd, "ok", "pong", {"bd_seq": str(self.bd_seq), "ts_ms": str(int(time.time() * 1000))})
        elif kind == "rebirth":
            self.publish_birth()
            self._result(cmd, "ok", "reborn", {"bd_seq": str(self.bd_seq)})
        elif kind == "reload-policy":
            if self.policy is None:
                self._result(cmd, "error", "no policy received yet")
            else:
                self._result(cmd, "ok", f"policy {self.policy_version} re-applied")
        elif kind == "drain-queue":
            drained, self.queue_depth = self.queue_depth, 0
            self._result(cmd, "ok", "drained", {"drained": str(drained)})
        elif kind == "unload-model":
            self.available = False
            self._result(cmd, "ok", "unloaded")
        else:
            self._result(cmd, "error", f"unsupported command {kind!r}")

    def _result(self, cmd: fleet_pb2.Command, status: str, message: str = "",
                data: dict[str, str] | None = None) -> None:
        if self.session is None:
            return
        r = fleet_pb2.CommandResult(id=cmd.id, device_id=self.device_id, status=status, message=message,
                                    data=data or {}, ts_ms=int(time.time() * 1000))
        self.session.publish(self._t_result, to_json(r), qos=1)


_GMQTT_LOG = logging.getLogger("nanofleet.sim.gmqtt")  # gmqtt logs every connect at INFO: keep it under ours


async def _close(session: _Session) -> None:
    """End a session: DISCONNECT if it is still open (then the broker keeps the last will to itself), close it."""
    conn = session._connection
    if conn is None or conn.is_closing():
        return  # never connected, or already gone: gmqtt would only warn about writing to a closed socket
    try:
        async with asyncio.timeout(3):
            await session.disconnect()
    except (OSError, TimeoutError) as exc:
        log.debug("closing %s: %r", session._client_id, exc)
