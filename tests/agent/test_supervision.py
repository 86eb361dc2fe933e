"""Nothing dies silently in the agent: a failing policy hook is logged, counted and shown while the session keeps
taking policy and commands; a dying session loop is restarted; a dead socket server stops the process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nanofleet.agent.device_session import DeviceSession
from nanofleet.agent.errors import AgentFatal
from nanofleet.agent.service import AgentService
from nanofleet.protos import fleet_pb2
from tests.agent.conftest import DEV, FLEET, uds_client
from tests.agent.test_device_policy import settings_for
from tests.conftest import until


class FlakyPolicyAgent(AgentService):
    """The real agent, whose policy hook fails for one version (as a full disk or a bad model switch would)."""

    async def apply_policy(self, policy: fleet_pb2.RoutingPolicy, *, persist: bool = True) -> None:
        if policy.version == 6:
            raise OSError("disk on fire")
        await super().apply_policy(policy, persist=persist)


async def test_a_failing_apply_policy_is_reported_and_the_session_goes_on(broker, controller, make_settings,
                                                                          caplog) -> None:
    svc = FlakyPolicyAgent(settings_for(make_settings, broker.url), warmup=False)
    await svc.start()
    try:
        controller.policy(version=6, cloud_allowed=False)
        # (counted again if the broker hands the retained v6 over again, e.g. after a reconnect: it was not applied)
        await until(lambda: svc.device_session.counts["policy_failed"] >= 1, what="the failure counted")
        assert any("could not be applied: OSError: disk on fire" in r.getMessage() and r.exc_info
                   for r in caplog.records if r.levelno == logging.ERROR)
        async with uds_client(svc.settings.socket_path) as c:
            status = (await c.get("/v1/status")).json()
        assert "disk on fire" in status["policy"]["error"] and status["policy"]["counts"]["policy_failed"] >= 1
        controller.policy(version=7, min_free_ram_mb=99)  # the next policy still gets through
        await until(lambda: svc.dispatcher.policy.version == 7, what="v7 applied after the failure")
        controller.cmd("p1", "ping")
        assert (await controller.result("p1"))["status"] == "ok"
        controller.cmd("r1", "reload-policy")
        assert (await controller.result("r1"))["message"] == "policy 7 re-applied"
        assert svc.device_session.policy_error == ""
    finally:
        await svc.stop()


class FlakyCollector:
    """Telemetry samples; the second one fails (a sensor read raising what nobody expected)."""

    def __init__(self) -> None:
        self.calls = 0

    def sample(self) -> fleet_pb2.Telemetry:
        self.calls += 1
        if self.calls == 2:
            raise ZeroDivisionError("sensor returned nonsense")
        return fleet_pb2.Telemetry(cpu_percent=1.0)


async def test_a_dying_session_loop_is_logged_counted_and_restarted(broker, make_settings, caplog) -> None:
    settings = make_settings(broker_url=broker.url, fleet=FLEET, device_id=DEV, telemetry_interval_s=0.05)
    hooks = AgentService(settings, warmup=False)
    collector = FlakyCollector()
    session = DeviceSession(settings, hooks, collector=collector, restart_base_s=0.01)
    await session.start()
    try:
        await until(lambda: collector.calls >= 5, what="sampling going on after the failing sample")
        death = session.status()["tasks"]["deaths"]["telemetry"]
        assert death["count"] == 1 and "sensor returned nonsense" in death["error"]
        assert "telemetry" in session.tasks.running
        assert any("task telemetry died" in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        await session.stop()
        await hooks.models.close()


async def test_a_socket_server_that_stops_on_its_own_stops_the_agent(make_settings, caplog) -> None:
    svc = AgentService(make_settings(), warmup=False)
    ready = asyncio.Event()
    run = asyncio.ensure_future(svc.run(ready=lambda line: ready.set()))
    try:
        async with asyncio.timeout(30):
            await ready.wait()
        assert svc._server is not None
        svc._server.should_exit = True  # uvicorn's serve() returns while nobody asked the agent to stop
        result: list[Any] = []
        async with asyncio.timeout(30):
            try:
                await run
            except AgentFatal as exc:
                result.append(exc)
        assert result and "socket server stopped on its own" in str(result[0].__cause__)
        assert not svc.settings.socket_path.exists()
        assert svc.tasks.deaths["socket-server"].count == 1
        assert any(r.levelno == logging.CRITICAL and "socket-server" in r.getMessage() for r in caplog.records)
    finally:
        if not run.done():
            run.cancel()


def test_a_failing_sensor_read_shows_in_the_sessions_status(make_settings, tmp_path) -> None:
    """The MQTT section of /v1/status carries the collector's read errors (the sample itself has no field for them)."""
    from nanofleet.agent.telemetry import Collector

    settings = make_settings(broker_url="mqtt://127.0.0.1:1", fleet=FLEET, device_id=DEV)
    hooks = AgentService(settings, warmup=False)
    session = DeviceSession(settings, hooks, collector=Collector(tmp_path, disk_path=tmp_path / "gone", vcgencmd=None))
    session.collector.sample()
    sensors = session.status()["sensors"]
    assert sensors["errors"] == {"disk_usage": 1} and "gone" in sensors["last_error"]
