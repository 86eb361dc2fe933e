"""The dashboard's server-rendered pages (templates/): fleet overview, the device list (keyset pages, filters and sort
in the URL), a device's page (charts, commands, recent results, state changes), groups and their policy, the API
page and the OpenAPI document behind it; and /metrics for Prometheus."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool

from nanofleet.controller import metrics
from nanofleet.controller import policy as pol
from nanofleet.controller import rollout_store as rs
from nanofleet.controller.queries import DeviceFilter, QueryError
from nanofleet.controller.rollouts import advance
from nanofleet.controller.views import DEVICE_STATES
from nanofleet.protos.names import COMMAND_KINDS, ThermalName

from . import pages
from .context import Authed, Web, WebContext, Writer
from .panels import controller_panel
from .routes_ops import alert_row
from .security import Operator, WebError

router = APIRouter(include_in_schema=False)
Window = Literal["15m", "1h", "6h", "24h", "7d"]
StateParam = Literal["", "online", "offline", "stale", "revoked", "never_seen"]
SortParam = Literal["", "device_id", "group", "state", "last_seen", "temp", "thermal", "ram", "cpu", "model",
                    "policy", "queue", "slots_waiting"]
Flag = Literal["", "0", "1"]
ThermalParam = ThermalName | Literal[""]
_USAGE_ROWS = 10
RECENT_CLEARED_MS = 24 * 3_600_000  # a device page lists the alerts cleared this recently beside the open ones
_DEVICE_ALERTS = 50


@dataclass(frozen=True)
class _Usage:
    tokens: int
    cost: float
    count: int
    rows: list[Any]


def _usage_today(ctx: WebContext) -> _Usage | None:
    rows = ctx.usage.rows(time.strftime("%Y-%m-%d", time.gmtime(ctx.now_ms() / 1000)))
    if rows is None:
        return None
    top = sorted(rows, key=lambda r: (-float(r.cost_usd), r.device_id, r.app_id))[:_USAGE_ROWS]
    return _Usage(sum(int(r.input_tokens) + int(r.output_tokens) for r in rows),
                  sum(float(r.cost_usd) for r in rows), len(rows), top)


@router.get("/")
def overview(request: Request, ctx: Web, operator: Authed) -> HTMLResponse:
    now = ctx.now_ms()
    ov = ctx.overview()
    conv = ov.convergence
    latest = max(conv) if conv else None
    # controller_panel escapes every value it prints (panels.py); marked safe as a whole for that reason only
    panel = Markup(controller_panel(ctx.status() if ctx.status is not None else None))
    return ctx.render(request, "overview.html", title="Fleet", operator=operator, refresh=True, now_ms=now,
                      alerts=ctx.config.alerts, ov=ov, usage=_usage_today(ctx),
                      budget=ctx.config.gateway.budgets.fleet_tokens_per_day, behind=ctx.queries.policy_lag(20),
                      convergence_latest=latest, convergence_converged=conv.get(latest, 0) if latest else 0,
                      convergence_total=sum(conv.values()), rejections=ctx.store.rejections(10),
                      controller_panel=panel)


def device_filter(group: str, state: str, thermal: str, model: str, behind: str, q: str, sort: str,
                  desc: str) -> DeviceFilter:
    """The device list's filter from its query parameters (the page and /api/devices take the same ones)."""
    return DeviceFilter(group=group, state=state, thermal=thermal, model=model, behind=behind == "1", q=q,
                        sort=cast(Any, sort or "device_id"), desc=desc == "1")


def page_of(ctx: WebContext, flt: DeviceFilter, limit: int, cursor: str | None) -> Any:
    """One page of the list; a bad cursor (or thermal level) is a 422 naming the parameter."""
    try:
        return ctx.queries.devices(flt, limit=limit, cursor=cursor or None)
    except QueryError as exc:
        raise WebError(422, "invalid_request", f"query.{exc}") from exc


Text = Annotated[str, Query(max_length=200)]


@router.get("/devices")
def devices_page(request: Request, ctx: Web, operator: Authed, group: Text = "", state: StateParam = "",
                 thermal: ThermalParam = "",
                 model: Text = "", behind: Flag = "", q: Text = "", sort: SortParam = "", desc: Flag = "",
                 limit: Annotated[int, Query(ge=1, le=500)] = 50,
                 cursor: Annotated[str, Query(max_length=2000)] = "") -> HTMLResponse:
    flt = device_filter(group, state, thermal, model, behind, q, sort, desc)
    page = page_of(ctx, flt, limit, cursor)
    summary = ctx.overview()
    return ctx.render(request, "devices.html", title="Devices", operator=operator, refresh=True, now_ms=ctx.now_ms(),
                      alerts=ctx.config.alerts, page=page, by_state=summary.by_state, groups=list(summary.groups),
                      models=summary.models, ls=pages.DeviceListState(flt, limit, cursor or None),
                      columns=pages.COLUMNS, page_sizes=sorted({*pages.PAGE_SIZES, limit}))


def stored_alerts(ctx: WebContext, device_id: str, now_ms: int) -> list[dict[str, Any]] | None:
    """The device's open alerts and those cleared in the last RECENT_CLEARED_MS, newest first, as the alert engine
    stored them (None: this controller stores no alerts). The page shows these, never flags of its own making, so
    it cannot contradict the alerts page or the API."""
    if ctx.alerts is None:
        return None
    open_, _ = ctx.alerts.page("open", device_id=device_id, limit=_DEVICE_ALERTS)
    cleared, _ = ctx.alerts.page("cleared", device_id=device_id, limit=_DEVICE_ALERTS)
    recent = [a for a in cleared if (a.cleared_ms or 0) >= now_ms - RECENT_CLEARED_MS]
    return [alert_row(a, now_ms) for a in sorted([*open_, *recent], key=lambda a: -a.id)]


def _device_vars(ctx: WebContext, device_id: str, window: str, operator: Operator,
                 flash: tuple[str, str] | None = None) -> dict[str, Any]:
    device = ctx.device(device_id)
    span_ms, source = pages.WINDOWS[window]
    end = ctx.now_ms()
    start = end - span_ms
    points: Sequence[Any] = (ctx.store.telemetry(device_id, since_ms=start, limit=5000) if source == "raw"
                             else pages.coarsen(ctx.store.rollups(device_id, cast(Literal["1m", "1h"], source),
                                                                  since_ms=start)))
    bucket_ms = max(10_000, span_ms // 360)
    buckets = ctx.queries.buckets(device_id, start, bucket_ms)
    charts = pages.device_charts(points, source, start_ms=start, end_ms=end,
                                 ram_total_mb=getattr(device, "ram_total_mb", None), buckets=buckets,
                                 bucket_ms=bucket_ms, route_counts=getattr(device, "route_counts", None))
    csrf = ctx.signer.csrf_token(operator.session) if operator.session else ""
    events_of = getattr(ctx.store, "device_events", None)  # beyond the contract: shown when the store has it
    return {"d": device, "charts": charts, "window": window, "windows": list(pages.WINDOWS), "now_ms": end,
            "alerts": ctx.config.alerts, "flash": flash, "csrf": csrf,
            "stored_alerts": stored_alerts(ctx, device_id, end),
            "events": events_of(device_id, limit=10) if events_of is not None else [],
            "command_kinds": COMMAND_KINDS if ctx.commands is not None else (),
            "commands": ctx.queries.recent_commands(device_id, 10),
            "published": ctx.queries.published_version(device_id)}


@router.get("/devices/{device_id}")
def device_page(request: Request, ctx: Web, device_id: str, operator: Authed, window: Window = "1h") -> HTMLResponse:
    return ctx.render(request, "device.html", title=device_id, operator=operator, refresh=True,
                      **_device_vars(ctx, device_id, window, operator))


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
    variables = await run_in_threadpool(_device_vars, ctx, device_id, "1h", operator, flash)
    return ctx.render(request, "device.html", title=device_id, operator=operator, **variables)


@dataclass(frozen=True)
class _GroupView:
    name: str
    by_state: dict[str, int]
    total: int
    published: int | None
    behind: list[tuple[str, int, int]]
    behind_total: int
    match: list[str]
    policy: dict[str, Any]


@router.get("/groups")
def groups_page(request: Request, ctx: Web, operator: Authed) -> HTMLResponse:
    stored = ctx.queries.groups()
    names = [*ctx.config.groups, *(n for n in sorted(stored) if n not in ctx.config.groups)]
    if "default" not in names:
        names.append("default")
    views = []
    for name in names:
        s = stored.get(name)
        compiled = pol.content_of(pol.group_policy(ctx.config, name)) if (
            name in ctx.config.groups or name == "default") else {}
        compiled.pop("device_id", None)
        views.append(_GroupView(
            name, s.by_state if s else dict.fromkeys(DEVICE_STATES, 0), s.total if s else 0,
            s.published if s else None, s.behind if s else [], s.behind_total if s else 0,
            list(ctx.config.groups[name].match) if name in ctx.config.groups else [], compiled))
    return ctx.render(request, "groups.html", title="Groups", operator=operator, refresh=True, now_ms=ctx.now_ms(),
                      groups=views, last_round=ctx.queries.last_policy_round())


@dataclass
class _RolloutView:
    rollout: Any
    steps: list[dict[str, Any]]  # per step: pct, state (passed/failed/current/waiting), devices, applied, failed
    events: list[Any]


@router.get("/rollouts")
def rollouts_page(request: Request, ctx: Web, operator: Authed) -> HTMLResponse:
    """Recent rollouts with their progress per step (controller/rollouts.py) and their last events."""
    views = []
    for r in rs.list_all(ctx.store, limit=20):
        live = advance(r, rs.group_reports(ctx.store, r.group), rs.pins(ctx.store), ctx.now_ms()).progress \
            if r.active else {}
        steps = []
        for i, pct in enumerate(r.steps):
            done = next((s for s in r.step_results if s["step"] == pct), None)
            if done is not None:
                steps.append({"pct": pct, "state": done["gate"], "devices": done["devices"],
                              "applied": done["applied"], "failed": done["failed"], "canary": done["canary"]})
            elif i == r.step and r.active:
                steps.append({"pct": pct, "state": r.state, "devices": live.get("assigned", 0),
                              "applied": live.get("applied", 0), "failed": live.get("failed", 0), "canary": {}})
            else:
                steps.append({"pct": pct, "state": "waiting", "devices": None, "applied": None, "failed": None,
                              "canary": {}})
        views.append(_RolloutView(r, steps, rs.events(ctx.store, r.id)[-8:]))
    return ctx.render(request, "rollouts.html", title="Rollouts", operator=operator, refresh=True,
                      now_ms=ctx.now_ms(), rollouts=views, pinned=sorted(rs.pins(ctx.store)))


@router.get("/api")
def api_doc(request: Request, ctx: Web, operator: Authed) -> HTMLResponse:
    ops = [(path, method, op) for path, methods in sorted(request.app.openapi().get("paths", {}).items())
           for method, op in methods.items()]
    return ctx.render(request, "api.html", title="API", operator=operator, operations=ops)


@router.get("/openapi.json")
def openapi(request: Request, operator: Authed) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/metrics")
def prometheus_metrics(request: Request, operator: Authed) -> Response:
    """The controller's counters in the Prometheus text format, behind the operator token like the API: they name
    devices' failure reasons and the controller's internals, and the dashboard may listen beyond loopback."""
    return Response(metrics.render(request.app.state.metrics), media_type=None,
                    headers={"Content-Type": metrics.CONTENT_TYPE})
