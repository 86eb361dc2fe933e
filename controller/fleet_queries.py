"""The dashboard's fleet-wide and per-page queries beside the device list (controller/queries.py): the overview's
aggregates — each one SQL statement, nothing loads the fleet into Python —, the groups page, a device's page."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass, field

from nanofleet.config import DEFAULT_GROUP, Alerts
from nanofleet.controller.device_sql import FROM_DEVICES, SORTS, count_if, from_devices, json_number
from nanofleet.controller.store import ROUTES
from nanofleet.controller.views import DEVICE_STATES
from nanofleet.pg_db import dialect
from nanofleet.protos.names import THERMAL_LEVELS

__all__ = ["Bucket", "CommandRecord", "GroupSummary", "HotDevice", "Overview", "PolicyLag", "PolicyRound",
           "SlowFigures", "alert_count", "buckets", "fleet_figures", "group_summaries", "last_policy_round",
           "overview", "policy_lag", "published_version", "recent_commands", "slow_figures", "with_slow"]


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
    # the slower-moving figures (SlowFigures), refreshed less often by the web app
    routes_last_hour: dict[str, int] = field(default_factory=dict)  # ROUTES -> requests
    routes_since_ms: int | None = None  # the snapshot the route mix counts from (None: no snapshot yet)
    policy_total: int = 0  # devices with a published policy
    policy_behind: int = 0  # of them, not yet on it
    policy_latest: int | None = None  # the newest version published
    convergence: dict[int, int] = field(default_factory=dict)  # applied policy version -> devices
    rejected: int = 0  # payloads rejected by ingest, all time
    models: list[str] = field(default_factory=list)  # distinct model names (the device list's model filter)


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
    models: list[str]


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
        now_v = f"coalesce({json_number(dialect(conn), 'd.route_counts', r)}, 0)"
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
    sql = f"""SELECT
        {count_if("state IN ('offline', 'stale') AND (? - last_seen_ms) / 1000.0 > ?")},
        {count_if("thermal_level >= ? AND thermal_level < ?")},
        {count_if("ram_available_mb > 0 AND ram_available_mb < ?")},
        {count_if("queue_depth >= ?")} FROM devices"""
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
    groups = dict(conn.execute(f"SELECT coalesce(g.grp, '{DEFAULT_GROUP}') AS grp, count(*)" + FROM_DEVICES
                               + " GROUP BY 1 ORDER BY 1").fetchall())
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
        f"{count_if('queue_depth > 0')} FROM devices").fetchone()
    hot = [HotDevice(r[0], r[1], r[2], THERMAL_LEVELS[r[3]] if 0 <= r[3] < len(THERMAL_LEVELS) else "none", r[4])
           for r in conn.execute(
               f"SELECT d.device_id, coalesce(g.grp, '{DEFAULT_GROUP}'), d.temp_max_c, d.thermal_level, d.state"
               + from_devices(dialect(conn), "devices_temp")
               + f" WHERE d.temp_max_c IS NOT NULL ORDER BY {SORTS['temp']} DESC, d.device_id DESC LIMIT ?",
               (hottest,))]
    return Overview(total=sum(by_state.values()), by_state=by_state, by_thermal=by_thermal,
                    queue_depth=int(depth), slots_waiting=int(waiting), queue_devices=int(queued), hottest=hot,
                    alerts=alert_count(conn, alerts, now_ms), groups=groups)  # int(): PostgreSQL's sum() is numeric


def slow_figures(conn: sqlite3.Connection, now_ms: int) -> SlowFigures:
    routes, since = _route_mix(conn, now_ms)
    p_total, p_behind, p_latest = conn.execute(
        f"SELECT count(*), {count_if('p.version != d.policy_version')}, max(p.version) "
        "FROM policies p JOIN devices d ON d.device_id = p.device_id").fetchone()
    convergence = {int(v): int(n) for v, n in conn.execute(
        "SELECT policy_version, count(*) FROM devices GROUP BY policy_version")}
    rejected = conn.execute("SELECT coalesce(sum(count), 0) FROM rejections").fetchone()[0]
    # int(): PostgreSQL's sum() of integers is numeric (read as float), SQLite's an integer
    return SlowFigures(routes, since, int(p_total), int(p_behind), p_latest, convergence, int(rejected), models(conn))


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
    for name, state, n in conn.execute(f"SELECT {grp} AS grp, d.state, count(*)" + FROM_DEVICES
                                       + " GROUP BY 1, 2"):
        states.setdefault(name, dict.fromkeys(DEVICE_STATES, 0))[state] = n
    published = dict(conn.execute(f"SELECT {grp} AS grp, max(p.version)" + FROM_DEVICES
                                  + " JOIN policies p ON p.device_id = d.device_id GROUP BY 1").fetchall())
    behind: dict[str, list[tuple[str, int, int]]] = {}
    behind_total: dict[str, int] = {}
    for name, did, applied, version in conn.execute(
            f"SELECT {grp}, d.device_id, d.policy_version, p.version" + FROM_DEVICES
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
