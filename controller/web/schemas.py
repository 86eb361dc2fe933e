"""JSON shapes of the REST API (they document themselves in /openapi.json). Built from the store's frozen view
dataclasses by attribute, so a field the store adds later is simply not exposed until it is listed here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nanofleet.protos.names import CommandKind

__all__ = [
    "MAX_TS_MS",
    "AlertOut",
    "CommandIn",
    "CommandOut",
    "ConvergenceOut",
    "DeviceOut",
    "DevicePageOut",
    "ErrorOut",
    "PolicyLag",
    "RejectionOut",
    "TelemetryOut",
    "TelemetryPointOut",
    "UsageOut",
    "UsageRowOut",
]


# The last millisecond of year 9999: every timestamp the store holds is below it, and it fits SQLite's INTEGER.
MAX_TS_MS = 253_402_300_799_999


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    """Every error answer of the controller (docs/rest-api.md lists the codes)."""

    error: str = Field(description="machine-readable code, e.g. missing_token, device_not_found, invalid_request")
    detail: str = Field(description="what went wrong, for a person; names the field at fault")


class DeviceOut(_Out):
    device_id: str
    fleet: str
    group: str | None = None
    state: Literal["online", "offline", "stale", "revoked", "never_seen"]
    last_seen_ms: int | None = None
    birth_ms: int | None = None
    bd_seq: int | None = None
    agent_version: str | None = None
    model_name: str | None = None
    model_availability: str | None = None
    policy_version: int | None = None
    cpu_percent: float | None = None
    ram_total_mb: int | None = None
    ram_available_mb: int | None = None
    temp_max_c: float | None = None
    thermal_level: str | None = None
    throttled: bool | None = None
    battery_pct: float | None = None
    charging: bool | None = None
    queue_depth: int | None = Field(None, description="the offline queue's entries not finished (queued + running)")
    slots_waiting: int | None = Field(None, description="requests waiting for a local model slot now (not the "
                                                        "offline queue)")
    queue_oldest_age_s: float | None = Field(None, description="age of the oldest queued entry, seconds (0: none)")
    queue_counters: dict[str, int] = Field({}, description="the offline queue's counters since the agent started: "
                                                           "enqueued, drained_local, drained_cloud, expired, failed, "
                                                           "cancelled …")
    route_counts: dict[str, int] = {}
    rejected_count: int = 0
    gap_count: int = 0


class DevicePageOut(BaseModel):
    """A page of `GET /api/devices`."""

    items: list[DeviceOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")
    total: int = Field(description="devices matching the filter, on all pages, counted up to 1000")
    total_capped: bool = Field(False, description="true: 1000 or more devices match (total says 1000)")


class AlertOut(_Out):
    device_id: str
    kind: Literal["offline", "thermal", "low_ram", "queue_depth"] = Field(
        description="which fleet.yaml `alerts` threshold the device crossed")
    detail: str = Field(description="the value and the threshold, for a person")
    value: float
    threshold: float


class TelemetryPointOut(_Out):
    ts_ms: int
    n: int | None = Field(None, description="samples in the bucket (rollups only)")
    cpu_percent: float | None = None
    cpu_max: float | None = Field(None, description="rollups only")
    ram_available_mb: float | None = None
    temp_max_c: float | None = None
    temp_avg_c: float | None = Field(None, description="rollups only")
    thermal_level: str | None = None
    throttle_ratio: float | None = None
    queue_depth: int | None = None
    slots_waiting: int | None = None
    queue_oldest_age_s: float | None = None
    battery_pct: float | None = None


class TelemetryOut(BaseModel):
    device_id: str
    resolution: Literal["raw", "1m", "1h"]
    since_ms: int | None
    points: list[TelemetryPointOut]


class ConvergenceVersion(BaseModel):
    version: int
    devices: int


class PolicyLag(BaseModel):
    device_id: str
    applied: int
    published: int


class ConvergenceOut(BaseModel):
    latest: int | None = Field(description="highest policy version any device reports")
    converged: int = Field(description="devices running `latest`")
    total: int
    versions: list[ConvergenceVersion] = Field(description="highest version first")
    behind: list[PolicyLag] = Field([], description="devices whose applied version differs from the one published "
                                                    "for them (empty when the controller has published nothing)")


class RejectionOut(_Out):
    device_id: str | None = None
    topic: str
    reason: str
    count: int
    last_ms: int


class UsageRowOut(_Out):
    day: str
    device_id: str
    app_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageOut(BaseModel):
    day: str | None
    rows: list[UsageRowOut]
    total_tokens: int
    total_cost_usd: float


class CommandIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # a public API takes JSON types as they are
    kind: CommandKind
    args: dict[str, str] = {}


class CommandOut(BaseModel):
    device_id: str
    kind: str
    id: str = Field("", description="command id, as on the MQTT cmd topic")
    status: str = Field(description="the device's final answer: ok | error")
    message: str = ""
    data: dict[str, str] = {}
    elapsed_ms: float | None = Field(None, description="publish to result")
