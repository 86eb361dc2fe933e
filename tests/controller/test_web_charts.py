"""Pure parts of the dashboard: SVG charts (any input gives well-formed, in-bounds SVG), ticks, formatting."""

from __future__ import annotations

import itertools
import math
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofleet.controller.web.charts import (
    Series,
    bar_chart,
    format_tick,
    line_chart,
    meter,
    nice_ticks,
    split_segments,
)
from nanofleet.controller.web.format import fmt_mb, fmt_num, relative_time, state_badge

SVG = "{http://www.w3.org/2000/svg}"
values = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**12, 10**12))
points = st.lists(st.tuples(st.integers(0, 2**41), values), max_size=60)


def coordinates(svg: str) -> list[float]:
    root = ET.fromstring(svg)
    out: list[float] = []
    for el in root.iter():
        for attr in ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width", "height"):
            if attr in el.attrib:
                out.append(float(el.attrib[attr]))
        if el.tag == f"{SVG}polyline":
            for pair in el.attrib["points"].split():
                out.extend(float(v) for v in pair.split(","))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(points, min_size=1, max_size=3), st.text(max_size=20), st.one_of(st.none(), st.floats(-1e6, 1e6)),
       st.one_of(st.none(), st.floats(-1e6, 1e6)))
def test_line_chart_is_valid_svg_inside_its_viewbox(series_points, title, y_min, y_max) -> None:
    svg = line_chart([Series(f"s{i}", p) for i, p in enumerate(series_points)], title=title, unit="%",
                     y_min=y_min, y_max=y_max, width=400, height=150)
    coords = coordinates(svg)  # parses: well-formed XML whatever the title holds
    assert all(math.isfinite(c) for c in coords)
    assert all(-1 <= c <= 401 for c in coords)


@given(st.floats(-1e9, 1e9), st.floats(-1e9, 1e9), st.integers(2, 10))
def test_nice_ticks_cover_the_range_in_order(lo, hi, count) -> None:
    ticks = nice_ticks(lo, hi, count)
    assert ticks[0] <= min(lo, hi) and ticks[-1] >= max(lo, hi)
    assert all(b > a for a, b in itertools.pairwise(ticks))
    assert 2 <= len(ticks) <= 4 * count + 3


@pytest.mark.parametrize(("lo", "hi", "expected"), [(0, 100, [0, 20, 40, 60, 80, 100]), (41.2, 47.9, [40, 42, 44,
                         46, 48]), (0, 0.35, [0, 0.1, 0.2, 0.30000000000000004, 0.4])])
def test_nice_ticks_examples(lo, hi, expected) -> None:
    assert nice_ticks(lo, hi) == pytest.approx(expected)


def test_format_tick_drops_float_noise() -> None:
    assert format_tick(0.30000000000000004, 0.1) == "0.3"
    assert format_tick(40.0, 20) == "40" and format_tick(-0.0, 1) == "0"


def test_gap_breaks_the_line() -> None:
    pts = [(0, 1.0), (10_000, 2.0), (20_000, 3.0), (200_000, 4.0), (210_000, 5.0)]
    assert [len(s) for s in split_segments(pts)] == [3, 2]
    assert [len(s) for s in split_segments([(0, 1.0), (1, None), (2, 3.0), (3, float("nan"))])] == [1, 1]
    assert split_segments([]) == []
    svg = line_chart([Series("cpu", pts)], title="CPU", y_min=0, y_max=100)
    assert svg.count("<polyline") == 2


def test_single_point_and_empty_charts() -> None:
    one = line_chart([Series("t", [(1_700_000_000_000, 42.0)])], title="Temp", unit="°C")
    assert "<circle" in one and "last 42.0 °C" in one
    empty = line_chart([Series("t", [])], title="Temp")
    assert "no data in this window" in empty and "<polyline" not in empty


def test_values_outside_a_fixed_range_are_clamped() -> None:
    svg = line_chart([Series("cpu", [(0, -50.0), (1000, 500.0)])], title="CPU", y_min=0, y_max=100, height=180)
    ys = [float(v.split(",")[1]) for v in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert ys == [22 + 134, 22.0]  # bottom and top of the plot area


def test_labels_are_escaped() -> None:
    svg = line_chart([Series("<b>", [(0, 1.0), (1, 2.0)]), Series("x", [])], title="<script>x</script>")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;" in svg
    bars = bar_chart([("<v1>", 3), ("v2", 1)], title="t", highlight="v2")
    assert "&lt;v1&gt;" in bars and ET.fromstring(bars) is not None


def test_bar_chart_scales_to_the_largest() -> None:
    svg = bar_chart([("v2", 4), ("v1", 2), ("bad", float("nan"))], title="versions", width=480)
    widths = [float(w) for w in re.findall(r'<rect x="110" y="\d+" width="([\d.]+)"', svg)]
    assert widths == [322.0, 161.0, 0.0]
    assert "nothing reported yet" in bar_chart([], title="versions")


def test_meter_fraction() -> None:
    assert 'width="32.0"' in meter(512, 1024, width=64)
    assert 'width="0.0"' in meter(None, 1024) and 'width="0.0"' in meter(5, 0)
    assert 'width="64.0"' in meter(2048, 1024, width=64)


@pytest.mark.parametrize(("delta_ms", "text"), [(None, "never"), (0, "just now"), (5_000, "5 s ago"),
                         (59_999, "59 s ago"), (60_000, "1 min ago"), (7_200_000, "2 h ago"),
                         (3 * 86_400_000, "3 d ago"), (-60_000, "in the future")])
def test_relative_time(delta_ms, text) -> None:
    now = 1_800_000_000_000
    assert relative_time(None if delta_ms is None else now - delta_ms, now) == text


def test_number_formatting_and_badges() -> None:
    assert fmt_num(None) == "—" and fmt_num(float("nan"), "%") == "—" and fmt_num(12.345, "%") == "12.3 %"
    assert fmt_mb(2048) == "2048 MB" and fmt_mb(16_384) == "16.0 GB" and fmt_mb(None) == "—"
    assert state_badge("offline") == '<span class="badge state-offline" data-state="offline">offline</span>'
    assert "state-unknown" in state_badge('"><x>') and "&quot;&gt;&lt;x&gt;" in state_badge('"><x>')


def test_bands_shade_their_span_inside_the_plot_and_are_escaped() -> None:
    from nanofleet.controller.web.charts import Band

    svg = line_chart([Series("t", [(0, 40.0), (100_000, 80.0)])], title="T", x_start_ms=0, x_end_ms=100_000,
                     bands=[Band(50_000, 100_000, "severe", "#f97316"), Band(-10, 0, "empty", "#000"),
                            Band(10_000, 20_000, "<x>", "#fde047")])
    root = ET.fromstring(svg)
    rects = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") == "band"]
    assert [r.get("data-band") for r in rects] == ["severe", "<x>"]  # a zero-width span draws nothing
    severe = rects[0]
    assert float(severe.get("x")) > 48 and float(severe.get("x")) + float(severe.get("width")) <= 640 - 12 + 0.1
    assert "&lt;x&gt;" in svg and "<x>" not in svg
    assert svg.index('class="band"') < svg.index("<polyline")  # behind the line


def test_coarsen_keeps_peaks_and_weighted_averages() -> None:
    from nanofleet.controller.views import RollupPoint
    from nanofleet.controller.web.pages import coarsen

    day = [RollupPoint(i * 60_000, 6, 10.0, 20.0, 40.0 if i % 2 else None, 50.0 + (i == 777) * 40, 3000 - i)
           for i in range(1440)]
    out = coarsen(day, 400)
    assert len(out) == 360 and out[0].ts_ms == 0 and out[1].ts_ms == 4 * 60_000
    assert max(p.temp_max or 0 for p in out) == 90.0  # the one hot minute survives
    assert min(p.ram_available_min for p in out) == 3000 - 1439
    assert all(p.n == 24 and p.cpu_avg == 10.0 and p.temp_avg == 40.0 for p in out)
    assert coarsen(day[:300], 400) == day[:300]  # few enough: as they are
