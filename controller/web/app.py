"""The controller's dashboard and REST API as one FastAPI app over the store.

`create_app(store, config, operator_token_hash=...)` returns the ASGI app; the caller serves it (uvicorn, bound to
loopback unless the operator chooses otherwise). Everything but ``/healthz`` needs the operator: a Bearer token for
the API, or the session cookie set by ``/login`` for the browser. Store reads are blocking SQLite calls, so the
handlers that make them are plain ``def`` (FastAPI runs those in its thread pool, off the event loop).
"""

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from html import escape
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanofleet.allow import allowed_methods
from nanofleet.config import FleetConfig
from nanofleet.controller.commands import CommandError, UnknownCommand
from nanofleet.protos.names import COMMAND_KINDS

from . import pages, schemas
from .layout import content_security_policy, new_nonce, page
from .openapi_doc import document_errors
from .security import (
    COOKIE,
    Operator,
    OperatorAuth,
    SecurityHeaders,
    Unauthorized,
    WebError,
    check_same_origin,
    safe_next,
)
from .sessions import SessionSigner

__all__ = ["COMMAND_KINDS", "create_app"]

log = logging.getLogger("nanofleet.controller.web")


class _Commands(Protocol):
    async def send(self, device_id: str, kind: str, args: dict[str, str]) -> Any: ...


def _error_json(exc: WebError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="nanofleet"' + (
            ', error="invalid_token"' if exc.code in ("invalid_token", "session_expired") else "")
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers)


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path == "/openapi.json" or request.headers.get("x-fragment") == "1"


def create_app(
    store: Any,
    config: FleetConfig,
    *,
    operator_token_hash: str,
    commands: _Commands | None = None,
    usage_db: Path | None = None,
    session_secret: bytes | None = None,
    session_ttl_s: float = 12 * 3600,
    refresh_s: int = 3,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """Build the dashboard + API app. `session_secret` defaults to a random per-process key (sessions end on
    restart); `clock` exists for tests of expiry."""

    def now_ms() -> int:
        return int(clock() * 1000)

    signer = SessionSigner(session_secret, ttl_s=session_ttl_s)
    auth = OperatorAuth(operator_token_hash, signer, now_ms)
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        _close_usage()

    app = FastAPI(
        lifespan=lifespan,
        title="nanofleet controller",
        summary="Fleet state, telemetry, policy convergence and usage. Authenticate with 'Bearer <operator token>'.",
        version="1",
        docs_url=None, redoc_url=None, openapi_url=None,  # the bundled docs pages load from a CDN; ours do not
    )
    app.add_middleware(SecurityHeaders)
    app.state.errors = Counter()  # answers given for bugs, by code: a test and an operator can see them
    Authed = Annotated[Operator, Depends(auth)]

    async def csrf_checked(request: Request, operator: Authed) -> Operator:
        await auth.require_csrf(request, operator)
        return operator

    Writer = Annotated[Operator, Depends(csrf_checked)]
    Responses = dict[int | str, dict[str, Any]]
    err404: Responses = {404: {"model": schemas.ErrorOut, "description": "unknown device"}}
    err401: Responses = {401: {"model": schemas.ErrorOut, "description": "missing or wrong operator token"}}

    # ---- errors -------------------------------------------------------------------------------------------
    @app.exception_handler(WebError)
    async def _web_error(request: Request, exc: WebError) -> Response:
        if isinstance(exc, Unauthorized) and not _wants_json(request):
            target = safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            resp: Response = RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
        elif _wants_json(request):
            resp = _error_json(exc)
        else:
            resp = _html(request, f'<h1>{exc.status}</h1><p class="flash error">{escape(exc.detail)}</p>',
                         title=str(exc.status), status=exc.status, operator=None)
        if isinstance(exc, Unauthorized) and exc.clear_cookie:
            resp.delete_cookie(COOKIE, path="/")
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return await _web_error(request, WebError(422, "invalid_request", problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code,
                                                                                          "http_error")
        headers = {}
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(app.router.routes, request.scope)
        detail = f"{request.method} {request.url.path}: {exc.detail}" if exc.status_code in (404, 405) else str(
            exc.detail)
        return await _web_error(request, WebError(exc.status_code, code, detail, headers=headers))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        """Any other exception is a bug: the one error body with an error id (Starlette re-raises it afterwards, so
        the server logs it too)."""
        return await _web_error(request, _internal_error(f"{request.method} {request.url.path}", exc))

    # ---- helpers ------------------------------------------------------------------------------------------
    def _html(request: Request, content: str, *, title: str, operator: Operator | None, status: int = 200,
              refresh: bool = False) -> HTMLResponse:
        if request.headers.get("x-fragment") == "1":
            return HTMLResponse(content, status_code=status)
        nonce = new_nonce()
        csrf = signer.csrf_token(operator.session) if operator and operator.session else (
            "" if operator else None)
        body = page(title=title, content=content, nonce=nonce, fleet=config.fleet, csrf=csrf,
                    refresh_s=refresh_s if refresh else None)
        csp = {"Content-Security-Policy": content_security_policy(nonce)}
        return HTMLResponse(body, status_code=status, headers=csp)

    def _device(device_id: str) -> Any:
        view = store.get_device(device_id)
        if view is None:
            raise WebError(404, "device_not_found", f"no device {device_id!r} has reported to this controller")
        return _with_group(view)

    def _with_group(view: Any) -> Any:
        if getattr(view, "group", None) is None and dataclasses.is_dataclass(view) and not isinstance(view, type):
            group = config.group_of(getattr(view, "device_id", ""))
            if group is not None:
                return dataclasses.replace(view, group=group)
        return view

    usage_lock = threading.Lock()
    usage_store: list[Any] = []  # opened on first use (opening migrates, which takes the gateway db's write lock)

    def _usage_rows(day: str | None = None) -> list[Any] | None:
        if usage_db is None:
            return None
        if not usage_store and not Path(usage_db).exists():
            return []  # the gateway has not written anything yet; do not create its file for it
        with usage_lock:
            if not usage_store:
                from nanofleet.controller.gateway.usage import UsageStore  # only when the gateway runs beside us

                usage_store.append(UsageStore(usage_db))
        return list(usage_store[0].summary(day))

    def _close_usage() -> None:
        with usage_lock:
            while usage_store:
                usage_store.pop().close()

    app.state.close = _close_usage  # for a parent app that mounts us (a mounted app's lifespan does not run)

    def _convergence() -> schemas.ConvergenceOut:
        conv = store.policy_convergence()
        versions = [schemas.ConvergenceVersion(version=v, devices=n) for v, n in sorted(conv.items(), reverse=True)]
        latest = versions[0].version if versions else None
        return schemas.ConvergenceOut(latest=latest, converged=versions[0].devices if versions else 0,
                                      total=sum(conv.values()), versions=versions, behind=_behind())

    def _behind(devices: Sequence[Any] | None = None) -> list[schemas.PolicyLag]:
        published_of = getattr(store, "published_policies", None)  # beyond the contract: used when present
        if published_of is None:
            return []
        published = published_of()
        if not published:
            return []
        return [schemas.PolicyLag(device_id=d.device_id, applied=d.policy_version, published=p.version)
                for d in (store.list_devices() if devices is None else devices)
                if (p := published.get(d.device_id)) is not None and d.policy_version != p.version]

    def _internal_error(what: str, exc: BaseException) -> WebError:
        """Log `exc` with its traceback under a fresh error id, count it, and give the 500 that names the id."""
        error_id = secrets.token_hex(6)
        log.error("%s failed: internal error, error id %s", what, error_id, exc_info=exc)
        app.state.errors["internal_error"] += 1
        return WebError(500, "internal_error", f"{what} failed: internal error in the controller (error id "
                                               f"{error_id}); its log has the details")

    async def _send_command(device_id: str, kind: str, args: dict[str, str]) -> schemas.CommandOut:
        if commands is None:
            raise WebError(404, "commands_disabled", "this controller was started without a command service")
        await run_in_threadpool(_device, device_id)
        try:
            result = await commands.send(device_id, kind, args)
        except TimeoutError as exc:  # the service says whether the device at least acknowledged
            raise WebError(504, "command_timeout", str(exc) or f"{kind} to {device_id}: no answer in time") from exc
        except UnknownCommand as exc:
            raise WebError(422, "unknown_command", str(exc)) from exc
        except CommandError as exc:  # the command service's documented errors, shown to the operator
            raise WebError(502, "command_failed", f"{kind} to {device_id} failed: {exc}") from exc
        except Exception as exc:  # a bug: its traceback goes to the log under an id the operator can quote
            raise _internal_error(f"{kind} to {device_id}", exc) from exc
        elapsed = getattr(result, "elapsed_ms", None)
        return schemas.CommandOut(device_id=device_id, kind=kind, id=str(getattr(result, "id", "")),
                                  status=str(getattr(result, "status", "")),
                                  message=str(getattr(result, "message", "")),
                                  data={str(k): str(v) for k, v in dict(getattr(result, "data", {}) or {}).items()},
                                  elapsed_ms=None if elapsed is None else round(float(elapsed), 1))

    # ---- unauthenticated ----------------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return _html(request, pages.login_page(next_path=safe_next(next)), title="Log in", operator=None)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: Annotated[str, Form(max_length=512)] = "",
              next: Annotated[str, Form()] = "/") -> Response:
        check_same_origin(request)
        target = safe_next(next)
        if not auth.check_token(token.strip()):
            return _html(request, pages.login_page(next_path=target, error="That operator token is not valid."),
                         title="Log in", operator=None, status=401)
        cookie, _session = signer.issue(now_ms())
        resp = RedirectResponse(target, status_code=303)
        resp.set_cookie(COOKIE, cookie, max_age=int(session_ttl_s), path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
        return resp

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        resp = RedirectResponse("/login", status_code=303)
        session = signer.check(request.cookies.get(COOKIE), now_ms())
        if session is not None:
            await auth.require_csrf(request, Operator("session", session))
            signer.revoke(session, now_ms())
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # ---- pages --------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def overview(request: Request, operator: Authed, q: Annotated[str, Query(max_length=200)] = "",
                 state: Literal["", "online", "offline", "stale"] = "") -> HTMLResponse:
        devices = [_with_group(d) for d in store.list_devices()]
        content = pages.overview_page(devices, store.policy_convergence(), store.rejections(50), _usage_rows(),
                                      alerts=config.alerts, now_ms=now_ms(), behind=_behind(devices),
                                      query=q, state=state)
        return _html(request, content, title="Fleet", operator=operator, refresh=True)

    def _device_content(device_id: str, window: str, operator: Operator,
                        flash: tuple[str, str] | None = None) -> str:
        device = _device(device_id)
        span_ms, source = pages.WINDOWS[window]
        end = now_ms()
        start = end - span_ms
        points: Sequence[Any] = (store.telemetry(device_id, since_ms=start, limit=5000) if source == "raw"
                                 else store.rollups(device_id, source, since_ms=start))
        charts = pages.device_charts(points, source, start_ms=start, end_ms=end,
                                     ram_total_mb=getattr(device, "ram_total_mb", None))
        csrf = signer.csrf_token(operator.session) if operator.session else ""
        events_of = getattr(store, "device_events", None)  # beyond the contract: shown when the store has it
        events = events_of(device_id, limit=10) if events_of is not None else []
        return pages.device_page(device, charts, window=window, now_ms=end, csrf=csrf, events=events,
                                 command_kinds=COMMAND_KINDS if commands is not None else (), flash=flash)

    Window = Literal["15m", "1h", "6h", "24h", "7d"]

    @app.get("/devices/{device_id}", include_in_schema=False)
    def device_page(request: Request, device_id: str, operator: Authed, window: Window = "1h") -> HTMLResponse:
        return _html(request, _device_content(device_id, window, operator), title=device_id, operator=operator,
                     refresh=True)

    @app.post("/devices/{device_id}/commands", include_in_schema=False)
    async def device_command(request: Request, device_id: str, operator: Writer,
                             kind: Annotated[str, Form()]) -> HTMLResponse:
        if kind not in COMMAND_KINDS:  # the form's field is a plain string: checked against the one list
            raise WebError(422, "invalid_request", f"kind: expected one of {', '.join(COMMAND_KINDS)}")
        try:
            out = await _send_command(device_id, kind, {})
            took = f" in {out.elapsed_ms:.0f} ms" if out.elapsed_ms is not None else ""
            flash = ("ok" if out.status == "ok" else "error", f"{kind}: {out.status}{took} {out.message}".strip())
        except WebError as exc:
            if exc.code == "device_not_found":
                raise
            flash = ("error", exc.detail)
        content = await run_in_threadpool(_device_content, device_id, "1h", operator, flash)
        return _html(request, content, title=device_id, operator=operator)

    @app.get("/api", include_in_schema=False)
    def api_doc(request: Request, operator: Authed) -> HTMLResponse:
        return _html(request, pages.api_doc_page(app.openapi()), title="API", operator=operator)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(operator: Authed) -> JSONResponse:
        return JSONResponse(app.openapi())

    # ---- REST API -----------------------------------------------------------------------------------------
    @app.get("/api/devices", response_model=list[schemas.DeviceOut], responses=err401, tags=["devices"],
             summary="Every device with its latest state")
    def api_devices(operator: Authed) -> list[Any]:
        return [_with_group(d) for d in store.list_devices()]

    @app.get("/api/devices/{device_id}", response_model=schemas.DeviceOut, responses={**err401, **err404},
             tags=["devices"], summary="One device's latest state")
    def api_device(device_id: str, operator: Authed) -> Any:
        return _device(device_id)

    @app.get("/api/devices/{device_id}/telemetry", response_model=schemas.TelemetryOut,
             responses={**err401, **err404}, tags=["devices"], summary="A device's telemetry over time",
             description="resolution=raw gives samples; 1m / 1h give rollup buckets (avg/max CPU, max temperature, "
                         "minimum RAM available).")
    def api_telemetry(device_id: str, operator: Authed,
                      since_ms: Annotated[int | None, Query(ge=0, le=schemas.MAX_TS_MS)] = None,
                      limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                      resolution: Literal["raw", "1m", "1h"] = "raw") -> schemas.TelemetryOut:
        _device(device_id)
        if resolution == "raw":
            points = [schemas.TelemetryPointOut.model_validate(p)
                      for p in store.telemetry(device_id, since_ms=since_ms, limit=limit)]
        else:
            points = [schemas.TelemetryPointOut(ts_ms=r.ts_ms, n=r.n, cpu_percent=r.cpu_avg, cpu_max=r.cpu_max,
                                                temp_max_c=r.temp_max, temp_avg_c=r.temp_avg,
                                                ram_available_mb=r.ram_available_min)
                      for r in store.rollups(device_id, resolution, since_ms=since_ms)][-limit:]
        return schemas.TelemetryOut(device_id=device_id, resolution=resolution, since_ms=since_ms, points=points)

    @app.get("/api/policy/convergence", response_model=schemas.ConvergenceOut, responses=err401, tags=["policy"],
             summary="How many devices run each applied policy version")
    def api_convergence(operator: Authed) -> schemas.ConvergenceOut:
        return _convergence()

    @app.get("/api/rejections", response_model=list[schemas.RejectionOut], responses=err401, tags=["ingest"],
             summary="Malformed payloads rejected by ingest, counted per device and reason")
    def api_rejections(operator: Authed, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Any]:
        return store.rejections(limit)

    @app.get("/api/usage", response_model=schemas.UsageOut,
             responses={**err401, 404: {"model": schemas.ErrorOut, "description": "usage accounting not configured"}},
             tags=["gateway"], summary="Gateway cloud usage per day, device, app and model")
    def api_usage(operator: Authed,
                  day: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None) -> schemas.UsageOut:
        rows = _usage_rows(day)
        if rows is None:
            raise WebError(404, "usage_not_configured", "this controller was started without the gateway's usage db")
        return schemas.UsageOut(day=day, rows=[schemas.UsageRowOut.model_validate(r) for r in rows],
                                total_tokens=sum(int(r.input_tokens) + int(r.output_tokens) for r in rows),
                                total_cost_usd=round(sum(float(r.cost_usd) for r in rows), 6))

    if commands is not None:
        cmd_errors: Responses = {
                      403: {"model": schemas.ErrorOut, "description": "a cookie session without its CSRF token"},
                      500: {"model": schemas.ErrorOut, "description": "internal_error: a bug, logged under the "
                                                                      "error id the detail names"},
                      502: {"model": schemas.ErrorOut, "description": "command_failed: the command service failed"},
                      504: {"model": schemas.ErrorOut, "description": "command_timeout: no result in time (the "
                                                                      "detail says whether the device acknowledged)"}}

        @app.post("/api/devices/{device_id}/commands", response_model=schemas.CommandOut,
                  responses={**err401, **err404, **cmd_errors}, tags=["devices"],
                  summary="Send a command and wait for its result",
                  description="Cookie sessions must send X-CSRF-Token; Bearer clients need not.")
        async def api_command(device_id: str, body: schemas.CommandIn, operator: Writer) -> schemas.CommandOut:
            return await _send_command(device_id, body.kind, body.args)

    def openapi_schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_schema  # type: ignore[method-assign]
    return app
