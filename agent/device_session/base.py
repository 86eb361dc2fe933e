"""The device session's state and what every part of it uses: identity, bdSeq, birth, status, the connection.

The loops live in telemetry.py (sampling, buffering, replay) and control.py (policy and commands); session.py joins
them into DeviceSession with its start/stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from google.protobuf import json_format
from google.protobuf.message import Message as PbMessage

from nanofleet.agent.errors import AgentError
from nanofleet.agent.settings import AgentSettings
from nanofleet.agent.telemetry_buffer import TelemetryBuffer
from nanofleet.mqtt import MqttClient, Will
from nanofleet.protos import fleet_pb2, topics
from nanofleet.tasks import TaskSupervisor

from .hooks import AgentHooks

log = logging.getLogger("nanofleet.agent.device_session")  # one logger for the session, whichever module
SESSION_COMMANDS = ("rebirth", "ping", "reload-policy")
CAPABILITIES = ("telemetry", "policy", "commands", "offline-buffer")

try:
    AGENT_VERSION = version("nanofleet")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    AGENT_VERSION = "0.0.0"


class DeviceSessionError(AgentError):
    """Root of the device session's errors."""


class SampleSource(Protocol):
    def sample(self) -> fleet_pb2.Telemetry: ...


@runtime_checkable
class ReportsReadErrors(Protocol):
    """A sample source that counts its failed reads (the real Collector); status() shows them."""

    def status(self) -> dict[str, Any]: ...


def to_json(msg: PbMessage) -> bytes:
    return json_format.MessageToJson(msg, indent=None).encode()


def now_ms() -> int:
    return int(time.time() * 1000)


class SessionBase:
    """State shared by the telemetry loops and the policy/command handling (see the package docstring)."""

    def __init__(
        self,
        settings: AgentSettings,
        hooks: AgentHooks,
        *,
        collector: SampleSource | None = None,
        buffer_max: int = 10_000,
        keepalive: int = 30,
        backoff: tuple[float, float] = (0.5, 30.0),
        follow_policy_interval: bool = True,
        hardware: fleet_pb2.Hardware | None = None,
        replay_grace_s: float = 10.0,
        policy: fleet_pb2.RoutingPolicy | None = None,
        restart_base_s: float = 0.5,
    ) -> None:
        if not settings.broker_url:
            raise DeviceSessionError("settings.broker_url is not set: the agent runs without a controller")
        self.settings = settings
        self.hooks = hooks
        self.fleet, self.device_id = settings.fleet, settings.device_id
        if collector is None:
            from nanofleet.agent.telemetry import Collector

            collector = Collector(settings.sysfs_root, disk_path=settings.data_dir)
        self.collector = collector
        self.interval_s = float(settings.telemetry_interval_s)
        self._follow_interval = follow_policy_interval
        self._keepalive, self._backoff, self._buffer_max = keepalive, backoff, buffer_max
        self._hardware = hardware
        self.replay_grace_s = replay_grace_s
        self._state_path = settings.data_dir / "device_session.json"
        self.bd_seq = self._load_bd_seq()
        self.seq = 0
        self.policy: fleet_pb2.RoutingPolicy | None = policy  # the one applied (e.g. restored from disk)
        self.policy_version = policy.version if policy is not None else 0
        if follow_policy_interval and policy is not None and policy.telemetry_interval_s:
            self.interval_s = float(policy.telemetry_interval_s)
        self.policy_error = ""  # why the last policy received was not applied ("" when it was)
        self.counts: Counter[str] = Counter()  # policy_applied, policy_refused, policy_malformed, policy_failed, ...
        self.connected_since: float | None = None
        self.last_error = ""
        self._closing = False
        self._restart_base_s = restart_base_s
        self.tasks = TaskSupervisor("device-session", restart_base_s=restart_base_s)
        self.paused = False  # tests/simulator: stop telemetry without dropping the connection (no last will)
        self.sent = 0
        self.buffer: TelemetryBuffer | None = None
        self._buffered = 0  # items in the buffer, mirrored here so the loop never asks SQLite
        self.client: MqttClient | None = None
        self._wake = asyncio.Event()
        self._replay = asyncio.Event()
        self._controller_listening = asyncio.Event()  # set by a live policy message on this connection
        self._listening_conn = -1  # the connection (client.connects) on which the controller was seen listening
        self._t_status = topics.status(self.fleet, self.device_id)
        self._t_telemetry = topics.telemetry(self.fleet, self.device_id)
        self._t_result = topics.cmd_result(self.fleet, self.device_id)

    # -- bdSeq ---------------------------------------------------------------------------------------------------
    def _load_bd_seq(self) -> int:
        try:
            return int(json.loads(self._state_path.read_text())["bd_seq"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _next_will(self) -> Will:
        """Called by the MQTT client before every connection attempt (network thread): a new bdSeq, its will."""
        self.bd_seq += 1
        try:
            tmp = self._state_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o600)  # state of this device: not the umask's business
                f.write(json.dumps({"bd_seq": self.bd_seq}))
            os.replace(tmp, self._state_path)
        except OSError as exc:
            log.warning("cannot persist bd_seq: %s", exc)
        death = fleet_pb2.DeviceStatus(fleet=self.fleet, device_id=self.device_id, online=False, bd_seq=self.bd_seq,
                                       reason="last_will", ts_ms=now_ms())
        return Will(self._t_status, to_json(death), qos=1, retain=True)

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    def status(self) -> dict[str, Any]:
        """The MQTT side of /v1/status: connection, policy reception, counters, loops."""
        client_error = self.client.last_error if self.client is not None else None
        sensors = self.collector.status() if isinstance(self.collector, ReportsReadErrors) else None
        return {"broker": self.settings.broker_url, "connected": self.connected,
                "since": self.connected_since, "last_error": client_error or self.last_error or None,
                "bd_seq": self.bd_seq, "telemetry_sent": self.sent, "telemetry_buffered": self._buffered,
                "policy_error": self.policy_error or None, "counts": dict(self.counts),
                "tasks": self.tasks.status(), "sensors": sensors}

    # -- birth -----------------------------------------------------------------------------------------------------
    def birth(self) -> fleet_pb2.DeviceStatus:
        hw = self._hardware or _hardware(self.settings.sysfs_root)
        return fleet_pb2.DeviceStatus(
            fleet=self.fleet, device_id=self.device_id, online=True, bd_seq=self.bd_seq, ts_ms=now_ms(),
            agent_version=AGENT_VERSION, model=self.hooks.model_state(), capabilities=list(CAPABILITIES),
            hardware=hw, policy_version=self.policy_version, telemetry_interval_s=max(1, round(self.interval_s)),
        )

    async def publish_birth(self) -> None:
        assert self.client is not None
        self.seq = 0
        async with asyncio.timeout(10):
            await self.client.publish(self._t_status, to_json(self.birth()), 1, retain=True)


def _hardware(sysfs_root: Path) -> fleet_pb2.Hardware:
    board = ""
    with contextlib.suppress(OSError):
        board = (sysfs_root / "firmware/devicetree/base/model").read_text(errors="replace").strip("\x00\n ")
    try:
        import psutil

        ram = psutil.virtual_memory().total // (1024 * 1024)
    except ImportError:  # pragma: no cover
        ram = 0
    return fleet_pb2.Hardware(platform=platform.system().lower(), machine=platform.machine(),
                              cpu_count=os.cpu_count() or 1, ram_total_mb=ram, board=board)
