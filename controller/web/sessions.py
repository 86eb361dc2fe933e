"""Browser sessions: signed, expiring cookies and the CSRF token tied to each one.

A cookie is ``v1.<expires_ms>.<session_id>.<mac>`` where ``mac = HMAC-SHA256(secret, "v1.<expires_ms>.<session_id>")``
(the default operator), or ``v2.<expires_ms>.<session_id>.<name>.<mac>`` for a named operator (controller/auth.py).
It carries nothing secret, so signing (not encryption) is enough. The CSRF token is a second HMAC of the session
id: forms carry it and POSTs authenticated by cookie must echo it (the cookie is also SameSite=Strict; this is the
belt to those braces). Logged-out sessions go on a revocation list until they would have expired anyway.
Pure apart from the clock, which every method takes as an argument.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass

__all__ = ["Session", "SessionSigner"]

_VERSION = "v1"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class Session:
    session_id: str
    expires_ms: int
    name: str = "operator"  # the operator who logged in (a named operator's cookie is v2 and carries it, signed)


class SessionSigner:
    """Issues, checks and revokes session cookies with one secret (random per process unless given)."""

    def __init__(self, secret: bytes | None = None, *, ttl_s: float = 12 * 3600) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        if len(self._secret) < 16:
            raise ValueError("session secret must be at least 16 bytes")
        self.ttl_ms = int(ttl_s * 1000)
        self._revoked: dict[str, int] = {}  # session id -> expiry, pruned as they lapse
        self._lock = threading.Lock()

    def _mac(self, purpose: str, message: str) -> str:
        return _b64(hmac.new(self._secret, f"{purpose}\x00{message}".encode(), hashlib.sha256).digest())

    def issue(self, now_ms: int, name: str = "operator") -> tuple[str, Session]:
        """A cookie for `name`: v1 for the default operator (unchanged), v2 with the name for a named one (names are
        checked by controller/auth.py: no dots)."""
        session = Session(_b64(secrets.token_bytes(18)), now_ms + self.ttl_ms, name)
        if name == "operator":
            body = f"{_VERSION}.{session.expires_ms}.{session.session_id}"
        else:
            body = f"v2.{session.expires_ms}.{session.session_id}.{name}"
        return f"{body}.{self._mac('cookie', body)}", session

    def check(self, cookie: str | None, now_ms: int) -> Session | None:
        """The session a cookie proves, or None (malformed, forged, expired or logged out)."""
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if not ((len(parts) == 4 and parts[0] == _VERSION) or (len(parts) == 5 and parts[0] == "v2")) or \
                not parts[1].isdigit():
            return None
        body = ".".join(parts[:-1])
        if not hmac.compare_digest(self._mac("cookie", body).encode(), parts[-1].encode()):
            return None
        session = Session(parts[2], int(parts[1]), parts[3] if len(parts) == 5 else "operator")
        if session.expires_ms <= now_ms:
            return None
        with self._lock:
            if session.session_id in self._revoked:
                return None
        return session

    def revoke(self, session: Session, now_ms: int) -> None:
        with self._lock:
            self._revoked = {sid: exp for sid, exp in self._revoked.items() if exp > now_ms}
            self._revoked[session.session_id] = session.expires_ms

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.session_id)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(self.csrf_token(session).encode(), token.encode("utf-8", "replace"))
