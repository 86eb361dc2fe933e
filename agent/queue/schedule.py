"""The queue's pure decisions — which entries drain next, whether a failed attempt is retried and when, what has
expired — with no I/O and no clock of their own (times are arguments), so they are tested with hypothesis.

- FIFO per app: an app's entries start in the order they were queued; an entry waiting out its backoff holds the
  ones queued after it by the same app (a later entry never overtakes an earlier one).
- Round-robin across apps: each pass takes one entry per app, starting after the app served last, so one app's
  burst cannot starve another.
- Retries: transient failures are retried up to `max_attempts` with the project's backoff (nanofleet.backoff),
  never sooner than the backend's own Retry-After; anything else is terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nanofleet.backoff import backoff

TERMINAL = ("done", "failed", "expired", "cancelled")
STATES = ("queued", "running", *TERMINAL)


@dataclass(frozen=True, slots=True)
class Candidate:
    """What scheduling needs of a queued entry (times in seconds on the caller's clock)."""

    id: str
    app: str
    seq: int            # enqueue order (SQLite rowid)
    not_before: float   # backoff: not before this time
    expires_at: float   # TTL


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    max_restarts: int = 20      # agent crashes while the entry ran: past this, the entry is taken for the cause
    base_s: float = 1.0
    cap_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["retry", "fail"]
    delay_s: float = 0.0
    reason: str = ""


def plan(queued: Sequence[Candidate], now: float, after_app: str | None, limit: int) -> list[Candidate]:
    """Up to `limit` entries to start now, in start order. `queued` are the queued entries (any order, at least
    the first few of each app); `after_app` is the app served last (the round-robin cursor)."""
    if limit <= 0:
        return []
    per_app: dict[str, list[Candidate]] = {}
    for c in sorted(queued, key=lambda c: c.seq):
        per_app.setdefault(c.app, []).append(c)
    # each app's ready prefix: FIFO means an entry not ready (backoff) or expired stops its app's line there
    ready: dict[str, list[Candidate]] = {}
    for app, line in per_app.items():
        prefix = []
        for c in line:
            if c.not_before > now or c.expires_at <= now:
                break
            prefix.append(c)
        if prefix:
            ready[app] = prefix
    apps = sorted(ready)
    if after_app is not None:
        later = [a for a in apps if a > after_app]
        apps = later + [a for a in apps if a <= after_app]
    out: list[Candidate] = []
    depth = 0
    while len(out) < limit:
        took = False
        for app in apps:
            line = ready[app]
            if depth < len(line):
                out.append(line[depth])
                took = True
                if len(out) == limit:
                    break
        if not took:
            break
        depth += 1
    return out


def expired(c: Candidate, now: float) -> bool:
    return c.expires_at <= now


def after_failure(attempts: int, transient: bool, retry_after: float | None, policy: RetryPolicy, reason: str,
                  rand: float | None = None) -> Verdict:
    """What follows attempt number `attempts` (1-based) failing: retry after a delay, or fail for good."""
    if not transient:
        return Verdict("fail", reason=reason)
    if attempts >= policy.max_attempts:
        return Verdict("fail", reason=f"{reason} (gave up after {attempts} attempts)")
    delay = backoff(attempts - 1, policy.base_s, policy.cap_s, rand)
    if retry_after is not None and retry_after > delay:
        delay = float(retry_after)
    return Verdict("retry", delay, reason)
