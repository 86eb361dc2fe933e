"""The gateway's file on the shared writer: an existing gateway.db (its `migrations` table) opens unchanged, and
every file is private whatever the umask."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

from nanofleet.controller.gateway.auth import hash_token, issue_token, list_tokens
from nanofleet.controller.gateway.db import MIGRATIONS, Database, open_db


def _old_gateway_db(path: Path) -> None:
    """What the gateway's own runner left: `migrations` with 001..003, a token, a usage row; umask's mode."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)")
        for name, sql in MIGRATIONS[:3]:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO migrations VALUES (?, 1)", (name,))
        conn.execute("INSERT INTO tokens VALUES (?, 'dev-1', 'demo', NULL, 1, NULL)", (hash_token("nfg_old"),))
        conn.execute("INSERT INTO usage VALUES ('2026-11-30', 'dev-1', 'app', 'm', 3, 10, 20, 0.5)")


def test_an_existing_gateway_db_opens_unchanged_and_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    old = os.umask(0o022)
    try:
        _old_gateway_db(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    db = Database(path)
    try:
        assert db.applied == ["004_budgets"]  # nothing re-run: the older steps are recorded in `migrations`
        assert db.read(lambda c: c.execute("SELECT requests FROM usage").fetchone()[0]) == 3
        assert db.read(lambda c: c.execute("SELECT device_id FROM tokens WHERE token_hash = ?",
                                           (hash_token("nfg_old"),)).fetchone()[0]) == "dev-1"
    finally:
        db.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [t.device_id for t in list_tokens(path)] == ["dev-1"]


def test_new_gateway_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        issue_token(tmp_path / "a" / "gateway.db", "dev-1", "demo")  # the CLI's path (open_db)
        db = Database(tmp_path / "b" / "gateway.db")  # the server's path
        db.call(lambda c: c.execute("INSERT INTO usage VALUES ('d', 'x', 'a', 'm', 1, 1, 1, 0)"))
        db.close()
        open_db(tmp_path / "c" / "gateway.db").close()
    finally:
        os.umask(old)
    for folder in ("a", "b", "c"):
        for suffix in ("", "-wal", "-shm"):
            p = tmp_path / folder / f"gateway.db{suffix}"
            if p.exists():
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, (folder, suffix)


async def test_budgets_of_an_upgraded_gateway_db_start_from_the_days_usage(tmp_path: Path) -> None:
    """The previous schema (001..003) with usage recorded today: the first reservation counts it."""
    import time

    import pytest

    from nanofleet.controller.gateway.budgets import BudgetRefused, Budgets
    from nanofleet.controller.gateway.rules import Limits, utc_day

    path = tmp_path / "gateway.db"
    _old_gateway_db(path)
    now = time.time()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO usage VALUES (?, 'dev-9', 'app', 'm', 2, 40, 50, 0.1)", (utc_day(now),))
    db = Database(path)
    try:
        with pytest.raises(BudgetRefused, match="90 of 95 tokens used today"):
            await Budgets(db, "gw", 60).reserve("dev-9", "app", Limits(95, None, None), 5, None, now)
        held = await Budgets(db, "gw", 60).reserve("dev-9", "app", Limits(100, None, None), 5, None, now)
        assert held.tokens == 10
    finally:
        db.close()


def test_the_postgresql_schema_twins_the_sqlite_one(pg_url: str, tmp_path: Path) -> None:
    """Same step names, same tables and columns, from an empty PostgreSQL database."""
    from nanofleet.controller.gateway.db import PG_MIGRATIONS, connection

    assert [name for name, _ in PG_MIGRATIONS] == [name for name, _ in MIGRATIONS]
    with connection(pg_url) as pg:
        pg_cols = {(t, c) for t, c in pg.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'").fetchall()}
        assert {r[0] for r in pg.execute("SELECT name FROM migrations").fetchall()} == {n for n, _ in MIGRATIONS}
    lite = open_db(tmp_path / "gateway.db")
    try:
        tables = [r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
        lite_cols = {(t, r[1]) for t in tables for r in lite.execute(f"PRAGMA table_info({t})").fetchall()}
    finally:
        lite.close()
    assert pg_cols == lite_cols
