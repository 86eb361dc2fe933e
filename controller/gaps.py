"""Sparkplug seq gaps judged from what is stored, so several controllers sharing a fleet (`$share/`) can judge them.

With `$share` each controller sees only some of a device's messages, so the live check in controller.devstate is
off there. Instead the leader periodically reads the telemetry rows that have settled (received more than
`settle_ms` ago, so a message still on its way through another controller is not taken for lost), in the order
they were received, and walks each device session's (device_id, bd_seq) rows in device-time order: every seq
skipped between two stored rows (0..255, wrapping) is one missing message. The missing ones are added to the
device's `gap_count` and the device is asked for a rebirth.

Progress is the store's, so a new leader continues where the old one stopped: `gap_watermark` holds the
`received_ms` up to which rows were judged, `gap_cursors` the last judged (seq, ts_ms) of each session. A fresh
store starts judging from its first round (history is not re-judged).

What this cannot see: messages lost at the very start or end of a session (no stored neighbour), a run of 256 or
more missing in a row (seq wraps: counted modulo 256), and a row that arrives later than `settle_ms` behind a newer
one of its session (it was already counted missing; it is stored all the same). `received_ms` is stamped by the
controller that took the message: controllers' clocks must agree to well within `settle_ms` (NTP), and a row
committed more than `settle_ms` after it was received is stored but not judged.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SEQ_MOD = 256
SETTLE_MS = 5_000  # received this long ago: a message still queued at another controller has been stored by then
MAX_ROWS = 50_000  # rows one round reads at most; the next round continues (a backlog is caught up in steps)
CURSOR_KEEP_MS = 8 * 86_400_000  # a session silent this long (past raw retention) forgets its cursor
_WATERMARK = "telemetry"


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last judged row of a session."""

    seq: int
    ts_ms: int


def count_missing(cursor: Cursor | None, rows: Iterable[tuple[int, int]]) -> tuple[int, Cursor | None]:
    """Missing seqs in one session's rows `(ts_ms, seq)` (in ts order) after `cursor`; returns them and the new
    cursor. A row older than the cursor arrived too late to be judged (skipped); the same row twice counts once;
    rows of one instant count when their seq is less than half the ring ahead of the cursor."""
    missing = 0
    for ts_ms, seq in rows:
        if cursor is not None:
            ahead = (seq - cursor.seq) % SEQ_MOD
            if ts_ms < cursor.ts_ms or (ts_ms == cursor.ts_ms and not 0 < ahead < SEQ_MOD // 2):
                continue  # judged already (the same row, or one of the same instant before it), or too late
            missing += (seq - cursor.seq - 1) % SEQ_MOD
        cursor = Cursor(seq, ts_ms)
    return missing, cursor


@dataclass(slots=True)
class GapRound:
    """What one round judged: rows read, missing seqs per device, and whether it caught up with the settled rows."""

    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)
    caught_up: bool = True
    watermark_ms: int = 0


def judge(conn: Any, now_ms: int | None = None, *, settle_ms: int = SETTLE_MS, max_rows: int = MAX_ROWS) -> GapRound:
    """One round on a store connection, inside the caller's transaction (a Store/PgWriter job): read the settled rows
    past the watermark, count, and write gap_count, cursors and the watermark together (all or nothing)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    hi = now_ms - settle_ms
    row = conn.execute("SELECT received_ms FROM gap_watermark WHERE name = ?", (_WATERMARK,)).fetchone()
    out = GapRound(watermark_ms=hi)
    if row is None:  # a fresh store: judge from now on (history was judged live, or cannot be any more)
        _set_watermark(conn, hi)
        return out
    lo = int(row[0])
    out.watermark_ms = lo
    if hi <= lo:
        return out
    rows = conn.execute(
        "SELECT received_ms, device_id, bd_seq, ts_ms, seq FROM telemetry WHERE received_ms > ? AND received_ms <= ? "
        "ORDER BY received_ms LIMIT ?", (lo, hi, max_rows + 1)).fetchall()
    if len(rows) > max_rows:  # rows at the first received_ms left out may go on past the limit: stop before it
        out.caught_up = False
        cut = rows[max_rows][0]
        rows = [r for r in rows[:max_rows] if r[0] < cut]
        if not rows:  # one received_ms holds more than max_rows rows: take all of them
            rows = conn.execute("SELECT received_ms, device_id, bd_seq, ts_ms, seq FROM telemetry "
                                "WHERE received_ms = ?", (cut,)).fetchall()
        hi = rows[-1][0]
    out.rows = len(rows)
    sessions: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for _, device_id, bd_seq, ts_ms, seq in rows:
        sessions.setdefault((device_id, int(bd_seq)), []).append((int(ts_ms), int(seq)))
    cursors = _cursors(conn, sessions)
    updates: list[tuple[Any, ...]] = []
    for key, session_rows in sessions.items():
        session_rows.sort()
        missing, cursor = count_missing(cursors.get(key), session_rows)
        if missing:
            out.missing[key[0]] = out.missing.get(key[0], 0) + missing
        if cursor is not None:
            updates.append((key[0], key[1], cursor.seq, cursor.ts_ms, now_ms))
    conn.executemany(
        "INSERT INTO gap_cursors (device_id, bd_seq, seq, ts_ms, updated_ms) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (device_id, bd_seq) DO UPDATE SET seq = excluded.seq, ts_ms = excluded.ts_ms, "
        "updated_ms = excluded.updated_ms", updates)
    conn.executemany("UPDATE devices SET gap_count = gap_count + ? WHERE device_id = ?",
                     [(n, d) for d, n in sorted(out.missing.items())])
    conn.execute("DELETE FROM gap_cursors WHERE updated_ms < ?", (now_ms - CURSOR_KEEP_MS,))
    _set_watermark(conn, hi)
    out.watermark_ms = hi
    return out


def _cursors(conn: Any, sessions: dict[tuple[str, int], Any]) -> dict[tuple[str, int], Cursor]:
    devices = sorted({d for d, _ in sessions})
    found: dict[tuple[str, int], Cursor] = {}
    for i in range(0, len(devices), 500):  # SQLite's bound-parameter limit
        chunk = devices[i:i + 500]
        marks = ", ".join("?" * len(chunk))
        for device_id, bd_seq, seq, ts_ms in conn.execute(
                f"SELECT device_id, bd_seq, seq, ts_ms FROM gap_cursors WHERE device_id IN ({marks})", chunk):
            found[(device_id, int(bd_seq))] = Cursor(int(seq), int(ts_ms))
    return found


def _set_watermark(conn: Any, received_ms: int) -> None:
    conn.execute("INSERT INTO gap_watermark (name, received_ms) VALUES (?, ?) "
                 "ON CONFLICT (name) DO UPDATE SET received_ms = excluded.received_ms", (_WATERMARK, received_ms))


def devices_to_ask(missing: dict[str, int], asked_ms: dict[str, int], now_ms: int, every_ms: int) -> list[str]:
    """Devices with missing seqs not asked for a rebirth in the last `every_ms` (updates `asked_ms`)."""
    due = [d for d in sorted(missing) if missing[d] > 0 and now_ms - asked_ms.get(d, -every_ms) >= every_ms]
    for d in due:
        asked_ms[d] = now_ms
    return due
