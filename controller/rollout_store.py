"""Rollouts in the controller store (migration 007_rollouts): the rollouts' states, pinned devices, the event log,
and `rollout_models` — the model a rollout wants on a device instead of fleet.yaml's, which every policy
compilation takes (controller/policy.py), so a later `policy apply` does not undo a rollout.

Functions over a `Store`: writes go through its one writer (`submit`), reads through `read`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from nanofleet.controller.rollouts import ACTIVE, DeviceReport, Rollout, RolloutInputError
from nanofleet.controller.store import Store

T = TypeVar("T")


class Reader(Protocol):
    """What the read functions need: the Store's `read` (the web app's FleetReader has it too)."""

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...


__all__ = ["Reader", "RolloutEvent", "active", "create", "desired_models", "desired_settings", "events", "get",
           "group_reports", "latest", "list_all", "pin", "pins", "save", "unpin"]


@dataclass(frozen=True)
class RolloutEvent:
    rollout_id: int
    ts_ms: int
    kind: str
    detail: str


def _now() -> int:
    return int(time.time() * 1000)


def create(store: Store, r: Rollout) -> Rollout:
    """Store a new rollout (its id assigned here); RolloutInputError while the group has an active one."""
    def run(conn: sqlite3.Connection) -> Rollout:
        for (text,) in conn.execute("SELECT state_json FROM rollouts WHERE active = 1 AND grp = ?", (r.group,)):
            other = Rollout.from_json(text)
            raise RolloutInputError(f"--group {r.group!r}: rollout {other.id} is still {other.state}; pause, "
                                    f"abort or wait for it first")
        now = _now()
        (new_id,) = conn.execute("INSERT INTO rollouts (grp, state_json, active, created_ms, updated_ms) "
                                 "VALUES (?, '{}', 1, ?, ?) RETURNING id", (r.group, now, now)).fetchone()
        r.id, r.step_started_ms = int(new_id), now
        conn.execute("UPDATE rollouts SET state_json = ? WHERE id = ?", (r.to_json(), r.id))
        conn.execute("INSERT INTO rollout_events (rollout_id, ts_ms, kind, detail) VALUES (?, ?, 'started', ?)",
                     (r.id, now, f"{r.target_sha256[:12]} to group {r.group}: steps "
                                 f"{','.join(map(str, r.steps))}, gate {r.gate}, bake {r.bake_s:g} s"))
        return r

    return store.submit(run).result()


def save(store: Store, r: Rollout, new_events: list[tuple[str, str]],
         models: Mapping[str, tuple[str, str]] | None = None, clear_models: list[str] | None = None,
         expect: Rollout | None = None, settings: Mapping[str, int] | None = None,
         clear_settings: list[str] | None = None) -> bool:
    """The rollout's new state and events in one transaction; `models`: devices' rollout models to set,
    `clear_models`: devices back on fleet.yaml's model; `settings`: devices given the rollout's settings, with the
    policy version that carried them, `clear_settings`: devices back on fleet.yaml's settings. With `expect`, only
    if the stored state is still that one
    (an operator's pause or abort in between wins; the engine looks again on its next tick): False when not."""
    def run(conn: sqlite3.Connection) -> bool:
        if expect is not None:
            row = conn.execute("SELECT state_json FROM rollouts WHERE id = ?", (r.id,)).fetchone()
            if row is None or Rollout.from_json(row[0]) != expect:
                return False
        now = _now()
        conn.execute("UPDATE rollouts SET state_json = ?, active = ?, updated_ms = ? WHERE id = ?",
                     (r.to_json(), int(r.state in ACTIVE), now, r.id))
        conn.executemany("INSERT INTO rollout_events (rollout_id, ts_ms, kind, detail) VALUES (?, ?, ?, ?)",
                         [(r.id, now, k, d) for k, d in new_events])
        if models:
            conn.executemany("INSERT INTO rollout_models VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                             "rollout_id = excluded.rollout_id, source = excluded.source, sha256 = excluded.sha256",
                             [(d, r.id, src, sha) for d, (src, sha) in models.items()])
        if clear_models:
            conn.executemany("DELETE FROM rollout_models WHERE device_id = ?", [(d,) for d in clear_models])
        if settings:
            body = json.dumps(r.settings, sort_keys=True)
            conn.executemany("INSERT INTO rollout_settings VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE "
                             "SET rollout_id = excluded.rollout_id, settings_json = excluded.settings_json, "
                             "hash = excluded.hash, version = excluded.version",
                             [(d, r.id, body, r.target_sha256, v) for d, v in settings.items()])
        if clear_settings:
            conn.executemany("DELETE FROM rollout_settings WHERE device_id = ?", [(d,) for d in clear_settings])
        return True

    return store.submit(run).result()


def _rollouts(store: Reader, where: str, args: tuple[object, ...] = ()) -> list[Rollout]:
    rows = store.read(lambda c: c.execute(f"SELECT state_json FROM rollouts {where}", args).fetchall())
    return [Rollout.from_json(t) for (t,) in rows]


def active(store: Reader) -> list[Rollout]:
    return _rollouts(store, "WHERE active = 1 ORDER BY id")


def list_all(store: Reader, limit: int = 50) -> list[Rollout]:
    return _rollouts(store, "ORDER BY id DESC LIMIT ?", (limit,))


def get(store: Reader, rollout_id: int) -> Rollout | None:
    found = _rollouts(store, "WHERE id = ?", (rollout_id,))
    return found[0] if found else None


def latest(store: Reader, group: str | None = None) -> Rollout | None:
    found = (_rollouts(store, "WHERE grp = ? ORDER BY id DESC LIMIT 1", (group,)) if group
             else _rollouts(store, "ORDER BY id DESC LIMIT 1"))
    return found[0] if found else None


def events(store: Reader, rollout_id: int) -> list[RolloutEvent]:
    rows = store.read(lambda c: c.execute("SELECT rollout_id, ts_ms, kind, detail FROM rollout_events "
                                          "WHERE rollout_id = ? ORDER BY id", (rollout_id,)).fetchall())
    return [RolloutEvent(*r) for r in rows]


def pins(store: Reader) -> set[str]:
    return {d for (d,) in store.read(lambda c: c.execute("SELECT device_id FROM rollout_pins").fetchall())}


def pin(store: Store, device_id: str, note: str = "") -> None:
    store.submit(lambda c: c.execute("INSERT INTO rollout_pins VALUES (?, ?, ?) ON CONFLICT (device_id) DO UPDATE "
                                     "SET pinned_ms = excluded.pinned_ms, note = excluded.note",
                                     (device_id, _now(), note))).result()


def unpin(store: Store, device_id: str) -> bool:
    return bool(store.submit(lambda c: c.execute("DELETE FROM rollout_pins WHERE device_id = ?",
                                                 (device_id,)).rowcount).result())


def desired_models(store: Reader) -> dict[str, tuple[str, str]]:
    rows = store.read(lambda c: c.execute("SELECT device_id, source, sha256 FROM rollout_models").fetchall())
    return {d: (src, sha) for d, src, sha in rows}


def desired_settings(store: Reader) -> dict[str, tuple[dict[str, Any], str, int]]:
    """device -> (settings, their hash, the policy version that carried them)."""
    rows = store.read(lambda c: c.execute("SELECT device_id, settings_json, hash, version FROM rollout_settings")
                      .fetchall())
    return {d: (json.loads(body), h, v) for d, body, h, v in rows}


def group_reports(store: Reader, group: str) -> list[DeviceReport]:
    rows = store.read(lambda c: c.execute(
        "SELECT d.device_id, d.state, d.model_report, d.thermal_level, d.policy_version FROM devices d "
        "JOIN device_groups g ON g.device_id = d.device_id WHERE g.grp = ? ORDER BY d.device_id",
        (group,)).fetchall())
    return [DeviceReport.from_row(*r) for r in rows]
