"""Helpers for controller tests (`until` is the shared one from tests/conftest.py)."""

from __future__ import annotations

from nanofleet.config import FleetConfig, parse_fleet
from tests.conftest import until

__all__ = ["fleet", "until"]


def fleet(name: str, broker_url: str, extra: str = "") -> FleetConfig:
    return parse_fleet(f"fleet: {name}\nbroker: {{url: {broker_url}}}\n{extra}")
