"""Alerts and the audit log: the REST API (docs/rest-api.md, "Alerts", "Audit log") and the two pages
(templates/alerts.html with the acknowledge form, templates/audit.html).

Alerts are evaluated and stored by the controller's alert engine (controller/alerts_engine.py), never here: these
routes read what is stored and record acknowledgements (each one audited)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from nanofleet.controller.alert_store import AlertFilter, AlertStore, AlertView
from nanofleet.controller.alerting import AlertKind
from nanofleet.controller.audit import ACTIONS, AuditLog
from nanofleet.controller.errors import AlertCleared, AlertNotFound

from .context import Authed, Web, WebContext, Writer
from .format import iso_utc, relative_time
from .schemas import ErrorOut
from .schemas_ops import NO_NUL, AckIn, AlertOut, AlertPage, AuditOut, AuditPage
from .security import Operator, WebError

Responses = dict[int | str, dict[str, Any]]
_ERR401: Responses = {401: {"model": ErrorOut, "description": "missing or wrong operator token"}}
_ERR404: Responses = {404: {"model": ErrorOut, "description": "no alert with that id (alert_not_found)"}}
_ERR409: Responses = {409: {"model": ErrorOut, "description": "alert_cleared: nothing left to acknowledge"}}
_ERR403: Responses = {403: {"model": ErrorOut, "description": "a cookie session without its CSRF token"}}
_MAX_ID = 2**62  # ids and cursors beyond SQLite's INTEGER are refused as invalid input, not a crash
Limit = Annotated[int, Query(ge=1, le=1000, description="entries per page")]
AlertId = Annotated[int, Path(ge=0, le=_MAX_ID)]
Cursor = Annotated[int | None, Query(ge=0, le=_MAX_ID, description="the previous page's next_cursor")]

router = APIRouter(prefix="/api", tags=["alerts"])


def alert_store(ctx: WebContext) -> AlertStore:
    if ctx.alerts is None:
        raise WebError(404, "alerts_disabled", "this controller runs without an alert store")
    return ctx.alerts


def audit_log(ctx: WebContext) -> AuditLog:
    if ctx.audit is None:
        raise WebError(404, "audit_disabled", "this controller runs without an audit log")
    return ctx.audit


@router.get("/alerts", response_model=AlertPage, responses=_ERR401, summary="Stored alerts, newest first",
            description="Open ones (raised or acknowledged) by default; `state=cleared` or `all` for the history. "
                        "Keyset-paginated: pass `next_cursor` back as `cursor`.")
def api_alerts(ctx: Web, operator: Authed, state: AlertFilter = "open",
               device_id: Annotated[str | None, Query(max_length=200)] = None, kind: AlertKind | None = None,
               limit: Limit = 100, cursor: Cursor = None) -> AlertPage:
    alerts, next_cursor = alert_store(ctx).page(state, device_id=device_id, kind=kind, limit=limit, cursor=cursor)
    return AlertPage(alerts=[AlertOut.model_validate(a) for a in alerts], next_cursor=next_cursor)


@router.get("/alerts/{alert_id}", response_model=AlertOut, responses={**_ERR401, **_ERR404},
            summary="One alert with its history (raised, acknowledged by whom with what note, cleared)")
def api_alert(ctx: Web, alert_id: AlertId, operator: Authed) -> AlertView:
    view = alert_store(ctx).get(alert_id)
    if view is None:
        raise WebError(404, "alert_not_found", f"no alert {alert_id}")
    return view


async def acknowledge(request: Request, ctx: WebContext, operator: Operator, alert_id: int, note: str) -> AlertView:
    """raised → acknowledged by this operator, audited (the no-op of acknowledging twice is not)."""
    store = alert_store(ctx)
    try:
        view, changed = await run_in_threadpool(store.acknowledge, alert_id, operator.name, note, ctx.now_ms())
    except AlertNotFound as exc:
        raise WebError(404, "alert_not_found", str(exc)) from exc
    except AlertCleared as exc:
        raise WebError(409, "alert_cleared", str(exc)) from exc
    if changed:
        ctx.record(request, operator, "alert_ack", str(alert_id),
                   {"device_id": view.device_id, "kind": view.kind, "note": note})
    return view


@router.post("/alerts/{alert_id}/ack", response_model=AlertOut,
             responses={**_ERR401, **_ERR403, **_ERR404, **_ERR409}, summary="Acknowledge an alert, with a note",
             description="Cookie sessions must send X-CSRF-Token; Bearer clients need not. The acknowledgement "
                         "names the operator and is written to the audit log.")
async def api_ack(request: Request, ctx: Web, alert_id: AlertId, body: AckIn, operator: Writer) -> AlertView:
    return await acknowledge(request, ctx, operator, alert_id, body.note)


@router.get("/audit", response_model=AuditPage, responses=_ERR401, tags=["audit"],
            summary="The audit log, newest first (append-only)",
            description=f"Filters: `actor`, `action` (one of {', '.join(ACTIONS)}), `since_ms`. Keyset-paginated: "
                        "pass `next_cursor` back as `cursor`.")
def api_audit(ctx: Web, operator: Authed, actor: Annotated[str | None, Query(max_length=200)] = None,
              action: Annotated[str | None, Query(max_length=50)] = None,
              since_ms: Annotated[int | None, Query(ge=0, le=_MAX_ID)] = None,
              limit: Limit = 100, cursor: Cursor = None) -> AuditPage:
    if action is not None and action not in ACTIONS:
        raise WebError(422, "invalid_request", f"action: expected one of {', '.join(ACTIONS)}")
    entries, next_cursor = audit_log(ctx).page(actor=actor, action=action, since_ms=since_ms, limit=limit,
                                               cursor=cursor)
    return AuditPage(entries=[AuditOut.model_validate(e) for e in entries], next_cursor=next_cursor)


# -- pages -------------------------------------------------------------------------------------------------------------
pages = APIRouter(include_in_schema=False)
_STATES: list[tuple[AlertFilter, str]] = [("open", "Open"), ("raised", "Raised"), ("acknowledged", "Acknowledged"),
                                          ("cleared", "Cleared"), ("all", "History")]


def alert_row(a: AlertView, now_ms: int) -> dict[str, Any]:
    """An alert as the pages show it (the alerts page and a device's page): its fields and its times, relative."""
    return {**asdict(a), "raised_ago": relative_time(a.raised_ms, now_ms), "raised_iso": iso_utc(a.raised_ms),
            "acked_ago": relative_time(a.acked_ms, now_ms), "cleared_ago": relative_time(a.cleared_ms, now_ms)}


def _alerts_page(request: Request, ctx: WebContext, operator: Operator, state: AlertFilter, cursor: int | None,
                 flash: tuple[str, str] | None = None, status: int = 200, device: str | None = None) -> HTMLResponse:
    alerts, next_cursor = alert_store(ctx).page(state, device_id=device, limit=100, cursor=cursor)
    now = ctx.now_ms()
    return ctx.render(request, "alerts.html", title="Alerts", operator=operator, refresh=True, status=status,
                      alerts=[alert_row(a, now) for a in alerts], next_cursor=next_cursor, state=state,
                      states=_STATES, flash=flash, thresholds=ctx.config.alerts, device=device,
                      device_query=f"&device={quote(device, safe='')}" if device is not None else "")


@pages.get("/alerts")
def alerts_page(request: Request, ctx: Web, operator: Authed, state: AlertFilter = "open", cursor: Cursor = None,
                device: Annotated[str | None, Query(max_length=200, description="one device's alerts")] = None,
                ) -> HTMLResponse:
    return _alerts_page(request, ctx, operator, state, cursor, device=device or None)


@pages.post("/alerts/{alert_id}/ack")
async def alerts_ack_form(request: Request, ctx: Web, alert_id: AlertId, operator: Writer,
                          note: Annotated[str, Form(max_length=1000, pattern=NO_NUL)] = "") -> Response:
    try:
        await acknowledge(request, ctx, operator, alert_id, note.strip())
    except WebError as exc:
        if exc.code != "alert_cleared":
            raise
        return await run_in_threadpool(_alerts_page, request, ctx, operator, "open", None, ("error", exc.detail),
                                       409)
    return RedirectResponse("/alerts", status_code=303)  # after a POST, a GET: a reload does not acknowledge again


@pages.get("/audit")
def audit_page(request: Request, ctx: Web, operator: Authed, actor: Annotated[str | None, Query(max_length=200)] = None,
               action: Annotated[str | None, Query(max_length=50)] = None, cursor: Cursor = None) -> HTMLResponse:
    actor, action = actor or None, action or None  # the filter form sends empty fields
    if action is not None and action not in ACTIONS:
        raise WebError(422, "invalid_request", f"action: expected one of {', '.join(ACTIONS)}")
    entries, next_cursor = audit_log(ctx).page(actor=actor, action=action, limit=100, cursor=cursor)
    now = ctx.now_ms()
    rows = [{**asdict(e), "ago": relative_time(e.ts_ms, now), "iso": iso_utc(e.ts_ms)} for e in entries]
    query = urlencode({k: v for k, v in (("actor", actor), ("action", action)) if v})
    return ctx.render(request, "audit.html", title="Audit", operator=operator, refresh=True, entries=rows,
                      next_cursor=next_cursor, actor=actor, action=action, actions=ACTIONS,
                      query=f"{query}&" if query else "")
