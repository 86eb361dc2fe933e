"""Read models of the controller store: what the dashboard, the REST API and the CLI show.

Frozen dataclasses so a view handed to another thread can never change under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DeviceState = Literal["online", "offline", "stale"]


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
    queue_depth: int
    route_counts: dict[str, int] = field(default_factory=dict)
    rejected_count: int = 0
    gap_count: int = 0
    telemetry_interval_s: float = 10.0


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
