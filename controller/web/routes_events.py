"""`GET /events`: the fleet's live events as server-sent events (controller/events.py), for the dashboard's pages.

Operator auth like every page. The stream starts with `retry:` (how soon a browser reconnects), then sends each event
with its id; a comment every `heartbeat_s` keeps proxies from closing an idle stream; `Last-Event-ID` on a reconnect
replays what was missed or sends one `resync`. A stream ends when its session expires (the browser then reconnects
and is refused: its page falls back to the timed refresh, which leads to the login) and when the hub closes (the
server's graceful shutdown does not wait on open streams).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import StreamingResponse

from nanofleet.controller.events import FleetEvents

from .context import Authed, Web

router = APIRouter(include_in_schema=False)  # a stream that never ends: kept out of the schema the fuzzer walks
RETRY_MS = 2000
MAX_ID = 64


async def _stream(hub: FleetEvents, last_event_id: str | None, until_ms: int | None,
                  now_ms: int) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n: nanofleet live events\n\n"
    lifetime = None if until_ms is None else max(0.0, (until_ms - now_ms) / 1000)
    async with hub.subscribe(last_event_id) as sub:
        try:
            async with asyncio.timeout(lifetime):
                async for event in sub:
                    yield ": keep-alive\n\n" if event is None else event.sse()
        except TimeoutError:  # the session expired: end; the browser's reconnect is refused (401)
            return


@router.get("/events")
async def events(ctx: Web, operator: Authed,
                 last_event_id: Annotated[str | None, Header(max_length=MAX_ID)] = None) -> StreamingResponse:
    expires = operator.session.expires_ms if operator.session is not None else None
    return StreamingResponse(_stream(ctx.events, last_event_id, expires, ctx.now_ms()),
                             media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})
