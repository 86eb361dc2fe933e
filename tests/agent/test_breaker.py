"""The circuit breaker's pure state machine: examples, and hypothesis over any sequence of events and times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanofleet.agent.runtime.breaker import CircuitBreaker


def test_opens_half_opens_and_closes_with_a_capped_doubling_cooldown() -> None:
    b = CircuitBreaker(cooldown=5, max_cooldown=20)
    assert b.acquire(0) is False and b.state(0) == "closed"
    b.failure(0, probe=False)
    assert b.state(0) == "open" and not b.available(4.9) and b.acquire(4.9) is None and b.retry_in(1) == 4
    assert b.available(5) and b.state(5) == "half_open"
    assert b.acquire(5) is True  # the probe
    assert not b.available(5) and b.acquire(5) is None  # only one at a time
    b.failure(6, probe=True)
    assert b.retry_in(6) == 10  # doubled
    b.acquire(16)
    b.failure(16, probe=True)
    assert b.retry_in(16) == 20
    b.acquire(36)
    b.failure(36, probe=True)
    assert b.retry_in(36) == 20  # capped
    b.acquire(56)
    b.success()
    assert b.state(56) == "closed" and b.retry_in(56) == 0
    b.failure(57, probe=False)
    assert b.retry_in(57) == 5  # a new outage starts from the base cooldown again


def test_stragglers_do_not_lengthen_an_outage_and_a_cancelled_probe_frees_the_slot() -> None:
    b = CircuitBreaker(cooldown=5)
    for _ in range(4):  # four calls in flight when the gateway died
        b.failure(0, probe=False)
    assert b.retry_in(0) == 5
    assert b.acquire(5) is True
    b.release(probe=True)
    assert b.available(5) and b.acquire(5) is True


def test_threshold() -> None:
    b = CircuitBreaker(failure_threshold=3)
    b.failure(0, False)
    b.failure(0, False)
    assert b.available(0)
    b.success()
    b.failure(0, False)
    b.failure(0, False)
    assert b.available(0)  # the success reset the count
    b.failure(0, False)
    assert not b.available(0)


events = st.lists(st.tuples(st.sampled_from(["call_ok", "call_fail", "call_cancel", "wait"]),
                            st.floats(0, 30, allow_nan=False)), max_size=40)


@given(events, st.floats(0, 10), st.floats(0, 100))
def test_invariants(seq, cooldown, cap) -> None:
    b = CircuitBreaker(cooldown=cooldown, max_cooldown=cap)
    now = 0.0
    for kind, dt in seq:
        now += dt
        available = b.available(now)
        if kind == "wait":
            continue
        probe = b.acquire(now)
        assert (probe is not None) == available  # available() predicts acquire() exactly
        if probe is None:
            assert b.state(now) == "open" or b.probing
            continue
        assert probe == (b.state(now) == "half_open")
        if kind == "call_ok":
            b.success()
            assert b.state(now) == "closed"
        elif kind == "call_fail":
            b.failure(now, probe)
            assert b.state(now) in ("open", "half_open") and not b.probing
            assert abs(b.retry_in(now) - b.current_cooldown) < 1e-9 and b.current_cooldown <= cap
        else:
            b.release(probe)
            assert not b.probing
        assert b.retry_in(now) >= 0
