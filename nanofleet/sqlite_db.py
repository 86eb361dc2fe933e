"""One way to own a SQLite file, shared by the controller's store, the gateway's database and the agent's offline
queue: a connection opener (0600, WAL), one migration runner, and one writer thread.

- `connect(path, synchronous=…)` creates the file 0600 before SQLite does (SQLite gives `-wal`/`-shm` the same
  mode), switches to WAL (retrying while another process holds the new file) and sets a busy timeout.
- `migrate(conn, steps, table=…)` runs named steps once each, in their own `BEGIN IMMEDIATE`, re-checked under the
  write lock (several processes may open one new file). A step is SQL text or a callable given the connection
  wrapped in a `sqlite_utils.Database` (so a later step can use `table.transform()` for what ALTER cannot do).
- `Writer` owns the only write connection on one thread, fed by a queue, answering through futures. The jobs that
  arrived while the previous batch committed run together in one transaction (group commit: one fsync for all of
  them), each inside a SAVEPOINT so one failing job does not sink the others. A failed COMMIT (disk full, I/O
  error) fails every future of the batch with the `sqlite3.Error`: nothing is acknowledged that is not on disk.
  `housekeeping(conn)` runs on the writer thread between batches, at most every `housekeeping_s`; its errors are
  logged and counted in `housekeeping_errors`, never swallowed silently.
  `on_rollback(conn)` runs on the writer thread whenever work was rolled back (a failed job's savepoint, or a whole
  batch whose COMMIT failed), before any later job: the hook for a caller that mirrors the file in memory.
- `checkpoint_s`: the writer never checkpoints (`wal_autocheckpoint=0`: SQLite's automatic checkpoint runs inside a
  COMMIT and would hold every writer behind it); a checkpoint thread with its own connection copies the WAL back
  every `checkpoint_s`, concurrently (SQLite releases the GIL). Its failures are counted in `checkpoint_errors`.

Readers use one connection per thread (`read`, `aread`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import sqlite_utils

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
Step = str | Callable[[sqlite_utils.Database], None]
Migration = tuple[str, Step]

log = logging.getLogger("nanofleet.sqlite")


class DatabaseClosed(RuntimeError):
    """The writer was closed; nothing more can be written."""


def create_private(path: str | Path, mode: int = 0o600) -> Path:
    """Make `path`'s folder and the file itself (mode `mode`, whatever the umask) if missing; fix the mode if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, mode)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def connect(path: str | Path, *, synchronous: Synchronous = "NORMAL", timeout_s: float = 30.0,
            wal_autocheckpoint: int | None = None) -> sqlite3.Connection:
    """A WAL connection in autocommit mode (transactions are explicit), created 0600 if the file is new."""
    path = Path(path)
    if not path.exists():
        create_private(path)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s)
    # Switching to WAL needs a moment alone with the file and SQLite does not wait for it (no busy handler) when
    # another process is opening the same new file: retry within the deadline.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(0.05)
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    if wal_autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={int(wal_autocheckpoint)}")
    return conn


def in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """`fn(conn)` inside `BEGIN IMMEDIATE … COMMIT` (plain `BEGIN` on a nanofleet.pg_db.PgConn), rolled back if it
    raises."""
    conn.execute("BEGIN" if getattr(conn, "dialect", "sqlite") == "postgresql" else "BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one that matters; it is re-raised
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def migrate(conn: sqlite3.Connection, steps: Sequence[Migration], *, table: str = "_migrations") -> list[str]:
    """Run the steps not yet recorded in `table`, each once and in its own transaction; return the names run."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)")
    done = {row[0] for row in conn.execute(f"SELECT name FROM {table}")}
    db = sqlite_utils.Database(conn)
    applied = []
    for name, step in steps:
        if name in done:
            continue

        def run(c: sqlite3.Connection, name: str = name, step: Step = step) -> bool:
            if c.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone():
                return False  # another process ran it since we looked
            if isinstance(step, str):
                # executescript() would COMMIT the surrounding transaction, so statements run one by one
                for statement in step.split(";"):
                    if statement.strip():
                        c.execute(statement)
            else:
                step(db)
            c.execute(f"INSERT INTO {table} VALUES (?, ?)", (name, int(time.time() * 1000)))
            return True

        if in_transaction(conn, run):
            applied.append(name)
    return applied


_STOP = object()


class _Reader(NamedTuple):
    """A thread's read connection and the lock its queries hold, so `close()` never closes it under a query (the
    connection is shared across threads by `close()` only: SQLite would read freed memory)."""

    conn: sqlite3.Connection
    lock: threading.RLock


class _LoopFuture:
    """The answer to an `await write(fn)`: an asyncio future the writer settles on its loop's thread. A batch's
    answers are settled in one `call_soon_threadsafe` per event loop — one wake-up of the loop per group commit,
    where a `concurrent.futures.Future` wrapped for asyncio costs one per job (bench/bench_queue.py: that hand-off
    was ~10 % of the offline queue's enqueue CPU at 64 clients)."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        # the awaiting task was cancelled before the job ran (its caller is gone): the job is skipped, as a cancelled
        # concurrent future's is; read from the writer thread, a cancel racing this check only means the job runs
        return not self.future.cancelled()


Job = tuple[Callable[[sqlite3.Connection], Any], "concurrent.futures.Future[Any] | _LoopFuture"]


class Writer:
    """The one writer of a SQLite file (see the module docstring), plus per-thread readers."""

    def __init__(
        self, path: str | Path, migrations: Sequence[Migration] = (), *, name: str = "sqlite-writer",
        synchronous: Synchronous = "NORMAL", migrations_table: str = "_migrations", max_batch: int = 512,
        housekeeping: Callable[[sqlite3.Connection], Any] | None = None, housekeeping_s: float = 0.5,
        wal_autocheckpoint: int | None = None, checkpoint_s: float | None = None,
        on_rollback: Callable[[sqlite3.Connection], Any] | None = None,
    ) -> None:
        self.path: Any = self._target(path)
        self.synchronous: Synchronous = synchronous
        if checkpoint_s is not None:
            wal_autocheckpoint = 0
        self._conn: Any = self._open_writer(wal_autocheckpoint)
        try:
            self.applied = self._migrate(self._conn, migrations, migrations_table)
        except BaseException:
            self._conn.close()
            raise
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._housekeeping = housekeeping
        self._housekeeping_s = housekeeping_s
        self.housekeeping_errors = 0
        self.batches = 0
        self.commit_errors = 0
        self.rollback_errors = 0
        self.retries = 0  # jobs run again after losing a race to another writer (PostgreSQL only)
        self.checkpoint_errors = 0
        self._on_rollback = on_rollback
        self._local = threading.local()
        self._readers: list[_Reader] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if checkpoint_s is not None:
            self._checkpointer = threading.Thread(target=self._checkpoints, args=(checkpoint_s,),
                                                  name=f"{name}-checkpoint", daemon=True)
            self._checkpointer.start()

    # -- what a backend changes (nanofleet.pg_db.PgWriter: the same writer over PostgreSQL) ----------------------
    _BEGIN = "BEGIN IMMEDIATE"  # take SQLite's write lock at once: a later upgrade could fail mid-batch
    _ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)

    def _target(self, path: str | Path) -> Any:
        return Path(path)

    def _open_writer(self, wal_autocheckpoint: int | None) -> Any:
        return connect(self.path, synchronous=self.synchronous, wal_autocheckpoint=wal_autocheckpoint)

    def _migrate(self, conn: Any, migrations: Sequence[Migration], table: str) -> list[str]:
        return migrate(conn, migrations, table=table)

    def _open_reader(self) -> Any:
        return connect(self.path, synchronous=self.synchronous)

    _ATTEMPTS = 1  # runs of a job whose error is _retryable (one SQLite writer: nobody to lose a race to)

    def _retryable(self, exc: Exception) -> bool:
        return False

    def _healthy(self, conn: Any) -> Any:
        """The write connection to use for the next batch (a backend may replace a broken one)."""
        return conn

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue `fn(conn)` to run in a write transaction; the future resolves after COMMIT."""
        if self._closed:
            raise DatabaseClosed(f"database {self.path} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`submit` and wait (from a thread other than the writer's)."""
        return self.submit(fn).result()

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`submit` for a coroutine: the answer comes back with the rest of its batch in one loop wake-up."""
        if self._closed:
            raise DatabaseClosed(f"database {self.path} is closed")
        answer = _LoopFuture(asyncio.get_running_loop())
        self._jobs.put((fn, answer))
        result: T = await answer.future
        return result

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on this thread's read connection (from a worker thread, not the event loop)."""
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            if self._closed:
                raise DatabaseClosed(f"database {self.path} is closed")
            reader = _Reader(self._open_reader(), threading.RLock())
            self._local.reader = reader
            with self._readers_lock:
                self._readers.append(reader)
        with reader.lock:  # close() takes it before closing the connection: never under a running query
            if self._closed:
                raise DatabaseClosed(f"database {self.path} is closed")
            return fn(reader.conn)

    async def aread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read, fn)

    def close(self) -> None:
        """Finish the queued jobs, stop the thread, close every connection."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        self._thread.join()
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        with self._readers_lock:
            for reader in self._readers:
                with reader.lock:  # a read in flight on another thread finishes first (closing under it crashes)
                    reader.conn.close()
            self._readers.clear()

    # -- the threads ------------------------------------------------------------------------------------------
    def _checkpoints(self, every_s: float) -> None:
        """PASSIVE checkpoints: never wait for readers or the writer; what is left is copied on the next tick."""
        conn = connect(self.path, synchronous=self.synchronous)
        logged: set[str] = set()
        try:
            while not self._stop_checkpoints.wait(every_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:  # busy with another process's checkpoint: counted, next tick
                    self.checkpoint_errors += 1
                    if str(exc) not in logged:
                        logged.add(str(exc))
                        log.warning("%s: checkpoint failed (retried every %.1fs): %s", self.path, every_s, exc)
        finally:
            conn.close()

    def _rolled_back(self, conn: sqlite3.Connection) -> None:
        if self._on_rollback is None:
            return
        try:
            self._on_rollback(conn)
        except Exception:  # the caller's hook: logged and counted, the writer goes on
            self.rollback_errors += 1
            log.exception("%s: on_rollback hook failed", self.path)

    def _run(self) -> None:
        next_housekeeping = time.monotonic() + self._housekeeping_s
        stop = False
        try:
            while not stop:
                try:
                    first = self._jobs.get(timeout=self._housekeeping_s if self._housekeeping else None)
                    batch = [first]
                except queue.Empty:
                    batch = []
                while batch and len(batch) < self._max_batch:
                    try:
                        batch.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                if _STOP in batch:
                    stop = True
                    batch = [job for job in batch if job is not _STOP]
                if batch or self._housekeeping is not None:
                    self._conn = self._healthy(self._conn)
                if batch:
                    self._run_batch(self._conn, batch)
                if self._housekeeping is not None and (stop or time.monotonic() >= next_housekeeping):
                    next_housekeeping = time.monotonic() + self._housekeeping_s
                    try:
                        self._housekeeping(self._conn)
                    except Exception:
                        self.housekeeping_errors += 1
                        log.exception("%s: housekeeping failed (retried on the next tick)", self.path)
        finally:
            self._conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Job]) -> None:
        live = [(fn, fut) for fn, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        results: list[tuple[concurrent.futures.Future[Any] | _LoopFuture, Any, BaseException | None]] = []
        try:
            conn.execute(self._BEGIN)
            for fn, future in live:
                for attempt in range(1, self._ATTEMPTS + 1):
                    conn.execute("SAVEPOINT job")
                    try:
                        value = fn(conn)
                        conn.execute("RELEASE job")
                    except Exception as exc:  # one bad job must not sink the batch; its caller gets the error
                        if not conn.in_transaction:
                            raise  # SQLite rolled the whole transaction back itself (disk full, I/O error)
                        conn.execute("ROLLBACK TO job")  # (PostgreSQL: also frees the row locks the job took)
                        conn.execute("RELEASE job")
                        self._rolled_back(conn)
                        if attempt < self._ATTEMPTS and self._retryable(exc):
                            self.retries += 1  # another writer of the same rows won (a deadlock): run it again
                            continue
                        results.append((future, None, exc))
                    else:
                        results.append((future, value, None))
                    break
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - BEGIN/COMMIT failed (disk full, I/O): every future gets exc
            self.commit_errors += 1
            with contextlib.suppress(*self._ERRORS):  # may fail when SQLite already rolled back; exc is reported
                conn.execute("ROLLBACK")
            self._rolled_back(conn)
            _settle_all([(future, None, exc) for _fn, future in live])
            return
        self.batches += 1
        _settle_all(results)


Answer = tuple["concurrent.futures.Future[Any] | _LoopFuture", Any, BaseException | None]


def _settle_all(answers: list[Answer]) -> None:
    """Thread futures at once; asyncio ones in one call per event loop, on that loop's thread."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
    for future, value, error in answers:
        if isinstance(future, _LoopFuture):
            by_loop.setdefault(future.loop, []).append((future.future, value, error))
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_on_loop, items)
        except RuntimeError:  # the loop closed while its jobs ran: nobody is left to answer (the work is done)
            log.warning("%d write answer(s) dropped: their event loop closed before the commit", len(items))


def _settle_on_loop(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, error in items:
        if future.done():  # the awaiting task was cancelled meanwhile: it wants no answer
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
