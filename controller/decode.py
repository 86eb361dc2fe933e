"""Decode and validate MQTT payloads (proto3 JSON) into what the store keeps.

Telemetry is the hot path: `json_format.Parse` costs ~120 µs a message here, the whole ingest budget is ~50. So a
fast path decodes with msgspec into Structs generated from the Telemetry descriptor (JSON field names, JSON types,
enum names and numbers, float32 and integer ranges, nested messages, maps; unknown fields refused) and builds the
row directly. It accepts a strict subset of what Parse accepts — no snake_case names, nulls, numeric strings for
floats, NaN — and anything it refuses goes to Parse, which decides. So the fast path changes the speed, never the
verdict (property-tested against Parse). One known difference: a key given twice in one object keeps its last
value here, where Parse refuses the payload (as Python's json module, most JSON parsers take the last).

Exceptions: PayloadError(reason) (errors.py) — a rejected payload, with a short reason fit for counting.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, cast

import msgspec
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from nanofleet.controller.devstate import TelemetryRow, availability_name, model_report, row_from_pb, tokens_rate
from nanofleet.controller.errors import PayloadError
from nanofleet.protos import fleet_pb2

MAX_PAYLOAD = 64 * 1024
_F32 = 3.4028234663852886e38


class _Slow(Exception):
    """The fast path cannot decide: let json_format.Parse judge."""


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT32 = msgspec.Meta(ge=-_F32, le=_F32)


def _message_type(f: FieldDescriptor) -> Descriptor:
    """The message type of a TYPE_MESSAGE field (protobuf types it Optional: it is None only for scalars)."""
    assert f.message_type is not None, f.full_name
    return f.message_type


class _Message:
    """A msgspec Struct for one message type, plus what msgspec cannot check: integers given as JSON strings
    (proto3 JSON writes 64-bit ones that way) and their ranges, enum names, nested messages and maps."""

    def __init__(self, desc: Descriptor) -> None:
        fields: list[tuple[str, Any, Any]] = []
        self.ints: list[tuple[str, int, int]] = []
        self.enums: list[tuple[str, dict[str, int]]] = []
        self.messages: list[tuple[str, _Message]] = []
        self.int_maps: list[tuple[str, int, int]] = []
        for f in desc.fields:
            kind = self._type(f)
            if kind is not None:
                fields.append((f.name, kind, _default(f)))
        self.struct = msgspec.defstruct(
            f"_{desc.name}", fields, rename={f.name: f.json_name for f in desc.fields},
            forbid_unknown_fields=True, kw_only=True,
        )
        self.decoder = msgspec.json.Decoder(self.struct)
        self.check = self._compile()

    def _type(self, f: FieldDescriptor) -> Any:
        """The JSON shape msgspec checks for `f`; None leaves the field out (unknown: goes to Parse)."""
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            entry = _message_type(f)
            if entry.GetOptions().map_entry:
                value = entry.fields_by_name["value"]
                if value.type in _INT_RANGES:
                    self.int_maps.append((f.name, *_INT_RANGES[value.type]))
                    return dict[str, int | str]
                scalar = self._scalar(value, None)
                return None if scalar is None else dict[str, scalar]  # type: ignore[valid-type]
            if f.is_repeated:
                return None
            inner = _Message(entry)
            self.messages.append((f.name, inner))
            return inner.struct
        if f.is_repeated:
            return None
        return self._scalar(f, f.name)

    def _scalar(self, f: FieldDescriptor, name: str | None) -> Any:
        t = f.type
        if t in _INT_RANGES:
            if name is not None:
                self.ints.append((name, *_INT_RANGES[t]))
            return int | str
        if t == FieldDescriptor.TYPE_FLOAT:
            return Annotated[float, _FLOAT32]
        if t == FieldDescriptor.TYPE_DOUBLE:
            return float
        if t == FieldDescriptor.TYPE_BOOL:
            return bool
        if t == FieldDescriptor.TYPE_STRING:
            return str
        if t == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type is not None, f.full_name  # set for every TYPE_ENUM field
            names = {v.name: v.number for v in f.enum_type.values}
            if name is None:
                return None
            self.enums.append((name, names))
            return Literal[tuple(names)] | Literal[tuple(set(names.values()))]
        return None  # bytes: Parse


        self.check = self._compile()

    def _compile(self) -> Any:
        """`check(value)`: finish in place what msgspec cannot check; _Slow when Parse must judge. Generated
        straight-line code (as dataclasses does): a loop over the fields costs more than msgspec's whole decode."""
        lines = ["def check(t):"]
        for name, lo, hi in self.ints:
            lines += [f"    v = t.{name}", f"    if v.__class__ is str: t.{name} = v = _int(v)",
                      f"    if not {lo} <= v <= {hi}: raise _Slow"]
        for i, (name, _) in enumerate(self.enums):
            lines += [f"    v = t.{name}", f"    if v.__class__ is str: t.{name} = enum{i}[v]"]
        for i, (name, _) in enumerate(self.messages):
            lines += [f"    if t.{name} is not None: message{i}(t.{name})"]
        for name, lo, hi in self.int_maps:
            lines += [f"    m = t.{name}", "    for k, v in m.items():",
                      "        if v.__class__ is str: m[k] = v = _int(v)",
                      f"        if not {lo} <= v <= {hi}: raise _Slow"]
        lines.append("    return t")
        scope: dict[str, Any] = {"_int": _int, "_Slow": _Slow}
        scope.update({f"enum{i}": numbers for i, (_, numbers) in enumerate(self.enums)})
        scope.update({f"message{i}": inner.check for i, (_, inner) in enumerate(self.messages)})
        exec("\n".join(lines), scope)  # names and numbers come from our own descriptor
        return scope["check"]


def _default(f: FieldDescriptor) -> Any:
    """proto3's absent value; messages are None (an explicit null is refused: Parse decides that one)."""
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return msgspec.field(default_factory=dict) if _message_type(f).GetOptions().map_entry else None
    if f.type in _INT_RANGES or f.type == FieldDescriptor.TYPE_ENUM:
        return 0
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 0.0
    return {FieldDescriptor.TYPE_BOOL: False, FieldDescriptor.TYPE_STRING: ""}.get(f.type, b"")


def _int(v: str) -> int:
    # what Parse takes as an integer string, narrowed: ASCII digits only (no sign, spaces or exponent)
    if v.isascii() and v.isdigit() and len(v) < 21:
        return int(v)
    raise _Slow


# the generated stubs type DESCRIPTOR as the upb Descriptor too, which has the same API as the Python one
_TELEMETRY = _Message(cast(Descriptor, fleet_pb2.Telemetry.DESCRIPTOR))


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
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"payload too large (> {MAX_PAYLOAD} bytes)")
    try:
        t = _TELEMETRY.check(_TELEMETRY.decoder.decode(payload))
    except (msgspec.DecodeError, _Slow):  # ValidationError is a DecodeError
        if type(_loads(payload)) is not dict:
            raise PayloadError("not a JSON object") from None
        row = row_from_pb(_parse_slow(payload, fleet_pb2.Telemetry()))
    else:
        bat, model = t.battery, t.model
        has_bat = bat is not None and bat.present
        row = TelemetryRow(
            t.device_id, t.bd_seq, t.seq, t.ts_ms, t.replayed, t.cpu_percent, t.load1, t.ram_total_mb,
            t.ram_available_mb, t.temp_max_c if (t.temperatures_c or t.temp_max_c) else None, t.thermal_level,
            t.throttle_ratio, t.throttled, bat.percent if has_bat else None, bat.charging if has_bat else None,
            t.queue_depth, t.policy_version, t.route_counts or None,
            model.name if model is not None else None,
            availability_name(model.availability) if model is not None else None,
            t.slots_waiting, t.queue_oldest_age_s, t.queue_counters or None,
            tokens_rate(model.tokens_per_s) if model is not None else None,
            model_report(model) if model is not None else None,
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
