"""The gateway's decisions as pure functions: policy, budgets, retry delays, cost. No I/O, no clock reads (the
caller passes `now`), so every branch is unit- and property-tested. The retry backoff is the project's one rule,
nanofleet.backoff."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanofleet.config import Price, Profile

_RETRY_IN = re.compile(r"retry in\s+([0-9]+(?:\.[0-9]+)?)\s*(ms|s)\b", re.IGNORECASE)
_DURATION_JSON = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)s\s*$")
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
MAX_RETRY_DELAY = 3600.0


def utc_day(now: float) -> str:
    """`YYYY-MM-DD` of a unix time, in UTC: budgets and usage rows roll over at UTC midnight."""
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d")


def seconds_until_next_utc_day(now: float) -> float:
    """Seconds from `now` to the next UTC midnight (always > 0): when a daily budget opens again."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
    return max(midnight - now, 0.001)


def check_policy(profile: Profile, device_id: str, app_id: str, sensitive: bool) -> str | None:
    """The reason the gateway must refuse this request, or None. Evaluated whatever the device claims."""
    routing = profile.routing
    if routing.cloud == "denied":
        return f"cloud denied by policy for device {device_id!r}"
    if sensitive:
        return "request marked sensitive: it must not leave the device"
    rule = routing.apps.get(app_id) if app_id else None
    if rule is not None and rule.privacy == "sensitive":
        return f"app {app_id!r} is sensitive by policy: its requests must not leave the device"
    if rule is not None and rule.mode == "local_only":
        return f"app {app_id!r} is local_only by policy"
    return None


@dataclass(frozen=True)
class Limits:
    """Tokens per UTC day; None means unlimited."""

    device: int | None
    app: int | None
    fleet: int | None


@dataclass(frozen=True)
class Used:
    device: int
    app: int
    fleet: int


BUSY_RETRY_S = 1.0  # when only calls in flight hold what is left of a budget


@dataclass(frozen=True)
class BudgetRefusal:
    scope: str  # device | app | fleet
    used: int  # settled tokens today
    reserved: int  # held by calls in flight (on every gateway)
    limit: int
    need: int  # the least this call needs: its prompt bound + 1 output token
    retry_after: float

    @property
    def message(self) -> str:
        if self.retry_after == BUSY_RETRY_S:
            return (f"{self.scope} cloud budget busy: {self.reserved} of the {self.limit - self.used} tokens left "
                    f"today (UTC) are held by calls in flight; retry in {math.ceil(self.retry_after)}s")
        return (f"{self.scope} cloud budget exhausted: {self.used} of {self.limit} tokens used today (UTC), this call "
                f"needs up to {self.need}; retry in {math.ceil(self.retry_after)}s")


def limits_for(profile: Profile, app_id: str, app_default: int | None, fleet_limit: int | None) -> Limits:
    """The budgets that apply to one request: the device's, its app's (rule, else the fleet default), the fleet's."""
    rule = profile.routing.apps.get(app_id) if app_id else None
    app_limit = rule.tokens_per_day if rule is not None and rule.tokens_per_day is not None else app_default
    return Limits(device=profile.routing.cloud_budget.tokens_per_day, app=app_limit, fleet=fleet_limit)


def fit_output(scope: str, used: int, reserved: int, limit: int, prompt: int, wanted: int,
               now: float) -> int | BudgetRefusal:
    """The output tokens a call may reserve on one budget: what it wants, capped so that the settled tokens, the
    reservations in flight, its prompt bound and its output stay within `limit`; a refusal when not even one output
    token fits — retry at UTC midnight, or in BUSY_RETRY_S when only calls in flight stand in the way."""
    room = limit - used - reserved - prompt
    if room >= 1:
        return min(wanted, room)
    busy = used + prompt + 1 <= limit
    return BudgetRefusal(scope, used, reserved, limit, prompt + 1,
                         BUSY_RETRY_S if busy else seconds_until_next_utc_day(now))


def retry_delay(message: str | None, details: Any = None, header: str | None = None) -> float | None:
    """Seconds the upstream asked us to wait, from google.rpc.RetryInfo ("36s"), the message ("Please retry in
    36.7s") or a Retry-After header; the longest wins (RetryInfo is truncated to whole seconds)."""
    found: list[float] = []
    for item in _iter_details(details):
        if item.get("@type") == _RETRY_INFO:
            delay = item.get("retryDelay")
            if isinstance(delay, str) and (m := _DURATION_JSON.match(delay)):
                found.append(float(m.group(1)))
    if message and (m := _RETRY_IN.search(message)):
        found.append(float(m.group(1)) / (1000 if m.group(2).lower() == "ms" else 1))
    if header:
        try:
            value = float(header.strip())
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            found.append(max(value, 0.0))
    return min(max(found), MAX_RETRY_DELAY) if found else None


def _iter_details(details: Any) -> list[dict[str, Any]]:
    """The `details` list of a Google error body, whatever level of the body was passed."""
    if isinstance(details, list) and len(details) == 1 and isinstance(details[0], dict) and "error" in details[0]:
        details = details[0]
    if isinstance(details, dict):
        details = details.get("error", details)
        details = details.get("details") if isinstance(details, dict) else None
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, dict)]


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The price of `model`, also for versioned names (`gemini-2.5-flash-001` → `gemini-2.5-flash`)."""
    name = model.removeprefix("models/")
    if name in prices:
        return prices[name]
    matches = [key for key in prices if name.startswith(key + "-")]
    return prices[max(matches, key=len)] if matches else None


def cost_usd(model: str, input_tokens: int, output_tokens: int, prices: Mapping[str, Price]) -> float:
    """Cost from the per-million price table; an unpriced model costs 0 (and is visible as such in usage)."""
    price = price_for(model, prices)
    if price is None:
        return 0.0
    return (input_tokens * price.input + output_tokens * price.output) / 1_000_000
