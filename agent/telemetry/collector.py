"""The device's system sample: psutil for CPU/RAM/swap/disk/load, sysfs for heat, throttling and battery.

Blocking (file reads, one short subprocess on a Pi): the device session calls `sample()` in a worker thread.
A read that fails (disk usage, vcgencmd) leaves its field unset and the rest of the sample intact; it is counted per
reading, logged once per outage (not once per sample) and shown by `status()`, which /v1/status carries.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import psutil

from nanofleet import thermal
from nanofleet.agent.telemetry import sysfs
from nanofleet.protos import fleet_pb2

_MB = 1024 * 1024
log = logging.getLogger(__name__)


class Collector:
    """`sample()` -> a Telemetry with the system fields filled (identity, seq and agent metrics are the session's)."""

    def __init__(self, sysfs_root: str | os.PathLike[str] = "/sys", *, disk_path: str | os.PathLike[str] = "/",
                 vcgencmd: str | None = "auto") -> None:
        self.root = Path(sysfs_root)
        self.disk_path = str(disk_path)
        self.vcgencmd = shutil.which("vcgencmd") if vcgencmd == "auto" else vcgencmd
        self.errors: Counter[str] = Counter()  # reading -> failures since start
        self._failing: dict[str, str] = {}  # reading -> its current error, while it fails
        psutil.cpu_percent(None)  # prime: the first call has no interval to measure over

    def _failed(self, reading: str, what: str, exc: Exception) -> None:
        self.errors[reading] += 1
        error = f"{what}: {type(exc).__name__}: {exc}"
        if reading not in self._failing:
            log.warning("cannot read %s (counted, logged once until it recovers)", error)
        self._failing[reading] = error

    def _ok(self, reading: str) -> None:
        if self._failing.pop(reading, None) is not None:
            log.info("%s readable again after %d failures", reading.replace("_", " "), self.errors[reading])

    def status(self) -> dict[str, Any]:
        """Read failures since start, and the latest of those still failing (None when all read)."""
        return {"errors": dict(self.errors), "last_error": "; ".join(self._failing.values()) or None}

    def pi_flags(self) -> int | None:
        if not self.vcgencmd:
            return None
        try:
            out = subprocess.run([self.vcgencmd, "get_throttled"], capture_output=True, text=True, timeout=2,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            self._failed("vcgencmd", f"throttling flags from {self.vcgencmd}", exc)
            return None
        self._ok("vcgencmd")
        return sysfs.parse_pi_throttled(out)

    def sample(self) -> fleet_pb2.Telemetry:
        t = fleet_pb2.Telemetry(ts_ms=int(time.time() * 1000))
        t.cpu_percent = psutil.cpu_percent(None)
        t.load1 = os.getloadavg()[0]
        vm = psutil.virtual_memory()
        t.ram_total_mb, t.ram_available_mb = vm.total // _MB, vm.available // _MB
        t.swap_used_mb = psutil.swap_memory().used // _MB
        try:
            t.disk_free_mb = shutil.disk_usage(self.disk_path).free // _MB
        except OSError as exc:
            self._failed("disk_usage", f"disk usage of {self.disk_path}", exc)
        else:
            self._ok("disk_usage")
        zones = sysfs.thermal_zones(self.root) + sysfs.hwmon_sensors(self.root)
        for z in zones:
            t.temperatures_c[z.name] = round(z.temp_c, 2)
        if zones:
            t.temp_max_c = max(z.temp_c for z in zones)
        freq = sysfs.cpufreq(self.root)
        t.throttle_ratio = freq.ratio if freq else 1.0
        flags = self.pi_flags()
        if flags is not None:
            t.pi_throttled_flags = flags
        t.throttled = bool((freq and freq.capped) or sysfs.cooling_active(self.root)
                           or (flags is not None and sysfs.pi_throttled_now(flags)))
        level = thermal.classify_device(((z.temp_c, z.trips) for z in zones), throttled=t.throttled)
        t.thermal_level = cast(fleet_pb2.ThermalLevel, level)  # protoc's stubs type the enum as a class: it is an int
        bat = sysfs.battery(self.root)
        if bat is not None:
            t.battery.present, t.battery.percent, t.battery.charging = True, bat.percent, bat.charging
        return t
