"""The collector on a fake sysfs tree that heats up, throttles and runs on battery; a fake vcgencmd."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from nanofleet.agent.telemetry import Collector
from nanofleet.agent.telemetry.sysfs import hwmon_sensors, parse_pi_throttled, pi_throttled_now
from nanofleet.protos import fleet_pb2

from .fake_sysfs import FakeSysfs


def test_heating_tree_raises_the_level_and_throttles(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    c = Collector(fake.root, disk_path=tmp_path, vcgencmd=None)
    s = c.sample()
    assert s.temperatures_c == {"cpu-thermal": 45.0} and s.temp_max_c == 45.0
    assert s.thermal_level == fleet_pb2.THERMAL_LEVEL_NONE and not s.throttled and s.throttle_ratio == 1.0
    assert s.ram_total_mb > 0 and 0 < s.ram_available_mb <= s.ram_total_mb and s.disk_free_mb > 0
    assert not s.HasField("battery")
    levels = []
    for temp in (45, 66, 75, 82, 91, 99, 101):
        fake.set(temp_c=temp)
        levels.append(c.sample().thermal_level)
    assert levels == [0, 1, 2, 3, 4, 5, 6]
    fake.set(temp_c=50, freq_ratio=0.5)
    s = c.sample()
    assert abs(s.throttle_ratio - 0.5) < 1e-6 and not s.throttled  # low clock alone is a governor, not throttling
    fake.set(capped=True)
    s = c.sample()
    assert s.throttled and s.thermal_level == fleet_pb2.THERMAL_LEVEL_MODERATE
    fake.set(capped=False, cooling=2)
    assert c.sample().throttled


def test_battery_and_charging(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    fake.add_battery(37)
    c = Collector(fake.root, vcgencmd=None)
    b = c.sample().battery
    assert b.present and b.percent == 37 and not b.charging
    fake.add_battery(37, mains_online=True)
    assert c.sample().battery.charging
    fake.add_battery(100, status="Full")
    assert c.sample().battery.charging


def test_pi_flags_from_vcgencmd(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    script = tmp_path / "vcgencmd"
    script.write_text("#!/bin/sh\necho throttled=0x50005\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    s = Collector(fake.root, vcgencmd=str(script)).sample()
    assert s.pi_throttled_flags == 0x50005 and s.throttled
    assert parse_pi_throttled("garbage") is None and parse_pi_throttled("throttled=0x0") == 0
    assert not pi_throttled_now(0x50000) and not pi_throttled_now(0x1) and pi_throttled_now(0x8)
    missing = Collector(fake.root, vcgencmd=str(tmp_path / "nope")).sample()
    assert missing.pi_throttled_flags == 0


def test_hwmon_sensors_and_garbage_are_tolerated(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    h = root / "class/hwmon/hwmon0"
    h.mkdir(parents=True)
    (h / "name").write_text("coretemp\n")
    (h / "temp1_input").write_text("91000\n")
    (h / "temp1_max").write_text("90000\n")
    (h / "temp1_crit").write_text("100000\n")
    (h / "temp1_label").write_text("Package id 0\n")
    (h / "temp2_input").write_text("not a number\n")
    zones = hwmon_sensors(root)
    assert [(z.name, z.temp_c) for z in zones] == [("coretemp/Package id 0", 91.0)]
    s = Collector(root, vcgencmd=None).sample()
    assert s.thermal_level == fleet_pb2.THERMAL_LEVEL_SEVERE  # at max (passive 90), below (90+100)/2


def test_a_failing_disk_read_is_counted_logged_once_and_shown(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    data = tmp_path / "data"
    c = Collector(fake.root, disk_path=data, vcgencmd=None)
    caplog.set_level(logging.INFO, logger="nanofleet.agent.telemetry")
    for _ in range(3):
        sample = c.sample()
        assert sample.disk_free_mb == 0 and sample.ram_total_mb > 0  # the rest of the sample is still taken
    assert c.status()["errors"] == {"disk_usage": 3}
    assert str(data) in c.status()["last_error"] and "FileNotFoundError" in c.status()["last_error"]
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1 and "disk usage" in logged[0], logged  # once, not once per sample
    data.mkdir()
    assert c.sample().disk_free_mb > 0
    assert c.status() == {"errors": {"disk_usage": 3}, "last_error": None}  # counts stay; the error is over
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_a_failing_vcgencmd_is_counted_too(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path / "sys")
    c = Collector(fake.root, disk_path=tmp_path, vcgencmd=str(tmp_path / "nope"))
    c.sample()
    assert c.status()["errors"] == {"vcgencmd": 1} and "nope" in c.status()["last_error"]
