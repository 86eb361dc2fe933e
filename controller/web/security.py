"""Operator authentication for the web app: Bearer token or signed session cookie, CSRF on cookie POSTs, and the
security headers every response carries.

Exception tree (under ControllerError, see controller/errors.py; all map to HTTP answers at the app's edge)::

    WebError(status, code, detail)     an HTTP-facing error with a JSON body {"error": code, "detail": detail}
    └── Unauthorized                   401: no, wrong or expired credentials (pages redirect to /login instead)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..auth import verify_token
from ..errors import WebError
from .sessions import Session, SessionSigner

__all__ = ["COOKIE", "Operator", "OperatorAuth", "SecurityHeaders", "Unauthorized", "WebError", "client_address",
           "safe_next"]

COOKIE = "nanofleet_session"
_MAX_TOKEN = 512


class Unauthorized(WebError):
    def __init__(self, code: str, detail: str, *, clear_cookie: bool = False) -> None:
        super().__init__(401, code, detail)
        self.clear_cookie = clear_cookie


@dataclass(frozen=True)
class Operator:
    """Who is calling: with the token itself (API clients) or a browser session from the login form."""

    via: Literal["token", "session"]
    session: Session | None = None
    name: str = "operator"  # who, for the audit log and acknowledgements: the default token's holder or a named one


def client_address(request: Request) -> str:
    """Where a request came from, for the audit log (the peer; a proxy in front shows as itself)."""
    return request.client.host if request.client else ""


def safe_next(value: str | None) -> str:
    """Only same-site absolute paths survive as a post-login target (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or len(value) > 2000:
        return "/"
    if any(ord(c) < 0x20 for c in value):
        return "/"
    return value


class OperatorAuth:
    """The FastAPI dependencies that decide who may call what."""

    def __init__(self, token_hash: str, signer: SessionSigner, now_ms: Callable[[], int],
                 operators: Mapping[str, str] | None = None) -> None:
        self.token_hash, self.signer, self.now_ms = token_hash, signer, now_ms
        self.operators = dict(operators or {})  # named operators: name -> token hash (controller/auth.py)
        self.refused = 0  # requests with a wrong Bearer token (counted, not audited: a scanner would flood the log)

    def check_token(self, token: str) -> bool:
        return self.identify(token) is not None

    def identify(self, token: str) -> str | None:
        """The name of the operator whose token this is, or None. Every hash is compared (constant-time each)."""
        if len(token) > _MAX_TOKEN:
            return None
        found = "operator" if verify_token(token, self.token_hash) else None
        for name, token_hash in self.operators.items():
            if verify_token(token, token_hash):
                found = name
        return found

    def __call__(self, request: Request) -> Operator:
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Unauthorized("malformed_authorization",
                                   "Authorization header must be 'Bearer <operator token>'")
            name = self.identify(token)
            if name is None:
                self.refused += 1
                raise Unauthorized("invalid_token", "the operator token is not valid")
            return Operator("token", name=name)
        cookie = request.cookies.get(COOKIE)
        if cookie is not None:
            session = self.signer.check(cookie, self.now_ms())
            if session is None:
                raise Unauthorized("session_expired", "session expired or not valid; log in again at /login",
                                   clear_cookie=True)
            return Operator("session", session, name=session.name)
        raise Unauthorized("missing_token",
                           "no operator credentials: send 'Authorization: Bearer <token>' or log in at /login")

    async def require_csrf(self, request: Request, operator: Operator) -> None:
        """Cookie-authenticated writes must come from our own pages: same Origin and the session's CSRF token."""
        if operator.via == "token" or operator.session is None:
            return  # a Bearer token is never sent by a browser on its own
        check_same_origin(request)
        token = request.headers.get("x-csrf-token")
        if token is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            value = (await request.form()).get("csrf")
            token = value if isinstance(value, str) else None
        if not self.signer.check_csrf(operator.session, token):
            raise WebError(403, "csrf_failed", "missing or wrong CSRF token; reload the page and try again")


def check_same_origin(request: Request) -> None:
    """Reject a browser POST whose Origin names another site (absent Origin: older clients, allowed)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin == "null" or urlsplit(origin).netloc != host:
        raise WebError(403, "cross_origin", f"cross-site request from {origin!r} refused")


_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer makes browsers send "Origin: null" on our own POSTs
    (b"cache-control", b"no-store"),
]
_DEFAULT_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """Adds the fixed security headers (and a deny-all CSP when the page did not set its own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"cache-control"]
                names = {h[0].lower() for h in headers}
                headers.extend(_HEADERS)
                if b"content-security-policy" not in names:
                    headers.append(_DEFAULT_CSP)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
