"""Commands to devices: publish a Command, wait for its ack and its result, with a deadline.

Results arrive on `.../cmd/result` (ingest hands them to `on_result`, or `listen()` subscribes itself for a CLI).

Nothing is lost silently: `counters` counts a fire the client did not take (`fire_not_sent`, also raised as
CommandNotSent), a result `listen()` could not use (`results_rejected`, logged) and a result no one waits for any
more (`results_unclaimed`: late, after its timeout, or another controller's).

Exceptions (errors.py): CommandError ← UnknownCommand, CommandNotSent; timeouts raise TimeoutError (the web API maps
it to 504).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from google.protobuf import json_format

from nanofleet.controller.errors import CommandError, CommandNotSent, UnknownCommand
from nanofleet.mqtt import MqttClient, Publisher
from nanofleet.protos import fleet_pb2, topics
from nanofleet.protos.names import COMMAND_KINDS

__all__ = ["KINDS", "CommandError", "CommandNotSent", "CommandOutcome", "CommandService", "UnknownCommand"]

log = logging.getLogger(__name__)

KINDS = COMMAND_KINDS  # the one list (protos/names.py)


@dataclass
class CommandOutcome:
    id: str
    device_id: str
    kind: str
    acked: bool = False
    status: str = ""  # ok | error (the final result)
    message: str = ""
    data: dict[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0


@dataclass
class _Waiter:
    acked: asyncio.Event
    result: asyncio.Future[fleet_pb2.CommandResult]


class CommandService:
    def __init__(self, client: Publisher, fleet: str, *, default_timeout_s: float = 10.0) -> None:
        self.client, self.fleet = client, fleet
        self.default_timeout_s = default_timeout_s
        self._waiters: dict[str, _Waiter] = {}
        self.counters: Counter[str] = Counter()  # fire_not_sent, results_rejected, results_unclaimed

    def on_result(self, result: fleet_pb2.CommandResult) -> None:
        """Feed one CommandResult (call on the event loop)."""
        w = self._waiters.get(result.id)
        if w is None:
            self.counters["results_unclaimed"] += 1
            return
        if result.status == "ack":
            w.acked.set()
        elif not w.result.done():
            w.acked.set()
            w.result.set_result(result)

    def fire(self, device_id: str, kind: str, args: dict[str, str] | None = None) -> str:
        """Publish without waiting (e.g. the controller's own rebirth requests); CommandNotSent (counted) when the
        client did not take it."""
        cmd = self._command(kind, args or {}, self.default_timeout_s)
        payload = json_format.MessageToJson(cmd, indent=None)
        if not self.client.publish_nowait(topics.cmd(self.fleet, device_id), payload, 1):
            self.counters["fire_not_sent"] += 1
            raise CommandNotSent(f"{kind} to {device_id}: not sent (the MQTT client did not take it: "
                                 f"{getattr(self.client, 'last_error', None) or 'not connected'})")
        return cmd.id

    def _command(self, kind: str, args: dict[str, str], timeout_s: float) -> fleet_pb2.Command:
        if kind not in KINDS:
            raise UnknownCommand(f"unknown command {kind!r}: expected one of {', '.join(KINDS)}")
        return fleet_pb2.Command(id=uuid.uuid4().hex, kind=kind, args=args, issued_at_ms=int(time.time() * 1000),
                                 timeout_s=max(1, round(timeout_s)))

    async def send(self, device_id: str, kind: str, args: dict[str, str] | None = None,
                   timeout_s: float | None = None) -> CommandOutcome:
        """Send and wait for the result; TimeoutError (saying whether it was acked) past the deadline."""
        topics.check_id(device_id, "device")
        limit = timeout_s or self.default_timeout_s
        cmd = self._command(kind, dict(args or {}), limit)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(asyncio.Event(), loop.create_future())
        self._waiters[cmd.id] = waiter
        start = time.monotonic()
        try:
            await self.client.publish(topics.cmd(self.fleet, device_id), json_format.MessageToJson(cmd, indent=None), 1)
            try:
                left = max(0.1, limit - (time.monotonic() - start))
                result = await asyncio.wait_for(asyncio.shield(waiter.result), left)
            except TimeoutError:
                state = "acknowledged but no result" if waiter.acked.is_set() else "no acknowledgement"
                raise TimeoutError(f"{kind} to {device_id}: {state} within {limit:g}s") from None
        finally:
            self._waiters.pop(cmd.id, None)
        return CommandOutcome(cmd.id, device_id, kind, True, result.status, result.message, dict(result.data),
                              (time.monotonic() - start) * 1000)

    async def listen(self) -> None:
        """Subscribe to the fleet's results on this client and feed them (for a client without ingest)."""
        from nanofleet.controller.decode import PayloadError, decode_result

        assert isinstance(self.client, MqttClient), "listen() needs a subscribing client"
        self.client.subscribe([(topics.fleet_filter(self.fleet, "cmd/result"), 1)])
        async for msg in self.client.messages():
            try:
                t = topics.parse(msg.topic)
                self.on_result(decode_result(msg.payload, t.device))
            except (topics.TopicError, PayloadError) as exc:
                self.counters["results_rejected"] += 1
                log.warning("command result on %r skipped: %s", msg.topic, exc)
