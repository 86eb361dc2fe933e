"""The store contract: devices, telemetry, rollups, convergence, rejections, dedupe, births/deaths/staleness."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ctl_helpers import flush_rollups, prune, reject, telemetry_count, telemetry_keys

from nanofleet.controller.pg_migrations import PG_MIGRATIONS
from nanofleet.controller.store import Batch, Store, TelemetryRow
from nanofleet.controller.views import PublishedPolicy
from nanofleet.protos import fleet_pb2
from tests.conftest import wait_for

T0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000  # an hour boundary


def birth(device: str, bd_seq: int, *, interval: int = 10, policy: int = 0) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(
        fleet="f", device_id=device, online=True, bd_seq=bd_seq, ts_ms=T0, agent_version="0.1.0",
        model=fleet_pb2.ModelState(name="tiny", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
        hardware=fleet_pb2.Hardware(ram_total_mb=4096), policy_version=policy, telemetry_interval_s=interval,
    )


def death(device: str, bd_seq: int, reason: str = "last_will") -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="f", device_id=device, online=False, bd_seq=bd_seq, reason=reason)


def tel(device: str, bd_seq: int, seq: int, ts: int, **kw: object) -> fleet_pb2.Telemetry:
    t = fleet_pb2.Telemetry(device_id=device, bd_seq=bd_seq, seq=seq, ts_ms=ts, cpu_percent=10.0 + seq,
                            ram_total_mb=4096, ram_available_mb=2000 - seq, temp_max_c=50.0 + seq,
                            temperatures_c={"cpu": 50.0 + seq}, thermal_level=1, throttle_ratio=0.9, **kw)
    return t


@pytest.fixture
def store(store_url: str):
    s = Store(store_url)
    yield s
    s.close()


def test_birth_telemetry_death_shape_the_device_view(store: Store) -> None:
    store.write_status("f", birth("d1", 3, policy=7), T0)
    d = store.get_device("d1")
    assert d is not None and d.state == "online" and d.bd_seq == 3 and d.model_availability == "available"
    assert d.ram_total_mb == 4096 and d.policy_version == 7 and d.agent_version == "0.1.0"
    store.write_telemetry("f", [tel("d1", 3, i, T0 + i * 1000, battery=fleet_pb2.Battery(present=True, percent=55,
                                                                                       charging=True),
                                    route_counts={"local": 4}) for i in range(3)], T0 + 3000)
    d = store.get_device("d1")
    assert d.cpu_percent == 12.0 and d.temp_max_c == 52.0 and d.thermal_level == "light"
    assert d.battery_pct == 55 and d.charging is True and d.route_counts == {"local": 4}
    assert d.last_seen_ms == T0 + 3000 and d.gap_count == 0
    pts = store.telemetry("d1")
    assert [p.ts_ms for p in pts] == [T0, T0 + 1000, T0 + 2000]
    assert store.telemetry("d1", since_ms=T0 + 1000, limit=1)[0].ts_ms == T0 + 2000
    store.write_status("f", death("d1", 3), T0 + 4000)
    assert store.get_device("d1").state == "offline"
    assert [(e.state, e.reason) for e in store.device_events("d1")] == [("online", "birth"), ("offline", "last_will")]


def test_stale_death_of_an_older_session_is_ignored(store: Store) -> None:
    store.write_status("f", birth("d1", 5), T0)
    store.write_status("f", death("d1", 4), T0 + 1)
    assert store.get_device("d1").state == "online"
    store.write_status("f", death("d1", 5, "shutdown"), T0 + 2)
    assert store.get_device("d1").state == "offline"
    assert store.device_events("d1")[-1].reason == "shutdown"


def test_duplicates_are_stored_once(store: Store) -> None:
    store.write_status("f", birth("d1", 1), T0)
    items = [tel("d1", 1, i, T0 + i) for i in range(10)]
    store.write_telemetry("f", items, T0)
    out = store.apply(Batch("f", T0, telemetry=[TelemetryRow("d1", 1, i, T0 + i, replayed=True) for i in range(10)]))
    assert out.inserted == 0 and out.duplicates == 10
    assert len(telemetry_keys(store, "d1")) == 10


def test_seq_gap_and_stale_birth_ask_for_rebirth(store: Store) -> None:
    store.write_status("f", birth("d1", 1), T0)
    out = store.apply(Batch("f", T0, telemetry=[TelemetryRow("d1", 1, s, T0 + s) for s in (0, 1, 2, 5)]))
    assert out.gaps == 1 and out.rebirth == ["d1"]
    assert store.get_device("d1").gap_count == 1
    # wrap-around 255 -> 0 is not a gap
    out = store.apply(Batch("f", T0 + 20_000, telemetry=[TelemetryRow("d1", 1, s, T0 + 100 + s) for s in
                                                        (*range(6, 256), 0, 1)]))
    assert out.gaps == 0 and out.rebirth == []
    out = store.apply(Batch("f", T0 + 40_000, telemetry=[TelemetryRow("d1", 2, 0, T0 + 99_000)]))
    assert out.rebirth == ["d1"]  # telemetry of a birth the controller never saw
    out = store.apply(Batch("f", T0 + 41_000, telemetry=[TelemetryRow("new", 0, 0, T0)]))
    assert out.rebirth == ["new"] and out.new_devices == ["new"]


def test_replayed_telemetry_does_not_move_latest_state(store: Store) -> None:
    store.write_status("f", birth("d1", 2), T0)
    store.write_telemetry("f", [tel("d1", 1, 3, T0 - 60_000, replayed=True)], T0 + 9_000)
    d = store.get_device("d1")
    assert d.cpu_percent == 13.0 and d.last_seen_ms == T0  # values: the newest known; last seen: unchanged
    store.write_telemetry("f", [tel("d1", 2, 0, T0 + 10_000)], T0 + 10_000)
    store.write_telemetry("f", [tel("d1", 1, 9, T0 - 50_000, replayed=True)], T0 + 11_000)
    d = store.get_device("d1")
    assert d.cpu_percent == 10.0 and d.gap_count == 0 and d.last_seen_ms == T0 + 10_000
    assert len(telemetry_keys(store, "d1")) == 3


def test_stale_after_interval_then_online_on_telemetry(store: Store) -> None:
    store.write_status("f", birth("d1", 1, interval=2), T0)
    store.write_status("f", birth("d2", 1, interval=100), T0)
    assert store.sweep_stale(T0 + 4_000) == []
    events = store.sweep_stale(T0 + 5_001)
    assert [(e.device_id, e.state) for e in events] == [("d1", "stale")]
    assert store.get_device("d1").state == "stale" and store.get_device("d2").state == "online"
    store.write_telemetry("f", [tel("d1", 1, 0, T0 + 6000)], T0 + 6000)
    assert store.get_device("d1").state == "online"


def test_rollups_1m_and_1h(store: Store) -> None:
    store.write_status("f", birth("d1", 1), T0)
    rows = [TelemetryRow("d1", 1, i % 256, T0 + i * 30_000, cpu_percent=float(i), ram_available_mb=100 - i,
                         temp_max_c=40.0 + i) for i in range(4)]  # minutes 0,0,1,1
    store.apply(Batch("f", T0, telemetry=rows))
    flush_rollups(store)
    m = store.rollups("d1", "1m")
    assert [(r.ts_ms, r.n, r.cpu_avg, r.cpu_max, r.ram_available_min) for r in m] == [
        (T0, 2, 0.5, 1.0, 99), (T0 + 60_000, 2, 2.5, 3.0, 97)]
    h = store.rollups("d1", "1h")
    assert len(h) == 1 and h[0].n == 4 and h[0].cpu_avg == 1.5 and h[0].temp_max == 43.0 and h[0].temp_avg == 41.5
    with pytest.raises(Exception, match="resolution"):
        store.rollups("d1", "5m")  # type: ignore[arg-type]


def test_retention_prunes_old_rows_in_the_writers_housekeeping(store_url: str) -> None:
    """Nobody calls prune: the writer's housekeeping applies retention on its own, by the store's clock (SQLite
    deletes the rows, PostgreSQL drops the day they were in: a day apart here, so both keep the same)."""
    day = 86_400_000
    with Store(store_url, raw_retention_s=86_400, prune_every_s=0.1, clock=lambda: T0 + 2 * day + 3_600_000) as s:
        s.apply(Batch("f", T0 + 2 * day, telemetry=[TelemetryRow("d1", 0, 0, T0),
                                                     TelemetryRow("d1", 0, 1, T0 + 2 * day)]))
        wait_for(lambda: [k[3] for k in telemetry_keys(s)] == [T0 + 2 * day], timeout=10, what="old row pruned")


def test_rollups_are_made_by_the_writers_housekeeping(store_url: str) -> None:
    with Store(store_url, rollup_every_s=0.1) as s:
        s.apply(Batch("f", T0, telemetry=[TelemetryRow("d1", 0, i, T0 + i * 1000, cpu_percent=10.0 * i)
                                          for i in range(3)]))
        wait_for(lambda: [(r.n, r.cpu_max) for r in s.rollups("d1", "1m")] == [(3, 20.0)], timeout=10,
                 what="1m rollup")


def test_convergence_rejections_policies_and_groups(store: Store) -> None:
    store.write_status("f", birth("a", 1, policy=2), T0)
    store.write_status("f", birth("b", 1, policy=2), T0)
    store.write_status("f", birth("c", 1, policy=3), T0)
    assert store.policy_convergence() == {2: 2, 3: 1}
    reject(store, "a", "t/a", "invalid json", T0)
    reject(store, "a", "t/a", "invalid json", T0 + 5)
    reject(store, None, "junk", "not a nanofleet topic", T0 + 1)
    rej = {(r.device_id, r.reason): r for r in store.rejections()}
    assert rej[("a", "invalid json")].count == 2 and rej[("a", "invalid json")].last_ms == T0 + 5
    assert rej[(None, "not a nanofleet topic")].count == 1
    assert store.get_device("a").rejected_count == 2
    assert store.next_policy_version() == 1 and store.next_policy_version() == 2
    store.record_policies([PublishedPolicy("a", 2, "h", "{}", T0)])
    assert store.published_policies()["a"].version == 2
    store.set_groups({"a": "kiosks"})
    assert store.get_device("a").group == "kiosks" and store.get_device("b").group is None


def test_reopen_keeps_state_and_policy_counter(store_url: str) -> None:
    with Store(store_url) as s:
        s.write_status("f", birth("d1", 4), T0)
        s.next_policy_version()
    with Store(store_url) as s:
        assert s.get_device("d1").bd_seq == 4 and s.next_policy_version() == 2
        s.write_status("f", death("d1", 3), T0)  # older session's will: still ignored after a restart
        assert s.get_device("d1").state == "online"


def test_readers_from_many_threads_while_writing(store: Store) -> None:
    store.write_status("f", birth("d1", 1), T0)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(50):
                store.list_devices()
                store.telemetry("d1")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        store.write_telemetry("f", [tel("d1", 1, i, T0 + i)], T0 + i)
    for t in threads:
        t.join()
    assert not errors and len(telemetry_keys(store)) == 20


def _open_store(path: str, results) -> None:  # runs in a child process
    from nanofleet.controller.store import Store

    try:
        Store(path).close()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
        results.put(repr(exc))


def test_several_controllers_can_open_a_new_store_at_once(tmp_path: Path) -> None:
    """Two controllers ($share) starting together race on WAL mode and migrations; both must come up."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for attempt in range(2):
        results = ctx.Queue()
        procs = [ctx.Process(target=_open_store, args=(str(tmp_path / f"s{attempt}.db"), results)) for _ in range(3)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(10)
        assert outcomes == ["ok"] * 3, outcomes


def test_several_controllers_can_open_a_new_postgresql_store_at_once(pg_server) -> None:  # type: ignore[no-untyped-def]
    """On PostgreSQL the migrations take turns on an advisory lock: every controller comes up, each step runs once
    (threads suffice here: each Store has its own connections, the race is the server's; a few new databases, as
    a lost race is a matter of timing)."""
    import queue

    for _ in range(5):
        url = pg_server.create_database()
        results: queue.Queue[str] = queue.Queue()
        threads = [threading.Thread(target=_open_store, args=(url, results)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results.get_nowait() for _ in threads] == ["ok"] * 4
        with Store(url) as s:
            assert s.read(lambda c: c.execute("SELECT count(*) FROM _migrations").fetchone()[0]) == len(PG_MIGRATIONS)


def test_a_device_row_lost_to_a_rolled_back_batch_is_written_whole_again(tmp_path: Path) -> None:
    """Telemetry updates only a device's hot columns; when its row is missing the UPDATE says so and it is healed."""
    import sqlite3

    with Store(tmp_path / "heal.db") as store:
        store.write_status("f", birth("d1", 3), T0)
        store.write_telemetry("f", [tel("d1", 3, 0, T0 + 1000)], T0 + 1000)
        with sqlite3.connect(store.path) as conn:  # what a failed transaction leaves behind: memory has d1, disk not
            conn.execute("DELETE FROM devices WHERE device_id = 'd1'")
        assert store.get_device("d1") is None
        store.write_telemetry("f", [tel("d1", 3, 1, T0 + 2000)], T0 + 2000)
        d = store.get_device("d1")
        assert d is not None and d.state == "online" and d.agent_version == "0.1.0" and d.cpu_percent == 11.0


def test_the_checkpoint_thread_copies_commits_into_the_database_file(tmp_path: Path) -> None:
    """The writer never checkpoints (wal_autocheckpoint=0); the checkpoint thread must, or the WAL grows forever."""
    import sqlite3

    from tests.conftest import wait_for

    with Store(tmp_path / "ckpt.db") as store:
        store.write_telemetry("f", [tel(f"d{i}", 1, 0, T0 + i) for i in range(200)], T0 + 1000)
        assert (tmp_path / "ckpt.db-wal").stat().st_size > 0

        def in_main_file() -> int:  # immutable=1 reads the database file alone, ignoring the WAL
            with sqlite3.connect(f"file:{tmp_path / 'ckpt.db'}?immutable=1", uri=True) as conn:
                try:
                    return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
                except sqlite3.DatabaseError:
                    return 0
        wait_for(lambda: in_main_file() == 200, timeout=10, what="checkpointed telemetry in the database file")


def test_retention_deletes_by_the_time_index_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune never scans the device-major table (telemetry_ts index) and deletes at most a chunk per transaction,
    so the writer (and ingest behind it) is never held for long; `prune()` goes on until all is done."""
    from nanofleet.controller import store as store_mod

    monkeypatch.setattr(store_mod, "_PRUNE_CHUNK", 100)
    with Store(tmp_path / "p.db", raw_retention_s=60) as s:
        rows = [TelemetryRow(f"d{i % 7}", 0, i % 256, T0 + i) for i in range(250)]
        s.apply(Batch("f", T0, telemetry=[*rows, TelemetryRow("d1", 0, 0, T0 + 500_000)]))
        at = T0 + 60_000 + 250  # everything but the last row is past retention
        plan = " ".join(r[3] for r in s.read(lambda c: c.execute(
            "EXPLAIN QUERY PLAN DELETE FROM telemetry WHERE ts_ms < ?", (at - 60_000,)).fetchall()))
        assert "telemetry_ts" in plan, plan
        assert s.submit(lambda c: s._prune(c, at)).result() is True and telemetry_count(s) == 151  # 1 chunk
        prune(s, at)
        assert [k[3] for k in telemetry_keys(s)] == [T0 + 500_000]
        # more rows than a chunk at one timestamp: deleted together rather than never
        s.apply(Batch("f", T0, telemetry=[TelemetryRow(f"e{i}", 0, 0, T0 + 100) for i in range(150)]))
        prune(s, at)
        assert telemetry_count(s) == 1


def _fill(store: Store, pages: int | None) -> None:
    """Cap the writer's file at its current size plus `pages` (None: lift the cap): a real 'disk full'."""
    def run(c):  # type: ignore[no-untyped-def]
        size = c.execute("PRAGMA page_count").fetchone()[0]
        c.execute(f"PRAGMA max_page_count = {size + pages if pages is not None else 2**30}")
    store.submit(run).result()


def test_a_rolled_back_batch_leaves_no_trace_in_the_device_state(tmp_path: Path) -> None:
    """Disk full: the batch fails whole; retried once there is room, it is judged on what is stored — its new
    device is new again and its birth is recorded — not on what the failed attempt left in memory."""
    import sqlite3

    with Store(tmp_path / "full.db") as store:
        store.write_status("f", birth("d1", 1), T0)
        batch = Batch("f", T0 + 1000, statuses=[birth("d2", 1)],
                      telemetry=[TelemetryRow(f"x{i}", 1, 0, T0 + i) for i in range(3000)])
        _fill(store, 2)
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.apply(batch)
        assert store.get_device("d2") is None and store.reloads >= 1
        _fill(store, None)
        out = store.apply(batch)
        assert "d2" in out.new_devices and ("d2", "birth") in [(e.device_id, e.reason) for e in out.events]
        assert store.get_device("d2").state == "online" and telemetry_count(store) == 3000


def test_a_store_file_of_the_previous_format_opens_and_is_migrated(tmp_path: Path) -> None:
    """A store written by the controller's own runner before the shared one (same `_migrations` table, only
    001 applied, made with the umask's mode): it opens, keeps its rows, gets 002, and is 0600 afterwards."""
    import os
    import sqlite3
    import stat

    import sqlite_utils

    from nanofleet.controller import migrations

    path = tmp_path / "old.db"
    old = os.umask(0o022)
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_ms INTEGER NOT NULL)")
            migrations._m001_initial(sqlite_utils.Database(conn))
            conn.execute("INSERT INTO _migrations VALUES ('001_initial', CAST(strftime('%s','now') AS INTEGER) * 1000)")
            conn.execute("INSERT INTO devices (device_id, fleet, bd_seq) VALUES ('old-1', 'f', 7)")
    finally:
        os.umask(old)
    with Store(path) as store:
        later = [name for name, _step in migrations.MIGRATIONS[1:]]  # every step after 001, each once, in order
        assert later[:2] == ["002_telemetry_ts_index", "003_queue_telemetry"]
        assert later[-2:] == ["010_telemetry_tokens_per_s", "011_gap_judgment"]
        assert store.db.applied == later
        old_1 = store.get_device("old-1")
        assert old_1.bd_seq == 7 and old_1.slots_waiting == 0 and old_1.queue_counters == {}
        names = store.read(lambda c: [r[0] for r in c.execute("SELECT name FROM _migrations ORDER BY name")])
        assert names == sorted(["001_initial", *later])
        store.write_status("f", birth("old-1", 8), T0)
        assert store.get_device("old-1").state == "online"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_new_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        with Store(tmp_path / "ctl" / "controller.db") as store:
            store.write_status("f", birth("d1", 1), T0)
    finally:
        os.umask(old)
    for suffix in ("", "-wal", "-shm"):
        p = tmp_path / "ctl" / f"controller.db{suffix}"
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, suffix


def test_the_offline_queue_and_slot_waiting_are_stored_apart(store_url: str) -> None:
    """queue_depth is the offline queue; slots_waiting (requests waiting for a local model slot) has its own column,
    with the oldest entry's age and the queue's counters, on the device (latest) and per telemetry row."""
    from nanofleet.controller.decode import decode_telemetry
    from nanofleet.controller.store import Batch

    with Store(store_url) as store:
        store.write_status("f", birth("d1", 1), T0)
        store.write_telemetry("f", [tel("d1", 1, 0, T0, queue_depth=12, slots_waiting=3, queue_oldest_age_s=42.5,
                                        queue_counters={"enqueued": 20, "drained_local": 5, "expired": 3})], T0)
        d = store.get_device("d1")
        assert (d.queue_depth, d.slots_waiting, d.queue_oldest_age_s) == (12, 3, 42.5)
        assert d.queue_counters == {"enqueued": 20, "drained_local": 5, "expired": 3}
        # the JSON the agent publishes, through ingest's fast decode path (uint64 counters as strings)
        payload = (b'{"deviceId": "d1", "bdSeq": "1", "seq": 1, "tsMs": "%d", "slotsWaiting": 1, '
                   b'"queueCounters": {"enqueued": "21", "drained_cloud": "8"}}' % (T0 + 1000))
        store.apply(Batch("f", T0 + 1000, telemetry=[decode_telemetry(payload, "d1")]))
        d = store.get_device("d1")
        assert (d.queue_depth, d.slots_waiting, d.queue_oldest_age_s) == (0, 1, 0.0)
        assert d.queue_counters == {"enqueued": 21, "drained_cloud": 8}
        points = store.telemetry("d1")
        assert [(p.queue_depth, p.slots_waiting, p.queue_oldest_age_s) for p in points] == [(12, 3, 42.5), (0, 1, 0)]
    with Store(store_url) as store:  # the hot-column UPDATE wrote them to the store, not only the mirror
        d = store.get_device("d1")
        assert (d.queue_depth, d.slots_waiting, d.queue_counters["drained_cloud"]) == (0, 1, 8)


def test_tokens_per_s_is_stored_raw_and_averaged_in_rollups_with_gaps_as_null(store: Store) -> None:
    """model.tokens_per_s per telemetry row (NULL when the agent measured none: it reports 0), and the 1m / 1h
    rollups' average over the measured samples only, so the long windows chart it too."""
    store.write_status("f", birth("d1", 1), T0)
    rates = [10.0, 20.0, 0.0, 0.0, 30.0]  # minutes 0,0,1,1,2: minute 1 measured nothing
    store.write_telemetry("f", [tel("d1", 1, i, T0 + i * 30_000, model=fleet_pb2.ModelState(name="m", tokens_per_s=r))
                                for i, r in enumerate(rates)], T0 + 150_000)
    assert [p.tokens_per_s for p in store.telemetry("d1")] == [10.0, 20.0, None, None, 30.0]
    flush_rollups(store)
    assert [(r.ts_ms, r.tokens_per_s_avg) for r in store.rollups("d1", "1m")] == [
        (T0, 15.0), (T0 + 60_000, None), (T0 + 120_000, 30.0)]
    h = store.rollups("d1", "1h")
    assert len(h) == 1 and h[0].tokens_per_s_avg == 20.0  # (10 + 20 + 30) / 3 measured samples, not / 5
