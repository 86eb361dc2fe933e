"""The device state machine the store's writer runs: births, deaths, telemetry, staleness (after Sparkplug B).

- A birth (online status) with a bd_seq at least the known one makes a device online; an older one is ignored.
- A death (last will or shutdown) counts only if its bd_seq matches or passes the current birth: the will of an
  old connection arriving after the device was reborn is stale and must not mark it offline.
- Live telemetry checks seq (0..255, wrapping) against the last one: a jump is a gap; a bd_seq that is not the
  current birth's is a stale birth. Both ask the device for a rebirth (at most once per REBIRTH_EVERY_MS).
- Replayed telemetry (from a device's offline buffer) is stored; it updates the latest values only when nothing
  newer is known, and never the state, last-seen time or seq.
- A revoked device (a row in `revoked_devices`, written by `nanofleet revoke`) is `revoked`: the retained status
  the revoke publishes (offline, reason `revoked`) tells a running controller; every later message of the device is
  rejected and counted, until `nanofleet enroll` gives it new credentials (deletes the row).
- A device fleet.yaml lists that never sent anything is `never_seen` (`expect`), so the dashboard shows it.
Pure bookkeeping over an in-memory cache, written back as whole rows of `devices` at the end of each batch.
"""

from __future__ import annotations

import json
import math
import operator
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import psycopg.errors

from nanofleet.controller.views import DeviceEvent
from nanofleet.pg_db import dialect
from nanofleet.protos import fleet_pb2
from nanofleet.protos.names import thermal_name as thermal_name  # the store names levels with it

REBIRTH_EVERY_MS = 10_000
FUTURE_MS = 86_400_000  # telemetry stamped further ahead of its arrival is refused (`ts_in_future`, counted)
FUTURE = "ts_in_future"
REVOKED = "revoked"  # the state, and the reason of the retained status `nanofleet revoke` publishes
_COLUMNS = (
    "device_id", "fleet", "state", "last_seen_ms", "birth_ms", "bd_seq", "agent_version", "model_name",
    "model_availability", "policy_version", "cpu_percent", "ram_total_mb", "ram_available_mb", "temp_max_c",
    "thermal_level", "throttled", "battery_pct", "charging", "queue_depth", "route_counts", "rejected_count",
    "gap_count", "telemetry_interval_s", "status_json", "slots_waiting", "queue_oldest_age_s", "queue_counters",
    "model_report",
)
_BD_SEQ = _COLUMNS.index("bd_seq")
_encode = msgspec.json.Encoder().encode  # ~10x json.dumps on a small dict: this runs per message
_UPSERT = (f"INSERT INTO devices ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT (device_id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}")
# what telemetry and rejections change: an UPDATE of these costs ~60% of replacing the whole row (per message)
_HOT = (
    "state", "last_seen_ms", "bd_seq", "gap_count", "rejected_count", "cpu_percent", "ram_total_mb",
    "ram_available_mb", "temp_max_c", "thermal_level", "throttled", "battery_pct", "charging", "queue_depth",
    "route_counts", "policy_version", "model_name", "model_availability", "slots_waiting", "queue_oldest_age_s",
    "queue_counters", "model_report",
)
_UPDATE_HOT = f"UPDATE devices SET {', '.join(c + ' = ?' for c in _HOT)} WHERE device_id = ?"
_INSERT_NEW = (f"INSERT INTO devices ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
               "ON CONFLICT (device_id) DO NOTHING")
_HOT_STAGING = "_devices_hot"  # PostgreSQL: a session temp table the hot columns are COPY'd into, then one UPDATE
_HOT_FROM_STAGING = (f"UPDATE devices d SET {', '.join(f'{c} = h.{c}' for c in _HOT)} FROM {_HOT_STAGING} h "
                     "WHERE d.device_id = h.device_id")
_LOCK = f"SELECT {', '.join(_COLUMNS)} FROM devices WHERE device_id = ANY(?) ORDER BY device_id FOR UPDATE"


class DeviceRace(psycopg.errors.SerializationFailure):
    """PostgreSQL: another controller stored a device this batch took for new; PgWriter runs the job again, which
    then finds (and locks) the row."""


def model_report(m: Any) -> str | None:
    """A ModelState's rollout figures (a proto message or decode.py's Struct: same field names) as compact JSON for
    the `devices.model_report` column (controller/rollouts.py reads it); None when it reports no update yet."""
    if not m.sha256 and not m.update_state:
        return None
    return _encode({"sha": m.sha256, "state": m.update_state, "usha": m.update_sha256, "why": m.update_reason,
                    "prev": m.previous_sha256, "req": m.requests, "err": m.errors, "p95": m.p95_latency_ms,
                    "tps": m.tokens_per_s}).decode()


def availability_name(value: int) -> str:
    try:
        return fleet_pb2.ModelAvailability.Name(value).removeprefix("MODEL_AVAILABILITY_").lower()
    except ValueError:
        return "unspecified"


class TelemetryRow(NamedTuple):
    """One validated Telemetry message, flattened to what the store keeps."""

    device_id: str
    bd_seq: int
    seq: int
    ts_ms: int
    replayed: bool = False
    cpu_percent: float = 0.0
    load1: float = 0.0
    ram_total_mb: int = 0
    ram_available_mb: int = 0
    temp_max_c: float | None = None
    thermal_level: int = 0
    throttle_ratio: float = 1.0
    throttled: bool = False
    battery_pct: float | None = None
    charging: bool | None = None
    queue_depth: int = 0
    policy_version: int = 0
    route_counts: dict[str, int] | None = None
    model_name: str | None = None
    model_availability: str | None = None
    slots_waiting: int = 0  # requests waiting for a local model slot (queue_depth is the offline queue)
    queue_oldest_age_s: float = 0.0
    queue_counters: dict[str, int] | None = None
    tokens_per_s: float | None = None  # model.tokens_per_s; None: no generation measured recently (see tokens_rate)
    model_report: str | None = None  # model_report(): the model's sha256, update outcome and gate figures


def tokens_rate(value: float) -> float | None:
    """The agent's recent generation speed as stored: it reports 0 when nothing was generated lately, so 0 (and
    any rate that is no speed at all: negative, NaN, infinite) is NULL — a gap on the chart, never a zero."""
    return value if 0.0 < value < math.inf else None


def row_from_pb(t: fleet_pb2.Telemetry) -> TelemetryRow:
    has_battery = t.HasField("battery") and t.battery.present
    has_model = t.HasField("model")
    return TelemetryRow(
        t.device_id, t.bd_seq, t.seq, t.ts_ms, t.replayed, t.cpu_percent, t.load1, t.ram_total_mb,
        t.ram_available_mb, t.temp_max_c if t.temperatures_c or t.temp_max_c else None, t.thermal_level,
        t.throttle_ratio, t.throttled, t.battery.percent if has_battery else None,
        t.battery.charging if has_battery else None, t.queue_depth, t.policy_version,
        dict(t.route_counts) if t.route_counts else None, t.model.name if has_model else None,
        availability_name(t.model.availability) if has_model else None, t.slots_waiting, t.queue_oldest_age_s,
        dict(t.queue_counters) if t.queue_counters else None, tokens_rate(t.model.tokens_per_s) if has_model else None,
        model_report(t.model) if has_model else None,
    )


@dataclass
class Batch:
    """What one ingest transaction writes. `rejections` are (device_id or None, topic, reason)."""

    fleet: str
    received_ms: int
    statuses: list[fleet_pb2.DeviceStatus] = field(default_factory=list)
    telemetry: list[TelemetryRow] = field(default_factory=list)
    # arrival order: statuses[i] came after telemetry[:status_pos[i]] (empty: statuses first)
    status_pos: list[int] = field(default_factory=list)
    rejections: list[tuple[str | None, str, str]] = field(default_factory=list)
    command_results: list[fleet_pb2.CommandResult] = field(default_factory=list)


@dataclass
class BatchOutcome:
    inserted: int = 0
    duplicates: int = 0
    rebirth: list[str] = field(default_factory=list)  # devices to ask for a rebirth
    revoked_rejected: int = 0  # messages of revoked devices, rejected (and counted in `rejections`)
    future_rejected: int = 0  # telemetry stamped more than FUTURE_MS ahead of its arrival (`ts_in_future`)
    new_devices: list[str] = field(default_factory=list)
    events: list[DeviceEvent] = field(default_factory=list)
    births: list[str] = field(default_factory=list)  # every accepted birth, a same-session rebirth included
    gaps: int = 0
    # devices whose shown state changed (state, thermal level, throttling, queue depth, policy, model, rejections):
    # {device_id: {"state", "thermal_level", "throttled", "queue_depth"}}, for the live dashboard (controller/events)
    changed: dict[str, dict[str, Any]] = field(default_factory=dict)


class _Dev:
    """One device's row (the `devices` columns, set from _COLUMNS) and its live bookkeeping."""

    __slots__ = (*_COLUMNS, "last_seq", "rebirth_ms", "latest_ts")
    # the columns, declared for the type checker (slots above; set in __init__ from the row)
    device_id: str
    fleet: str
    state: str
    last_seen_ms: int
    birth_ms: int
    bd_seq: int
    agent_version: str
    model_name: str
    model_availability: str
    policy_version: int
    cpu_percent: float
    ram_total_mb: int
    ram_available_mb: int
    temp_max_c: float | None
    thermal_level: int
    throttled: int
    battery_pct: float | None
    charging: int | None
    queue_depth: int
    route_counts: str  # JSON
    rejected_count: int
    gap_count: int
    telemetry_interval_s: float
    status_json: str
    slots_waiting: int
    queue_oldest_age_s: float
    queue_counters: str  # JSON
    model_report: str  # JSON

    def __init__(self, values: dict[str, Any]) -> None:
        for name in _COLUMNS:
            setattr(self, name, values[name])
        self.last_seq: int | None = None
        self.rebirth_ms = 0
        self.latest_ts = 0

    @classmethod
    def new(cls, device_id: str, fleet: str, state: str = "offline") -> _Dev:
        return cls({
            "device_id": device_id, "fleet": fleet, "state": state, "last_seen_ms": 0, "birth_ms": 0, "bd_seq": 0,
            "agent_version": "", "model_name": "", "model_availability": "unspecified", "policy_version": 0,
            "cpu_percent": 0.0, "ram_total_mb": 0, "ram_available_mb": 0, "temp_max_c": None, "thermal_level": 0,
            "throttled": 0, "battery_pct": None, "charging": None, "queue_depth": 0, "route_counts": "{}",
            "rejected_count": 0, "gap_count": 0, "telemetry_interval_s": 10.0, "status_json": "{}",
            "slots_waiting": 0, "queue_oldest_age_s": 0.0, "queue_counters": "{}", "model_report": "{}",
        })

    @property
    def shown(self) -> dict[str, Any]:
        """What a live dashboard event says about the device (controller/events.py)."""
        return {"state": self.state, "thermal_level": thermal_name(self.thermal_level),
                "throttled": bool(self.throttled), "queue_depth": self.queue_depth}

    row = property(operator.attrgetter(*_COLUMNS))  # the devices-table row, in column order
    hot_row = property(operator.attrgetter(*_HOT, "device_id"))  # _UPDATE_HOT's parameters


class DeviceStates:
    def __init__(self, devices: dict[str, _Dev], revoked: set[str] | None = None) -> None:
        self.devices = devices
        self.revoked = revoked or set()  # revoked_devices as last read (a message of one re-reads its row)
        self.check_gaps = True  # off when controllers split a device's messages through $share
        self._shown: set[str] = set()  # devices whose shown values changed in the batch being applied
        self._hot_staging_of: Any = None  # PostgreSQL: the raw connection whose session has _HOT_STAGING

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> DeviceStates:
        cur = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM devices")
        devices = {r[0]: _Dev(dict(zip(_COLUMNS, r, strict=True))) for r in cur}
        return cls(devices, {r[0] for r in conn.execute("SELECT device_id FROM revoked_devices")})

    def _is_revoked(self, conn: sqlite3.Connection, device_id: str) -> bool:
        """True while the device's revocation stands; its row is read again, as the CLI re-enrols in another
        process. The common case (not revoked) is one set lookup."""
        if device_id not in self.revoked:
            return False
        if conn.execute("SELECT 1 FROM revoked_devices WHERE device_id = ?", (device_id,)).fetchone():
            return True
        self.revoked.discard(device_id)  # enrolled again since: its messages count again
        return False

    def _revocation(self, out: BatchOutcome, conn: sqlite3.Connection, s: fleet_pb2.DeviceStatus, at: int,
                    touched: dict[str, _Dev], full: set[str]) -> bool:
        """A status saying `revoked`, backed by the table (anyone may say it; only the CLI writes the table):
        the device is revoked from now on. False when the table does not back it (a plain death then)."""
        if conn.execute("SELECT 1 FROM revoked_devices WHERE device_id = ?", (s.device_id,)).fetchone() is None:
            return False
        self.revoked.add(s.device_id)
        dev = self.devices.get(s.device_id)
        if dev is not None and dev.state != REVOKED:
            self._event(out, dev, REVOKED, REVOKED, at)
            touched[dev.device_id] = dev
            full.add(dev.device_id)
        return True

    def expect(self, conn: sqlite3.Connection, device_ids: list[str], fleet: str) -> list[str]:
        """Rows in state `never_seen` for listed devices the store has never heard of (not revoked ones)."""
        if dialect(conn) == "postgresql":  # what another controller stored counts as heard of
            self.lock(conn, list(dict.fromkeys(device_ids)))
        new = [d for d in dict.fromkeys(device_ids) if d not in self.devices and d not in self.revoked]
        for device_id in new:
            self.devices[device_id] = _Dev.new(device_id, fleet, "never_seen")
        # never over a row another controller stored meanwhile (PostgreSQL): a never_seen placeholder only
        conn.executemany(_INSERT_NEW, [self.devices[d].row for d in new])
        return new

    def _event(self, out: BatchOutcome, dev: _Dev, state: str, reason: str, at_ms: int) -> None:
        dev.state = state
        out.events.append(DeviceEvent(dev.device_id, at_ms, state, reason, dev.bd_seq))  # type: ignore[arg-type]

    def _ask_rebirth(self, out: BatchOutcome, dev: _Dev, at_ms: int) -> None:
        if at_ms - dev.rebirth_ms >= REBIRTH_EVERY_MS:
            dev.rebirth_ms = at_ms
            out.rebirth.append(dev.device_id)

    def _get(self, out: BatchOutcome, device_id: str, fleet: str) -> tuple[_Dev, bool]:
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = _Dev.new(device_id, fleet)
            out.new_devices.append(device_id)
            return dev, True
        return dev, False

    def lock(self, conn: sqlite3.Connection, device_ids: list[str] | None, where: str = "",
             args: tuple[Any, ...] = ()) -> list[_Dev]:
        """PostgreSQL: read the devices' stored rows under a row lock (in device order: two controllers locking
        overlapping batches never deadlock) into the mirror, which another controller's commits made stale; a
        device with no row is forgotten (it is new again). `where` instead of ids: the rows matching it."""
        if device_ids is not None:
            sql, params = _LOCK, (sorted(device_ids),)
        else:
            sql, params = _LOCK.replace("device_id = ANY(?)", where), args
        locked = []
        for r in conn.execute(sql, params):
            dev = self.devices.get(r[0])
            if dev is None:
                dev = self.devices[r[0]] = _Dev(dict(zip(_COLUMNS, r, strict=True)))
            elif dev.row != r:  # (one controller alone: the mirror is right, nothing to copy)
                if dev.bd_seq != r[_BD_SEQ]:
                    dev.last_seq = None  # another controller saw a birth: seq starts again
                for name, value in zip(_COLUMNS, r, strict=True):
                    setattr(dev, name, value)
            if dev.state == REVOKED:
                self.revoked.add(dev.device_id)
            locked.append(dev)
        if device_ids is not None and len(locked) < len(device_ids):
            found = {d.device_id for d in locked}
            missing = [d for d in device_ids if d not in found]
            for device_id in missing:
                self.devices.pop(device_id, None)
            self.revoked.update(r[0] for r in conn.execute(
                "SELECT device_id FROM revoked_devices WHERE device_id = ANY(?)", (missing,)))
        return locked

    def apply(self, conn: sqlite3.Connection, batch: Batch) -> BatchOutcome:
        out = BatchOutcome()
        if dialect(conn) == "postgresql":  # judge on what is stored: other controllers write the same devices
            ids = {s.device_id for s in batch.statuses} | {r.device_id for r in batch.telemetry}
            ids |= {d for d, _, _ in batch.rejections if d}
            if ids:  # (command results alone touch no device row)
                self.lock(conn, list(ids))
        touched: dict[str, _Dev] = {}
        full: set[str] = set()  # devices whose whole row changes (new, birth, death); the rest get _UPDATE_HOT
        self._shown = set()
        at = batch.received_ms
        statuses, pos = batch.statuses, batch.status_pos or [0] * len(batch.statuses)
        refused: list[tuple[str, str]] = []  # (device, kind) of revoked devices' messages
        kept: list[TelemetryRow] = []
        si = 0
        for i, row in enumerate(batch.telemetry):
            while si < len(statuses) and pos[si] <= i:
                self._status_in(out, conn, statuses[si], batch, touched, full, refused)
                si += 1
            if self.revoked and self._is_revoked(conn, row.device_id):
                refused.append((row.device_id, "telemetry"))
                continue
            if row.ts_ms > at + FUTURE_MS:  # a wild clock: kept out of the store (no partition years ahead)
                batch.rejections.append((row.device_id, "telemetry", FUTURE))  # kept out of batch.telemetry below
                continue
            kept.append(row)
            self._row(out, row, batch, touched, full)
        for status in statuses[si:]:
            self._status_in(out, conn, status, batch, touched, full, refused)
        if len(kept) < len(batch.telemetry):
            batch.telemetry = kept  # the store keeps no sample of a revoked device
        if self.revoked and batch.command_results:
            results: list[fleet_pb2.CommandResult] = []
            for r in batch.command_results:
                if self._is_revoked(conn, r.device_id):
                    refused.append((r.device_id, "cmd/result"))
                else:
                    results.append(r)
            batch.command_results = results
        if refused:  # counted apart from the device's row: a removed revoked device must not come back by it
            out.revoked_rejected = len(refused)
            conn.executemany(
                """INSERT INTO rejections VALUES (?, ?, ?, 1, ?) ON CONFLICT (device_id, topic, reason)
                   DO UPDATE SET count = rejections.count + 1, last_ms = excluded.last_ms""",
                [(d, kind, REVOKED, at) for d, kind in refused],
            )
        if batch.rejections:
            counts = Counter(batch.rejections)
            out.future_rejected = sum(n for (_, _, reason), n in counts.items() if reason == FUTURE)
            conn.executemany(
                """INSERT INTO rejections VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, topic, reason)
                   DO UPDATE SET count = rejections.count + excluded.count, last_ms = excluded.last_ms""",
                [(d or "", t, r, n, at) for (d, t, r), n in counts.items()],
            )
            for (device_id, _, _), n in counts.items():
                dev = self.devices.get(device_id or "")
                if dev is not None:
                    dev.rejected_count += n
                    touched[dev.device_id] = dev
                    self._shown.add(dev.device_id)
        if batch.command_results:
            conn.executemany(
                """INSERT INTO command_results VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id, status) DO UPDATE SET
                   device_id = excluded.device_id, message = excluded.message, data_json = excluded.data_json,
                   ts_ms = excluded.ts_ms""",
                [(r.id, r.device_id, r.status, r.message, json.dumps(dict(r.data)), r.ts_ms or at)
                 for r in batch.command_results],
            )
        self._flush(conn, touched.values(), out, full)
        shown = self._shown | full | {e.device_id for e in out.events}
        out.changed = {d: self.devices[d].shown for d in shown if d in self.devices}
        return out

    def _status_in(self, out: BatchOutcome, conn: sqlite3.Connection, status: fleet_pb2.DeviceStatus, batch: Batch,
                   touched: dict[str, _Dev], full: set[str], refused: list[tuple[str, str]]) -> None:
        if (not status.online and status.reason == REVOKED
                and self._revocation(out, conn, status, batch.received_ms, touched, full)):
            return
        if self.revoked and self._is_revoked(conn, status.device_id):
            refused.append((status.device_id, "status"))
            return
        dev, created = self._get(out, status.device_id, status.fleet or batch.fleet)
        if self._status(out, dev, status, batch.received_ms, created):
            touched[dev.device_id] = dev
            full.add(dev.device_id)

    def _row(self, out: BatchOutcome, row: TelemetryRow, batch: Batch, touched: dict[str, _Dev],
             full: set[str]) -> None:
        at = batch.received_ms
        dev, created = self._get(out, row.device_id, batch.fleet)
        touched[dev.device_id] = dev
        if created:
            full.add(dev.device_id)
            dev.bd_seq = row.bd_seq
            self._event(out, dev, "online", "telemetry_without_birth", at)
            self._ask_rebirth(out, dev, at)
        if row.replayed:  # old news: stored, and the latest values only if nothing newer is known
            if row.ts_ms > dev.latest_ts:
                dev.latest_ts = row.ts_ms
                if self._latest(dev, row):
                    self._shown.add(dev.device_id)
            return
        dev.last_seen_ms = max(dev.last_seen_ms, at)
        if row.bd_seq != dev.bd_seq:
            self._ask_rebirth(out, dev, at)  # a birth we never saw, or telemetry of a dead session
        else:
            if (self.check_gaps and dev.last_seq is not None and row.seq != dev.last_seq
                    and row.seq != (dev.last_seq + 1) & 0xFF):
                dev.gap_count += 1
                out.gaps += 1
                self._ask_rebirth(out, dev, at)
            dev.last_seq = row.seq
            if dev.state != "online":
                self._event(out, dev, "online", "telemetry", at)
        if row.ts_ms >= dev.latest_ts:
            dev.latest_ts = row.ts_ms
            if self._latest(dev, row):
                self._shown.add(dev.device_id)

    @staticmethod
    def _latest(dev: _Dev, r: TelemetryRow) -> bool:
        """Take the row's values as the device's latest; True when one the dashboard shows as state changed."""
        shown = (r.thermal_level != dev.thermal_level or r.queue_depth != dev.queue_depth
                 or r.throttled != bool(dev.throttled) or (r.policy_version and r.policy_version != dev.policy_version)
                 or (r.model_availability is not None and r.model_availability != dev.model_availability))
        dev.cpu_percent, dev.ram_available_mb, dev.temp_max_c = r.cpu_percent, r.ram_available_mb, r.temp_max_c
        dev.thermal_level, dev.throttled, dev.queue_depth = r.thermal_level, int(r.throttled), r.queue_depth
        dev.battery_pct, dev.charging = r.battery_pct, None if r.charging is None else int(r.charging)
        dev.slots_waiting, dev.queue_oldest_age_s = r.slots_waiting, r.queue_oldest_age_s
        # counters are cumulative since the agent started: an absent map is "none yet" (a fresh agent), not "same"
        dev.queue_counters = "{}" if r.queue_counters is None else _encode(r.queue_counters).decode()
        if r.ram_total_mb:
            dev.ram_total_mb = r.ram_total_mb
        if r.policy_version:
            dev.policy_version = r.policy_version
        if r.route_counts is not None:
            dev.route_counts = _encode(r.route_counts).decode()
        if r.model_name is not None:
            dev.model_name, dev.model_availability = r.model_name, r.model_availability or "unspecified"
        if r.model_report is not None:
            dev.model_report = r.model_report
        return bool(shown)

    def _status(self, out: BatchOutcome, dev: _Dev, s: fleet_pb2.DeviceStatus, at: int, created: bool) -> bool:
        """Apply a birth or death; False when it is stale (an older session's) and changes nothing."""
        if s.bd_seq < dev.bd_seq:
            return False
        new_session = s.bd_seq != dev.bd_seq
        dev.bd_seq = s.bd_seq
        dev.last_seen_ms = max(dev.last_seen_ms, at)
        if s.online:
            dev.birth_ms = s.ts_ms or at
            dev.last_seq = None
            dev.agent_version = s.agent_version
            if s.HasField("model"):
                dev.model_name, dev.model_availability = s.model.name, availability_name(s.model.availability)
                dev.model_report = model_report(s.model) or dev.model_report
            if s.hardware.ram_total_mb:
                dev.ram_total_mb = s.hardware.ram_total_mb
            if s.policy_version:
                dev.policy_version = s.policy_version
            if s.telemetry_interval_s:
                dev.telemetry_interval_s = float(s.telemetry_interval_s)
            dev.status_json = json.dumps({"capabilities": list(s.capabilities), "board": s.hardware.board,
                                          "machine": s.hardware.machine, "cpu_count": s.hardware.cpu_count})
            out.births.append(dev.device_id)
            if dev.state != "online" or new_session:
                self._event(out, dev, "online", "birth", at)
        elif dev.state != "offline" or new_session or created:
            self._event(out, dev, "offline", s.reason or "last_will", at)
        return True

    def _flush(self, conn: sqlite3.Connection, devs: Any, out: BatchOutcome, full: set[str] | None = None) -> None:
        """Write the devices' rows: whole (all of them when `full` is None, else those in it) or their hot part."""
        if full is None:
            rows = [d.row for d in devs]
        else:
            rows = [d.row for d in devs if d.device_id in full]
            hot = [d for d in devs if d.device_id not in full]
            if hot:
                if dialect(conn) == "postgresql":
                    updated = self._update_hot_pg(conn, hot)
                else:
                    before = conn.total_changes
                    conn.executemany(_UPDATE_HOT, [d.hot_row for d in hot])
                    updated = conn.total_changes - before
                if updated != len(hot):  # a row missing (an earlier batch rolled back): heal
                    rows += [d.row for d in hot]
        if out.new_devices and dialect(conn) == "postgresql":
            new = set(out.new_devices)
            fresh = [r for r in rows if r[0] in new]
            rows = [r for r in rows if r[0] not in new]
            before = conn.total_changes
            conn.executemany(_INSERT_NEW, fresh)
            if conn.total_changes - before != len(fresh):
                raise DeviceRace(f"{len(fresh) - (conn.total_changes - before)} new device(s) stored meanwhile")
        if rows:
            conn.executemany(_UPSERT, rows)
        if out.events:
            conn.executemany(
                "INSERT INTO device_events (device_id, ts_ms, state, reason, bd_seq) VALUES (?, ?, ?, ?, ?)",
                [(e.device_id, e.ts_ms, e.state, e.reason, e.bd_seq) for e in out.events],
            )

    def _update_hot_pg(self, conn: Any, devs: list[_Dev]) -> int:
        """PostgreSQL: the hot columns of many devices by COPY into a session temp table and one UPDATE … FROM
        (about half the time of an UPDATE per device); returns the rows updated."""
        raw = conn.raw
        if self._hot_staging_of is not raw:  # a new DeviceStates after a rollback, or a new connection: make it
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_HOT_STAGING} AS "
                         f"SELECT {', '.join(_HOT)}, device_id FROM devices WITH NO DATA")
            self._hot_staging_of = raw
        conn.execute(f"TRUNCATE {_HOT_STAGING}")
        with raw.cursor().copy(f"COPY {_HOT_STAGING} FROM STDIN") as copy:
            for dev in devs:
                copy.write_row(dev.hot_row)
        return max(conn.execute(_HOT_FROM_STAGING).rowcount, 0)

    def sweep_stale(self, conn: sqlite3.Connection, at: int, factor: float) -> list[DeviceEvent]:
        out = BatchOutcome()
        devs: Any = self.devices.values()
        if dialect(conn) == "postgresql":  # the stored rows: another controller may have heard the device since
            devs = self.lock(conn, None, "state = 'online' AND ? - last_seen_ms > ? * telemetry_interval_s * 1000",
                             (at, factor))
        stale = [d for d in devs
                 if d.state == "online" and at - d.last_seen_ms > factor * d.telemetry_interval_s * 1000]
        for dev in stale:
            self._event(out, dev, "stale", "silent", at)
        self._flush(conn, stale, out)
        return out.events

    def mark_all(self, conn: sqlite3.Connection, state: str, reason: str, at: int) -> list[DeviceEvent]:
        out = BatchOutcome()
        known: Any = self.devices.values()
        if dialect(conn) == "postgresql":
            known = self.lock(conn, None, "state = 'online'")
        devs = [d for d in known if d.state == "online"]
        for dev in devs:
            self._event(out, dev, state, reason, at)
        self._flush(conn, devs, out)
        return out.events
