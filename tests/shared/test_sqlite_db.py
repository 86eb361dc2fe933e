"""The shared SQLite writer and migration runner, on real files."""

from __future__ import annotations

import concurrent.futures
import os
import sqlite3
import stat
import threading

import pytest

from nanofleet.sqlite_db import DatabaseClosed, Writer, connect, migrate

STEPS = [
    ("001_items", "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT NOT NULL); CREATE INDEX items_v ON items (v)"),
    ("002_extra", lambda db: db["extra"].create({"k": str, "n": int}, pk="k")),
]


def test_file_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        w = Writer(tmp_path / "sub" / "x.db", STEPS)
        w.call(lambda c: c.execute("INSERT INTO items (v) VALUES ('a')"))
        w.close()
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / "sub" / f"x.db{suffix}"
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, suffix


def test_migrations_run_once_and_sqlite_utils_steps_work(tmp_path):
    conn = connect(tmp_path / "m.db")
    assert migrate(conn, STEPS) == ["001_items", "002_extra"]
    assert migrate(conn, STEPS) == []
    assert migrate(conn, [*STEPS, ("003", "ALTER TABLE extra ADD COLUMN z TEXT")]) == ["003"]
    cols = [r[1] for r in conn.execute("PRAGMA table_info(extra)")]
    assert cols == ["k", "n", "z"]


def test_failed_migration_leaves_nothing_and_is_retried(tmp_path):
    conn = connect(tmp_path / "m.db")
    bad = [("001", "CREATE TABLE a (x); CREATE TABLE a (x)")]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, bad)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='a'").fetchone()[0] == 0
    assert migrate(conn, [("001", "CREATE TABLE a (x)")]) == ["001"]


def test_jobs_arriving_together_share_one_commit_and_a_bad_job_fails_alone(tmp_path):
    w = Writer(tmp_path / "g.db", STEPS)
    first, gate = hold_writer(w)
    futs = [w.submit(lambda c, i=i: c.execute("INSERT INTO items (v) VALUES (?)", (str(i),)).lastrowid)
            for i in range(50)]
    bad = w.submit(lambda c: c.execute("INSERT INTO nope VALUES (1)"))
    gate.set()
    first.result(5)
    assert sorted(f.result(5) for f in futs) == list(range(1, 51))
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        bad.result(5)
    assert w.batches == 2  # the held job, then the 51 others in one transaction
    assert w.read(lambda c: c.execute("SELECT count(*) FROM items").fetchone()[0]) == 50
    w.close()
    with pytest.raises(DatabaseClosed):
        w.submit(lambda c: None)


def hold_writer(w):
    """A job that keeps the writer busy until released, so what is submitted meanwhile forms the next batch."""
    started, gate = threading.Event(), threading.Event()
    fut = w.submit(lambda c: started.set() or gate.wait(5))
    assert started.wait(5)
    return fut, gate


def test_disk_full_mid_batch_fails_every_job_of_the_batch(tmp_path):
    w = Writer(tmp_path / "f.db", STEPS)
    w.call(lambda c: c.execute("PRAGMA max_page_count=" + str(c.execute("PRAGMA page_count").fetchone()[0] + 2)))
    hold, gate = hold_writer(w)
    ok = w.submit(lambda c: c.execute("INSERT INTO items (v) VALUES ('small')"))
    big = [w.submit(lambda c: c.executemany("INSERT INTO items (v) VALUES (?)", [("x" * 2000,)] * 50))
           for _ in range(3)]
    gate.set()
    hold.result(5)
    for f in [ok, *big]:
        with pytest.raises(sqlite3.Error, match="full"):
            f.result(5)
    assert w.read(lambda c: c.execute("SELECT count(*) FROM items").fetchone()[0]) == 0
    assert w.call(lambda c: c.execute("INSERT INTO items (v) VALUES ('small')").lastrowid) >= 1
    w.close()


def test_housekeeping_errors_are_counted_not_swallowed(tmp_path, caplog):
    ran = threading.Event()
    calls = []

    def housekeeping(conn):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("boom")
        ran.set()

    w = Writer(tmp_path / "h.db", STEPS, housekeeping=housekeeping, housekeeping_s=0.01)
    assert ran.wait(5)
    assert w.housekeeping_errors == 1
    assert "housekeeping failed" in caplog.text
    w.close()


def test_cancelled_before_running_is_not_run(tmp_path):
    w = Writer(tmp_path / "c.db", STEPS)
    hold, gate = hold_writer(w)
    fut = w.submit(lambda c: c.execute("INSERT INTO items (v) VALUES ('never')"))
    assert fut.cancel()
    gate.set()
    hold.result(5)
    assert w.call(lambda c: c.execute("SELECT count(*) FROM items").fetchone()[0]) == 0
    with pytest.raises(concurrent.futures.CancelledError):
        fut.result()
    w.close()


def test_on_rollback_runs_on_the_writer_before_any_later_job(tmp_path):
    """A failed job's savepoint and a batch whose COMMIT failed both call the hook, before the next job runs."""
    seen = []
    w = Writer(tmp_path / "r.db", STEPS,
               on_rollback=lambda c: seen.append((threading.current_thread().name, c.in_transaction)))
    with pytest.raises(sqlite3.OperationalError):
        w.call(lambda c: c.execute("INSERT INTO nope VALUES (1)"))
    assert seen == [("sqlite-writer", True)]  # inside the batch's transaction, after ROLLBACK TO the savepoint
    w.call(lambda c: c.execute("PRAGMA max_page_count=" + str(c.execute("PRAGMA page_count").fetchone()[0])))
    with pytest.raises(sqlite3.Error, match="full"):
        w.call(lambda c: c.executemany("INSERT INTO items (v) VALUES (?)", [("x" * 2000,)] * 50))
    later = w.call(lambda c: len(seen))
    assert later >= 2 and seen[-1] == ("sqlite-writer", False)  # after the whole batch was rolled back
    w.close()


def test_a_failing_rollback_hook_is_counted_and_the_writer_goes_on(tmp_path):
    def hook(conn):
        raise RuntimeError("mirror reload failed")

    w = Writer(tmp_path / "h2.db", STEPS, on_rollback=hook)
    with pytest.raises(sqlite3.OperationalError):
        w.call(lambda c: c.execute("INSERT INTO nope VALUES (1)"))
    assert w.rollback_errors == 1
    assert w.call(lambda c: c.execute("INSERT INTO items (v) VALUES ('ok')").lastrowid) == 1
    w.close()


def test_the_checkpoint_thread_keeps_the_wal_from_growing(tmp_path):
    """With checkpoint_s the writer never checkpoints itself; the checkpoint thread copies the WAL back."""
    w = Writer(tmp_path / "k.db", STEPS, checkpoint_s=0.05)
    assert w.call(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    w.call(lambda c: c.executemany("INSERT INTO items (v) VALUES (?)", [("x" * 100,)] * 500))

    def in_main_file():  # immutable=1 reads the database file alone, ignoring the WAL
        with sqlite3.connect(f"file:{tmp_path / 'k.db'}?immutable=1", uri=True) as conn:
            try:
                return conn.execute("SELECT count(*) FROM items").fetchone()[0]
            except sqlite3.DatabaseError:
                return 0

    from tests.conftest import wait_for

    wait_for(lambda: in_main_file() == 500, timeout=10, what="rows checkpointed into the database file")
    w.close()
    assert w.checkpoint_errors == 0


async def test_awaited_writes_of_one_batch_are_answered_together_and_each_its_own(tmp_path):
    """`await write(fn)`: the batch's answers reach the loop in one hand-off, each coroutine its own value or error;
    a coroutine cancelled before its job ran leaves no trace in the file."""
    import asyncio

    w = Writer(tmp_path / "a.db", STEPS)
    hold, gate = hold_writer(w)
    loop = asyncio.get_running_loop()
    handoffs = 0
    real = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        nonlocal handoffs
        handoffs += 1
        return real(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        writes = [asyncio.ensure_future(w.write(lambda c, i=i: c.execute("INSERT INTO items (v) VALUES (?)",
                                                                          (f"v{i}",)).lastrowid))
                  for i in range(40)]
        bad = asyncio.ensure_future(w.write(lambda c: c.execute("INSERT INTO nope VALUES (1)")))
        gone = asyncio.ensure_future(w.write(lambda c: c.execute("INSERT INTO items (v) VALUES ('gone')")))
        await asyncio.sleep(0)  # every job is in the writer's queue behind the held one
        gone.cancel()
        gate.set()
        assert sorted(await asyncio.gather(*writes)) == list(range(1, 41))
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await bad
        assert handoffs == 1  # one wake-up of this loop for the whole batch
    finally:
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
    await asyncio.wrap_future(hold)
    assert w.read(lambda c: c.execute("SELECT count(*) FROM items WHERE v = 'gone'").fetchone()[0]) == 0
    assert w.batches == 2
    w.close()
    with pytest.raises(DatabaseClosed):
        await w.write(lambda c: None)


def test_close_waits_for_a_read_in_flight_and_later_reads_are_refused(tmp_path):
    """close() closed every thread's read connection at once, also one in the middle of a query on another thread:
    a use-after-free in SQLite (the suite's process died of SIGSEGV when a drainer's read overlapped the queue's
    close). Now close() waits for the read, and that thread's next read gets DatabaseClosed."""
    w = Writer(tmp_path / "r.db", STEPS)
    started, out = threading.Event(), {}

    def slow(conn):
        started.set()
        return conn.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000) "
                            "SELECT count(*) FROM c").fetchone()[0]

    def reader():
        out["first"] = w.read(slow)
        try:
            w.read(lambda c: c.execute("SELECT 1").fetchone())
        except DatabaseClosed as exc:
            out["second"] = exc

    t = threading.Thread(target=reader)
    t.start()
    assert started.wait(5)
    w.close()
    t.join(30)
    assert out["first"] == 2_000_000
    assert isinstance(out.get("second"), DatabaseClosed)
