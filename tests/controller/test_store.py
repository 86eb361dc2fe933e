"""The store contract: devices, telemetry, rollups, convergence, rejections, dedupe, births/deaths/staleness."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nanofleet.controller.store import Batch, Store, TelemetryRow
from nanofleet.controller.views import PublishedPolicy
from nanofleet.protos import fleet_pb2

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
def store(tmp_path: Path):
    s = Store(tmp_path / "store.db")
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
    assert len(store.telemetry_keys("d1")) == 10


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
    assert len(store.telemetry_keys("d1")) == 3


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
    store.flush_rollups()
    m = store.rollups("d1", "1m")
    assert [(r.ts_ms, r.n, r.cpu_avg, r.cpu_max, r.ram_available_min) for r in m] == [
        (T0, 2, 0.5, 1.0, 99), (T0 + 60_000, 2, 2.5, 3.0, 97)]
    h = store.rollups("d1", "1h")
    assert len(h) == 1 and h[0].n == 4 and h[0].cpu_avg == 1.5 and h[0].temp_max == 43.0 and h[0].temp_avg == 41.5
    with pytest.raises(Exception, match="resolution"):
        store.rollups("d1", "5m")  # type: ignore[arg-type]


def test_retention_prunes_old_rows(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db", raw_retention_s=60) as s:
        s.apply(Batch("f", T0, telemetry=[TelemetryRow("d1", 0, 0, T0), TelemetryRow("d1", 0, 1, T0 + 120_000)]))
        s.prune(T0 + 150_000)
        assert [k[3] for k in s.telemetry_keys()] == [T0 + 120_000]


def test_convergence_rejections_policies_and_groups(store: Store) -> None:
    store.write_status("f", birth("a", 1, policy=2), T0)
    store.write_status("f", birth("b", 1, policy=2), T0)
    store.write_status("f", birth("c", 1, policy=3), T0)
    assert store.policy_convergence() == {2: 2, 3: 1}
    store.record_rejection("a", "t/a", "invalid json", T0)
    store.record_rejection("a", "t/a", "invalid json", T0 + 5)
    store.record_rejection(None, "junk", "not a nanofleet topic", T0 + 1)
    rej = {(r.device_id, r.reason): r for r in store.rejections()}
    assert rej[("a", "invalid json")].count == 2 and rej[("a", "invalid json")].last_ms == T0 + 5
    assert rej[(None, "not a nanofleet topic")].count == 1
    assert store.get_device("a").rejected_count == 2
    assert store.next_policy_version() == 1 and store.next_policy_version() == 2
    store.record_policies([PublishedPolicy("a", 2, "h", "{}", T0)])
    assert store.published_policies()["a"].version == 2
    store.set_groups({"a": "kiosks"})
    assert store.get_device("a").group == "kiosks" and store.get_device("b").group is None


def test_reopen_keeps_state_and_policy_counter(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db") as s:
        s.write_status("f", birth("d1", 4), T0)
        s.next_policy_version()
    with Store(tmp_path / "s.db") as s:
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
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        store.write_telemetry("f", [tel("d1", 1, i, T0 + i)], T0 + i)
    for t in threads:
        t.join()
    assert not errors and len(store.telemetry_keys()) == 20


def _open_store(path: str, results) -> None:  # runs in a child process
    from nanofleet.controller.store import Store

    try:
        Store(path).close()
        results.put("ok")
    except Exception as exc:  # reported to the parent, which asserts on it
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
        plan = " ".join(r[3] for r in s._reader().execute(
            "EXPLAIN QUERY PLAN DELETE FROM telemetry WHERE ts_ms < ?", (at - 60_000,)))
        assert "telemetry_ts" in plan, plan
        assert s._call(lambda c: s._prune(c, at)) is True and s.telemetry_count() == 151  # one chunk, more left
        s.prune(at)
        assert [k[3] for k in s.telemetry_keys()] == [T0 + 500_000]
        # more rows than a chunk at one timestamp: deleted together rather than never
        s.apply(Batch("f", T0, telemetry=[TelemetryRow(f"e{i}", 0, 0, T0 + 100) for i in range(150)]))
        s.prune(at)
        assert s.telemetry_count() == 1
