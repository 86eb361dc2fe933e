"""kill -9 one of two gateway processes under load, both on one PostgreSQL: the other keeps answering, every
request_id is answered and charged exactly once (a retry on the survivor gets the stored answer or runs afresh once
the dead one's claim expires), and the dead one's budget reservations expire."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.db import connection
from tests.conftest import free_port, until

from .conftest import Client
from .fake_gemini import FakeGemini, Reply

FLEET = """
fleet: kill
gateway:
  upstream: {{kind: gemini, model: gemini-2.5-flash, base_url: "{base_url}", thinking_budget: 0, timeout: 1,
              max_retries: 0}}
  budgets: {{fleet_tokens_per_day: 10000000}}
"""


class Proc:
    def __init__(self, folder: Path, fleet: Path, store: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "GEMINI_API_KEY": "k"}
        folder.mkdir(mode=0o700)
        self.log = (folder / "stderr.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nanofleet", "gateway", "serve", "--config", str(fleet),
                                      "--data-dir", str(folder), "--listen", self.address, "--store", store,
                                      "--grace", "1"], env=env, stderr=self.log)

    async def serving(self) -> bool:
        async with grpc.aio.insecure_channel(self.address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def two(tmp_path: Path, pg_url: str, fake_gemini: FakeGemini) -> Iterator[list[Proc]]:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.format(base_url=fake_gemini.base_url))
    procs = [Proc(tmp_path / f"gw{i}", fleet, pg_url) for i in range(2)]
    yield procs
    for p in procs:
        p.stop()


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    with connection(url) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


async def test_kill_9_one_gateway_under_load(two: list[Proc], pg_url: str, fake_gemini: FakeGemini) -> None:
    tokens = {d: issue_token(pg_url, d, "kill") for d in ("d1", "d2", "d3", "d4")}
    await until(lambda: all(p.proc.poll() is None for p in two), what="both processes running")
    for p in two:
        for _ in range(200):
            if await p.serving():
                break
            assert p.proc.poll() is None, "gateway process exited"
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"gateway {p.address} never served")
    fake_gemini.push(*[Reply(delay=0.15) for _ in range(400)])  # calls stay in flight long enough to be cut
    victim, survivor = two
    clients = {(p.address, d): Client(p.address, tokens[d]) for p in two for d in tokens}
    answered: dict[str, str] = {}
    failovers = 0

    async def device(name: str, n: int) -> None:
        nonlocal failovers
        for i in range(n):
            rid = f"{name}-{i}"
            order = [victim, survivor] if i % 2 == 0 else [survivor, victim]
            # an agent moves on to the live gateway; a retry waiting on the dead one's claim gets DEADLINE_EXCEEDED
            # (1 s, the upstream timeout) until the claim expires (timeout + 2 s), then runs afresh
            for attempt in range(40):
                target = order[0] if attempt == 0 else survivor
                try:
                    reply = await clients[(target.address, name)].generate(f"call {rid}", request_id=rid, deadline=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                          grpc.StatusCode.CANCELLED), exc
                    failovers += 1
                    await asyncio.sleep(0.05)
                    continue
                assert reply.text == f"echo: call {rid}"
                answered[rid] = reply.text
                break
            else:
                raise AssertionError(f"{rid} never answered")

    load = asyncio.gather(*(device(d, 8) for d in tokens))
    pid = victim.proc.pid
    # kill while the victim holds reservations of calls in flight
    held = await until(lambda: _query(pg_url, f"SELECT id FROM reservations WHERE gateway LIKE '%:{pid}:%'"),
                       within=20, what="the victim holding reservations")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(5)
    await asyncio.wait_for(load, 60)
    for c in clients.values():
        await c.close()
    assert len(answered) == 32 and failovers > 0
    [(requests,)] = _query(pg_url, "SELECT sum(requests) FROM usage")
    assert requests == 32  # each answered request_id charged once: none lost, none twice
    answers = _query(pg_url, "SELECT count(*) FROM idempotency")
    assert answers == [(32,)]
    # the dead gateway's reservations expire (upstream timeout 1 s + margin) and the survivor's housekeeping
    # gives them back: nothing stays held
    await until(lambda: _query(pg_url, "SELECT count(*) FROM reservations") == [(0,)], within=20,
                what="the dead gateway's reservations released")
    assert [r for r in held if _query(pg_url, f"SELECT 1 FROM reservations WHERE id = '{r[0]}'")] == []
    assert _query(pg_url, "SELECT coalesce(sum(reserved), 0) FROM budget_counts") == [(0,)]
    [(fleet_used,)] = _query(pg_url, "SELECT used FROM budget_counts WHERE scope = 'fleet'")
    [(usage_total,)] = _query(pg_url, "SELECT sum(input_tokens + output_tokens) FROM usage")
    assert fleet_used == usage_total
    assert await survivor.serving()
