"""Daily token budgets counted atomically in the gateway's database, however many gateways share it.

Before its upstream call a call *reserves* its worst case — an upper bound of its prompt (`input_bound`) plus the
output tokens it may produce — on the budget rows of every scope that has a limit (the fleet, the device, the
device's app for the UTC day), in one writer transaction: the rows are locked (PostgreSQL `FOR UPDATE`, SQLite's
single writer), checked and raised together. After the call the reservation is *settled* to the tokens the upstream
reported (with the usage row, in the same transaction) or *released* when the call failed. A gateway killed mid-call
leaves its reservation behind: every reservation expires `hold_s` after it was made (the gateway's upstream timeout
plus a margin, past which no call of its can still be running) and any gateway's housekeeping releases it.

What "never exceeded" means exactly: for each scope and UTC day, the settled tokens plus the reservations in flight
never pass the limit, on any number of gateways. A call is admitted only if its prompt bound and at least one output
token fit in what is left; its output is capped at what fits (the upstream gets that `max_output_tokens`: the
request's own, `OUTPUT_RESERVE` when it sets none, less when less is left), so a call can never be charged more
than it reserved as long as the upstream counts no more prompt tokens than UTF-8 bytes plus 4 a message (true of
byte-level BPE and SentencePiece-with-byte-fallback tokenizers) and honours max_output_tokens (Gemini counts
thinking inside it).
Not counted: the tokens of a call whose gateway died before it recorded them — the upstream may have charged them,
no usage row says so; its reservation is released on expiry.

Refusals are `BudgetRefused` (RESOURCE_EXHAUSTED): retry after the next UTC midnight when the settled tokens alone
leave no room, after `rules.BUSY_RETRY_S` when only reservations of calls in flight stand in the way.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanofleet.pg_db import dialect
from nanofleet.sqlite_db import DatabaseClosed

from .db import GatewayDb, lock_gateway_writes, transaction
from .errors import BudgetExceeded
from .rules import BudgetRefusal, Limits, Used, fit_output, utc_day
from .upstreams.base import UpstreamRequest

log = logging.getLogger("nanofleet.gateway")
OUTPUT_RESERVE = 8192  # output tokens reserved (and passed upstream as max_output_tokens) when a request sets none
HOLD_MARGIN_S = 2.0  # a reservation outlives the upstream timeout by this much (the settle write, clock skew)
_MESSAGE_OVERHEAD = 4
_SCOPES = (("app", "a"), ("device", "d"), ("fleet", "f"))  # lock order: the same on every gateway


class BudgetRefused(BudgetExceeded):
    """A budget has no room for this call; `scope` is fleet | device | app."""

    def __init__(self, scope: str, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)
        self.scope = scope


@dataclass(frozen=True)
class Reservation:
    id: str
    day: str
    device_id: str
    app_id: str
    scopes: str  # letters of the scopes reserved on: a(pp) d(evice) f(leet)
    tokens: int
    max_output: int  # the output cap the upstream gets


def input_bound(request: UpstreamRequest) -> int:
    """An upper bound of the prompt's tokens: its UTF-8 bytes plus 4 a message (see the module docstring)."""
    total = len(request.system_instruction.encode()) + (_MESSAGE_OVERHEAD if request.system_instruction else 0)
    for message in request.messages:
        total += len(message.content.encode()) + _MESSAGE_OVERHEAD
    return total


def _key(scope: str, device_id: str, app_id: str) -> tuple[str, str]:
    return {"fleet": ("", ""), "device": (device_id, ""), "app": (device_id, app_id)}[scope]


_INIT = {  # a day's first row of a scope starts from the usage already recorded that day (an upgraded gateway.db)
    "fleet": "WHERE day = ?",
    "device": "WHERE day = ? AND device_id = ?",
    "app": "WHERE day = ? AND device_id = ? AND app_id = ?",
}


def _row(conn: Any, day: str, scope: str, device_id: str, app_id: str) -> tuple[int, int]:
    """(used, reserved) of a budget row, created from the usage table if missing, locked until COMMIT."""
    dev, app = _key(scope, device_id, app_id)
    lock = " FOR UPDATE" if dialect(conn) == "postgresql" else ""
    select = ("SELECT used, reserved FROM budget_counts WHERE day = ? AND scope = ? AND device_id = ? AND app_id = ?"
              + lock)
    row = conn.execute(select, (day, scope, dev, app)).fetchone()
    if row is None:
        args = (day, device_id, app_id)[:1 + (scope != "fleet") + (scope == "app")]
        conn.execute("INSERT INTO budget_counts (day, scope, device_id, app_id, used, reserved) "
                     "SELECT ?, ?, ?, ?, coalesce(sum(input_tokens + output_tokens), 0), 0 FROM usage "
                     f"{_INIT[scope]} ON CONFLICT (day, scope, device_id, app_id) DO NOTHING",
                     (day, scope, dev, app, *args))
        row = conn.execute(select, (day, scope, dev, app)).fetchone()
    return int(row[0]), int(row[1])


def _add(conn: Any, day: str, scopes: str, device_id: str, app_id: str, used: int, reserved: int) -> None:
    for scope, letter in _SCOPES:
        if letter in scopes:
            dev, app = _key(scope, device_id, app_id)
            conn.execute("UPDATE budget_counts SET used = used + ?, reserved = reserved + ? "
                         "WHERE day = ? AND scope = ? AND device_id = ? AND app_id = ?",
                         (used, reserved, day, scope, dev, app))


def settle(conn: Any, reservation: Reservation | None, device_id: str, app_id: str, tokens: int, now: float) -> None:
    """Charge `tokens` in the current transaction, giving back what the reservation held (if not yet expired)."""
    if reservation is None:  # not reserved (cannot happen on the service's paths): count it where rows exist
        _add(conn, utc_day(now), "adf", device_id, app_id, tokens, 0)
        return
    held = conn.execute("DELETE FROM reservations WHERE id = ? RETURNING tokens", (reservation.id,)).fetchone()
    _add(conn, reservation.day, reservation.scopes, device_id, app_id, tokens, -int(held[0]) if held else 0)


def release_expired(conn: Any, now_ms: int) -> int:
    """Give back the reservations past their expiry (a dead gateway's); returns how many. Safe on any gateway:
    each row is deleted, and so released, once."""
    rows = conn.execute("DELETE FROM reservations WHERE expires_ms < ? RETURNING day, device_id, app_id, scopes, "
                        "tokens", (now_ms,)).fetchall()
    for day, device_id, app_id, scopes, tokens in rows:
        _add(conn, day, scopes, device_id, app_id, 0, -int(tokens))
    return len(rows)


def housekeeping(window_s: float, clock: Callable[[], float] = time.time) -> Callable[[Any], None]:
    """The writer's periodic job: release expired reservations and idempotency claims, drop old rows."""

    def run(conn: Any) -> None:
        now = clock()
        now_ms = int(now * 1000)
        with transaction(conn):
            lock_gateway_writes(conn)
            release_expired(conn, now_ms)
            conn.execute("DELETE FROM idempotency_claims WHERE expires_ms < ?", (now_ms,))
            conn.execute("DELETE FROM budget_counts WHERE day < ?", (utc_day(now - 2 * 86_400),))
            conn.execute("DELETE FROM idempotency WHERE created_ms < ?", (int((now - window_s) * 1000),))

    return run


class Budgets:
    """Reserve / settle / release against the shared budget rows (one writer job each)."""

    def __init__(self, db: GatewayDb, gateway_id: str, hold_s: float) -> None:
        self.db = db
        self.gateway_id = gateway_id
        self.hold_s = hold_s
        self.release_errors = 0

    async def reserve(self, device_id: str, app_id: str, limits: Limits, prompt: int, max_output: int | None,
                      now: float) -> Reservation:
        """Hold this call's worst case on every limited scope, or raise BudgetRefused (see the module docstring)."""
        day = utc_day(now)
        wanted = max_output or OUTPUT_RESERVE
        scoped = [(scope, letter, getattr(limits, scope)) for scope, letter in _SCOPES
                  if getattr(limits, scope) is not None]
        rid = secrets.token_hex(12)
        expires_ms = int((now + self.hold_s) * 1000)

        def job(conn: Any) -> Reservation:
            out = wanted
            for scope, _letter, limit in scoped:
                used, reserved = _row(conn, day, scope, device_id, app_id)
                fit = fit_output(scope, used, reserved, limit, prompt, out, now)
                if isinstance(fit, BudgetRefusal):
                    raise BudgetRefused(scope, fit.message, fit.retry_after)
                out = fit
            scopes = "".join(letter for _scope, letter, _limit in scoped)
            _add(conn, day, scopes, device_id, app_id, 0, prompt + out)
            conn.execute("INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (rid, day, device_id, app_id, scopes, prompt + out, expires_ms, self.gateway_id))
            return Reservation(rid, day, device_id, app_id, scopes, prompt + out, out)

        result: Reservation = await self.db.write(job)
        return result

    def release(self, reservation: Reservation) -> None:
        """Give a failed call's reservation back (queued, not awaited: it runs from `except` blocks too); a failure is
        counted and logged, and the reservation then expires on its own."""

        def job(conn: Any) -> None:
            held = conn.execute("DELETE FROM reservations WHERE id = ? RETURNING tokens", (reservation.id,)).fetchone()
            if held:
                _add(conn, reservation.day, reservation.scopes, reservation.device_id, reservation.app_id, 0,
                     -int(held[0]))

        try:
            future = self.db.submit(job)
        except DatabaseClosed:  # shutdown: the reservation expires on its own
            self._failed(None)
            return
        future.add_done_callback(lambda f: self._failed(f.exception()) if f.exception() is not None else None)

    def _failed(self, exc: BaseException | None) -> None:
        self.release_errors += 1
        log.warning(
            "a budget reservation was not released (it expires within %.0fs): %s", self.hold_s, exc)

    def used(self, device_id: str, app_id: str, now: float) -> Used:
        """Settled tokens of the day per scope, from the usage table (a worker thread's read; tests, the CLI)."""
        day = utc_day(now)

        def read(conn: Any) -> Used:
            def total(where: str, *args: str) -> int:
                row = conn.execute("SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage WHERE day = ?"
                                   + where, (day, *args)).fetchone()
                return int(row[0])

            return Used(device=total(" AND device_id = ?", device_id),
                        app=total(" AND device_id = ? AND app_id = ?", device_id, app_id), fleet=total(""))

        return self.db.read(read)

