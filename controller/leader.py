"""Which controller does the once-per-fleet work (alerts, rollouts, policy publishing, the stale sweep, gap
judgment) when several share a fleet: the one holding a PostgreSQL session advisory lock.

The lock (`pg_try_advisory_lock`, key derived from the fleet id) is held on a connection of its own, never the
store's: a session lock lives exactly as long as that connection. A follower tries again every `retry_s`; the leader
checks its connection every `check_s` and steps down at once when the check fails (its lock is gone with the
connection, another controller may hold it already). When a leader process is killed (`kill -9`, power loss) the
server sees the socket close and frees the lock; TCP keepalives bound how long a silent network takes. So a follower
takes over within about `retry_s` of the server noticing.

On SQLite (no URL) there is one controller and it is always the leader.

`run_while_leader(factory)` runs a loop only while this controller leads: started when it becomes leader,
cancelled when it steps down; the service spawns it under its TaskSupervisor like any other task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from nanofleet.pg_db import redact

log = logging.getLogger(__name__)



def lock_key(fleet: str) -> int:
    """The advisory lock's bigint key for a fleet: stable across processes, hosts and versions."""
    digest = hashlib.sha256(f"nanofleet-controller-leader:{fleet}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """`is_leader`, `on_change(bool)` when it flips, and `status()` for health, the dashboard and /metrics."""

    def __init__(self, url: str | None, fleet: str, *, retry_s: float = 1.0, check_s: float = 1.0,
                 check_timeout_s: float = 3.0, on_change: Callable[[bool], None] | None = None) -> None:
        self.url, self.fleet, self.key = url, fleet, lock_key(fleet)
        self.retry_s, self.check_s, self.check_timeout_s = retry_s, check_s, check_timeout_s
        self.on_change = on_change
        self.is_leader = False
        self.since: float | None = None  # when this controller last became leader
        self.changes = 0  # leadership flips, both ways
        self.errors = 0  # failed connects and checks (each logged)
        self.last_error: str | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._leading = asyncio.Event()
        self._following = asyncio.Event()
        self._following.set()

    @property
    def backend(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    def status(self) -> dict[str, Any]:
        return {"is_leader": self.is_leader, "backend": self.backend, "since": self.since, "changes": self.changes,
                "errors": self.errors, "last_error": self.last_error}

    def _set(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        self.changes += 1
        self.since = time.time() if leader else None
        (self._leading if leader else self._following).set()
        (self._following if leader else self._leading).clear()
        log.warning("controller: %s the leader of fleet %s (%s)", "now" if leader else "no longer", self.fleet,
                    self.backend)
        if self.on_change is not None:
            self.on_change(leader)

    async def run(self) -> None:
        """Take and keep the lock (for good: the service supervises this task, restarting it if it dies)."""
        try:
            if self.url is None:
                self._set(True)
                await asyncio.Event().wait()  # nothing to hold: the one SQLite controller leads until it stops
            while True:
                if self._conn is None:
                    await self._try(self._connect)
                if self._conn is not None:
                    if not self.is_leader:
                        if await self._try(self._take):
                            self._set(True)
                    elif not await self._try(self._check):
                        self._set(False)  # at once: the lock went with the connection
                await asyncio.sleep(self.check_s if self.is_leader else self.retry_s)
        finally:
            self._set(False)
            await asyncio.to_thread(self._close)

    async def _try(self, step: Callable[[], bool | None]) -> bool:
        """Run a blocking step off the loop with a deadline; a failure is logged and counted, and the connection
        is dropped (a new one is made on the next round)."""
        try:
            return bool(await asyncio.wait_for(asyncio.to_thread(step), self.check_timeout_s))
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("controller: leader lock on %s: %s", redact(self.url or ""), self.last_error)
            conn, self._conn = self._conn, None
            if conn is not None:
                await asyncio.to_thread(self._close_conn, conn)
            return False

    def _connect(self) -> None:
        assert self.url is not None
        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.check_timeout_s)),
                                     application_name="nanofleet-controller-leader",
                                     # a leader cut off by a silent network loses its lock and its check in ~10 s
                                     keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2)

    def _take(self) -> bool:
        assert self._conn is not None
        row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        return bool(row and row[0])

    def _check(self) -> bool:
        """Still connected, and the server still counts the lock as ours."""
        assert self._conn is not None
        unsigned = self.key & 0xFFFF_FFFF_FFFF_FFFF  # a bigint key shows as classid (high half), objid (low half)
        row = self._conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted "
            "AND objsubid = 1 AND classid = %s::bigint::oid AND objid = %s::bigint::oid",
            (unsigned >> 32, unsigned & 0xFFFF_FFFF)).fetchone()
        return bool(row and row[0])

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._close_conn(conn)

    @staticmethod
    def _close_conn(conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(psycopg.Error):  # closing a broken connection: the lock is gone either way
            conn.close()

    async def run_while_leader(self, factory: Callable[[], Awaitable[Any]]) -> None:
        """Run `factory()` whenever this controller leads; cancel it when it steps down. Its errors propagate (the
        supervisor restarts the whole wrapper); a normal return ends the wrapper too."""
        while True:
            await self._leading.wait()
            work = asyncio.ensure_future(factory())
            lost = asyncio.ensure_future(self._following.wait())
            try:
                await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
            if work.done() and not work.cancelled():
                work.result()  # raise its error, or end as it did
                return
