"""Policy on the device (DESIGN.md): only a policy addressed to this device is applied, the last one received on the
retained topic is current whatever its version (no stray version locks the device out), and the last applied one
is kept on disk and enforced from start — before the socket serves and with the broker down."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable

from nanofleet.agent.device_policy import PolicyFile
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.protos import fleet_pb2
from tests.agent.conftest import CHAT, DEV, FLEET, uds_client
from tests.conftest import free_port, until


def settings_for(make_settings: Callable[..., AgentSettings], broker_url: str) -> AgentSettings:
    return make_settings(broker_url=broker_url, fleet=FLEET, device_id=DEV, telemetry_interval_s=60)


async def test_hostile_policy_for_another_device_is_refused_and_cannot_lock_out_later_ones(
        broker, controller, make_settings, caplog) -> None:
    caplog.set_level(logging.INFO)
    svc = AgentService(settings_for(make_settings, broker.url), warmup=False)
    await svc.start()
    try:
        # the issue's hostile message: retained on dev-01's topic, addressed to "other", version 50
        controller.policy(device_id="other", version=50, cloud_allowed=False)
        await until(lambda: svc.device_session.counts["policy_refused"] >= 1, what="the foreign policy refused")
        assert svc.dispatcher.policy.version == 0 and svc.dispatcher.policy.cloud_allowed
        assert "addressed to fleet 'pol' device 'other'" in svc.device_session.policy_error
        assert any("refused" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        # a stray v50 that does name this device: applied (nothing tells it apart), but cannot lock the device
        controller.policy(version=50, cloud_allowed=False)
        await until(lambda: svc.dispatcher.policy.version == 50, what="v50 applied")
        controller.policy(version=5, cloud_allowed=True, min_free_ram_mb=64)  # the controller's real one
        await until(lambda: svc.dispatcher.policy.version == 5, what="the later v5 applied although 5 < 50")
        assert svc.dispatcher.policy.cloud_allowed and svc.dispatcher.policy.min_free_ram_mb == 64
        controller.cmd("r1", "reload-policy")
        result = await controller.result("r1")
        assert result["status"] == "ok" and result["message"] == "policy 5 re-applied"
        assert svc.dispatcher.policy.version == 5
        async with uds_client(svc.settings.socket_path) as c:
            status = (await c.get("/v1/status")).json()
        assert status["policy_version"] == 5
        assert status["policy"]["content"]["minFreeRamMb"] == 64 and status["policy"]["source"] == "controller"
        assert status["mqtt"]["counts"]["policy_refused"] >= 1  # each delivery (a retained copy again too)
    finally:
        await svc.stop()
    logged = [r.getMessage() for r in caplog.records]
    assert "agent: applied policy v5 (cloudAllowed: False -> True, minFreeRamMb: 0 -> 64)" in logged
    assert any(m.startswith(f"agent {DEV}: shutting down") for m in logged)
    assert not any("connection to the broker lost" in m for m in logged)  # a clean stop is not a lost connection
    stored = PolicyFile(svc.settings.data_dir).load(FLEET, DEV)
    assert stored is not None and stored.version == 5
    assert stat.S_IMODE((svc.settings.data_dir / "policy.json").stat().st_mode) == 0o600


async def test_the_last_policy_is_enforced_at_start_with_the_broker_down(broker, controller, make_settings) -> None:
    settings = settings_for(make_settings, broker.url)
    svc = AgentService(settings, warmup=False)
    await svc.start()
    try:
        controller.policy(version=7, cloud_allowed=False,
                          apps={"com.example.notes": fleet_pb2.AppPolicy(privacy="sensitive")})
        await until(lambda: svc.dispatcher.policy.version == 7, what="policy v7 applied")
    finally:
        await svc.stop()

    # restart with the broker unreachable: the limits hold from the first request
    down = settings.model_copy(update={"broker_url": f"mqtt://127.0.0.1:{free_port()}"})
    svc = AgentService(down, warmup=False)
    await svc.start()
    try:
        assert not svc.device_session.connected
        async with uds_client(down.socket_path) as c:
            r = await c.post("/v1/chat/completions", json=CHAT,
                             headers={"X-Nanofleet-App": "com.example.notes", "X-Nanofleet-Mode": "cloud_only"})
            assert r.status_code == 403 and r.headers["x-nanofleet-reason"] == "sensitive"
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"X-Nanofleet-Mode": "cloud_only"})
            assert r.status_code == 403 and r.headers["x-nanofleet-reason"] == "cloud_denied"
            status = (await c.get("/v1/status")).json()
        assert status["policy_version"] == 7 and status["policy"]["source"] == "stored"
        assert status["policy"]["content"]["apps"] == {"com.example.notes": {"privacy": "sensitive", "mode": ""}}
        assert status["mqtt"]["connected"] is False and status["mqtt"]["last_error"]
    finally:
        await svc.stop()


async def test_a_corrupt_policy_file_is_reported_and_the_agent_starts_on_defaults(make_settings, caplog) -> None:
    settings = make_settings(fleet=FLEET, device_id=DEV)
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "policy.json").write_text('{"version": "7", "cloud')
    svc = AgentService(settings, warmup=False)
    await svc.start()
    try:
        async with uds_client(settings.socket_path) as c:
            status = (await c.get("/v1/status")).json()
            assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
        assert status["policy_version"] == 0 and status["policy"]["source"] == "defaults"
        assert "the stored policy is corrupt" in status["policy"]["error"]
        assert status["policy"]["counts"]["policy_file_unusable"] == 1
        assert any("corrupt" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)  # a clear line, no trace
    finally:
        await svc.stop()


async def test_a_stored_policy_of_another_device_is_not_enforced(make_settings) -> None:
    settings = make_settings(fleet=FLEET, device_id=DEV)
    settings.data_dir.mkdir(parents=True)
    PolicyFile(settings.data_dir).save(fleet_pb2.RoutingPolicy(fleet=FLEET, device_id="other", version=9))
    svc = AgentService(settings, warmup=False)
    await svc.start()
    try:
        assert svc.dispatcher.policy.version == 0
        assert "not to this device" in svc.policy_error and svc.policy_counts["policy_file_unusable"] == 1
    finally:
        await svc.stop()
