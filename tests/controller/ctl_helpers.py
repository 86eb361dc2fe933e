"""Helpers for controller tests: async waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nanofleet.config import FleetConfig, parse_fleet


async def until(predicate: Callable[[], object], within: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


def fleet(name: str, broker_url: str, extra: str = "") -> FleetConfig:
    return parse_fleet(f"fleet: {name}\nbroker: {{url: {broker_url}}}\n{extra}")
