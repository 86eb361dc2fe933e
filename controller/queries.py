"""The dashboard's read queries over the store (each runs on the caller thread's read connection, `Store.read`):
the device list by keyset pagination with filters and sort, the fleet overview's aggregates, the groups page.

Keyset, not OFFSET: a page is "the next `limit` rows after the last one shown" in (sort key, device_id) order, so a
page costs the same at row 10 and row 10,000, and a device added or changed between pages never shows twice.
The cursor is that last row's (sort key, device_id), with the sort it belongs to, as opaque url-safe base64 JSON.
Every figure of the overview is one SQL aggregate: nothing here loads the fleet into Python.

Exceptions: `QueryError` (a ValueError naming the parameter at fault, e.g. a cursor from another sort).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

from nanofleet.config import DEFAULT_GROUP as DEFAULT_GROUP
from nanofleet.config import Alerts
from nanofleet.controller.store import ROUTES, Store
from nanofleet.controller.views import DEVICE_STATES, DeviceView
from nanofleet.protos.names import THERMAL_LEVELS

__all__ = [
    "DEFAULT_GROUP",
    "SORTS",
    "DeviceFilter",
    "DevicePage",
    "GroupSummary",
    "Overview",
    "PolicyRound",
    "Queries",
    "QueryError",
    "SortKey",
]


SortKey = Literal["device_id", "group", "state", "last_seen", "temp", "thermal", "ram", "cpu", "model", "policy",
                  "queue", "slots_waiting"]
_NO_TEMP = "-1.0e9"  # a device without a temperature sorts below every real one (NULL breaks row-value comparisons)
# sort key -> its SQL expression over `devices d` LEFT JOIN `device_groups g`
SORTS: dict[str, str] = {
    "device_id": "d.device_id",
    "group": f"coalesce(g.grp, '{DEFAULT_GROUP}')",
    "state": "d.state",
    "last_seen": "d.last_seen_ms",
    "temp": f"coalesce(d.temp_max_c, {_NO_TEMP})",
    "thermal": "d.thermal_level",
    "ram": "d.ram_available_mb",
    "cpu": "d.cpu_percent",
    "model": "d.model_name",
    "policy": "d.policy_version",
    "queue": "d.queue_depth",
    "slots_waiting": "d.slots_waiting",
}
assert set(SORTS) == set(get_args(SortKey))
MAX_LIMIT = 500
COUNT_CAP = 1000  # a page counts the devices matching its filter up to this many ("1000+"): a count is a scan
# sorts with an index of their own (migration 006): walked in order, so a filtered page stops after its rows
# instead of sorting every match — SQLite's planner, without statistics, would rather take a filter's index
_SORT_INDEX = {"temp": "devices_temp"}

_COLUMNS = """d.device_id, d.fleet, coalesce(g.grp, ?), d.state, d.last_seen_ms, d.birth_ms, d.bd_seq,
    d.agent_version, d.model_name, d.model_availability, d.policy_version, d.cpu_percent, d.ram_total_mb,
    d.ram_available_mb, d.temp_max_c, d.thermal_level, d.throttled, d.battery_pct, d.charging, d.queue_depth,
    d.route_counts, d.rejected_count, d.gap_count, d.telemetry_interval_s, d.slots_waiting,
    d.queue_oldest_age_s, d.queue_counters"""
_FROM = " FROM devices d LEFT JOIN device_groups g ON g.device_id = d.device_id"


class QueryError(ValueError):
    """A query parameter the store cannot answer; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class _Reader(Protocol):
    def read(self, fn: Any) -> Any: ...


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices, in which order. Empty strings / None mean "any"."""

    group: str = ""
    state: str = ""
    thermal: str = ""  # a level name: exactly that level
    model: str = ""
    behind: bool = False  # only devices not yet on the policy version published for them
    q: str = ""  # free text: a substring of the device id, model or group, case-insensitive
    sort: SortKey = "device_id"
    desc: bool = False

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if self.group:
            clauses.append(f"{SORTS['group']} = ?")
            args.append(self.group)
        if self.state:
            clauses.append("d.state = ?")
            args.append(self.state)
        if self.thermal:
            if self.thermal not in THERMAL_LEVELS:
                raise QueryError("thermal", f"expected one of {', '.join(THERMAL_LEVELS)}, got {self.thermal!r}")
            clauses.append("d.thermal_level = ?")
            args.append(THERMAL_LEVELS.index(self.thermal))
        if self.model:
            clauses.append("d.model_name = ?")
            args.append(self.model)
        if self.behind:
            clauses.append("EXISTS (SELECT 1 FROM policies p WHERE p.device_id = d.device_id "
                           "AND p.version != d.policy_version)")
        if self.q:
            like = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            clauses.append(f"(d.device_id LIKE ? ESCAPE '\\' OR d.model_name LIKE ? ESCAPE '\\' "
                           f"OR {SORTS['group']} LIKE ? ESCAPE '\\')")
            args += [like, like, like]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


@dataclass(frozen=True)
class DevicePage:
    items: list[DeviceView]
    next_cursor: str | None  # None: this is the last page
    total: int  # devices matching the filter, all pages, counted up to COUNT_CAP
    total_capped: bool = False  # True: COUNT_CAP or more match


def encode_cursor(sort: str, desc: bool, key: Any, device_id: str) -> str:
    raw = json.dumps([sort, int(desc), key, device_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, desc: bool) -> tuple[Any, str]:
    """(sort key, device_id) of the row a page ends on; QueryError("cursor") for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        c_sort, c_desc, key, device_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise QueryError("cursor", "not a cursor this controller gave (take next_cursor as it is)") from None
    if c_sort != sort or bool(c_desc) != desc:
        raise QueryError("cursor", f"it belongs to sort {c_sort!r}{' desc' if c_desc else ''}, not to this one: "
                                   "start again without a cursor")
    if not isinstance(device_id, str) or not isinstance(key, str | int | float) or isinstance(key, bool):
        raise QueryError("cursor", "not a cursor this controller gave (take next_cursor as it is)")
    return key, device_id


def _page_sql(flt: DeviceFilter, limit: int, cursor: str | None) -> tuple[str, list[Any]]:
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError("limit", f"expected 1 to {MAX_LIMIT}, got {limit}")
    if flt.sort not in SORTS:
        raise QueryError("sort", f"expected one of {', '.join(SORTS)}, got {flt.sort!r}")
    expr = SORTS[flt.sort]
    where, args = flt.where()
    direction, op = ("DESC", "<") if flt.desc else ("ASC", ">")
    single = flt.sort == "device_id"  # the key is the id itself: walk the primary key alone
    clauses = [where.removeprefix(" WHERE ")] if where else []
    args = [DEFAULT_GROUP, *args]
    if cursor:
        key, last_id = decode_cursor(cursor, flt.sort, flt.desc)
        if single:
            clauses.append(f"d.device_id {op} ?")
            args.append(last_id)
        else:
            clauses.append(f"({expr}, d.device_id) {op} (?, ?)")
            args += [key, last_id]
    order = f"d.device_id {direction}" if single else f"{expr} {direction}, d.device_id {direction}"
    source = _FROM
    if flt.sort in _SORT_INDEX:
        source = source.replace("devices d", f"devices d INDEXED BY {_SORT_INDEX[flt.sort]}", 1)
    sql = (f"SELECT {_COLUMNS}, {expr}" + source + (" WHERE " + " AND ".join(clauses) if clauses else "")
           + f" ORDER BY {order} LIMIT ?")
    return sql, [*args, limit + 1]


def device_page(conn: sqlite3.Connection, flt: DeviceFilter, *, limit: int = 50,
                cursor: str | None = None) -> DevicePage:
    """One page of devices: `limit` rows after `cursor` in the filter's order, and the cursor of the next page."""
    sql, args = _page_sql(flt, limit, cursor)
    rows = conn.execute(sql, args).fetchall()
    where, where_args = flt.where()
    total = conn.execute(f"SELECT count(*) FROM (SELECT 1{_FROM}{where} LIMIT ?)",
                         [*where_args, COUNT_CAP]).fetchone()[0]
    more = len(rows) > limit
    rows = rows[:limit]
    items = [Store._device(r[:-1]) for r in rows]
    next_cursor = encode_cursor(flt.sort, flt.desc, rows[-1][-1], rows[-1][0]) if more and rows else None
    return DevicePage(items, next_cursor, total, total >= COUNT_CAP)


def explain_page(conn: sqlite3.Connection, flt: DeviceFilter, *, cursor: str | None = None) -> list[str]:
    """EXPLAIN QUERY PLAN of the page query, one line per step (tests hold the default sort to an index walk)."""
    sql, args = _page_sql(flt, 50, cursor)
    return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()]


# -- overview ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HotDevice:
    device_id: str
    group: str
    temp_max_c: float
    thermal_level: str
    state: str


@dataclass(frozen=True)
class Overview:
    total: int
    by_state: dict[str, int]
    by_thermal: dict[str, int]  # every level, in order, 0 where none
    queue_depth: int
    slots_waiting: int
    queue_devices: int  # devices with a non-empty offline queue
    hottest: list[HotDevice]
    alerts: int  # devices x thresholds crossed now (the read-time rule of web/alerts.py, in SQL)
    groups: dict[str, int] = field(default_factory=dict)  # group -> devices
    models: list[str] = field(default_factory=list)  # distinct model names (the device list's model filter)
    # the slower-moving figures (SlowFigures), refreshed less often by the web app
    routes_last_hour: dict[str, int] = field(default_factory=dict)  # ROUTES -> requests
    routes_since_ms: int | None = None  # the snapshot the route mix counts from (None: no snapshot yet)
    policy_total: int = 0  # devices with a published policy
    policy_behind: int = 0  # of them, not yet on it
    policy_latest: int | None = None  # the newest version published
    convergence: dict[int, int] = field(default_factory=dict)  # applied policy version -> devices
    rejected: int = 0  # payloads rejected by ingest, all time


@dataclass(frozen=True)
class SlowFigures:
    """The overview's figures that move slowly and cost the most: the route mix (per device counters against a
    snapshot) and policy convergence (a join of every device with its published policy)."""

    routes_last_hour: dict[str, int]
    routes_since_ms: int | None
    policy_total: int
    policy_behind: int
    policy_latest: int | None
    convergence: dict[int, int]
    rejected: int


def _route_mix(conn: sqlite3.Connection, now_ms: int) -> tuple[dict[str, int], int | None]:
    """Requests per route in the last hour. Agents report cumulative counters since they started; the store keeps a
    snapshot of every device's counters every few minutes (Store._snapshot_routes). The mix is, per device, the
    counters now minus those of the newest snapshot at least an hour old (or the oldest there is, when the store has
    less than an hour: the figure then covers less, and `since` says from when). A device born after that snapshot
    (a restarted agent counts from zero), or with a counter below its snapshot, counts its counters now whole; a
    device without a snapshot counts whole too."""
    row = conn.execute("SELECT max(ts_ms) FROM route_snapshots WHERE ts_ms <= ?", (now_ms - 3_600_000,)).fetchone()
    since = row[0] if row and row[0] is not None else conn.execute(
        "SELECT min(ts_ms) FROM route_snapshots").fetchone()[0]
    if since is None:
        return dict.fromkeys(ROUTES, 0), None
    parts = []
    for r in ROUTES:
        now_v = f"coalesce(json_extract(d.route_counts, '$.{r}'), 0)"
        parts.append(f"sum(CASE WHEN s.device_id IS NULL OR s.birth_ms != d.birth_ms OR {now_v} < s.{r} "
                     f"THEN {now_v} ELSE {now_v} - s.{r} END)")
    sql = (f"SELECT {', '.join(parts)} FROM devices d LEFT JOIN route_snapshots s "
           "ON s.ts_ms = ? AND s.device_id = d.device_id")
    values = conn.execute(sql, (since,)).fetchone()
    return {r: int(v or 0) for r, v in zip(ROUTES, values, strict=True)}, since


def alert_count(conn: sqlite3.Connection, alerts: Alerts, now_ms: int) -> int:
    """How many alerts web/alerts.py's `device_alerts` raises over the whole fleet now, counted in SQL (held equal
    to it by a test)."""
    thermal_at = THERMAL_LEVELS.index(alerts.thermal_at)
    sql = """SELECT
        sum(state IN ('offline', 'stale') AND (? - last_seen_ms) / 1000.0 > ?),
        sum(thermal_level >= ? AND thermal_level < ?),
        sum(ram_available_mb > 0 AND ram_available_mb < ?),
        sum(queue_depth >= ?) FROM devices"""
    row = conn.execute(sql, (now_ms, alerts.offline_after_s, thermal_at, len(THERMAL_LEVELS), alerts.min_free_ram_mb,
                             alerts.queue_depth)).fetchone()
    return sum(int(v or 0) for v in row)


def models(conn: sqlite3.Connection) -> list[str]:
    """Distinct model names, at most 100 (the device list's model filter offers them)."""
    rows = conn.execute("SELECT DISTINCT model_name FROM devices WHERE model_name != '' ORDER BY 1 LIMIT 100")
    return [r[0] for r in rows]


def states_and_groups(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, int]]:
    """Devices by state, and by group (the device list's cards and group filter)."""
    by_state: dict[str, int] = dict.fromkeys(DEVICE_STATES, 0)
    for state, n in conn.execute("SELECT state, count(*) FROM devices GROUP BY state"):
        by_state[state] = n
    groups = dict(conn.execute(f"SELECT coalesce(g.grp, '{DEFAULT_GROUP}') AS grp, count(*)" + _FROM
                               + " GROUP BY grp ORDER BY grp").fetchall())
    return by_state, groups


def fleet_figures(conn: sqlite3.Connection, alerts: Alerts, now_ms: int, *, hottest: int = 10) -> Overview:
    """The overview's fast-moving figures (the slow ones left empty: `slow_figures`)."""
    by_state, groups = states_and_groups(conn)
    by_thermal = dict.fromkeys(THERMAL_LEVELS, 0)
    for level, n in conn.execute("SELECT thermal_level, count(*) FROM devices GROUP BY thermal_level"):
        name = THERMAL_LEVELS[level] if 0 <= level < len(THERMAL_LEVELS) else "none"
        by_thermal[name] += n
    depth, waiting, queued = conn.execute(
        "SELECT coalesce(sum(queue_depth), 0), coalesce(sum(slots_waiting), 0), "
        "coalesce(sum(queue_depth > 0), 0) FROM devices").fetchone()
    hot = [HotDevice(r[0], r[1], r[2], THERMAL_LEVELS[r[3]] if 0 <= r[3] < len(THERMAL_LEVELS) else "none", r[4])
           for r in conn.execute(
               f"SELECT d.device_id, coalesce(g.grp, '{DEFAULT_GROUP}'), d.temp_max_c, d.thermal_level, d.state"
               + _FROM.replace("devices d", "devices d INDEXED BY devices_temp", 1)
               + f" WHERE d.temp_max_c IS NOT NULL ORDER BY {SORTS['temp']} DESC, d.device_id DESC LIMIT ?",
               (hottest,))]
    return Overview(total=sum(by_state.values()), by_state=by_state, by_thermal=by_thermal, queue_depth=depth,
                    slots_waiting=waiting, queue_devices=queued, hottest=hot, alerts=alert_count(conn, alerts, now_ms),
                    groups=groups, models=models(conn))


def slow_figures(conn: sqlite3.Connection, now_ms: int) -> SlowFigures:
    routes, since = _route_mix(conn, now_ms)
    p_total, p_behind, p_latest = conn.execute(
        "SELECT count(*), coalesce(sum(p.version != d.policy_version), 0), max(p.version) "
        "FROM policies p JOIN devices d ON d.device_id = p.device_id").fetchone()
    convergence = {int(v): int(n) for v, n in conn.execute(
        "SELECT policy_version, count(*) FROM devices GROUP BY policy_version")}
    rejected = conn.execute("SELECT coalesce(sum(count), 0) FROM rejections").fetchone()[0]
    return SlowFigures(routes, since, p_total, p_behind, p_latest, convergence, rejected)


def with_slow(fast: Overview, slow: SlowFigures) -> Overview:
    return dataclasses.replace(fast, **{f.name: getattr(slow, f.name) for f in dataclasses.fields(slow)})


def overview(conn: sqlite3.Connection, alerts: Alerts, now_ms: int, *, hottest: int = 10) -> Overview:
    """Every figure of the overview, now."""
    return with_slow(fleet_figures(conn, alerts, now_ms, hottest=hottest), slow_figures(conn, now_ms))


# -- groups -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupSummary:
    name: str
    by_state: dict[str, int]
    total: int
    published: int | None  # the newest policy version published to a device of the group
    behind: list[tuple[str, int, int]]  # (device_id, applied, published), at most `behind_limit`
    behind_total: int


@dataclass(frozen=True)
class PolicyRound:
    version: int
    published_ms: int
    devices: int
    changes: list[dict[str, list[str]]]  # [{"changes": [...lines], "devices": [...ids]}]


def group_summaries(conn: sqlite3.Connection, *, behind_limit: int = 20) -> dict[str, GroupSummary]:
    grp = SORTS["group"]
    states: dict[str, dict[str, int]] = {}
    for name, state, n in conn.execute(f"SELECT {grp} AS grp, d.state, count(*)" + _FROM
                                       + " GROUP BY grp, d.state"):
        states.setdefault(name, dict.fromkeys(DEVICE_STATES, 0))[state] = n
    published = dict(conn.execute(f"SELECT {grp} AS grp, max(p.version)" + _FROM
                                  + " JOIN policies p ON p.device_id = d.device_id GROUP BY grp").fetchall())
    behind: dict[str, list[tuple[str, int, int]]] = {}
    behind_total: dict[str, int] = {}
    for name, did, applied, version in conn.execute(
            f"SELECT {grp}, d.device_id, d.policy_version, p.version" + _FROM
            + " JOIN policies p ON p.device_id = d.device_id WHERE p.version != d.policy_version "
              "ORDER BY 1, d.device_id"):
        behind_total[name] = behind_total.get(name, 0) + 1
        if len(lst := behind.setdefault(name, [])) < behind_limit:
            lst.append((did, applied, version))
    return {name: GroupSummary(name, by_state, sum(by_state.values()), published.get(name), behind.get(name, []),
                               behind_total.get(name, 0))
            for name, by_state in sorted(states.items())}


@dataclass(frozen=True)
class PolicyLag:
    device_id: str
    applied: int
    published: int


def policy_lag(conn: sqlite3.Connection, limit: int = 20) -> list[PolicyLag]:
    """The first `limit` devices (by id) not yet on the policy version published for them."""
    rows = conn.execute("SELECT d.device_id, d.policy_version, p.version FROM devices d JOIN policies p "
                        "ON p.device_id = d.device_id WHERE p.version != d.policy_version ORDER BY d.device_id "
                        "LIMIT ?", (limit,)).fetchall()
    return [PolicyLag(*r) for r in rows]


def last_policy_round(conn: sqlite3.Connection) -> PolicyRound | None:
    row = conn.execute("SELECT version, published_ms, devices, changes_json FROM policy_rounds "
                       "ORDER BY version DESC LIMIT 1").fetchone()
    return PolicyRound(row[0], row[1], row[2], json.loads(row[3])) if row else None


# -- device page ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bucket:
    """A device's worst thermal level and deepest queues within one time bucket (raw telemetry)."""

    ts_ms: int
    thermal_level: int
    queue_depth: int
    slots_waiting: int


@dataclass(frozen=True)
class CommandRecord:
    id: str
    status: str
    message: str
    data: dict[str, str]
    ts_ms: int


def buckets(conn: sqlite3.Connection, device_id: str, since_ms: int, bucket_ms: int) -> list[Bucket]:
    """Thermal level and queue depth of one device over time, one row per `bucket_ms` (its maximum there), from raw
    telemetry: rollups keep CPU, temperature and RAM only, and a day of 10 s samples is ~8,640 rows on the
    primary key's range."""
    rows = conn.execute(
        "SELECT ts_ms - ts_ms % ?, max(thermal_level), max(queue_depth), max(slots_waiting) FROM telemetry "
        "WHERE device_id = ? AND ts_ms >= ? GROUP BY 1 ORDER BY 1", (bucket_ms, device_id, since_ms)).fetchall()
    return [Bucket(*r) for r in rows]


def recent_commands(conn: sqlite3.Connection, device_id: str, limit: int = 10) -> list[CommandRecord]:
    rows = conn.execute("SELECT id, status, message, data_json, ts_ms FROM command_results WHERE device_id = ? "
                        "ORDER BY ts_ms DESC LIMIT ?", (device_id, limit)).fetchall()
    return [CommandRecord(r[0], r[1], r[2], {str(k): str(v) for k, v in json.loads(r[3] or "{}").items()}, r[4])
            for r in rows]


def published_version(conn: sqlite3.Connection, device_id: str) -> int | None:
    row = conn.execute("SELECT version FROM policies WHERE device_id = ?", (device_id,)).fetchone()
    return int(row[0]) if row else None


class Queries:
    """The queries above over a store's read connections (call from a worker thread, never the event loop)."""

    def __init__(self, store: _Reader) -> None:
        self.store = store

    def devices(self, flt: DeviceFilter, *, limit: int = 50, cursor: str | None = None) -> DevicePage:
        result: DevicePage = self.store.read(lambda c: device_page(c, flt, limit=limit, cursor=cursor))
        return result

    def overview(self, alerts: Alerts, now_ms: int, *, hottest: int = 10) -> Overview:
        result: Overview = self.store.read(lambda c: overview(c, alerts, now_ms, hottest=hottest))
        return result

    def fleet_figures(self, alerts: Alerts, now_ms: int) -> Overview:
        result: Overview = self.store.read(lambda c: fleet_figures(c, alerts, now_ms))
        return result

    def slow_figures(self, now_ms: int) -> SlowFigures:
        result: SlowFigures = self.store.read(lambda c: slow_figures(c, now_ms))
        return result

    def alert_count(self, alerts: Alerts, now_ms: int) -> int:
        result: int = self.store.read(lambda c: alert_count(c, alerts, now_ms))
        return result

    def groups(self) -> dict[str, GroupSummary]:
        result: dict[str, GroupSummary] = self.store.read(group_summaries)
        return result

    def policy_lag(self, limit: int = 20) -> list[PolicyLag]:
        result: list[PolicyLag] = self.store.read(lambda c: policy_lag(c, limit))
        return result

    def last_policy_round(self) -> PolicyRound | None:
        result: PolicyRound | None = self.store.read(last_policy_round)
        return result

    def buckets(self, device_id: str, since_ms: int, bucket_ms: int) -> list[Bucket]:
        result: list[Bucket] = self.store.read(lambda c: buckets(c, device_id, since_ms, bucket_ms))
        return result

    def recent_commands(self, device_id: str, limit: int = 10) -> list[CommandRecord]:
        result: list[CommandRecord] = self.store.read(lambda c: recent_commands(c, device_id, limit))
        return result

    def published_version(self, device_id: str) -> int | None:
        result: int | None = self.store.read(lambda c: published_version(c, device_id))
        return result

