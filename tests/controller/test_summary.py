"""`Cached` (controller/summary.py): computed once, then served while a background refresh replaces it; a failed
refresh is logged, counted and retried; a value past its stale limit is never served."""

from __future__ import annotations

import logging
import threading

import pytest

from nanofleet.controller.summary import Cached
from tests.conftest import wait_for


class Source:
    def __init__(self) -> None:
        self.n = 0
        self.fail: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> int:
        self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        self.n += 1
        return self.n


def test_served_fresh_then_stale_while_one_refresh_runs() -> None:
    now = [100.0]
    src = Source()
    cache = Cached(src, max_age_s=1.0, stale_limit_s=30.0, clock=lambda: now[0])
    assert cache.get() == 1 and cache.get() == 1 and src.n == 1  # computed once, in the caller
    now[0] += 2.0
    src.gate.clear()  # hold the refresh so we can see the stale value served meanwhile
    assert cache.get() == 1 and cache.get() == 1  # stale but within the limit: served at once
    src.gate.set()
    wait_for(lambda: cache.refreshes == 1, what="the background refresh")
    assert cache.get() == 2 and src.n == 2  # one refresh for both stale reads


def test_a_failed_refresh_is_logged_counted_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    src = Source()
    seen: list[BaseException] = []
    cache = Cached(src, max_age_s=1.0, stale_limit_s=30.0, clock=lambda: now[0], name="fleet-summary",
                   on_failure=seen.append)
    assert cache.get() == 1
    now[0] += 5
    src.fail = RuntimeError("disk gone")
    with caplog.at_level(logging.ERROR, logger="nanofleet.controller.summary"):
        assert cache.get() == 1
        wait_for(lambda: cache.failures == 1, what="the refresh to fail")
    assert cache.last_error == "RuntimeError: disk gone" and [str(e) for e in seen] == ["disk gone"]
    assert any("fleet-summary refresh failed" in r.getMessage() for r in caplog.records)
    src.fail = None
    assert cache.get() == 1  # the next read retries
    wait_for(lambda: cache.refreshes == 1, what="the retried refresh")
    assert cache.get() == 2


def test_a_value_past_its_stale_limit_is_never_served() -> None:
    now = [0.0]
    src = Source()
    cache = Cached(src, max_age_s=1.0, stale_limit_s=30.0, clock=lambda: now[0])
    assert cache.get() == 1
    now[0] += 31
    src.fail = RuntimeError("store closed")
    with pytest.raises(RuntimeError, match="store closed"):
        cache.get()  # computed in the caller, whose error it sees
    src.fail = None
    assert cache.get() == 2
