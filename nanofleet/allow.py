"""The `Allow` header of a 405 from every route that matches the path (agent socket API and controller web API).

Starlette answers a 405 from the first route whose path matches, so its `Allow` names that route's methods only
(`GET /v1/sessions/{id}` hides `DELETE` on the same path); RFC 9110 §15.5.6 wants every method the resource takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.routing import Match
from starlette.types import Scope

__all__ = ["allowed_methods"]


def allowed_methods(routes: Iterable[Any], scope: Scope) -> str:
    """Every method any route serves at the scope's path, sorted, as an `Allow` value ("" when none)."""
    methods: set[str] = set()
    for route in routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(scope)[0] != Match.NONE:
            methods |= set(route_methods)
    return ", ".join(sorted(methods))
