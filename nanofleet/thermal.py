"""Classify a device's temperature on Android's thermal scale (PowerManager.THERMAL_STATUS_*): pure, no I/O.

Linux thermal zones publish trip points: `passive` (the kernel starts throttling), `hot`, `critical` (the kernel
shuts down). Android's levels are laid out around them: SEVERE where throttling starts, SHUTDOWN at the critical
trip, the others between; LIGHT and MODERATE warn before throttling. A zone without trips gets a Raspberry Pi-like
default (throttling at 80 °C, critical at 95 °C). Active throttling (cpufreq capped, Pi firmware flags) means at
least MODERATE whatever the temperature says.

Shared: the agent's collector classifies real sensors with it, the simulator its simulated ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nanofleet.protos import fleet_pb2

__all__ = ["CRITICAL", "DEFAULT_CRITICAL_C", "DEFAULT_PASSIVE_C", "EMERGENCY", "LIGHT", "MODERATE", "NONE", "SEVERE",
           "SHUTDOWN", "Thresholds", "TripPoint", "classify_device", "classify_thermal", "level_name",
           "thresholds_from_trips"]
NONE, LIGHT, MODERATE, SEVERE, CRITICAL, EMERGENCY, SHUTDOWN = range(7)
DEFAULT_PASSIVE_C = 80.0
DEFAULT_CRITICAL_C = 95.0
assert fleet_pb2.THERMAL_LEVEL_SHUTDOWN == SHUTDOWN and fleet_pb2.THERMAL_LEVEL_MODERATE == MODERATE


@dataclass(frozen=True, slots=True)
class TripPoint:
    temp_c: float
    kind: str  # passive | active | hot | critical


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Lowest temperature of each level from LIGHT to SHUTDOWN, strictly ascending."""

    light: float
    moderate: float
    severe: float
    critical: float
    emergency: float
    shutdown: float

    def as_tuple(self) -> tuple[float, ...]:
        return (self.light, self.moderate, self.severe, self.critical, self.emergency, self.shutdown)


def thresholds_from_trips(trips: Iterable[TripPoint] = ()) -> Thresholds:
    by_kind: dict[str, list[float]] = {}
    for trip in trips:
        if trip.temp_c == trip.temp_c and -50 < trip.temp_c < 250:  # drop NaN and nonsense
            by_kind.setdefault(trip.kind, []).append(trip.temp_c)
    passive = min(by_kind["passive"]) if "passive" in by_kind else None
    crit = min(by_kind["critical"]) if "critical" in by_kind else None
    if passive is None and crit is None:
        passive, crit = DEFAULT_PASSIVE_C, DEFAULT_CRITICAL_C
    elif passive is None:
        passive = crit - 15  # type: ignore[operator]
    elif crit is None or crit <= passive + 4:
        crit = passive + 15
    assert passive is not None and crit is not None
    hot = min(by_kind["hot"]) if "hot" in by_kind else None
    critical = hot if hot is not None and passive < hot < crit - 2 else (passive + crit) / 2
    emergency = max(critical + 1, crit - 2)
    return Thresholds(passive - 15, passive - 7.5, passive, critical, min(emergency, crit - 0.5), crit)


def classify_thermal(temp_c: float | None, trips: Iterable[TripPoint] = (), *, throttled: bool = False) -> int:
    """ThermalLevel (0..6) of one sensor: how many level thresholds `temp_c` has reached."""
    level = NONE
    if temp_c is not None and temp_c == temp_c:
        level = sum(1 for t in thresholds_from_trips(trips).as_tuple() if temp_c >= t)
    return max(level, MODERATE) if throttled else level


def classify_device(zones: Iterable[tuple[float, Iterable[TripPoint]]], *, throttled: bool = False) -> int:
    """The device's level: the worst of its zones (each judged against its own trips)."""
    worst = max((classify_thermal(t, trips) for t, trips in zones), default=NONE)
    return max(worst, MODERATE) if throttled else worst


def level_name(level: int) -> str:
    return fleet_pb2.ThermalLevel.Name(level).removeprefix("THERMAL_LEVEL_").lower()
