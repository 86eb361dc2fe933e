"""The page shell: header, inline CSS and the refresh script under a per-response CSP nonce.

Assets are inlined rather than served so the login page needs no unauthenticated route besides itself, and the
Content-Security-Policy can forbid everything else (no external fetches, no inline handlers, no framing).
"""

from __future__ import annotations

import secrets
from html import escape
from importlib import resources

__all__ = ["content_security_policy", "new_nonce", "page"]

_STATIC = resources.files("nanofleet.controller.web") / "static"
_CSS = (_STATIC / "style.css").read_text(encoding="utf-8")
_JS = (_STATIC / "refresh.js").read_text(encoding="utf-8")


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def content_security_policy(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def page(*, title: str, content: str, nonce: str, fleet: str, csrf: str | None = None,
         refresh_s: int | None = None) -> str:
    """A full HTML page around `content` (already-escaped HTML). `csrf` set = logged in (shows nav + logout)."""
    nav = ""
    if csrf is not None:
        nav = (
            '<nav><a href="/">Fleet</a><a href="/api">API</a></nav>'
            '<form method="post" action="/logout">'
            f'<input type="hidden" name="csrf" value="{escape(csrf)}"><button type="submit">Log out</button></form>'
        )
    refresh_attr = f' data-refresh="{int(refresh_s)}"' if refresh_s else ""
    noscript = f'<noscript><meta http-equiv="refresh" content="{int(refresh_s) + 2}"></noscript>' if refresh_s else ""
    return (
        "<!doctype html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="referrer" content="same-origin"><link rel="icon" href="data:,">{noscript}'
        f"<title>{escape(title)} · nanofleet</title>"
        f'<style nonce="{nonce}">{_CSS}</style></head><body>'
        '<header class="top"><a class="brand" href="/">nanofleet</a>'
        f'<span class="muted">fleet {escape(fleet)}</span>{nav}</header>'
        '<p id="conn-lost" class="flash error" role="alert">Lost contact with the controller; '
        "figures below may be out of date. Retrying…</p>"
        f'<main id="content"{refresh_attr}>{content}</main>'
        f'<script nonce="{nonce}">{_JS}</script>'
        "</body></html>"
    )
