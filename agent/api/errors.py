"""HTTP-facing errors of the socket API: each carries its status and an OpenAI-style body.

    ApiError                     root; .status, .type, .param, .code → {"error": {message, type, param, code}}
    └── (built from)             any domain `AgentError` via `from_agent()` (its status, code, route, reason and
                                 Retry-After), pydantic errors via `from_validation()`
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from nanofleet.agent.errors import AgentError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 507: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, route: str = "none", reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.route = route
        self.reason = reason or code or "error"

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        h = {"x-nanofleet-route": self.route, "x-nanofleet-reason": self.reason}
        if self.retry_after is not None:
            h["retry-after"] = str(max(1, round(self.retry_after)))
        return h

    def sse(self) -> bytes:
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def from_agent(exc: AgentError, route: str | None = None) -> ApiError:
    """The one mapping of domain errors to answers. The reason is the error's own `reason` when it has one (e.g.
    the gateway's `cloud_denied`), else its code; the route is the one it happened on."""
    return ApiError(exc.status, exc.message, param=exc.param, code=exc.code, retry_after=exc.retry_after,
                    route=route or exc.route, reason=exc.reason or exc.code)


def from_validation(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    # union members show up in the location ("content.str"): the field path alone names the problem
    loc = ".".join(str(p) for p in err["loc"] if not _UNION_TAG.match(str(p)))
    if err["type"] == "json_invalid":
        ctx = (err.get("ctx") or {}).get("error", "")
        return ApiError(400, f"invalid JSON in the request body: {ctx}".rstrip(": "), code="invalid_json")
    if err["type"] == "model_type" and not loc:
        return ApiError(400, "the request body must be a JSON object", code="invalid_body")
    what = err["msg"]
    if err["type"] == "missing":
        what = "required field missing"
    elif "input" in err and not isinstance(err["input"], dict | list):
        what = f"{what} (got {err['input']!r})"
    return ApiError(400, f"{loc}: {what}", param=loc or None, code="invalid_" + (err["type"].split("_")[0]))
