"""Gemini through google-genai (HTTP). Its own retries are off (one attempt): `RetryingUpstream` owns retrying.

We hand google-genai our own `aiohttp.ClientSession` (its aiohttp transport), so the connection pool is ours and
closes with us. aiohttp rather than httpx: measured here through google-genai against the fast fake, httpx cost
3.8 ms of CPU a call at 8 in flight and 10.4 ms at 64 (its pool degrades with concurrency), aiohttp 2.1–2.3 ms;
the rest of a call's cost is google-genai's own request building and pydantic parsing. The session binds to the
running loop, so it (and the client) is made in `open()` (the gateway's start), else on the first call.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import httpx
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from ..errors import UpstreamError, UpstreamMalformed, UpstreamRateLimited, UpstreamRejected, UpstreamUnavailable
from ..rules import retry_delay
from .base import Upstream, UpstreamChunk, UpstreamRequest, UpstreamResult

_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "safety", "RECITATION": "safety",
           "BLOCKLIST": "safety", "PROHIBITED_CONTENT": "safety", "SPII": "safety", "IMAGE_SAFETY": "safety"}
_RETRYABLE = {408, 500, 502, 503, 504}


class GeminiUpstream(Upstream):
    name = "gemini"

    def __init__(self, api_key: str, base_url: str | None = None, timeout: float = 30.0,
                 max_connections: int = 256) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_connections = max_connections
        self._http: aiohttp.ClientSession | None = None
        self._genai: genai.Client | None = None

    @property
    def _client(self) -> genai.Client:
        if self._genai is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self._max_connections))
            # api_version pinned: google-genai's default moved between releases (v1beta → v1) and follows an env
            # var; its timeout is in ms and becomes each request's aiohttp total timeout
            options = types.HttpOptions(base_url=self._base_url, api_version="v1beta",
                                        timeout=int(self._timeout * 1000),
                                        retry_options=types.HttpRetryOptions(attempts=1), aiohttp_client=self._http)
            self._genai = genai.Client(api_key=self._api_key, vertexai=False, http_options=options)
        return self._genai

    async def open(self) -> None:
        self._client  # noqa: B018 - made now, in the loop, not inside the first call's deadline

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http, self._genai = None, None

    async def generate(self, request: UpstreamRequest) -> UpstreamResult:
        try:
            response = await self._client.aio.models.generate_content(
                model=request.model, contents=_contents(request), config=_config(request))
            return _result(response, request.model)
        except UpstreamError:
            raise
        except Exception as exc:
            raise convert(exc) from exc

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[UpstreamChunk, None]:
        try:
            chunks = await self._client.aio.models.generate_content_stream(
                model=request.model, contents=_contents(request), config=_config(request))
            async for response in chunks:
                yield _chunk(response, request.model)
        except UpstreamError:
            raise
        except Exception as exc:
            raise convert(exc) from exc

    async def count_tokens(self, request: UpstreamRequest) -> int:
        # The Gemini API's countTokens takes no systemInstruction in google-genai's developer mode: count it as a
        # leading user turn, which differs from the billed count by a few framing tokens at most.
        contents = _contents(request)
        if request.system_instruction:
            contents.insert(0, types.Content(role="user", parts=[types.Part(text=request.system_instruction)]))
        try:
            response = await self._client.aio.models.count_tokens(model=request.model, contents=contents)
        except Exception as exc:
            raise convert(exc) from exc
        if not isinstance(response.total_tokens, int):
            raise UpstreamMalformed("malformed upstream answer: countTokens without totalTokens")
        return response.total_tokens


def convert(exc: Exception) -> UpstreamError:
    """google-genai / httpx errors → our tree; anything else is a malformed answer, never a crash."""
    if isinstance(exc, genai_errors.APIError):
        message = exc.message or str(exc)
        code = exc.code
        if code == 429:
            header = None
            response = getattr(exc, "response", None)
            if response is not None and getattr(response, "headers", None) is not None:
                header = response.headers.get("retry-after")
            return UpstreamRateLimited(f"upstream rate limited: {message}", retry_delay(message, exc.details, header))
        if code in (400, 404, 413, 422):
            return UpstreamRejected(f"upstream rejected the request: {message}")
        if code in (401, 403):
            return UpstreamUnavailable(f"upstream refused the gateway's credentials ({code}): {message}",
                                       retryable=False)
        return UpstreamUnavailable(f"upstream error {code}: {message}", retryable=code in _RETRYABLE)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):  # aiohttp's timeouts are TimeoutErrors
        return UpstreamUnavailable(f"upstream timed out: {type(exc).__name__}")
    if isinstance(exc, httpx.TransportError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return UpstreamUnavailable(f"upstream connection failed: {type(exc).__name__}: {exc}")
    return UpstreamMalformed(f"malformed upstream answer: {type(exc).__name__}: {exc}"[:500])


def _contents(request: UpstreamRequest) -> list[types.Content]:
    return [types.Content(role="model" if m.role == "assistant" else "user", parts=[types.Part(text=m.content)])
            for m in request.messages if m.role != "system"]


def _config(request: UpstreamRequest) -> types.GenerateContentConfig:
    system = "\n\n".join([request.system_instruction] * bool(request.system_instruction)
                         + [m.content for m in request.messages if m.role == "system"])
    return types.GenerateContentConfig(
        system_instruction=system or None,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        stop_sequences=list(request.stop) or None,
        thinking_config=(types.ThinkingConfig(thinking_budget=request.thinking_budget)
                         if request.thinking_budget is not None else None),
    )


def _text(response: Any) -> tuple[str, str]:
    """(text, finish reason) of the first candidate; thought parts are not part of the answer."""
    candidates = response.candidates
    if not candidates:
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            return "", "safety"
        raise UpstreamMalformed("malformed upstream answer: no candidates and no promptFeedback")
    candidate = candidates[0]
    parts = candidate.content.parts if candidate.content is not None and candidate.content.parts else []
    text = "".join(p.text for p in parts if isinstance(p.text, str) and not p.thought)
    reason = candidate.finish_reason
    name = getattr(reason, "value", reason)
    return text, (_FINISH.get(str(name), "other") if name else "")


def _tokens(response: Any) -> tuple[int | None, int | None]:
    usage = response.usage_metadata
    if usage is None:
        return None, None
    out = (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)
    return usage.prompt_token_count, out


def _result(response: Any, model: str) -> UpstreamResult:
    text, reason = _text(response)
    tokens_in, tokens_out = _tokens(response)
    if tokens_in is None:
        raise UpstreamMalformed("malformed upstream answer: no usageMetadata")
    return UpstreamResult(text, reason or "stop", tokens_in, tokens_out or 0, response.model_version or model)


def _chunk(response: Any, model: str) -> UpstreamChunk:
    if not response.candidates and response.usage_metadata is not None and response.prompt_feedback is None:
        text, reason = "", ""  # a usage-only trailer
    else:
        text, reason = _text(response)
    tokens_in, tokens_out = _tokens(response)
    return UpstreamChunk(text, reason, tokens_in, tokens_out, response.model_version or model)
