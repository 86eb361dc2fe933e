"""`/v1/status` tells the truth about the cloud route: a real gateway (in-process, real gRPC) whose upstream is
NOT_SERVING is reachable but not serving, one that refused the device's revoked token is `refused` — each with
its reason, in the status and in the answer's X-Nanofleet-Reason. And `charging` is unknown without a battery."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nanofleet.agent.service import AgentService, sample_device
from nanofleet.agent.settings import AgentSettings
from nanofleet.controller.gateway.auth import revoke_token
from tests.agent.conftest import CHAT, uds_client

CLOUD_ONLY = {**CHAT, "nanofleet": {"mode": "cloud_only"}}


def agent_for(make_settings: Callable[..., AgentSettings], address: str, token: str) -> AgentService:
    settings = make_settings(fleet="test", device_id="dev-1", gateway_address=address, gateway_token=token)
    return AgentService(settings, warmup=False)


async def test_a_gateway_whose_upstream_is_not_serving_is_reachable_but_not_serving(make_gateway,
                                                                                   make_settings) -> None:
    running = await make_gateway(env={})  # no API key: the gateway serves gRPC, its upstream NOT_SERVING
    svc = agent_for(make_settings, running.gateway.address, running.token("dev-1"))
    await svc.start()
    try:
        async with uds_client(svc.settings.socket_path) as c:
            first = await c.post("/v1/chat/completions", json=CLOUD_ONLY)  # the call fails: then it is queued
            assert first.status_code == 202 and first.headers["x-nanofleet-route"] == "queue"
            assert first.headers["x-nanofleet-reason"] == "cloud_not_serving"
            cloud = (await c.get("/v1/status")).json()["routes"]["cloud"]
            assert cloud["state"] == "not_serving" and cloud["reachable"] is True and cloud["serving"] is False
            assert cloud["refused"] is False and "GEMINI_API_KEY" in cloud["why"]
            again = await c.post("/v1/chat/completions", json=CLOUD_ONLY)  # decided before calling now: queued
            assert again.status_code == 202 and again.headers["x-nanofleet-route"] == "queue"
            assert again.headers["x-nanofleet-reason"] == "cloud_not_serving"
            denied = await c.post("/v1/chat/completions",
                                  json={**CLOUD_ONLY, "nanofleet": {**CLOUD_ONLY["nanofleet"], "queue": "deny"}})
            assert denied.status_code == 503 and denied.headers["x-nanofleet-reason"] == "cloud_not_serving"
            assert denied.json()["error"]["code"] == "cloud_unavailable"
            local = await c.post("/v1/chat/completions", json=CHAT)  # the local route is not affected
            assert local.status_code == 200 and local.headers["x-nanofleet-route"] == "local"
    finally:
        await svc.stop()


async def test_a_revoked_token_shows_as_refused_with_the_gateways_words(make_gateway, make_settings) -> None:
    running = await make_gateway()
    svc = agent_for(make_settings, running.gateway.address, running.token("dev-1"))
    await svc.start()
    try:
        async with uds_client(svc.settings.socket_path) as c:
            assert (await c.post("/v1/chat/completions", json=CLOUD_ONLY)).status_code == 200
            cloud = (await c.get("/v1/status")).json()["routes"]["cloud"]
            assert cloud["state"] == "serving" and cloud["reachable"] and cloud["serving"]
            revoke_token(running.gateway.db_path, "dev-1")
            refused = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
            assert refused.status_code == 403 and refused.headers["x-nanofleet-reason"] == "cloud_refused"
            cloud = (await c.get("/v1/status")).json()["routes"]["cloud"]
            assert cloud["state"] == "refused" and cloud["refused"] is True and cloud["reachable"] is True
            assert "PERMISSION_DENIED" in cloud["why"] or "UNAUTHENTICATED" in cloud["why"]
            again = await c.post("/v1/chat/completions", json=CLOUD_ONLY)  # decided before calling: queued
            assert again.status_code == 202 and again.headers["x-nanofleet-reason"] == "cloud_refused"
            denied = await c.post("/v1/chat/completions",
                                  json={**CLOUD_ONLY, "nanofleet": {**CLOUD_ONLY["nanofleet"], "queue": "deny"}})
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "cloud_refused"
    finally:
        await svc.stop()


async def test_charging_is_unknown_without_a_battery(tmp_path: Path, make_settings) -> None:
    assert sample_device(tmp_path).charging is None  # an empty sysfs: no power supply at all
    svc = AgentService(make_settings(sysfs_root=tmp_path), warmup=False)
    await svc.start()
    try:
        async with uds_client(svc.settings.socket_path) as c:
            device = (await c.get("/v1/status")).json()["device"]
        assert device["charging"] is None and device["battery_pct"] is None
    finally:
        await svc.stop()
