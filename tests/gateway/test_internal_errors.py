"""A bug inside the gateway (here: an upstream adapter raising something that is not a GatewayError) reaches the
device as INTERNAL without the internals, is logged with its traceback and counted — and the gateway keeps serving."""

from __future__ import annotations

import logging

import grpc
import pytest

from nanofleet.controller.gateway.upstreams.base import HandlerUpstream, UpstreamRequest, UpstreamResult
from nanofleet.protos import inference_pb2

from .conftest import MakeGateway


class Flaky:
    """The upstream's handler: raises a plain bug while `broken`, answers otherwise."""

    def __init__(self) -> None:
        self.broken = True

    async def __call__(self, request: UpstreamRequest) -> UpstreamResult:
        if self.broken:
            raise RuntimeError("adapter bug: secret detail")
        return UpstreamResult("fine", "stop", 2, 1, request.model)


class FlakyCounting(HandlerUpstream):
    async def count_tokens(self, request: UpstreamRequest) -> int:
        raise KeyError("adapter bug in count")


def _internal(exc: grpc.aio.AioRpcError, kind: str) -> None:
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert exc.details() == f"internal gateway error: {kind} (logged)"


async def test_generate_and_stream_bugs_are_internal_logged_counted(make_gateway: MakeGateway,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    handler = Flaky()
    gw = await make_gateway(upstream=HandlerUpstream(handler))
    client = gw.client()
    with caplog.at_level(logging.ERROR, logger="nanofleet.gateway"):
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await client.generate("hi")
        _internal(unary.value, "RuntimeError")
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await client.stream("hi")
        _internal(streamed.value, "RuntimeError")
    assert "secret detail" not in (unary.value.details() or "")
    logged = [r for r in caplog.records if r.getMessage() == "internal gateway error"]
    assert len(logged) == 2 and all(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in logged)
    assert gw.gateway.service.refusals["INTERNAL"] == 2
    handler.broken = False
    assert (await client.generate("hi")).text == "fine"


async def test_count_tokens_bug_is_internal(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream=FlakyCounting(Flaky()))
    client = gw.client()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.CountTokens(
            inference_pb2.CountTokensRequest(messages=[inference_pb2.ChatMessage(role="user", content="a b")]),
            metadata=client.metadata, timeout=10)
    _internal(info.value, "KeyError")
    assert gw.gateway.service.refusals["INTERNAL"] == 1


async def test_a_bug_behind_a_request_id_is_internal_and_logged_too(make_gateway: MakeGateway,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An idempotent call runs in its own task: the bug must not turn into a plain UNAVAILABLE nobody logged."""
    handler = Flaky()
    gw = await make_gateway(upstream=HandlerUpstream(handler))
    client = gw.client()
    with caplog.at_level(logging.ERROR, logger="nanofleet.gateway"), pytest.raises(grpc.aio.AioRpcError) as info:
        await client.generate("hi", request_id="r-1")
    assert any(r.name == "nanofleet.gateway" and r.exc_info and "secret detail" in str(r.exc_info[1])
               for r in caplog.records), f"the bug was not logged: {[r.getMessage() for r in caplog.records]}"
    _internal(info.value, "RuntimeError")
    assert dict(gw.gateway.service.refusals) == {"INTERNAL": 1}
    assert not gw.gateway.service.tasks.deaths  # answered (INTERNAL) and logged: not a task death besides
    handler.broken = False
    assert (await client.generate("hi", request_id="r-1")).text == "fine"  # the failed key does not stick


async def test_a_bug_in_a_stream_with_a_request_id_is_logged_once_and_internal(
        make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture) -> None:
    handler = Flaky()
    gw = await make_gateway(upstream=HandlerUpstream(handler))
    client = gw.client()
    with caplog.at_level(logging.ERROR, logger="nanofleet.gateway"), pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stream("hi", request_id="s-1")
    _internal(info.value, "RuntimeError")
    logged = [r for r in caplog.records if r.name == "nanofleet.gateway" and r.exc_info]
    assert len(logged) == 1 and "secret detail" in str(logged[0].exc_info)
    assert dict(gw.gateway.service.refusals) == {"INTERNAL": 1}
    handler.broken = False
    chunks = await client.stream("hi", request_id="s-1")
    assert "".join(c.text for c in chunks) == "fine"
