"""One interface for every upstream model service (Gemini, OpenAI-compatible, llama.cpp), after httpx's transports.

An upstream raises only the `UpstreamError` tree (see `errors`): each transport converts its client's errors where
they enter our code. `HandlerUpstream` takes a plain function, for unit tests and benchmarks of the layers above.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from ..errors import UpstreamUnavailable


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str

@dataclass(frozen=True)
class UpstreamRequest:
    model: str
    messages: tuple[Message, ...]
    system_instruction: str = ""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    thinking_budget: int | None = None
    stop: tuple[str, ...] = ()

@dataclass(frozen=True)
class UpstreamResult:
    text: str
    finish_reason: str  # stop | length | safety | other
    input_tokens: int
    output_tokens: int
    model: str

@dataclass(frozen=True)
class UpstreamChunk:
    """A streamed delta; `finish_reason` and the token counts arrive with the last chunks only."""

    text: str = ""
    finish_reason: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str = ""

class Upstream(abc.ABC):
    """A model service the gateway forwards to. `unavailable` names why it cannot serve at all (else None)."""

    name: str = "upstream"
    unavailable: str | None = None

    @abc.abstractmethod
    async def generate(self, request: UpstreamRequest) -> UpstreamResult: ...

    @abc.abstractmethod
    def stream(self, request: UpstreamRequest) -> AsyncGenerator[UpstreamChunk, None]: ...

    @abc.abstractmethod
    async def count_tokens(self, request: UpstreamRequest) -> int: ...

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Make what binds to the running event loop (a connection pool) before the first call pays for it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def __aenter__(self) -> Upstream:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

class UnavailableUpstream(Upstream):
    """Stands in when the configured upstream cannot start (e.g. no API key): every call fails with the reason."""

    name = "unavailable"

    def __init__(self, reason: str) -> None:
        self.unavailable = reason

    async def generate(self, request: UpstreamRequest) -> UpstreamResult:
        raise UpstreamUnavailable(self.unavailable or "upstream unavailable", retryable=False)

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[UpstreamChunk, None]:
        raise UpstreamUnavailable(self.unavailable or "upstream unavailable", retryable=False)
        yield UpstreamChunk()  # pragma: no cover - makes this an async generator

    async def count_tokens(self, request: UpstreamRequest) -> int:
        raise UpstreamUnavailable(self.unavailable or "upstream unavailable", retryable=False)

Handler = Callable[[UpstreamRequest], Awaitable[UpstreamResult | Sequence[UpstreamChunk]]]

class HandlerUpstream(Upstream):
    """An upstream answered by `handler(request)`: a result (unary; streamed as one chunk) or a list of chunks."""

    name = "handler"

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.calls: list[UpstreamRequest] = []

    async def _answer(self, request: UpstreamRequest) -> UpstreamResult | Sequence[UpstreamChunk]:
        self.calls.append(request)
        return await self._handler(request)

    async def generate(self, request: UpstreamRequest) -> UpstreamResult:
        answer = await self._answer(request)
        if isinstance(answer, UpstreamResult):
            return answer
        return collect(answer, request.model)

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[UpstreamChunk, None]:
        answer = await self._answer(request)
        if isinstance(answer, UpstreamResult):
            yield UpstreamChunk(answer.text, answer.finish_reason, answer.input_tokens, answer.output_tokens,
                                answer.model)
            return
        for chunk in answer:
            yield chunk

    async def count_tokens(self, request: UpstreamRequest) -> int:
        return sum(len(m.content.split()) for m in request.messages) + len(request.system_instruction.split())

def collect(chunks: Sequence[UpstreamChunk], model: str) -> UpstreamResult:
    """Fold streamed chunks into one result (the last counts and reason win)."""
    text, reason, tokens_in, tokens_out, name = [], "", 0, 0, model
    for chunk in chunks:
        text.append(chunk.text)
        reason = chunk.finish_reason or reason
        tokens_in = chunk.input_tokens if chunk.input_tokens is not None else tokens_in
        tokens_out = chunk.output_tokens if chunk.output_tokens is not None else tokens_out
        name = chunk.model or name
    return UpstreamResult("".join(text), reason or "stop", tokens_in, tokens_out, name)

