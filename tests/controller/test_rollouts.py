"""The rollout state machine and its inputs (controller/rollouts.py), pure: gate/steps/bake parsing with the bad term
named, and `advance` driven tick by tick over simulated device reports, with hypothesis on the invariants (steps only
add devices, pinned devices are never touched, a failed gate sends everyone back and the rest never got the target)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofleet.controller.rollouts import (
    DeviceReport,
    Rollout,
    RolloutInputError,
    advance,
    assigned,
    parse_bake,
    parse_gate,
    parse_steps,
)

OLD, NEW = "a" * 64, "b" * 64
GATE = "errors<2%,p95_latency<+20%,tokens_per_s>-10%,thermal<severe"


def rollout(steps: tuple[int, ...] = (5, 25, 100), gate: str = GATE, bake_s: float = 60, rid: int = 1) -> Rollout:
    return Rollout(rid, "kiosks", f"http://ctl/artifacts/{NEW}", NEW, f"http://ctl/artifacts/{OLD}", OLD, steps,
                   gate, bake_s)


def test_gate_parses_and_prints_back() -> None:
    g = parse_gate(GATE)
    assert str(g) == GATE and g.max_failed_pct == 10.0
    assert parse_gate("failed<5%").max_failed_pct == 5.0


@pytest.mark.parametrize(("text", "message"), [
    ("", "--gate: empty"),
    ("errors<2%,bogus<1%", "--gate term 'bogus<1%': unknown metric 'bogus'"),
    ("errors=2%", "--gate term 'errors=2%': expected METRIC<VALUE"),
    ("errors<+2%", "errors is a share of the canaries"),
    ("p95_latency<20%", "p95_latency compares with the rest of the group"),
    ("thermal<hot", "expected thermal<LEVEL"),
    ("errors<2", "expected a percentage"),
    ("errors>2%", "errors takes an upper bound"),
    ("errors<200%", "out of range"),
    ("errors<1%,errors<2%", "errors is given twice"),
])
def test_gate_errors_name_the_bad_term(text: str, message: str) -> None:
    with pytest.raises(RolloutInputError, match=None) as info:
        parse_gate(text)
    assert message in str(info.value)


def test_steps_and_bake() -> None:
    assert parse_steps("5,25,100") == (5, 25, 100) and parse_steps("100") == (100,)
    for bad, why in (("5,x", "expected increasing"), ("0,100", "from 1 to 100"), ("50,25,100", "must increase"),
                     ("5,25", "last step must be 100")):
        with pytest.raises(RolloutInputError, match=why):
            parse_steps(bad)
    assert parse_bake("10m") == 600 and parse_bake("0") == 0
    with pytest.raises(RolloutInputError, match="--bake 'soon'"):
        parse_bake("soon")


class Fleet:
    """Simulated devices: each applies its desired model on the next tick (unless offline or refusing) and reports
    figures that depend on the model it runs."""

    def __init__(self, n: int, *, bad: dict[str, float] | None = None, offline: set[str] = frozenset(),  # type: ignore[assignment]
                 refuse: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.ids = [f"d{i:03d}" for i in range(n)]
        self.running = dict.fromkeys(self.ids, OLD)
        self.failed: dict[str, str] = {}
        self.bad = bad or {}
        self.offline, self.refuse = set(offline), set(refuse)
        self.ever_target: set[str] = set()

    def reports(self) -> list[DeviceReport]:
        out = []
        for d in self.ids:
            new = self.running[d] == NEW
            errors = int(self.bad.get("errors", 0)) if new else 0
            thermal = int(self.bad.get("thermal", 1)) if new else 1
            state = "failed" if d in self.failed else ("applied" if new else "")
            out.append(DeviceReport(d, d not in self.offline, self.running[d], state, NEW if d in self.failed else "",
                                    self.failed.get(d, ""), 100, errors, 50.0, 500.0, thermal))
        return out

    def deliver(self, desired: dict[str, tuple[str, str]]) -> None:
        for d, (_, sha) in desired.items():
            if sha == NEW:
                self.ever_target.add(d)
            if d in self.offline:
                continue
            if sha == NEW and d in self.refuse:
                self.failed[d] = "insufficient_ram: model needs about 900 MB, 300 MB free"
                continue
            self.running[d] = sha


def run(r: Rollout, fleet: Fleet, pinned: set[str] = frozenset(), ticks: int = 50) -> tuple[Rollout, list[str]]:  # type: ignore[assignment]
    now, kinds = 1_000_000, []
    for _ in range(ticks):
        out = advance(r, fleet.reports(), set(pinned), now)
        assert not set(out.desired) & set(pinned)
        r = out.rollout
        kinds += [k for k, _ in out.events]
        fleet.deliver(out.desired)
        now += 61_000
        if not r.active:
            break
    return r, kinds


def test_a_good_rollout_reaches_everyone_and_pinned_devices_are_left_alone() -> None:
    fleet = Fleet(40)
    r, kinds = run(rollout(), fleet, pinned={"d007"})
    assert r.state == "done" and kinds.count("step_passed") == 3
    assert {d for d, m in fleet.running.items() if m == NEW} == set(fleet.ids) - {"d007"}
    assert [s["devices"] for s in r.step_results] == [2, 10, 39]


@pytest.mark.parametrize("bad", [{"errors": 10}, {"thermal": 3}])
def test_canaries_with_more_errors_or_heat_roll_back_and_the_rest_never_get_it(bad: dict[str, float]) -> None:
    fleet = Fleet(40, bad=bad)
    r, kinds = run(rollout(), fleet)
    assert r.state == "rolled_back" and kinds[-1] == "rolled_back" and "gate failed at step 1 (5%)" in r.reason
    assert ("errors<2%" if "errors" in bad else "thermal<severe") in r.reason
    assert set(fleet.running.values()) == {OLD}  # the canaries went back
    assert len(fleet.ever_target) == 2  # only the 5 % step's devices were ever sent the new model


def test_refusals_fail_their_step_with_the_reasons() -> None:
    fleet = Fleet(20, refuse={f"d{i:03d}" for i in range(20)})
    r, _ = run(rollout(steps=(50, 100)), fleet)
    assert r.state == "rolled_back" and "could not apply the model" in r.reason and "insufficient_ram" in r.reason


def test_an_offline_device_does_not_hold_the_step_and_catches_up() -> None:
    fleet = Fleet(10)
    r0 = rollout(steps=(100,))
    late = assigned(r0, fleet.ids)[0]
    fleet.offline.add(late)
    out = advance(r0, fleet.reports(), set(), 0)
    fleet.deliver(out.desired)
    out = advance(out.rollout, fleet.reports(), set(), 1000)
    assert out.rollout.state == "baking" and out.progress["pending"] == 1  # the offline one does not hold it up
    assert out.desired[late] == (r0.target_source, NEW)  # its desired model waits for it (retained policy)
    fleet.offline.clear()
    fleet.deliver(out.desired)
    assert fleet.running[late] == NEW


def test_pause_holds_and_resume_goes_on() -> None:
    fleet = Fleet(20)
    r = dataclasses.replace(rollout(), state="paused")
    out = advance(r, fleet.reports(), set(), 0)
    assert out.rollout.state == "paused" and not out.events
    assert sum(1 for m in out.desired.values() if m[1] == NEW) == 1  # the step's devices keep their assignment


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), steps=st.lists(st.integers(1, 99), unique=True, max_size=4),
       pins=st.sets(st.integers(0, 59), max_size=10), rid=st.integers(1, 10_000),
       bad=st.sampled_from([None, {"errors": 5}, {"thermal": 4}]))
def test_invariants(n: int, steps: list[int], pins: set[int], rid: int, bad: dict[str, float] | None) -> None:
    step_tuple = (*sorted(steps), 100)
    fleet = Fleet(n, bad=bad)
    pinned = {f"d{i:03d}" for i in pins if i < n}
    r = rollout(steps=step_tuple, rid=rid)
    eligible = [d for d in fleet.ids if d not in pinned]
    cohorts = [set(assigned(r, eligible, k)) for k in range(len(step_tuple))]
    assert all(a <= b for a, b in itertools.pairwise(cohorts))  # steps only add devices
    assert cohorts[-1] == set(eligible)
    final, _ = run(r, fleet, pinned=pinned, ticks=100)
    assert not final.active
    assert all(fleet.running[d] == OLD for d in pinned)
    if final.state == "done":
        assert all(fleet.running[d] == NEW for d in eligible)
    else:
        assert final.state == "rolled_back" and bad is not None
        assert all(fleet.running[d] == OLD for d in fleet.ids)
        assert fleet.ever_target <= cohorts[len(final.step_results) - 1]  # never past the failing step


def test_a_requests_term_bakes_on_until_the_canaries_served_enough() -> None:
    assert str(parse_gate("requests>50,errors<2%")) == "requests>50,errors<2%"
    for bad in ("requests<5", "requests>x", "requests>5%"):
        with pytest.raises(RolloutInputError, match="expected requests>N"):
            parse_gate(bad)
    fleet = Fleet(20)  # each device reports 100 requests on the model it runs
    r = rollout(steps=(10, 100), gate="requests>500,errors<2%")
    now = 0
    for _ in range(4):  # assign, switch, bake, judge
        out = advance(r, fleet.reports(), set(), now)
        r = out.rollout
        fleet.deliver(out.desired)
        now += 61_000
    assert r.state == "baking" and r.step == 0 and not r.step_results  # 2 canaries × 100 requests: not enough yet
    r, _ = run(rollout(steps=(10, 100), gate="requests>150,errors<2%"), Fleet(20))
    assert r.state == "done"
