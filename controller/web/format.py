"""Pure formatting for the dashboard: relative times, numbers with units, state badges. Returns escaped HTML or
plain text as each function says; nothing here does I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

from nanofleet.protos.names import THERMAL_LEVELS

__all__ = ["STATE_LABELS", "THERMAL_ORDER", "fmt_age", "fmt_mb", "fmt_num", "iso_utc", "relative_time", "state_badge"]

STATE_LABELS = {"online": "online", "offline": "offline", "stale": "stale", "revoked": "revoked",
                "never_seen": "never seen"}
THERMAL_ORDER = THERMAL_LEVELS  # from the proto enum (protos/names.py)


def relative_time(ts_ms: int | None, now_ms: int) -> str:
    """ "12 s ago", "3 min ago", "2 h ago", "4 d ago"; "never" without a time; "in the future" for clock skew."""
    if ts_ms is None or ts_ms <= 0:
        return "never"
    delta = (now_ms - ts_ms) / 1000
    if delta < -5:
        return "in the future"
    delta = max(delta, 0.0)
    if delta < 1:
        return "just now"
    if delta < 60:
        return f"{int(delta)} s ago"
    if delta < 3600:
        return f"{int(delta // 60)} min ago"
    if delta < 86400:
        return f"{int(delta // 3600)} h ago"
    return f"{int(delta // 86400)} d ago"


def iso_utc(ts_ms: int | None) -> str:
    if ts_ms is None or ts_ms <= 0:
        return ""
    try:
        return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def fmt_num(value: float | None, unit: str = "", digits: int = 1) -> str:
    """A number with its unit, or an em dash when unknown or not finite."""
    if value is None:
        return "—"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return "—"
    if not math.isfinite(f):
        return "—"
    text = f"{f:.{digits}f}"
    return f"{text} {unit}".rstrip() if unit else text


def fmt_age(seconds: float | None) -> str:
    """A duration in its two largest units ("42 s", "2m 5s", "3h 4m", "2d 3h"); an em dash for none (0)."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    for unit, size, sub, sub_size in (("d", 86_400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s} s"  # unreachable: s >= 60 matched "m"


def fmt_mb(value: float | None) -> str:
    """Megabytes, switching to GB past 10 GB so columns stay narrow."""
    if value is None:
        return "—"
    if value >= 10_240:
        return f"{value / 1024:.1f} GB"
    return f"{int(value)} MB"


def state_badge(state: str) -> str:
    """HTML for a device state: colour by class, the word always visible (never colour alone)."""
    known = state if state in STATE_LABELS else "unknown"
    return f'<span class="badge state-{known}" data-state="{escape(state)}">{escape(state or "unknown")}</span>'
