"""What the dashboard's templates are given: the device list's URL state (filters, sort, cursor), the device page's
SVG charts (drawn by charts.py, which escapes every label), row flags against fleet.yaml's alert thresholds. Pure:
data in, values or Markup out; the HTML itself lives in templates/ (Jinja2, autoescape on)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from markupsafe import Markup

from nanofleet.config import Alerts
from nanofleet.controller.device_sql import SORTS
from nanofleet.controller.fleet_queries import Bucket
from nanofleet.controller.queries import DeviceFilter
from nanofleet.controller.views import RollupPoint

from .charts import Band, Series, bar_chart, line_chart
from .format import THERMAL_ORDER

__all__ = ["COLUMNS", "THERMAL_COLORS", "WINDOWS", "DeviceListState", "device_charts", "device_url", "thermal_bands",
           "thermal_warn"]

# window name -> (milliseconds, store source: raw telemetry or a rollup resolution)
WINDOWS: dict[str, tuple[int, str]] = {
    "15m": (15 * 60_000, "raw"),
    "1h": (3_600_000, "raw"),
    "6h": (6 * 3_600_000, "1m"),
    "24h": (24 * 3_600_000, "1m"),
    "7d": (7 * 86_400_000, "1h"),
}
THERMAL_COLORS = {"light": "#fef9c3", "moderate": "#fde68a", "severe": "#fdba74", "critical": "#fca5a5",
                  "emergency": "#f87171", "shutdown": "#ef4444"}
# the device list's columns: (sort key or None, header, numeric)
COLUMNS: tuple[tuple[str | None, str, bool], ...] = (
    ("device_id", "Device", False), ("group", "Group", False), ("state", "State", False),
    ("last_seen", "Last seen", False), ("temp", "Temp", True), ("thermal", "Thermal", False),
    ("ram", "RAM avail / total", True), ("cpu", "CPU", True), ("model", "Model", False), ("policy", "Policy", True),
    ("queue", "Queue", True), (None, "Oldest", True), ("slots_waiting", "Slots waiting", True), (None, "Alerts", False),
)
assert {k for k, _, _ in COLUMNS if k} == set(SORTS)
PAGE_SIZES = (25, 50, 100, 200)


def device_url(device_id: str) -> str:
    return "/devices/" + quote(device_id, safe="")


def thermal_warn(level: str | None, alerts: Alerts) -> bool:
    return level in THERMAL_ORDER and THERMAL_ORDER.index(level) >= THERMAL_ORDER.index(alerts.thermal_at)


@dataclass(frozen=True)
class DeviceListState:
    """The device list's state, all of it in the URL: the filter, the page size and the cursor of this page."""

    flt: DeviceFilter
    limit: int
    cursor: str | None

    def params(self, **changes: Any) -> dict[str, str]:
        f = self.flt
        values: dict[str, Any] = {"group": f.group, "state": f.state, "thermal": f.thermal, "model": f.model,
                                  "behind": "1" if f.behind else "", "q": f.q,
                                  "sort": "" if f.sort == "device_id" else f.sort, "desc": "1" if f.desc else "",
                                  "limit": "" if self.limit == 50 else str(self.limit), "cursor": self.cursor or ""}
        values.update(changes)
        return {k: str(v) for k, v in values.items() if v not in ("", None, False)}

    def url(self, **changes: Any) -> str:
        """/devices with this state, `changes` applied (a change of filter or sort starts again at the first page)."""
        if any(k != "cursor" for k in changes) and "cursor" not in changes:
            changes["cursor"] = ""
        query = urlencode(self.params(**changes))
        return "/devices" + (f"?{query}" if query else "")

    def sort_url(self, key: str) -> str:
        """A column header's link: sort by it, or flip the direction when it already sorts."""
        desc = not self.flt.desc if self.flt.sort == key else key in ("temp", "thermal", "cpu", "queue",
                                                                        "slots_waiting", "last_seen")
        return self.url(sort="" if key == "device_id" else key, desc="1" if desc else "")

    def sort_mark(self, key: str) -> str:
        return ("▼" if self.flt.desc else "▲") if self.flt.sort == key else ""


MAX_POINTS = 400  # a chart is ~580 px wide: more points per series cost time to draw and show nothing more


def coarsen(points: Sequence[RollupPoint], max_points: int = MAX_POINTS) -> list[RollupPoint]:
    """Rollup buckets merged in runs of consecutive ones so at most about `max_points` remain (a day of 1 min
    buckets: 4 min each): averages weighted by sample count, maxima and minima kept, so no peak is lost."""
    step = -(-len(points) // max_points)  # ceil
    if step <= 1:
        return list(points)
    out = []
    for i in range(0, len(points), step):
        run = points[i:i + step]
        n = sum(p.n for p in run) or 1
        temps = [(p.temp_avg, p.n) for p in run if p.temp_avg is not None]
        t_n = sum(w for _, w in temps)
        out.append(RollupPoint(
            run[0].ts_ms, n, sum(p.cpu_avg * p.n for p in run) / n, max(p.cpu_max for p in run),
            sum(t * w for t, w in temps) / t_n if t_n else None,
            max((p.temp_max for p in run if p.temp_max is not None), default=None),
            min(p.ram_available_min for p in run)))
    return out


def thermal_bands(buckets: Sequence[Bucket], bucket_ms: int, end_ms: int) -> list[Band]:
    """Spans where the device ran above `none`, one per run of buckets at the same level (a run ends at a level
    change or a gap in the telemetry)."""
    bands: list[Band] = []
    run: tuple[int, int, int] | None = None  # start, end, level
    for b in buckets:
        level = b.thermal_level if 0 <= b.thermal_level < len(THERMAL_ORDER) else 0
        if run is not None and level == run[2] and b.ts_ms <= run[1]:
            run = (run[0], b.ts_ms + bucket_ms, level)
            continue
        if run is not None and run[2] > 0:
            bands.append(_band(run))
        run = (b.ts_ms, b.ts_ms + bucket_ms, level)
    if run is not None and run[2] > 0:
        bands.append(_band((run[0], min(run[1], end_ms), run[2])))
    return bands


def _band(run: tuple[int, int, int]) -> Band:
    name = THERMAL_ORDER[run[2]]
    return Band(run[0], run[1], name, THERMAL_COLORS.get(name, "#fca5a5"))


def device_charts(points: Sequence[Any], source: str, *, start_ms: int, end_ms: int, ram_total_mb: float | None,
                  buckets: Sequence[Bucket] = (), bucket_ms: int = 60_000,
                  route_counts: Mapping[str, int] | None = None) -> list[Markup]:
    """Temperature (thermal levels as bands), CPU, RAM, queue depth and slots waiting, and the route mix.
    Markup: charts.py builds every SVG from escaped labels and numbers it formats itself."""
    span: dict[str, Any] = {"x_start_ms": start_ms, "x_end_ms": end_ms}
    if source == "raw":
        cpu = [Series("CPU %", [(p.ts_ms, p.cpu_percent) for p in points])]
        temp = [Series("max °C", [(p.ts_ms, p.temp_max_c) for p in points], "#dc2626")]
        ram = [Series("available", [(p.ts_ms, p.ram_available_mb) for p in points], "#059669")]
    else:
        cpu = [Series("avg", [(p.ts_ms, p.cpu_avg) for p in points]),
               Series("max", [(p.ts_ms, p.cpu_max) for p in points], "#93c5fd")]
        temp = [Series("max", [(p.ts_ms, p.temp_max) for p in points], "#dc2626"),
                Series("avg", [(p.ts_ms, p.temp_avg) for p in points], "#fca5a5")]
        ram = [Series("min available", [(p.ts_ms, p.ram_available_min) for p in points], "#059669")]
    charts = [
        line_chart(temp, title="Temperature", unit="°C", bands=thermal_bands(buckets, bucket_ms, end_ms), **span),
        line_chart(cpu, title="CPU", unit="%", y_min=0, y_max=100, **span),
        line_chart(ram, title="RAM available", unit="MB", y_min=0, y_max=ram_total_mb or None, **span),
    ]
    if buckets:
        queue = [Series("offline queue", [(b.ts_ms, b.queue_depth) for b in buckets], "#7c3aed"),
                 Series("slots waiting", [(b.ts_ms, b.slots_waiting) for b in buckets], "#f59e0b")]
        charts.append(line_chart(queue, title="Queue depth", y_min=0, gap_ms=3 * bucket_ms, **span))
    if route_counts:
        charts.append(bar_chart(sorted(route_counts.items()), title="Routes since the agent started"))
    return [Markup(c) for c in charts]  # safe: charts.py builds each from escaped labels and its own numbers
