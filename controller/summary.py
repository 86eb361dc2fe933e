"""`Cached`: a fleet-wide figure computed in the background at most once a second, so the pages that show it cost
the same at 1,000 and 10,000 devices (bench/bench_dashboard.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Cached"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class Cached(Generic[T]):
    """A fleet-wide figure computed at most every `max_age_s`, served meanwhile (stale while revalidating): the
    overview's aggregates scan every device, so they are computed once a second in the background rather than
    once per page view — a page then costs the same at 1,000 and 10,000 devices. The first call computes in the
    caller; later calls past `max_age_s` return the last value and start one refresh on a thread of its own. A
    refresh that fails is logged, counted (`failures`, `last_error`, `on_failure`) and retried by the next call; a
    value older than `stale_limit_s` is never served: the caller computes (and sees the error)."""

    def __init__(self, compute: Callable[[], T], *, max_age_s: float = 1.0, stale_limit_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, name: str = "summary",
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self._compute, self._clock, self.name, self._on_failure = compute, clock, name, on_failure
        self.max_age_s, self.stale_limit_s = max_age_s, stale_limit_s
        self._lock = threading.Lock()
        self._value: tuple[float, T] | None = None
        self._refreshing = False
        self.refreshes = 0
        self.failures = 0
        self.last_error: str | None = None

    def get(self) -> T:
        now = self._clock()
        with self._lock:
            current = self._value
            if current is not None and now - current[0] <= self.max_age_s:
                return current[1]
            if current is not None and now - current[0] <= self.stale_limit_s:
                if not self._refreshing:
                    self._refreshing = True
                    threading.Thread(target=self._refresh, name=f"{self.name}-refresh", daemon=True).start()
                return current[1]
        value = self._compute()  # none yet, or too old to show: the caller waits (and gets any error)
        with self._lock:
            self._value = (now, value)
        return value

    def _refresh(self) -> None:
        started = self._clock()
        try:
            value = self._compute()
        except Exception as exc:  # logged and counted here; the next get() retries, a too-old value is never shown
            log.exception("%s refresh failed", self.name)
            with self._lock:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._refreshing = False
            if self._on_failure is not None:
                self._on_failure(exc)
            return
        with self._lock:
            self._value = (started, value)
            self.refreshes += 1
            self._refreshing = False
