"""SVG charts drawn by our own code: no JavaScript library, no CDN, nothing to download on an offline controller.

Pure functions from numbers to SVG text. Every label is escaped; every coordinate is finite and inside the
viewBox whatever the input (NaN, infinities, one point, constant series, out-of-range values), which the tests
check with hypothesis. A time gap longer than a few sampling intervals breaks the line, so a device that went
quiet shows as a gap rather than a straight line across the silence.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape as _escape

__all__ = ["Band", "Series", "bar_chart", "format_tick", "line_chart", "meter", "nice_ticks", "split_segments"]


_CONTROL = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0xFFFE, 0xFFFF]}


def escape(text: str) -> str:
    """HTML-escape and drop control characters, which XML (so standalone SVG) does not allow at all."""
    return _escape(str(text).translate(_CONTROL))


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (ts_ms, value) with None for a missing sample."""

    name: str
    points: Sequence[tuple[int, float | None]]
    color: str = "#2563eb"


@dataclass(frozen=True)
class Band:
    """A shaded span of time behind a chart's lines, labelled (a thermal level, say)."""

    start_ms: int
    end_ms: int
    label: str
    color: str


_LIMIT = 1e15  # far beyond any telemetry value; keeps tick arithmetic away from float overflow


def _finite(v: float | None) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return min(max(f, -_LIMIT), _LIMIT) if math.isfinite(f) else None


def _nice(x: float, round_: bool) -> float:
    exp = math.floor(math.log10(x))
    frac = x / 10**exp
    if round_:
        nf = 1 if frac < 1.5 else 2 if frac < 3 else 5 if frac < 7 else 10
    else:
        nf = 1 if frac <= 1 else 2 if frac <= 2 else 5 if frac <= 5 else 10
    return nf * 10**exp


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (Heckbert's nice numbers): first <= lo, last >= hi, increasing."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    lo, hi = min(max(lo, -_LIMIT), _LIMIT), min(max(hi, -_LIMIT), _LIMIT)
    if lo > hi:
        lo, hi = hi, lo
    if hi - lo < max(abs(lo), abs(hi), 1e-9) * 1e-9:
        pad = max(abs(lo) * 0.05, 1.0)
        lo, hi = lo - pad, hi + pad
    step = _nice(_nice(hi - lo, False) / max(count - 1, 1), True)
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step) * step
    n = round((end - start) / step)
    ticks = [start + i * step for i in range(n + 1)]
    # Float steps can land a hair inside the data range; nudge the ends out so the promise holds exactly.
    if ticks[0] > lo:
        ticks.insert(0, ticks[0] - step)
    if ticks[-1] < hi:
        ticks.append(ticks[-1] + step)
    return ticks


def format_tick(value: float, step: float) -> str:
    """A tick label with as many decimals as the step needs (0.5 → "0.5", 20 → "20")."""
    decimals = 0 if step >= 1 or step <= 0 else min(6, max(0, -math.floor(math.log10(step))))
    text = f"{value:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text


def split_segments(
    points: Sequence[tuple[int, float | None]], gap_ms: int | None = None
) -> list[list[tuple[int, float]]]:
    """Sorted runs of finite points; a missing value or a time jump over `gap_ms` starts a new run.

    Without `gap_ms` the limit is three times the median sampling interval (at least one second).
    """
    clean = sorted(((int(t), _finite(v)) for t, v in points), key=lambda p: p[0])
    if gap_ms is None:
        deltas = sorted(b[0] - a[0] for a, b in itertools.pairwise(clean) if b[0] > a[0])
        gap_ms = max(3 * deltas[len(deltas) // 2], 1000) if deltas else 0
    runs: list[list[tuple[int, float]]] = []
    current: list[tuple[int, float]] = []
    last_t: int | None = None
    for t, v in clean:
        if v is None:
            if current:
                runs.append(current)
            current, last_t = [], None
            continue
        if current and last_t is not None and gap_ms and t - last_t > gap_ms:
            runs.append(current)
            current = []
        current.append((t, v))
        last_t = t
    if current:
        runs.append(current)
    return runs


def _time_label(ts_ms: float, span_ms: float) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=UTC)
    if span_ms <= 15 * 60_000:
        return dt.strftime("%H:%M:%S")
    if span_ms <= 36 * 3_600_000:
        return dt.strftime("%H:%M")
    return dt.strftime("%d %b %H:%M")


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    unit: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
    x_start_ms: int | None = None,
    x_end_ms: int | None = None,
    width: int = 640,
    height: int = 180,
    gap_ms: int | None = None,
    bands: Sequence[Band] = (),
) -> str:
    """A time-series line chart as an inline ``<svg>`` element (UTC time axis, value axis in `unit`); `bands` shade
    spans of time behind the lines (e.g. the device's thermal level)."""
    left, right, top, bottom = 48, 12, 22, 24
    pw, ph = width - left - right, height - top - bottom
    runs = [(s, split_segments(s.points, gap_ms)) for s in series]
    values = [v for _, segs in runs for seg in segs for _, v in seg]
    times = [t for _, segs in runs for seg in segs for t, _ in seg]
    x0 = x_start_ms if x_start_ms is not None else (min(times) if times else 0)
    x1 = x_end_ms if x_end_ms is not None else (max(times) if times else 1)
    if x1 <= x0:
        x0, x1 = x0 - 30_000, x0 + 30_000
    lo = _finite(y_min) if y_min is not None else (min(values) if values else 0.0)
    hi = _finite(y_max) if y_max is not None else (max(values) if values else 1.0)
    lo = 0.0 if lo is None else lo
    hi = lo + 1.0 if hi is None else hi
    ticks = nice_ticks(lo, hi, 5)
    if y_min is None or y_max is None:  # auto ends snap to round ticks; fixed ends stay where they were asked
        lo = ticks[0] if y_min is None else lo
        hi = ticks[-1] if y_max is None else hi
    if hi <= lo:
        hi = lo + 1.0
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0

    def sx(t: float) -> float:
        return round(left + _clamp((t - x0) / (x1 - x0), 0.0, 1.0) * pw, 1)

    def sy(v: float) -> float:
        return round(top + ph - _clamp((v - lo) / (hi - lo), 0.0, 1.0) * ph, 1)

    last = next((seg[-1][1] for _, segs in reversed(runs) for seg in reversed(segs)), None)
    last_text = "" if last is None else f"{last:.1f}" if abs(last) < 100 else f"{last:.0f}"
    caption = title + (f" — last {last_text} {unit}".rstrip() if last_text and len(series) == 1 else "")
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{left}" y="14" class="chart-title" font-size="12" fill="currentColor">{escape(caption)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#9ca3af" stroke-width="0.5"/>',
    ]
    for band in bands:
        bx0, bx1 = sx(band.start_ms), sx(band.end_ms)
        if bx1 > bx0:
            out.append(f'<rect class="band" data-band="{escape(band.label)}" x="{bx0}" y="{top}" '
                       f'width="{round(bx1 - bx0, 1)}" height="{ph}" fill="{escape(band.color)}" fill-opacity="0.35">'
                       f"<title>{escape(band.label)}</title></rect>")
    for tick in ticks:
        if lo - 1e-9 <= tick <= hi + 1e-9:
            y = sy(tick)
            out.append(f'<line x1="{left}" y1="{y}" x2="{left + pw}" y2="{y}" stroke="#e5e7eb" stroke-width="0.5"/>')
            label = escape(format_tick(tick, step) + (f" {unit}" if unit and tick == ticks[-1] else ""))
            out.append(f'<text x="{left - 4}" y="{y + 4}" text-anchor="end" font-size="10" '
                       f'fill="currentColor">{label}</text>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        t = x0 + frac * (x1 - x0)
        out.append(f'<text x="{round(left + frac * pw, 1)}" y="{height - 6}" text-anchor="{anchor}" font-size="10" '
                   f'fill="currentColor">{escape(_time_label(t, x1 - x0))}</text>')
    if not values:
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" font-size="12" '
                   f'fill="#6b7280">no data in this window</text>')
    for s, segs in runs:
        color = escape(s.color)
        for seg in segs:
            if len(seg) == 1:
                t, v = seg[0]
                out.append(f'<circle cx="{sx(t)}" cy="{sy(v)}" r="2" fill="{color}"/>')
            else:
                pts = " ".join(f"{sx(t)},{sy(v)}" for t, v in seg)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5" '
                           f'stroke-linejoin="round"><title>{escape(s.name)}</title></polyline>')
    if len(series) > 1:
        x = left + 8
        for s in series:
            out.append(f'<rect x="{x}" y="{top + 6}" width="10" height="3" fill="{escape(s.color)}"/>')
            out.append(f'<text x="{x + 14}" y="{top + 11}" font-size="10" fill="currentColor">{escape(s.name)}</text>')
            x += 24 + 7 * len(s.name)
    out.append("</svg>")
    return "".join(out)


def bar_chart(items: Sequence[tuple[str, float]], *, title: str, width: int = 480, bar_height: int = 18,
              color: str = "#2563eb", highlight: str | None = None, highlight_color: str = "#16a34a") -> str:
    """Horizontal bars (label, value), e.g. policy version → device count; `highlight` marks one label."""
    left, right, gap = 110, 48, 6
    height = max(1, len(items)) * (bar_height + gap) + 24
    peak = max((_finite(v) or 0.0 for _, v in items), default=0.0) or 1.0
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<text x="0" y="14" font-size="12" fill="currentColor">{escape(title)}</text>',
    ]
    if not items:
        out.append('<text x="0" y="36" font-size="12" fill="#6b7280">nothing reported yet</text>')
    for i, (label, value) in enumerate(items):
        v = max(_finite(value) or 0.0, 0.0)
        y = 24 + i * (bar_height + gap)
        w = round((width - left - right) * v / peak, 1)
        fill = highlight_color if highlight is not None and label == highlight else color
        out.append(f'<text x="{left - 6}" y="{y + bar_height - 5}" text-anchor="end" font-size="11" '
                   f'fill="currentColor">{escape(label)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w}" height="{bar_height}" fill="{escape(fill)}"/>')
        out.append(f'<text x="{left + w + 4}" y="{y + bar_height - 5}" font-size="11" '
                   f'fill="currentColor">{escape(f"{v:g}")}</text>')
    out.append("</svg>")
    return "".join(out)


def meter(value: float | None, total: float | None, *, width: int = 64, height: int = 8,
          color: str = "#2563eb") -> str:
    """A small fill bar for value/total (e.g. RAM available); empty outline when either is unknown."""
    v, t = _finite(value), _finite(total)
    frac = _clamp(v / t, 0.0, 1.0) if v is not None and t and t > 0 else 0.0
    return (f'<svg class="meter" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" aria-hidden="true"><rect x="0" y="0" width="{width}" height="{height}" fill="#e5e7eb"/>'
            f'<rect x="0" y="0" width="{round(width * frac, 1)}" height="{height}" fill="{escape(color)}"/></svg>')
