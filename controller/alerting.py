"""Alert rules and the alert life cycle, as pure functions: facts + thresholds + now → conditions; conditions + the
open alerts → transitions. No I/O: controller/alerts_engine.py reads the facts (in SQL, so only devices already past
a threshold reach Python), and writes the transitions through the store's one writer.

Kinds (thresholds from fleet.yaml `alerts:`, nanofleet.config.Alerts):

    offline        not online and last seen more than `offline_after_s` ago
    stale          online-turned-stale (silent past 2.5 x its telemetry interval), not yet `offline_after_s`
    thermal        thermal level at or above `thermal_at`
    low_ram        RAM available below `min_free_ram_mb` (0 MB is "no telemetry yet", not a reading)
    queue_depth    the offline queue (not the slot waiters) holds `queue_depth` requests or more
    policy_behind  applied policy version differs from the published one for more than `policy_behind_s`
    budget         cloud tokens used today at or above `budget_pct` % of the budget: per device (its routing
                   `cloud_budget.tokens_per_day`) and fleet-wide (device_id '', `gateway.budgets.fleet_tokens_per_day`)
    rejections     payloads from the device (or '' when the topic named none) rejected within `rejections_window_s`

Life cycle: raised → acknowledged (who, note) → cleared; raised → cleared. One open (raised or acknowledged) alert
per (device, kind) at most; a condition that comes back after its alert cleared is a new alert. A round evaluates
some kinds (`kinds`): only open alerts of those kinds can be cleared by it, so a kind evaluated less often (budget)
is never cleared by a round that did not look at it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from nanofleet.config import Alerts
from nanofleet.protos.names import THERMAL_LEVELS

__all__ = ["ALERT_KINDS", "DEVICE_KINDS", "AlertKind", "AlertState", "Condition", "DeviceFacts", "OpenAlert",
           "Transitions", "budget_conditions", "device_conditions", "rejection_conditions", "transitions"]

AlertKind = Literal["offline", "stale", "thermal", "low_ram", "queue_depth", "policy_behind", "budget", "rejections"]
AlertState = Literal["raised", "acknowledged", "cleared"]
ALERT_KINDS: tuple[AlertKind, ...] = ("offline", "stale", "thermal", "low_ram", "queue_depth", "policy_behind",
                                      "budget", "rejections")
DEVICE_KINDS: tuple[AlertKind, ...] = ("offline", "stale", "thermal", "low_ram", "queue_depth", "policy_behind")


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the device rules read of one device (a row of the engine's query)."""

    device_id: str
    state: str
    last_seen_ms: int
    thermal_level: int  # ThermalLevel value: index into THERMAL_LEVELS
    ram_available_mb: int
    queue_depth: int
    policy_version: int
    published_version: int | None = None
    published_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Condition:
    """A threshold crossed now: what an alert is raised for."""

    device_id: str  # '' for fleet-wide
    kind: AlertKind
    detail: str  # for a person: the value and the threshold it crossed
    value: float
    threshold: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_id, self.kind)


@dataclass(frozen=True, slots=True)
class OpenAlert:
    id: int
    device_id: str
    kind: str
    state: AlertState

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_id, self.kind)


@dataclass(slots=True)
class Transitions:
    raise_: list[Condition] = field(default_factory=list)
    clear: list[int] = field(default_factory=list)  # alert ids

    def __bool__(self) -> bool:
        return bool(self.raise_ or self.clear)


def device_conditions(d: DeviceFacts, t: Alerts, now_ms: int) -> list[Condition]:
    """The device rules over one device's facts, in ALERT_KINDS order."""
    out: list[Condition] = []
    did = d.device_id
    silent_s = max(0.0, (now_ms - d.last_seen_ms) / 1000)
    if d.state in ("offline", "stale") and silent_s > t.offline_after_s:  # not revoked, not never_seen
        out.append(Condition(did, "offline", f"{d.state}, last seen {silent_s:.0f} s ago (alert after "
                                             f"{t.offline_after_s:g} s)", round(silent_s, 1), t.offline_after_s))
    elif d.state == "stale":
        out.append(Condition(did, "stale", f"stale: no telemetry for {silent_s:.0f} s", round(silent_s, 1),
                             t.offline_after_s))
    at = THERMAL_LEVELS.index(t.thermal_at)
    if d.thermal_level >= at:
        name = THERMAL_LEVELS[d.thermal_level] if d.thermal_level < len(THERMAL_LEVELS) else str(d.thermal_level)
        out.append(Condition(did, "thermal", f"thermal level {name} (alert at {t.thermal_at})", d.thermal_level, at))
    if 0 < d.ram_available_mb < t.min_free_ram_mb:
        out.append(Condition(did, "low_ram", f"{d.ram_available_mb} MB RAM available (alert below "
                                             f"{t.min_free_ram_mb} MB)", d.ram_available_mb, t.min_free_ram_mb))
    if d.queue_depth >= t.queue_depth:
        out.append(Condition(did, "queue_depth", f"{d.queue_depth} requests in the offline queue (alert at "
                                                 f"{t.queue_depth})", d.queue_depth, t.queue_depth))
    if (d.published_version is not None and d.published_ms is not None and d.policy_version != d.published_version
            and d.state not in ("revoked", "never_seen")  # neither can apply a policy: not behind, not reachable
            and (behind_s := (now_ms - d.published_ms) / 1000) > t.policy_behind_s):
        out.append(Condition(did, "policy_behind", f"applies policy v{d.policy_version}, v{d.published_version} "
                                                   f"published {behind_s:.0f} s ago (alert after "
                                                   f"{t.policy_behind_s:g} s)", round(behind_s, 1),
                             t.policy_behind_s))
    return out


def budget_conditions(used_by_device: Mapping[str, int], budget_of: Mapping[str, int | None],
                      fleet_budget: int | None, pct: float) -> list[Condition]:
    """Cloud tokens used today against each device's budget (`budget_of`, None or 0: no budget) and the fleet's."""
    out = []
    for did, used in sorted(used_by_device.items()):
        budget = budget_of.get(did)
        if budget and used * 100 >= pct * budget:
            out.append(Condition(did, "budget", f"{used} of {budget} cloud tokens today ({100 * used / budget:.0f} "
                                                f"%, alert at {pct:g} %)", used, budget))
    total = sum(used_by_device.values())
    if fleet_budget and total * 100 >= pct * fleet_budget:
        out.append(Condition("", "budget", f"fleet: {total} of {fleet_budget} cloud tokens today "
                                           f"({100 * total / fleet_budget:.0f} %, alert at {pct:g} %)",
                             total, fleet_budget))
    return out


def rejection_conditions(rows: Iterable[tuple[str, int, int]], window_s: float) -> list[Condition]:
    """(device_id, payloads rejected within the window, their reasons) → one condition per device."""
    return [Condition(did, "rejections", f"{count} payload(s) rejected in the last {window_s:g} s "
                                         f"({reasons} reason(s); see the rejections list)", count, window_s)
            for did, count, reasons in sorted(rows) if count > 0]


def transitions(conditions: Iterable[Condition], open_alerts: Iterable[OpenAlert],
                kinds: Collection[str]) -> Transitions:
    """Raise what holds and has no open alert; clear the open alerts of `kinds` whose condition is gone.

    An acknowledged alert whose condition still holds is left as it is (acknowledged until it clears)."""
    now = {c.key: c for c in conditions if c.kind in kinds}
    out = Transitions()
    open_keys = set()
    for alert in open_alerts:
        if alert.state == "cleared":
            continue
        open_keys.add(alert.key)
        if alert.kind in kinds and alert.key not in now:
            out.clear.append(alert.id)
    out.raise_ = [c for key, c in sorted(now.items()) if key not in open_keys]
    return out
