"""Usage accounting: tokens in/out per UTC day, device, app and model, with their cost.

`UsageStore(store).summary(day)` is the read side the controller's REST API and the CLI use (any process, any
thread; a SQLite path, a store URL or a StoreTarget). `UsageLedger` is the gateway's side: one writer job per call
commits the usage row, settles the call's budget reservation (nanofleet.controller.gateway.budgets) and, through
`also`, the idempotent answer — all in one transaction, so an answered call is counted exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nanofleet.config import Price

from . import budgets
from .db import GatewayDb, Target, open_connection
from .rules import cost_usd, utc_day


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

    def __init__(self, store: Target) -> None:
        self._conn = open_connection(store)
        self._lock = threading.Lock()

    def summary(self, day: str | None = None) -> list[UsageRow]:
        """Rows for one UTC day (`YYYY-MM-DD`), or all days when None; newest day first."""
        sql = _SELECT + (" WHERE day = ?" if day else "") + " ORDER BY day DESC, device_id, app_id, model"
        with self._lock:
            rows = self._conn.execute(sql, (day,) if day else ()).fetchall()
        return [UsageRow(day, dev, app, model, int(n), int(i), int(o), float(c))
                for day, dev, app, model, n, i, o, c in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _add(conn: Any, row: UsageRow) -> None:
    conn.execute(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, device_id, app_id, model) DO UPDATE SET "
        "requests = usage.requests + excluded.requests, input_tokens = usage.input_tokens + excluded.input_tokens, "
        "output_tokens = usage.output_tokens + excluded.output_tokens, cost_usd = usage.cost_usd + excluded.cost_usd",
        (row.day, row.device_id, row.app_id, row.model, row.requests, row.input_tokens, row.output_tokens,
         row.cost_usd),
    )


class UsageLedger:
    """The usage table and the budget rows, written together for each answered (or partly streamed) call."""

    def __init__(self, db: GatewayDb, prices: Mapping[str, Price], budgets_: budgets.Budgets | None = None) -> None:
        self._db = db
        self._prices = prices
        self.budgets = budgets_ or budgets.Budgets(db, "gateway", hold_s=60.0)
        self.on_record: Callable[[UsageRow], None] | None = None  # after each commit: the gateway's metrics

    async def record(self, device_id: str, app_id: str, model: str, input_tokens: int, output_tokens: int,
                     now: float, also: Callable[[Any], None] | None = None,
                     reservation: budgets.Reservation | None = None) -> UsageRow:
        """Count one upstream call and settle its reservation in one transaction; `also` commits with them."""
        row = UsageRow(utc_day(now), device_id, app_id, model, 1, input_tokens, output_tokens,
                       cost_usd(model, input_tokens, output_tokens, self._prices))

        def job(conn: Any) -> None:
            _add(conn, row)
            budgets.settle(conn, reservation, device_id, app_id, input_tokens + output_tokens, now)
            if also is not None:
                also(conn)

        await self._db.write(job)
        if self.on_record is not None:
            self.on_record(row)
        return row
