"""`/v1/requests`: the offline queue's entries over the socket — read one (`?wait=` long-polls), list, cancel.

Each entry belongs to the uid of the socket peer that queued it (SO_PEERCRED, read by the HTTP protocol when the
connection is made): another uid gets 404 for it, as if it did not exist; root sees every entry. Peers on the
optional loopback TCP listener have no peer credentials: they share one owner of their own (`TCP_UID`) and never
see an entry queued over the unix socket. A unix-socket peer whose uid could not be read gets 503
`queue_unavailable`, reason `peer_unknown` (agent/api/peer.py): fail closed, never a shared owner.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from nanofleet.agent.api.app import JsonAnswer
from nanofleet.agent.api.errors import ApiError
from nanofleet.agent.api.peer import owner
from nanofleet.agent.queue.schedule import STATES
from nanofleet.agent.queue.store import QueueStore

MAX_WAIT_S = 60.0
MAX_PAGE = 500
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    words = {400: "a query parameter is invalid (named in `param`)", 404: "no such request for this caller",
             409: "the request is running or finished", 503: "the offline queue is not available"}
    return {s: {"description": words[s], **_ERROR} for s in statuses}


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:  # also refuses NaN
        raise ApiError(400, f"{name}: expected a number from {low:g} to {high:g}, got {raw!r}", param=name,
                       code="invalid_query")
    return value


def install(app: FastAPI) -> None:
    def queue() -> QueueStore:
        store: QueueStore | None = app.state.dispatcher.queue
        if store is None:
            raise ApiError(503, "this agent has no offline queue", code="queue_unavailable", retry_after=5)
        return store

    @app.get("/v1/requests/{request_id}", tags=["queue"], responses=_errors(400, 404, 503),
             summary="A queued request: state, attempts, route, reason, and the result when done (?wait=s)")
    async def get_request(request: Request, request_id: str) -> Response:
        wait = _number(request, "wait", 0.0, 0.0, MAX_WAIT_S)
        store = queue()
        uid = owner(request.scope, store.counts)
        entry = await (store.wait(request_id, uid, wait) if wait > 0 else store.get(request_id, uid))
        return JsonAnswer(entry, "queue", entry["state"])

    @app.get("/v1/requests", tags=["queue"], responses=_errors(400, 503),
             summary="The caller's queued requests in queue order (?state=&app=&limit=&after=)")
    async def list_requests(request: Request) -> Response:
        state = request.query_params.get("state")
        if state is not None and state not in STATES:
            raise ApiError(400, f"state: expected one of {', '.join(STATES)}, got {state!r}", param="state",
                           code="invalid_query")
        limit = int(_number(request, "limit", 50, 1, MAX_PAGE))
        after = int(_number(request, "after", 0, 0, 2 ** 62))
        store = queue()
        entries, cursor = await store.entries(owner(request.scope, store.counts), state=state,
                                              app=request.query_params.get("app"), limit=limit, after=after)
        return JsonAnswer({"object": "list", "data": entries, "next_after": cursor}, "queue", "list")

    @app.delete("/v1/requests/{request_id}", tags=["queue"], responses=_errors(404, 409, 503),
                summary="Cancel a request that is still queued (not one already running)")
    async def cancel_request(request: Request, request_id: str) -> Response:
        store = queue()
        entry = await store.cancel(request_id, owner(request.scope, store.counts))
        return JsonAnswer(entry, "queue", "cancelled")
