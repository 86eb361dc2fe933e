"""The one retry delay of the project: exponential, capped, with equal jitter.

Every retry loop (MQTT reconnects, the gateway's upstream retries, model downloads, the offline queue's drain)
takes its delay from here, so they all spread the same way: equal jitter keeps the exponential growth (a retry never
comes sooner than half its step) while spreading a fleet that lost its broker at once over the other half.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def backoff(attempt: int, base: float, cap: float, rand: float | None = None) -> float:
    """Delay before retry `attempt` (0-based): half of min(cap, base·2^attempt), plus `rand` ∈ [0, 1) of the other
    half (`random.random()` when not given, injected by tests)."""
    ceiling = min(cap, base * (2 ** min(max(attempt, 0), 30)))
    r = random.random() if rand is None else rand
    return ceiling / 2 + ceiling / 2 * r


@dataclass(slots=True)
class Backoff:
    """A retry loop's state: `next()` gives the delay and counts the attempt, `reset()` after a success."""

    base: float
    cap: float
    attempt: int = field(default=0)

    def next(self) -> float:
        delay = backoff(self.attempt, self.base, self.cap)
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0
