"""The gateway's database (tokens, usage, budgets, idempotent results) on SQLite or PostgreSQL, behind one writer.

`open_store(target)` gives `Database` (nanofleet.sqlite_db.Writer over `gateway-data/gateway.db`, the default) or
`PgDatabase` (nanofleet.pg_db.PgWriter over `store.url` / `--store postgresql://…`, which several gateways share).
Both run the same jobs with the same SQL: one writer thread, group commit, futures, a reader per thread.
The SQLite file is created 0600 (it holds token hashes); migrations are recorded in the `migrations` table, the
name this file has always used, so an existing gateway.db opens unchanged. `PG_MIGRATIONS` twins `MIGRATIONS` step by
step (same names, same tables): a step added to one needs its twin in the other. The gateway's tables do not clash
with the controller's, so both may live in one PostgreSQL database.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanofleet import pg_db
from nanofleet.pg_db import PgWriter
from nanofleet.sqlite_db import Migration, Writer, connect, create_private, migrate
from nanofleet.store_url import StoreTarget, as_target, resolve

MIGRATIONS_TABLE = "migrations"
DB_NAME = "gateway.db"  # `nanofleet enroll` / `up` issue tokens into DATA_DIR/gateway.db

_BUDGETS = """
    CREATE TABLE budget_counts (
        day TEXT NOT NULL,
        scope TEXT NOT NULL,
        device_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        used {int} NOT NULL DEFAULT 0,
        reserved {int} NOT NULL DEFAULT 0,
        PRIMARY KEY (day, scope, device_id, app_id)
    );
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        day TEXT NOT NULL,
        device_id TEXT NOT NULL,
        app_id TEXT NOT NULL,
        scopes TEXT NOT NULL,
        tokens {int} NOT NULL,
        expires_ms {int} NOT NULL,
        gateway TEXT NOT NULL
    );
    CREATE INDEX reservations_expires ON reservations (expires_ms);
    CREATE TABLE idempotency_claims (
        device_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        gateway TEXT NOT NULL,
        expires_ms {int} NOT NULL,
        PRIMARY KEY (device_id, request_id)
    );
"""

MIGRATIONS: list[Migration] = [
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
    ("004_budgets", _BUDGETS.format(int="INTEGER")),
]

PG_MIGRATIONS: list[Migration] = [
    ("001_tokens", """
        CREATE TABLE tokens (
            token_hash TEXT PRIMARY KEY,
            device_id TEXT NOT NULL,
            fleet TEXT NOT NULL,
            grp TEXT,
            created_ms BIGINT NOT NULL,
            revoked_ms BIGINT
        );
        CREATE INDEX tokens_device ON tokens (device_id);
    """),
    ("002_usage", """
        CREATE TABLE usage (
            day TEXT NOT NULL,
            device_id TEXT NOT NULL,
            app_id TEXT NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL DEFAULT 0,
            input_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (day, device_id, app_id, model)
        );
    """),
    ("003_idempotency", """
        CREATE TABLE idempotency (
            device_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            created_ms BIGINT NOT NULL,
            response BYTEA NOT NULL,
            PRIMARY KEY (device_id, request_id)
        );
        CREATE INDEX idempotency_created ON idempotency (created_ms);
    """),
    ("004_budgets", _BUDGETS.format(int="BIGINT")),
]

Target = str | Path | StoreTarget


def gateway_target(store: str | None, data_dir: str | Path) -> StoreTarget:
    """Where a gateway keeps its state: `--store` / fleet.yaml's `store.url` when PostgreSQL or given explicitly,
    else `DATA_DIR/gateway.db`."""
    return resolve(store, Path(data_dir), DB_NAME)


def open_db(path: str | Path) -> sqlite3.Connection:
    """A migrated connection to a gateway SQLite file for one-off work, 0600."""
    path = create_private(path)  # also tightens a file an older gateway made with the umask's mode
    conn = connect(path)
    try:
        migrate(conn, MIGRATIONS, table=MIGRATIONS_TABLE)
    except BaseException:
        conn.close()
        raise
    return conn


def open_connection(target: Target) -> Any:
    """A migrated connection (sqlite3.Connection or nanofleet.pg_db.PgConn, same `?` SQL) for one-off work: the
    CLI's token commands, `nanofleet enroll`, the controller's usage view. The caller closes it."""
    where = as_target(target)
    if where.kind == "sqlite":
        assert where.path is not None
        return open_db(where.path)
    assert where.url is not None
    conn = pg_db.connect(where.url, application_name="nanofleet-gateway-cli")
    try:
        pg_db.migrate(conn, PG_MIGRATIONS, table=MIGRATIONS_TABLE)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def connection(target: Target) -> Iterator[Any]:
    """`open_connection` for a `with` block."""
    conn = open_connection(target)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: Any) -> Iterator[Any]:
    """BEGIN (SQLite: IMMEDIATE, the write lock at once) … COMMIT, rolled back when the block raises."""
    conn.execute("BEGIN IMMEDIATE" if pg_db.dialect(conn) == "sqlite" else "BEGIN")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error, *pg_db.DB_ERRORS):  # the block's error is the one to report
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database(Writer):
    """The one writer of a gateway SQLite file, plus per-thread readers (`write`, `submit`, `read`, `aread`)."""

    def __init__(self, path: str | Path, max_batch: int = 256, housekeeping: Any = None,
                 housekeeping_s: float = 0.5) -> None:
        create_private(path)
        super().__init__(path, MIGRATIONS, name="gateway-db-writer", migrations_table=MIGRATIONS_TABLE,
                         max_batch=max_batch, housekeeping=housekeeping, housekeeping_s=housekeeping_s)


GATEWAY_WRITES_LOCK = 0x6E66_6777  # "nfgw": the advisory lock every gateway write transaction takes first


def lock_gateway_writes(conn: Any) -> None:
    """On PostgreSQL, wait for the other gateways' write transactions (see PgDatabase); nothing on SQLite, whose
    writer lock already does it."""
    if pg_db.dialect(conn) == "postgresql":
        conn.execute(f"SELECT pg_advisory_xact_lock({GATEWAY_WRITES_LOCK})")


class PgDatabase(PgWriter):
    """The gateway's writer over PostgreSQL: the same jobs as `Database`, shared by every gateway of the fleet.

    Each write transaction (a group-committed batch of jobs) first takes one advisory lock shared by every gateway,
    so the gateways' batches commit one at a time, as SQLite's writer lock would have them: the jobs of one batch
    lock budget, usage and claim rows in whatever order they come, and two batches doing that at once deadlock.
    Batches grow under load, so this costs one commit's time per batch, not per call."""

    _BEGIN = f"BEGIN; SELECT pg_advisory_xact_lock({GATEWAY_WRITES_LOCK})"

    def __init__(self, url: str, max_batch: int = 256, housekeeping: Any = None, housekeeping_s: float = 0.5) -> None:
        super().__init__(url, PG_MIGRATIONS, name="gateway-pg-writer", migrations_table=MIGRATIONS_TABLE,
                         max_batch=max_batch, housekeeping=housekeeping, housekeeping_s=housekeeping_s)


GatewayDb = Database | PgDatabase


def open_store(target: Target, housekeeping: Any = None, housekeeping_s: float = 0.5) -> GatewayDb:
    """The gateway's writer over `target` (migrated)."""
    where = as_target(target)
    if where.kind == "sqlite":
        assert where.path is not None
        return Database(where.path, housekeeping=housekeeping, housekeeping_s=housekeeping_s)
    assert where.url is not None
    return PgDatabase(where.url, housekeeping=housekeeping, housekeeping_s=housekeeping_s)
