"""Several gateways on one database: budgets counted atomically across them (hypothesis-driven concurrent calls from
several devices and apps against small budgets), one answer per request_id whichever gateway a retry reaches.
In-process gateways on a real PostgreSQL (and, for the same guarantee on one box, one SQLite file), the fake Gemini
at the wire. The kill -9 test with gateway processes is test_gateway_kill.py."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanofleet.config import parse_fleet
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.server import Gateway
from nanofleet.controller.gateway.usage import UsageStore
from nanofleet.pg_server import PgServer

from .conftest import Client
from .fake_gemini import FakeGemini

T = TypeVar("T")

FLEET = """
fleet: many
gateway:
  listen: 127.0.0.1:0
  upstream: {{kind: gemini, model: gemini-2.5-flash, base_url: "{base_url}", thinking_budget: 0, timeout: 5}}
  budgets: {{fleet_tokens_per_day: {fleet}, app_tokens_per_day: {app}}}
defaults:
  routing:
    cloud_budget: {{tokens_per_day: {device}}}
"""


class LoopThread:
    """One event loop in a thread for a hypothesis test (examples are sync): gateways and clients live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    f = FakeGemini()
    yield f
    f.close()


async def _start(text: str, store: str, folder: Path, n: int = 2) -> list[Gateway]:
    gateways = []
    for i in range(n):
        gw = Gateway(parse_fleet(text), folder / f"gw{i}", env={"GEMINI_API_KEY": "k"}, store=store,
                     auth_cache_ttl=0.0, retry_base_delay=0.01)
        await gw.start()
        gateways.append(gw)
    return gateways


Call = tuple[str, str, int, int | None, int]  # device, app, prompt words, max_output_tokens, which gateway

calls_strategy = st.lists(st.tuples(st.sampled_from(["d1", "d2", "d3"]), st.sampled_from(["chat", "mail"]),
                                    st.integers(1, 6), st.none() | st.integers(1, 8), st.integers(0, 1)),
                          min_size=4, max_size=24)


async def _storm(gateways: list[Gateway], tokens: dict[str, str], calls: list[Call]) -> list[Any]:
    clients = [Client(gw.address, None) for gw in gateways]

    async def one(device: str, app: str, words: int, max_out: int | None, which: int) -> Any:
        client = clients[which]
        client.metadata = (("authorization", f"Bearer {tokens[device]}"),)
        config = {"max_output_tokens": max_out} if max_out else {}
        try:
            return await client.generate(" ".join(["w"] * words), app_id=app, config=config)
        except grpc.aio.AioRpcError as exc:
            return exc

    try:
        return await asyncio.gather(*(one(*c) for c in calls))
    finally:
        for c in clients:
            await c.close()


def _check_limits(store: str, device: int, app: int, fleet: int) -> int:
    usage = UsageStore(store)
    try:
        rows = usage.summary()
    finally:
        usage.close()
    per_device: dict[str, int] = defaultdict(int)
    per_app: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        per_device[r.device_id] += r.input_tokens + r.output_tokens
        per_app[(r.device_id, r.app_id)] += r.input_tokens + r.output_tokens
    total = sum(per_device.values())
    assert total <= fleet, ("fleet", total, fleet)
    assert all(v <= device for v in per_device.values()), ("device", dict(per_device), device)
    assert all(v <= app for v in per_app.values()), ("app", dict(per_app), app)
    return total


def _run_example(lt: LoopThread, fake: FakeGemini, store: str, folder: Path, calls: list[Call], device: int,
                 app: int, fleet: int) -> None:
    text = FLEET.format(base_url=fake.base_url, fleet=fleet, app=app, device=device)
    tokens = {d: issue_token(store, d, "many") for d in ("d1", "d2", "d3")}
    gateways = lt.run(_start(text, store, folder))
    try:
        results = lt.run(_storm(gateways, tokens, calls))
    finally:
        for gw in gateways:
            lt.run(gw.stop(grace=0.5))
    answered = 0
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result
            assert "cloud budget" in (result.details() or "")
            assert int(dict(result.trailing_metadata() or ())["retry-after"]) >= 1
        else:
            answered += 1
            assert result.usage.total_tokens > 0
    total = _check_limits(store, device, app, fleet)
    assert (total > 0) == (answered > 0)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=calls_strategy, device=st.integers(10, 60), app=st.integers(8, 40), fleet=st.integers(15, 120))
def test_two_gateways_on_postgresql_never_pass_a_budget(pg_server: PgServer, loop_thread: LoopThread,
                                                       fake: FakeGemini, tmp_path_factory: pytest.TempPathFactory,
                                                       calls: list[Call], device: int, app: int, fleet: int) -> None:
    _run_example(loop_thread, fake, pg_server.create_database(), tmp_path_factory.mktemp("gw"), calls, device, app,
                 fleet)


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=calls_strategy, device=st.integers(10, 60), app=st.integers(8, 40), fleet=st.integers(15, 120))
def test_two_gateways_on_one_sqlite_file_never_pass_a_budget(loop_thread: LoopThread, fake: FakeGemini,
                                                            tmp_path_factory: pytest.TempPathFactory, calls: list[Call],
                                                            device: int, app: int, fleet: int) -> None:
    folder = tmp_path_factory.mktemp("gw")
    _run_example(loop_thread, fake, f"sqlite:///{folder / 'gateway.db'}", folder, calls, device, app, fleet)


async def test_two_gateways_on_one_data_dir_share_one_budget(tmp_path: Path, fake_gemini: FakeGemini) -> None:
    """The regression: each gateway counted today's tokens in its own memory, so two gateways (here: two on one
    gateway.db) each allowed the whole budget."""
    text = FLEET.format(base_url=fake_gemini.base_url, fleet=1000, app=1000, device=40)
    gateways = [Gateway(parse_fleet(text), tmp_path / "gw", env={"GEMINI_API_KEY": "k"}, auth_cache_ttl=0.0)
                for _ in range(2)]
    for gw in gateways:
        await gw.start()
    try:
        token = issue_token(gateways[0].db_path, "d1", "many")
        clients = [Client(gw.address, token) for gw in gateways]
        for _ in range(4):  # "w" = 7 tokens a call: 40 allows 5 at most, whichever gateway counts
            for client in clients:
                try:
                    await client.generate("w", config={"max_output_tokens": 2})
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for client in clients:
            await client.close()
        used = _check_limits(str(gateways[0].db_path), device=40, app=1000, fleet=1000)
        assert used == 35  # 5 calls of 7
    finally:
        for gw in gateways:
            await gw.stop(grace=0.5)
