"""Any OpenAI-compatible chat server over httpx — and llama.cpp for on-prem fleets through llama.cpp's own server
(`llama-server`, or xllamacpp's `Server` listener), which speaks the same API.

Why a llama.cpp *server* and not xllamacpp in-process: the gateway stays an async process without model weights
or the agent extra's native wheels, llama.cpp's parallel slots batch concurrent devices, and the model can run on a
separate GPU box. `llamacpp=True` adds what only llama.cpp has: `top_k` and token counting via `POST /tokenize`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from ..errors import (
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    UpstreamUnsupported,
)
from ..rules import retry_delay
from .base import Upstream, UpstreamChunk, UpstreamRequest, UpstreamResult

_FINISH = {"stop": "stop", "length": "length", "content_filter": "safety"}


class OpenAICompatUpstream(Upstream):
    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, llamacpp: bool = False,
                 max_connections: int = 256) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._base = base_url.rstrip("/")
        self._llamacpp = llamacpp
        self.name = "llamacpp" if llamacpp else "openai"
        self._http = httpx.AsyncClient(base_url=self._base, headers=headers, timeout=timeout,
                                       limits=httpx.Limits(max_connections=max_connections))

    async def close(self) -> None:
        await self._http.aclose()

    def _body(self, request: UpstreamRequest, stream: bool) -> dict[str, Any]:
        messages = [{"role": "system", "content": request.system_instruction}] if request.system_instruction else []
        messages += [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {"model": request.model, "messages": messages, "stream": stream}
        for key, value in (("temperature", request.temperature), ("top_p", request.top_p),
                           ("max_tokens", request.max_output_tokens)):
            if value is not None:
                body[key] = value
        if request.stop:
            body["stop"] = list(request.stop)
        if self._llamacpp and request.top_k is not None:
            body["top_k"] = request.top_k
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(self, request: UpstreamRequest) -> UpstreamResult:
        try:
            response = await self._http.post("/chat/completions", json=self._body(request, False))
        except httpx.HTTPError as exc:
            raise _transport(exc) from exc
        _raise_for_status(response.status_code, response.text, response.headers.get("retry-after"))
        try:
            data = response.json()
            choice = data["choices"][0]
            usage = data["usage"]
            return UpstreamResult(str(choice["message"].get("content") or ""),
                                  _FINISH.get(choice.get("finish_reason") or "stop", "other"),
                                  int(usage["prompt_tokens"]), int(usage["completion_tokens"]),
                                  str(data.get("model") or request.model))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamMalformed(f"malformed upstream answer: {type(exc).__name__}: {exc}"[:500]) from exc

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[UpstreamChunk, None]:
        try:
            async with self._http.stream("POST", "/chat/completions", json=self._body(request, True)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for_status(response.status_code, response.text, response.headers.get("retry-after"))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    yield _chunk(payload, request.model)
        except UpstreamError:
            raise
        except httpx.HTTPError as exc:
            raise _transport(exc) from exc

    async def count_tokens(self, request: UpstreamRequest) -> int:
        if not self._llamacpp:
            raise UpstreamUnsupported("token counting is not part of the OpenAI-compatible API")
        text = "\n".join([request.system_instruction, *(m.content for m in request.messages)])
        root = self._base.removesuffix("/v1")
        try:
            response = await self._http.post(f"{root}/tokenize", json={"content": text})
        except httpx.HTTPError as exc:
            raise _transport(exc) from exc
        _raise_for_status(response.status_code, response.text, None)
        try:
            return len(response.json()["tokens"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamMalformed(f"malformed upstream answer to /tokenize: {exc}") from exc


def _chunk(payload: str, model: str) -> UpstreamChunk:
    try:
        data = json.loads(payload)
        if "error" in data:
            raise UpstreamUnavailable(f"upstream error mid-stream: {data['error']}", retryable=False)
        usage = data.get("usage") or {}
        choices = data.get("choices") or []
        delta = choices[0].get("delta") or {} if choices else {}
        reason = choices[0].get("finish_reason") if choices else None
        return UpstreamChunk(str(delta.get("content") or ""), _FINISH.get(reason, "other") if reason else "",
                             usage.get("prompt_tokens"), usage.get("completion_tokens"),
                             str(data.get("model") or model))
    except UpstreamError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamMalformed(f"malformed upstream stream chunk: {type(exc).__name__}: {exc}"[:500]) from exc


def _raise_for_status(status: int, body: str, retry_after: str | None) -> None:
    if status < 400:
        return
    try:
        err = json.loads(body).get("error", {})
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = None
    message = message or body[:300] or f"HTTP {status}"
    if status == 429:
        raise UpstreamRateLimited(f"upstream rate limited: {message}", retry_delay(message, None, retry_after))
    if status in (400, 404, 413, 422):
        raise UpstreamRejected(f"upstream rejected the request: {message}")
    raise UpstreamUnavailable(f"upstream error {status}: {message}", retryable=status in (408, 500, 502, 503, 504))


def _transport(exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(f"upstream timed out: {type(exc).__name__}")
    return UpstreamUnavailable(f"upstream connection failed: {type(exc).__name__}: {exc}")
