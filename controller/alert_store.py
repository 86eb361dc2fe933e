"""The stored alerts (table `alerts`, migration 004_alerts): reads on the caller's read connection, every write
through the store's one writer (`Store.submit`). An alert's history is its own timestamps — raised_ms, acked_ms
(with acked_by and ack_note), cleared_ms — and a condition that returns after its alert cleared is a new row.

Writes are guarded in SQL so they are right whatever ran in between: raising is an INSERT … ON CONFLICT DO NOTHING
against the unique (partial) index of open alerts per (device, kind), the same statement on SQLite and PostgreSQL;
clearing and acknowledging touch only a row still in the state they expect.
Each change is handed to `on_change("alert", {...})` after it committed (the live-update hub, when one is wired).

Exceptions (errors.py): AlertError ← AlertNotFound, AlertCleared.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from .alerting import AlertState, OpenAlert, Transitions
from .errors import AlertCleared, AlertNotFound

__all__ = ["AlertFilter", "AlertStore", "AlertView", "OnChange"]

log = logging.getLogger(__name__)
OnChange = Callable[[str, dict[str, Any]], None]
AlertFilter = Literal["open", "raised", "acknowledged", "cleared", "all"]
_COLUMNS = ("id, device_id, kind, state, detail, value, threshold, raised_ms, acked_ms, acked_by, ack_note, "
            "cleared_ms")
_STATES: dict[str, tuple[str, ...]] = {"open": ("raised", "acknowledged"), "raised": ("raised",),
                                       "acknowledged": ("acknowledged",), "cleared": ("cleared",),
                                       "all": ("raised", "acknowledged", "cleared")}


class SubmittingStore(Protocol):
    """What the alert store needs of controller.store.Store."""

    def submit(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...
    def read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...


@dataclass(frozen=True, slots=True)
class AlertView:
    id: int
    device_id: str  # '' for fleet-wide
    kind: str
    state: AlertState
    detail: str
    value: float
    threshold: float
    raised_ms: int
    acked_ms: int | None
    acked_by: str | None
    ack_note: str | None
    cleared_ms: int | None


class AlertStore:
    def __init__(self, store: SubmittingStore, on_change: OnChange | None = None) -> None:
        self.store = store
        self.on_change = on_change
        self.publish_errors = 0  # on_change raised: logged and counted, the alert itself is stored

    # -- reads (from a worker thread: they are blocking SQLite calls) ---------------------------------------------
    def open_alerts(self) -> list[OpenAlert]:
        rows = self.store.read(lambda c: c.execute(
            "SELECT id, device_id, kind, state FROM alerts WHERE state IN ('raised', 'acknowledged')").fetchall())
        return [OpenAlert(*r) for r in rows]

    def open_count(self) -> int:
        return int(self.store.read(lambda c: c.execute(
            "SELECT count(*) FROM alerts WHERE state IN ('raised', 'acknowledged')").fetchone()[0]))

    def get(self, alert_id: int) -> AlertView | None:
        rows = self.store.read(lambda c: c.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id = ?",
                                                   (alert_id,)).fetchall())
        return AlertView(*rows[0]) if rows else None

    def page(self, state: AlertFilter = "open", *, device_id: str | None = None, kind: str | None = None,
             limit: int = 100, cursor: int | None = None) -> tuple[list[AlertView], int | None]:
        """Newest first; `cursor` is the id to continue below (the previous page's next_cursor): keyset, no OFFSET."""
        states = _STATES[state]
        sql = f"SELECT {_COLUMNS} FROM alerts WHERE state IN ({','.join('?' * len(states))})"
        args: list[Any] = list(states)
        if device_id is not None:
            sql, args = sql + " AND device_id = ?", [*args, device_id]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        if cursor is not None:
            sql, args = sql + " AND id < ?", [*args, cursor]
        rows = self.store.read(lambda c: c.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall())
        views = [AlertView(*r) for r in rows[:limit]]
        return views, (views[-1].id if len(rows) > limit else None)

    # -- writes (through the store's one writer) --------------------------------------------------------------------
    def apply(self, changes: Transitions, now_ms: int) -> list[AlertView]:
        """Store a round's transitions in one job; return the alerts that changed (raised and cleared)."""
        if not changes:
            return []

        def run(conn: sqlite3.Connection) -> list[AlertView]:
            changed: list[int] = []
            for c in changes.raise_:
                row = conn.execute(
                    "INSERT INTO alerts (device_id, kind, state, detail, value, threshold, raised_ms) "
                    "VALUES (?, ?, 'raised', ?, ?, ?, ?) "
                    "ON CONFLICT (device_id, kind) WHERE state != 'cleared' DO NOTHING RETURNING id",
                    (c.device_id, c.kind, c.detail, c.value, c.threshold, now_ms)).fetchone()
                if row is not None:
                    changed.append(int(row[0]))
            for alert_id in changes.clear:
                cur = conn.execute("UPDATE alerts SET state = 'cleared', cleared_ms = ? "
                                   "WHERE id = ? AND state != 'cleared'", (now_ms, alert_id))
                if cur.rowcount:
                    changed.append(alert_id)
            return _fetch(conn, changed)

        views: list[AlertView] = self.store.submit(run).result()
        for view in views:
            self._publish(view)
        return views

    def acknowledge(self, alert_id: int, by: str, note: str, now_ms: int) -> tuple[AlertView, bool]:
        """raised → acknowledged (by whom, with a note); acknowledging again is a no-op answering the alert as is.
        Returns the alert and whether this call changed it."""

        def run(conn: sqlite3.Connection) -> tuple[AlertView, bool]:
            changed = conn.execute("UPDATE alerts SET state = 'acknowledged', acked_ms = ?, acked_by = ?, "
                                   "ack_note = ? WHERE id = ? AND state = 'raised'",
                                   (now_ms, by, note, alert_id)).rowcount > 0
            views = _fetch(conn, [alert_id])
            if not views:
                raise AlertNotFound(f"no alert {alert_id}")
            if views[0].state == "cleared":
                raise AlertCleared(f"alert {alert_id} cleared at {views[0].cleared_ms}; nothing to acknowledge")
            return views[0], changed

        view, changed = self.store.submit(run).result()
        if changed:
            self._publish(view)
        return view, changed

    def _publish(self, view: AlertView) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change("alert", asdict(view))
        except Exception:  # the hub's problem must not lose the stored alert: logged and counted
            self.publish_errors += 1
            log.exception("alerts: publishing the change of alert %d failed", view.id)


def _fetch(conn: sqlite3.Connection, ids: Sequence[int]) -> list[AlertView]:
    if not ids:
        return []
    rows = conn.execute(f"SELECT {_COLUMNS} FROM alerts WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
                        list(ids)).fetchall()
    return [AlertView(*r) for r in rows]

