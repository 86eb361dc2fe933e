"""The controller's SQLite store: devices with their latest state, telemetry, rollups, rejections, policies.

The file is owned by the project's one writer (nanofleet.sqlite_db.Writer): one thread, one write connection (WAL,
synchronous=NORMAL, created 0600), group commit, answers through futures, so ingest commits many batches per fsync.
Checkpoints run on the Writer's own checkpoint thread, never inside a commit (a telemetry batch dirties about a
page per row; SQLite's automatic checkpoint would stall ingest for as long). Rollups and retention run as the
writer's housekeeping between batches. Schema: controller/migrations.py, recorded in `_migrations`.
The device state machine (controller.devstate) runs on the writer thread and mirrors the `devices` table in memory;
when a write is rolled back (disk full, I/O error) the mirror is reloaded from the file before the next job, so a
retried batch is judged again on what is really stored.
Readers use one connection per thread.

Exceptions (errors.py): StoreError ← StoreClosed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal, TypeVar

from nanofleet.controller import devstate as ds
from nanofleet.controller.errors import StoreClosed, StoreError
from nanofleet.controller.migrations import MIGRATIONS
from nanofleet.controller.pg_migrations import PG_MIGRATIONS
from nanofleet.controller.pg_telemetry import PgTelemetry
from nanofleet.controller.views import (
    DeviceEvent,
    DeviceView,
    PublishedPolicy,
    Rejection,
    RollupPoint,
    TelemetryPoint,
)
from nanofleet.pg_db import PgWriter, dialect
from nanofleet.protos import fleet_pb2
from nanofleet.sqlite_db import DatabaseClosed, Writer, create_private, in_transaction
from nanofleet.store_url import StoreTarget, as_target

from .devstate import Batch, BatchOutcome, TelemetryRow, row_from_pb

__all__ = ["Batch", "BatchOutcome", "Store", "StoreClosed", "StoreError", "TelemetryRow", "row_from_pb"]

T = TypeVar("T")
log = logging.getLogger(__name__)
_PRUNE_AGAIN_S = 1.0      # when a prune stopped at its chunk: the rest soon, between ingest batches
_PRUNE_CHUNK = 50_000     # raw rows a prune deletes at most, so one never holds the writer for long
_CHECKPOINT_EVERY_S = 0.5
ROUTES = ("local", "cloud", "queued", "rejected")  # the agent's route counters the overview shows
ROUTE_SNAPSHOT_EVERY_MS = 5 * 60_000  # cumulative route counters kept this often ...
_ROUTE_SNAPSHOT_KEEP_MS = 75 * 60_000  # ... for a little over the hour the overview looks back


_TELEMETRY_COLUMNS = ("device_id, ts_ms, bd_seq, seq, received_ms, cpu_percent, load1, ram_available_mb, temp_max_c, "
                      "thermal_level, throttle_ratio, queue_depth, battery_pct, replayed, slots_waiting, "
                      "queue_oldest_age_s, tokens_per_s")
# columns named: a later migration adding one cannot shift these values into the wrong place
_INSERT_TELEMETRY = (f"INSERT INTO telemetry ({_TELEMETRY_COLUMNS}) "
                     f"VALUES ({', '.join('?' * len(_TELEMETRY_COLUMNS.split(',')))}) ON CONFLICT DO NOTHING")
_SET_GROUP = ("INSERT INTO device_groups VALUES (?, ?) ON CONFLICT (device_id) DO UPDATE SET grp = excluded.grp")
_DAY_MS = 86_400_000
_ROLLUP_COLUMNS = ("device_id, ts_ms, n, cpu_avg, cpu_max, temp_avg, temp_max, ram_available_min, tokens_per_s_avg, "
                   "tokens_per_s_n")
_ROLLUP_UPSERT = "ON CONFLICT (device_id, ts_ms) DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _ROLLUP_COLUMNS.replace(" ", "").split(",")[2:])


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(
        self,
        path: str | Path | StoreTarget,
        *,
        raw_retention_s: float = 7 * 86_400,
        rollup_1m_retention_s: float = 31 * 86_400,
        rollup_1h_retention_s: float = 400 * 86_400,
        stale_factor: float = 2.5,
        rollup_every_s: float = 2.0,
        prune_every_s: float = 60.0,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        target = as_target(path)
        self.target = target
        self.path: Path | str = target.path if target.path is not None else str(target)
        self._retention = (raw_retention_s, rollup_1m_retention_s, rollup_1h_retention_s)
        self.stale_factor = stale_factor
        self._clock = clock
        self._rollup_every_s, self._prune_every_s = rollup_every_s, prune_every_s
        self._touched: set[tuple[str, int]] = set()
        self._next_rollup = time.monotonic() + rollup_every_s
        self._next_prune = time.monotonic() + prune_every_s
        self._state = ds.DeviceStates({})
        self._group_of: Callable[[str], str] | None = None  # fleet.yaml's rule, once set_group_resolver ran
        self._next_route_snapshot = 0
        self.reloads = 0  # times the device mirror was reloaded after a rollback
        self._pg = PgTelemetry([c.strip() for c in _TELEMETRY_COLUMNS.split(",")])  # used on PostgreSQL only
        self.telemetry_by_copy = True  # PostgreSQL: COPY (False: executemany, as on SQLite; the bench compares)
        self.db: Writer
        if target.kind == "postgresql":
            assert target.url is not None
            self.db = PgWriter(target.url, PG_MIGRATIONS, name="store-writer", housekeeping=self._housekeeping,
                               housekeeping_s=0.5, on_rollback=self._reload)
        else:
            for suffix in ("", "-wal", "-shm"):  # documented 0600: also a file an older controller made 0644
                if suffix == "" or Path(f"{self.path}{suffix}").exists():
                    create_private(f"{self.path}{suffix}")
            self.db = Writer(self.path, MIGRATIONS, name="store-writer", migrations_table="_migrations",
                             housekeeping=self._housekeeping, housekeeping_s=0.5, checkpoint_s=_CHECKPOINT_EVERY_S,
                             on_rollback=self._reload)
        self.db.call(self._load)

    @property
    def check_gaps(self) -> bool:
        """Sparkplug seq gap detection; off when several controllers share a fleet's messages ($share)."""
        return self._state.check_gaps

    @check_gaps.setter
    def check_gaps(self, value: bool) -> None:
        self._state.check_gaps = value

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _load(self, conn: sqlite3.Connection) -> None:
        check_gaps = self._state.check_gaps
        self._state = ds.DeviceStates.load(conn)
        self._state.check_gaps = check_gaps

    def _reload(self, conn: sqlite3.Connection) -> None:
        """After a rollback: the in-memory devices may hold what the file does not; the file is the truth."""
        self.reloads += 1
        self._pg.forget()  # first: a partition made by the rolled-back transaction is gone even if loading fails
        self._load(conn)

    def _housekeeping(self, conn: sqlite3.Connection) -> None:
        """Rollups every rollup_every_s, retention every prune_every_s (sooner while a prune has more to do)."""
        mono = time.monotonic()
        closing = self.db.closed if hasattr(self, "db") else False
        if self._touched and (mono >= self._next_rollup or closing):
            self._next_rollup = mono + self._rollup_every_s
            touched = set(self._touched)
            try:
                in_transaction(conn, self._flush_rollups)
            except BaseException:
                self._touched |= touched  # rolled back: those minutes are rolled up on the next tick
                raise
        wall = self._clock()
        if wall >= self._next_route_snapshot and not closing:
            self._next_route_snapshot = wall + ROUTE_SNAPSHOT_EVERY_MS  # also after a failure: no retry storm
            in_transaction(conn, lambda c: self._snapshot_routes(c, wall))
        if dialect(conn) == "postgresql" and not closing:  # today's and tomorrow's partitions, ahead of the batches
            ahead = self._pg.missing((wall // _DAY_MS, wall // _DAY_MS + 1))
            if ahead:
                try:
                    in_transaction(conn, lambda c: self._pg.ensure(c, ahead))
                except BaseException:
                    self._pg.forget()
                    raise
        if mono >= self._next_prune and not closing:
            self._next_prune = mono + self._prune_every_s  # also after a failure: no retry storm
            try:
                more = in_transaction(conn, lambda c: self._prune(c, self._clock()))
            except BaseException:
                self._pg.forget()  # a partition dropped in the rolled-back transaction is back
                raise
            self._next_prune = mono + (_PRUNE_AGAIN_S if more else self._prune_every_s)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Run `fn(conn)` on the writer thread inside one transaction; the future answers after COMMIT."""
        if self.db.closed:
            raise StoreClosed(f"store {self.path} is closed")
        return self.db.submit(fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.submit(fn).result()

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` on this thread's read connection (from a worker thread, never the event loop)."""
        try:
            return self.db.read(fn)
        except DatabaseClosed as exc:
            raise StoreClosed(f"store {self.path} is closed") from exc

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self.read(lambda conn: conn.execute(sql, args).fetchall())

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- write side ---------------------------------------------------------------------------------------------
    def submit_batch(self, batch: Batch) -> Future[BatchOutcome]:
        """Ingest's path: statuses, telemetry rows, rejections and command results of one batch, one transaction."""
        return self.submit(lambda conn: self._apply(conn, batch))

    def apply(self, batch: Batch) -> BatchOutcome:
        return self.submit_batch(batch).result()

    def write_status(self, fleet: str, status: fleet_pb2.DeviceStatus, received_ms: int) -> BatchOutcome:
        return self.apply(Batch(fleet, received_ms, statuses=[status]))

    def write_telemetry(self, fleet: str, items: list[fleet_pb2.Telemetry], received_ms: int) -> BatchOutcome:
        return self.apply(Batch(fleet, received_ms, telemetry=[row_from_pb(t) for t in items]))

    def _apply(self, conn: sqlite3.Connection, batch: Batch) -> BatchOutcome:
        pg = self._pg if dialect(conn) == "postgresql" else None
        if pg is not None and batch.telemetry:  # DDL before the device rows are locked: fewer lock waits
            horizon = batch.received_ms + ds.FUTURE_MS
            pg.ensure(conn, {r.ts_ms // _DAY_MS for r in batch.telemetry if r.ts_ms <= horizon})
        outcome = self._state.apply(conn, batch)  # raising rolls this job back, then _reload mends the mirror
        if outcome.new_devices and self._group_of is not None:
            conn.executemany(_SET_GROUP, [(d, self._group_of(d)) for d in outcome.new_devices])
        if batch.telemetry:
            at = batch.received_ms
            rows = [(r.device_id, r.ts_ms, r.bd_seq, r.seq, at, r.cpu_percent, r.load1, r.ram_available_mb,
                     r.temp_max_c, r.thermal_level, r.throttle_ratio, r.queue_depth, r.battery_pct, r.replayed,
                     r.slots_waiting, r.queue_oldest_age_s, r.tokens_per_s) for r in batch.telemetry]
            if pg is not None and self.telemetry_by_copy:
                outcome.inserted = pg.insert(conn, rows)
            else:
                before = conn.total_changes
                conn.executemany(_INSERT_TELEMETRY, rows)
                outcome.inserted = conn.total_changes - before
            outcome.duplicates = len(batch.telemetry) - outcome.inserted
            self._touched.update((r.device_id, r.ts_ms - r.ts_ms % 60_000) for r in batch.telemetry)
        return outcome

    def sweep_stale(self, at_ms: int | None = None) -> list[DeviceEvent]:
        """Mark online devices silent for more than stale_factor x their telemetry interval as stale."""
        at = self._clock() if at_ms is None else at_ms
        return self._call(lambda conn: self._state.sweep_stale(conn, at, self.stale_factor))

    def mark_all(self, state: Literal["offline", "stale"], reason: str, at_ms: int | None = None) -> list[DeviceEvent]:
        """Mark every online device `state` (e.g. the controller lost the broker and cannot vouch for any)."""
        at = self._clock() if at_ms is None else at_ms
        return self._call(lambda conn: self._state.mark_all(conn, state, reason, at))

    def set_groups(self, groups: dict[str, str | None]) -> None:
        """Device -> group, from fleet.yaml (the store shows it; devices report no group themselves)."""

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM device_groups")
            conn.executemany("INSERT INTO device_groups VALUES (?, ?)", list(groups.items()))

        self._call(run)

    def expect_devices(self, fleet: str, device_ids: list[str]) -> list[str]:
        """Show the devices fleet.yaml lists that never sent a message, as `never_seen` (each with its group when
        the resolver is set); returns the ids added."""

        def run(conn: sqlite3.Connection) -> list[str]:
            new = self._state.expect(conn, device_ids, fleet)
            if new and self._group_of is not None:
                conn.executemany(_SET_GROUP, [(d, self._group_of(d)) for d in new])
            return new

        return self._call(run)

    def set_group_resolver(self, group_of: Callable[[str], str]) -> None:
        """Give every device its group by fleet.yaml's one rule (FleetConfig.group_of): each known device now, each
        new one in the batch that first stores it — so the dashboard filters and sorts by group in SQL. The same
        rule again (the service's and its web app's config are one object) rewrites nothing."""
        if group_of == self._group_of:
            return

        def run(conn: sqlite3.Connection) -> None:
            ids = [row[0] for row in conn.execute("SELECT device_id FROM devices")]
            conn.execute("DELETE FROM device_groups")
            conn.executemany("INSERT INTO device_groups VALUES (?, ?)", [(d, group_of(d)) for d in ids])
            self._group_of = group_of  # on the writer thread, like every batch that reads it

        self._call(run)

    def _snapshot_routes(self, conn: sqlite3.Connection, at_ms: int) -> None:
        """Every device's cumulative route counters now (agents count since they started): the overview's route mix
        of the last hour is the counters now minus these, an hour back (controller/queries.py)."""
        if dialect(conn) == "postgresql":
            extract = ", ".join(f"coalesce((route_counts::jsonb ->> '{r}')::bigint, 0)" for r in ROUTES)
        else:
            extract = ", ".join(f"coalesce(json_extract(route_counts, '$.{r}'), 0)" for r in ROUTES)
        conn.execute(f"""INSERT INTO route_snapshots SELECT ?, device_id, birth_ms, {extract} FROM devices WHERE true
                         ON CONFLICT (ts_ms, device_id) DO UPDATE SET birth_ms = excluded.birth_ms,
                         local = excluded.local, cloud = excluded.cloud, queued = excluded.queued,
                         rejected = excluded.rejected""", (at_ms,))
        conn.execute("DELETE FROM route_snapshots WHERE ts_ms < ?", (at_ms - _ROUTE_SNAPSHOT_KEEP_MS,))

    def snapshot_routes(self, at_ms: int | None = None) -> None:
        """Take a route snapshot now (housekeeping takes one every ROUTE_SNAPSHOT_EVERY_MS by itself)."""
        at = self._clock() if at_ms is None else at_ms
        self._call(lambda conn: self._snapshot_routes(conn, at))

    def _flush_rollups(self, conn: sqlite3.Connection) -> None:
        touched, self._touched = self._touched, set()
        if not touched:
            return
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _touched (device_id TEXT, ts_ms BIGINT)")
        conn.execute("DELETE FROM _touched")
        conn.executemany("INSERT INTO _touched VALUES (?, ?)", touched)
        conn.execute(
            f"""INSERT INTO rollup_1m ({_ROLLUP_COLUMNS})
               SELECT b.device_id, b.ts_ms, count(*), avg(t.cpu_percent), max(t.cpu_percent), avg(t.temp_max_c),
                      max(t.temp_max_c), min(t.ram_available_mb), avg(t.tokens_per_s), count(t.tokens_per_s)
               FROM _touched b JOIN telemetry t
                 ON t.device_id = b.device_id AND t.ts_ms >= b.ts_ms AND t.ts_ms < b.ts_ms + 60000
               WHERE true GROUP BY b.device_id, b.ts_ms {_ROLLUP_UPSERT}"""
        )
        hours = {(d, ts - ts % 3_600_000) for d, ts in touched}
        conn.execute("DELETE FROM _touched")
        conn.executemany("INSERT INTO _touched VALUES (?, ?)", hours)
        conn.execute(
            f"""INSERT INTO rollup_1h ({_ROLLUP_COLUMNS})
               SELECT b.device_id, b.ts_ms, sum(r.n), sum(r.cpu_avg * r.n) / sum(r.n), max(r.cpu_max),
                      sum(r.temp_avg * r.n) / nullif(sum(CASE WHEN r.temp_avg IS NULL THEN 0 ELSE r.n END), 0),
                      max(r.temp_max), min(r.ram_available_min),
                      sum(r.tokens_per_s_avg * r.tokens_per_s_n) / nullif(sum(r.tokens_per_s_n), 0),
                      sum(r.tokens_per_s_n)
               FROM _touched b JOIN rollup_1m r
                 ON r.device_id = b.device_id AND r.ts_ms >= b.ts_ms AND r.ts_ms < b.ts_ms + 3600000
               WHERE true GROUP BY b.device_id, b.ts_ms {_ROLLUP_UPSERT}"""
        )

    def _prune(self, conn: sqlite3.Connection, at_ms: int) -> bool:
        """Delete what is past retention, raw rows at most ~_PRUNE_CHUNK at a time; True when more are left.
        PostgreSQL drops the raw rows' whole day partitions instead (controller/pg_telemetry.py)."""
        raw, m1, h1 = self._retention
        cutoff = at_ms - int(raw * 1000)
        row = None
        if dialect(conn) == "postgresql":
            self._pg.drop_before(conn, cutoff)
        else:
            row = self._prune_raw(conn, cutoff)
        conn.execute("DELETE FROM rollup_1m WHERE ts_ms < ?", (at_ms - int(m1 * 1000),))
        conn.execute("DELETE FROM rollup_1h WHERE ts_ms < ?", (at_ms - int(h1 * 1000),))
        conn.execute(
            "DELETE FROM device_events WHERE id < (SELECT coalesce(max(id), 0) - 100000 FROM device_events)"
        )
        return row is not None

    @staticmethod
    def _prune_raw(conn: sqlite3.Connection, cutoff: int) -> Any:
        """SQLite: raw rows before `cutoff`, a chunk at most (by the ts index); the chunk's last row, if it stopped."""
        row = conn.execute("SELECT ts_ms FROM telemetry WHERE ts_ms < ? ORDER BY ts_ms LIMIT 1 OFFSET ?",
                           (cutoff, _PRUNE_CHUNK)).fetchone()
        before = conn.total_changes
        conn.execute("DELETE FROM telemetry WHERE ts_ms < ?", (row[0] if row else cutoff,))
        if row and conn.total_changes == before:  # a chunk's worth of rows share one timestamp: take them all
            conn.execute("DELETE FROM telemetry WHERE ts_ms <= ?", (row[0],))
        return row

    # -- policies -----------------------------------------------------------------------------------------------
    def next_policy_version(self) -> int:
        """Allocate the fleet's next policy version (monotonic, persisted)."""

        def run(conn: sqlite3.Connection) -> int:
            # one statement: several controllers on one PostgreSQL never hand out the same version
            row = conn.execute("INSERT INTO meta VALUES ('policy_version', '1') ON CONFLICT (key) DO UPDATE "
                               "SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT) RETURNING value").fetchone()
            return int(row[0])

        return self._call(run)

    def record_policies(self, published: Iterable[PublishedPolicy],
                        changes: Mapping[str, Sequence[str]] | None = None) -> None:
        """Record what was published; with `changes` (device -> "field: old -> new" lines) also the round's diff,
        kept as groups of devices with the same lines (the groups page shows the last round's)."""
        rows = [(p.device_id, p.version, p.content_hash, p.policy_json, p.published_ms) for p in published]

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("""INSERT INTO policies VALUES (?,?,?,?,?) ON CONFLICT (device_id) DO UPDATE SET
                version = excluded.version, content_hash = excluded.content_hash, policy_json = excluded.policy_json,
                published_ms = excluded.published_ms""", rows)
            if changes is not None and rows:
                by_lines: dict[tuple[str, ...], list[str]] = {}
                for device_id, lines in sorted(changes.items()):
                    by_lines.setdefault(tuple(lines), []).append(device_id)
                diff = [{"changes": list(k), "devices": v} for k, v in by_lines.items()]
                conn.execute("""INSERT INTO policy_rounds VALUES (?, ?, ?, ?) ON CONFLICT (version) DO UPDATE SET
                                published_ms = excluded.published_ms, devices = excluded.devices,
                                changes_json = excluded.changes_json""",
                             (rows[0][1], rows[0][4], len(rows), json.dumps(diff)))

        self._call(run)

    def published_policies(self) -> dict[str, PublishedPolicy]:
        rows = self._rows("SELECT * FROM policies")
        return {r[0]: PublishedPolicy(*r) for r in rows}

    # -- read side ------------------------------------------------------------------------------------------------
    _DEVICE_SQL = """SELECT d.device_id, d.fleet, g.grp, d.state, d.last_seen_ms, d.birth_ms, d.bd_seq,
        d.agent_version, d.model_name, d.model_availability, d.policy_version, d.cpu_percent, d.ram_total_mb,
        d.ram_available_mb, d.temp_max_c, d.thermal_level, d.throttled, d.battery_pct, d.charging, d.queue_depth,
        d.route_counts, d.rejected_count, d.gap_count, d.telemetry_interval_s, d.slots_waiting,
        d.queue_oldest_age_s, d.queue_counters
        FROM devices d LEFT JOIN device_groups g ON g.device_id = d.device_id"""

    @staticmethod
    def _device(row: tuple[Any, ...]) -> DeviceView:
        r = list(row)
        r[15] = ds.thermal_name(r[15])
        r[16] = bool(r[16])
        r[18] = None if r[18] is None else bool(r[18])
        r[20] = json.loads(r[20] or "{}")
        r[26] = json.loads(r[26] or "{}")
        return DeviceView(*r)

    def list_devices(self) -> list[DeviceView]:
        rows = self._rows(self._DEVICE_SQL + " ORDER BY d.device_id")
        return [self._device(r) for r in rows]

    def get_device(self, device_id: str) -> DeviceView | None:
        rows = self._rows(self._DEVICE_SQL + " WHERE d.device_id = ?", (device_id,))
        row = rows[0] if rows else None
        return self._device(row) if row else None

    def telemetry(self, device_id: str, since_ms: int | None = None, limit: int = 1000) -> list[TelemetryPoint]:
        """Newest `limit` points at or after `since_ms`, oldest first."""
        rows = self._rows(
            """SELECT ts_ms, cpu_percent, ram_available_mb, temp_max_c, thermal_level, throttle_ratio, queue_depth,
                      battery_pct, slots_waiting, queue_oldest_age_s, tokens_per_s FROM telemetry
               WHERE device_id = ? AND ts_ms >= ? ORDER BY ts_ms DESC LIMIT ?""",
            (device_id, since_ms or 0, limit),
        )
        return [TelemetryPoint(r[0], r[1], r[2], r[3], ds.thermal_name(r[4]), r[5], r[6], r[7], r[8], r[9], r[10])
                for r in reversed(rows)]

    def rollups(
        self, device_id: str, resolution: Literal["1m", "1h"], since_ms: int | None = None
    ) -> list[RollupPoint]:
        if resolution not in ("1m", "1h"):
            raise StoreError(f"resolution must be '1m' or '1h', got {resolution!r}")
        rows = self._rows(
            f"SELECT ts_ms, n, cpu_avg, cpu_max, temp_avg, temp_max, ram_available_min, tokens_per_s_avg, "
            f"tokens_per_s_n FROM rollup_{resolution} "
            "WHERE device_id = ? AND ts_ms >= ? ORDER BY ts_ms",
            (device_id, since_ms or 0),
        )
        return [RollupPoint(*r) for r in rows]

    def policy_convergence(self) -> dict[int, int]:
        rows = self._rows("SELECT policy_version, count(*) FROM devices GROUP BY policy_version")
        return {int(v): int(n) for v, n in rows}

    def rejections(self, limit: int = 100) -> list[Rejection]:
        rows = self._rows(
            "SELECT device_id, topic, reason, count, last_ms FROM rejections ORDER BY last_ms DESC LIMIT ?", (limit,)
        )
        return [Rejection(r[0] or None, r[1], r[2], r[3], r[4]) for r in rows]

    def device_events(self, device_id: str | None = None, limit: int = 1000) -> list[DeviceEvent]:
        """State changes, oldest first (the device page shows them)."""
        sql = "SELECT device_id, ts_ms, state, reason, bd_seq FROM device_events"
        args: tuple[Any, ...] = ()
        if device_id is not None:
            sql, args = sql + " WHERE device_id = ?", (device_id,)
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [DeviceEvent(*r) for r in reversed(rows)]
