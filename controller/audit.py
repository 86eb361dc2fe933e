"""The audit log: who did what, to what, when and from where — append-only (table `audit`, migration 005_audit).

Recorded: logins (and failed ones, with the client address; never the token), logouts, commands (kind, device,
result), alert acknowledgements, policy applies (`nanofleet policy apply` and the controller's own publishing),
operator token rotations, named operators added and removed, enrolments, gateway-token revocations, device
revocations (`nanofleet revoke`) and removals (`nanofleet devices remove`), rollouts (the operator's start, pause,
resume, abort, pin, unpin; the controller's own steps, rollbacks and completions). The controller writes through
its store's one writer; a CLI command while the controller runs opens the same store with a writer of its own
(another process: SQLite's write lock and busy timeout, or the PostgreSQL server, serialise the two). There is no
UPDATE or DELETE path in the code, and the store refuses both (triggers; PostgreSQL's also TRUNCATE): an entry once
written stays.

`record()` waits for the commit (the CLI and tests); `record_soon()` does not (a web request or the event loop):
its failure is logged and counted in `errors`, never lost silently.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanofleet.store_url import StoreTarget

from .alert_store import OnChange, SubmittingStore

__all__ = ["ACTIONS", "AuditEntry", "AuditLog", "cli_actor", "now_ms", "record_cli"]

log = logging.getLogger(__name__)

ACTIONS = ("login", "login_failed", "logout", "command", "alert_ack", "policy_apply", "token_rotate", "operator_add",
           "operator_remove", "enroll", "token_revoke", "revoke", "device_remove", "rollout")
_MAX_DETAIL = 4000  # characters of detail json kept (a command's result data is the device's to choose)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts_ms: int
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    source: str


class AuditLog:
    def __init__(self, store: SubmittingStore, on_change: OnChange | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store, self.on_change, self.clock = store, on_change, clock
        self.errors = 0  # entries that could not be written (logged) or changes not published

    def _job(self, actor: str, action: str, target: str, detail: Mapping[str, Any] | None,
             source: str) -> Callable[[sqlite3.Connection], AuditEntry]:
        if action not in ACTIONS:
            raise ValueError(f"audit action {action!r} is not one of {', '.join(ACTIONS)}")
        text = json.dumps(dict(detail or {}), sort_keys=True, default=str)
        if len(text) > _MAX_DETAIL:
            text = json.dumps({"truncated": text[:_MAX_DETAIL]})
        ts = self.clock()

        def run(conn: sqlite3.Connection) -> AuditEntry:
            (entry_id,) = conn.execute("INSERT INTO audit (ts_ms, actor, action, target, detail, source) "
                                       "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                                       (ts, actor, action, target, text, source)).fetchone()
            return AuditEntry(int(entry_id), ts, actor, action, target, json.loads(text), source)

        return run

    def record(self, actor: str, action: str, target: str = "", detail: Mapping[str, Any] | None = None,
               source: str = "") -> AuditEntry:
        """Append one entry and wait for its commit (from a thread other than the event loop)."""
        entry: AuditEntry = self.store.submit(self._job(actor, action, target, detail, source)).result()
        self._publish(entry)
        return entry

    def record_soon(self, actor: str, action: str, target: str = "", detail: Mapping[str, Any] | None = None,
                    source: str = "") -> Future[AuditEntry]:
        """Append without waiting (safe on the event loop); a failure is logged and counted."""
        future: Future[AuditEntry] = self.store.submit(self._job(actor, action, target, detail, source))
        future.add_done_callback(self._settled)
        return future

    def _settled(self, future: Future[AuditEntry]) -> None:
        exc = future.exception()
        if exc is not None:
            self.errors += 1
            log.error("audit: an entry could not be written: %s: %s", type(exc).__name__, exc)
            return
        self._publish(future.result())

    def _publish(self, entry: AuditEntry) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change("audit", asdict(entry))
        except Exception:  # the hub's problem must not undo the stored entry: logged and counted
            self.errors += 1
            log.exception("audit: publishing entry %d failed", entry.id)

    def page(self, *, actor: str | None = None, action: str | None = None, since_ms: int | None = None,
             limit: int = 100, cursor: int | None = None) -> tuple[list[AuditEntry], int | None]:
        """Newest first; `cursor` continues below the previous page's last id (keyset, no OFFSET)."""
        sql, args = "SELECT id, ts_ms, actor, action, target, detail, source FROM audit WHERE TRUE", []
        for column, op, value in (("actor", "=", actor), ("action", "=", action), ("ts_ms", ">=", since_ms),
                                  ("id", "<", cursor)):
            if value is not None:
                sql += f" AND {column} {op} ?"
                args.append(value)
        rows = self.store.read(lambda c: c.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall())
        entries = [AuditEntry(r[0], r[1], r[2], r[3], r[4], _detail(r[5]), r[6]) for r in rows[:limit]]
        return entries, (entries[-1].id if len(rows) > limit else None)


def _detail(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


def cli_actor() -> str:
    """`cli:<OS user>`: who ran a CLI command (the OS account; the CLI has no operator login)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name for this uid (a container): the uid says who
        return f"cli:uid{os.getuid()}"


def record_cli(db_path: Path | StoreTarget, action: str, target: str, detail: Mapping[str, Any] | None = None, *,
               create: bool = True) -> AuditEntry | None:
    """Append a CLI command's entry to the controller store at `db_path` (a SQLite file, or a store_cli.target on
    either backend), as another writer beside a running controller (SQLite's write lock and busy timeout, or the
    PostgreSQL server, serialise the two). With `create=False` a missing SQLite store is left alone and None
    returned (the command ran where no controller keeps its state)."""
    from .store_cli import exists
    from .store_cli import writer as open_writer

    if not create and not exists(db_path):
        return None
    writer = open_writer(db_path, "cli-audit")
    try:
        return AuditLog(writer).record(cli_actor(), action, target, detail, "cli")
    finally:
        writer.close()
