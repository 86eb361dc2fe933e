"""Leadership by a PostgreSQL advisory lock (controller/leader.py), against a real throwaway PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import psycopg
import pytest

from nanofleet.controller.leader import Leadership, lock_key
from nanofleet.tcp import free_port
from tests.conftest import until


async def _running(lead: Leadership) -> asyncio.Task[None]:
    return asyncio.ensure_future(lead.run())


async def _stop(*tasks: asyncio.Task[Any]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_lock_key_is_a_stable_bigint_per_fleet() -> None:
    assert lock_key("f1") == lock_key("f1") != lock_key("f2")
    assert -(2**63) <= lock_key("f1") < 2**63


async def test_sqlite_controller_is_always_the_leader() -> None:
    flips: list[bool] = []
    lead = Leadership(None, "fleet-a", on_change=flips.append)
    task = await _running(lead)
    await until(lambda: lead.is_leader, 2, "the SQLite controller leads")
    assert flips == [True] and lead.status()["backend"] == "sqlite"
    await _stop(task)
    assert flips == [True, False] and not lead.is_leader


async def test_one_leader_of_two_and_a_takeover_when_it_stops(pg_url: str) -> None:
    a = Leadership(pg_url, "fleet-b", retry_s=0.1, check_s=0.1)
    b = Leadership(pg_url, "fleet-b", retry_s=0.1, check_s=0.1)
    ta, tb = await _running(a), await _running(b)
    try:
        await until(lambda: a.is_leader or b.is_leader, 10, "a leader")
        await asyncio.sleep(0.5)  # several rounds of both: still exactly one
        assert a.is_leader != b.is_leader
        leader, follower, t_leader = (a, b, ta) if a.is_leader else (b, a, tb)
        await _stop(t_leader)
        assert not leader.is_leader
        await until(lambda: follower.is_leader, 5, "the follower takes over")
    finally:
        await _stop(ta, tb)


async def test_other_fleets_do_not_compete(pg_url: str) -> None:
    a = Leadership(pg_url, "fleet-c1", retry_s=0.1)
    b = Leadership(pg_url, "fleet-c2", retry_s=0.1)
    ta, tb = await _running(a), await _running(b)
    try:
        await until(lambda: a.is_leader and b.is_leader, 10, "each fleet its own leader")
    finally:
        await _stop(ta, tb)


async def test_a_leader_whose_connection_breaks_steps_down(pg_url: str) -> None:
    flips: list[bool] = []
    lead = Leadership(pg_url, "fleet-d", retry_s=0.1, check_s=0.1, on_change=flips.append)
    task = await _running(lead)
    try:
        await until(lambda: lead.is_leader, 10, "leader")
        with psycopg.connect(pg_url, autocommit=True) as admin:  # what a server restart or a network cut does
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE application_name = 'nanofleet-controller-leader'").fetchall()
        assert killed == [(True,)]
        await until(lambda: flips[-1:] == [False], 5, "the leader stepped down")
        assert lead.errors >= 1 and lead.last_error
        await until(lambda: lead.is_leader, 5, "it leads again on a new connection (nobody else holds the lock)")
        assert flips == [True, False, True]
    finally:
        await _stop(task)


async def test_no_server_means_no_leader_and_counted_errors() -> None:
    lead = Leadership(f"postgresql://nobody@127.0.0.1:{free_port()}/none", "fleet-e", retry_s=0.05,
                      check_timeout_s=1.0)
    task = await _running(lead)
    try:
        await until(lambda: lead.errors >= 2, 10, "failed connects counted")
        assert not lead.is_leader and "127.0.0.1" in (lead.last_error or "")
    finally:
        await _stop(task)


_HOLDER = """
import asyncio, sys
from nanofleet.controller.leader import Leadership
async def main():
    lead = Leadership(sys.argv[1], sys.argv[2], retry_s=0.1, on_change=lambda up: print("leader", up, flush=True))
    await lead.run()
asyncio.run(main())
"""


async def test_kill_9_of_the_leader_process_hands_over_within_seconds(pg_url: str) -> None:
    holder = await asyncio.create_subprocess_exec(sys.executable, "-c", _HOLDER, pg_url, "fleet-f",
                                                  stdout=asyncio.subprocess.PIPE)
    follower = Leadership(pg_url, "fleet-f", retry_s=0.2)
    task: asyncio.Task[None] | None = None
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 20)
        assert line.decode().strip() == "leader True"
        task = await _running(follower)
        await asyncio.sleep(0.6)  # three tries of the follower's: the lock is taken
        assert not follower.is_leader
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        await until(lambda: follower.is_leader, 5, "takeover after kill -9")
        took = time.monotonic() - killed_at
        assert took < 5
        print(f"takeover after kill -9: {took:.2f}s")
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        if task is not None:
            await _stop(task)


async def test_run_while_leader_starts_and_cancels_with_leadership(pg_url: str) -> None:
    lead = Leadership(pg_url, "fleet-g", retry_s=0.1, check_s=0.1)
    runs: list[str] = []

    async def work() -> None:
        runs.append("start")
        try:
            await asyncio.Event().wait()
        finally:
            runs.append("stop")

    wrapper = asyncio.ensure_future(lead.run_while_leader(work))
    await asyncio.sleep(0.2)
    assert runs == []  # not leader yet: nothing runs
    task = await _running(lead)
    try:
        await until(lambda: runs == ["start"], 10, "the work starts with leadership")
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = 'nanofleet-controller-leader'")
        await until(lambda: runs[:2] == ["start", "stop"], 5, "the work is cancelled on step down")
        await until(lambda: runs == ["start", "stop", "start"], 5, "and runs again when it leads again")
    finally:
        await _stop(task, wrapper)


async def test_run_while_leader_raises_what_the_work_raised() -> None:
    lead = Leadership(None, "fleet-h")
    task = await _running(lead)

    async def broken() -> None:
        raise ValueError("boom")

    try:
        with pytest.raises(ValueError, match="boom"):
            await asyncio.wait_for(lead.run_while_leader(broken), 5)
    finally:
        await _stop(task)
