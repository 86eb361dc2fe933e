"""Read models of the controller store: what the dashboard, the REST API and the CLI show.

Frozen dataclasses so a view handed to another thread can never change under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DeviceState = Literal["online", "offline", "stale", "revoked", "never_seen"]
# every state, in the order the dashboard shows them: never_seen is a fleet.yaml device with no message yet,
# revoked one taken back by `nanofleet revoke` (its messages are rejected)
DEVICE_STATES: tuple[DeviceState, ...] = ("online", "offline", "stale", "revoked", "never_seen")


@dataclass(frozen=True, slots=True)
class DeviceView:
    device_id: str
    fleet: str
    group: str | None
    state: DeviceState
    last_seen_ms: int
    birth_ms: int
    bd_seq: int
    agent_version: str
    model_name: str
    model_availability: str  # "unspecified" | "unavailable" | "downloadable" | "downloading" | "available"
    policy_version: int
    cpu_percent: float
    ram_total_mb: int
    ram_available_mb: int
    temp_max_c: float | None
    thermal_level: str  # "none" .. "shutdown"
    throttled: bool
    battery_pct: float | None
    charging: bool | None
    queue_depth: int  # the offline queue's entries not finished (queued + running)
    route_counts: dict[str, int] = field(default_factory=dict)
    rejected_count: int = 0
    gap_count: int = 0
    telemetry_interval_s: float = 10.0
    slots_waiting: int = 0  # requests waiting for a local model slot now (not the offline queue)
    queue_oldest_age_s: float = 0.0  # age of the oldest queued entry (0: none)
    queue_counters: dict[str, int] = field(default_factory=dict)  # since the agent started: enqueued, drained_local…


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    ts_ms: int
    cpu_percent: float
    ram_available_mb: int
    temp_max_c: float | None
    thermal_level: str
    throttle_ratio: float
    queue_depth: int
    battery_pct: float | None
    slots_waiting: int = 0
    queue_oldest_age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RollupPoint:
    ts_ms: int  # bucket start
    n: int
    cpu_avg: float
    cpu_max: float
    temp_avg: float | None
    temp_max: float | None
    ram_available_min: int


@dataclass(frozen=True, slots=True)
class Rejection:
    device_id: str | None
    topic: str
    reason: str
    count: int
    last_ms: int


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A state change of a device (online/offline/stale), with why."""

    device_id: str
    ts_ms: int
    state: DeviceState
    reason: str
    bd_seq: int


@dataclass(frozen=True, slots=True)
class PublishedPolicy:
    device_id: str
    version: int
    content_hash: str
    policy_json: str
    published_ms: int
