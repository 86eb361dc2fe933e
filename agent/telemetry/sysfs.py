"""Readers for the Linux sysfs files telemetry needs; every path is under a root so tests feed a fake tree.

Each reader returns what it could read and skips what is missing or garbled: a device without a battery or
without cpufreq is normal, not an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from nanofleet.thermal import TripPoint


@dataclass(frozen=True, slots=True)
class Zone:
    name: str
    temp_c: float
    trips: tuple[TripPoint, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class CpuFreq:
    cur_khz: int
    max_khz: int  # hardware maximum (cpuinfo_max_freq)
    capped: bool  # scaling_max_freq pulled below the hardware maximum (thermal or power capping)

    @property
    def ratio(self) -> float:
        return min(1.0, self.cur_khz / self.max_khz) if self.max_khz else 1.0


@dataclass(frozen=True, slots=True)
class BatteryState:
    percent: float
    charging: bool


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _index(p: Path) -> int:
    m = re.search(r"(\d+)$", p.name)
    return int(m.group(1)) if m else 0


def thermal_zones(root: Path) -> list[Zone]:
    zones = []
    for zdir in sorted((root / "class" / "thermal").glob("thermal_zone*"), key=_index):
        milli = _int(zdir / "temp")
        if milli is None:
            continue
        trips = []
        for tpath in sorted(zdir.glob("trip_point_*_temp"), key=lambda p: p.name):
            ttemp = _int(tpath)
            kind = _read(tpath.with_name(tpath.name.replace("_temp", "_type")))
            if ttemp is not None and kind and ttemp > 0:
                trips.append(TripPoint(ttemp / 1000, kind))
        zones.append(Zone(_read(zdir / "type") or zdir.name, milli / 1000, tuple(trips)))
    return zones


def hwmon_sensors(root: Path) -> list[Zone]:
    """hwmon temperatures (x86 coretemp, nvme, ...) with their max/crit limits as trip points."""
    zones = []
    for hdir in sorted((root / "class" / "hwmon").glob("hwmon*"), key=_index):
        name = _read(hdir / "name") or hdir.name
        for inp in sorted(hdir.glob("temp*_input"), key=lambda p: p.name):
            milli = _int(inp)
            if milli is None:
                continue
            stem = inp.name.removesuffix("_input")
            trips = []
            for suffix, kind in (("max", "passive"), ("crit", "critical")):
                v = _int(hdir / f"{stem}_{suffix}")
                if v and v > 0:
                    trips.append(TripPoint(v / 1000, kind))
            label = _read(hdir / f"{stem}_label") or stem
            zones.append(Zone(f"{name}/{label}", milli / 1000, tuple(trips)))
    return zones


def cpufreq(root: Path) -> CpuFreq | None:
    cur = mx = 0
    capped = False
    for cdir in (root / "devices" / "system" / "cpu").glob("cpu[0-9]*/cpufreq"):
        c, m = _int(cdir / "scaling_cur_freq"), _int(cdir / "cpuinfo_max_freq")
        if c is None or not m:
            continue
        cur, mx = cur + c, mx + m
        smax = _int(cdir / "scaling_max_freq")
        capped = capped or (smax is not None and smax < m * 0.95)
    return CpuFreq(cur, mx, capped) if mx else None


def cooling_active(root: Path) -> bool:
    """A cpufreq/processor cooling device engaged: the kernel is throttling."""
    for cdir in (root / "class" / "thermal").glob("cooling_device*"):
        kind = (_read(cdir / "type") or "").lower()
        state = _int(cdir / "cur_state")
        if state and ("cpufreq" in kind or "processor" in kind or "cpu" in kind):
            return True
    return False


def battery(root: Path) -> BatteryState | None:
    bat: BatteryState | None = None
    mains = False
    for sdir in sorted((root / "class" / "power_supply").glob("*")):
        kind = _read(sdir / "type")
        if kind == "Battery" and bat is None:
            cap = _int(sdir / "capacity")
            if cap is not None:
                status = (_read(sdir / "status") or "").lower()
                bat = BatteryState(float(max(0, min(100, cap))), status in ("charging", "full"))
        elif kind in ("Mains", "USB", "USB_C", "USB_PD") and _int(sdir / "online") == 1:
            mains = True
    if bat is not None and mains and not bat.charging:
        bat = BatteryState(bat.percent, True)
    return bat


_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")
PI_UNDER_VOLTAGE, PI_FREQ_CAPPED, PI_THROTTLED, PI_SOFT_TEMP_LIMIT = 0x1, 0x2, 0x4, 0x8


def parse_pi_throttled(text: str) -> int | None:
    """`vcgencmd get_throttled` output -> flags (bits 0-3 now, 16-19 since boot)."""
    m = _THROTTLED.search(text)
    return int(m.group(1), 0) if m else None


def pi_throttled_now(flags: int) -> bool:
    return bool(flags & (PI_FREQ_CAPPED | PI_THROTTLED | PI_SOFT_TEMP_LIMIT))
