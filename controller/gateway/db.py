"""The gateway's SQLite file (tokens, usage, idempotent results), owned by the project's one writer.

`Database` is nanofleet.sqlite_db.Writer over this file (one writer thread, group commit, futures; a reader
connection per thread), so concurrent RPCs never contend for SQLite's lock and no write blocks the event loop.
The file is created 0600 (it holds token hashes); its migrations are recorded in the `migrations` table, the name
this file has always used, so an existing gateway.db opens unchanged.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nanofleet.sqlite_db import Migration, Writer, connect, create_private, migrate

MIGRATIONS_TABLE = "migrations"

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
]


def open_db(path: str | Path) -> sqlite3.Connection:
    """A migrated connection to the gateway database for one-off work (the CLI's token commands), 0600."""
    path = create_private(path)  # also tightens a file an older gateway made with the umask's mode
    conn = connect(path)
    try:
        migrate(conn, MIGRATIONS, table=MIGRATIONS_TABLE)
    except BaseException:
        conn.close()
        raise
    return conn


class Database(Writer):
    """The one writer of a gateway SQLite file, plus per-thread readers (`write`, `submit`, `read`, `aread`)."""

    def __init__(self, path: str | Path, max_batch: int = 256) -> None:
        create_private(path)
        super().__init__(path, MIGRATIONS, name="gateway-db-writer", migrations_table=MIGRATIONS_TABLE,
                         max_batch=max_batch)
