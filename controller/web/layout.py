"""The page shell's environment: Jinja2 templates (autoescape on) from the packaged `templates/` folder, the inline
CSS and refresh script, and the per-response CSP nonce they run under.

Assets are inlined rather than served so the login page needs no unauthenticated route besides itself, and the
Content-Security-Policy can forbid everything else (no external fetches, no inline handlers, no framing).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from importlib import resources
from typing import Any

import jinja2
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from .alerts import device_alerts
from .charts import meter
from .format import THERMAL_ORDER, fmt_age, fmt_mb, fmt_num, iso_utc, relative_time
from .pages import device_url, thermal_warn

ALERT_LABELS = {"offline": "offline", "thermal": "hot", "low_ram": "low RAM", "queue_depth": "queue"}
__all__ = ["ALERT_LABELS", "TEMPLATES", "content_security_policy", "new_nonce", "render_block"]

_PACKAGE = resources.files("nanofleet.controller.web")
_STATIC = _PACKAGE / "static"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("nanofleet.controller.web", "templates"),
        autoescape=True,  # every template, whatever its name: nothing from a device or an operator goes out raw
        undefined=jinja2.StrictUndefined,  # a misspelt variable is a bug, not an empty cell
        trim_blocks=True, lstrip_blocks=True,
    )
    # Our own packaged files, not data: safe to inline as they are (CSS selectors use ">", which escaping breaks).
    env.globals["css"] = Markup((_STATIC / "style.css").read_text(encoding="utf-8"))
    env.globals["js"] = Markup((_STATIC / "refresh.js").read_text(encoding="utf-8"))
    env.globals.update(
        fmt_num=fmt_num, fmt_mb=fmt_mb, fmt_age=fmt_age, iso_utc=iso_utc, relative_time=relative_time,
        device_url=device_url, thermal_warn=thermal_warn, device_alerts=device_alerts, ALERT_LABELS=ALERT_LABELS,
        thermal_levels=THERMAL_ORDER,
        meter=lambda value, total: Markup(meter(value, total)),  # charts.meter: numbers only, no text
    )
    return env


TEMPLATES = Jinja2Templates(env=_environment())


def render_block(name: str, block: str, variables: Mapping[str, Any]) -> str:
    """Only `block` of template `name` (the dashboard's fragment refresh swaps `#content`'s inside)."""
    template = TEMPLATES.env.get_template(name)
    return "".join(template.blocks[block](template.new_context(dict(variables))))


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


def content_security_policy(nonce: str) -> str:
    return (
        "default-src 'none'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
