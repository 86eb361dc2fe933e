"""nanofleet.pg_db: the one writer over a real PostgreSQL server (the throwaway one `make test` starts)."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.pg_db import PgConn, PgWriter, connect, dialect, pyformat, redact
from nanofleet.sqlite_db import DatabaseClosed

STEPS = [("001_t", "CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT NOT NULL, f SMALLINT NOT NULL DEFAULT 0);"
                  "CREATE TABLE u (k TEXT PRIMARY KEY)")]


def test_pyformat_turns_qmarks_into_psycopg_placeholders_but_not_inside_quotes_or_comments() -> None:
    assert pyformat("SELECT ? , '?', \"a?\" -- x?\n, ?") == "SELECT %s , '?', \"a?\" -- x?\n, %s"
    assert pyformat("SELECT ? LIKE 'a%' , 5 % 2") == "SELECT %s LIKE 'a%%' , 5 %% 2"


@given(st.text(alphabet="ab'?%\" -\n", max_size=30))
def test_pyformat_keeps_every_character_but_placeholders_and_percents(sql: str) -> None:
    out = pyformat(sql)
    assert out.replace("%s", "?").replace("%%", "%").replace("?", "") == sql.replace("?", "")


def test_redact_hides_the_password_only() -> None:
    assert redact("postgresql://u:secret@db.example:5433/fleet") == "postgresql://u:***@db.example:5433/fleet"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_writer_migrates_once_writes_in_group_commits_and_reads_back(pg_url: str) -> None:
    w = PgWriter(pg_url, STEPS)
    assert w.applied == ["001_t"]
    futures = [w.submit(lambda c, i=i: c.execute("INSERT INTO t VALUES (?, ?, ?)", (f"k{i}", i, i % 2 == 0)).rowcount)
               for i in range(200)]
    assert [f.result(timeout=10) for f in futures] == [1] * 200
    assert w.read(lambda c: c.execute("SELECT count(*), sum(n), sum(f) FROM t").fetchone()) == (200, 19900.0, 100.0)
    assert w.read(lambda c: dialect(c)) == "postgresql"
    w.close()
    again = PgWriter(pg_url, STEPS)  # a second start runs no step twice
    assert again.applied == []
    again.close()
    with pytest.raises(DatabaseClosed):
        again.submit(lambda c: None)


def test_a_failing_job_rolls_back_alone_and_its_caller_gets_the_error(pg_url: str) -> None:
    w = PgWriter(pg_url, STEPS)
    ok = w.submit(lambda c: c.execute("INSERT INTO u VALUES ('a')"))
    bad = w.submit(lambda c: c.execute("INSERT INTO u VALUES ('a')"))  # duplicate key
    after = w.submit(lambda c: c.execute("INSERT INTO u VALUES ('b')"))
    ok.result(timeout=10)
    after.result(timeout=10)
    with pytest.raises(psycopg.errors.UniqueViolation):
        bad.result(timeout=10)
    assert w.read(lambda c: [r[0] for r in c.execute("SELECT k FROM u ORDER BY k")]) == ["a", "b"]
    w.close()


def test_two_writers_that_deadlock_each_other_both_finish(pg_url: str) -> None:
    """Two processes' writers locking the same rows in opposite orders: PostgreSQL kills one transaction; its job is
    rolled back to its savepoint and run again, so both callers get their answer."""
    setup = connect(pg_url)
    setup.execute(STEPS[0][1])
    setup.execute("INSERT INTO t VALUES ('a', 0, 0), ('b', 0, 0)")
    a, b = PgWriter(pg_url), PgWriter(pg_url)
    barrier = threading.Barrier(2)

    def job(first: str, second: str) -> Any:
        def run(c: PgConn) -> int:
            c.execute("UPDATE t SET n = n + 1 WHERE k = ?", (first,))
            if not getattr(threading.current_thread(), "waited", False):
                threading.current_thread().waited = True  # type: ignore[attr-defined]
                barrier.wait(timeout=10)
            c.execute("UPDATE t SET n = n + 1 WHERE k = ?", (second,))
            return 1
        return run

    fa, fb = a.submit(job("a", "b")), b.submit(job("b", "a"))
    concurrent.futures.wait([fa, fb], timeout=30)
    assert fa.result() == fb.result() == 1
    assert a.retries + b.retries >= 1
    assert setup.execute("SELECT sum(n) FROM t").fetchone() == (4.0,)
    for x in (a, b, setup):
        x.close()


def test_writer_reconnects_after_its_connection_is_killed(pg_url: str) -> None:
    w = PgWriter(pg_url, STEPS)
    w.call(lambda c: c.execute("INSERT INTO u VALUES ('x')"))
    admin = connect(pg_url)
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg-writer'")
    failed = w.submit(lambda c: c.execute("INSERT INTO u VALUES ('y')"))
    with pytest.raises(psycopg.Error):
        failed.result(timeout=10)  # the batch on the dead connection is failed, never acknowledged
    w.call(lambda c: c.execute("INSERT INTO u VALUES ('z')"))
    assert w.reconnects == 1
    assert w.read(lambda c: [r[0] for r in c.execute("SELECT k FROM u ORDER BY k")]) == ["x", "z"]
    w.close()
    admin.close()
