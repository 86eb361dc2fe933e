"""The dashboard's server-rendered pages: fleet overview (with the alerts and the controller's own health), device
page (charts, command buttons), the API page and the OpenAPI document behind it; and /metrics for Prometheus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from nanofleet.controller import metrics
from nanofleet.protos.names import COMMAND_KINDS

from . import pages
from .context import Authed, Web, WebContext, Writer
from .security import Operator, WebError

router = APIRouter(include_in_schema=False)
Window = Literal["15m", "1h", "6h", "24h", "7d"]


@router.get("/")
def overview(request: Request, ctx: Web, operator: Authed, q: Annotated[str, Query(max_length=200)] = "",
             state: Literal["", "online", "offline", "stale"] = "") -> HTMLResponse:
    devices = [ctx.with_group(d) for d in ctx.store.list_devices()]
    content = pages.overview_page(devices, ctx.store.policy_convergence(), ctx.store.rejections(50), ctx.usage.rows(),
                                  alerts=ctx.config.alerts, now_ms=ctx.now_ms(), behind=ctx.behind(devices),
                                  query=q, state=state,
                                  controller=ctx.status() if ctx.status is not None else None)
    return ctx.html(request, content, title="Fleet", operator=operator, refresh=True)


def _device_content(ctx: WebContext, device_id: str, window: str, operator: Operator,
                    flash: tuple[str, str] | None = None) -> str:
    device = ctx.device(device_id)
    span_ms, source = pages.WINDOWS[window]
    end = ctx.now_ms()
    start = end - span_ms
    points: Sequence[Any] = (ctx.store.telemetry(device_id, since_ms=start, limit=5000) if source == "raw"
                             else ctx.store.rollups(device_id, cast(Literal["1m", "1h"], source), since_ms=start))
    charts = pages.device_charts(points, source, start_ms=start, end_ms=end,
                                 ram_total_mb=getattr(device, "ram_total_mb", None))
    csrf = ctx.signer.csrf_token(operator.session) if operator.session else ""
    events_of = getattr(ctx.store, "device_events", None)  # beyond the contract: shown when the store has it
    events = events_of(device_id, limit=10) if events_of is not None else []
    return pages.device_page(device, charts, window=window, now_ms=end, csrf=csrf, events=events,
                             command_kinds=COMMAND_KINDS if ctx.commands is not None else (), flash=flash)


@router.get("/devices/{device_id}")
def device_page(request: Request, ctx: Web, device_id: str, operator: Authed, window: Window = "1h") -> HTMLResponse:
    return ctx.html(request, _device_content(ctx, device_id, window, operator), title=device_id, operator=operator,
                    refresh=True)


@router.post("/devices/{device_id}/commands")
async def device_command(request: Request, ctx: Web, device_id: str, operator: Writer,
                         kind: Annotated[str, Form()]) -> HTMLResponse:
    if kind not in COMMAND_KINDS:  # the form's field is a plain string: checked against the one list
        raise WebError(422, "invalid_request", f"kind: expected one of {', '.join(COMMAND_KINDS)}")
    try:
        out = await ctx.send_command(device_id, kind, {}, request=request, operator=operator)
        took = f" in {out.elapsed_ms:.0f} ms" if out.elapsed_ms is not None else ""
        flash = ("ok" if out.status == "ok" else "error", f"{kind}: {out.status}{took} {out.message}".strip())
    except WebError as exc:
        if exc.code == "device_not_found":
            raise
        flash = ("error", exc.detail)
    content = await run_in_threadpool(_device_content, ctx, device_id, "1h", operator, flash)
    return ctx.html(request, content, title=device_id, operator=operator)


@router.get("/api")
def api_doc(request: Request, ctx: Web, operator: Authed) -> HTMLResponse:
    return ctx.html(request, pages.api_doc_page(request.app.openapi()), title="API", operator=operator)


@router.get("/openapi.json")
def openapi(request: Request, operator: Authed) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/metrics")
def prometheus_metrics(request: Request, operator: Authed) -> Response:
    """The controller's counters in the Prometheus text format, behind the operator token like the API: they name
    devices' failure reasons and the controller's internals, and the dashboard may listen beyond loopback."""
    return Response(metrics.render(request.app.state.metrics), media_type=None,
                    headers={"Content-Type": metrics.CONTENT_TYPE})
