"""Routes that open kick the drainer: the gateway serving again (a probe succeeded), the breaker's cooldown ending,
the local model loading. The drainer's periodic tick is set to a minute here, so an entry done within a couple of
seconds was started by the trigger, not by the tick."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nanofleet.agent.runtime.grpc_backend import GrpcBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent.conftest import CHAT, uds_client
from tests.agent.test_cloud_breaker import Clock, Gateway

CLOUD_ONLY = {**CHAT, "nanofleet": {"mode": "cloud_only", "app": "com.example.a"}}
LOCAL_ONLY = {**CHAT, "nanofleet": {"mode": "local_only", "app": "com.example.b"}}
LONG_TICK_S = 60.0
WITHIN_S = 3.0  # an entry kicked by its trigger is done well inside this (under load); the tick is 60 s away


def denied(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with `queue: deny`: the failed try is the answer (queueing allowed, it would be queued)."""
    return {**body, "nanofleet": {**body["nanofleet"], "queue": "deny"}}


async def _start(svc: AgentService) -> AgentService:
    svc.drainer.tick_s = LONG_TICK_S
    await svc.start()
    return svc


async def _wait_done(svc: AgentService, rid: str, within: float) -> dict[str, Any]:
    entry = await svc.queue.wait(rid, 0, within)
    deadline = time.monotonic() + within
    while entry["state"] in ("queued", "running") and time.monotonic() < deadline:
        entry = await svc.queue.wait(rid, 0, deadline - time.monotonic())
    return entry


async def test_a_successful_probe_drains_the_queue_at_once(make_settings: Callable[..., AgentSettings],
                                                           gateway: Gateway) -> None:
    clock = Clock()  # the breaker's clock: its cooldown passes when the test says, with no timer of its own firing
    cloud = GrpcBackend(f"127.0.0.1:{gateway.port}", timeout=5, cooldown=30, clock=clock)
    svc = await _start(AgentService(make_settings(), warmup=False, cloud=cloud))
    try:
        async with uds_client(svc.settings.socket_path) as c:
            await gateway.stop()
            assert (await c.post("/v1/chat/completions", json=denied(CLOUD_ONLY))).status_code == 503  # breaker opens
            r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
            assert (r.status_code, r.headers["x-nanofleet-reason"]) == (202, "gateway_unreachable"), r.text
            rid = r.json()["id"]
            await gateway.start()
            clock.now += 30  # half-open: the next call is the probe — an app's own request, here
            probe = await c.post("/v1/chat/completions", json={**CLOUD_ONLY, "nanofleet": {"mode": "cloud_only",
                                                                                          "queue": "deny"}})
            assert probe.status_code == 200, probe.text
            t0 = time.monotonic()
            entry = await _wait_done(svc, rid, WITHIN_S)
            assert (entry["state"], entry["route"]) == ("done", "cloud"), (entry, svc.drainer.counts)
            assert time.monotonic() - t0 < WITHIN_S
    finally:
        await svc.stop()


async def test_the_breakers_cooldown_ending_drains_with_no_other_traffic(
        make_settings: Callable[..., AgentSettings], gateway: Gateway) -> None:
    cloud = GrpcBackend(f"127.0.0.1:{gateway.port}", timeout=5, cooldown=1.0)  # the real clock
    svc = await _start(AgentService(make_settings(), warmup=False, cloud=cloud))
    try:
        async with uds_client(svc.settings.socket_path) as c:
            await gateway.stop()
            assert (await c.post("/v1/chat/completions", json=denied(CLOUD_ONLY))).status_code == 503
            r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
            assert r.status_code == 202, r.text
            opened = time.monotonic()
            await gateway.start()
            entry = await _wait_done(svc, r.json()["id"], 1.0 + WITHIN_S)
            assert (entry["state"], entry["route"], entry["attempts"]) == ("done", "cloud", 1), entry
            assert time.monotonic() - opened < 1.0 + WITHIN_S
    finally:
        await svc.stop()


async def test_the_model_loading_drains_local_only_entries(make_settings: Callable[..., AgentSettings]) -> None:
    free = {"bytes": 8 << 20}
    svc = await _start(AgentService(make_settings(), warmup=False, free_ram=lambda: free["bytes"]))
    try:
        async with uds_client(svc.settings.socket_path) as c:
            r = await c.post("/v1/chat/completions", json=denied(LOCAL_ONLY))
            assert (r.status_code, r.json()["error"]["code"]) == (503, "insufficient_ram")
            r = await c.post("/v1/chat/completions", json=LOCAL_ONLY)  # the local route rests: queued
            assert (r.status_code, r.headers["x-nanofleet-reason"]) == (202, "model_unavailable"), r.text
            free["bytes"] = 64 << 30
            result = await svc.handle_command(_command("reload-model"))  # the operator's reload: it loads now
            assert result.status == "ok", result.message
            t0 = time.monotonic()
            entry = await _wait_done(svc, r.json()["id"], WITHIN_S)
            assert (entry["state"], entry["route"]) == ("done", "local"), (entry, svc.drainer.counts)
            assert time.monotonic() - t0 < WITHIN_S
    finally:
        await svc.stop()


def _command(kind: str) -> Any:
    from nanofleet.protos import fleet_pb2

    return fleet_pb2.Command(id="c1", kind=kind)
