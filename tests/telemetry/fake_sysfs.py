"""A fake /sys tree that can heat up, throttle and run on battery (the collector's sysfs root in tests)."""

from __future__ import annotations

from pathlib import Path


class FakeSysfs:
    def __init__(self, root: Path, *, cpus: int = 2, max_khz: int = 1_800_000) -> None:
        self.root = root
        self.max_khz = max_khz
        zone = root / "class/thermal/thermal_zone0"
        zone.mkdir(parents=True)
        (zone / "type").write_text("cpu-thermal\n")
        for i, (temp, kind) in enumerate(((80_000, "passive"), (90_000, "hot"), (100_000, "critical"))):
            (zone / f"trip_point_{i}_temp").write_text(f"{temp}\n")
            (zone / f"trip_point_{i}_type").write_text(f"{kind}\n")
        cool = root / "class/thermal/cooling_device0"
        cool.mkdir()
        (cool / "type").write_text("cpufreq-cpu0\n")
        (cool / "cur_state").write_text("0\n")
        for n in range(cpus):
            d = root / f"devices/system/cpu/cpu{n}/cpufreq"
            d.mkdir(parents=True)
            (d / "cpuinfo_max_freq").write_text(f"{max_khz}\n")
            (d / "scaling_max_freq").write_text(f"{max_khz}\n")
        self.set(temp_c=45.0, freq_ratio=1.0)

    def set(self, *, temp_c: float | None = None, freq_ratio: float | None = None, capped: bool | None = None,
            cooling: int | None = None) -> None:
        if temp_c is not None:
            (self.root / "class/thermal/thermal_zone0/temp").write_text(f"{int(temp_c * 1000)}\n")
        for d in (self.root / "devices/system/cpu").glob("cpu*/cpufreq"):
            if freq_ratio is not None:
                (d / "scaling_cur_freq").write_text(f"{int(self.max_khz * freq_ratio)}\n")
            if capped is not None:
                (d / "scaling_max_freq").write_text(f"{self.max_khz // 2 if capped else self.max_khz}\n")
        if cooling is not None:
            (self.root / "class/thermal/cooling_device0/cur_state").write_text(f"{cooling}\n")

    def add_battery(self, percent: int, status: str = "Discharging", mains_online: bool = False) -> None:
        bat = self.root / "class/power_supply/BAT0"
        bat.mkdir(parents=True, exist_ok=True)
        (bat / "type").write_text("Battery\n")
        (bat / "capacity").write_text(f"{percent}\n")
        (bat / "status").write_text(f"{status}\n")
        ac = self.root / "class/power_supply/AC"
        ac.mkdir(exist_ok=True)
        (ac / "type").write_text("Mains\n")
        (ac / "online").write_text("1\n" if mains_online else "0\n")
