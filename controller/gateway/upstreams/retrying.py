"""The gateway's one retry loop around any upstream (client libraries' own retries are turned off).

Retries only errors marked `retryable` (5xx, timeouts, broken connections), with the project's one backoff rule
(nanofleet.backoff: exponential, capped, equal jitter; `rand` is injectable so tests pin the delays),
at most `max_retries` times, and never sleeps past the caller's deadline. A 429 is not retried here: its delay goes
back to the device, whose queue honours it. A stream is retried only until its first chunk.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from nanofleet.backoff import backoff

from ..errors import UpstreamError
from .base import Upstream, UpstreamChunk, UpstreamRequest, UpstreamResult

T = TypeVar("T")


class RetryingUpstream(Upstream):
    def __init__(self, inner: Upstream, max_retries: int = 2, base_delay: float = 0.25, max_delay: float = 4.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._rand = rand
        self.retries = 0  # counted, for tests and status

    @property
    def unavailable(self) -> str | None:
        """The wrapped upstream's, live (it may learn it is unavailable after the wrapper was built)."""
        return self.inner.unavailable

    @unavailable.setter
    def unavailable(self, value: str | None) -> None:
        self.inner.unavailable = value

    def _delay_or_raise(self, attempt: int, exc: UpstreamError, deadline: float | None) -> float:
        if not exc.retryable or attempt >= self.max_retries:
            raise exc
        delay = backoff(attempt, self.base_delay, self.max_delay, self._rand())
        if deadline is not None and time.monotonic() + delay >= deadline:
            raise exc
        self.retries += 1
        return delay

    async def _call(self, fn: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except UpstreamError as exc:
                delay = self._delay_or_raise(attempt, exc, deadline)
            attempt += 1
            await asyncio.sleep(delay)

    async def generate(self, request: UpstreamRequest, deadline: float | None = None) -> UpstreamResult:
        return await self._call(lambda: self.inner.generate(request), deadline)

    async def count_tokens(self, request: UpstreamRequest, deadline: float | None = None) -> int:
        return await self._call(lambda: self.inner.count_tokens(request), deadline)

    async def stream(self, request: UpstreamRequest,
                     deadline: float | None = None) -> AsyncGenerator[UpstreamChunk, None]:
        attempt = 0
        while True:
            chunks = self.inner.stream(request)
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                await chunks.aclose()
                return
            except UpstreamError as exc:
                await chunks.aclose()
                delay = self._delay_or_raise(attempt, exc, deadline)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            break
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()
