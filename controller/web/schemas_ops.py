"""JSON shapes of the alerts and audit API (docs/rest-api.md, "Alerts" and "Audit log")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nanofleet.controller.alerting import AlertKind

__all__ = ["NO_NUL", "AckIn", "AlertOut", "AlertPage", "AuditOut", "AuditPage"]

NO_NUL = r"^[^\x00]*$"  # text a store keeps: PostgreSQL text cannot hold NUL (SQLite would)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class AlertOut(_Out):
    id: int
    device_id: str = Field(description="the device; '' for a fleet-wide alert (the fleet's cloud budget)")
    kind: AlertKind = Field(description="which fleet.yaml `alerts` rule raised it")
    state: Literal["raised", "acknowledged", "cleared"]
    detail: str = Field(description="the value and the threshold when it was raised, for a person")
    value: float
    threshold: float
    raised_ms: int
    acked_ms: int | None = None
    acked_by: str | None = Field(None, description="the operator who acknowledged it")
    ack_note: str | None = None
    cleared_ms: int | None = None


class AlertPage(BaseModel):
    alerts: list[AlertOut]
    next_cursor: int | None = Field(description="pass as `cursor` for the next (older) page; null on the last")


class AckIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    note: str = Field("", max_length=1000, pattern=NO_NUL, description="why it is acknowledged, what is being done")


class AuditOut(_Out):
    id: int
    ts_ms: int
    actor: str = Field(description="who: the operator's name, 'controller', or 'cli:<user>' for a CLI command")
    action: str
    target: str = Field(description="what it acted on: a device, an alert id, a policy version")
    detail: dict[str, Any]
    source: str = Field(description="where from: the client address, or 'cli' / 'controller'")


class AuditPage(BaseModel):
    entries: list[AuditOut]
    next_cursor: int | None = Field(description="pass as `cursor` for the next (older) page; null on the last")
