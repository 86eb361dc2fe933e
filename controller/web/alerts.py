"""Fleet alerts from fleet.yaml's `alerts` thresholds, computed from each device's latest stored state at read time
(no alert table: the thresholds and the state are the whole truth, so a changed threshold applies at once).

    offline      the device is not online (offline or stale) and was last seen more than `offline_after_s` ago
    thermal      its thermal level is at or above `thermal_at`
    low_ram      RAM available below `min_free_ram_mb` (0 MB is "no telemetry yet", not a reading: no alert)
    queue_depth  its offline queue (the real queue, not requests waiting for a slot) holds `queue_depth` or more

Shared by the dashboard (the overview's "Alerts" column) and `GET /api/alerts`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from nanofleet.config import Alerts

from .format import THERMAL_ORDER

__all__ = ["ALERT_KINDS", "DeviceAlert", "device_alerts", "fleet_alerts"]

AlertKind = Literal["offline", "thermal", "low_ram", "queue_depth"]
ALERT_KINDS: tuple[AlertKind, ...] = ("offline", "thermal", "low_ram", "queue_depth")


@dataclass(frozen=True, slots=True)
class DeviceAlert:
    device_id: str
    kind: AlertKind
    detail: str  # for a person: the value and the threshold it crossed
    value: float
    threshold: float


def device_alerts(d: Any, alerts: Alerts, now_ms: int) -> list[DeviceAlert]:
    """The alerts one device view raises now, in ALERT_KINDS order."""
    did = str(getattr(d, "device_id", ""))
    out: list[DeviceAlert] = []
    state, last_seen = getattr(d, "state", None), int(getattr(d, "last_seen_ms", 0) or 0)
    silent_s = (now_ms - last_seen) / 1000
    if state != "online" and silent_s > alerts.offline_after_s:
        out.append(DeviceAlert(did, "offline", f"{state}, last seen {silent_s:.0f} s ago (alert after "
                                               f"{alerts.offline_after_s:g} s)", silent_s, alerts.offline_after_s))
    level = getattr(d, "thermal_level", None)
    if level in THERMAL_ORDER and THERMAL_ORDER.index(level) >= THERMAL_ORDER.index(alerts.thermal_at):
        out.append(DeviceAlert(did, "thermal", f"thermal level {level} (alert at {alerts.thermal_at})",
                               THERMAL_ORDER.index(level), THERMAL_ORDER.index(alerts.thermal_at)))
    avail = getattr(d, "ram_available_mb", None)
    if avail and avail < alerts.min_free_ram_mb:
        out.append(DeviceAlert(did, "low_ram", f"{avail} MB RAM available (alert below {alerts.min_free_ram_mb} MB)",
                               avail, alerts.min_free_ram_mb))
    depth = getattr(d, "queue_depth", None)
    if depth is not None and depth >= alerts.queue_depth:
        out.append(DeviceAlert(did, "queue_depth", f"{depth} requests in the offline queue (alert at "
                                                   f"{alerts.queue_depth})", depth, alerts.queue_depth))
    return out


def fleet_alerts(devices: Iterable[Any], alerts: Alerts, now_ms: int) -> list[DeviceAlert]:
    """Every device's alerts, by device id then kind."""
    return [a for d in sorted(devices, key=lambda d: str(getattr(d, "device_id", "")))
            for a in device_alerts(d, alerts, now_ms)]
