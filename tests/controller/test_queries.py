"""The dashboard's store queries (controller/queries.py) over a real SQLite store filled through its write API:
keyset pagination (every device exactly once, for any filter and sort, also while devices are added), the plan of
the default page, the overview's SQL aggregates against the same figures computed from the device views."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ctl_helpers import StoreUrls
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofleet.config import parse_fleet
from nanofleet.controller import queries
from nanofleet.controller.store import Batch, Store, TelemetryRow
from nanofleet.controller.views import DEVICE_STATES, DeviceView, PublishedPolicy
from nanofleet.controller.web.alerts import fleet_alerts
from nanofleet.protos import fleet_pb2
from nanofleet.protos.names import THERMAL_LEVELS

CFG = parse_fleet("fleet: demo\ngroups:\n  kiosks: {match: ['k-*']}\n  lab: {match: ['l-*']}\n"
                  "devices: {x-7: {group: lab}}\n"
                  "alerts: {offline_after_s: 60, thermal_at: moderate, min_free_ram_mb: 400, queue_depth: 5}\n")
MODELS = ("tiny-test", "gemma-3-270m", "")


def status(device: str, *, online: bool = True, ts: int, bd_seq: int = 1, policy: int = 3,
           model: str = "tiny-test") -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(
        fleet="demo", device_id=device, online=online, bd_seq=bd_seq, ts_ms=ts, agent_version="0.1.0",
        model=fleet_pb2.ModelState(name=model, availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
        hardware=fleet_pb2.Hardware(ram_total_mb=4096), policy_version=policy, telemetry_interval_s=10,
        reason="" if online else "last_will")


def add_devices(store: Store, ids: list[str], rng: random.Random, now: int) -> None:
    """Devices with varied state, temperature, thermal level, RAM, CPU, model, queue (ties included)."""
    statuses, rows = [], []
    for i, did in enumerate(ids):
        model = rng.choice(MODELS)
        statuses.append(status(did, ts=now - 1000, policy=rng.choice((2, 3)), model=model))
        rows.append(TelemetryRow(
            did, 1, 0, now - 500 + i, cpu_percent=float(rng.choice((5, 25.5, 80))),
            ram_total_mb=4096, ram_available_mb=rng.choice((0, 300, 2048)),
            temp_max_c=rng.choice((None, 41.5, 55.0, 71.25)), thermal_level=rng.randrange(len(THERMAL_LEVELS)),
            queue_depth=rng.choice((0, 0, 3, 9)), slots_waiting=rng.choice((0, 1)), policy_version=0,
            route_counts={"local": rng.randrange(50), "cloud": rng.randrange(5)}))
    store.apply(Batch("demo", now - 1000, statuses=statuses))
    store.apply(Batch("demo", now, telemetry=rows))
    gone = [status(did, online=False, ts=now) for did in ids if rng.random() < 0.25]
    if gone:
        store.apply(Batch("demo", now, statuses=gone))


def python_key(d: DeviceView, sort: str) -> Any:
    return {
        "device_id": d.device_id, "group": d.group, "state": d.state, "last_seen": d.last_seen_ms,
        "temp": float(queries.NO_TEMP) if d.temp_max_c is None else d.temp_max_c,
        "thermal": THERMAL_LEVELS.index(d.thermal_level), "ram": d.ram_available_mb, "cpu": d.cpu_percent,
        "model": d.model_name, "policy": d.policy_version, "queue": d.queue_depth, "slots_waiting": d.slots_waiting,
    }[sort]


def python_filter(d: DeviceView, f: queries.DeviceFilter, behind: set[str]) -> bool:
    q = f.q.casefold()
    return ((not f.group or d.group == f.group) and (not f.state or d.state == f.state)
            and (not f.thermal or d.thermal_level == f.thermal) and (not f.model or d.model_name == f.model)
            and (not f.behind or d.device_id in behind)
            and (not q or any(q in (v or "").casefold() for v in (d.device_id, d.model_name, d.group))))


@pytest.fixture(scope="module")
def fleet_store(module_store_url: str) -> Iterator[Store]:
    store = Store(module_store_url)
    store.set_group_resolver(CFG.group_of)
    now = int(time.time() * 1000)
    rng = random.Random(7)
    ids = [f"{p}-{i}" for i in range(25) for p in ("k", "l", "x")] + ["x-7", "a_%", "Z-upper"]
    add_devices(store, sorted(set(ids)), rng, now)
    store.record_policies([PublishedPolicy(d, 3, "h", "{}", now) for d in sorted(set(ids))[::2]])
    yield store
    store.close()


FILTERS = st.builds(
    queries.DeviceFilter,
    group=st.sampled_from(("", "kiosks", "lab", "default", "nope")),
    state=st.sampled_from(("", "online", "offline")),
    thermal=st.sampled_from(("", "none", "severe")),
    model=st.sampled_from(("", *MODELS[:2])),
    behind=st.booleans(),
    q=st.sampled_from(("", "1", "K-", "gemma", "_", "%", "lab")),
    sort=st.sampled_from(sorted(queries.SORTS)),
    desc=st.booleans(),
)


def examples(sqlite: int, backend: str) -> int:
    """Hypothesis examples on each backend: the SQL is the same, so PostgreSQL checks the dialect with fewer (each
    costs a round trip per page there, and a new database per store) while SQLite explores the data widely."""
    return sqlite if backend == "sqlite" else max(10, sqlite // 4)


def test_pages_give_every_matching_device_once_in_order(fleet_store: Store) -> None:
    views = fleet_store.list_devices()
    published = fleet_store.published_policies()
    behind = {d.device_id for d in views if (p := published.get(d.device_id)) and p.version != d.policy_version}
    q = queries.Queries(fleet_store)

    @settings(max_examples=examples(120, fleet_store.target.kind), deadline=None)
    @given(flt=FILTERS, limit=st.integers(1, 13))
    def walk(flt: queries.DeviceFilter, limit: int) -> None:
        expected = sorted((d for d in views if python_filter(d, flt, behind)),
                          key=lambda d: (python_key(d, flt.sort), d.device_id), reverse=flt.desc)
        seen: list[str] = []
        cursor = None
        for _ in range(len(views) + 2):
            page = q.devices(flt, limit=limit, cursor=cursor)
            assert page.total == len(expected)
            assert len(page.items) <= limit
            seen += [d.device_id for d in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == [d.device_id for d in expected]

    walk()


def test_devices_added_between_pages_never_repeat_or_hide_one(new_store_url: StoreUrls) -> None:
    @settings(max_examples=examples(40, new_store_url.backend), deadline=None)
    @given(sort=st.sampled_from(sorted(queries.SORTS)), desc=st.booleans(), limit=st.integers(1, 9),
           seed=st.integers(0, 10_000))
    def grow(sort: str, desc: bool, limit: int, seed: int) -> None:
        rng = random.Random(seed)
        now = int(time.time() * 1000)
        with Store(new_store_url()) as store:
            store.set_group_resolver(CFG.group_of)
            add_devices(store, [f"k-{i:03d}" for i in range(0, 40, 2)], rng, now)
            before = {d.device_id for d in store.list_devices()}
            flt = queries.DeviceFilter(sort=sort, desc=desc)  # type: ignore[arg-type]
            q = queries.Queries(store)
            seen: list[str] = []
            cursor = None
            for n in range(1, 200):
                page = q.devices(flt, limit=limit, cursor=cursor)
                seen += [d.device_id for d in page.items]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
                if n <= 15:  # between pages (a bounded number, so the walk ends)
                    add_devices(store, [f"{rng.choice('kl')}-{n:03d}{rng.randrange(10)}"], rng, now)
            else:
                pytest.fail("the pages never ended")
            assert len(seen) == len(set(seen)), "a device shown twice"
            assert before <= set(seen), f"devices never shown: {before - set(seen)}"

    grow()


def test_a_bad_cursor_or_limit_is_a_clear_error_naming_it(fleet_store: Store) -> None:
    q = queries.Queries(fleet_store)
    first = q.devices(queries.DeviceFilter(sort="temp"), limit=5)
    assert first.next_cursor
    with pytest.raises(queries.QueryError, match=r"^cursor: it belongs to sort 'temp'"):
        q.devices(queries.DeviceFilter(sort="cpu"), cursor=first.next_cursor)
    with pytest.raises(queries.QueryError, match=r"^cursor: it belongs to sort 'temp'"):
        q.devices(queries.DeviceFilter(sort="temp", desc=True), cursor=first.next_cursor)
    for junk in ("!!!", "bm90IGpzb24", "WzEsMiwzXQ", "WyJ0ZW1wIiwwLFtdLCJ4Il0"):  # garbage, not JSON, wrong shape
        with pytest.raises(queries.QueryError, match=r"^cursor: not a cursor"):
            q.devices(queries.DeviceFilter(sort="temp"), cursor=junk)
    for sort, key in (("cpu", "hot"), ("group", 5), ("temp", "x"), ("device_id", 1.5)):  # a key of the wrong type
        forged = queries.encode_cursor(sort, False, key, "k-1")  # (PostgreSQL would refuse to compare it: a 500)
        with pytest.raises(queries.QueryError, match=r"^cursor: not a cursor"):
            q.devices(queries.DeviceFilter(sort=sort), cursor=forged)  # type: ignore[arg-type]
    with pytest.raises(queries.QueryError, match=r"^limit: expected 1 to 500, got 0"):
        q.devices(queries.DeviceFilter(), limit=0)
    with pytest.raises(queries.QueryError, match=r"^thermal: expected one of none"):
        q.devices(queries.DeviceFilter(thermal="toasty"))


def _pg_plan(conn: Any, flt: queries.DeviceFilter, cursor: str | None) -> list[str]:
    """PostgreSQL's plan of a page with sorting and sequential scans priced out (a test table is too small for its
    planner to prefer an index otherwise): a Sort left in the plan means no index can give the page's order."""
    conn.execute("BEGIN")
    try:
        conn.execute("SET LOCAL enable_sort = off")
        conn.execute("SET LOCAL enable_seqscan = off")
        return queries.explain_page(conn, flt, cursor=cursor)
    finally:
        conn.execute("ROLLBACK")


def test_the_default_page_walks_an_index_and_sorts_nothing(fleet_store: Store) -> None:
    first = queries.Queries(fleet_store).devices(queries.DeviceFilter(), limit=5)
    hot = queries.DeviceFilter(group="kiosks", state="online", sort="temp", desc=True)
    hot_next = queries.Queries(fleet_store).devices(hot, limit=2).next_cursor
    pages = ((queries.DeviceFilter(), None), (queries.DeviceFilter(), first.next_cursor),
             (queries.DeviceFilter(state="online"), None), (hot, None), (hot, hot_next))
    if fleet_store.target.kind == "postgresql":
        for flt, cursor in pages:  # an index gives each page's order: with sorts priced out, the plan has none
            text = " | ".join(fleet_store.read(lambda c, f=flt, cur=cursor: _pg_plan(c, f, cur)))
            assert "Sort" not in text and "Index Scan" in text, text
        plan = fleet_store.read(lambda c: _pg_plan(c, queries.DeviceFilter(), first.next_cursor))
        assert any("Index Cond: (device_id > " in line for line in plan), plan  # the cursor is a range on the index
        return
    for flt, cursor in pages:
        plan = fleet_store.read(lambda c, f=flt, cur=cursor: queries.explain_page(c, f, cursor=cur))
        text = " | ".join(plan)
        assert "TEMP B-TREE" not in text, text  # no sort of the whole table
        assert any(line.startswith(("SEARCH d USING", "SCAN d USING")) and "INDEX" in line for line in plan), text
    plan = fleet_store.read(lambda c: queries.explain_page(c, queries.DeviceFilter(), cursor=first.next_cursor))
    assert any("(device_id>?)" in line for line in plan), plan  # the cursor is a range on the index, not a skip


def test_the_count_stops_at_its_cap(fleet_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "COUNT_CAP", 10)
    page = queries.Queries(fleet_store).devices(queries.DeviceFilter(), limit=3)
    assert (page.total, page.total_capped) == (10, True) and len(page.items) == 3
    few = queries.Queries(fleet_store).devices(queries.DeviceFilter(group="lab", state="offline"), limit=3)
    assert few.total < 10 and not few.total_capped


def test_overview_aggregates_match_the_device_views(fleet_store: Store) -> None:
    now = int(time.time() * 1000)
    views = fleet_store.list_devices()
    ov = queries.Queries(fleet_store).overview(CFG.alerts, now, hottest=3)
    assert ov.total == len(views)
    assert ov.by_state == {s: sum(d.state == s for d in views) for s in DEVICE_STATES}
    assert ov.by_thermal == {lv: sum(d.thermal_level == lv for d in views) for lv in THERMAL_LEVELS}
    assert ov.queue_depth == sum(d.queue_depth for d in views) > 0
    assert ov.slots_waiting == sum(d.slots_waiting for d in views)
    assert ov.queue_devices == sum(d.queue_depth > 0 for d in views)
    counts = (ov.queue_depth, ov.slots_waiting, ov.queue_devices, ov.alerts, ov.policy_total, ov.policy_behind,
              ov.rejected, *ov.routes_last_hour.values())
    assert all(type(v) is int for v in counts), counts  # PostgreSQL's sum() is numeric: shown as 3210.0 if not int
    hot = sorted((d for d in views if d.temp_max_c is not None), key=lambda d: (d.temp_max_c, d.device_id),
                 reverse=True)[:3]  # ties: the later id first (the temperature index walked backwards)
    assert [h.device_id for h in ov.hottest] == [d.device_id for d in hot]
    published = fleet_store.published_policies()
    assert ov.policy_total == len(published) and ov.policy_latest == 3
    assert ov.policy_behind == sum(1 for d in views if d.device_id in published and d.policy_version != 3)
    assert ov.groups == {g: sum(d.group == g for d in views) for g in {d.group for d in views}}
    assert set(ov.groups) == {"kiosks", "lab", "default"}
    assert ov.models == sorted({d.model_name for d in views} - {""})
    assert ov.alerts == len(fleet_alerts(views, CFG.alerts, now)) > 0
    later = now + 3_600_000  # an hour on, the silent devices cross offline_after_s too
    assert queries.Queries(fleet_store).alert_count(CFG.alerts, later) == len(fleet_alerts(views, CFG.alerts, later))


def test_every_device_has_its_group_also_the_ones_that_appear_later(store_url: str) -> None:
    now = int(time.time() * 1000)
    with Store(store_url) as store:
        add_devices(store, ["k-1", "l-1", "x-7", "q-1"], random.Random(1), now)
        assert {d.group for d in store.list_devices()} == {None}  # no resolver yet: the store knows no group
        store.set_group_resolver(CFG.group_of)
        add_devices(store, ["k-2", "q-2"], random.Random(2), now)
        groups = {d.device_id: d.group for d in store.list_devices()}
        assert groups == {"k-1": "kiosks", "k-2": "kiosks", "l-1": "lab", "x-7": "lab", "q-1": "default",
                          "q-2": "default"}
        page = queries.Queries(store).devices(queries.DeviceFilter(group="default"))
        assert [d.device_id for d in page.items] == ["q-1", "q-2"]


def test_route_mix_of_the_last_hour_from_cumulative_counters(store_url: str) -> None:
    t0 = 1_800_000_000_000
    clock = [t0]
    with Store(store_url, clock=lambda: clock[0]) as store:
        def counters(device: str, ts: int, bd_seq: int = 1, **routes: int) -> None:
            store.apply(Batch("demo", ts, telemetry=[TelemetryRow(device, bd_seq, ts // 1000 % 256, ts,
                                                                  route_counts=routes)]))

        def mix(at: int) -> tuple[dict[str, int], int | None]:
            ov = queries.Queries(store).overview(CFG.alerts, at)
            return ov.routes_last_hour, ov.routes_since_ms

        assert mix(t0) == ({"local": 0, "cloud": 0, "queued": 0, "rejected": 0}, None)
        for d in ("a", "b", "c"):
            store.apply(Batch("demo", t0, statuses=[status(d, ts=t0)]))
        counters("a", t0, local=100, cloud=10)
        counters("b", t0, local=50, queued=4)
        store.snapshot_routes(t0)
        store.snapshot_routes(t0 + 30 * 60_000)  # too recent to be the hour's base later on
        later = t0 + 3_600_000 + 60_000
        counters("a", later - 1000, local=130, cloud=10, rejected=2)   # +30 local, +2 rejected
        store.apply(Batch("demo", later, statuses=[status("b", ts=later, bd_seq=2)]))  # b restarted: from zero
        counters("b", later, bd_seq=2, local=7)
        counters("c", later, local=5)  # c had no counters at the snapshot: all 5 are this hour's
        store.apply(Batch("demo", later, statuses=[status("d", ts=later)]))
        counters("d", later, cloud=3)  # d did not exist at the snapshot
        assert mix(later) == ({"local": 30 + 7 + 5, "cloud": 3, "queued": 0, "rejected": 2}, t0)


def test_pages_are_exact_under_a_collation_that_is_not_byte_order(pg_server: Any) -> None:
    """A PostgreSQL database in a linguistic collation (ICU en-US: 'a_-1' before 'A--1', unlike SQLite and Python)
    still pages every device exactly once in every sort: ORDER BY and the cursor's comparison use the same one."""
    import psycopg

    name = f"icu{int(time.time() * 1000) % 10**8}"
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
                     "LOCALE 'C.UTF-8'")
    ids = sorted({f"{p}-{i}" for i in range(6) for p in ("k", "K", "a_", "A-", "l", "é")} | {"Z-upper", "a_%"})
    with Store(pg_server.url(name)) as store:
        store.set_group_resolver(CFG.group_of)
        add_devices(store, ids, random.Random(3), int(time.time() * 1000))
        q = queries.Queries(store)
        first = [d.device_id for d in q.devices(queries.DeviceFilter(), limit=3).items]
        assert first != sorted(ids)[:3]  # not byte order: the collation is really another
        for sort in sorted(queries.SORTS):
            for desc in (False, True):
                seen: list[str] = []
                cursor = None
                while True:
                    page = q.devices(queries.DeviceFilter(sort=sort, desc=desc), limit=4,  # type: ignore[arg-type]
                                     cursor=cursor)
                    seen += [d.device_id for d in page.items]
                    if (cursor := page.next_cursor) is None:
                        break
                assert sorted(seen) == ids, (sort, desc)  # each once
