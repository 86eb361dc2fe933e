"""The model backend interface: one small base class, like an httpx transport.

A backend turns a `ChatRequest` into a `Completion` (or a stream of `Chunk`s). The in-process llama.cpp backend
(`LlamaBackend`) and the gRPC `Inference` client (`GrpcBackend`: a local bridge or the fleet gateway) both implement
it, so the router and the socket API never know which one answers.

Exception tree (every backend converts its library's errors into these, `raise … from exc`)::

    BackendError                      root; .status is the HTTP status the socket API answers with
    ├── BadRequest (400)              the backend refused the request itself (bad parameter, ...)
    │   └── ContextOverflow (400)     the prompt does not fit in the context window
    ├── Refused (403)                 the remote side will not serve it (policy, auth, sensitive data)
    ├── Busy (429)                    no capacity now; .retry_after seconds
    ├── BackendUnavailable (503)      not reachable / not loaded / failed: another route may serve it
    │   └── InsufficientMemory (503)  the model would not fit in free RAM, so it is not loaded
    └── BackendTimeout (504)          the deadline passed
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from nanofleet.agent.errors import AgentError


class BackendError(AgentError):
    status = 502
    code = "backend_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class BadRequest(BackendError):
    status = 400
    code = "invalid_request"


class ContextOverflow(BadRequest):
    code = "context_length_exceeded"


class Refused(BackendError):
    status = 403
    code = "refused"


class Busy(BackendError):
    status = 429
    code = "busy"


class BackendUnavailable(BackendError):
    status = 503
    code = "backend_unavailable"


class InsufficientMemory(BackendUnavailable):
    code = "insufficient_ram"


class WarmupFailed(BackendUnavailable):
    """The model loaded but its warm-up generation failed: it is not marked loaded (and is closed again)."""

    code = "warmup_failed"


class BackendTimeout(BackendError):
    status = 504
    code = "deadline_exceeded"


@dataclass(slots=True)
class ChatRequest:
    """One chat turn to generate. `options` carries llama.cpp extensions (seed, ignore_eos, min_p, ...)."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    app_id: str = ""
    request_id: str = ""
    sensitive: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the KV cache, not re-processed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    model: str
    tokens_per_s: float = 0.0


@dataclass(slots=True)
class Chunk:
    """A streamed delta; the last chunk has `finish_reason` and `usage` set."""

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str = ""
    tokens_per_s: float = 0.0


class Backend:
    """Base class: subclasses implement `generate`, `stream` and `count_tokens`; `close` frees resources.

    Cancelling the task awaiting `generate`, or closing the `stream` iterator, stops generation in the backend.
    """

    name = "backend"

    async def generate(self, request: ChatRequest) -> Completion:
        raise NotImplementedError

    def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        raise NotImplementedError

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
