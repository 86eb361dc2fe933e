"""Telemetry kept on disk while the broker is unreachable: bounded, oldest dropped first (and counted), FIFO.

SQLite in the agent's data dir (0600), so a restart replays what was buffered before it. Blocking: callers on the event
loop go through `asyncio.to_thread`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from nanofleet.sqlite_db import connect


class TelemetryBuffer:
    def __init__(self, path: str | Path, max_items: int = 10_000) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self._lock = threading.Lock()
        self._db = connect(path)  # 0600 whatever the umask, WAL, synchronous=NORMAL, autocommit
        self._db.execute("CREATE TABLE IF NOT EXISTS buf (id INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def push(self, payload: bytes) -> int:
        """Append; drop the oldest beyond max_items. Returns how many were dropped now."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO buf (payload) VALUES (?)", (payload,))
            n = self._db.execute("SELECT count(*) FROM buf").fetchone()[0]
            over = max(0, n - self.max_items)
            if over:
                self._db.execute("DELETE FROM buf WHERE id IN (SELECT id FROM buf ORDER BY id LIMIT ?)", (over,))
                self._db.execute(
                    "INSERT INTO meta VALUES ('dropped', ?) ON CONFLICT (key) DO UPDATE SET value = value + ?",
                    (over, over),
                )
            self._db.execute("COMMIT")
            return over

    def peek(self, limit: int = 100) -> list[tuple[int, bytes]]:
        with self._lock:
            return list(self._db.execute("SELECT id, payload FROM buf ORDER BY id LIMIT ?", (limit,)))

    def delete(self, ids: list[int]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM buf WHERE id = ?", [(i,) for i in ids])

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM buf").fetchone()[0]

    @property
    def dropped(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
            return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
