"""Decode and validate MQTT payloads (proto3 JSON) into what the store keeps.

Telemetry is the hot path: `json_format.Parse` costs tens of microseconds a message, so a fast path checks the
parsed JSON against tables built from the Telemetry descriptor (known field names, JSON types, integer and float
ranges, enum names, nested messages, maps) and builds the row directly. It accepts only a strict subset of what
Parse accepts; anything else (nulls, numeric strings where numbers are usual, NaN, repeated names...) falls back to
Parse, which decides. So the fast path changes the speed, never the verdict (property-tested against Parse).

Exceptions: PayloadError(reason) — a rejected payload, with a short reason fit for counting.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from nanofleet.controller._devstate import TelemetryRow, availability_name, row_from_pb
from nanofleet.protos import fleet_pb2

MAX_PAYLOAD = 64 * 1024
_F32 = 3.4028234663852886e38


class PayloadError(ValueError):
    """A payload that is not a valid message for its topic; `reason` is short and stable for counting."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Slow(Exception):
    """The fast path cannot decide: let json_format.Parse judge."""


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT, _INT64, _FLOAT, _BOOL, _STR, _ENUM, _MSG, _MAP = range(8)


def _spec(field: FieldDescriptor) -> tuple[int, Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return _MAP, _spec(field.message_type.fields_by_name["value"])
        return _MSG, _table(field.message_type)
    if t in _INT_RANGES:
        lo_hi = _INT_RANGES[t]
        return (_INT64 if lo_hi[1] > 2**32 else _INT), lo_hi
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return _FLOAT, t == FieldDescriptor.TYPE_FLOAT
    if t == FieldDescriptor.TYPE_BOOL:
        return _BOOL, None
    if t == FieldDescriptor.TYPE_STRING:
        return _STR, None
    if t == FieldDescriptor.TYPE_ENUM:
        return _ENUM, ({v.name: v.number for v in field.enum_type.values}, {v.number for v in field.enum_type.values})
    return -1, None  # bytes etc.: always the slow path


def _table(desc: Descriptor) -> dict[str, tuple[str, int, Any]]:
    table: dict[str, tuple[str, int, Any]] = {}
    for f in desc.fields:
        if f.is_repeated and not (
            f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
        ):
            continue  # repeated scalars: slow path (Telemetry has none)
        kind, arg = _spec(f)
        table[f.json_name] = table[f.name] = (f.name, kind, arg)
    return table


def _value(kind: int, arg: Any, v: Any) -> Any:
    tv = type(v)
    if kind == _FLOAT:
        if (tv is float or tv is int) and (not arg or -_F32 <= v <= _F32):
            return float(v)
    elif kind == _INT:
        if tv is int and arg[0] <= v <= arg[1]:
            return v
    elif kind == _INT64:
        if tv is str and v.isascii() and v.isdigit() and len(v) < 21:
            v, tv = int(v), int
        if tv is int and arg[0] <= v <= arg[1]:
            return v
    elif kind == _BOOL:
        if tv is bool:
            return v
    elif kind == _STR:
        if tv is str:
            return v
    elif kind == _ENUM:
        if tv is str and v in arg[0]:
            return arg[0][v]
        if tv is int and v in arg[1]:
            return v
    elif kind == _MSG:
        if tv is dict:
            return _fields(arg, v)
    elif kind == _MAP:
        if tv is dict:
            vk, va = arg
            return {k: _value(vk, va, x) for k, x in v.items()}
    raise _Slow


def _fields(table: dict[str, tuple[str, int, Any]], d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in d.items():
        spec = table.get(key)
        if spec is None:
            raise _Slow
        name, kind, arg = spec
        if name in out:
            raise _Slow
        # the common scalar kinds inline (this loop is the hot path); the rest through _value
        tv = type(v)
        if kind == _FLOAT:
            if (tv is float or tv is int) and (not arg or -_F32 <= v <= _F32):
                out[name] = float(v)
                continue
            raise _Slow
        if kind == _INT64 and tv is str:
            if v.isascii() and v.isdigit() and len(v) < 21:
                v, tv = int(v), int
            else:
                raise _Slow
        if kind == _INT or kind == _INT64:
            if tv is int and arg[0] <= v <= arg[1]:
                out[name] = v
                continue
            raise _Slow
        if kind == _BOOL or kind == _STR:
            if tv is (bool if kind == _BOOL else str):
                out[name] = v
                continue
            raise _Slow
        out[name] = _value(kind, arg, v)
    return out


_TELEMETRY = _table(fleet_pb2.Telemetry.DESCRIPTOR)


def _parse_slow(payload: bytes, message: Any) -> Any:
    try:
        return json_format.Parse(payload, message)
    except json_format.ParseError as exc:
        raise PayloadError(f"schema: {str(exc)[:160]}") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise PayloadError(f"invalid json: {type(exc).__name__}") from None


def _loads(payload: bytes) -> Any:
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"payload too large (> {MAX_PAYLOAD} bytes)")
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise PayloadError("invalid json") from None


def decode_telemetry(payload: bytes, device_id: str) -> TelemetryRow:
    """Validate one Telemetry payload published on `device_id`'s topic into a row."""
    data = _loads(payload)
    if type(data) is not dict:
        raise PayloadError("not a JSON object")
    try:
        v = _fields(_TELEMETRY, data)
    except _Slow:
        row = row_from_pb(_parse_slow(payload, fleet_pb2.Telemetry()))
    else:
        temps = v.get("temperatures_c")
        tmax = v.get("temp_max_c", 0.0)
        bat = v.get("battery")
        has_bat = bool(bat and bat.get("present"))
        model = v.get("model")
        row = TelemetryRow(
            v.get("device_id", ""), v.get("bd_seq", 0), v.get("seq", 0), v.get("ts_ms", 0), v.get("replayed", False),
            v.get("cpu_percent", 0.0), v.get("load1", 0.0), v.get("ram_total_mb", 0), v.get("ram_available_mb", 0),
            tmax if (temps or tmax) else None, v.get("thermal_level", 0), v.get("throttle_ratio", 0.0),
            v.get("throttled", False), bat.get("percent", 0.0) if has_bat else None,
            bat.get("charging", False) if has_bat else None, v.get("queue_depth", 0), v.get("policy_version", 0),
            v.get("route_counts") or None,
            model.get("name", "") if model is not None else None,
            availability_name(model.get("availability", 0)) if model is not None else None,
        )
    return _check_telemetry(row, device_id)


def _check_telemetry(row: TelemetryRow, device_id: str) -> TelemetryRow:
    if row.device_id != device_id:
        if row.device_id:
            raise PayloadError("device_id does not match the topic")
        row = row._replace(device_id=device_id)
    if row.seq > 255:
        raise PayloadError("seq out of range 0..255")
    if row.ts_ms <= 0:
        raise PayloadError("ts_ms missing")
    return row


def decode_status(payload: bytes, fleet: str, device_id: str) -> fleet_pb2.DeviceStatus:
    if type(_loads(payload)) is not dict:
        raise PayloadError("not a JSON object")
    s = _parse_slow(payload, fleet_pb2.DeviceStatus())
    if (s.device_id and s.device_id != device_id) or (s.fleet and s.fleet != fleet):
        raise PayloadError("device_id or fleet does not match the topic")
    s.device_id, s.fleet = device_id, fleet
    return s


def decode_result(payload: bytes, device_id: str) -> fleet_pb2.CommandResult:
    if type(_loads(payload)) is not dict:
        raise PayloadError("not a JSON object")
    r = _parse_slow(payload, fleet_pb2.CommandResult())
    if r.device_id and r.device_id != device_id:
        raise PayloadError("device_id does not match the topic")
    if not r.id:
        raise PayloadError("command result without id")
    r.device_id = device_id
    return r
