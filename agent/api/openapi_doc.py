"""The socket API's OpenAPI answers, as the handlers give them: FastAPI documents a 422 the API never sends (bodies
are parsed by hand into 400s) and none of the errors it does send. `document_answers` fixes the generated schema
in place; tests/contract/test_api_conformance.py holds it to the behaviour with schemathesis."""

from __future__ import annotations

from typing import Any

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
_ROUTE = {"X-Nanofleet-Route": {"description": "the route that answered: local, cloud, queue, agent, none, reject",
                                "schema": {"type": "string"}, "required": True},
          "X-Nanofleet-Reason": {"description": "why that route (docs/socket-api.md, Response headers)",
                                 "schema": {"type": "string"}, "required": True}}

# What each status means wherever it is listed; the codes behind them are in docs/socket-api.md, Errors.
_MEANING = {
    "400": "invalid JSON, a field of the wrong type or out of range, a bad X-Nanofleet-* header, over the context",
    "403": "route_forbidden: no route may ever serve this request under the policy (or the gateway refused it)",
    "404": "session_not_found",
    "413": "body_too_large: the body is over the agent's max_body_bytes",
    "429": "busy / too_many_sessions: the local model or the session table is full; retry after Retry-After",
    "500": "internal_error: a bug in the agent (logged with its traceback)",
    "502": "backend_error: the model backend failed",
    "503": "no route can serve now (cloud_unavailable, queue_unavailable, no_route, backend_unavailable); retry "
           "after Retry-After",
    "504": "deadline_exceeded: the backend did not answer in time",
}
_GENERATE = ("400", "403", "413", "429", "500", "502", "503", "504")
_ANSWERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/v1/chat/completions"): _GENERATE,
    ("post", "/v1/sessions"): ("400", "413", "429", "502", "503"),
    ("get", "/v1/sessions/{session_id}"): ("404",),
    ("delete", "/v1/sessions/{session_id}"): ("404",),
    ("post", "/v1/sessions/{session_id}/clone"): ("404", "429"),
    ("post", "/v1/sessions/{session_id}/prompt"): ("404", *_GENERATE),
}
# OpenAPI 3.1 has `schema` of an event stream describe each event (3.2 would call it itemSchema)
_EVENT = {"type": "object", "required": ["data"], "description": "a server-sent event; the last is data: [DONE]",
          "properties": {"data": {"type": "string", "description": "a JSON chunk, an error object, or [DONE]"}}}
_STREAMS = {("post", "/v1/chat/completions"), ("post", "/v1/sessions/{session_id}/prompt")}


def document_answers(schema: dict[str, Any]) -> None:
    """Replace FastAPI's 422 with the errors each operation answers; tag every answer with the route headers; list
    the SSE content type where `stream: true` gives it."""
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in _ANSWERS.get((method, path), ()):
                answer: dict[str, Any] = {"description": _MEANING[status], "content": _ERROR}
                if status in ("429", "503"):
                    answer["headers"] = {"Retry-After": _RETRY_AFTER}
                responses[status] = answer
            if (method, path) in _STREAMS:
                for status, answer in responses.items():
                    if status.startswith("2"):
                        answer.setdefault("content", {})["text/event-stream"] = {"schema": _EVENT}
            for answer in responses.values():
                answer["headers"] = {**_ROUTE, **answer.get("headers", {})}
