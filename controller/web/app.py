"""The controller's dashboard and REST API: one FastAPI app composed of routers by area over a `WebContext`.

`create_app(store, config, operator_token_hash=...)` returns the ASGI app; the caller serves it (uvicorn, bound to
loopback unless the operator chooses otherwise). Everything but ``/healthz`` needs the operator: a Bearer token for
the API (and ``/metrics``: Prometheus sends it with `authorization: {credentials: …}`), or the session cookie set by
``/login`` for the browser. With `status` (ControllerService.status) ``/healthz`` answers 503 once a part the
controller needs died, ``/metrics`` exposes the controller's counters and the overview shows a "Controller" panel.
Store reads are blocking SQLite calls, so the handlers that make them are plain ``def`` (FastAPI runs those in its
thread pool, off the event loop).

    routes_auth    /healthz, /login, /logout                  (unauthenticated)
    routes_pages   /, /devices, /devices/{id}, /groups, /api,  (server-rendered dashboard, templates/)
                   /openapi.json,
                   /metrics                                   (Prometheus text format)
    routes_api     /api/...                                   (REST API, docs/rest-api.md)
    routes_artifacts /artifacts/{sha256}                      (devices' downloads: gateway token, Range)
    routes_events  /events                                    (live events, server-sent; controller/events.py)
    routes_ops     /api/alerts*, /api/audit, /alerts, /audit  (stored alerts, acknowledgements, the audit log)
    errors         the error edge; context: WebContext and the dependencies every route takes
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request

from nanofleet.config import FleetConfig
from nanofleet.controller import metrics
from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.artifacts import ArtifactStore, DeviceTokens
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.errors import StoreError
from nanofleet.controller.events import FleetEvents
from nanofleet.controller.metrics import registry_for
from nanofleet.protos.names import COMMAND_KINDS
from nanofleet.store_url import StoreTarget

from . import routes_api, routes_artifacts, routes_auth, routes_events, routes_ops, routes_pages
from .context import Commands, FleetReader, UsageReader, WebContext
from .errors import install_error_handlers
from .openapi_doc import document_errors
from .security import OperatorAuth, SecurityHeaders, WebError
from .sessions import SessionSigner

__all__ = ["COMMAND_KINDS", "create_app"]
log = logging.getLogger("nanofleet.controller.web")


def refuse_nul(request: Request) -> None:
    """No query or path parameter may hold a NUL character: PostgreSQL text cannot (psycopg raises DataError), SQLite
    would store it; refused alike on both backends, naming the parameter, before any route runs."""
    for where, params in (("path", request.path_params), ("query", request.query_params)):
        for name, value in params.items():
            if "\x00" in str(value):
                raise WebError(422, "invalid_request", f"{where}.{name}: must not contain a NUL character")


def create_app(
    store: FleetReader,
    config: FleetConfig,
    *,
    operator_token_hash: str,
    commands: Commands | None = None,
    usage_db: Path | StoreTarget | None = None,
    session_secret: bytes | None = None,
    session_ttl_s: float = 12 * 3600,
    refresh_s: int = 3,
    clock: Callable[[], float] = time.time,
    status: Callable[[], Mapping[str, Any]] | None = None,
    events: FleetEvents | None = None,
    alerts: AlertStore | None = None,
    audit: AuditLog | None = None,
    operators: Mapping[str, str] | None = None,
    artifacts: ArtifactStore | None = None,
) -> FastAPI:
    """Build the dashboard + API app. `session_secret` defaults to a random per-process key (sessions end on
    restart); `clock` exists for tests of expiry; `status` is the running ControllerService's status(); `events` the
    hub `/events` streams from (a fresh one when not given, fed by the default alerts and audit below).
    `alerts` and `audit` default to ones over `store` when it is the controller's Store (it has a writer); the
    service passes its own so their changes reach its live-update hub. `operators` are the named operators' token
    hashes (controller/auth.py `read_operators`), beside the default token's holder, `operator`. `artifacts` are
    served to devices whose gateway token (in `usage_db`, the gateway's db) is active."""

    def now_ms() -> int:
        return int(clock() * 1000)

    errors: Counter[str] = Counter()
    set_groups = getattr(store, "set_group_resolver", None)  # the store's groups follow this fleet.yaml
    if set_groups is not None:
        try:
            set_groups(config.group_of)
        except StoreError as exc:  # the app still starts: its pages answer the store's error, with an id
            log.error("could not give the store fleet.yaml's groups: %s", exc)
            errors["store_groups"] += 1
    signer = SessionSigner(session_secret, ttl_s=session_ttl_s)
    usage = UsageReader(usage_db)
    hub = events if events is not None else FleetEvents()
    if hasattr(store, "submit"):  # the controller's Store: alerts and audit live in its file
        writable: Any = store
        alerts = alerts if alerts is not None else AlertStore(writable, on_change=hub.publish)
        audit = audit if audit is not None else AuditLog(writable, on_change=hub.publish)
    ctx = WebContext(store=store, config=config, auth=OperatorAuth(operator_token_hash, signer, now_ms, operators),
                     signer=signer, now_ms=now_ms, commands=commands, usage=usage, session_ttl_s=session_ttl_s,
                     refresh_s=refresh_s, status=status, errors=errors, alerts=alerts, audit=audit, events=hub,
                     artifacts=artifacts,
                     device_tokens=DeviceTokens(usage_db, config.fleet) if usage_db is not None else None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.events.close()
        usage.close()

    app = FastAPI(
        lifespan=lifespan,
        title="nanofleet controller",
        summary="Fleet state, telemetry, policy convergence and usage. Authenticate with 'Bearer <operator token>'.",
        version="1",
        docs_url=None, redoc_url=None, openapi_url=None,  # the bundled docs pages load from a CDN; ours do not
        dependencies=[Depends(refuse_nul)],
    )
    app.state.web = ctx
    app.state.errors = ctx.errors  # answers given for bugs, by code: a test and an operator can see them
    read = getattr(store, "read", None)  # beyond the FleetReader contract: the fleet's gauges when the store has it
    fleet = (lambda: read(metrics.fleet_counts)) if read is not None else None
    app.state.metrics = registry_for(status, web_errors=ctx.errors, fleet=fleet)  # served at /metrics
    app.state.close = usage.close  # for a parent app that mounts us (a mounted app's lifespan does not run)
    app.add_middleware(SecurityHeaders)
    install_error_handlers(app)
    app.include_router(routes_auth.router)
    app.include_router(routes_pages.router)
    app.include_router(routes_events.router)
    app.include_router(routes_api.router)
    app.include_router(routes_artifacts.router)
    app.include_router(routes_ops.router)
    app.include_router(routes_ops.pages)
    if commands is not None:
        app.include_router(routes_api.commands_router)

    def openapi_schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            document_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_schema  # type: ignore[method-assign]
    return app
