"""classify_thermal on tables and properties (monotonic in temperature; throttling floors at MODERATE)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.thermal import (
    CRITICAL,
    EMERGENCY,
    LIGHT,
    MODERATE,
    NONE,
    SEVERE,
    SHUTDOWN,
    TripPoint,
    classify_device,
    classify_thermal,
    level_name,
    thresholds_from_trips,
)

PI = (TripPoint(80, "passive"), TripPoint(90, "hot"), TripPoint(100, "critical"))


@pytest.mark.parametrize(
    ("temp", "trips", "expected"),
    [
        (None, PI, NONE),
        (float("nan"), PI, NONE),
        (40, PI, NONE),
        (65, PI, LIGHT),
        (72.5, PI, MODERATE),
        (79.9, PI, MODERATE),
        (80, PI, SEVERE),
        (90, PI, CRITICAL),
        (98, PI, EMERGENCY),
        (100, PI, SHUTDOWN),
        (130, PI, SHUTDOWN),
        # defaults without trips: passive 80, critical 95
        (64.9, (), NONE),
        (65, (), LIGHT),
        (80, (), SEVERE),
        (87.5, (), CRITICAL),
        (93, (), EMERGENCY),
        (95, (), SHUTDOWN),
        # only a critical trip: passive = critical - 15
        (70, (TripPoint(85, "critical"),), SEVERE),
        (85, (TripPoint(85, "critical"),), SHUTDOWN),
        # only a passive trip
        (60, (TripPoint(60, "passive"),), SEVERE),
    ],
)
def test_table(temp: float | None, trips: tuple[TripPoint, ...], expected: int) -> None:
    assert classify_thermal(temp, trips) == expected


def test_throttled_is_at_least_moderate_and_names() -> None:
    assert classify_thermal(30, PI, throttled=True) == MODERATE
    assert classify_thermal(99, PI, throttled=True) == EMERGENCY
    assert classify_device([(40, PI), (81, ())]) == SEVERE
    assert classify_device([]) == NONE
    assert [level_name(i) for i in range(7)] == ["none", "light", "moderate", "severe", "critical", "emergency",
                                                 "shutdown"]


_kinds = st.sampled_from(["passive", "active", "hot", "critical", "junk"])
trip_lists = st.lists(
    st.builds(TripPoint, st.one_of(st.floats(-100, 300), st.just(float("nan"))), _kinds),
    max_size=5,
)


@given(trip_lists)
def test_thresholds_strictly_ascending(trips: list[TripPoint]) -> None:
    t = thresholds_from_trips(trips).as_tuple()
    assert all(a < b for a, b in itertools.pairwise(t)), t


@given(st.floats(-50, 200), st.floats(-50, 200), trip_lists, st.booleans())
def test_monotonic_in_temperature(a: float, b: float, trips: list[TripPoint], throttled: bool) -> None:
    lo, hi = sorted((a, b))
    assert classify_thermal(lo, trips, throttled=throttled) <= classify_thermal(hi, trips, throttled=throttled)
    assert NONE <= classify_thermal(hi, trips) <= SHUTDOWN
