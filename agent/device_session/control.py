"""Policy and commands: policy addressed to this device is applied through the hooks (a failure is logged, counted,
shown; the session goes on), commands are acknowledged first, then answered with their result.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from google.protobuf import json_format

from nanofleet.agent import device_policy
from nanofleet.mqtt import MqttError
from nanofleet.protos import fleet_pb2, topics

from .base import SessionBase, now_ms, to_json

log = logging.getLogger("nanofleet.agent.device_session")  # one logger for the session, whichever module


class PolicyAndCommands(SessionBase):
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
