"""The one way a long-lived asyncio task is started in agent, controller and gateway: never silently dead.

`TaskSupervisor.spawn(coro_factory, name)` runs a task with a done-callback. When it ends with an error (or returns
while it was meant to run for good) the error is logged with its traceback, counted and kept in `deaths` (shown in
/v1/status, telemetry and health), and then, by the task's `on_death`:
- `"restart"`: started again after a growing delay (nanofleet.backoff) — for loops that must keep running;
- `"fatal"`: `on_fatal(name, exc)` is called, which stops the process (so a supervisor restarts it);
- `"log"`: only recorded — for one-shot tasks whose failure is already visible elsewhere.
Cancellation by `stop()` is not a death.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from nanofleet.backoff import Backoff

OnDeath = Literal["restart", "fatal", "log"]
log = logging.getLogger("nanofleet.tasks")


@dataclass(slots=True)
class Death:
    name: str
    error: str
    at: float
    count: int


class TaskSupervisor:
    def __init__(self, part: str, *, on_fatal: Callable[[str, BaseException], None] | None = None,
                 restart_base_s: float = 0.5, restart_cap_s: float = 30.0) -> None:
        self.part = part
        self.on_fatal = on_fatal
        self.deaths: dict[str, Death] = {}
        self._tasks: dict[asyncio.Task[Any], tuple[str, Callable[[], Awaitable[Any]], OnDeath, Backoff]] = {}
        self._restarts: set[asyncio.Task[Any]] = set()
        self._base, self._cap = restart_base_s, restart_cap_s
        self._stopping = False

    @property
    def running(self) -> list[str]:
        return sorted(name for name, *_ in self._tasks.values())

    def spawn(self, factory: Callable[[], Awaitable[Any]], name: str, *, on_death: OnDeath = "restart",
              forever: bool = True) -> asyncio.Task[Any]:
        """Start `factory()` as a task. `forever`: a normal return is a death too (a loop that must not end)."""
        return self._start(name, factory, on_death, Backoff(self._base, self._cap), forever)

    def _start(self, name: str, factory: Callable[[], Awaitable[Any]], on_death: OnDeath, backoff: Backoff,
               forever: bool) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(factory())
        task.set_name(f"{self.part}:{name}")
        self._tasks[task] = (name, factory, on_death, backoff)
        task.add_done_callback(lambda t: self._done(t, forever))
        return task

    def _done(self, task: asyncio.Task[Any], forever: bool) -> None:
        name, factory, on_death, backoff = self._tasks.pop(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            if not forever or self._stopping:
                return
            exc = RuntimeError(f"task {name} returned but must run until stopped")
        prev = self.deaths.get(name)
        self.deaths[name] = Death(name, f"{type(exc).__name__}: {exc}", time.time(), (prev.count if prev else 0) + 1)
        log.error("%s task %s died (%s)", self.part, name, on_death, exc_info=exc)
        if self._stopping:
            return
        if on_death == "fatal":
            if self.on_fatal is not None:
                self.on_fatal(name, exc)
        elif on_death == "restart":
            delay = backoff.next()
            log.warning("%s task %s restarts in %.1fs", self.part, name, delay)

            async def later() -> None:
                await asyncio.sleep(delay)
                if not self._stopping:
                    self._start(name, factory, on_death, backoff, forever)

            waiter = asyncio.ensure_future(later())
            self._restarts.add(waiter)
            waiter.add_done_callback(self._restarts.discard)

    def status(self) -> dict[str, Any]:
        """For /v1/status, health and the dashboard: what runs and what died (last error, how often)."""
        return {"running": self.running,
                "deaths": {n: {"error": d.error, "at": d.at, "count": d.count} for n, d in self.deaths.items()}}

    async def stop(self) -> list[BaseException]:
        """Cancel every task and wait for them; errors they raise while stopping are logged and returned, so the
        caller can surface them (its own stop() raises them) rather than lose them."""
        self._stopping = True
        for waiter in list(self._restarts):
            waiter.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        errors: list[BaseException] = []
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("%s task %s failed while stopping", self.part, task.get_name(), exc_info=result)
                errors.append(result)
        return errors
