"""The drainer: starts queued entries as routes open — on a kick (a route came back, a new policy, the
`drain-queue` command, a finished entry freeing capacity) and on a periodic tick, so nothing depends on a trigger
alone. The route is chosen at drain time by the `Runner` (the dispatcher: a sensitive entry still never reaches the
cloud); the order comes from `schedule.plan` (FIFO per app, round-robin across apps).

An entry is marked `running` on disk before it runs (a crash then re-runs it once, under the same request_id);
what follows a failure comes from `schedule.after_failure`: a closed route defers it without using an attempt, a
transient failure retries with backoff (never sooner than the backend's Retry-After), anything else ends `failed`.
An outcome the store cannot record yet (a full disk) is kept and written again with backoff, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nanofleet.agent.errors import QueueDiskFull, QueueUnavailable
from nanofleet.agent.queue.schedule import RetryPolicy, after_failure, plan
from nanofleet.agent.queue.store import QueueStore
from nanofleet.backoff import backoff
from nanofleet.tasks import TaskSupervisor

log = logging.getLogger("nanofleet.agent.queue")
DEFER_CAP_S = 5.0   # a closed route is looked at again at least this often (the breaker decides when to probe)
SETTLE_RETRY_S, SETTLE_RETRY_CAP_S = 0.2, 10.0  # recording an outcome the store refused (e.g. a full disk)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["done", "defer", "retry", "fail"]
    route: str = "queue"
    reason: str = ""
    result: dict[str, Any] | None = None
    retry_after: float | None = None
    error: str = ""


class Runner(Protocol):
    def ready(self, request: dict[str, Any]) -> bool:
        """Whether a route would serve this queued request now (pure: no I/O)."""
        ...

    async def run(self, rid: str, request: dict[str, Any]) -> Outcome: ...


class Drainer:
    def __init__(self, store: QueueStore, runner: Runner, supervisor: TaskSupervisor, *, concurrency: int = 2,
                 retry: RetryPolicy | None = None, tick_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.runner = runner
        self.supervisor = supervisor
        self.concurrency = max(1, concurrency)
        self.retry = retry or RetryPolicy()
        self.tick_s = tick_s
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self._running: set[str] = set()
        self._cursor: str | None = None
        self._kick = asyncio.Event()

    def start(self) -> None:
        self.supervisor.spawn(self._loop, "queue-drainer", on_death="restart")

    def kick(self) -> None:
        """A route may have opened: look at the queue now rather than at the next tick."""
        self._kick.set()

    async def _loop(self) -> None:
        while True:
            await self.drain_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.tick_s)
            self._kick.clear()

    async def drain_once(self) -> int:
        """Start what may start now; returns how many entries were started."""
        free = self.concurrency - len(self._running)
        if free <= 0 or self.store.depth == 0:
            return 0
        cands = [c for c in await self.store.candidates(per_app=free) if c.id not in self._running]
        started = 0
        for cand in plan(cands, self.clock(), self._cursor, free):
            request = await self.store.request(cand.id)
            if request is None or not self.runner.ready(request):
                continue  # its route is closed: FIFO keeps the app's later entries behind it
            self._cursor = cand.app
            self._running.add(cand.id)
            task = self.supervisor.spawn(functools.partial(self._run_one, cand.id), "queue-entry", on_death="log",
                                         forever=False)
            task.add_done_callback(functools.partial(self._finished, cand.id))
            started += 1
        return started

    def _finished(self, rid: str, _task: object = None) -> None:
        self._running.discard(rid)
        self._kick.set()  # capacity freed

    async def _run_one(self, rid: str) -> None:
        claimed = await self.store.claim(rid)
        if claimed is None:
            return  # cancelled or expired meanwhile
        request, attempts, restarts = claimed
        if restarts > self.retry.max_restarts:  # the agent died each time it ran this one: do not run it again
            await self.store.fail(rid, "queue", "crashed_while_running",
                                  f"the agent stopped {restarts} times while running it; not retried")
            return
        try:
            outcome = await self.runner.run(rid, request)
        except Exception as exc:  # a bug in the run: the entry stays, retried with backoff, and it is seen
            log.exception("queued request %s: run failed", rid)
            self.counts["run_errors"] += 1
            outcome = Outcome("retry", reason="internal_error", error=f"{type(exc).__name__}: {exc}")
        await self._settle_durably(rid, attempts, outcome)

    async def _settle_durably(self, rid: str, attempts: int, outcome: Outcome) -> None:
        """Record the outcome; a commit the store refuses (full disk, a failed write) is tried again with backoff,
        the entry held `running` and its slot taken meanwhile (a full disk slows draining; it loses no result).
        Only a closed store ends it: the entry is then run again after the restart, as after a crash."""
        failures = 0
        while True:
            try:
                await self._settle(rid, attempts, outcome)
                return
            except (QueueDiskFull, QueueUnavailable) as exc:
                if self.store.closed:
                    raise
                self.store.counts["settle_retries"] += 1  # shown in /v1/status queue.counters
                if failures % 10 == 0:
                    log.warning("queued request %s: its %s could not be recorded (%s); trying again", rid,
                                outcome.kind, exc.message)
                delay = backoff(failures, SETTLE_RETRY_S, SETTLE_RETRY_CAP_S)
                failures += 1
                await asyncio.sleep(delay)

    async def _settle(self, rid: str, attempts: int, outcome: Outcome) -> None:
        if outcome.kind == "done":
            await self.store.finish(rid, outcome.route, outcome.reason, outcome.result or {})
        elif outcome.kind == "defer":
            delay = min(max(outcome.retry_after or self.tick_s, self.tick_s), DEFER_CAP_S)
            await self.store.requeue(rid, delay, outcome.reason, refund_attempt=True)
        else:
            verdict = after_failure(attempts, outcome.kind == "retry", outcome.retry_after, self.retry,
                                    outcome.reason)
            if verdict.action == "retry":
                await self.store.requeue(rid, verdict.delay_s, outcome.reason)
            else:
                await self.store.fail(rid, outcome.route, verdict.reason, outcome.error or verdict.reason)
        self.counts[outcome.kind] += 1

