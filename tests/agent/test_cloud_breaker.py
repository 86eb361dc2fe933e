"""The cloud route through its circuit breaker, against a real gRPC server stopped and restarted on the same port.
The breaker reads an injected clock, so cooldowns pass without sleeping; the gRPC traffic is real."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest

from nanofleet.agent.runtime.grpc_backend import CloudRefused, GatewayUnreachable, GrpcBackend, RateLimited
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent import inference_server
from tests.agent.conftest import CHAT
from tests.agent.test_grpc_backend import HI

CLOUD_ONLY = {**CHAT, "nanofleet": {"mode": "cloud_only"}}
# a call's deadline, not what these tests are about (a stopped gateway refuses at once): the stand-in gateway
# generates with the real tiny model, which a loaded CI machine may take more than 5 s to load and run
CALL_TIMEOUT_S = 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Gateway:
    """A real gRPC Inference server that can be stopped and started again on its port."""

    def __init__(self, servicer: inference_server.Servicer) -> None:
        self.servicer = servicer
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> Gateway:
        self.server, self.port = await inference_server.start(self.servicer, port=self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


async def test_the_backend_opens_probes_once_backs_off_and_closes_when_the_server_returns(gateway: Gateway) -> None:
    clock = Clock()
    async with GrpcBackend(f"127.0.0.1:{gateway.port}", timeout=CALL_TIMEOUT_S, cooldown=5, max_cooldown=40,
                           clock=clock) as b:
        assert (await b.generate(HI)).usage.completion_tokens == 5
        await gateway.stop()
        with pytest.raises(GatewayUnreachable):
            await b.generate(HI)
        assert not b.reachable and b.retry_in == 5
        clock.now += 4.9
        with pytest.raises(GatewayUnreachable, match="calls paused"):
            await b.generate(HI)
        clock.now += 0.1  # cooldown over: one probe; the server is still down, so it fails and doubles the wait
        assert b.reachable and b.breaker.state(clock.now) == "half_open"
        with pytest.raises(GatewayUnreachable, match="unavailable"):
            await b.generate(HI)
        assert not b.reachable and b.retry_in == 10
        await gateway.start()  # the same port again
        clock.now += 9
        assert not b.reachable
        clock.now += 1
        assert b.reachable
        calls = gateway.servicer.calls
        assert (await b.generate(HI)).usage.completion_tokens == 5  # the probe succeeds: closed
        assert gateway.servicer.calls == calls + 1
        assert b.breaker.state(clock.now) == "closed" and b.retry_in == 0
        chunks = [c async for c in b.stream(HI)]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_only_one_probe_goes_through_while_half_open(gateway: Gateway) -> None:
    clock = Clock()
    async with GrpcBackend(f"127.0.0.1:{gateway.port}", timeout=CALL_TIMEOUT_S, cooldown=5, clock=clock) as b:
        await gateway.stop()
        with pytest.raises(GatewayUnreachable):
            await b.generate(HI)
        gateway.servicer.delay = 0.5
        await gateway.start()
        clock.now += 5
        calls = gateway.servicer.calls
        probe = asyncio.ensure_future(b.generate(HI))
        await asyncio.sleep(0)  # the probe has taken the slot
        assert not b.reachable
        with pytest.raises(GatewayUnreachable, match="calls paused"):
            await b.generate(HI)
        assert (await probe).usage.completion_tokens == 5
        assert gateway.servicer.calls == calls + 1 and b.reachable


@pytest.fixture
async def agent(make_settings: Callable[..., AgentSettings], gateway: Gateway,
                ) -> AsyncIterator[tuple[httpx.AsyncClient, Clock, AgentService]]:
    clock = Clock()
    cloud = GrpcBackend(f"127.0.0.1:{gateway.port}", timeout=CALL_TIMEOUT_S, cooldown=5, clock=clock)
    svc = AgentService(make_settings(), warmup=False, cloud=cloud)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        yield c, clock, svc
    await svc.stop()


def shape(r: httpx.Response) -> tuple[Any, ...]:
    return (r.status_code, r.json()["error"]["code"], r.headers["x-nanofleet-reason"], r.headers.get("retry-after"))


async def test_the_route_stays_shut_while_open_with_one_error_shape_and_comes_back(agent, gateway: Gateway) -> None:
    c, clock, svc = agent
    assert (await c.post("/v1/chat/completions", json=CLOUD_ONLY)).status_code == 200
    await gateway.stop()
    deny = {**CLOUD_ONLY, "nanofleet": {"mode": "cloud_only", "queue": "deny"}}
    r = await c.post("/v1/chat/completions", json=deny)  # tried, failed: the breaker opens
    assert shape(r) == (503, "cloud_unavailable", "gateway_unreachable", "5") and r.headers["x-nanofleet-route"] == \
        "cloud"
    clock.now += 2
    r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)  # not tried: queued until the route opens again
    assert (r.status_code, r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (
        202, "queue", "gateway_unreachable")
    r = await c.post("/v1/chat/completions", json={**CLOUD_ONLY, "nanofleet": {"mode": "cloud_only", "queue": "deny"}})
    assert shape(r) == (503, "cloud_unavailable", "gateway_unreachable", "3")
    status = (await c.get("/v1/status")).json()["routes"]["cloud"]
    assert (status["reachable"], status["circuit_open"]) == (False, True)
    # prefer_cloud while it is open: local serves without trying the cloud
    r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"mode": "prefer_cloud"}})
    assert (r.status_code, r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (
        200, "local", "gateway_unreachable")
    await gateway.start()
    clock.now += 3
    assert (await c.get("/v1/status")).json()["routes"]["cloud"]["reachable"] is True
    r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
    assert (r.status_code, r.headers["x-nanofleet-route"]) == (200, "cloud"), r.text
    assert svc.dispatcher.connectivity().gateway_reachable


async def test_a_policy_refusal_is_a_403_with_the_gateways_reason_and_prefer_cloud_falls_back(
        agent, gateway: Gateway) -> None:
    c, _, svc = agent
    gateway.servicer.refuse = "cloud denied by policy for device 'dev-test'"
    r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
    assert shape(r) == (403, "cloud_refused", "cloud_denied", None) and r.headers["x-nanofleet-route"] == "cloud"
    assert r.json()["error"]["type"] == "permission_error"
    assert "cloud denied by policy for device 'dev-test'" in r.json()["error"]["message"]
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": stream, "nanofleet": {"mode": "prefer_cloud"}})
        assert (r.status_code, r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (
            200, "local", "fallback_cloud_refused"), r.text
    assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
    assert svc.dispatcher.cloud.reachable  # a refusal is an answer: the breaker stays closed


async def test_a_gateway_429_is_rate_limited_not_busy(agent, gateway: Gateway) -> None:
    c, _, _ = agent
    gateway.servicer.rate_limit = 7
    r = await c.post("/v1/chat/completions", json=CLOUD_ONLY)
    assert shape(r) == (429, "rate_limited", "rate_limited", "7") and r.headers["x-nanofleet-route"] == "cloud"
    r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True, "nanofleet": {"mode": "cloud_only"}})
    assert shape(r) == (429, "rate_limited", "rate_limited", "7")
    r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"mode": "prefer_cloud"}})
    assert (r.status_code, r.headers["x-nanofleet-reason"]) == (200, "fallback_rate_limited")


def test_error_classes_keep_the_base_tree() -> None:
    """The cloud leaves stay under the base classes the fallback and the HTTP mapping are written against."""
    from nanofleet.agent.runtime.base import BackendUnavailable, Busy, Refused

    assert issubclass(CloudRefused, Refused) and CloudRefused.status == 403
    assert issubclass(RateLimited, Busy) and RateLimited.status == 429
    assert issubclass(GatewayUnreachable, BackendUnavailable) and GatewayUnreachable.status == 503
