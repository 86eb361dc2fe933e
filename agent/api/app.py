"""The agent's local socket API (DESIGN.md "Local socket API"): OpenAI-compatible chat completions, models,
Prompt-API sessions and status, every response tagged with `X-Nanofleet-Route` / `X-Nanofleet-Reason`.

Bodies are read as bytes (bounded by `max_body_bytes`) and parsed straight into pydantic models, so invalid JSON,
wrong types and oversize bodies all become OpenAI-style 4xx errors naming the problem.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanofleet.agent.api.dispatch import Dispatcher, completion_body
from nanofleet.agent.api.errors import ApiError, from_agent, from_validation
from nanofleet.agent.api.openapi_doc import document_answers
from nanofleet.agent.api.peer import ERROR_SCHEMA, scope_uid
from nanofleet.agent.api.schemas import (
    CHAT,
    ChatCompletionBody,
    ErrorBody,
    SessionCreateBody,
    SessionPromptBody,
    route_request,
)
from nanofleet.agent.errors import AgentError
from nanofleet.agent.queue.store import TCP_UID
from nanofleet.agent.runtime.base import BackendError, BackendTimeout, BackendUnavailable, ChatRequest, Chunk
from nanofleet.agent.sessions import SessionStore
from nanofleet.allow import allowed_methods

DEFAULT_MAX_TOKENS = 512
logger = logging.getLogger("nanofleet.agent.api")
_JSON = "application/json"


dumps = msgspec.json.Encoder().encode  # compact UTF-8 JSON; ~10x json.dumps on an answer (a per-request cost)


class JsonAnswer(Response):
    """A JSON response with the route headers, its header block built directly (Starlette's generic header
    handling is a measurable share of a 1-token completion)."""

    def __init__(self, obj: Any, route: str, reason: str, status: int = 200) -> None:
        self.status_code, self.background = status, None
        self.body = dumps(obj)
        self.raw_headers = [(b"content-length", str(len(self.body)).encode()), (b"content-type", b"application/json"),
                            (b"x-nanofleet-route", route.encode()), (b"x-nanofleet-reason", reason.encode())]


def header_dict(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Raw (lower-cased) headers as a plain dict (last value wins): one pass instead of a scan per lookup."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}


async def read_body(request: Request, limit: int, headers: dict[str, str] | None = None) -> bytes:
    length = (headers if headers is not None else request.headers).get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is over the limit of {limit} bytes",
                       code="body_too_large")
    parts: list[bytes] = []
    size, more = 0, True
    while more:  # usually one message: the whole body
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes", code="body_too_large")
        parts.append(part)
        more = message.get("more_body", False)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def parse(adapter: TypeAdapter[Any], raw: bytes) -> Any:
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        return adapter.validate_json(raw)
    except ValidationError as exc:
        raise from_validation(exc) from None


class RouteHeaders:
    """Tags responses that did not pass through the router (metadata, errors) with route `agent`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k == b"x-nanofleet-route" for k, _ in headers):
                    headers += [(b"x-nanofleet-route", b"agent"), (b"x-nanofleet-reason", b"not_routed")]
                    message["headers"] = headers
            await send(message)

        await self.app(scope, receive, tagged)


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    """A cheap prompt size for the router (about 3 characters a token); exact counts are for sessions."""
    return sum(len(m["content"]) // 3 + 4 for m in messages)


def chat_request(body: ChatCompletionBody, window: int) -> ChatRequest:
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens >= window:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param}: {max_tokens} is more than the context window of {window} tokens",
                       param=param, code="invalid_max_tokens")
    options: dict[str, Any] = {}
    if body.seed is not None:
        options["seed"] = body.seed
    if body.ignore_eos is not None:
        options["ignore_eos"] = body.ignore_eos
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatRequest([m.as_dict() for m in body.messages], max_tokens or min(DEFAULT_MAX_TOKENS, window // 2),
                       body.temperature, body.top_p, body.top_k, stop, options=options)


class EventStream(StreamingResponse):
    """SSE response that always closes its generator, so a client that disconnects stops generation at once
    (rather than whenever the abandoned generator is garbage-collected)."""

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(content, 200, {**headers, "cache-control": "no-cache"}, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def create_app(
    dispatcher: Dispatcher, sessions: SessionStore | None = None, *, max_body_bytes: int = 1 << 20,
    status_extra: Callable[[], dict[str, Any]] | None = None,
) -> HotPath:
    from nanofleet.agent.api import request_routes, session_routes, status_routes

    app = FastAPI(title="nanofleet agent", version="1", summary="Local model API of a nanofleet device",
                  docs_url=None, redoc_url=None)
    app.state.dispatcher = dispatcher
    app.state.sessions = sessions if sessions is not None else SessionStore()
    app.state.max_body_bytes = max_body_bytes
    models = dispatcher.models

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if exc.status < 500 and exc.code not in ("busy",):
            dispatcher.counts["bad_request"] += 1
        return Response(dumps(exc.body()), exc.status, exc.headers(), _JSON)

    @app.exception_handler(AgentError)
    async def _agent_error(request: Request, exc: AgentError) -> Response:
        return await _api_error(request, from_agent(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                       code="not_found" if exc.status_code == 404 else "method_not_allowed")
        dispatcher.counts["bad_request"] += 1
        headers = {**err.headers(), **{k.lower(): v for k, v in (exc.headers or {}).items()}}
        if exc.status_code == 405:
            headers["allow"] = allowed_methods(app.router.routes, request.scope)
        return Response(dumps(err.body()), exc.status_code, headers, _JSON)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        """A bug anywhere but the chat hot path (`HotPath._guarded` has its own): the OpenAI-style 500, its traceback
        in the log, counted (Starlette re-raises it afterwards for the server's log)."""
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        dispatcher.counts["internal_error"] += 1
        err = ApiError(500, "internal error in the agent; see its log", code="internal_error")
        return Response(dumps(err.body()), 500, err.headers(), _JSON)

    async def chat_completions(request: Request) -> Response:
        headers = header_dict(request.scope["headers"])
        body: ChatCompletionBody = parse(CHAT, await read_body(request, max_body_bytes, headers))
        return await answer_chat(body, headers, scope_uid(request.scope))

    async def answer_chat(body: ChatCompletionBody, headers: dict[str, str], uid: int) -> Response:
        chat = chat_request(body, models.spec.n_ctx)
        req = route_request(body.nanofleet, headers, estimate_tokens(chat.messages))
        chat.app_id, chat.sensitive = req.app_id, req.sensitive
        idem_key = idempotency_key(headers)
        chat.request_id = idem_key or ""
        decision = dispatcher.decide(req)

        async def enqueue(reason: str) -> Response:  # committed to disk before the 202 (a stream is answered whole)
            accepted = await dispatcher.enqueue(chat, req, reason, uid=uid, idem_key=idem_key,
                                                stream=body.stream, model=body.model)
            return Accepted202(accepted.id, accepted.state, accepted.reason)

        if decision.route == "queue":
            return await enqueue(decision.reason)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        try:
            if body.stream:
                route, reason, chunks = await dispatcher.open_stream(chat, req, decision)
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return EventStream(_sse_chat(chunks, cid, created, include_usage),
                                   {"x-nanofleet-route": route, "x-nanofleet-reason": reason})
            completion, route, reason = await dispatcher.generate(chat, req, decision)
        except (BackendUnavailable, BackendTimeout):
            # every route tried went down before answering (nothing was sent): if the router, knowing that now,
            # would queue this request, it is queued — the app gets its 202 rather than an error to retry itself
            after = dispatcher.queue_after_failure(req)
            if after is None:
                raise
            return await enqueue(after)
        return JsonAnswer(completion_body(completion, cid=cid, created=created), route, reason)

    # Registered for the OpenAPI schema (and reached through it by the ASGITransport-free path too), but served by
    # `HotPath` below, which skips FastAPI's routing, dependency and middleware layers on the hot path.
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], tags=["openai"],
                      openapi_extra=_body_doc(ChatCompletionBody), responses=_CHAT_RESPONSES,
                      summary="OpenAI-compatible chat completion (stream: true → server-sent events)")

    @app.get("/v1/models", tags=["openai"], summary="Models this agent serves (OpenAI list format)")
    async def list_models() -> Response:
        st = models.status()
        data = [{"id": st.name, "object": "model", "created": 0, "owned_by": "nanofleet",
                 "route": "local", "availability": st.availability, "context_window": st.context_window}]
        if dispatcher.cloud is not None:
            data.append({"id": "cloud", "object": "model", "created": 0, "owned_by": "nanofleet-gateway",
                         "route": "cloud", "availability": "available", "context_window": None})
        return JsonAnswer({"object": "list", "data": data}, "agent", "metadata")

    status_routes.install(app, [status_extra] if status_extra is not None else None)
    session_routes.install(app)
    request_routes.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Error"] = ERROR_SCHEMA
            for model in (ChatCompletionBody, SessionCreateBody, SessionPromptBody, ErrorBody):
                doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[model.__name__] = doc
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            document_answers(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(RouteHeaders)

    async def api_error(exc: ApiError) -> Response:
        return await _api_error(None, exc)  # type: ignore[arg-type]

    return HotPath(app, chat_completions, api_error, answer_chat, max_body_bytes)


class HotPath:
    """The ASGI app served: `POST /v1/chat/completions` goes straight to its handler (about 0.1 ms less per request
    than through FastAPI's router, dependencies and middleware); everything else goes to the FastAPI app.
    `parse_fast` + `complete` serve the same endpoint without ASGI, for agent/api/protocol.py."""

    def __init__(self, api: FastAPI, chat: Callable[[Request], Any], on_error: Callable[[ApiError], Any],
                 answer: Callable[[ChatCompletionBody, dict[str, str], int], Any], max_body_bytes: int) -> None:
        self.api = api
        self.state = api.state
        self._chat = chat
        self._on_error = on_error
        self._answer = answer
        self.max_body_bytes = max_body_bytes

    @staticmethod
    def parse_fast(raw: bytes) -> ChatCompletionBody | None:
        """A valid non-streaming chat body, or None: the ASGI path then reads it and answers (errors included)."""
        try:
            body: ChatCompletionBody = CHAT.validate_json(raw)
        except ValidationError:
            return None
        return None if body.stream else body

    async def complete(self, body: ChatCompletionBody, headers: dict[str, str], uid: int = TCP_UID) -> Response:
        """The answer to a parsed non-streaming chat completion, errors as responses (never raises)."""
        return await self._guarded(self._answer(body, headers, uid))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            return await self.api(scope, receive, send)
        response = await self._guarded(self._chat(Request(scope, receive)))
        await response(scope, receive, send)

    async def _guarded(self, answer: Awaitable[Response]) -> Response:
        try:
            return await answer
        except ApiError as exc:
            return await self._on_error(exc)
        except AgentError as exc:
            return await self._on_error(from_agent(exc))
        except Exception:
            logger.exception("chat completion failed")
            self.state.dispatcher.counts["internal_error"] += 1
            return await self._on_error(ApiError(500, "internal error in the agent; see its log",
                                                 code="internal_error"))


MAX_IDEMPOTENCY_KEY = 255


def idempotency_key(headers: dict[str, str]) -> str | None:
    """The `Idempotency-Key` header (1–255 visible ASCII characters), None when absent; else a 400 naming it."""
    key = headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(ch) < 127 for ch in key):
        raise ApiError(400, f"header Idempotency-Key: expected 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters",
                       param="Idempotency-Key", code="invalid_header")
    return key


class Accepted202(JsonAnswer):
    """`202 Accepted`: the request is on disk in the offline queue; `Location` is where its answer will be."""

    def __init__(self, rid: str, state: str, reason: str) -> None:
        super().__init__({"id": rid, "object": "nanofleet.request", "state": state, "reason": reason,
                          "location": f"/v1/requests/{rid}"}, "queue", reason, 202)
        self.raw_headers.append((b"location", f"/v1/requests/{rid}".encode()))


def _doc_error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


_CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "queued (committed to disk): `Location: /v1/requests/{id}`, `X-Nanofleet-Route: queue`"},
    409: _doc_error("idempotency_conflict: the Idempotency-Key was used with another body"),
    429: _doc_error("busy (local slots full) or queue_full, with Retry-After"),
    503: _doc_error("no route now (cloud_unavailable, no_route, queue_unavailable), with Retry-After"),
    507: _doc_error("queue_disk_full: the offline queue's disk is full; nothing was queued"),
}


def _body_doc(model: type) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {_JSON: {"schema": ref}}}}


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def _sse_chat(chunks: AsyncIterator[Chunk], cid: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    first = True
    model = ""

    def frame(delta: dict[str, Any], finish: str | None) -> bytes:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    try:
        async for chunk in chunks:
            model = chunk.model or model
            if chunk.text:
                yield frame({"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}, None)
                first = False
            if chunk.finish_reason:
                yield frame({}, chunk.finish_reason)
            if chunk.usage is not None and include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": chunk.usage.as_openai()})
    except BackendError as exc:  # after the first token there is no fallback: say so in the stream (as Ollama)
        yield ApiError(exc.status, exc.message, code=exc.code).sse()
    yield b"data: [DONE]\n\n"
