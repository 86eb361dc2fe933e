"""The SQL the dashboard's queries share: the device list's sort keys as SQL expressions over `devices d` LEFT JOIN
`device_groups g`, the columns of a DeviceView, and which sorts have an index of their own (migration 006).

Both backends run this SQL. The sort keys are never NULL (a missing temperature is NO_TEMP), so SQLite's and
PostgreSQL's different NULL orders never meet a page; text keys order by the database's collation on both sides of
a cursor (ORDER BY and the row-value comparison use the same one), so a page walk is exact under any collation, and
in byte order — SQLite's BINARY, what Python's sorted() gives — when the PostgreSQL database uses "C" (as the tests'
do). Only SQLite gets an index hint (INDEXED BY): PostgreSQL's planner has statistics."""

from __future__ import annotations

from typing import Literal, get_args

from nanofleet.config import DEFAULT_GROUP

__all__ = [
    "COLUMNS",
    "FROM_DEVICES",
    "NO_TEMP",
    "SORTS",
    "SORT_INDEX",
    "TEXT_SORTS",
    "SortKey",
    "count_if",
    "from_devices",
    "json_number",
    "like",
]

SortKey = Literal["device_id", "group", "state", "last_seen", "temp", "thermal", "ram", "cpu", "model", "policy",
                  "queue", "slots_waiting"]
NO_TEMP = "-1.0e9"  # a device without a temperature sorts below every real one (NULL breaks row-value comparisons)
# sort key -> its SQL expression over `devices d` LEFT JOIN `device_groups g`
SORTS: dict[str, str] = {
    "device_id": "d.device_id",
    "group": f"coalesce(g.grp, '{DEFAULT_GROUP}')",
    "state": "d.state",
    "last_seen": "d.last_seen_ms",
    "temp": f"coalesce(d.temp_max_c, {NO_TEMP})",
    "thermal": "d.thermal_level",
    "ram": "d.ram_available_mb",
    "cpu": "d.cpu_percent",
    "model": "d.model_name",
    "policy": "d.policy_version",
    "queue": "d.queue_depth",
    "slots_waiting": "d.slots_waiting",
}
assert set(SORTS) == set(get_args(SortKey))
TEXT_SORTS = frozenset({"device_id", "group", "state", "model"})  # the others are numbers
# sorts with an index of their own (migration 006): walked in order, so a filtered page stops after its rows
# instead of sorting every match — SQLite's planner, without statistics, would rather take a filter's index
SORT_INDEX = {"temp": "devices_temp"}

COLUMNS = """d.device_id, d.fleet, coalesce(g.grp, ?), d.state, d.last_seen_ms, d.birth_ms, d.bd_seq,
    d.agent_version, d.model_name, d.model_availability, d.policy_version, d.cpu_percent, d.ram_total_mb,
    d.ram_available_mb, d.temp_max_c, d.thermal_level, d.throttled, d.battery_pct, d.charging, d.queue_depth,
    d.route_counts, d.rejected_count, d.gap_count, d.telemetry_interval_s, d.slots_waiting,
    d.queue_oldest_age_s, d.queue_counters"""
FROM_DEVICES = " FROM devices d LEFT JOIN device_groups g ON g.device_id = d.device_id"


def from_devices(dialect: str, index: str | None = None) -> str:
    """FROM_DEVICES, walking `index` on SQLite (INDEXED BY: its planner, without statistics, would rather take a
    filter's index and sort every match); PostgreSQL has no such hint and needs none."""
    if index is None or dialect != "sqlite":
        return FROM_DEVICES
    return FROM_DEVICES.replace("devices d", f"devices d INDEXED BY {index}", 1)


def like(dialect: str) -> str:
    """The case-insensitive LIKE: SQLite's LIKE ignores ASCII case, PostgreSQL's does not (ILIKE does)."""
    return "ILIKE" if dialect == "postgresql" else "LIKE"


def count_if(condition: str) -> str:
    """How many rows meet `condition`: SQLite sums booleans, PostgreSQL has no sum(boolean); this runs on both."""
    return f"coalesce(sum(CASE WHEN {condition} THEN 1 ELSE 0 END), 0)"


def json_number(dialect: str, column: str, key: str) -> str:
    """The number at top-level `key` of the JSON text in `column` (NULL when absent): SQLite's json_extract,
    PostgreSQL's jsonb `->>` (the column stays TEXT on both, as the code writes it). `key` is ours, never input."""
    if dialect == "postgresql":
        return f"({column}::jsonb ->> '{key}')::numeric"
    return f"json_extract({column}, '$.{key}')"
