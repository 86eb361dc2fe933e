"""A circuit breaker for a remote route (the fleet gateway): pure state, the clock passed in, so it is tested
exhaustively without sleeping.

    closed ──failure×threshold──▶ open ──cooldown elapsed──▶ half-open (one probe call admitted)
      ▲                            ▲                            │
      └──────── probe succeeds ────┼────────────────────────────┘
                                   └─ probe fails: open again, cooldown doubled (capped at `max_cooldown`)

While open the router sees the route as unreachable; once the cooldown has elapsed it is offered again, but only one
call at a time (the probe) goes through until one succeeds. A probe that ends without a verdict (cancelled) frees
the slot for the next caller. Failures of calls started before the breaker opened do not lengthen the cooldown:
only a failed probe does, so a burst of in-flight calls failing together counts as one outage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class CircuitBreaker:
    cooldown: float = 5.0          # the first open period, seconds
    max_cooldown: float = 60.0     # the cap on the doubling
    failure_threshold: int = 1     # consecutive failures (while closed) that open it
    failures: int = 0
    open_until: float | None = None  # None: closed
    current_cooldown: float = 0.0
    probing: bool = False          # the half-open probe call is in flight

    def state(self, now: float) -> State:
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half_open"

    def available(self, now: float) -> bool:
        """Would `acquire` admit a call now? (no side effect: for the router)"""
        st = self.state(now)
        return st == "closed" or (st == "half_open" and not self.probing)

    def retry_in(self, now: float) -> float:
        """Seconds until a call may go through again (0 when one may now)."""
        if self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - now)

    def acquire(self, now: float) -> bool | None:
        """Admit a call? None: refused; False: admitted; True: admitted as the half-open probe."""
        st = self.state(now)
        if st == "closed":
            return False
        if st == "half_open" and not self.probing:
            self.probing = True
            return True
        return None

    def success(self) -> None:
        self.failures, self.open_until, self.current_cooldown, self.probing = 0, None, 0.0, False

    def failure(self, now: float, probe: bool) -> None:
        if probe:
            self.probing = False
            self.current_cooldown = min(max(self.current_cooldown, self.cooldown) * 2, self.max_cooldown)
            self.open_until = now + self.current_cooldown
            return
        if self.open_until is not None:
            return  # already open: a straggler of the same outage
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.current_cooldown = min(self.cooldown, self.max_cooldown)
            self.open_until = now + self.current_cooldown

    def release(self, probe: bool) -> None:
        """A call ended with no verdict on the route (cancelled): a probe's slot goes to the next caller."""
        if probe:
            self.probing = False
