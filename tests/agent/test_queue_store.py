"""The offline queue's SQLite store on real files: acknowledged only after commit, grouped commits, idempotency,
bounds (items, bytes, a full disk), TTL expiry and pruning with an injected clock, crash recovery, visibility."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from nanofleet.agent.errors import (
    IdempotencyConflict,
    NotCancellable,
    QueueDiskFull,
    QueueFull,
    RequestNotFound,
)
from nanofleet.agent.queue.store import Limits, QueueStore
from tests.conftest import until

UID, OTHER = 1000, 1001


def req(text: str = "hello", pad: int = 0) -> dict[str, Any]:
    return {"chat": {"messages": [{"role": "user", "content": text + "x" * pad}]}, "route": {"app_id": "app"}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue.db"


async def test_an_acknowledged_entry_is_on_disk_and_the_file_is_private(path: Path) -> None:
    q = QueueStore(path)
    acc = await q.enqueue(req(), uid=UID, app="app", reason="thermal_severe")
    assert acc.new and acc.state == "queued" and acc.id.startswith("req_")
    q.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = QueueStore(path)  # a new process's view: what was acknowledged is there
    entry = await again.get(acc.id, UID)
    assert (entry["state"], entry["reason"], entry["attempts"]) == ("queued", "thermal_severe", 0)
    assert again.depth == 1 and again.status()["depth"] == 1
    again.close()


async def test_a_burst_shares_commits(path: Path) -> None:
    q = QueueStore(path)
    before = q._writer.batches
    accepted = await asyncio.gather(*(q.enqueue(req(str(i)), uid=UID, app="app", reason="r") for i in range(300)))
    commits = q._writer.batches - before
    assert len({a.id for a in accepted}) == 300 and q.depth == 300
    assert commits < 100, f"{commits} commits for 300 enqueues: not grouped"
    q.close()


async def test_idempotency_key_gives_the_same_entry_and_refuses_another_body(path: Path) -> None:
    q = QueueStore(path)
    a = await q.enqueue(req("one"), uid=UID, app="app", reason="r", idem_key="k1")
    b = await q.enqueue(req("one"), uid=UID, app="app", reason="r", idem_key="k1")
    assert (b.id, b.new) == (a.id, False) and q.depth == 1 and q.counts["enqueued"] == 1
    with pytest.raises(IdempotencyConflict) as err:
        await q.enqueue(req("two"), uid=UID, app="app", reason="r", idem_key="k1")
    assert err.value.status == 409 and err.value.code == "idempotency_conflict"
    c = await q.enqueue(req("one"), uid=OTHER, app="app", reason="r", idem_key="k1")  # keys are per owner
    assert c.new and c.id != a.id
    q.close()


async def test_item_and_byte_bounds_answer_queue_full(path: Path) -> None:
    q = QueueStore(path, Limits(max_items=3, max_bytes=10_000))
    for i in range(3):
        await q.enqueue(req(str(i)), uid=UID, app="app", reason="r")
    with pytest.raises(QueueFull) as err:
        await q.enqueue(req("4"), uid=UID, app="app", reason="r")
    assert err.value.status == 429 and err.value.retry_after and "3 of 3" in err.value.message
    q.set_limits(Limits(max_items=100, max_bytes=10_000))
    with pytest.raises(QueueFull, match="byte bound"):
        await q.enqueue(req(pad=20_000), uid=UID, app="app", reason="r")
    assert q.depth == 3 and q.counts["full"] == 2
    q.close()


async def test_a_full_disk_is_507_and_loses_nothing_acknowledged(path: Path) -> None:
    q = QueueStore(path, max_file_bytes=96 * 1024)
    accepted: list[str] = []
    with pytest.raises(QueueDiskFull) as err:
        for i in range(500):
            accepted.append((await q.enqueue(req(str(i), pad=2000), uid=UID, app="app", reason="r")).id)
    assert err.value.status == 507 and err.value.code == "queue_disk_full" and len(accepted) > 5
    assert q.counts["disk_full"] == 1 and q.depth == len(accepted)
    await q.cancel(accepted[0], UID)  # the queue still answers
    q.close()
    again = QueueStore(path)
    entries, _ = await again.entries(UID, limit=500)
    assert [e["id"] for e in entries] == accepted
    again.close()


async def test_ttl_expiry_and_pruning_follow_the_clock(path: Path) -> None:
    clock = Clock()
    q = QueueStore(path, Limits(ttl_s=60, keep_s=300), clock=clock, housekeeping_s=0.05)
    old = await q.enqueue(req("old"), uid=UID, app="app", reason="no_route")
    clock.now += 30
    young = await q.enqueue(req("young"), uid=UID, app="app", reason="no_route")
    assert q.oldest_age_s() == 30
    clock.now += 31
    await until(lambda: q.counts["expired"] == 1, what="the TTL expiry")
    entry = await q.get(old.id, UID)
    assert (entry["state"], entry["reason"]) == ("expired", "ttl_expired") and "TTL" in entry["error"]
    assert (await q.get(young.id, UID))["state"] == "queued" and q.depth == 1
    clock.now += 301  # old finished 301 s ago: pruned; young expires now, readable for keep_s
    await until(lambda: q.counts["pruned"] == 1 and q.counts["expired"] == 2, what="pruning the old entry")
    with pytest.raises(RequestNotFound):
        await q.get(old.id, UID)
    assert (await q.get(young.id, UID))["state"] == "expired" and q.depth == 0
    clock.now += 301
    await until(lambda: q.counts["pruned"] == 2, what="pruning the young entry")
    q.close()


async def test_a_running_entry_at_a_crash_runs_again(path: Path) -> None:
    q = QueueStore(path)
    a = await q.enqueue(req(), uid=UID, app="app", reason="r")
    claimed = await q.claim(a.id)
    assert claimed is not None and claimed[1:] == (1, 0)
    assert await q.claim(a.id) is None  # claimed once only
    q._writer.close()  # the process dies: no finish
    again = QueueStore(path)
    assert again.recovered == 1
    entry = await again.get(a.id, UID)
    assert (entry["state"], entry["reason"], entry["attempts"], entry["restarts"]) == ("queued", "restarted", 0, 1)
    again.close()


async def test_entries_are_visible_to_their_owner_and_root_only(path: Path) -> None:
    q = QueueStore(path)
    mine = await q.enqueue(req(), uid=UID, app="a1", reason="r")
    theirs = await q.enqueue(req(), uid=OTHER, app="a2", reason="r")
    with pytest.raises(RequestNotFound):
        await q.get(theirs.id, UID)
    with pytest.raises(RequestNotFound):
        await q.cancel(theirs.id, UID)
    assert [e["id"] for e in (await q.entries(UID))[0]] == [mine.id]
    assert {e["id"] for e in (await q.entries(0))[0]} == {mine.id, theirs.id}  # root
    assert (await q.get(theirs.id, 0))["app"] == "a2"
    q.close()


async def test_cancel_list_and_pages(path: Path) -> None:
    q = QueueStore(path)
    ids = [(await q.enqueue(req(str(i)), uid=UID, app="ab"[i % 2], reason="r")).id for i in range(7)]
    page, nxt = await q.entries(UID, limit=3)
    assert [e["id"] for e in page] == ids[:3] and nxt is not None
    page, nxt = await q.entries(UID, limit=3, after=nxt)
    assert [e["id"] for e in page] == ids[3:6]
    assert [e["id"] for e in (await q.entries(UID, app="b"))[0]] == ids[1::2]
    assert (await q.cancel(ids[0], UID))["state"] == "cancelled"
    with pytest.raises(NotCancellable):
        await q.cancel(ids[0], UID)
    await q.claim(ids[1])
    with pytest.raises(NotCancellable, match="running"):
        await q.cancel(ids[1], UID)
    assert [e["id"] for e in (await q.entries(UID, state="cancelled"))[0]] == [ids[0]]
    assert q.depth == 6 and q.counts["cancelled"] == 1
    q.close()
