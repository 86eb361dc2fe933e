"""The gateway's SQLite file (tokens, usage, idempotent results): WAL, named migrations, one writer thread.

Every write goes through `Database.write(fn)`: one thread owns the write connection, drains a queue, runs each batch
of jobs inside one `BEGIN IMMEDIATE` transaction (group commit) and answers through futures — so concurrent RPCs
never contend for SQLite's lock and no write blocks the event loop. Reads use a connection per thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MIGRATIONS: list[tuple[str, str]] = [
    ("001_tokens", """
        CREATE TABLE tokens (
            token_hash TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            fleet TEXT NOT NULL,
            grp TEXT,
            created_ms INTEGER NOT NULL,
            revoked_ms INTEGER
        );
        CREATE INDEX tokens_device ON tokens (device_id);
    """),
    ("002_usage", """
        CREATE TABLE usage (
            day TEXT NOT NULL,
            device_id TEXT NOT NULL,
            app_id TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0,
            input_tokens INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (day, device_id, app_id, model)
        );
    """),
    ("003_idempotency", """
        CREATE TABLE idempotency (
            device_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            response BLOB NOT NULL,
            PRIMARY KEY (device_id, request_id)
        );
        CREATE INDEX idempotency_created ON idempotency (created_ms);
    """),
]


def connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Apply the named migrations not yet applied, each in its own transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)")
    for name, sql in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)).fetchone() is None:
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO migrations VALUES (?, ?)", (name, int(time.time() * 1000)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def open_db(path: str | Path) -> sqlite3.Connection:
    """A migrated connection to the gateway database, creating the file 0600 (it holds token hashes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = connect(path)
    migrate(conn)
    return conn


_STOP = object()


class Database:
    """The one writer of a gateway SQLite file, plus per-thread readers."""

    def __init__(self, path: str | Path, max_batch: int = 256) -> None:
        self.path = Path(path)
        self._write_conn = open_db(self.path)
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="gateway-db-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue `fn(conn)` to run in a write transaction; the future resolves after COMMIT."""
        if self._closed:
            raise RuntimeError("database is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on this thread's read connection (call from a worker thread, not the event loop)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return fn(conn)

    async def aread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read, fn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        self._thread.join()
        self._write_conn.close()
        with self._readers_lock:
            for conn in self._readers:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._readers.clear()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._jobs.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [job for job in batch if job is not _STOP]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Callable[[sqlite3.Connection], Any], concurrent.futures.Future[Any]]],
                   ) -> None:
        conn = self._write_conn
        results: list[tuple[concurrent.futures.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in batch:
                conn.execute("SAVEPOINT job")
                try:
                    results.append((future, fn(conn), None))
                    conn.execute("RELEASE job")
                except Exception as exc:  # one bad job must not sink the batch
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((future, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            for _fn, future in batch:
                _settle(future, None, exc)
            return
        for future, value, error in results:
            _settle(future, value, error)


def _settle(future: concurrent.futures.Future[Any], value: Any, error: BaseException | None) -> None:
    """Resolve a job's future; the job ran (and committed) even if its caller was cancelled meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
