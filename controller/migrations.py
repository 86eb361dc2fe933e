"""Named, ordered schema migrations of the controller store, run by nanofleet.sqlite_db.migrate (each once, in its
own transaction, recorded in `_migrations`). A step is given the write connection as a sqlite_utils.Database.

Append new steps at the end; never edit a step that has shipped.
"""

from __future__ import annotations

import sqlite_utils

from nanofleet.sqlite_db import Migration


def _m001_initial(db: sqlite_utils.Database) -> None:
    _run_script(
        db,
        """
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            fleet TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'online',
            last_seen_ms INTEGER NOT NULL DEFAULT 0,
            birth_ms INTEGER NOT NULL DEFAULT 0,
            bd_seq INTEGER NOT NULL DEFAULT 0,
            agent_version TEXT NOT NULL DEFAULT '',
            model_name TEXT NOT NULL DEFAULT '',
            model_availability TEXT NOT NULL DEFAULT 'unspecified',
            policy_version INTEGER NOT NULL DEFAULT 0,
            cpu_percent REAL NOT NULL DEFAULT 0,
            ram_total_mb INTEGER NOT NULL DEFAULT 0,
            ram_available_mb INTEGER NOT NULL DEFAULT 0,
            temp_max_c REAL,
            thermal_level INTEGER NOT NULL DEFAULT 0,
            throttled INTEGER NOT NULL DEFAULT 0,
            battery_pct REAL,
            charging INTEGER,
            queue_depth INTEGER NOT NULL DEFAULT 0,
            route_counts TEXT NOT NULL DEFAULT '{}',
            rejected_count INTEGER NOT NULL DEFAULT 0,
            gap_count INTEGER NOT NULL DEFAULT 0,
            telemetry_interval_s REAL NOT NULL DEFAULT 10,
            status_json TEXT NOT NULL DEFAULT '{}'
        );
        CREATE TABLE device_groups (device_id TEXT PRIMARY KEY, grp TEXT);
        CREATE TABLE telemetry (
            device_id TEXT NOT NULL,
            ts_ms INTEGER NOT NULL,
            bd_seq INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            received_ms INTEGER NOT NULL,
            cpu_percent REAL NOT NULL,
            load1 REAL NOT NULL,
            ram_available_mb INTEGER NOT NULL,
            temp_max_c REAL,
            thermal_level INTEGER NOT NULL,
            throttle_ratio REAL NOT NULL,
            queue_depth INTEGER NOT NULL,
            battery_pct REAL,
            replayed INTEGER NOT NULL,
            PRIMARY KEY (device_id, ts_ms, bd_seq, seq)
        ) WITHOUT ROWID;
        CREATE TABLE rollup_1m (
            device_id TEXT NOT NULL, ts_ms INTEGER NOT NULL, n INTEGER NOT NULL,
            cpu_avg REAL NOT NULL, cpu_max REAL NOT NULL, temp_avg REAL, temp_max REAL,
            ram_available_min INTEGER NOT NULL,
            PRIMARY KEY (device_id, ts_ms)
        ) WITHOUT ROWID;
        CREATE TABLE rollup_1h (
            device_id TEXT NOT NULL, ts_ms INTEGER NOT NULL, n INTEGER NOT NULL,
            cpu_avg REAL NOT NULL, cpu_max REAL NOT NULL, temp_avg REAL, temp_max REAL,
            ram_available_min INTEGER NOT NULL,
            PRIMARY KEY (device_id, ts_ms)
        ) WITHOUT ROWID;
        CREATE TABLE rejections (
            device_id TEXT NOT NULL,   -- '' when the topic named no device
            topic TEXT NOT NULL,
            reason TEXT NOT NULL,
            count INTEGER NOT NULL,
            last_ms INTEGER NOT NULL,
            PRIMARY KEY (device_id, topic, reason)
        );
        CREATE TABLE device_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL, ts_ms INTEGER NOT NULL, state TEXT NOT NULL,
            reason TEXT NOT NULL, bd_seq INTEGER NOT NULL
        );
        CREATE INDEX device_events_device ON device_events (device_id, id);
        CREATE TABLE policies (
            device_id TEXT PRIMARY KEY,
            version INTEGER NOT NULL,
            content_hash TEXT NOT NULL,
            policy_json TEXT NOT NULL,
            published_ms INTEGER NOT NULL
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE command_results (
            id TEXT NOT NULL, device_id TEXT NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL,
            data_json TEXT NOT NULL, ts_ms INTEGER NOT NULL, PRIMARY KEY (id, status)
        );
        """
    )


def _run_script(db: sqlite_utils.Database, script: str) -> None:
    # executescript() would COMMIT the surrounding migration transaction, so statements run one by one.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _m002_telemetry_ts_index(db: sqlite_utils.Database) -> None:
    # Retention deletes by time: without this index every prune scans the whole device-major table (tens of millions
    # of rows for a thousand devices over the default week), holding the writer and so ingest for the whole scan.
    # Inserts append to it (time moves forward): ~one more page per batch.
    db.execute("CREATE INDEX telemetry_ts ON telemetry (ts_ms)")


def _m003_queue_telemetry(db: sqlite_utils.Database) -> None:
    # Telemetry now tells the offline queue (queue_depth: its entries not finished) from the requests waiting for a
    # local model slot (slots_waiting), with the oldest entry's age and the queue's counters since the agent started.
    # Before this, agents reported slot waiters as queue_depth: older rows keep that meaning, with slots_waiting 0.
    # ADD COLUMN with a constant default rewrites nothing (also on the WITHOUT ROWID telemetry table).
    _run_script(
        db,
        """
        ALTER TABLE devices ADD COLUMN slots_waiting INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN queue_oldest_age_s REAL NOT NULL DEFAULT 0;
        ALTER TABLE devices ADD COLUMN queue_counters TEXT NOT NULL DEFAULT '{}';
        ALTER TABLE telemetry ADD COLUMN slots_waiting INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE telemetry ADD COLUMN queue_oldest_age_s REAL NOT NULL DEFAULT 0
        """,
    )


def _m004_alerts(db: sqlite_utils.Database) -> None:
    # One row per alert; its history is its timestamps (raised_ms, acked_ms, cleared_ms): each transition happens at
    # most once and a condition that returns is a new row, so an events table would repeat the row. The partial
    # unique index makes "one open alert per (device, kind)" the file's rule, not only the engine's.
    _run_script(
        db,
        """
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device_id TEXT NOT NULL,            -- '' for a fleet-wide alert
            kind TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('raised', 'acknowledged', 'cleared')),
            detail TEXT NOT NULL,
            value REAL NOT NULL,
            threshold REAL NOT NULL,
            raised_ms INTEGER NOT NULL,
            acked_ms INTEGER,
            acked_by TEXT,
            ack_note TEXT,
            cleared_ms INTEGER
        );
        CREATE UNIQUE INDEX alerts_open ON alerts (device_id, kind) WHERE state != 'cleared';
        CREATE INDEX alerts_device ON alerts (device_id, id);
        CREATE INDEX alerts_state ON alerts (state, id)
        """,
    )


def _m005_audit(db: sqlite_utils.Database) -> None:
    # Append-only: the triggers refuse UPDATE and DELETE whoever writes (the controller, a CLI, sqlite3 by hand).
    _run_script(
        db,
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts_ms INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            source TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_ts ON audit (ts_ms);
        CREATE INDEX audit_actor ON audit (actor, id);
        CREATE INDEX audit_action ON audit (action, id)
        """,
    )
    for op in ("UPDATE", "DELETE"):  # a trigger body holds ';': not through _run_script's split
        db.execute(f"CREATE TRIGGER audit_no_{op.lower()} BEFORE {op} ON audit "
                   "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END")


def _m006_device_queries(db: sqlite_utils.Database) -> None:
    # The dashboard's device list pages by keyset over (sort key, device_id) (controller/queries.py): the default
    # sort walks the primary key and skips the rows a filter refuses, stopping after a page, so filters on state or
    # thermal level need no index of their own (the two cost ~20 % of the store's telemetry throughput: every batch
    # rewrites its devices' rows, each index paid on each rewrite). device_groups changes only when a device first
    # appears; command_results_device serves the device page's recent command results.
    # devices_temp serves the "hottest devices" and the list sorted by temperature (the expression is the sort key
    # queries.SORTS["temp"], spelled the same), walked in order so a filtered page stops after its rows instead of
    # sorting every match.
    # route_snapshots keeps each device's cumulative route counters every few minutes for a little over an hour, so
    # the overview can tell the last hour's route mix from counters that only ever grow (store.py housekeeping).
    # policy_rounds keeps what each publishing round changed, for the groups page's "last policy apply" diff.
    _run_script(
        db,
        """
        CREATE INDEX device_groups_grp ON device_groups (grp, device_id);
        CREATE INDEX command_results_device ON command_results (device_id, ts_ms);
        CREATE INDEX devices_temp ON devices (coalesce(temp_max_c, -1.0e9), device_id);
        CREATE TABLE route_snapshots (
            ts_ms INTEGER NOT NULL, device_id TEXT NOT NULL, birth_ms INTEGER NOT NULL,
            local INTEGER NOT NULL, cloud INTEGER NOT NULL, queued INTEGER NOT NULL, rejected INTEGER NOT NULL,
            PRIMARY KEY (ts_ms, device_id)
        ) WITHOUT ROWID;
        CREATE TABLE policy_rounds (
            version INTEGER PRIMARY KEY, published_ms INTEGER NOT NULL, devices INTEGER NOT NULL,
            changes_json TEXT NOT NULL
        )
        """,
    )


def _m007_rollouts(db: sqlite_utils.Database) -> None:
    # Rollouts (controller/rollouts.py): one row per rollout with its state machine's state, the pinned devices it
    # leaves alone, and an append-only event list for `rollout status` and the dashboard. `model_report` is each
    # device's last ModelState rollout figures (sha256, update outcome, requests/errors/p95/tokens per s) as JSON,
    # written with the hot telemetry columns. `rollout_models` is the model a rollout wants on a device instead of
    # fleet.yaml's: every policy compilation (the engine's, `policy apply`, a new device's) takes it from there.
    _run_script(
        db,
        """
        ALTER TABLE devices ADD COLUMN model_report TEXT NOT NULL DEFAULT '{}';
        CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            grp TEXT NOT NULL,
            state_json TEXT NOT NULL,
            active INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
        );
        CREATE INDEX rollouts_active ON rollouts (active, grp);
        CREATE TABLE rollout_pins (device_id TEXT PRIMARY KEY, pinned_ms INTEGER NOT NULL, note TEXT NOT NULL);
        CREATE TABLE rollout_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, rollout_id INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
            kind TEXT NOT NULL, detail TEXT NOT NULL
        );
        CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
        CREATE TABLE rollout_models (
            device_id TEXT PRIMARY KEY, rollout_id INTEGER NOT NULL, source TEXT NOT NULL, sha256 TEXT NOT NULL
        )
        """,
    )


def _m008_rollout_settings(db: sqlite_utils.Database) -> None:
    # Settings rollouts (`rollout start --settings FILE`): the partial profile a rollout wants on a device on top of
    # fleet.yaml's, and the policy version that first carried it there (the device has it once it reports that
    # version or a later one). Every policy compilation takes it, as rollout_models.
    db.execute("""CREATE TABLE rollout_settings (
        device_id TEXT PRIMARY KEY, rollout_id INTEGER NOT NULL, settings_json TEXT NOT NULL, hash TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 0)""")
def _m009_revocations(db: sqlite_utils.Database) -> None:
    # Revoked devices (`nanofleet revoke`): the table is the truth the ingest checks (a revoked device's later
    # messages are rejected and counted); `nanofleet enroll` of the device again deletes its row.
    db.execute("CREATE TABLE revoked_devices (device_id TEXT PRIMARY KEY, revoked_ms INTEGER NOT NULL, "
               "actor TEXT NOT NULL) WITHOUT ROWID")


def _m010_telemetry_tokens_per_s(db: sqlite_utils.Database) -> None:
    # The agent's recent local generation speed (Telemetry.model.tokens_per_s), NULL when it measured none (it
    # reports 0 then) or the row predates this step; the rollups average it over the measured samples only, so the
    # device page charts it on every window. ADD COLUMN without a default rewrites nothing.
    _run_script(
        db,
        """
        ALTER TABLE telemetry ADD COLUMN tokens_per_s REAL;
        ALTER TABLE rollup_1m ADD COLUMN tokens_per_s_avg REAL;
        ALTER TABLE rollup_1m ADD COLUMN tokens_per_s_n INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE rollup_1h ADD COLUMN tokens_per_s_avg REAL;
        ALTER TABLE rollup_1h ADD COLUMN tokens_per_s_n INTEGER NOT NULL DEFAULT 0
        """,
    )


def _m011_gap_judgment(db: sqlite_utils.Database) -> None:
    # Gaps judged from stored rows by the leader of several controllers (controller/gaps.py): how far rows were
    # judged (by received_ms, hence the index: a round reads only the rows received since the last one) and each
    # session's last judged seq, so a new leader continues where the old one stopped.
    _run_script(
        db,
        """
        CREATE INDEX telemetry_received ON telemetry (received_ms);
        CREATE TABLE gap_watermark (name TEXT PRIMARY KEY, received_ms INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE gap_cursors (device_id TEXT NOT NULL, bd_seq INTEGER NOT NULL, seq INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (device_id, bd_seq)) WITHOUT ROWID
        """,
    )


MIGRATIONS: list[Migration] = [
    ("001_initial", _m001_initial),
    ("002_telemetry_ts_index", _m002_telemetry_ts_index),
    ("003_queue_telemetry", _m003_queue_telemetry),
    ("004_alerts", _m004_alerts),
    ("005_audit", _m005_audit),
    ("006_device_queries", _m006_device_queries),
    ("007_rollouts", _m007_rollouts),
    ("008_rollout_settings", _m008_rollout_settings),
    ("009_revocations", _m009_revocations),
    ("010_telemetry_tokens_per_s", _m010_telemetry_tokens_per_s),
    ("011_gap_judgment", _m011_gap_judgment),
]

