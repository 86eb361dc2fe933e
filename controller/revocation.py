"""Taking a device back (`nanofleet revoke`) and off the dashboard (`nanofleet devices remove`), store side.

The CLI runs beside a running controller: it writes the controller's store with a writer of its own
(controller/store_cli.py: SQLite's write lock, or the PostgreSQL server, serialises the two, as for the audit log)
and publishes a retained status `{online: false, reason: revoked}`
on the device's status topic. That status both replaces the device's last retained birth (the broker sends no last
will when a reload cuts a session, so the retained status would say `online` for good) and tells a running
controller, whose ingest then reads `revoked_devices` (devstate.py) and rejects the device's later messages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nanofleet.protos import fleet_pb2
from nanofleet.store_url import StoreTarget

from .devstate import _UPSERT, REVOKED, _Dev
from .store_cli import exists

__all__ = ["RemoveRefused", "is_known", "mark_revoked", "reinstate", "remove_device", "revoked_status"]

T = TypeVar("T")


class RemoveRefused(Exception):
    """`devices remove` of a device that is online (revoke it first) or unknown."""


Store = Path | StoreTarget  # a SQLite file, or what store_cli.target resolved (either backend)


def _run(db_path: Store, job: Callable[[sqlite3.Connection], T]) -> T:
    from .store_cli import writer as open_writer

    writer = open_writer(db_path)
    try:
        return writer.submit(job).result()
    finally:
        writer.close()


def revoked_status(fleet: str, device_id: str, at_ms: int) -> bytes:
    """The retained status that replaces the device's last birth (proto3 JSON, as every status payload)."""
    from google.protobuf import json_format

    status = fleet_pb2.DeviceStatus(fleet=fleet, device_id=device_id, online=False, ts_ms=at_ms, reason=REVOKED)
    return json_format.MessageToJson(status, indent=None).encode()


def mark_revoked(db_path: Store, fleet: str, device_id: str, actor: str, at_ms: int) -> None:
    """Record the revocation and show the device `revoked` (a row made for a device never seen)."""

    def job(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO revoked_devices VALUES (?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                     "revoked_ms = excluded.revoked_ms, actor = excluded.actor", (device_id, at_ms, actor))
        if conn.execute("UPDATE devices SET state = ? WHERE device_id = ?", (REVOKED, device_id)).rowcount == 0:
            conn.execute(_UPSERT, _Dev.new(device_id, fleet, REVOKED).row)
        conn.execute("INSERT INTO device_events (device_id, ts_ms, state, reason, bd_seq) "
                     "SELECT device_id, ?, ?, ?, bd_seq FROM devices WHERE device_id = ?",
                     (at_ms, REVOKED, REVOKED, device_id))

    _run(db_path, job)


def is_known(db_path: Store, device_id: str) -> bool:
    """Whether the store has a row for the device (a revoke of a mistyped id is refused, not recorded)."""
    if not exists(db_path):
        return False
    return _run(db_path, lambda conn: conn.execute("SELECT 1 FROM devices WHERE device_id = ?",
                                                   (device_id,)).fetchone() is not None)


def reinstate(db_path: Store, device_id: str) -> bool:
    """Lift a revocation (the device was enrolled again with fresh credentials); False if it was not revoked.
    The row stays `revoked` until the device's next birth makes it online."""
    if not exists(db_path):
        return False
    return _run(db_path, lambda conn: conn.execute("DELETE FROM revoked_devices WHERE device_id = ?",
                                                   (device_id,)).rowcount > 0)


def remove_device(db_path: Store, device_id: str) -> str:
    """Delete the device's row (its telemetry ages out with retention); returns the state it had.
    An online device is refused: it would come back with its next message."""

    def job(conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT state FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        if row is None:
            raise RemoveRefused(f"no device {device_id!r} in {db_path}")
        if row[0] == "online":
            raise RemoveRefused(f"{device_id} is online: revoke it first (`nanofleet revoke {device_id}`), or it "
                                "comes back with its next message")
        conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
        conn.execute("DELETE FROM device_groups WHERE device_id = ?", (device_id,))
        return str(row[0])

    return _run(db_path, job)
