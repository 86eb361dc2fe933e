"""A real gRPC `Inference` server for tests: the reference bridge (`nanofleet.agent.bridge`) over any agent backend
(here the tiny llama.cpp model), with the knobs a test needs to make it behave like the fleet gateway (refusing a
sensitive request, a policy refusal, a rate limit) or like a failing server (delay, a stream cut mid-way). One
bridge implementation: this only adds fault injection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from nanofleet.agent.bridge import Bridge, start, to_chat
from nanofleet.agent.runtime.base import Backend
from nanofleet.protos import inference_pb2

__all__ = ["Servicer", "start", "to_chat"]


class Servicer(Bridge):
    token_refusal = "missing or wrong device token"  # the gateway's words

    def __init__(self, backend: Backend, token: str | None = None, delay: float = 0.0,
                 fail_after: int | None = None) -> None:
        # ignore_eos: a fixed number of tokens, so tests can assert usage; 16 when the request sets no limit
        super().__init__(backend, token=token, model="bridge-tiny", options={"ignore_eos": True},
                         default_max_tokens=16)
        self.delay = delay
        self.fail_after = fail_after  # GenerateStream: abort UNAVAILABLE after this many chunks
        self.refuse: str | None = None  # abort FAILED_PRECONDITION with this message, as the gateway's policy does
        self.rate_limit: int | None = None  # abort RESOURCE_EXHAUSTED with this retry-after, as a gateway 429 does

    async def _admit(self, request: inference_pb2.GenerateRequest | None, context: grpc.aio.ServicerContext) -> None:
        await super()._admit(request, context)
        if request is not None and request.sensitive:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "sensitive requests never leave the device")
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        if self.rate_limit is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"upstream rate limit; retry in {self.rate_limit}s",
                                trailing_metadata=(("retry-after", str(self.rate_limit)),))
        if self.delay:
            await asyncio.sleep(self.delay)

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        sent = 0
        async for chunk in super().GenerateStream(request, context):
            if self.fail_after is not None and sent >= self.fail_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "bridge lost its model mid-stream")
            sent += 1
            yield chunk
