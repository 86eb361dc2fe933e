"""Raw telemetry on PostgreSQL: batches in by `COPY`, one table per UTC day, retention by dropping whole days.

- Rows go by `COPY` straight into `telemetry`, inside a savepoint: the common case (no row stored before) costs one
  write a row. A batch with a duplicate fails that COPY on the primary key; rolled back to the savepoint, it goes
  the careful way: `COPY` into a session temp table (`_telemetry_in`, made once per write connection), then
  `INSERT INTO telemetry SELECT … ON CONFLICT DO NOTHING`, whose row count tells inserted from duplicates as
  executemany's did. A redelivered message is never stored twice (bench/bench_ingest_pg.py: COPY vs executemany;
  the straight COPY measured ~1.7x the staged one for 2,000-row batches).
- `telemetry_YYYYMMDD` holds the rows whose `ts_ms` falls in that UTC day. A batch makes the partitions it needs
  (under a transaction-level advisory lock, so two controllers creating the same day take turns) and the store's
  housekeeping makes today's and tomorrow's ahead, so a batch rarely has DDL to do. What this process knows to exist
  is cached; the cache is forgotten whenever a transaction rolls back (a CREATE TABLE rolls back with it).
- Retention drops the partitions whose whole day is older than the cutoff: no row deletes, no vacuum debt. A row for
  a day already dropped (a replay older than retention) makes the day again; the next prune drops it.
- Rows stamped more than `FUTURE_MS` ahead of their arrival are refused by the store (controller.devstate, on both
  backends, a counted rejection `ts_in_future`): a device with a wild clock must not make partitions that no
  retention would ever drop.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg.errors

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
_LOCK_CLASS = 7301  # pg_advisory_xact_lock(class, key): this key space is the store's (keys: 0 = partitions)
_STAGING = "_telemetry_in"


def day_name(day: int) -> str:
    """The partition of UTC day `day` (days since the epoch)."""
    return time.strftime("telemetry_%Y%m%d", time.gmtime(day * 86_400))


class PgTelemetry:
    """The PostgreSQL half of the store's telemetry (see the module docstring); used on the writer thread only."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = ", ".join(columns)
        self._days: set[int] = set()  # partitions known to exist (committed, or made in the open transaction)
        self._staging_of: Any = None  # the raw connection whose session holds the staging table
        self.copy_conflicts = 0  # batches whose straight COPY met a stored row (then staged)
        self.partitions_made = 0
        self.partitions_dropped = 0

    def forget(self) -> None:
        """After a rollback: what the rolled-back transaction made (partitions, the staging table) is gone."""
        self._days.clear()
        self._staging_of = None

    def missing(self, days: Iterable[int]) -> list[int]:
        """The days whose partition this process does not know to exist."""
        return sorted(set(days) - self._days)

    def ensure(self, conn: Any, days: Iterable[int]) -> None:
        """The partition of each day, made if missing (a no-op for days this process already knows)."""
        missing = self.missing(days)
        if not missing:
            return
        conn.execute("SELECT pg_advisory_xact_lock(?, 0)", (_LOCK_CLASS,))
        for day in missing:
            name = day_name(day)
            if conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is None:
                conn.execute(f"CREATE TABLE {name} PARTITION OF telemetry "
                             f"FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})")
                self.partitions_made += 1
            self._days.add(day)

    def insert(self, conn: Any, rows: list[tuple[Any, ...]]) -> int:
        """COPY the rows in, keep the new ones; returns how many were inserted (the rest were duplicates)."""
        raw = conn.raw
        conn.execute("SAVEPOINT telemetry_copy")
        try:
            with raw.cursor().copy(f"COPY telemetry ({self.columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.errors.UniqueViolation:  # a row stored before (a redelivery): the staged way below
            conn.execute("ROLLBACK TO SAVEPOINT telemetry_copy")
            conn.execute("RELEASE SAVEPOINT telemetry_copy")
            self.copy_conflicts += 1
        else:
            conn.execute("RELEASE SAVEPOINT telemetry_copy")
            return len(rows)
        if self._staging_of is not raw:
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (LIKE telemetry)")
            self._staging_of = raw
        else:
            conn.execute(f"TRUNCATE {_STAGING}")  # the rows of the previous batch
        with raw.cursor().copy(f"COPY {_STAGING} ({self.columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur = conn.execute(f"INSERT INTO telemetry ({self.columns}) SELECT {self.columns} FROM {_STAGING} "
                           "ON CONFLICT DO NOTHING")
        return max(cur.rowcount, 0)

    def existing_days(self, conn: Any) -> list[int]:
        rows = conn.execute("""SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                               WHERE i.inhparent = 'telemetry'::regclass""").fetchall()
        days = []
        for (name,) in rows:
            try:
                days.append(calendar.timegm(time.strptime(name, "telemetry_%Y%m%d")) // 86_400)
            except ValueError:  # not one of ours (an operator's own partition): left alone
                log.warning("telemetry partition %s is not named telemetry_YYYYMMDD: retention leaves it", name)
        return sorted(days)

    def drop_before(self, conn: Any, cutoff_ms: int) -> list[str]:
        """Drop the partitions whose whole day ends at or before `cutoff_ms`; their names."""
        dropped = []
        for day in self.existing_days(conn):
            if (day + 1) * DAY_MS > cutoff_ms:
                break
            conn.execute("SET LOCAL lock_timeout = '2s'")  # never queue ingest behind us for long: next tick
            conn.execute(f"DROP TABLE IF EXISTS {day_name(day)}")
            self._days.discard(day)
            self.partitions_dropped += 1
            dropped.append(day_name(day))
        return dropped
