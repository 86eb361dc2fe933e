"""DeviceSession: the telemetry loops and the policy/command handling over the shared state, with start and stop
(a new bdSeq and its will before each CONNECT, birth after CONNACK, a retained shutdown status on a clean stop)."""

from __future__ import annotations

import asyncio
import logging
import time

from nanofleet.agent.telemetry_buffer import TelemetryBuffer
from nanofleet.mqtt import MqttClient, MqttError
from nanofleet.protos import fleet_pb2, topics
from nanofleet.tasks import TaskSupervisor

from .base import now_ms, to_json
from .control import PolicyAndCommands
from .telemetry import TelemetryLoops

log = logging.getLogger("nanofleet.agent.device_session")  # one logger for the session, whichever module


class DeviceSession(TelemetryLoops, PolicyAndCommands):
    """The session: SessionBase's state, the telemetry loops and policy/command handling, started and stopped here."""

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
