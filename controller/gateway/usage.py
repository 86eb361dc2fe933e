"""Usage accounting: tokens in/out per UTC day, device, app and model, with their cost.

`UsageStore(path).summary(day)` is the read side the controller's REST API uses (any process, any thread).
`UsageLedger` is the gateway's side: it writes through the one writer and keeps today's totals in memory, so a
budget check costs no SQLite read.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nanofleet.config import Price

from .db import Database, open_db
from .rules import Used, cost_usd, utc_day


@dataclass(frozen=True)
class UsageRow:
    day: str
    device_id: str
    app_id: str
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


_SELECT = ("SELECT day, device_id, app_id, model, requests, input_tokens, output_tokens, cost_usd FROM usage")


class UsageStore:
    """Read access to the gateway's usage table; safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self._conn = open_db(path)
        self._lock = threading.Lock()

    def summary(self, day: str | None = None) -> list[UsageRow]:
        """Rows for one UTC day (`YYYY-MM-DD`), or all days when None; newest day first."""
        sql = _SELECT + (" WHERE day = ?" if day else "") + " ORDER BY day DESC, device_id, app_id, model"
        with self._lock:
            rows = self._conn.execute(sql, (day,) if day else ()).fetchall()
        return [UsageRow(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _add(conn: sqlite3.Connection, row: UsageRow) -> None:
    conn.execute(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, device_id, app_id, model) DO UPDATE SET "
        "requests = requests + excluded.requests, input_tokens = input_tokens + excluded.input_tokens, "
        "output_tokens = output_tokens + excluded.output_tokens, cost_usd = cost_usd + excluded.cost_usd",
        (row.day, row.device_id, row.app_id, row.model, row.requests, row.input_tokens, row.output_tokens,
         row.cost_usd),
    )


class UsageLedger:
    """Today's token totals in memory (for budgets) over the usage table (for accounting)."""

    def __init__(self, db: Database, prices: Mapping[str, Price]) -> None:
        self._db = db
        self._prices = prices
        self._day = ""
        self._device: dict[str, int] = defaultdict(int)
        self._app: dict[tuple[str, str], int] = defaultdict(int)
        self._fleet = 0
        self.on_record: Callable[[UsageRow], None] | None = None  # after each commit: the gateway's metrics

    def load(self, now: float) -> None:
        """Rebuild today's totals from the table (at start, so a restart does not refill budgets)."""
        day = utc_day(now)
        rows = self._db.read(lambda conn: conn.execute(
            "SELECT device_id, app_id, SUM(input_tokens + output_tokens) FROM usage WHERE day = ? "
            "GROUP BY device_id, app_id", (day,)).fetchall())
        self._reset(day)
        for device_id, app_id, tokens in rows:
            self._count(device_id, app_id, int(tokens or 0))

    def _reset(self, day: str) -> None:
        self._day = day
        self._device.clear()
        self._app.clear()
        self._fleet = 0

    def _count(self, device_id: str, app_id: str, tokens: int) -> None:
        self._device[device_id] += tokens
        self._app[(device_id, app_id)] += tokens
        self._fleet += tokens

    def used(self, device_id: str, app_id: str, now: float) -> Used:
        if utc_day(now) != self._day:
            self._reset(utc_day(now))
        return Used(device=self._device.get(device_id, 0), app=self._app.get((device_id, app_id), 0),
                    fleet=self._fleet)

    async def record(self, device_id: str, app_id: str, model: str, input_tokens: int, output_tokens: int,
                     now: float, also: Callable[[sqlite3.Connection], None] | None = None) -> UsageRow:
        """Count one upstream call (totals at once, the row after COMMIT); `also` commits in the same transaction."""
        self.used(device_id, app_id, now)  # rolls the day over if needed
        self._count(device_id, app_id, input_tokens + output_tokens)
        row = UsageRow(utc_day(now), device_id, app_id, model, 1, input_tokens, output_tokens,
                       cost_usd(model, input_tokens, output_tokens, self._prices))

        def job(conn: sqlite3.Connection) -> None:
            _add(conn, row)
            if also is not None:
                also(conn)

        await self._db.write(job)
        if self.on_record is not None:
            self.on_record(row)
        return row
