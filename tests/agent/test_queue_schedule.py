"""The queue's pure decisions under hypothesis: FIFO per app, round-robin across apps, nothing early or expired,
retries bounded and never sooner than Retry-After."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanofleet.agent.queue.schedule import Candidate, RetryPolicy, after_failure, plan

APPS = st.sampled_from(["a", "b", "c", "d"])


@st.composite
def queues(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(0, 30))
    seqs = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    return [Candidate(f"r{s}", draw(APPS), s, draw(st.sampled_from([0.0, 0.0, 5.0, 20.0])),
                      draw(st.sampled_from([100.0, 100.0, 8.0]))) for s in seqs]


@given(queues(), st.sampled_from([None, "a", "b", "c", "d", "zz"]), st.integers(0, 40))
def test_plan_is_fifo_per_app_fair_and_takes_only_ready_entries(q: list[Candidate], cursor: str | None,
                                                                  limit: int) -> None:
    now = 10.0
    out = plan(q, now, cursor, limit)
    assert len(out) <= limit and len({c.id for c in out}) == len(out)
    assert all(c.not_before <= now < c.expires_at for c in out)
    for app in {c.app for c in q}:
        line = sorted((c for c in q if c.app == app), key=lambda c: c.seq)
        mine = [c for c in out if c.app == app]
        assert mine == line[:len(mine)]  # FIFO: a prefix of the app's line, never an entry past a waiting one
    # round-robin: no app gets a second entry before every app with a ready head got one
    heads = {c.app for c in q if c == min((d for d in q if d.app == c.app), key=lambda d: d.seq)
             and c.not_before <= now < c.expires_at}
    first_round = out[:len(heads)]
    if len(out) >= len(heads):
        assert {c.app for c in first_round} == heads


def test_round_robin_starts_after_the_app_served_last() -> None:
    q = [Candidate(f"{app}{i}", app, seq, 0, 100) for seq, (app, i) in
         enumerate([("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)])]
    assert [c.id for c in plan(q, 1, "a", 10)] == ["b1", "c1", "a1", "b2", "a2", "a3"]
    assert [c.id for c in plan(q, 1, None, 2)] == ["a1", "b1"]


def test_a_waiting_entry_holds_its_app_but_not_the_others() -> None:
    q = [Candidate("a1", "a", 1, 50, 100), Candidate("a2", "a", 2, 0, 100), Candidate("b1", "b", 3, 0, 100)]
    assert [c.id for c in plan(q, 1, None, 5)] == ["b1"]


@given(st.integers(1, 12), st.booleans(), st.one_of(st.none(), st.floats(0, 500)), st.floats(0, 0.999))
def test_retries_are_bounded_and_honour_retry_after(attempts: int, transient: bool, retry_after: float | None,
                                                     rand: float) -> None:
    policy = RetryPolicy(max_attempts=5, base_s=1.0, cap_s=60.0)
    v = after_failure(attempts, transient, retry_after, policy, "deadline_exceeded", rand)
    if not transient or attempts >= policy.max_attempts:
        assert v.action == "fail" and v.reason.startswith("deadline_exceeded")
        return
    assert v.action == "retry"
    ceiling = min(60.0, 2.0 ** (attempts - 1))
    assert ceiling / 2 <= v.delay_s or (retry_after is not None and v.delay_s == retry_after)
    assert v.delay_s <= max(ceiling, retry_after or 0)
    if retry_after is not None:
        assert v.delay_s >= retry_after
