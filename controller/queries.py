"""The dashboard's read queries over the store (each runs on the caller thread's read connection, `Store.read`):
the device list by keyset pagination with filters and sort, and `Queries`, the one object the web app asks
(the overview, groups and device page queries are in fleet_queries.py).

Keyset, not OFFSET: a page is "the next `limit` rows after the last one shown" in (sort key, device_id) order, so a
page costs the same at row 10 and row 10,000, and a device added or changed between pages never shows twice.
The cursor is that last row's (sort key, device_id), with the sort it belongs to, as opaque url-safe base64 JSON.

Exceptions: `QueryError` (a ValueError naming the parameter at fault, e.g. a cursor from another sort).
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

from nanofleet.config import DEFAULT_GROUP as DEFAULT_GROUP
from nanofleet.config import Alerts
from nanofleet.controller.device_sql import (
    COLUMNS,
    FROM_DEVICES,
    SORT_INDEX,
    SORTS,
    TEXT_SORTS,
    SortKey,
    from_devices,
    like,
)
from nanofleet.controller.device_sql import NO_TEMP as NO_TEMP
from nanofleet.controller.fleet_queries import (
    Bucket,
    CommandRecord,
    GroupSummary,
    Overview,
    PolicyLag,
    PolicyRound,
    SlowFigures,
    alert_count,
    buckets,
    fleet_figures,
    group_summaries,
    last_policy_round,
    overview,
    policy_lag,
    published_version,
    recent_commands,
    slow_figures,
)
from nanofleet.controller.store import Store
from nanofleet.controller.views import DeviceView
from nanofleet.pg_db import dialect
from nanofleet.protos.names import THERMAL_LEVELS

__all__ = [
    "DEFAULT_GROUP",
    "SORTS",
    "DeviceFilter",
    "DevicePage",
    "Overview",
    "Queries",
    "QueryError",
    "SortKey",
]

MAX_LIMIT = 500
COUNT_CAP = 1000  # a page counts the devices matching its filter up to this many ("1000+"): a count is a scan


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

    def where(self, dialect: str = "sqlite") -> tuple[str, list[Any]]:
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
            pattern = "%" + self.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            op = like(dialect)
            clauses.append(f"(d.device_id {op} ? ESCAPE '\\' OR d.model_name {op} ? ESCAPE '\\' "
                           f"OR {SORTS['group']} {op} ? ESCAPE '\\')")
            args += [pattern, pattern, pattern]
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
    # the key's type is the sort's: SQLite would compare any two values, PostgreSQL refuses text against a number
    key_type = str if sort in TEXT_SORTS else int | float
    if not isinstance(device_id, str) or not isinstance(key, key_type) or isinstance(key, bool):
        raise QueryError("cursor", "not a cursor this controller gave (take next_cursor as it is)")
    return key, device_id


def _page_sql(flt: DeviceFilter, limit: int, cursor: str | None, dialect: str) -> tuple[str, list[Any]]:
    if not 1 <= limit <= MAX_LIMIT:
        raise QueryError("limit", f"expected 1 to {MAX_LIMIT}, got {limit}")
    if flt.sort not in SORTS:
        raise QueryError("sort", f"expected one of {', '.join(SORTS)}, got {flt.sort!r}")
    expr = SORTS[flt.sort]
    where, args = flt.where(dialect)
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
    source = from_devices(dialect, SORT_INDEX.get(flt.sort))
    sql = (f"SELECT {COLUMNS}, {expr}" + source + (" WHERE " + " AND ".join(clauses) if clauses else "")
           + f" ORDER BY {order} LIMIT ?")
    return sql, [*args, limit + 1]


def device_page(conn: sqlite3.Connection, flt: DeviceFilter, *, limit: int = 50,
                cursor: str | None = None) -> DevicePage:
    """One page of devices: `limit` rows after `cursor` in the filter's order, and the cursor of the next page."""
    sql, args = _page_sql(flt, limit, cursor, dialect(conn))
    rows = conn.execute(sql, args).fetchall()
    where, where_args = flt.where(dialect(conn))
    total = conn.execute(f"SELECT count(*) FROM (SELECT 1{FROM_DEVICES}{where} LIMIT ?) AS matching",
                         [*where_args, COUNT_CAP]).fetchone()[0]
    more = len(rows) > limit
    rows = rows[:limit]
    items = [Store._device(r[:-1]) for r in rows]
    next_cursor = encode_cursor(flt.sort, flt.desc, rows[-1][-1], rows[-1][0]) if more and rows else None
    return DevicePage(items, next_cursor, total, total >= COUNT_CAP)


def explain_page(conn: sqlite3.Connection, flt: DeviceFilter, *, cursor: str | None = None) -> list[str]:
    """The page query's plan, one line per step — SQLite's EXPLAIN QUERY PLAN, PostgreSQL's EXPLAIN (tests hold the
    default sort to an index walk)."""
    sql, args = _page_sql(flt, 50, cursor, dialect(conn))
    if dialect(conn) == "postgresql":
        return [r[0] for r in conn.execute("EXPLAIN " + sql, args).fetchall()]
    return [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()]


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
