"""The reference local `Inference` bridge: what an Android companion app implements to lend the agent AICore's
Gemini Nano (ML Kit GenAI Prompt API), here in Python over any agent backend, so the tests run the agent against the
very contract docs/android.md describes (and a Jetson or Termux setup can serve a llama.cpp model the same way).

The contract: `protos/inference.proto` `Inference` (Generate, GenerateStream, CountTokens; bearer token in
`authorization` metadata when one is set) plus `grpc.health.v1.Health/Check` for `nanofleet.v1.Inference`
(SERVING only when the model is AVAILABLE, the reason in the `nanofleet-detail` trailer). Every "not now" carries a
`retry-after` trailer in seconds; the agent's `GrpcBackend(role="bridge")` rests the local route that long
(`BridgeUnavailable`: `prefer_local` falls back to the cloud before the first token, `local_only` gets 503 with
`Retry-After`). The model's state (ML Kit `FeatureStatus`) and ML Kit's `GenAiException` codes map to:

    FeatureStatus / ErrorCode            gRPC status          retry-after (s)   the agent
    UNAVAILABLE (0)                      UNAVAILABLE          86400             local rests; health NOT_SERVING
    DOWNLOADABLE (1): download starts    UNAVAILABLE          30                local rests; health NOT_SERVING
    DOWNLOADING (2)                      UNAVAILABLE          30                local rests; health NOT_SERVING
    BUSY (per-app quota)                 RESOURCE_EXHAUSTED   its delay, or 10  local rests that long
    BACKGROUND_USE_BLOCKED               FAILED_PRECONDITION  30                local rests that long
    PER_APP_BATTERY_USE_QUOTA_EXCEEDED   RESOURCE_EXHAUSTED   300               local rests that long
    NOT_ENOUGH_DISK_SPACE                FAILED_PRECONDITION  3600              local rests that long
    REQUEST_TOO_LARGE                    INVALID_ARGUMENT     —                 400 to the app (no fallback)

Errors::

    BridgeError      what the model side failed with (ML Kit's GenAiException): code, message, retry delay
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import grpc

from nanofleet.agent.runtime.base import Backend, ChatRequest
from nanofleet.protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger("nanofleet.agent.bridge")

SERVICE = "nanofleet.v1.Inference"


class FeatureStatus(IntEnum):
    """ML Kit GenAI `FeatureStatus` (and the Chrome Prompt API's availability): the on-device model's state."""

    UNAVAILABLE = 0
    DOWNLOADABLE = 1
    DOWNLOADING = 2
    AVAILABLE = 3


@dataclass(frozen=True)
class Answer:
    status: grpc.StatusCode
    retry_after: float | None  # seconds; None: not a "come back later" (the request itself is wrong)


# ML Kit GenAiException.ErrorCode names -> what the agent hears. A code not listed here is a bug of the bridge.
ERRORS: Mapping[str, Answer] = {
    "BUSY": Answer(grpc.StatusCode.RESOURCE_EXHAUSTED, 10),
    "BACKGROUND_USE_BLOCKED": Answer(grpc.StatusCode.FAILED_PRECONDITION, 30),
    "PER_APP_BATTERY_USE_QUOTA_EXCEEDED": Answer(grpc.StatusCode.RESOURCE_EXHAUSTED, 300),
    "NOT_ENOUGH_DISK_SPACE": Answer(grpc.StatusCode.FAILED_PRECONDITION, 3600),
    "REQUEST_TOO_LARGE": Answer(grpc.StatusCode.INVALID_ARGUMENT, None),
}
# FeatureStatus other than AVAILABLE -> UNAVAILABLE with this retry-after (health: NOT_SERVING)
NOT_READY: Mapping[FeatureStatus, float] = {
    FeatureStatus.UNAVAILABLE: 86_400, FeatureStatus.DOWNLOADABLE: 30, FeatureStatus.DOWNLOADING: 30,
}


class BridgeError(Exception):
    """A model call failed on the companion's side: `code` is ML Kit's ErrorCode name (a key of ERRORS),
    `retry_after` its `getRetryDelay()` in seconds when it gave one (else the table's)."""

    def __init__(self, code: str, message: str = "", retry_after: float | None = None) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown bridge error code {code!r}; known: {', '.join(ERRORS)}")
        super().__init__(message or code)
        self.code, self.retry_after = code, retry_after


def to_chat(req: inference_pb2.GenerateRequest, options: dict[str, Any] | None = None,
            default_max_tokens: int | None = None) -> ChatRequest:
    msgs = [{"role": "system", "content": req.system_instruction}] if req.system_instruction else []
    msgs += [{"role": m.role, "content": m.content} for m in req.messages]
    cfg = req.config
    limit = cfg.max_output_tokens if cfg.HasField("max_output_tokens") else default_max_tokens
    return ChatRequest(msgs, max_tokens=limit,
                       temperature=cfg.temperature if cfg.HasField("temperature") else None,
                       top_k=cfg.top_k if cfg.HasField("top_k") else None,
                       top_p=cfg.top_p if cfg.HasField("top_p") else None, stop=list(cfg.stop),
                       options=dict(options or {}))


class Bridge(inference_pb2_grpc.InferenceServicer):
    """`Inference` over `backend` (the on-device model). `status`/`progress` are the model's state as the companion
    learns it from ML Kit (`checkStatus()`, the download flow); set them as they change."""

    token_refusal = "missing or wrong bridge token"

    def __init__(self, backend: Backend, *, token: str | None = None, model: str = "bridge-model",
                 status: FeatureStatus = FeatureStatus.AVAILABLE, options: dict[str, Any] | None = None,
                 default_max_tokens: int | None = None) -> None:
        self.backend, self.token, self.model = backend, token, model
        self.status, self.progress = status, 0.0
        self.download_requested = False  # set when a call met DOWNLOADABLE: the companion calls download()
        self.not_ready = dict(NOT_READY)  # retry-after per state (a companion may estimate a download's end)
        self.options, self.default_max_tokens = options, default_max_tokens
        self.calls = 0
        self.seen_metadata: list[dict[str, str]] = []
        self.answered: Counter[str] = Counter()  # gRPC status names of refusals, and INTERNAL for bugs

    @property
    def detail(self) -> str:
        """Why the model is not serving (empty when it is), for the health trailer and error messages."""
        if self.status == FeatureStatus.DOWNLOADING:
            return f"model downloading ({self.progress:.0%})"
        if self.status == FeatureStatus.DOWNLOADABLE:
            return "model not downloaded yet: download started"
        if self.status == FeatureStatus.UNAVAILABLE:
            return "on-device model not supported on this device"
        return ""

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                     retry_after: float | None) -> None:
        self.answered[code.name] += 1
        trailer = (("retry-after", f"{retry_after:g}"),) if retry_after is not None else ()
        await context.abort(code, message, trailing_metadata=trailer)

    async def _admit(self, request: inference_pb2.GenerateRequest | None, context: grpc.aio.ServicerContext) -> None:
        """Count, authenticate, and refuse while the model is not AVAILABLE."""
        self.calls += 1
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.seen_metadata.append(md)
        if self.token and md.get("authorization") != f"Bearer {self.token}":
            await self._abort(context, grpc.StatusCode.UNAUTHENTICATED, self.token_refusal, None)
        if self.status != FeatureStatus.AVAILABLE:
            if self.status == FeatureStatus.DOWNLOADABLE:
                self.download_requested = True
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, self.detail, self.not_ready[self.status])

    async def _failed(self, exc: Exception, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, BridgeError):
            row = ERRORS[exc.code]
            retry = None if row.retry_after is None else (exc.retry_after or row.retry_after)
            await self._abort(context, row.status, f"{exc.code}: {exc}", retry)
        log.error("bridge: the model call failed", exc_info=exc)  # a bug: logged, counted, answered INTERNAL
        await self._abort(context, grpc.StatusCode.INTERNAL, f"{type(exc).__name__} (see the bridge's log)", None)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        await self._admit(request, context)
        try:
            c = await self.backend.generate(to_chat(request, self.options, self.default_max_tokens))
        except Exception as exc:  # mapped to a status (a BridgeError) or INTERNAL, logged
            await self._failed(exc, context)
            raise
        usage = inference_pb2.Usage(input_tokens=c.usage.prompt_tokens, output_tokens=c.usage.completion_tokens,
                                    total_tokens=c.usage.total_tokens)
        return inference_pb2.GenerateResponse(request_id=request.request_id, text=c.text,
                                              finish_reason=c.finish_reason, usage=usage, model=self.model)

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        await self._admit(request, context)
        try:
            stream = self.backend.stream(to_chat(request, self.options, self.default_max_tokens))
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]  # an async generator
                async for c in chunks:
                    chunk = inference_pb2.GenerateChunk(request_id=request.request_id, text=c.text, model=self.model,
                                                        finish_reason=c.finish_reason or "")
                    if c.usage is not None:
                        chunk.usage.CopyFrom(inference_pb2.Usage(input_tokens=c.usage.prompt_tokens,
                                                                 output_tokens=c.usage.completion_tokens))
                    yield chunk
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # mapped to a status (a BridgeError) or INTERNAL, logged
            await self._failed(exc, context)
            raise

    async def CountTokens(self, request: inference_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> inference_pb2.CountTokensResponse:
        await self._admit(None, context)
        msgs = [{"role": "system", "content": request.system_instruction}] if request.system_instruction else []
        msgs += [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            total = await self.backend.count_tokens(msgs)
        except Exception as exc:  # mapped to a status (a BridgeError) or INTERNAL, logged
            await self._failed(exc, context)
            raise
        return inference_pb2.CountTokensResponse(total_tokens=total)

    async def _health(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """grpc.health.v1 Check by hand (raw protobuf: field 1 = status), so a device needs no extra package."""
        context.set_trailing_metadata((("nanofleet-detail", self.detail),))
        return b"\x08" + bytes([1 if self.status == FeatureStatus.AVAILABLE else 2])

    def health_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(self._health)})


async def start(bridge: Bridge, credentials: grpc.ServerCredentials | None = None,
                port: int = 0, unix: str | None = None) -> tuple[grpc.aio.Server, int]:
    """Serve `bridge` on 127.0.0.1:`port` (0: a free one; a given port lets a test restart "the same" server), with
    TLS when `credentials` are given, or on `unix` (`unix:/path`; port 0 returned)."""
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(bridge, server)
    server.add_generic_rpc_handlers((bridge.health_handler(),))
    if unix is not None:
        server.add_insecure_port(unix)
        port = 0
    elif credentials is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port("localhost:0", credentials)
    await server.start()
    return server, port
