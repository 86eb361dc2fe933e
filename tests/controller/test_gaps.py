"""Gaps judged from stored rows (controller/gaps.py): the counting rule by hypothesis, the store round on both
backends (a real SQLite file and a real PostgreSQL database, each with its own migrations)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.controller import gaps
from nanofleet.controller.gaps import Cursor, count_missing, devices_to_ask, judge
from nanofleet.controller.migrations import MIGRATIONS
from nanofleet.controller.pg_migrations import PG_MIGRATIONS
from nanofleet.pg_db import PgWriter, is_postgres
from nanofleet.sqlite_db import Writer


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, list[int]]:
    """A session's sent seqs (wrapping at 256) with some lost (never 256 in a row), the kept rows, how many were
    lost between the first and the last kept one, and where the rows are cut into rounds."""
    start = draw(st.integers(0, 255))
    n = draw(st.integers(1, 900))
    lost = draw(st.sets(st.integers(0, n - 1), max_size=n - 1))
    kept_idx = [i for i in range(n) if i not in lost]
    if not kept_idx or any(b - a > 256 for a, b in itertools.pairwise(kept_idx)):
        kept_idx = list(range(0, n, 200))  # every 200th: runs of 199 lost
    rows = [(1_000 * i, (start + i) % 256) for i in kept_idx]
    between = kept_idx[-1] - kept_idx[0] + 1 - len(kept_idx)
    cuts = sorted(draw(st.sets(st.integers(0, len(rows)), max_size=6)))
    return rows, between, cuts


@given(sessions())
def test_missing_seqs_are_counted_across_wraps_and_rounds(case: tuple[list[tuple[int, int]], int, list[int]]) -> None:
    rows, between, cuts = case
    total, cursor = 0, None
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        n, cursor = count_missing(cursor, rows[lo:hi])
        total += n
    assert total == between
    assert count_missing(None, rows)[0] == between  # one round or several: the same count
    assert cursor == Cursor(rows[-1][1], rows[-1][0])


@given(st.dictionaries(st.integers(0, 10_000), st.integers(0, 255), max_size=50))
def test_a_row_seen_again_or_late_adds_nothing(by_ts: dict[int, int]) -> None:
    rows = sorted(by_ts.items())  # one message per instant, as a device sends them
    _n, cursor = count_missing(None, rows)
    assert count_missing(cursor, rows) == (0, cursor)  # the same rows judged again: nothing new
    if cursor is not None:
        assert count_missing(cursor, [(cursor.ts_ms - 1, (cursor.seq + 7) % 256)])[0] == 0  # older than the cursor


def test_the_first_row_of_a_session_and_a_wrap() -> None:
    assert count_missing(None, [(0, 254), (1, 255), (2, 0), (3, 2)]) == (1, Cursor(2, 3))
    assert count_missing(Cursor(255, 0), [(5, 0)]) == (0, Cursor(0, 5))
    assert count_missing(Cursor(7, 0), [(5_000, 7)]) == (255, Cursor(7, 5_000))  # 256 later: 255 between
    assert count_missing(None, [(9, 3), (9, 4), (9, 6)]) == (1, Cursor(6, 9))  # one instant, several messages
    assert count_missing(Cursor(6, 9), [(9, 3), (9, 4), (9, 6)]) == (0, Cursor(6, 9))  # seen again


def test_rebirth_requests_are_rate_limited_per_device() -> None:
    asked: dict[str, int] = {}
    assert devices_to_ask({"a": 2, "b": 0}, asked, 1_000, 10_000) == ["a"]
    assert devices_to_ask({"a": 1}, asked, 5_000, 10_000) == []
    assert devices_to_ask({"a": 1}, asked, 11_000, 10_000) == ["a"]


# -- the store round, on both backends ------------------------------------------------------------------------------
_COLS = "device_id, ts_ms, bd_seq, seq, received_ms, cpu_percent, load1, ram_available_mb, thermal_level, " \
        "throttle_ratio, queue_depth, replayed"


@pytest.fixture
def db(store_url: str) -> Iterator[Writer]:
    if is_postgres(store_url):
        w: Writer = PgWriter(store_url, PG_MIGRATIONS, name="gaps-test")
        w.call(lambda c: c.execute("CREATE TABLE telemetry_all PARTITION OF telemetry "
                                   "FOR VALUES FROM (MINVALUE) TO (MAXVALUE)"))
    else:
        w = Writer(store_url.removeprefix("sqlite:///"), MIGRATIONS, name="gaps-test")
    w.call(lambda c: c.executemany("INSERT INTO devices (device_id, fleet) VALUES (?, 'f')", [("d1",), ("d2",)]))
    yield w
    w.close()


def _store(db: Writer, rows: list[tuple[str, int, int, int, int]]) -> None:
    """(device, bd_seq, seq, ts_ms, received_ms) rows."""
    db.call(lambda c: c.executemany(
        f"INSERT INTO telemetry ({_COLS}) VALUES (?, ?, ?, ?, ?, 1.0, 0.5, 100, 0, 0.0, 0, 0)",
        [(d, ts, bd, seq, rcv) for d, bd, seq, ts, rcv in rows]))


def _gap_count(db: Writer, device: str) -> int:
    return int(db.read(lambda c: c.execute("SELECT gap_count FROM devices WHERE device_id = ?", (device,))
                       .fetchone()[0]))


def _round(db: Writer, now_ms: int, **kw: Any) -> gaps.GapRound:
    return db.call(lambda c: judge(c, now_ms, settle_ms=5_000, **kw))


def test_a_round_counts_settled_rows_and_a_new_leader_continues(db: Writer) -> None:
    first = _round(db, 10_000)
    assert first.rows == 0 and first.watermark_ms == 5_000  # a fresh store judges from now on
    # d1 session 3: seqs 250..255, 0..3 sent once a second, 253 and 1 lost; d2 session 1 without loss
    sent = [(250 + i) % 256 for i in range(10)]
    _store(db, [("d1", 3, s, 10_000 + i * 1_000, 10_050 + i * 1_000) for i, s in enumerate(sent) if s not in (253, 1)])
    _store(db, [("d2", 1, i, 10_000 + i * 1_000, 10_020 + i * 1_000) for i in range(10)])
    early = _round(db, 16_000)  # only what was received by 11,000 has settled
    assert early.rows == 2 and early.missing == {} and early.watermark_ms == 11_000
    done = _round(db, 30_000)
    assert done.missing == {"d1": 2} and done.caught_up
    assert _gap_count(db, "d1") == 2 and _gap_count(db, "d2") == 0
    # the next rows go on from the stored cursor (as a new leader's round would): 4 then 6 — 5 lost
    _store(db, [("d1", 3, 4, 21_000, 31_100), ("d1", 3, 6, 23_000, 33_100)])
    assert _round(db, 40_000).missing == {"d1": 1}
    assert _gap_count(db, "d1") == 3
    cursors = db.read(lambda c: c.execute("SELECT device_id, bd_seq, seq FROM gap_cursors ORDER BY 1").fetchall())
    assert [tuple(r) for r in cursors] == [("d1", 3, 6), ("d2", 1, 9)]


def test_a_new_session_starts_without_a_cursor(db: Writer) -> None:
    _round(db, 0)
    _store(db, [("d1", 1, 10, 1_000, 1_000), ("d1", 2, 0, 2_000, 2_000), ("d1", 2, 1, 3_000, 3_000)])
    assert _round(db, 10_000).missing == {}


def test_a_backlog_is_judged_in_bounded_rounds(db: Writer) -> None:
    _round(db, 0)
    # 40 rows for d1, 4 lost, received two by two (the same received_ms): rounds of 5 rows never split a pair
    rows = [("d1", 1, i % 256, 1_000 + i * 10, 1_000 + (i // 2) * 10) for i in range(44) if i not in (3, 17, 18, 40)]
    _store(db, rows)
    total, rounds = 0, 0
    while True:
        r = _round(db, 100_000, max_rows=5)
        total += sum(r.missing.values())
        rounds += 1
        assert r.rows <= 5
        if r.caught_up:
            break
    assert total == 4 and rounds > 5 and _gap_count(db, "d1") == 4


def test_more_rows_at_one_instant_than_a_round_takes(db: Writer) -> None:
    _round(db, 0)
    _store(db, [("d1", 1, i, 1_000 + i, 1_000) for i in range(12) if i != 6])
    r = _round(db, 100_000, max_rows=5)
    assert r.rows == 11 and r.missing == {"d1": 1} and not r.caught_up
    assert _round(db, 100_000, max_rows=5).rows == 0
