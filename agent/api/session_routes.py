"""`/v1/sessions`: Prompt-API sessions over the socket (create, prompt, stream, clone, delete)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from nanofleet.agent.api.app import (
    DEFAULT_MAX_TOKENS,
    EventStream,
    JsonAnswer,
    _body_doc,
    parse,
    read_body,
    sse,
)
from nanofleet.agent.api.dispatch import Dispatcher
from nanofleet.agent.api.errors import ApiError, from_agent
from nanofleet.agent.api.schemas import (
    SESSION_CREATE,
    SESSION_PROMPT,
    SessionCreateBody,
    SessionPromptBody,
    route_request,
)
from nanofleet.agent.runtime.base import BackendError, ChatRequest, Chunk, ContextOverflow, Usage
from nanofleet.agent.sessions import Session, SessionLimit, SessionStore, fit


def _info(session: Session, window: int) -> dict[str, Any]:
    return {"id": session.id, "object": "session", "system_prompt": session.system_prompt,
            "temperature": session.temperature, "top_k": session.top_k, "turns": len(session.turns),
            "context_usage": session.context_usage, "context_window": window}


def _answer_usage(usage: Usage) -> dict[str, Any]:
    return {**usage.as_openai(), "prompt_tokens_processed": usage.prompt_tokens - usage.cached_tokens}


def install(app: FastAPI) -> None:
    dispatcher: Dispatcher = app.state.dispatcher
    store: SessionStore = app.state.sessions
    limit: int = app.state.max_body_bytes
    window = lambda: dispatcher.models.spec.n_ctx  # noqa: E731 - follows a reloaded model

    def get(session_id: str) -> Session:
        session = store.get(session_id)
        if session is None:
            raise ApiError(404, f"session {session_id!r} not found (deleted, or never created)",
                           param="session_id", code="session_not_found")
        return session

    @app.post("/v1/sessions", status_code=201, tags=["sessions"], openapi_extra=_body_doc(SessionCreateBody),
              summary="Create a session: system prompt, temperature, top_k")
    async def create(request: Request) -> Response:
        body: SessionCreateBody = parse(SESSION_CREATE, await read_body(request, limit))
        try:
            session = store.create(system_prompt=body.system_prompt, temperature=body.temperature,
                                   top_k=body.top_k, turns=[m.as_dict() for m in body.initial_prompts])
        except SessionLimit as exc:
            raise ApiError(429, str(exc), code="too_many_sessions", retry_after=60) from None
        if session.messages():
            session.context_usage = await dispatcher.count_tokens(session.messages())
        if session.context_usage >= window():
            store.delete(session.id)
            raise ApiError(400, f"the system prompt and initial prompts take {session.context_usage} tokens, the "
                           f"context window is {window()}", param="system_prompt", code="context_length_exceeded")
        return JsonAnswer(_info(session, window()), "agent", "session_created", 201)

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], summary="A session's settings and context usage")
    async def show(session_id: str) -> Response:
        return JsonAnswer(_info(get(session_id), window()), "agent", "metadata")

    @app.post("/v1/sessions/{session_id}/clone", status_code=201, tags=["sessions"],
              summary="Copy a session (its conversation and settings) into a new one")
    async def clone(session_id: str) -> Response:
        try:
            twin = store.clone(get(session_id))
        except SessionLimit as exc:
            raise ApiError(429, str(exc), code="too_many_sessions", retry_after=60) from None
        return JsonAnswer(_info(twin, window()), "agent", "session_cloned", 201)

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"], summary="Delete a session")
    async def delete(session_id: str) -> Response:
        get(session_id)
        store.delete(session_id)
        return JsonAnswer({"id": session_id, "object": "session.deleted", "deleted": True}, "agent", "deleted")

    @app.post("/v1/sessions/{session_id}/prompt", tags=["sessions"], openapi_extra=_body_doc(SessionPromptBody),
              summary="Prompt a session (stream: true → server-sent events); the answer joins the conversation")
    async def prompt(session_id: str, request: Request) -> Response:
        session = get(session_id)
        body: SessionPromptBody = parse(SESSION_PROMPT, await read_body(request, limit))
        win = window()
        reserve = body.max_tokens or min(DEFAULT_MAX_TOKENS, win // 4)
        if reserve >= win:
            raise ApiError(400, f"max_tokens: {reserve} is more than the context window of {win} tokens",
                           param="max_tokens", code="invalid_max_tokens")
        new = {"role": "user", "content": body.text()}
        await session.lock.acquire()
        try:
            try:
                messages, dropped, tokens = await fit(session, new, reserve, win, dispatcher.count_tokens)
            except ContextOverflow as exc:
                raise ApiError(400, exc.message, param="prompt", code="context_length_exceeded") from None
            except BackendError as exc:
                raise from_agent(exc, "local") from None
            req = route_request(body.nanofleet, request.headers, tokens)
            options: dict[str, Any] = {}
            if body.seed is not None:
                options["seed"] = body.seed
            if body.ignore_eos is not None:
                options["ignore_eos"] = body.ignore_eos
            chat = ChatRequest(messages, reserve, session.temperature, None, session.top_k, app_id=req.app_id,
                               sensitive=req.sensitive, options=options)
            extra = {"session_id": session.id, "context_window": win, "context_overflow": dropped > 0,
                     "dropped_messages": dropped}
            if body.stream:
                route, reason, chunks = await dispatcher.open_stream(chat, req)
                return EventStream(_stream(session, new, chunks, extra),
                                   {"x-nanofleet-route": route, "x-nanofleet-reason": reason})
            completion, route, reason = await dispatcher.generate(chat, req)
        except BaseException:
            session.lock.release()
            raise
        try:
            _remember(session, new, completion.text, completion.usage)
        finally:
            session.lock.release()
        return JsonAnswer({
            "id": "prompt-" + session.id[5:], "object": "session.prompt", **extra,
            "message": {"role": "assistant", "content": completion.text},
            "finish_reason": completion.finish_reason, "usage": _answer_usage(completion.usage),
            "context_usage": session.context_usage, "model": completion.model,
        }, route, reason)


def _remember(session: Session, new: dict[str, str], text: str, usage: Usage) -> None:
    session.turns += [new, {"role": "assistant", "content": text}]
    session.context_usage = usage.total_tokens


async def _stream(session: Session, new: dict[str, str], chunks: AsyncIterator[Chunk],
                  extra: dict[str, Any]) -> AsyncIterator[bytes]:
    """Deltas, then one final event with usage and context figures; the turn joins the session only if whole."""
    parts: list[str] = []
    try:
        try:
            async for chunk in chunks:
                if chunk.text:
                    parts.append(chunk.text)
                    yield sse({"session_id": session.id, "delta": chunk.text})
                if chunk.usage is not None:
                    _remember(session, new, "".join(parts), chunk.usage)
                    yield sse({**extra, "object": "session.prompt.done", "finish_reason": chunk.finish_reason,
                               "usage": _answer_usage(chunk.usage), "context_usage": session.context_usage})
        except BackendError as exc:
            yield ApiError(exc.status, exc.message, code=exc.code).sse()
        yield b"data: [DONE]\n\n"
    finally:
        session.lock.release()
