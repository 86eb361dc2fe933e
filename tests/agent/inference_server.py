"""A real gRPC `Inference` server for tests, wrapping any agent backend (here: the tiny llama.cpp model) — what an
Android companion or a Jetson's llama.cpp bridge would expose, and the shape of the fleet gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from nanofleet.agent.runtime.base import Backend, ChatRequest
from nanofleet.protos import inference_pb2, inference_pb2_grpc


def to_chat(req: inference_pb2.GenerateRequest) -> ChatRequest:
    msgs = [{"role": "system", "content": req.system_instruction}] if req.system_instruction else []
    msgs += [{"role": m.role, "content": m.content} for m in req.messages]
    cfg = req.config
    return ChatRequest(msgs, max_tokens=cfg.max_output_tokens if cfg.HasField("max_output_tokens") else 16,
                       temperature=cfg.temperature if cfg.HasField("temperature") else None,
                       options={"ignore_eos": True})


class Servicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, backend: Backend, token: str | None = None, delay: float = 0.0,
                 fail_after: int | None = None) -> None:
        self.backend, self.token, self.delay = backend, token, delay
        self.fail_after = fail_after  # GenerateStream: abort UNAVAILABLE after this many chunks
        self.refuse: str | None = None  # abort FAILED_PRECONDITION with this message, as the gateway's policy does
        self.rate_limit: int | None = None  # abort RESOURCE_EXHAUSTED with this retry-after, as a gateway 429 does
        self.calls = 0
        self.seen_metadata: list[dict[str, str]] = []

    async def _check(self, request: inference_pb2.GenerateRequest | None, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        md = {k: v for k, v in context.invocation_metadata() or ()}
        self.seen_metadata.append(md)
        if self.token and md.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong device token")
        if request is not None and request.sensitive:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "sensitive requests never leave the device")
        if self.refuse is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse)
        if self.rate_limit is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"upstream rate limit; retry in {self.rate_limit}s",
                                trailing_metadata=(("retry-after", str(self.rate_limit)),))
        if self.delay:
            await asyncio.sleep(self.delay)

    async def Generate(self, request, context):
        await self._check(request, context)
        c = await self.backend.generate(to_chat(request))
        usage = inference_pb2.Usage(input_tokens=c.usage.prompt_tokens, output_tokens=c.usage.completion_tokens,
                                    total_tokens=c.usage.total_tokens)
        return inference_pb2.GenerateResponse(request_id=request.request_id, text=c.text,
                                              finish_reason=c.finish_reason, usage=usage, model="bridge-tiny")

    async def GenerateStream(self, request, context) -> AsyncIterator[inference_pb2.GenerateChunk]:
        await self._check(request, context)
        async with contextlib.aclosing(self.backend.stream(to_chat(request))) as chunks:
            sent = 0
            async for c in chunks:
                if self.fail_after is not None and sent >= self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "bridge lost its model mid-stream")
                sent += 1
                chunk = inference_pb2.GenerateChunk(request_id=request.request_id, text=c.text, model="bridge-tiny",
                                                    finish_reason=c.finish_reason or "")
                if c.usage is not None:
                    chunk.usage.CopyFrom(inference_pb2.Usage(input_tokens=c.usage.prompt_tokens,
                                                             output_tokens=c.usage.completion_tokens))
                yield chunk

    async def CountTokens(self, request, context):
        await self._check(None, context)
        msgs = [{"role": "system", "content": request.system_instruction}] if request.system_instruction else []
        msgs += [{"role": m.role, "content": m.content} for m in request.messages]
        return inference_pb2.CountTokensResponse(total_tokens=await self.backend.count_tokens(msgs))


async def start(servicer: Servicer, credentials: grpc.ServerCredentials | None = None,
                port: int = 0, unix: str | None = None) -> tuple[grpc.aio.Server, int]:
    """`port` 0: a free one; a given port lets a test restart "the same" server after stopping it. `unix`: listen
    on that `unix:/path` instead (port 0 returned)."""
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    if unix is not None:
        server.add_insecure_port(unix)
        port = 0
    elif credentials is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    await server.start()
    return server, port
