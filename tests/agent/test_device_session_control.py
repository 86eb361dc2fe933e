"""The device session's policy and command handling against a real broker: bad payloads are counted and skipped,
a failing or slow command is answered with its error, and the session keeps going."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from google.protobuf import json_format

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.protos import fleet_pb2, topics
from tests.agent.conftest import DEV, FLEET, Controller
from tests.agent.test_device_policy import settings_for
from tests.conftest import until


class Agent(AgentService):
    """The real agent whose unload-model command fails and whose reload-model command hangs."""

    async def handle_command(self, command: fleet_pb2.Command) -> fleet_pb2.CommandResult:
        if command.kind == "unload-model":
            raise RuntimeError("the model file vanished")
        if command.kind == "reload-model":
            await asyncio.Event().wait()
        return await super().handle_command(command)


def publish(controller: Controller, topic: str, payload: bytes | str) -> None:
    controller.c.publish(topic, payload, qos=1).wait_for_publish()


async def test_bad_payloads_are_counted_and_the_session_goes_on(broker, controller: Controller,
                                                                make_settings: Callable[..., AgentSettings]) -> None:
    svc = Agent(settings_for(make_settings, broker.url), warmup=False)
    await svc.start()
    try:
        session = svc.device_session
        await until(lambda: session.connected, what="the session connected")
        controller.cmd("n0", "reload-policy")  # nothing received yet: an error result, not a crash
        assert (await controller.result("n0"))["message"] == "no policy received yet"
        publish(controller, topics.policy(FLEET, DEV), b"{not json")
        await until(lambda: session.counts["policy_malformed"] == 1, what="the malformed policy counted")
        assert "malformed policy" in session.policy_error
        publish(controller, topics.cmd(FLEET, DEV), b"\xff\xfe")
        await until(lambda: session.counts["command_malformed"] == 1, what="the malformed command counted")
        controller.policy(version=3, min_free_ram_mb=77, telemetry_interval_s=3)
        await until(lambda: svc.dispatcher.policy.version == 3, what="v3 applied after the bad ones")
        assert svc.dispatcher.policy.min_free_ram_mb == 77
        # the session takes the policy's interval once the agent has stored the policy (an await later)
        await until(lambda: session.interval_s == 3 and session.policy_error == "", what="the policy's interval")
        controller.cmd("b1", "rebirth")
        assert (await controller.result("b1"))["message"] == "reborn"
    finally:
        await svc.stop()


async def test_a_failing_or_hanging_command_is_answered_with_its_error(
        broker, controller: Controller, make_settings: Callable[..., AgentSettings]) -> None:
    svc = Agent(settings_for(make_settings, broker.url), warmup=False)
    await svc.start()
    try:
        await until(lambda: svc.device_session.connected, what="the session connected")
        controller.cmd("u1", "unload-model")
        failed = await controller.result("u1")
        assert failed["status"] == "error" and failed["message"] == "RuntimeError: the model file vanished"
        assert svc.device_session.counts["command_failed"] == 1
        slow = fleet_pb2.Command(id="r1", kind="reload-model", issued_at_ms=1, timeout_s=1)
        publish(controller, topics.cmd(FLEET, DEV), json_format.MessageToJson(slow))
        timed_out = await controller.result("r1")
        assert (timed_out["status"], timed_out["message"]) == ("error", "timed out after 1s")
        controller.cmd("p1", "ping")  # and the session still answers
        assert (await controller.result("p1"))["message"] == "pong"
    finally:
        await svc.stop()
