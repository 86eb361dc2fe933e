"""The pure alert rules and life cycle (controller/alerting.py): hypothesis on the invariants, over the pure model and
over the real stored alerts (a real SQLite store, the one writer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanofleet.config import Alerts
from nanofleet.controller import alerting
from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.alerting import Condition, DeviceFacts, OpenAlert, transitions
from nanofleet.controller.errors import AlertCleared
from nanofleet.controller.store import Store

KINDS = alerting.ALERT_KINDS
DEVICES = ("a", "b", "c", "")
cond = st.builds(lambda d, k: Condition(d, k, f"{k} on {d}", 1.0, 0.0), st.sampled_from(DEVICES),
                 st.sampled_from(KINDS))
round_ = st.tuples(st.sets(cond, max_size=8),                       # what holds now
                   st.sets(st.sampled_from(KINDS), min_size=1),      # the kinds this round evaluates
                   st.sets(st.integers(0, 40), max_size=4))          # alert ids the operator acknowledges first


def _check(alerts: dict[int, tuple[tuple[str, str], str]], conditions: set[Condition], kinds: set[str]) -> None:
    open_keys = [key for key, state in alerts.values() if state != "cleared"]
    assert len(open_keys) == len(set(open_keys)), "two open alerts for one (device, kind)"
    holding = {c.key for c in conditions if c.kind in kinds}
    for key, state in alerts.values():
        if state != "cleared" and key[1] in kinds:
            assert key in holding, f"open alert {key} whose condition is gone was not cleared"
    assert holding <= set(open_keys), "a condition that holds has no open alert"


@settings(max_examples=300, deadline=None)
@given(st.lists(round_, min_size=1, max_size=12))
def test_life_cycle_invariants_pure(rounds: list[tuple[set[Condition], set[str], set[int]]]) -> None:
    alerts: dict[int, tuple[tuple[str, str], str]] = {}  # id -> (key, state), as the table holds them
    next_id = 1
    for conditions, kinds, acks in rounds:
        for i in acks:
            if i in alerts and alerts[i][1] == "raised":
                alerts[i] = (alerts[i][0], "acknowledged")
        before = dict(alerts)
        out = transitions(conditions, [OpenAlert(i, k[0], k[1], s) for i, (k, s) in alerts.items()], kinds)
        for alert_id in out.clear:
            alerts[alert_id] = (alerts[alert_id][0], "cleared")
        for c in out.raise_:
            assert all(not (k == c.key and s != "cleared") for k, s in alerts.values())
            alerts[next_id] = (c.key, "raised")
            next_id += 1
        _check(alerts, conditions, kinds)
        for i, (key, state) in before.items():
            if state == "acknowledged":  # acknowledged stays acknowledged until cleared
                assert alerts[i][1] in ("acknowledged", "cleared")
            if state == "cleared":  # a cleared alert never reopens: a returning condition is a new alert
                assert alerts[i] == (key, "cleared")


@pytest.fixture(scope="module")
def shared_store(module_store_url: str) -> Iterator[Store]:
    store = Store(module_store_url)
    yield store
    store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(round_, min_size=1, max_size=6))
def test_life_cycle_invariants_stored(shared_store: Store, rounds: list[tuple[set[Condition], set[str],
                                                                               set[int]]]) -> None:
    """The same invariants on the real table: the writer's guarded writes and the unique index of open alerts."""
    shared_store.submit(lambda c: c.execute("DELETE FROM alerts")).result()
    store = AlertStore(shared_store)
    now = 1_000
    ids: list[int] = []
    for conditions, kinds, acks in rounds:
        for i in acks:
            if i < len(ids):
                with contextlib.suppress(AlertCleared):  # already cleared: refused, as the API answers 409
                    store.acknowledge(ids[i], "ops", "seen", now)
        before = {a.id: a.state for a in store.page("all", limit=1000)[0]}
        changed = store.apply(transitions(conditions, store.open_alerts(), kinds), now)
        ids += [v.id for v in changed if v.state == "raised"]
        rows = store.page("all", limit=1000)[0]
        _check({a.id: ((a.device_id, a.kind), a.state) for a in rows}, conditions, kinds)
        for a in rows:
            if before.get(a.id) == "acknowledged":
                assert a.state in ("acknowledged", "cleared") and a.acked_by == "ops"
            if before.get(a.id) == "cleared":
                assert a.state == "cleared"
        now += 1_000


T = Alerts(offline_after_s=60, thermal_at="severe", min_free_ram_mb=256, queue_depth=500, policy_behind_s=300)
NOW = 10_000_000


def facts(**kw: object) -> DeviceFacts:
    base: dict[str, object] = {"device_id": "d", "state": "online", "last_seen_ms": NOW, "thermal_level": 0,
                               "ram_available_mb": 2000, "queue_depth": 0, "policy_version": 3}
    return DeviceFacts(**{**base, **kw})  # type: ignore[arg-type]


def kinds_of(d: DeviceFacts) -> list[str]:
    return [c.kind for c in alerting.device_conditions(d, T, NOW)]


def test_device_rules_at_their_thresholds() -> None:
    assert kinds_of(facts()) == []
    assert kinds_of(facts(state="offline", last_seen_ms=NOW - 60_000)) == []  # exactly at: not yet
    assert kinds_of(facts(state="offline", last_seen_ms=NOW - 60_001)) == ["offline"]
    assert kinds_of(facts(state="stale", last_seen_ms=NOW - 30_000)) == ["stale"]
    assert kinds_of(facts(state="stale", last_seen_ms=NOW - 90_000)) == ["offline"]  # stale escalates to offline
    assert kinds_of(facts(thermal_level=2)) == []
    assert kinds_of(facts(thermal_level=3)) == ["thermal"]  # severe: at or above
    assert kinds_of(facts(ram_available_mb=0)) == []  # no telemetry yet, not a reading
    assert kinds_of(facts(ram_available_mb=255)) == ["low_ram"]
    assert kinds_of(facts(queue_depth=500)) == ["queue_depth"]
    assert kinds_of(facts(queue_depth=499)) == []
    assert kinds_of(facts(published_version=4, published_ms=NOW - 300_000)) == []
    assert kinds_of(facts(published_version=4, published_ms=NOW - 300_001)) == ["policy_behind"]
    assert kinds_of(facts(published_version=3, published_ms=0)) == []  # converged
    [thermal] = alerting.device_conditions(facts(thermal_level=4), T, NOW)
    assert "critical" in thermal.detail and "severe" in thermal.detail and (thermal.value, thermal.threshold) == (4, 3)


def test_budget_rules_per_device_and_fleet() -> None:
    out = alerting.budget_conditions({"a": 80, "b": 79, "c": 500}, {"a": 100, "b": 100, "c": None}, 1000, 80)
    assert [(c.device_id, c.value, c.threshold) for c in out] == [("a", 80, 100)]
    out = alerting.budget_conditions({"a": 500, "b": 300}, {}, 1000, 80)
    assert [(c.device_id, c.value) for c in out] == [("", 800)] and "fleet" in out[0].detail
    assert alerting.budget_conditions({"a": 10**9}, {"a": 0}, None, 80) == []  # 0 or none: no budget, no alert


def test_rejection_rule() -> None:
    out = alerting.rejection_conditions([("d", 3, 2), ("", 1, 1), ("e", 0, 1)], 300)
    assert [(c.device_id, c.value) for c in out] == [("", 1), ("d", 3)]


def test_transitions_leave_unevaluated_kinds_open() -> None:
    open_alerts = [OpenAlert(1, "", "budget", "raised"), OpenAlert(2, "d", "thermal", "acknowledged")]
    out = transitions([], open_alerts, {"thermal"})
    assert out.clear == [2] and out.raise_ == [] and bool(out)
    assert not transitions([], open_alerts, {"offline"})
