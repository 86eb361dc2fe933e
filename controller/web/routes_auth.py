"""Unauthenticated routes: health, the login form, login and logout (the session cookie's life)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from .context import Web
from .security import COOKIE, Operator, check_same_origin, safe_next

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
def healthz(ctx: Web) -> JSONResponse:
    """Open to load balancers and supervisors: 503 once a part the controller needs died (status()["ok"] false),
    naming the part but not its error (that is for the operator: the dashboard and /metrics)."""
    if ctx.status is None:
        return JSONResponse({"ok": True})
    status = ctx.status()
    ok = bool(status.get("ok"))
    failed = status.get("failed") or {}
    body = {"ok": ok, "broker_connected": bool(status.get("broker_connected")),
            "leader": bool((status.get("leader") or {}).get("is_leader")),
            "failed": failed.get("task") if not ok else None}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/login")
def login_form(request: Request, ctx: Web, next: str = "/") -> HTMLResponse:
    return ctx.render(request, "login.html", title="Log in", operator=None, next_path=safe_next(next), error=None)


@router.post("/login")
def login(request: Request, ctx: Web, token: Annotated[str, Form(max_length=512)] = "",
          next: Annotated[str, Form()] = "/") -> Response:
    check_same_origin(request)
    target = safe_next(next)
    name = ctx.auth.identify(token.strip())
    if name is None:
        ctx.logins_failed += 1  # audited with the address, never with what was typed
        ctx.record(request, None, "login_failed", "dashboard", {"reason": "invalid_token" if token else "empty"})
        return ctx.render(request, "login.html", title="Log in", operator=None, status=401, next_path=target,
                          error="That operator token is not valid.")
    cookie, session = ctx.signer.issue(ctx.now_ms(), name)
    ctx.record(request, Operator("session", session, name=name), "login", "dashboard",
               {"session": session.session_id[:8]})
    resp = RedirectResponse(target, status_code=303)
    resp.set_cookie(COOKIE, cookie, max_age=int(ctx.session_ttl_s), path="/", httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
async def logout(request: Request, ctx: Web) -> Response:
    resp = RedirectResponse("/login", status_code=303)
    session = ctx.signer.check(request.cookies.get(COOKIE), ctx.now_ms())
    if session is not None:
        await ctx.auth.require_csrf(request, Operator("session", session))
        ctx.signer.revoke(session, ctx.now_ms())
        ctx.record(request, Operator("session", session, name=session.name), "logout", "dashboard",
                   {"session": session.session_id[:8]})
    resp.delete_cookie(COOKIE, path="/")
    return resp
