"""The alert rules applied to one device view, for flags on a page (a device row's "Alerts" cell): the same rules the
controller's alert engine stores alerts by (controller/alerting.py `device_conditions`), so a page never judges a
device differently. The alerts themselves — raised, acknowledged, cleared, with history — are the engine's
(controller/alerts_engine.py), read through `GET /api/alerts` and the Alerts page.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nanofleet.config import Alerts
from nanofleet.controller.alerting import ALERT_KINDS, Condition, DeviceFacts, device_conditions

from .format import THERMAL_ORDER

__all__ = ["ALERT_KINDS", "DeviceAlert", "device_alerts", "fleet_alerts"]

DeviceAlert = Condition  # the name pages and tests used before the engine stored alerts


def device_alerts(d: Any, alerts: Alerts, now_ms: int) -> list[Condition]:
    """The device rules over one device view (its published policy is not in a view: no policy_behind here; a
    stale device shows as such in its state, so it gets no `stale` flag)."""
    level = getattr(d, "thermal_level", None)
    facts = DeviceFacts(
        device_id=str(getattr(d, "device_id", "")), state=str(getattr(d, "state", "")),
        last_seen_ms=int(getattr(d, "last_seen_ms", 0) or 0),
        thermal_level=THERMAL_ORDER.index(level) if level in THERMAL_ORDER else 0,
        ram_available_mb=int(getattr(d, "ram_available_mb", 0) or 0),
        queue_depth=int(getattr(d, "queue_depth", 0) or 0), policy_version=int(getattr(d, "policy_version", 0) or 0))
    # `stale` is already the row's state badge: the flags name thresholds crossed
    return [c for c in device_conditions(facts, alerts, now_ms) if c.kind != "stale"]


def fleet_alerts(devices: Iterable[Any], alerts: Alerts, now_ms: int) -> list[Condition]:
    """Every device's flags, by device id then kind (read-time: for a page's flags, not the stored alerts)."""
    return [a for d in sorted(devices, key=lambda d: str(getattr(d, "device_id", "")))
            for a in device_alerts(d, alerts, now_ms)]
