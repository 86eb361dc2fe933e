"""The gateway's /metrics listener (`gateway.metrics_listen`): a real gateway (grpc.aio, the real google-genai client
to the fake Gemini), real calls, a scrape over HTTP parsed by prometheus_client's own parser; the bearer token
beyond loopback; the listener closes with the gateway."""

from __future__ import annotations

import socket

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nanofleet.config import parse_fleet
from nanofleet.controller.gateway.server import Gateway, ListenError

from .conftest import MakeGateway
from .fake_gemini import Reply, error

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _get(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def _scrape(port: int, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as c:
        return await c.get(f"http://127.0.0.1:{port}/metrics", headers=headers)


async def test_calls_tokens_cost_latency_and_refusals_are_exposed(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(device_budget=22, metrics_listen="127.0.0.1:0")
    port = gw.gateway.metrics_port
    assert port > 0
    before = samples((await _scrape(port)).text)
    assert _get(before, "nanofleet_gateway_calls_total", method="Generate", code="OK") == 0  # exists from the start
    client = gw.client("dev-1")
    await client.generate("a b c d e")  # 5 in, 6 out
    chunks = await client.stream("a")
    assert chunks[-1].usage.total_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as over:  # 18 of 22 spent: no room for 5 + 1
        await client.generate("a")
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.client("clinic-1").generate()  # cloud denied by policy
    overloaded = Reply(503, error(503, "UNAVAILABLE", "overloaded"))
    gw.fake.push(overloaded, overloaded, overloaded)
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await gw.client("dev-2").generate()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE

    r = await _scrape(port)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = samples(r.text)
    assert _get(m, "nanofleet_gateway_calls_total", method="Generate", code="OK") == 1
    assert _get(m, "nanofleet_gateway_calls_total", method="GenerateStream", code="OK") == 1
    assert _get(m, "nanofleet_gateway_calls_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert _get(m, "nanofleet_gateway_calls_total", method="Generate", code="FAILED_PRECONDITION") == 1
    assert _get(m, "nanofleet_gateway_calls_total", method="Generate", code="UNAVAILABLE") == 1
    assert _get(m, "nanofleet_gateway_budget_refusals_total", scope="device") == 1
    assert _get(m, "nanofleet_gateway_tokens_total", direction="input", model="gemini-2.5-flash") >= 5
    assert _get(m, "nanofleet_gateway_tokens_total", direction="output", model="gemini-2.5-flash") >= 6
    assert _get(m, "nanofleet_gateway_cost_usd_total", model="gemini-2.5-flash") == pytest.approx(
        sum(_get(m, "nanofleet_gateway_tokens_total", direction=d, model="gemini-2.5-flash") * price
            for d, price in (("input", 0.30), ("output", 2.50))) / 1e6)
    assert _get(m, "nanofleet_gateway_upstream_latency_seconds_count", method="Generate", outcome="ok") == 1
    assert _get(m, "nanofleet_gateway_upstream_latency_seconds_count", method="Generate", outcome="error") == 1
    assert _get(m, "nanofleet_gateway_upstream_latency_seconds_count", method="GenerateStream", outcome="ok") == 1
    assert _get(m, "nanofleet_gateway_upstream_latency_seconds_sum", method="Generate", outcome="ok") > 0
    assert _get(m, "nanofleet_gateway_upstream_retries_total") == 2
    assert _get(m, "nanofleet_gateway_internal_errors_total") == 0


async def test_a_token_guards_the_listener_and_beyond_loopback_it_is_required(make_gateway: MakeGateway,
                                                                              tmp_path) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(env={"GEMINI_API_KEY": "k", "NANOFLEET_GATEWAY_METRICS_TOKEN": "s3cret"},
                            metrics_listen="127.0.0.1:0")
    port = gw.gateway.metrics_port
    assert (await _scrape(port)).status_code == 401
    assert (await _scrape(port, "wrong")).status_code == 401
    assert (await _scrape(port, "s3cret")).status_code == 200
    async with httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(f"http://127.0.0.1:{port}/other")).status_code == 404
        assert (await c.post(f"http://127.0.0.1:{port}/metrics")).status_code == 405
    config = parse_fleet("fleet: test\ngateway: {metrics_listen: '0.0.0.0:0'}\n")
    with pytest.raises(ListenError, match="NANOFLEET_GATEWAY_METRICS_TOKEN"):
        Gateway(config, tmp_path / "gw-open", env={})
    Gateway(config, tmp_path / "gw-ok", env={"NANOFLEET_GATEWAY_METRICS_TOKEN": "t"})  # with a token: allowed


async def test_the_listener_closes_with_the_gateway(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(metrics_listen="127.0.0.1:0")
    port = gw.gateway.metrics_port
    assert (await _scrape(port)).status_code == 200
    await gw.gateway.stop(grace=0.5)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert gw.gateway.service is not None and "metrics" not in gw.gateway.service.tasks.deaths
