"""The gateway's detached work is supervised: a bug in it is logged, recorded and shown by the health service (not
an unretrieved task exception), and stop() raises what failed while stopping."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanofleet.controller.gateway.server import DETAIL_KEY
from nanofleet.controller.gateway.upstreams.base import HandlerUpstream, UpstreamRequest, UpstreamResult
from tests.conftest import until

from .conftest import Client, MakeGateway


async def _buggy(request: UpstreamRequest) -> UpstreamResult:
    raise KeyError("upstream adapter bug")


async def _health_detail(client: Client) -> str:
    call = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert (await call).status == health_pb2.HealthCheckResponse.SERVING  # the process serves; the trouble is shown
    return str(dict(await call.trailing_metadata() or ()).get(DETAIL_KEY, ""))


async def test_a_bug_in_a_detached_call_is_internal_and_shown_by_health(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream=HandlerUpstream(_buggy))
    client = gw.client("dev-1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate("hi", request_id="r-bug")
    assert err.value.code() == grpc.StatusCode.INTERNAL  # not a retryable UNAVAILABLE into the same bug
    assert gw.gateway.service.tasks.deaths == {}  # answered and logged: not a death besides
    detail = await _health_detail(client)
    assert detail == "internal errors: 1 (last: KeyError, see the log)"  # the message stays in the log


async def test_detached_work_that_dies_is_shown_by_health(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    service = gw.gateway.service

    async def broken_write() -> None:
        raise OSError("usage row lost")

    service._spawn(broken_write(), "record-partial-usage")
    await until(lambda: "record-partial-usage" in service.tasks.deaths, what="the death recorded")
    detail = await _health_detail(gw.client("dev-1"))
    assert detail == "tasks died: record-partial-usage x1 (last: OSError: usage row lost)"


async def test_refusals_of_detached_calls_are_answers_not_deaths(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(device_budget=15)
    client = gw.client("dev-1")
    await client.generate("spend", request_id="r-1")  # 7 of 15: no room left for the next prompt's 15
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.generate("over budget", request_id="r-2")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert gw.gateway.service.tasks.deaths == {}


class _BadClose(HandlerUpstream):
    async def close(self) -> None:
        raise OSError("connection pool would not close")


async def test_stop_raises_what_failed_and_still_closes_the_db(make_gateway: MakeGateway) -> None:
    async def ok(request: UpstreamRequest) -> UpstreamResult:
        return UpstreamResult("fine", "stop", 1, 1, request.model)

    gw = await make_gateway(upstream=_BadClose(ok))
    with pytest.raises(ExceptionGroup) as err:
        await gw.gateway.stop(grace=0.5)
    assert [str(e) for e in err.value.exceptions] == ["connection pool would not close"]
    assert gw.gateway.db is None  # the storage step ran after the failed one


async def test_failing_database_housekeeping_is_shown_by_health(make_gateway: MakeGateway) -> None:
    """Expired reservations of a dead gateway are given back by housekeeping: when it fails, health says so."""
    import sqlite3

    gw = await make_gateway()
    client = gw.client("dev-1")
    with sqlite3.connect(gw.gateway.db_path) as conn:
        conn.execute("DROP TABLE idempotency_claims")  # housekeeping's DELETE fails from now on
    await until(lambda: gw.gateway.db is not None and gw.gateway.db.housekeeping_errors > 0, within=10,
                what="a failed housekeeping run")
    detail = await _health_detail(client)
    assert "database housekeeping failed" in detail and "expired reservations are not being released" in detail
