"""Upstreams behind one interface: llama.cpp's real server (xllamacpp) as an on-prem upstream, the one retry loop,
and the gateway's single SQLite writer."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from nanofleet.config import parse_fleet
from nanofleet.controller.gateway.db import Database
from nanofleet.controller.gateway.errors import UpstreamUnavailable
from nanofleet.controller.gateway.server import Gateway, build_upstream
from nanofleet.controller.gateway.upstreams.base import (
    HandlerUpstream,
    Message,
    UpstreamChunk,
    UpstreamRequest,
    UpstreamResult,
)
from nanofleet.controller.gateway.upstreams.retrying import RetryingUpstream
from nanofleet.controller.gateway.usage import UsageStore
from nanofleet.protos import inference_pb2
from tests.conftest import free_port

from .conftest import Client

REQ = UpstreamRequest(model="m", messages=(Message("user", "hi"),))


@pytest.fixture(scope="module")
def llama_server(tiny_gguf: Path) -> Iterator[str]:
    """llama.cpp's own OpenAI-compatible server (through xllamacpp) on a loopback port, with the tiny model."""
    import xllamacpp

    port = free_port()
    params = xllamacpp.CommonParams()
    params.model.path = str(tiny_gguf)
    params.n_ctx = 2048
    params.n_parallel = 2
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.verbosity = -1
    server = xllamacpp.Server(params)
    yield f"http://127.0.0.1:{port}/v1"
    del server


async def test_llamacpp_upstream_end_to_end(llama_server: str, tmp_path: Path) -> None:
    config = parse_fleet(f"""
fleet: onprem
gateway:
  upstream: {{kind: llamacpp, model: tiny, base_url: "{llama_server}", thinking_budget: null}}
""")
    async with Gateway(config, tmp_path, listen="127.0.0.1:0", env={}) as gw:
        from nanofleet.controller.gateway.auth import issue_token

        client = Client(gw.address, issue_token(gw.db_path, "edge-1", "onprem"))
        try:
            response = await client.generate("hello", config={"max_output_tokens": 8, "temperature": 0.0,
                                                              "top_k": 1})
            assert response.finish_reason == "length" and response.usage.output_tokens == 8
            assert response.usage.input_tokens > 0 and response.text
            chunks = await client.stream("hello", config={"max_output_tokens": 8, "temperature": 0.0, "top_k": 1})
            streamed = "".join(c.text for c in chunks)
            # greedy: the same text (llama.cpp holds back a trailing incomplete UTF-8 sequence when streaming)
            assert streamed and response.text.startswith(streamed)
            assert chunks[-1].usage.output_tokens == 8
            counted = await client.stub.CountTokens(inference_pb2.CountTokensRequest(
                messages=[inference_pb2.ChatMessage(role="user", content="hello")]), metadata=client.metadata,
                timeout=5)
            assert counted.total_tokens >= 5  # byte-level vocabulary: one token per byte (+ BOS)
        finally:
            await client.close()
        rows = await asyncio.to_thread(lambda: UsageStore(gw.db_path).summary())
        assert [(r.device_id, r.requests, r.output_tokens, r.cost_usd) for r in rows] == [("edge-1", 2, 16, 0.0)]


async def test_openai_upstream_without_base_url_is_unavailable(tmp_path: Path) -> None:
    cfg = parse_fleet("fleet: t\ngateway: {upstream: {kind: openai, model: gpt-x}}").gateway.upstream
    upstream = build_upstream(cfg, env={})
    assert upstream.unavailable == "upstream unavailable: gateway.upstream.base_url not set for kind openai"


async def test_unreachable_upstream_is_unavailable_after_retries(tmp_path: Path) -> None:
    config = parse_fleet(f"""
fleet: t
gateway: {{upstream: {{kind: llamacpp, model: tiny, base_url: "http://127.0.0.1:{free_port()}/v1", max_retries: 1}}}}
""")
    async with Gateway(config, tmp_path, listen="127.0.0.1:0", env={}, retry_base_delay=0.01) as gw:
        from nanofleet.controller.gateway.auth import issue_token

        client = Client(gw.address, issue_token(gw.db_path, "edge-1", "t"))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await client.generate()
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "connection failed" in down.value.details()
            assert gw.upstream.retries == 1
        finally:
            await client.close()


def _flaky(failures: int, chunks: list[UpstreamChunk] | None = None):  # type: ignore[no-untyped-def]
    state = {"n": 0}

    async def handler(req: UpstreamRequest) -> UpstreamResult | list[UpstreamChunk]:
        state["n"] += 1
        if state["n"] <= failures:
            raise UpstreamUnavailable("503 overloaded")
        return chunks or UpstreamResult("ok", "stop", 1, 1, "m")

    return handler


async def test_retry_loop_is_bounded_and_respects_the_deadline() -> None:
    inner = HandlerUpstream(_flaky(2))
    up = RetryingUpstream(inner, max_retries=2, base_delay=0.001)
    assert (await up.generate(REQ)).text == "ok" and len(inner.calls) == 3
    inner = HandlerUpstream(_flaky(5))
    up = RetryingUpstream(inner, max_retries=2, base_delay=0.001)
    with pytest.raises(UpstreamUnavailable):
        await up.generate(REQ)
    assert len(inner.calls) == 3
    inner = HandlerUpstream(_flaky(5))
    up = RetryingUpstream(inner, max_retries=5, base_delay=10)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable):
        await up.generate(REQ, deadline=time.monotonic() + 1)
    assert time.monotonic() - started < 0.5 and len(inner.calls) == 1  # a 5-10 s backoff would pass the deadline


async def test_stream_is_retried_only_before_its_first_chunk() -> None:
    inner = HandlerUpstream(_flaky(1, [UpstreamChunk("a"), UpstreamChunk("b", "stop", 1, 2)]))
    up = RetryingUpstream(inner, max_retries=2, base_delay=0.001)
    assert [c.text async for c in up.stream(REQ)] == ["a", "b"] and len(inner.calls) == 2

    class MidStream(HandlerUpstream):
        async def stream(self, request: UpstreamRequest) -> AsyncIterator[UpstreamChunk]:
            self.calls.append(request)
            yield UpstreamChunk("a")
            raise UpstreamUnavailable("connection reset")

    mid = MidStream(_flaky(0))
    up = RetryingUpstream(mid, max_retries=2, base_delay=0.001)
    got = []
    with pytest.raises(UpstreamUnavailable):
        async for chunk in up.stream(REQ):
            got.append(chunk.text)
    assert got == ["a"] and len(mid.calls) == 1


async def test_one_writer_batches_and_isolates_failing_jobs(tmp_path: Path) -> None:
    db = Database(tmp_path / "g.sqlite")
    try:
        await db.write(lambda c: c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)"))

        def insert(k: int):  # type: ignore[no-untyped-def]
            return lambda c: c.execute("INSERT INTO t VALUES (?)", (k,)).rowcount

        results = await asyncio.gather(*(db.write(insert(k)) for k in range(200)), db.write(insert(5)),
                                       return_exceptions=True)
        assert results[:200] == [1] * 200
        assert isinstance(results[200], sqlite3.IntegrityError)  # the duplicate fails alone
        assert await db.aread(lambda c: c.execute("SELECT COUNT(*) FROM t").fetchone()[0]) == 200
    finally:
        db.close()


async def test_usage_store_reads_by_day(tmp_path: Path) -> None:
    from nanofleet.config import DEFAULT_PRICES
    from nanofleet.controller.gateway.budgets import Budgets
    from nanofleet.controller.gateway.usage import UsageLedger

    db = Database(tmp_path / "g.sqlite")
    ledger = UsageLedger(db, DEFAULT_PRICES, Budgets(db, "gw-1", 60))
    day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 86_400
    await ledger.record("d1", "app", "gemini-2.5-flash-lite", 1000, 100, day1)
    await ledger.record("d1", "app", "gemini-2.5-flash-lite", 1000, 100, day1)
    await ledger.record("d2", "", "gemini-2.5-flash", 10, 10, day2)
    assert ledger.budgets.used("d1", "app", day2).device == 0  # a new UTC day starts from zero
    db.close()
    store = UsageStore(tmp_path / "g.sqlite")
    try:
        [row] = store.summary("2023-11-14")
        assert (row.requests, row.input_tokens, row.output_tokens) == (2, 2000, 200)
        assert row.cost_usd == pytest.approx(2 * (1000 * 0.10 + 100 * 0.40) / 1e6)
        assert [r.day for r in store.summary()] == ["2023-11-15", "2023-11-14"]
        assert store.summary("2001-01-01") == []
    finally:
        store.close()
    again = Database(tmp_path / "g.sqlite")
    assert Budgets(again, "gw-2", 60).used("d1", "app", day1 + 60).app == 2200  # a restart does not refill budgets
    again.close()
