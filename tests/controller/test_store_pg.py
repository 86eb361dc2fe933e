"""The store on PostgreSQL where it differs from SQLite: telemetry by COPY, day partitions and retention by dropping
them, several controllers (Store objects) writing the same devices, the server going away mid-ingest."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from ctl_helpers import prune, telemetry_count, telemetry_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanofleet.controller.devstate import FUTURE_MS
from nanofleet.controller.ingest import failure_reason
from nanofleet.controller.pg_migrations import PG_MIGRATIONS
from nanofleet.controller.pg_telemetry import DAY_MS
from nanofleet.controller.store import Batch, Store, TelemetryRow
from nanofleet.pg_server import PgServer, bindir
from nanofleet.protos import fleet_pb2

T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY_MS  # a UTC day boundary


def _partitions(store: Store) -> list[str]:
    return store.read(lambda c: [r[0] for r in c.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'telemetry'::regclass ORDER BY 1").fetchall()])


def birth(device: str, bd_seq: int, version: str = "0.1.0") -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="f", device_id=device, online=True, bd_seq=bd_seq, ts_ms=T0,
                                  agent_version=version, telemetry_interval_s=10)


def death(device: str, bd_seq: int) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="f", device_id=device, online=False, bd_seq=bd_seq, reason="last_will")


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    with Store(pg_url) as s:
        yield s


def test_a_new_database_gets_the_whole_schema_once(pg_url: str) -> None:
    with Store(pg_url) as s:
        assert s.db.applied == [name for name, _ in PG_MIGRATIONS]
    with Store(pg_url) as s:
        assert s.db.applied == []


@pytest.mark.parametrize("by_copy", [True, False])
def test_redelivered_telemetry_is_stored_once_and_counted(pg_store: Store, by_copy: bool) -> None:
    pg_store.telemetry_by_copy = by_copy
    rows = [TelemetryRow(f"d{i % 3}", 1, i, T0 + i, cpu_percent=float(i), replayed=i % 2 == 0) for i in range(30)]
    out = pg_store.apply(Batch("f", T0 + 100, telemetry=[*rows, rows[0], rows[5]]))  # two in-batch repeats
    assert (out.inserted, out.duplicates) == (30, 2)
    again = pg_store.apply(Batch("f", T0 + 200, telemetry=[*rows[10:20], TelemetryRow("d9", 1, 0, T0)]))
    assert (again.inserted, again.duplicates) == (1, 10)
    assert telemetry_count(pg_store) == 31
    fresh = pg_store.apply(Batch("f", T0 + 300, telemetry=[TelemetryRow("d1", 1, 99, T0 + 99)]))
    assert (fresh.inserted, fresh.duplicates) == (1, 0)
    if by_copy:  # the two batches with duplicates went the staged way, the fresh one straight in
        assert pg_store._pg.copy_conflicts == 2
    stored = pg_store.telemetry("d1")
    assert [p.cpu_percent for p in stored] == [*(float(i) for i in range(30) if i % 3 == 1), 0.0]


def test_partitions_are_made_per_day_and_retention_drops_whole_days(pg_url: str) -> None:
    now = [T0 + 3 * DAY_MS + 3_600_000]  # day 3, 01:00
    with Store(pg_url, raw_retention_s=86_400, clock=lambda: now[0]) as s:
        s.apply(Batch("f", now[0], telemetry=[TelemetryRow("d1", 1, i, T0 + i * DAY_MS // 2) for i in range(7)]))
        days = [f"telemetry_{d}" for d in ("20231114", "20231115", "20231116", "20231117")]
        assert all(d in _partitions(s) for d in days), _partitions(s)
        prune(s, now[0])  # cutoff: day 2, 01:00 -> days 0 and 1 go whole; day 2 keeps its rows before 01:00 too
        assert [p for p in _partitions(s) if p in days] == days[2:]
        assert [k[3] for k in telemetry_keys(s)] == [T0 + i * DAY_MS // 2 for i in (4, 5, 6)]
        assert s._pg.partitions_dropped == 2
        # a replay older than retention makes its day again; the next prune drops it again
        s.apply(Batch("f", now[0], telemetry=[TelemetryRow("d1", 1, 99, T0 + 10, replayed=True)]))
        assert days[0] in _partitions(s)
        prune(s, now[0])
        assert days[0] not in _partitions(s) and telemetry_count(s) == 3
        # an operator's own partition (not named by day) is left alone, and said so
        s.submit(lambda c: c.execute("CREATE TABLE telemetry_archive PARTITION OF telemetry "
                                     f"FOR VALUES FROM (0) TO ({T0 - 30 * DAY_MS})")).result()
        prune(s, now[0])
        assert "telemetry_archive" in _partitions(s)


def test_the_housekeeping_makes_today_and_tomorrow_ahead(pg_url: str) -> None:
    from tests.conftest import wait_for

    with Store(pg_url, clock=lambda: T0 + 5_000) as s:
        wait_for(lambda: {"telemetry_20231114", "telemetry_20231115"} <= set(_partitions(s)), timeout=10,
                 what="partitions made ahead")


def test_telemetry_from_far_in_the_future_is_refused_and_counted(store_url: str) -> None:
    with Store(store_url) as s:
        out = s.apply(Batch("f", T0, telemetry=[TelemetryRow("d1", 1, 0, T0 + 5),
                                                TelemetryRow("d1", 1, 1, T0 + FUTURE_MS + 1),
                                                TelemetryRow("d1", 1, 2, T0 + 40 * 365 * DAY_MS)]))
        assert (out.inserted, out.future_rejected) == (1, 2)
        assert [(r.device_id, r.reason, r.count) for r in s.rejections()] == [("d1", "ts_in_future", 2)]
        assert s.get_device("d1").rejected_count == 2 and telemetry_count(s) == 1
        if s.target.kind == "postgresql":
            assert _partitions(s)[-1] <= "telemetry_20231116"


def test_a_partition_made_by_a_rolled_back_batch_is_made_again(pg_store: Store) -> None:
    """CREATE TABLE rolls back with the batch that ran it: the store must not go on believing the day exists."""
    day = T0 + 20 * DAY_MS
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):  # after the partition was made: the batch fails
        pg_store.apply(Batch("f", day, telemetry=[TelemetryRow("d1", 1, 2**40, day + 1)]))
    out = pg_store.apply(Batch("f", day, telemetry=[TelemetryRow("d1", 1, 1, day + 1)]))
    assert out.inserted == 1 and telemetry_count(pg_store) == 1


# -- several controllers on one database ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(pg_server: PgServer) -> Iterator[tuple[Store, Store, Store]]:
    """Two stores ("controllers") on one database, and a reference store alone on another."""
    url = pg_server.create_database()
    with Store(url) as a, Store(url) as b, Store(pg_server.create_database()) as ref:
        for s in (a, b, ref):
            s.check_gaps = False  # as under $share
        yield a, b, ref


def _op(kind: str, device: str, bd: int, seq: int) -> Batch:
    at = T0 + seq * 1000
    if kind == "birth":
        return Batch("f", at, statuses=[birth(device, bd, f"v{bd}")])
    if kind == "death":
        return Batch("f", at, statuses=[death(device, bd)])
    return Batch("f", at, telemetry=[TelemetryRow(device, bd, seq % 256, at, cpu_percent=float(seq))])


_OPS = st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["birth", "death", "tel", "tel"]),
                          st.integers(0, 2), st.integers(1, 3)), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_two_controllers_judge_a_device_as_one_would(pair: tuple[Store, Store, Store], ops: list) -> None:
    """$share splits a device's messages between controllers in any order: whichever applies a message, the
    stored state and events are those one controller applying them all would have written."""
    a, b, ref = pair
    tag = uuid.uuid4().hex[:8]
    for i, (who, kind, dev, bd) in enumerate(ops):
        device = f"{tag}-{dev}"
        (a, b)[who].apply(_op(kind, device, bd, i))
        ref.apply(_op(kind, device, bd, i))
    for dev in range(3):
        device = f"{tag}-{dev}"
        got, want = a.get_device(device), ref.get_device(device)
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert (got.state, got.bd_seq, got.agent_version, got.last_seen_ms, got.cpu_percent) == \
                   (want.state, want.bd_seq, want.agent_version, want.last_seen_ms, want.cpu_percent)
        assert [(e.state, e.reason, e.bd_seq) for e in a.device_events(device)] == \
               [(e.state, e.reason, e.bd_seq) for e in ref.device_events(device)]
    # the sweep judges on the stored rows, not on a mirror another controller made stale
    events = b.sweep_stale(T0 + 10_000_000)
    assert {e.device_id for e in events if e.device_id.startswith(tag)} == \
           {e.device_id for e in ref.sweep_stale(T0 + 10_000_000) if e.device_id.startswith(tag)}


def test_two_controllers_writing_the_same_devices_at_once(pg_url: str) -> None:
    """Both store the same new devices concurrently: each device is created once (the loser of the race runs its
    batch again), every row is stored once, and the state is the newest birth."""
    with Store(pg_url) as a, Store(pg_url) as b:
        a.check_gaps = b.check_gaps = False
        errors: list[BaseException] = []

        def run(store: Store, parity: int) -> None:
            try:
                for k in range(parity, 40, 2):
                    devs = [f"c{(k + j) % 20:02d}" for j in range(0, 20, 3)]  # overlapping sets, shifting order
                    store.apply(Batch("f", T0 + k, statuses=[birth(d, 1) for d in devs[:2]],
                                      telemetry=[TelemetryRow(d, 1, k, T0 + k * 10) for d in devs]))
            except BaseException as exc:  # noqa: BLE001 - reported to the test's thread, which asserts on it
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s, p)) for s, p in ((a, 0), (b, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert telemetry_count(a) == 40 * 7
        devices = a.list_devices()
        assert len(devices) == 20 and {d.state for d in devices} == {"online"}
        assert {d.agent_version for d in devices} == {"0.1.0"}
        births = a.read(lambda c: c.execute(
            "SELECT device_id, count(*) FROM device_events WHERE reason = 'telemetry_without_birth' "
            "GROUP BY device_id HAVING count(*) > 1").fetchall())
        assert births == []  # nobody was "new" twice


# -- the server going away ------------------------------------------------------------------------------------------
def _pg_ctl(server: PgServer, *args: str) -> None:
    server._run(str(bindir() / "pg_ctl"), "-D", str(server.data), *args)


def _start_again(server: PgServer) -> None:
    _pg_ctl(server, "-o", f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.root} -c fsync=off",
            "-l", str(server.root / "log"), "-w", "-t", "60", "start")


@pytest.fixture(scope="module")
def own_pg() -> Iterator[PgServer]:
    """A server of this module's own, to stop and start again (the session's serves other tests)."""
    with PgServer() as server:
        yield server


def test_the_server_going_away_fails_batches_to_their_callers_and_the_writer_reconnects(own_pg: PgServer) -> None:
    with Store(own_pg.create_database()) as store:
        store.apply(Batch("f", T0, statuses=[birth("d1", 1)], telemetry=[TelemetryRow("d1", 1, 0, T0 + 1)]))
        _pg_ctl(own_pg, "-m", "fast", "-w", "stop")
        batch = Batch("f", T0 + 10, telemetry=[TelemetryRow("d1", 1, 1, T0 + 10)])
        try:
            with pytest.raises(psycopg.OperationalError) as err:
                store.apply(batch)
            assert failure_reason(err.value).startswith("pg_")
        finally:
            _start_again(own_pg)
        assert store.apply(batch).inserted == 1  # the same batch, again: nothing acknowledged is lost
        assert store.db.reconnects >= 1
        assert [k[2] for k in telemetry_keys(store)] == [0, 1]  # the reader reconnected too
        assert store.get_device("d1").state == "online"


async def test_ingest_rides_out_a_server_restart_without_losing_a_message(own_pg: PgServer, broker) -> None:
    """Mid-ingest the server stops (fast: every connection is cut) and comes back: the failed batches are retried
    with backoff and stored once, none is dropped."""
    import asyncio

    from ctl_helpers import until

    from nanofleet.controller.ingest import Ingest
    from nanofleet.mqtt import MqttClient
    from nanofleet.protos import topics

    store = Store(own_pg.create_database())
    ingest = Ingest(store, "ingpg", broker.url, write_attempts=40, write_retry_s=(0.05, 0.3))

    async def publish(start: int, n: int) -> None:
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            for i in range(start, start + n):
                body = f'{{"tsMs": "{T0 + i}", "seq": {i % 256}, "bdSeq": "1", "cpuPercent": 3}}'
                await pub.publish(topics.telemetry("ingpg", f"d{i % 20:03d}"), body, qos=1)

    await ingest.start()
    try:
        await ingest.wait_subscribed(5)
        await publish(0, 1)
        await until(lambda: ingest.stats.stored == 1, 10, "first row stored")
        await asyncio.to_thread(_pg_ctl, own_pg, "-m", "fast", "-w", "stop")
        try:
            await publish(1, 200)
            await until(lambda: ingest.stats.write_retries > 0, 10, "a failed batch being retried")
        finally:
            await asyncio.to_thread(_start_again, own_pg)
        await until(lambda: ingest.stats.stored == 201, 20, f"everything stored after the restart: {ingest.stats}")
        assert ingest.stats.dropped == 0 and telemetry_count(store) == 201
    finally:
        await ingest.stop()
        store.close()


def test_failure_reasons_name_postgresql_errors() -> None:
    assert failure_reason(psycopg.errors.AdminShutdown()) == "pg_admin_shutdown"
    assert failure_reason(psycopg.errors.DiskFull()) == "pg_disk_full"
    assert failure_reason(psycopg.OperationalError("connection lost")) == "pg_operational_error"


def test_a_rolled_back_batch_leaves_no_trace_in_the_device_state(pg_store: Store) -> None:
    """A batch that fails (here: a value out of the column's range, after its devices were judged and written) is
    rolled back whole; retried right, it is judged again: its new device is new again and its birth recorded."""
    pg_store.write_status("f", birth("d1", 1), T0)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        pg_store.apply(Batch("f", T0 + 1000, statuses=[birth("d2", 1)],
                             telemetry=[TelemetryRow("x1", 1, 2**40, T0 + 5)]))
    assert pg_store.get_device("d2") is None and pg_store.get_device("x1") is None and pg_store.reloads >= 1
    out = pg_store.apply(Batch("f", T0 + 1000, statuses=[birth("d2", 1)], telemetry=[TelemetryRow("x1", 1, 0, T0 + 5)]))
    assert {"d2", "x1"} <= set(out.new_devices) and ("d2", "birth") in [(e.device_id, e.reason) for e in out.events]
    assert pg_store.get_device("d2").state == "online" and telemetry_count(pg_store) == 1


def test_a_controller_that_never_saw_a_device_still_judges_it_on_its_stored_row(pg_url: str) -> None:
    """mark_all, sweep_stale and expect_devices of a controller whose mirror never heard of the devices (another
    controller took their messages) act on the stored rows."""
    with Store(pg_url) as a, Store(pg_url) as b:
        a.apply(Batch("f", T0, statuses=[birth("d1", 1), birth("d2", 1)]))
        assert b.expect_devices("f", ["d1", "d3"]) == ["d3"]  # d1 is known: stored by the other controller
        assert a.get_device("d1").state == "online" and a.get_device("d3").state == "never_seen"
        events = b.mark_all("offline", "controller_lost_broker", at_ms=T0 + 1)
        assert sorted(e.device_id for e in events) == ["d1", "d2"]
        assert {d.device_id: d.state for d in a.list_devices()} == {"d1": "offline", "d2": "offline",
                                                                    "d3": "never_seen"}
        a.apply(Batch("f", T0 + 2, statuses=[birth("d1", 2)]))  # a's mirror said offline too: the birth is news
        assert [e.reason for e in a.device_events("d1")][-1] == "birth"
