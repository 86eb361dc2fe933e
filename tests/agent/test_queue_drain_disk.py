"""A drained entry's outcome must reach the disk: when the commit that records it fails (the disk is full), the
drainer keeps the outcome, holds the entry `running` and writes it again with backoff once space returns — it does
not drop it and leave the entry `running` on disk until the next restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nanofleet.agent.queue.drain import Drainer, Outcome
from nanofleet.agent.queue.store import QueueStore
from nanofleet.tasks import TaskSupervisor
from tests.agent.test_queue_store import UID, req
from tests.conftest import until


class BigResult:
    """Serves the first entry only, with a result too big for what is left of the file."""

    def __init__(self, first: str) -> None:
        self.first, self.calls = first, 0

    def ready(self, request: dict[str, Any]) -> bool:
        return request["chat"]["messages"][0]["content"] == self.first

    async def run(self, rid: str, request: dict[str, Any]) -> Outcome:
        self.calls += 1
        return Outcome("done", "local", "local_only", {"object": "chat.completion", "text": "z" * 60_000})


async def test_an_outcome_the_full_disk_refused_is_written_once_space_returns(tmp_path: Path) -> None:
    q = QueueStore(tmp_path / "queue.db", max_file_bytes=128 * 1024)
    first = (await q.enqueue(req("first"), uid=UID, app="app", reason="r")).id
    for i in range(200):  # fill the file with entries nobody drains
        try:
            await q.enqueue(req(f"fill-{i}", pad=2000), uid=UID, app="app2", reason="r")
        except Exception:  # noqa: BLE001 - QueueDiskFull: full now
            break
    runner = BigResult("first")
    supervisor = TaskSupervisor("test")
    drainer = Drainer(q, runner, supervisor, tick_s=0.1)
    drainer.start()
    try:
        await until(lambda: q.counts["settle_retries"] >= 1, within=10, what="the refused commit to be retried")
        assert (await q.get(first, UID))["state"] == "running" and runner.calls == 1
        q._writer.call(lambda c: c.execute("PRAGMA max_page_count=1000000"))  # space returns
        entry = await q.wait(first, UID, 15)
        while entry["state"] == "running":
            entry = await q.wait(first, UID, 15)
        assert (entry["state"], len(entry["result"]["text"])) == ("done", 60_000), entry
        assert runner.calls == 1 and not supervisor.deaths  # not run again, and no task died for it
    finally:
        await supervisor.stop()
        q.close()
