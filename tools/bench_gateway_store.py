"""The gateway's own cost per call on each store backend: one in-process gateway, an instant upstream (so neither
the fake Gemini nor the network is measured), 16 concurrent callers then one sequential caller; the three database
steps of a call with a request_id (claim, reserve, settle) timed apart.

    .venv/bin/python tools/bench_gateway_store.py            # SQLite, then a throwaway PostgreSQL (initdb + pg_ctl)
"""

from __future__ import annotations

import asyncio
import collections
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from nanofleet.config import parse_fleet
from nanofleet.controller.gateway import budgets, idempotency, usage
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.server import Gateway
from nanofleet.controller.gateway.upstreams.base import HandlerUpstream, UpstreamRequest, UpstreamResult
from nanofleet.pg_server import PgServer
from nanofleet.protos import inference_pb2, inference_pb2_grpc

PHASES: dict[str, list[float]] = collections.defaultdict(list)


def _timed(cls: type, name: str, label: str) -> None:
    orig: Callable[..., Any] = getattr(cls, name)

    @functools.wraps(orig)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await orig(*args, **kwargs)
        finally:
            PHASES[label].append(time.perf_counter() - started)

    setattr(cls, name, wrapper)


async def _instant(request: UpstreamRequest) -> UpstreamResult:
    return UpstreamResult("x", "stop", 5, 1, request.model)


async def run(store: str | None, label: str) -> None:
    cfg = parse_fleet("fleet: b\ngateway: {listen: '127.0.0.1:0', budgets: {fleet_tokens_per_day: 1000000000}}\n")
    gw = Gateway(cfg, Path(tempfile.mkdtemp()), upstream=HandlerUpstream(_instant), env={"GEMINI_API_KEY": "k"},
                 store=store)
    await gw.start()
    token = issue_token(gw.store, "dev", "b")
    channel = grpc.aio.insecure_channel(gw.address)
    stub = inference_pb2_grpc.InferenceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []

    async def caller(name: str, n: int, with_id: bool) -> None:
        for i in range(n):
            req = inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                                request_id=f"{name}-{i}" if with_id else "")
            started = time.perf_counter()
            await stub.Generate(req, metadata=metadata, timeout=10)
            latencies.append(time.perf_counter() - started)

    await caller("warm", 50, False)
    for with_id in (False, True):
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(caller(f"c{w}-{with_id}", 100, with_id) for w in range(16)))
        rate = len(latencies) / (time.perf_counter() - started)
        latencies.clear()
        PHASES.clear()
        await caller(f"seq-{with_id}", 300, with_id)
        phases = ", ".join(f"{k} {statistics.median(v) * 1000:.2f}" for k, v in PHASES.items())
        print(f"{label} request_id={with_id}: {rate:.0f} calls/s (16 concurrent); sequential p50 "
              f"{statistics.median(latencies) * 1000:.2f} ms ({phases} ms)")
    await channel.close()
    await gw.stop(0.5)


def main() -> None:
    _timed(idempotency.Idempotency, "lookup", "claim")
    _timed(budgets.Budgets, "reserve", "reserve")
    _timed(usage.UsageLedger, "record", "settle")
    asyncio.run(run(None, "sqlite"))
    server = PgServer().start()
    try:
        asyncio.run(run(server.create_database(), "postgresql"))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
