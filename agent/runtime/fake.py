"""A backend that answers with a function (as httpx's MockTransport): for unit tests of code above the runtime
and for simulated devices, where loading llama.cpp would only cost time. Raise a `BackendError` from the handler
to act out a failure."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable

from nanofleet.agent.runtime.base import Backend, ChatRequest, Chunk, Completion, Usage

Handler = Callable[[ChatRequest], "str | Completion | Awaitable[str | Completion]"]


class FunctionBackend(Backend):
    def __init__(self, handler: Handler, *, name: str = "fake", context_window: int = 2048) -> None:
        self.handler = handler
        self.name = name
        self.model_name = name
        self.context_window = context_window
        self.requests: list[ChatRequest] = []

    async def generate(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        result = self.handler(request)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Completion):
            return result
        text = str(result)
        if request.max_tokens is not None:
            text = text[: request.max_tokens]  # one character, one token: simple and predictable
        finish = "length" if request.max_tokens is not None and len(str(result)) > request.max_tokens else "stop"
        prompt = await self.count_tokens(request.messages)
        return Completion(text, finish, Usage(prompt_tokens=prompt, completion_tokens=len(text)), self.name)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        done = await self.generate(request)
        for ch in done.text:
            yield Chunk(ch, model=done.model)
        yield Chunk("", done.finish_reason, done.usage, done.model)

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        return sum(len(m["content"]) + 4 for m in messages)
