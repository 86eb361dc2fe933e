"""A client that disconnects mid-stream stops generation within a few tokens; slots, fair waiting, 429 past the
bound. Over the real unix socket (uvicorn), because in-process transports buffer whole responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nanofleet.agent.service import AgentService
from tests.agent.conftest import uds_client
from tests.conftest import until

LONG = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 480, "stream": True, "ignore_eos": True}


@pytest.fixture
async def small_queue(make_settings) -> AsyncIterator[AgentService]:
    svc = AgentService(make_settings(), warmup=False, max_waiting=1)
    await svc.start()
    yield svc
    await svc.stop()


async def test_disconnect_mid_stream_stops_generation(service: AgentService) -> None:
    """'Within a few tokens' is a bound in time: the tiny test model makes ~3,000 tokens/s on two cores, faster than
    an event loop shared with the test client can be scheduled under load, so the bound is 8 tokens or 25 ms of
    generation at the rate measured in this stream, whichever is more (a real edge model makes 5-50 tokens/s: ≤ 2
    tokens). Either way generation stops long before the 480 tokens asked for."""
    loop = asyncio.get_running_loop()
    async with uds_client(service.settings.socket_path) as c:
        async with c.stream("POST", "/v1/chat/completions", json=LONG) as r:
            assert r.status_code == 200
            started, received = loop.time(), 0
            async for line in r.aiter_lines():
                received += line.startswith("data: ")
                if received >= 5:
                    break
            backend = service.models._loaded.backend  # type: ignore[union-attr]
        at_disconnect, closed = backend.tokens_generated, loop.time()  # the stream's connection is closed here
    rate = at_disconnect / max(closed - started, 1e-3)  # tokens/s of this stream so far
    await until(lambda: backend.active_streams == 0 and service.dispatcher.admission.active == 0,
                what="generation to stop")
    after = backend.tokens_generated - at_disconnect
    bound = max(8, int(rate * 0.025))
    assert after <= bound, f"{after} tokens generated after the client went away (bound {bound} at {rate:.0f}/s)"
    assert backend.tokens_generated < 100  # of the 480 asked for
    # llama.cpp's own slot is released too (asked on its private socket; it frees the slot on its own loop)
    import httpx

    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(backend.socket_path)),
                                 base_url="http://llama") as llama:
        deadline = asyncio.get_running_loop().time() + 5
        while any(s["is_processing"] for s in (await llama.get("/slots")).json()):
            assert asyncio.get_running_loop().time() < deadline, "llama.cpp slot still busy 5 s after the cancel"
            await asyncio.sleep(0.01)
    assert backend.tokens_generated - at_disconnect <= bound


async def test_parallel_slots_then_fair_wait_then_429(small_queue: AgentService) -> None:
    svc = small_queue
    async with uds_client(svc.settings.socket_path) as c:
        streams = []
        for _ in range(2):  # both slots busy, each holding a stream open
            cm = c.stream("POST", "/v1/chat/completions", json=LONG)
            r = await cm.__aenter__()
            assert r.status_code == 200
            streams.append((cm, r))
        assert svc.dispatcher.admission.active == 2
        waiter = asyncio.create_task(c.post("/v1/chat/completions", json={**LONG, "stream": False,
                                                                          "max_tokens": 4}))
        await until(lambda: svc.dispatcher.admission.waiting == 1, what="third request to wait")
        status = (await c.get("/v1/status")).json()
        assert status["slots_waiting"] == 1 and status["concurrency"]["active"] == 2
        assert status["queue"]["depth"] == 0  # the offline queue is another thing: nothing queued
        r = await c.post("/v1/chat/completions", json={**LONG, "stream": False})
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "busy"
        assert r.headers["x-nanofleet-route"] == "local"
        for cm, _r in streams:
            await cm.__aexit__(None, None, None)
        served = await asyncio.wait_for(waiter, 10)
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4
