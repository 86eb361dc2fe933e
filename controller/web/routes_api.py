"""The REST API (docs/rest-api.md): devices, telemetry, policy convergence, ingest rejections, gateway usage,
and — in `commands_router`, included when the controller has a command service — commands to devices."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request

from . import routes_pages, schemas
from .context import Authed, Web, Writer
from .security import WebError

Responses = dict[int | str, dict[str, Any]]
_ERR401: Responses = {401: {"model": schemas.ErrorOut, "description": "missing or wrong operator token"}}
_ERR404: Responses = {404: {"model": schemas.ErrorOut, "description": "unknown device"}}

router = APIRouter(prefix="/api")
commands_router = APIRouter(prefix="/api")


Text = Annotated[str, Query(max_length=200)]
Flag = Literal["", "0", "1"]


@router.get("/devices", response_model=schemas.DevicePageOut, responses=_ERR401, tags=["devices"],
            summary="Devices with their latest state, a page at a time",
            description="Keyset pagination: pass the answer's next_cursor as cursor for the next page (null: the "
                        "last page); a cursor belongs to its sort. Filters: group, state, thermal (a level), model, "
                        "behind=1 (not yet on the policy published for them), q (a substring of id, model or "
                        "group). sort: any column (device_id default), desc=1 for descending.")
def api_devices(ctx: Web, operator: Authed, group: Text = "", state: routes_pages.StateParam = "",
                thermal: routes_pages.ThermalParam = "",
                model: Text = "", behind: Flag = "", q: Text = "", sort: routes_pages.SortParam = "",
                desc: Flag = "", limit: Annotated[int, Query(ge=1, le=500)] = 100,
                cursor: Annotated[str, Query(max_length=2000)] = "") -> schemas.DevicePageOut:
    flt = routes_pages.device_filter(group, state, thermal, model, behind, q, sort, desc)
    page = routes_pages.page_of(ctx, flt, limit, cursor)
    return schemas.DevicePageOut(items=[schemas.DeviceOut.model_validate(d) for d in page.items],
                                 next_cursor=page.next_cursor, total=page.total, total_capped=page.total_capped)


@router.get("/devices/{device_id}", response_model=schemas.DeviceOut, responses={**_ERR401, **_ERR404},
            tags=["devices"], summary="One device's latest state")
def api_device(ctx: Web, device_id: str, operator: Authed) -> Any:
    return ctx.device(device_id)


@router.get("/devices/{device_id}/telemetry", response_model=schemas.TelemetryOut,
            responses={**_ERR401, **_ERR404}, tags=["devices"], summary="A device's telemetry over time",
            description="resolution=raw gives samples; 1m / 1h give rollup buckets (avg/max CPU, max temperature, "
                        "minimum RAM available).")
def api_telemetry(ctx: Web, device_id: str, operator: Authed,
                  since_ms: Annotated[int | None, Query(ge=0, le=schemas.MAX_TS_MS)] = None,
                  limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                  resolution: Literal["raw", "1m", "1h"] = "raw") -> schemas.TelemetryOut:
    ctx.device(device_id)
    if resolution == "raw":
        points = [schemas.TelemetryPointOut.model_validate(p)
                  for p in ctx.store.telemetry(device_id, since_ms=since_ms, limit=limit)]
    else:
        points = [schemas.TelemetryPointOut(ts_ms=r.ts_ms, n=r.n, cpu_percent=r.cpu_avg, cpu_max=r.cpu_max,
                                            temp_max_c=r.temp_max, temp_avg_c=r.temp_avg,
                                            ram_available_mb=r.ram_available_min)
                  for r in ctx.store.rollups(device_id, resolution, since_ms=since_ms)][-limit:]
    return schemas.TelemetryOut(device_id=device_id, resolution=resolution, since_ms=since_ms, points=points)


@router.get("/policy/convergence", response_model=schemas.ConvergenceOut, responses=_ERR401, tags=["policy"],
            summary="How many devices run each applied policy version")
def api_convergence(ctx: Web, operator: Authed) -> schemas.ConvergenceOut:
    return ctx.convergence()


@router.get("/rejections", response_model=list[schemas.RejectionOut], responses=_ERR401, tags=["ingest"],
            summary="Malformed payloads rejected by ingest, counted per device and reason")
def api_rejections(ctx: Web, operator: Authed, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
    return ctx.store.rejections(limit)


@router.get("/usage", response_model=schemas.UsageOut,
            responses={**_ERR401, 404: {"model": schemas.ErrorOut, "description": "usage accounting not configured"}},
            tags=["gateway"], summary="Gateway cloud usage per day, device, app and model")
def api_usage(ctx: Web, operator: Authed,
              day: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None) -> schemas.UsageOut:
    rows = ctx.usage.rows(day)
    if rows is None:
        raise WebError(404, "usage_not_configured", "this controller was started without the gateway's usage db")
    return schemas.UsageOut(day=day, rows=[schemas.UsageRowOut.model_validate(r) for r in rows],
                            total_tokens=sum(int(r.input_tokens) + int(r.output_tokens) for r in rows),
                            total_cost_usd=round(sum(float(r.cost_usd) for r in rows), 6))


_CMD_ERRORS: Responses = {
    403: {"model": schemas.ErrorOut, "description": "a cookie session without its CSRF token"},
    500: {"model": schemas.ErrorOut, "description": "internal_error: a bug, logged under the error id the detail "
                                                    "names"},
    502: {"model": schemas.ErrorOut, "description": "command_failed: the command service failed"},
    504: {"model": schemas.ErrorOut, "description": "command_timeout: no result in time (the detail says whether "
                                                    "the device acknowledged)"},
}


@commands_router.post("/devices/{device_id}/commands", response_model=schemas.CommandOut,
                      responses={**_ERR401, **_ERR404, **_CMD_ERRORS}, tags=["devices"],
                      summary="Send a command and wait for its result",
                      description="Cookie sessions must send X-CSRF-Token; Bearer clients need not.")
async def api_command(request: Request, ctx: Web, device_id: str, body: schemas.CommandIn,
                      operator: Writer) -> schemas.CommandOut:
    return await ctx.send_command(device_id, body.kind, body.args, request=request, operator=operator)
