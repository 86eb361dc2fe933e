"""The `Allow` header of a 405 from every route that serves the path (agent socket API and controller web API).

Starlette answers a 405 from the first route whose path matches, so its `Allow` names that route's methods only
(`GET /v1/sessions/{id}` hides `DELETE` on the same path); RFC 9110 §15.5.6 wants every method the resource takes.
Each method is tried against the routes' public `matches()`, so routers included in routers (FastAPI keeps them
nested) count too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.routing import Match
from starlette.types import Scope

__all__ = ["allowed_methods"]

_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(routes: Iterable[Any], scope: Scope) -> str:
    """Every method a route fully matches at the scope's path, sorted, as an `Allow` value ("" when none)."""
    routes = list(routes)
    allowed = [m for m in _METHODS
               if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in routes)]
    return ", ".join(allowed)
