"""The durable offline queue: one SQLite file (WAL, `synchronous=FULL`, 0600) in the agent's private data dir,
written only through `nanofleet.sqlite_db.Writer`, so the requests that arrive while a commit is in flight share
the next one (one fsync for the burst). `enqueue` returns only after COMMIT: a 202 is never given for an entry that
is not on disk.

An entry's life: queued → running → done | failed, or queued → expired (TTL) | cancelled; a `running` entry found
at start (the agent died mid-drain) goes back to `queued` and runs again — its id is the gateway's request_id, so
a cloud answer already paid for is not charged twice. Finished entries are pruned `keep_s` after they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanofleet.agent.errors import (
    IdempotencyConflict,
    NotCancellable,
    QueueDiskFull,
    QueueFull,
    QueueUnavailable,
    RequestNotFound,
)
from nanofleet.agent.queue.schedule import Candidate
from nanofleet.sqlite_db import DatabaseClosed, Writer

log = logging.getLogger("nanofleet.agent.queue")
ROOT_UID = 0
TCP_UID = -1      # peers on the optional loopback TCP listener: no SO_PEERCRED, one owner of their own
PEER_UNKNOWN = -2  # a unix-socket peer whose uid could not be read: may queue nothing, sees nothing
ACTIVE = ("queued", "running")

MIGRATIONS = [("001_requests", """
CREATE TABLE requests (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  uid INTEGER NOT NULL,
  app TEXT NOT NULL,
  idem_key TEXT,
  body_hash TEXT NOT NULL,
  request TEXT NOT NULL,
  size INTEGER NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  restarts INTEGER NOT NULL DEFAULT 0,
  route TEXT NOT NULL DEFAULT 'queue',
  reason TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  not_before_ms INTEGER NOT NULL,
  expires_ms INTEGER NOT NULL,
  finished_ms INTEGER,
  result TEXT,
  error TEXT
);
CREATE UNIQUE INDEX requests_idem ON requests(uid, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX requests_state ON requests(state, seq);
CREATE INDEX requests_app ON requests(state, app, seq);
CREATE INDEX requests_finished ON requests(finished_ms) WHERE finished_ms IS NOT NULL
""")]

_COLUMNS = ("id, uid, app, state, attempts, restarts, route, reason, created_ms, updated_ms, not_before_ms, "
            "expires_ms, finished_ms, result, error, seq")


@dataclass(frozen=True, slots=True)
class Limits:
    max_items: int = 10_000
    max_bytes: int = 64 << 20      # request bodies of the queued + running entries
    ttl_s: float = 86_400.0
    keep_s: float = 86_400.0       # finished results stay readable this long


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    new: bool                      # False: an Idempotency-Key answered with the entry it made before
    state: str
    reason: str


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc).lower())


class QueueStore:
    def __init__(self, path: Path, limits: Limits = Limits(), *, clock: Callable[[], float] = time.time,
                 max_file_bytes: int | None = None, housekeeping_s: float = 0.5, max_batch: int = 512) -> None:
        self.path = path
        self.limits = limits
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._depth = 0
        self._bytes = 0
        self._waiters: dict[str, asyncio.Event] = {}
        # max_batch=1 is the naive one-commit-per-request queue (the benchmark's yardstick)
        self._writer = Writer(path, MIGRATIONS, name="queue-writer", synchronous="FULL", max_batch=max_batch,
                              housekeeping=self._housekeeping, housekeeping_s=housekeeping_s)
        if max_file_bytes is not None:  # a hard cap on the file: SQLite then says SQLITE_FULL (→ 507)
            page = self._writer.call(lambda c: c.execute("PRAGMA page_size").fetchone()[0])
            self._writer.call(lambda c: c.execute(f"PRAGMA max_page_count={max(8, max_file_bytes // page)}"))
        self.recovered = self._writer.call(self._recover)

    # -- writer-thread jobs ----------------------------------------------------------------------------------
    def _recover(self, conn: sqlite3.Connection) -> int:
        """At start: entries cut mid-run go back to the queue (run again, once): the cut attempt is not theirs to
        pay, but it is counted in `restarts`, so an entry that brings the agent down each time ends (drain.py)."""
        n = conn.execute("UPDATE requests SET state = 'queued', reason = 'restarted', updated_ms = ?, "
                         "attempts = attempts - 1, restarts = restarts + 1 WHERE state = 'running'",
                         (self._now_ms(),)).rowcount
        self._recount(conn)
        return n

    def _recount(self, conn: sqlite3.Connection) -> None:
        depth, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM requests "
                                   "WHERE state IN ('queued', 'running')").fetchone()
        self._depth, self._bytes = depth, size

    def _housekeeping(self, conn: sqlite3.Connection) -> None:
        now = self._now_ms()
        expired = conn.execute(
            "UPDATE requests SET state = 'expired', reason = 'ttl_expired', error = 'not served within the queue '"
            "|| 'TTL', finished_ms = ?, updated_ms = ? WHERE state = 'queued' AND expires_ms <= ?",
            (now, now, now)).rowcount
        if expired:
            self.counts["expired"] += expired
            self._recount(conn)
        pruned = conn.execute("DELETE FROM requests WHERE finished_ms IS NOT NULL AND finished_ms <= ?",
                              (now - int(self.limits.keep_s * 1000),)).rowcount
        self.counts["pruned"] += pruned

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """A write job; SQLite's errors become the queue's (SQLITE_FULL → QueueDiskFull), logged and counted."""
        try:
            return await self._writer.write(fn)
        except DatabaseClosed as exc:
            raise QueueUnavailable(f"the offline queue is closed: {exc}", retry_after=5) from None
        except sqlite3.Error as exc:
            # a failed COMMIT may have undone jobs whose counters moved: count again from the file
            self._writer.submit(self._recount)
            if _is_disk_full(exc):
                self.counts["disk_full"] += 1
                log.warning("offline queue %s: disk full (%s)", self.path, exc)
                raise QueueDiskFull("the offline queue's disk is full; the request was not queued", retry_after=60
                                    ) from None
            self.counts["write_errors"] += 1
            log.error("offline queue %s: write failed: %s", self.path, exc)
            raise QueueUnavailable(f"the offline queue could not write: {exc}", retry_after=5) from None

    # -- API -------------------------------------------------------------------------------------------------
    async def enqueue(self, request: dict[str, Any], *, uid: int, app: str, reason: str,
                      idem_key: str | None = None) -> Accepted:
        """Commit one request (the JSON the drainer will run) and return its entry once it is on disk."""
        raw = json.dumps(request, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(raw.encode()).hexdigest()
        size = len(raw)
        lim = self.limits

        def job(conn: sqlite3.Connection) -> Accepted:
            if idem_key is not None:
                row = conn.execute("SELECT id, body_hash, state, reason FROM requests WHERE uid = ? AND idem_key = ?",
                                   (uid, idem_key)).fetchone()
                if row is not None:
                    if row[1] != digest:
                        raise IdempotencyConflict(f"Idempotency-Key {idem_key!r} was used for entry {row[0]} with "
                                                  "another request body")
                    return Accepted(row[0], False, row[2], row[3])
            if self._depth >= lim.max_items:
                raise QueueFull(f"the offline queue is full ({self._depth} of {lim.max_items} entries)",
                                retry_after=60)
            if self._bytes + size > lim.max_bytes:
                raise QueueFull(f"the offline queue is full ({self._bytes} + {size} bytes over its "
                                f"{lim.max_bytes}-byte bound)", retry_after=60)
            now = self._now_ms()
            rid = "req_" + secrets.token_hex(12)
            conn.execute("INSERT INTO requests (id, uid, app, idem_key, body_hash, request, size, state, reason, "
                         "created_ms, updated_ms, not_before_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', "
                         "?, ?, ?, ?, ?)", (rid, uid, app, idem_key, digest, raw, size, reason, now, now, now,
                                            now + int(lim.ttl_s * 1000)))
            self._depth += 1
            self._bytes += size
            return Accepted(rid, True, "queued", reason)

        try:
            accepted: Accepted = await self._write(job)
        except QueueFull:
            self.counts["full"] += 1
            raise
        except IdempotencyConflict:
            self.counts["conflicts"] += 1
            raise
        if accepted.new:
            self.counts["enqueued"] += 1
        return accepted

    def _visible(self, uid: int) -> tuple[str, tuple[int, ...]]:
        return ("", ()) if uid == ROOT_UID else (" AND uid = ?", (uid,))

    async def get(self, rid: str, uid: int) -> dict[str, Any]:
        where, args = self._visible(uid)

        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(f"SELECT {_COLUMNS} FROM requests WHERE id = ?{where}", (rid, *args)).fetchone()

        row = await self._read(read)
        if row is None:  # another uid's entry is as absent as a pruned one: ids leak nothing
            raise RequestNotFound(f"request {rid!r} not found (never queued by this user, or pruned)")
        return _entry(row)

    async def wait(self, rid: str, uid: int, timeout_s: float) -> dict[str, Any]:
        """The entry once its state differs from now (or it is terminal), or as it is after `timeout_s`."""
        entry = await self.get(rid, uid)
        first = entry["state"]
        deadline = time.monotonic() + timeout_s
        while entry["state"] == first and entry["state"] in ACTIVE:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._waiters.setdefault(rid, asyncio.Event())
            # slices of ≤ 1 s: a TTL expiry (housekeeping, on the writer thread) wakes no one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 1.0))
            entry = await self.get(rid, uid)
        return entry

    def _changed(self, rid: str) -> None:
        event = self._waiters.pop(rid, None)
        if event is not None:
            event.set()

    async def entries(self, uid: int, *, state: str | None = None, app: str | None = None, limit: int = 50,
                   after: int = 0) -> tuple[list[dict[str, Any]], int | None]:
        """A page of entries in queue order, and the cursor of the next page (None: the last)."""
        where, args = self._visible(uid)
        sql = f"SELECT {_COLUMNS} FROM requests WHERE seq > ?{where}"
        params: list[Any] = [after, *args]
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        if app is not None:
            sql += " AND app = ?"
            params.append(app)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit + 1)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        return [_entry(r) for r in rows], (rows[-1][-1] if more else None)

    async def cancel(self, rid: str, uid: int) -> dict[str, Any]:
        where, args = self._visible(uid)

        def job(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(f"SELECT state, size FROM requests WHERE id = ?{where}", (rid, *args)).fetchone()
            if row is None:
                return None
            if row[0] != "queued":
                return f"already {row[0]}"
            now = self._now_ms()
            conn.execute("UPDATE requests SET state = 'cancelled', reason = 'cancelled', finished_ms = ?, "
                         "updated_ms = ? WHERE id = ?", (now, now, rid))
            self._depth -= 1
            self._bytes -= row[1]
            return "ok"

        outcome = await self._write(job)
        if outcome is None:
            raise RequestNotFound(f"request {rid!r} not found (never queued by this user, or pruned)")
        if outcome != "ok":
            raise NotCancellable(f"request {rid!r} is {outcome}: only a queued request can be cancelled")
        self.counts["cancelled"] += 1
        self._changed(rid)
        return await self.get(rid, uid)

    # -- the drainer's side ----------------------------------------------------------------------------------
    async def candidates(self, per_app: int) -> list[Candidate]:
        """The first `per_app` queued entries of each app (what `schedule.plan` needs), read through the
        (state, app, seq) index: a few rows per app, however long the queue."""
        def read(conn: sqlite3.Connection) -> list[Candidate]:
            # a loose index scan: one O(log n) step per app, not a pass over every queued row
            apps = [r[0] for r in conn.execute(
                "WITH RECURSIVE apps(app) AS (SELECT MIN(app) FROM requests WHERE state = 'queued' UNION ALL "
                "SELECT (SELECT MIN(app) FROM requests WHERE state = 'queued' AND app > apps.app) FROM apps "
                "WHERE apps.app IS NOT NULL) SELECT app FROM apps WHERE app IS NOT NULL")]
            out = []
            for app in apps:
                out += [Candidate(r[0], app, r[1], r[2] / 1000, r[3] / 1000) for r in conn.execute(
                    "SELECT id, seq, not_before_ms, expires_ms FROM requests WHERE state = 'queued' AND app = ? "
                    "ORDER BY seq LIMIT ?", (app, per_app))]
            return out

        result: list[Candidate] = await self._read(read)
        return result

    async def request(self, rid: str) -> dict[str, Any] | None:
        """The stored request of a queued entry (None once it is not queued)."""
        row = await self._read(lambda c: c.execute("SELECT request FROM requests WHERE id = ? AND state = 'queued'",
                                                   (rid,)).fetchone())
        return None if row is None else json.loads(row[0])

    async def claim(self, rid: str) -> tuple[dict[str, Any], int, int] | None:
        """queued → running (the attempt is counted on disk before it starts): (request, attempts, restarts), or
        None if it is no longer queued."""
        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], int, int] | None:
            now = self._now_ms()
            row = conn.execute("UPDATE requests SET state = 'running', attempts = attempts + 1, updated_ms = ? "
                               "WHERE id = ? AND state = 'queued' AND expires_ms > ? RETURNING request, attempts, "
                               "restarts", (now, rid, now)).fetchone()
            return None if row is None else (json.loads(row[0]), row[1], row[2])

        claimed: tuple[dict[str, Any], int, int] | None = await self._write(job)
        if claimed is not None:
            self._changed(rid)
        return claimed

    async def finish(self, rid: str, route: str, reason: str, result: dict[str, Any]) -> None:
        await self._end(rid, "done", route, reason, json.dumps(result, separators=(",", ":")), None)
        self.counts[f"drained_{route}"] += 1

    async def fail(self, rid: str, route: str, reason: str, error: str) -> None:
        await self._end(rid, "failed", route, reason, None, error)
        self.counts["failed"] += 1

    async def _end(self, rid: str, state: str, route: str, reason: str, result: str | None,
                   error: str | None) -> None:
        def job(conn: sqlite3.Connection) -> None:
            now = self._now_ms()
            row = conn.execute("UPDATE requests SET state = ?, route = ?, reason = ?, result = ?, error = ?, "
                               "finished_ms = ?, updated_ms = ? WHERE id = ? AND state = 'running' RETURNING size",
                               (state, route, reason, result, error, now, now, rid)).fetchone()
            if row is not None:
                self._depth -= 1
                self._bytes -= row[0]

        await self._write(job)
        self._changed(rid)

    async def requeue(self, rid: str, delay_s: float, reason: str, *, refund_attempt: bool = False) -> None:
        """running → queued, not before `delay_s` from now (a retry, or a route that closed again)."""
        def job(conn: sqlite3.Connection) -> None:
            now = self._now_ms()
            conn.execute("UPDATE requests SET state = 'queued', reason = ?, not_before_ms = ?, updated_ms = ?, "
                         "attempts = attempts - ? WHERE id = ? AND state = 'running'",
                         (reason, now + int(delay_s * 1000), now, int(refund_attempt), rid))

        await self._write(job)
        self._changed(rid)

    # -- figures ---------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Entries not finished (queued + running)."""
        return self._depth

    @property
    def closed(self) -> bool:
        return self._writer.closed

    def oldest_age_s(self) -> float:
        row = self._writer.read(lambda c: c.execute(
            "SELECT created_ms FROM requests WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone())
        return 0.0 if row is None else max(0.0, self.clock() - row[0] / 1000)

    def status(self) -> dict[str, Any]:
        """For /v1/status `routes.queue` and telemetry: availability, depth, oldest age, bytes, limits, counters."""
        available = not self._writer.closed
        return {"available": available, "reason": "" if available else "closed", "depth": self._depth,
                "oldest_age_s": round(self.oldest_age_s(), 1) if available else 0.0, "bytes": self._bytes,
                "limits": {"max_items": self.limits.max_items, "max_bytes": self.limits.max_bytes,
                           "ttl_s": self.limits.ttl_s, "keep_s": self.limits.keep_s},
                "counters": dict(self.counts), "commits": self._writer.batches}

    def set_limits(self, limits: Limits) -> None:
        """A new policy's bounds (entries already queued keep their expiry)."""
        self.limits = limits

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return await self._writer.aread(fn)
        except DatabaseClosed as exc:
            raise QueueUnavailable(f"the offline queue is closed: {exc}", retry_after=5) from None

    def close(self) -> None:
        self._writer.close()


def _entry(row: tuple[Any, ...]) -> dict[str, Any]:
    (rid, _uid, app, state, attempts, restarts, route, reason, created, updated, _nb, expires, finished, result, error,
     _seq) = row
    out: dict[str, Any] = {"id": rid, "object": "nanofleet.request", "state": state, "app": app,
                           "attempts": attempts, "restarts": restarts, "route": route, "reason": reason,
                           "created_ms": created, "updated_ms": updated, "expires_ms": expires, "finished_ms": finished}
    if result is not None:
        out["result"] = json.loads(result)
    if error is not None:
        out["error"] = error
    return out
