"""Per-model figures a rollout's gate compares (requests, errors, p95 latency), counted from when a model started
serving on this device: a new model starts from zero, so its figures are its own."""

from __future__ import annotations

from collections import deque


class ModelStats:
    """Requests the local model served, how many failed, and the latency of the last `window` of them."""

    def __init__(self, sha256: str = "", window: int = 256) -> None:
        self.sha256 = sha256
        self.requests = 0
        self.errors = 0
        self._latencies: deque[float] = deque(maxlen=window)

    def record(self, seconds: float, ok: bool) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
        self._latencies.append(seconds * 1000)

    @property
    def p95_latency_ms(self) -> float:
        if not self._latencies:
            return 0.0
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
