"""The one backoff rule and the one way to run long-lived tasks."""

from __future__ import annotations

import asyncio
import logging

from hypothesis import given
from hypothesis import strategies as st

from nanofleet.backoff import Backoff, backoff
from nanofleet.tasks import TaskSupervisor
from tests.conftest import until


@given(st.integers(0, 100), st.floats(0.001, 10), st.floats(0.01, 1000), st.floats(0, 0.999999))
def test_backoff_is_equal_jitter_capped(attempt, base, cap, rand):
    ceiling = min(cap, base * 2 ** min(attempt, 30))
    d = backoff(attempt, base, cap, rand)
    assert ceiling / 2 <= d <= ceiling


def test_backoff_state_grows_and_resets():
    b = Backoff(1.0, 8.0)
    delays = [b.next() for _ in range(6)]
    assert 0.5 <= delays[0] <= 1 and 4 <= delays[-1] <= 8
    b.reset()
    assert b.next() <= 1


async def test_a_dying_loop_is_logged_counted_and_restarted(caplog):
    sup = TaskSupervisor("test", restart_base_s=0.01, restart_cap_s=0.02)
    runs = []

    async def loop():
        runs.append(1)
        if len(runs) < 3:
            raise ValueError(f"bad {len(runs)}")
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR):
        sup.spawn(loop, "worker")
        await until(lambda: len(runs) == 3)
    assert sup.deaths["worker"].count == 2 and "bad 2" in sup.deaths["worker"].error
    assert "task worker died" in caplog.text
    assert sup.running == ["worker"]
    await sup.stop()
    assert sup.running == []


async def test_a_fatal_task_calls_on_fatal_and_a_returning_forever_task_is_a_death():
    fatal = []
    sup = TaskSupervisor("test", on_fatal=lambda name, exc: fatal.append((name, str(exc))))

    async def returns():
        return None

    sup.spawn(returns, "session", on_death="fatal")
    await until(lambda: fatal)
    assert fatal[0][0] == "session" and "returned" in fatal[0][1]
    await sup.spawn(returns, "oneshot", on_death="log", forever=False)
    await sup.stop()
    assert "oneshot" not in sup.deaths


async def test_stop_returns_the_errors_tasks_raise_while_stopping():
    sup = TaskSupervisor("test")
    started = asyncio.Event()

    async def bad_cleanup():
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            raise OSError("flush failed on the way out")

    sup.spawn(bad_cleanup, "writer")
    await started.wait()
    errors = await sup.stop()
    assert [str(e) for e in errors] == ["flush failed on the way out"]
