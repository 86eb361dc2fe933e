"""Small statistics shared by the benchmarks: percentiles and interleaved side-by-side timing."""

from __future__ import annotations

import time
from collections.abc import Callable


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 3,
                budget_s: float = 60.0) -> dict[str, list[float]]:
    """Time each contender once per round, in turn, so machine noise hits all of them alike; seconds per call."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    deadline = time.monotonic() + budget_s
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            break
    return times
