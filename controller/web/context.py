"""What every router of the web app works over: `WebContext` (the typed store, fleet config, operator auth, command
service, usage reader, the controller's status) on `app.state.web`, and the FastAPI dependencies that hand it and
the operator to a route."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from nanofleet.config import FleetConfig
from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.artifacts import ArtifactStore, DeviceTokens
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.commands import CommandError, UnknownCommand
from nanofleet.controller.events import FleetEvents
from nanofleet.controller.fleet_queries import Overview, SlowFigures, with_slow
from nanofleet.controller.queries import Queries
from nanofleet.controller.summary import Cached
from nanofleet.controller.views import DeviceView, Rejection, RollupPoint, TelemetryPoint
from nanofleet.store_url import StoreTarget, as_target

from . import schemas
from .layout import TEMPLATES, content_security_policy, new_nonce, render_block
from .security import Operator, OperatorAuth, WebError, client_address
from .sessions import SessionSigner

__all__ = ["Authed", "Commands", "FleetReader", "UsageReader", "Web", "WebContext", "Writer"]

log = logging.getLogger("nanofleet.controller.web")
T = TypeVar("T")


class FleetReader(Protocol):
    """The store's reads the web app makes (controller/store.py `Store`): a few whole views, and `read`, which runs
    controller/queries.py's SQL on the calling thread's read connection. `published_policies` and `device_events`
    are used when the store has them."""

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...
    def list_devices(self) -> list[DeviceView]: ...
    def get_device(self, device_id: str) -> DeviceView | None: ...
    def telemetry(self, device_id: str, since_ms: int | None = None, limit: int = 1000) -> list[TelemetryPoint]: ...
    def rollups(self, device_id: str, resolution: Literal["1m", "1h"],
                since_ms: int | None = None) -> list[RollupPoint]: ...
    def policy_convergence(self) -> dict[int, int]: ...
    def rejections(self, limit: int = 100) -> list[Rejection]: ...


class Commands(Protocol):
    async def send(self, device_id: str, kind: str, args: dict[str, str]) -> Any: ...


class UsageReader:
    """The gateway's usage db, opened on first use (opening migrates, which takes the gateway db's write lock) and
    never created by us: a missing file reads as no usage yet."""

    def __init__(self, path: Path | StoreTarget | None) -> None:
        # a PostgreSQL store is always there to read (opening it runs the gateway's migrations if no gateway has)
        self.path = None if path is None else as_target(path)
        self._lock = threading.Lock()
        self._store: Any = None

    def rows(self, day: str | None = None) -> list[Any] | None:
        """Rows of `day` (every day when None); None when the controller runs without the gateway's db."""
        if self.path is None:
            return None
        if self._store is None and self.path.path is not None and not self.path.path.exists():
            return []
        with self._lock:
            if self._store is None:
                from nanofleet.controller.gateway.usage import UsageStore  # only when the gateway runs beside us

                self._store = UsageStore(self.path)
        return list(self._store.summary(day))

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


@dataclasses.dataclass
class WebContext:
    store: FleetReader
    config: FleetConfig
    auth: OperatorAuth
    signer: SessionSigner
    now_ms: Callable[[], int]
    commands: Commands | None
    usage: UsageReader
    session_ttl_s: float
    refresh_s: int
    errors: Counter[str] = dataclasses.field(default_factory=Counter)  # answers given for bugs, by code
    status: Callable[[], Mapping[str, Any]] | None = None  # ControllerService.status, when a service runs us
    artifacts: ArtifactStore | None = None      # served at /artifacts/{sha256} (routes_artifacts.py)
    device_tokens: DeviceTokens | None = None   # who may fetch them: the gateway's device tokens
    artifact_counts: Counter[str] = dataclasses.field(default_factory=Counter)  # served, denied, not_found, …
    events: FleetEvents = dataclasses.field(default_factory=FleetEvents)  # what /events streams (controller/events)
    alerts: AlertStore | None = None  # the stored alerts (the engine runs in ControllerService)
    audit: AuditLog | None = None
    logins_failed: int = 0  # counted with the audit entry (status()["web"], metrics)

    queries: Queries = dataclasses.field(init=False)
    # the overview's fleet-wide aggregates: the fast-moving ones at most 1 s old, the costly slow ones 10 s
    summary: Cached[Overview] = dataclasses.field(init=False)
    slow_summary: Cached[SlowFigures] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.queries = Queries(self.store)
        self.summary = Cached(lambda: self.queries.fleet_figures(self.config.alerts, self.now_ms()),
                              name="fleet-summary", on_failure=self._summary_failed)
        self.slow_summary = Cached(lambda: self.queries.slow_figures(self.now_ms()), max_age_s=10.0,
                                   stale_limit_s=60.0, name="fleet-summary-slow", on_failure=self._summary_failed)

    def _summary_failed(self, exc: BaseException) -> None:
        self.errors["summary_refresh"] += 1  # /metrics: web_errors_total{code="summary_refresh"}

    def overview(self) -> Overview:
        return with_slow(self.summary.get(), self.slow_summary.get())

    def render(self, request: Request, name: str, *, title: str, operator: Operator | None, status: int = 200,
               refresh: bool = False, **variables: Any) -> HTMLResponse:
        """Template `name` as a whole page under a fresh CSP nonce, or only its ``content`` block for a request
        with ``X-Fragment: 1`` (the dashboard's refresh swaps that into ``#content``)."""
        nonce = new_nonce()
        csrf = self.signer.csrf_token(operator.session) if operator and operator.session else (
            "" if operator else None)
        values: dict[str, Any] = {
            "request": request, "title": title, "operator": operator, "nonce": nonce, "csrf": csrf,
            "fleet": self.config.fleet, "refresh_s": self.refresh_s if refresh else None,
            "open_alerts": self.open_alert_count() if operator is not None else None, **variables}
        if request.headers.get("x-fragment") == "1":  # the header's alert count travels beside the content block
            count = values["open_alerts"]
            return HTMLResponse(render_block(name, "content", values), status_code=status,
                                headers={} if count is None else {"X-Open-Alerts": str(int(count))})
        return TEMPLATES.TemplateResponse(request, name, values, status_code=status,
                                          headers={"Content-Security-Policy": content_security_policy(nonce)})

    def open_alert_count(self) -> int | None:
        """The header's count: open (raised or acknowledged) stored alerts; None without an alert store."""
        return None if self.alerts is None else self.alerts.open_count()

    def record(self, request: Request, operator: Operator | None, action: str, target: str = "",
               detail: Mapping[str, Any] | None = None) -> None:
        """Append to the audit log without waiting (its failure is logged and counted by the log)."""
        if self.audit is None:
            return
        actor = operator.name if operator is not None else "-"
        via = {"via": operator.via} if operator is not None else {}
        self.audit.record_soon(actor, action, target, {**via, **(detail or {})}, client_address(request))

    def device(self, device_id: str) -> Any:
        view = self.store.get_device(device_id)
        if view is None:
            raise WebError(404, "device_not_found", f"no device {device_id!r} has reported to this controller")
        return self.with_group(view)

    def with_group(self, view: Any) -> Any:
        """The view with its group from fleet.yaml when the store does not know it."""
        if getattr(view, "group", None) is None and dataclasses.is_dataclass(view) and not isinstance(view, type):
            group = self.config.group_of(getattr(view, "device_id", ""))
            if group is not None:
                return dataclasses.replace(view, group=group)
        return view

    def convergence(self) -> schemas.ConvergenceOut:
        conv = self.store.policy_convergence()
        versions = [schemas.ConvergenceVersion(version=v, devices=n) for v, n in sorted(conv.items(), reverse=True)]
        latest = versions[0].version if versions else None
        return schemas.ConvergenceOut(latest=latest, converged=versions[0].devices if versions else 0,
                                      total=sum(conv.values()), versions=versions, behind=self.behind())

    def behind(self, devices: Sequence[Any] | None = None) -> list[schemas.PolicyLag]:
        published_of = getattr(self.store, "published_policies", None)  # beyond the contract: used when present
        if published_of is None:
            return []
        published = published_of()
        if not published:
            return []
        return [schemas.PolicyLag(device_id=d.device_id, applied=d.policy_version, published=p.version)
                for d in (self.store.list_devices() if devices is None else devices)
                if (p := published.get(d.device_id)) is not None and d.policy_version != p.version]

    def internal_error(self, what: str, exc: BaseException) -> WebError:
        """Log `exc` with its traceback under a fresh error id, count it, and give the 500 that names the id."""
        error_id = secrets.token_hex(6)
        log.error("%s failed: internal error, error id %s", what, error_id, exc_info=exc)
        self.errors["internal_error"] += 1
        return WebError(500, "internal_error", f"{what} failed: internal error in the controller (error id "
                                               f"{error_id}); its log has the details")

    async def send_command(self, device_id: str, kind: str, args: dict[str, str], *, request: Request | None = None,
                           operator: Operator | None = None) -> schemas.CommandOut:
        """Send through the command service (audited with its result when `request` is given: who, from where)."""
        try:
            out = await self._send_command(device_id, kind, args)
        except WebError as exc:
            if request is not None:
                self.record(request, operator, "command", device_id, {"kind": kind, "args": args,
                                                                      "result": exc.code, "message": exc.detail})
            raise
        if request is not None:
            self.record(request, operator, "command", device_id, {"kind": kind, "args": args, "result": out.status,
                                                                  "message": out.message, "id": out.id})
        return out

    async def _send_command(self, device_id: str, kind: str, args: dict[str, str]) -> schemas.CommandOut:
        """Only the command service's documented errors map to their statuses, a bug is a 500."""
        if self.commands is None:
            raise WebError(404, "commands_disabled", "this controller was started without a command service")
        await run_in_threadpool(self.device, device_id)
        try:
            result = await self.commands.send(device_id, kind, args)
        except TimeoutError as exc:  # the service says whether the device at least acknowledged
            raise WebError(504, "command_timeout", str(exc) or f"{kind} to {device_id}: no answer in time") from exc
        except UnknownCommand as exc:
            raise WebError(422, "unknown_command", str(exc)) from exc
        except CommandError as exc:  # the command service's documented errors, shown to the operator
            raise WebError(502, "command_failed", f"{kind} to {device_id} failed: {exc}") from exc
        except Exception as exc:  # a bug: its traceback goes to the log under an id the operator can quote
            raise self.internal_error(f"{kind} to {device_id}", exc) from exc
        elapsed = getattr(result, "elapsed_ms", None)
        return schemas.CommandOut(device_id=device_id, kind=kind, id=str(getattr(result, "id", "")),
                                  status=str(getattr(result, "status", "")),
                                  message=str(getattr(result, "message", "")),
                                  data={str(k): str(v) for k, v in dict(getattr(result, "data", {}) or {}).items()},
                                  elapsed_ms=None if elapsed is None else round(float(elapsed), 1))


def web(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.web
    return ctx


def _operator(request: Request) -> Operator:
    return web(request).auth(request)


Web = Annotated[WebContext, Depends(web)]
Authed = Annotated[Operator, Depends(_operator)]


async def _csrf_checked(request: Request, operator: Authed) -> Operator:
    await web(request).auth.require_csrf(request, operator)
    return operator


Writer = Annotated[Operator, Depends(_csrf_checked)]
