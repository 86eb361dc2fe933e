"""The PostgreSQL side of the one store interface: `PgWriter` is nanofleet.sqlite_db.Writer over a PostgreSQL
database (same jobs, same group commit, same futures), so the controller's store and the gateway's database run the
same code on either backend (`store: {url: postgresql://…}` in fleet.yaml).

A job is given a `PgConn`: the subset of sqlite3.Connection the stores use (`execute`, `executemany`,
`total_changes`, `in_transaction`) over a psycopg 3 connection, plus `dialect` and `raw` (for `COPY`). SQL is
written once with `?` placeholders and portable syntax (`INSERT … ON CONFLICT … DO UPDATE`, `RETURNING`,
`coalesce`); `pyformat()` turns `?` into psycopg's `%s` (psycopg has no qmark style). Where the dialects differ a
store asks `dialect(conn)`.

Types: PostgreSQL's `numeric` (what `avg()` and `sum()` of integers give) reads as float, as SQLite's REAL does;
Python bools are written as 0/1 (the schemas keep SQLite's integer flags).
Concurrency: several processes write one database; a job that loses a deadlock or a serialization race is rolled
back to its savepoint (which frees its row locks) and run again, up to three times (`retries` counts them).
A write connection found broken (the server restarted) is replaced before the next batch; the batch it broke was
failed to its callers, never acknowledged.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.adapt import Dumper
from psycopg.pq import TransactionStatus
from psycopg.types.numeric import FloatLoader

from nanofleet.sqlite_db import Migration, Step, Writer, in_transaction

T = TypeVar("T")
log = logging.getLogger("nanofleet.pg")
DB_ERRORS: tuple[type[Exception], ...] = (psycopg.Error,)


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|\?|%")


@functools.lru_cache(maxsize=1024)
def pyformat(sql: str) -> str:
    """`?` placeholders (outside quotes and comments) to `%s`, and every literal `%` doubled, as psycopg wants.
    A regex over quoted strings is enough here: the stores' SQL is our own, never user text."""

    def sub(m: re.Match[str]) -> str:
        tok = m.group(0)
        if tok == "?":
            return "%s"
        if tok == "%":
            return "%%"
        return tok.replace("%", "%%")

    return _TOKEN.sub(sub, sql)


class _BoolAsInt(Dumper):
    """Python bools as 0/1: the schemas keep SQLite's integer flags, so one row tuple fits both backends."""

    oid = psycopg.adapters.types["int2"].oid

    def dump(self, obj: bool) -> bytes:
        return b"1" if obj else b"0"


class PgConn:
    """What a store job needs of a connection, over psycopg (see the module docstring)."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self.total_changes = 0

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> psycopg.Cursor[Any]:
        cur = self.raw.cursor()
        if params:
            cur.execute(pyformat(sql), params)
        else:
            cur.execute(sql)  # no parameters: psycopg sends the text as it is (no placeholder parsing)
        if cur.description is None and cur.rowcount > 0:
            self.total_changes += cur.rowcount
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cur = self.raw.cursor()
        rows = list(rows)
        if rows:
            cur.executemany(pyformat(sql), rows)
            if cur.rowcount > 0:
                self.total_changes += cur.rowcount
        return cur

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()


def dialect(conn: Any) -> str:
    """'postgresql' for a PgConn, 'sqlite' for a sqlite3.Connection: where the stores' SQL must differ."""
    return getattr(conn, "dialect", "sqlite")


def connect(url: str, *, application_name: str = "nanofleet", timeout_s: float = 10.0) -> PgConn:
    """An autocommit connection (transactions are explicit, as on SQLite) with the type rules above."""
    try:
        raw = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)),
                              application_name=application_name)
    except psycopg.OperationalError as exc:
        raise psycopg.OperationalError(f"cannot connect to PostgreSQL at {redact(url)}: {exc}") from exc
    raw.adapters.register_loader("numeric", FloatLoader)
    raw.adapters.register_dumper(bool, _BoolAsInt)
    return PgConn(raw)


def migrate(conn: PgConn, steps: Sequence[Migration], *, table: str = "_migrations") -> list[str]:
    """Run the steps not yet recorded in `table`, each once in its own transaction (sqlite_db.in_transaction, as
    SQLite's runner); several processes starting on a new database at once take turns on an advisory lock, the
    table's creation included (two CREATE TABLE IF NOT EXISTS at once can both try: a pg_type race). A text step
    may hold several statements."""

    def locked(c: PgConn) -> None:
        c.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (table,))

    def create(c: PgConn) -> None:
        locked(c)
        c.execute(f"CREATE TABLE IF NOT EXISTS {table} (name TEXT PRIMARY KEY, applied_ms BIGINT NOT NULL)")

    in_transaction(conn, create)  # type: ignore[arg-type]
    applied = []
    for name, step in steps:

        def run(c: PgConn, name: str = name, step: Step = step) -> bool:
            locked(c)
            if c.execute(f"SELECT 1 FROM {table} WHERE name = ?", (name,)).fetchone():
                return False  # another process ran it
            if isinstance(step, str):
                c.raw.execute(step)  # no parameters: the simple protocol, several statements allowed
            else:
                step(c)  # type: ignore[arg-type]
            c.execute(f"INSERT INTO {table} VALUES (?, ?)", (name, int(time.time() * 1000)))
            return True

        if in_transaction(conn, run):  # type: ignore[arg-type]
            applied.append(name)
    return applied


_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


class PgWriter(Writer):
    """nanofleet.sqlite_db.Writer over PostgreSQL: one write connection on one thread, group commit, a read
    connection per thread. `path` is the URL without its password."""

    _BEGIN = "BEGIN"
    _ERRORS = DB_ERRORS
    _ATTEMPTS = 3

    def __init__(self, url: str, migrations: Sequence[Migration] = (), *, name: str = "pg-writer",
                 migrations_table: str = "_migrations", max_batch: int = 512,
                 housekeeping: Callable[[Any], Any] | None = None, housekeeping_s: float = 0.5,
                 on_rollback: Callable[[Any], Any] | None = None) -> None:
        self.url = url
        self.name = name
        self.reconnects = 0
        super().__init__(url, migrations, name=name, migrations_table=migrations_table, max_batch=max_batch,
                         housekeeping=housekeeping, housekeeping_s=housekeeping_s, on_rollback=on_rollback)

    def _target(self, path: Any) -> str:
        return redact(str(path))

    def _open_writer(self, wal_autocheckpoint: int | None) -> PgConn:
        return connect(self.url, application_name=self.name)

    def _migrate(self, conn: Any, migrations: Sequence[Migration], table: str) -> list[str]:
        return migrate(conn, migrations, table=table)

    def _open_reader(self) -> PgConn:
        return connect(self.url, application_name=f"{self.name}-reader")

    def _retryable(self, exc: Exception) -> bool:
        return isinstance(exc, _RETRYABLE)

    def _healthy(self, conn: PgConn) -> PgConn:
        if not conn.broken:
            return conn
        try:
            fresh = connect(self.url, application_name=self.name)
        except psycopg.Error as exc:  # still down: this batch fails to its callers; the next one tries again
            log.warning("%s: reconnecting failed: %s", self.path, exc)
            return conn
        self.reconnects += 1
        log.warning("%s: the write connection was lost; reconnected", self.path)
        return fresh

    def read(self, fn: Callable[[Any], T]) -> T:
        reader = getattr(self._local, "reader", None)
        if reader is not None and reader.conn.broken:  # the server restarted: a new connection for this thread
            with self._readers_lock:
                self._readers.remove(reader)
            self._local.reader = None
        return super().read(fn)
