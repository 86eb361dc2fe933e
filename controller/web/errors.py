"""The web app's error edge: every error becomes the one JSON body `{"error": code, "detail": …}` for the API (and
fragments), an HTML page for the browser, or a redirect to /login for a page without a session.

    WebError (security.py)          raised by routes and the context; carries status, code, detail, headers
    RequestValidationError          → 422 invalid_request, the detail naming each field (`query.since_ms: …`)
    HTTPException (Starlette)       → 400 invalid_request / 404 not_found / 405 method_not_allowed (+ `Allow`)
    any other Exception             → 500 internal_error with an error id, logged with its traceback and counted
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanofleet.allow import allowed_methods

from .context import web
from .security import COOKIE, Unauthorized, WebError, safe_next

__all__ = ["install_error_handlers"]


def _error_json(exc: WebError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="nanofleet"' + (
            ', error="invalid_token"' if exc.code in ("invalid_token", "session_expired") else "")
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers)


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return (path.startswith(("/api/", "/artifacts/")) or path in ("/openapi.json", "/metrics", "/events")
            or request.headers.get("x-fragment") == "1")


async def _web_error(request: Request, exc: WebError) -> Response:
    if isinstance(exc, Unauthorized) and not _wants_json(request):
        target = safe_next(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        resp: Response = RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
    elif _wants_json(request):
        resp = _error_json(exc)
    else:
        resp = web(request).render(request, "error.html", title=str(exc.status), status=exc.status, operator=None,
                                   code=exc.status, detail=exc.detail)
    if isinstance(exc, Unauthorized) and exc.clear_cookie:
        resp.delete_cookie(COOKIE, path="/")
    return resp


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return await _web_error(request, WebError(422, "invalid_request", problems))


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = {}
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request.app.router.routes, request.scope)
    detail = f"{request.method} {request.url.path}: {exc.detail}" if exc.status_code in (404, 405) else str(
        exc.detail)
    return await _web_error(request, WebError(exc.status_code, code, detail, headers=headers))


async def _bug(request: Request, exc: Exception) -> Response:
    """Any other exception is a bug: the one error body with an error id (Starlette re-raises it afterwards, so the
    server logs it too)."""
    return await _web_error(request, web(request).internal_error(f"{request.method} {request.url.path}", exc))


async def _web_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)
    return await _web_error(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(WebError, _web_error_handler)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _bug)
