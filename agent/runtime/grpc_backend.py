"""A client of our `Inference` gRPC service as a backend: the local bridge (an Android companion exposing AICore's
Gemini Nano, a llama.cpp server on a Jetson) and the cloud route to the fleet gateway are both this class.

Every call has a deadline; the device token goes in `authorization: Bearer …` metadata; TLS when a CA is given.
A small circuit breaker opens after consecutive transport failures, so the router stops choosing a dead route.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    Busy,
    ChatRequest,
    Chunk,
    Completion,
    Refused,
    Usage,
)
from nanofleet.protos import inference_pb2, inference_pb2_grpc

_TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcBackend(Backend):
    def __init__(
        self, address: str, *, token: str | None = None, ca: Path | None = None, timeout: float = 30.0,
        name: str = "cloud", model: str = "", failure_threshold: int = 3, cooldown: float = 5.0,
    ) -> None:
        self.address = address
        self.name = name
        self.model = model
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._ca = ca.read_bytes() if ca else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.failures = 0
        self._failed_at: float | None = None  # last transport failure; None: optimistic until a call fails
        self._open_until = 0.0

    @property
    def reachable(self) -> bool:
        """No transport failure in the last `cooldown` seconds (after that the router may try again)."""
        return self._failed_at is None or time.monotonic() - self._failed_at >= self.cooldown

    @property
    def circuit_open(self) -> bool:
        return time.monotonic() < self._open_until

    def _stub_now(self) -> Any:
        if self._stub is None:  # channels bind to the running event loop: create on first use
            options = [("grpc.keepalive_time_ms", 300_000), ("grpc.max_receive_message_length", 16 << 20)]
            if self._ca is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=self._ca)
                self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        return self._stub

    def _ok(self) -> None:
        self.failures = 0
        self._failed_at = None

    def _error(self, exc: grpc.aio.AioRpcError) -> BackendError:
        code, detail = exc.code(), exc.details() or ""
        where = f"{self.name} ({self.address})"
        if code in _TRANSPORT:
            self.failures += 1
            self._failed_at = time.monotonic()
            if self.failures >= self.failure_threshold:
                self._open_until = time.monotonic() + self.cooldown
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return BackendTimeout(f"{where}: deadline of {self.timeout}s exceeded")
            return BackendUnavailable(f"{where} unavailable: {detail}")
        self._ok()  # it answered, so it is reachable
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.OUT_OF_RANGE):
            return BadRequest(f"{where}: {detail}")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return Refused(f"{where} refused: {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry = dict(exc.trailing_metadata() or ()).get("retry-after")
            return Busy(f"{where}: {detail}", retry_after=float(retry) if retry else 1.0)
        return BackendUnavailable(f"{where}: {code.name}: {detail}")

    def _request(self, req: ChatRequest) -> inference_pb2.GenerateRequest:
        system = "\n".join(m["content"] for m in req.messages if m["role"] == "system")
        config = inference_pb2.GenerationConfig(stop=req.stop)
        if req.temperature is not None:
            config.temperature = req.temperature
        if req.top_k is not None:
            config.top_k = req.top_k
        if req.top_p is not None:
            config.top_p = req.top_p
        if req.max_tokens is not None:
            config.max_output_tokens = req.max_tokens
        return inference_pb2.GenerateRequest(
            request_id=req.request_id, app_id=req.app_id, model=self.model, system_instruction=system,
            messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"])
                      for m in req.messages if m["role"] != "system"],
            config=config, sensitive=req.sensitive,
        )

    async def generate(self, request: ChatRequest) -> Completion:
        try:
            resp = await self._stub_now().Generate(self._request(request), timeout=self.timeout,
                                                   metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        self._ok()
        return Completion(resp.text, resp.finish_reason or "stop", _usage(resp.usage), resp.model or self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        call = self._stub_now().GenerateStream(self._request(request), timeout=self.timeout,
                                              metadata=self._metadata)
        try:
            async for chunk in call:
                self._ok()
                yield Chunk(chunk.text, chunk.finish_reason or None,
                            _usage(chunk.usage) if chunk.HasField("usage") else None, chunk.model or self.name)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        finally:
            call.cancel()  # a consumer that stops early stops the remote generation too

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        msg = inference_pb2.CountTokensRequest(model=self.model, system_instruction=system, messages=[
            inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages if m["role"] != "system"])
        try:
            resp = await self._stub_now().CountTokens(msg, timeout=self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from exc
        return resp.total_tokens

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None


def _usage(u: inference_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens)
