"""The agent's MQTT session with the controller: birth/death, telemetry, policy, commands (after Sparkplug B).

- Every connection gets a new bdSeq (persisted in the data dir); its last will is a retained offline DeviceStatus
  carrying that bdSeq (reason "last_will"), set before the CONNECT. After CONNACK the session publishes the
  retained birth with the same bdSeq, and telemetry restarts at seq 0 (0..255, wrapping).
- A persistent MQTT session (fixed client id, clean_session False) keeps policy and commands queued at the broker.
- While the broker is unreachable (or the buffer still holds older samples) telemetry goes to a bounded disk
  buffer and is replayed in order with its original timestamps, flagged `replayed`, each batch deleted only once
  the broker acknowledged it. Live telemetry and replay wait until the controller is known to listen (a live,
  not retained, policy message after this connection's birth), with `replay_grace_s` as the fallback: telemetry
  published while no controller is subscribed would be dropped by the broker.
- Policy (device_policy.py has the rule): a RoutingPolicy addressed to this fleet and device whose content differs
  from the applied one goes to `hooks.apply_policy`, whatever its version (the last one received on the retained
  topic is the controller's current one); one addressed elsewhere is refused and counted. The session then
  re-publishes its birth so the controller sees the applied version at once. An `apply_policy` that raises is
  logged, counted and shown in `status()`; the session goes on taking policy and commands.
- Commands: ack first, then the result; rebirth, ping and reload-policy are the session's own, the rest go to
  `hooks.handle_command`.
- Every loop runs under a TaskSupervisor: a loop that dies is logged, counted, shown in `status()` and restarted.
Nothing here publishes from a paho callback: everything runs on the event loop.

Exceptions: DeviceSessionError (root).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

from nanofleet.agent import device_policy
from nanofleet.agent.errors import AgentError
from nanofleet.agent.hooks import AgentHooks
from nanofleet.agent.settings import AgentSettings
from nanofleet.agent.telemetry_buffer import TelemetryBuffer
from nanofleet.mqtt import MqttClient, MqttError, Will
from nanofleet.protos import fleet_pb2, topics
from nanofleet.tasks import TaskSupervisor

log = logging.getLogger(__name__)
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


class DeviceSession:
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

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.buffer = await asyncio.to_thread(TelemetryBuffer, s.data_dir / "telemetry_buffer.db", self._buffer_max)
        self._buffered = await asyncio.to_thread(len, self.buffer)
        if self.policy is None:
            self.policy_version = self.hooks.agent_metrics().policy_version
        self.client = MqttClient(
            s.broker_url or "", client_id=f"nanofleet-{self.fleet}-{self.device_id}", clean_session=False,
            username=s.mqtt_username, password=s.mqtt_password, keepalive=self._keepalive, will=self._next_will,
            backoff=self._backoff, on_connect=self._on_connect, on_disconnect=self._on_disconnect,
        )
        self.client.subscribe([(topics.policy(self.fleet, self.device_id), 1),
                               (topics.cmd(self.fleet, self.device_id), 1)])
        self._closing = False
        await self.client.start()
        self.tasks = TaskSupervisor("device-session", restart_base_s=self._restart_base_s)
        self.tasks.spawn(self._telemetry_loop, "telemetry")
        self.tasks.spawn(self._replay_loop, "replay")
        self.tasks.spawn(self._message_loop, "messages")

    async def stop(self) -> None:
        """Graceful: a retained offline status (reason shutdown) with this bdSeq, then a clean disconnect."""
        self._closing = True
        await self.tasks.stop()
        if self.client is not None:
            if self.client.connected:
                bye = fleet_pb2.DeviceStatus(fleet=self.fleet, device_id=self.device_id, online=False,
                                             bd_seq=self.bd_seq, reason="shutdown", ts_ms=now_ms())
                try:
                    async with asyncio.timeout(3):
                        await self.client.publish(self._t_status, to_json(bye), 1, retain=True)
                except (TimeoutError, MqttError) as exc:  # the broker's copy of our will says offline anyway
                    log.warning("%s: could not publish the shutdown status: %r", self.device_id, exc)
            await self.client.stop()
            self.client = None
            self.connected_since = None
        if self.buffer is not None:
            await asyncio.to_thread(self.buffer.close)
            self.buffer = None

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

    async def _on_disconnect(self) -> None:
        self.connected_since = None
        if self._closing:
            return  # our own clean disconnect
        self.last_error = f"connection to the broker lost at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        log.warning("%s: %s", self.device_id, self.last_error)

    async def _on_connect(self, session_present: bool) -> None:
        self.connected_since = time.time()
        self._controller_listening.clear()
        try:
            await self.publish_birth()
        except (TimeoutError, asyncio.CancelledError):
            return
        self._replay.set()
        self._wake.set()

    # -- telemetry -------------------------------------------------------------------------------------------------
    async def sample(self) -> fleet_pb2.Telemetry:
        t = await asyncio.to_thread(self.collector.sample)
        m = self.hooks.agent_metrics()
        t.device_id, t.bd_seq, t.seq = self.device_id, self.bd_seq, self.seq
        self.seq = (self.seq + 1) & 0xFF
        if not t.ts_ms:
            t.ts_ms = now_ms()
        t.model.CopyFrom(self.hooks.model_state())
        for route, n in m.route_counts.items():
            t.route_counts[route] = n
        t.queue_depth = m.queue_depth
        t.slots_waiting = m.slots_waiting
        t.queue_oldest_age_s = m.queue_oldest_age_s
        for name, n in m.queue_counters.items():
            t.queue_counters[name] = n
        t.policy_version = self.policy_version or m.policy_version
        t.gateway_reachable = m.gateway_reachable
        return t

    async def _telemetry_loop(self) -> None:
        assert self.buffer is not None and self.client is not None
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            self._wake.clear()
            if not self.paused:
                t = await self.sample()
                live = self._listening()
                if live and not self._replay.is_set() and not self._buffered:
                    if self.client.publish_nowait(self._t_telemetry, to_json(t), qos=1):
                        self.sent += 1
                    else:  # lost the connection between the check and the publish
                        await self._push(t)
                else:
                    dropped = await self._push(t)
                    if dropped:
                        log.warning("%s: telemetry buffer full, dropped %d oldest", self.device_id, dropped)
                    if self.connected:
                        self._replay.set()
            next_at = max(next_at + self.interval_s, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(next_at - loop.time()):  # unlike 3.11's wait_for, never eats a cancel
                    await self._wake.wait()
            if self._wake.is_set() and loop.time() < next_at:
                next_at = loop.time()  # interval changed or reconnected: sample now

    def _listening(self) -> bool:
        """Connected, and the controller was seen listening on this very connection (not a previous one)."""
        return self.client is not None and self.client.connected and self._listening_conn == self.client.connects

    async def _await_listener(self) -> None:
        """Until the controller listens on this connection; after replay_grace_s, assume it does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replay_grace_s
        while not self._listening() and self.connected:
            self._controller_listening.clear()
            left = deadline - loop.time()
            if left <= 0:
                assert self.client is not None
                self._listening_conn = self.client.connects
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._controller_listening.wait()

    async def _push(self, t: fleet_pb2.Telemetry) -> int:
        assert self.buffer is not None
        dropped = await asyncio.to_thread(self.buffer.push, t.SerializeToString())
        self._buffered = self._buffered + 1 - dropped
        return dropped

    async def _replay_loop(self) -> None:
        assert self.buffer is not None and self.client is not None
        while True:
            await self._replay.wait()
            await self._await_listener()
            try:
                while self._listening():  # not merely connected: the controller must be subscribed (see above)
                    batch = await asyncio.to_thread(self.buffer.peek, 200)
                    if not batch:
                        break
                    futs = []
                    conn = self.client.connects
                    for _, payload in batch:
                        t = fleet_pb2.Telemetry.FromString(payload)
                        t.replayed = True
                        futs.append(self.client.publish(self._t_telemetry, to_json(t), qos=1))
                    try:
                        async with asyncio.timeout(15):
                            await asyncio.gather(*futs)
                    except TimeoutError:
                        if not self.connected:
                            break  # paho resends them after reconnecting; the buffer keeps them meanwhile
                        raise
                    if self.client.connects != conn:
                        # acked only after paho resent them on a new connection, possibly before the controller
                        # subscribed there: keep them and send again (the controller drops duplicates)
                        continue
                    await asyncio.to_thread(self.buffer.delete, [i for i, _ in batch])
                    self._buffered = max(0, self._buffered - len(batch))
                    self.sent += len(batch)
            except (MqttError, OSError, TimeoutError) as exc:  # the loop dies (and restarts) on anything else
                self.counts["replay_interrupted"] += 1
                log.warning("%s: replay interrupted: %r", self.device_id, exc)
                await asyncio.sleep(0.5)
                continue
            if self._listening() and not self._buffered:
                self._replay.clear()
            else:
                await asyncio.sleep(0.1)

    # -- policy and commands --------------------------------------------------------------------------------------
    async def _message_loop(self) -> None:
        assert self.client is not None
        async for msg in self.client.messages():
            try:
                kind = topics.parse(msg.topic).kind
            except topics.TopicError as exc:
                self.counts["message_bad_topic"] += 1
                log.warning("%s: ignoring a message on %r: %s", self.device_id, msg.topic, exc)
                continue
            if kind == "policy" and msg.payload:
                if not msg.retain and self.client is not None and msg.conn == self.client.connects:
                    # A live policy (not the broker's stored copy) means the controller is connected and
                    # subscribed now: telemetry sent from here on reaches it. It republishes on every new birth
                    # (after Sparkplug's primary host STATE), so a device waits for it before replaying.
                    self._listening_conn = msg.conn
                    self._controller_listening.set()
                    self._wake.set()
                await self._on_policy(msg.payload)
            elif kind == "cmd":
                self.tasks.spawn(functools.partial(self._on_command, msg.payload), "command", on_death="log",
                                 forever=False)

    async def _on_policy(self, payload: bytes) -> None:
        try:
            policy = json_format.Parse(payload, fleet_pb2.RoutingPolicy(), ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            self._policy_not_applied("policy_malformed", f"malformed policy ignored: {exc}")
            return
        try:
            device_policy.check_addressed(policy, self.fleet, self.device_id)
        except device_policy.PolicyRefused as exc:
            self._policy_not_applied("policy_refused", exc.message)
            return
        if device_policy.same(policy, self.policy):
            return  # the retained copy again (every reconnect), or the controller's live republish
        await self._apply(policy)

    def _policy_not_applied(self, what: str, why: str) -> None:
        self.counts[what] += 1
        self.policy_error = why
        log.warning("%s: %s", self.device_id, why)

    async def _apply(self, policy: fleet_pb2.RoutingPolicy) -> bool:
        """Hand `policy` to the agent; False (logged, counted, in status) when the agent could not apply it."""
        try:
            await self.hooks.apply_policy(policy)
        except Exception as exc:  # any failure of the hook: logged with traceback, counted, shown
            self.counts["policy_failed"] += 1
            self.policy_error = f"policy v{policy.version} could not be applied: {type(exc).__name__}: {exc}"
            log.error("%s: %s", self.device_id, self.policy_error, exc_info=exc)
            return False
        self.counts["policy_applied"] += 1
        self.policy_error = ""
        self.policy, self.policy_version = policy, policy.version
        if self._follow_interval and policy.telemetry_interval_s and policy.telemetry_interval_s != self.interval_s:
            self.interval_s = float(policy.telemetry_interval_s)
            self._wake.set()
        if self.connected:
            try:
                await self.publish_birth()  # the controller sees the applied version at once
            except (TimeoutError, MqttError) as exc:
                log.warning("%s: birth after policy v%d not published: %r", self.device_id, policy.version, exc)
        return True

    async def _result(self, cmd: fleet_pb2.Command, status: str, message: str = "",
                      data: dict[str, str] | None = None) -> None:
        assert self.client is not None
        r = fleet_pb2.CommandResult(id=cmd.id, device_id=self.device_id, status=status, message=message,
                                    data=data or {}, ts_ms=now_ms())
        async with asyncio.timeout(10):
            await self.client.publish(self._t_result, to_json(r), qos=1)

    async def _on_command(self, payload: bytes) -> None:
        try:
            cmd = json_format.Parse(payload, fleet_pb2.Command(), ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            self.counts["command_malformed"] += 1
            log.warning("%s: ignoring malformed command: %s", self.device_id, exc)
            return
        try:
            await self._result(cmd, "ack")
            if cmd.kind == "ping":
                await self._result(cmd, "ok", "pong", {"bd_seq": str(self.bd_seq), "ts_ms": str(now_ms())})
            elif cmd.kind == "rebirth":
                await self.publish_birth()
                await self._result(cmd, "ok", "reborn", {"bd_seq": str(self.bd_seq)})
            elif cmd.kind == "reload-policy":
                if self.policy is None:
                    await self._result(cmd, "error", "no policy received yet")
                else:
                    await self.hooks.apply_policy(self.policy)  # a failure becomes an error result below
                    await self._result(cmd, "ok", f"policy {self.policy_version} re-applied")
            else:
                async with asyncio.timeout(cmd.timeout_s or 30):
                    result = await self.hooks.handle_command(cmd)
                result.id, result.device_id = cmd.id, self.device_id
                result.ts_ms = result.ts_ms or now_ms()
                assert self.client is not None
                async with asyncio.timeout(10):
                    await self.client.publish(self._t_result, to_json(result), qos=1)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            await self._safe_result(cmd, "error", f"timed out after {cmd.timeout_s or 30}s")
        except Exception as exc:  # a failing command is answered with its error, and logged
            self.counts["command_failed"] += 1
            log.error("%s: command %s (%s) failed", self.device_id, cmd.id, cmd.kind, exc_info=exc)
            await self._safe_result(cmd, "error", f"{type(exc).__name__}: {exc}")

    async def _safe_result(self, cmd: fleet_pb2.Command, status: str, message: str) -> None:
        try:
            await self._result(cmd, status, message)
        except (TimeoutError, MqttError) as exc:
            self.counts["command_result_lost"] += 1
            log.warning("%s: result of command %s not published: %r", self.device_id, cmd.id, exc)


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
