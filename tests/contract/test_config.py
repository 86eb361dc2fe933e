"""fleet.yaml: the example loads; each kind of broken file gets an error naming the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanofleet.config import ConfigError, load_fleet, parse_duration

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_fleet_loads_and_resolves_group_overrides() -> None:
    cfg = load_fleet(ROOT / "fleet.yaml")
    assert cfg.fleet == "demo"
    kiosk = cfg.profile_for("pi-lab-01")
    assert (kiosk.routing.prefer, kiosk.routing.thermal_limit) == ("cloud", "moderate")
    assert kiosk.routing.min_free_ram_mb == cfg.defaults.routing.min_free_ram_mb  # inherited
    assert cfg.profile_for("unlisted-device") == cfg.defaults
    assert cfg.defaults.routing.apps["com.example.notes"].privacy == "sensitive"
    assert cfg.defaults.queue.ttl == 24 * 3600
    assert cfg.gateway.upstream.api_key_env == "GEMINI_API_KEY"


def test_device_overrides_apply_on_top_of_its_group(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(
        "fleet: f\ngroups: {g: {routing: {cloud: denied, prefer: cloud}}}\n"
        "devices: {d1: {group: g, routing: {prefer: local}}}\n"
    )
    routing = load_fleet(f).profile_for("d1").routing
    assert (routing.cloud, routing.prefer) == ("denied", "local")


def test_groups_match_device_ids_by_glob_and_every_device_has_a_group(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yaml"
    f.write_text(
        "fleet: f\n"
        "groups:\n"
        "  kiosks: {match: ['kiosk-*', 'sim-000?'], routing: {prefer: cloud}}\n"
        "  lab: {match: ['sim-*'], routing: {cloud: denied}}\n"
        "devices: {sim-0001: {group: lab}, sim-0002: {routing: {min_free_ram_mb: 64}}, pi-9: {group: default}}\n"
    )
    cfg = load_fleet(f)
    assert cfg.group_of("kiosk-7") == "kiosks"
    assert cfg.group_of("sim-0003") == "kiosks"  # the first group in file order wins over a later match
    assert cfg.group_of("sim-0042") == "lab"
    assert cfg.group_of("sim-0001") == "lab"  # an explicit devices: entry wins over a match
    assert cfg.group_of("sim-0002") == "kiosks"  # listed without a group: the globs still place it
    assert cfg.group_of("pi-9") == "default" and cfg.group_of("elsewhere") == "default"
    assert cfg.group_of("KIOSK-7") == "default"  # device ids are case-sensitive, so are the globs
    # policy compilation resolves groups by the same rule: a matched device runs its group's overrides
    assert cfg.profile_for("sim-0003").routing.prefer == "cloud"
    assert cfg.profile_for("sim-0042").routing.cloud == "denied"
    assert (cfg.profile_for("sim-0002").routing.prefer, cfg.profile_for("sim-0002").routing.min_free_ram_mb) == (
        "cloud", 64)
    assert cfg.profile_for("pi-9") == cfg.profile_for("elsewhere") == cfg.defaults


def test_the_example_fleet_puts_simulated_devices_in_its_groups() -> None:
    from nanofleet.sim import device_ids

    cfg = load_fleet(ROOT / "fleet.yaml")
    groups = {cfg.group_of(d) for d in device_ids(200)}
    assert {"kiosks", "clinic-tablets", "default"} <= groups


BROKEN = {
    "bad_yaml": ("fleet: demo\ngroups: {kiosks: [\n", "invalid YAML: line 3"),
    "unknown_key": ("fleet: demo\ndefaults: {routing: {prefer: local, colour: red}}\n",
                    "defaults.routing.colour: unknown field"),
    "wrong_type": ("fleet: demo\ndefaults: {telemetry_interval_s: often}\n",
                   "defaults.telemetry_interval_s: Input should be a valid number"),
    "missing_required": ("broker: {url: mqtt://127.0.0.1:1883}\n", "fleet: required field missing"),
    "unknown_group": ("fleet: demo\ngroups: {kiosks: {}}\ndevices: {pi-1: {group: kiosk}}\n",
                      "devices.pi-1.group: unknown group 'kiosk' (groups: kiosks)"),
    "out_of_range": ("fleet: demo\ndefaults: {routing: {battery_floor_pct: 150}}\n",
                     "defaults.routing.battery_floor_pct: Input should be less than or equal to 100"),
    "bad_group_value": ("fleet: demo\ngroups: {kiosks: {routing: {thermal_limit: toasty}}}\n",
                        "groups.kiosks.routing.thermal_limit: Input should be 'none', 'light'"),
    "bad_duration": ("fleet: demo\ndefaults: {queue: {ttl: forever}}\n", "defaults.queue.ttl:"),
    "remote_model_without_hash": ("fleet: demo\ndefaults: {model: {source: 'https://example.invalid/m.gguf'}}\n",
                                  "defaults.model: a downloaded model needs sha256"),
    "not_a_mapping": ("- just\n- a list\n", "(top level): expected a mapping"),
    "bad_device_id": ("fleet: demo\ndevices: {'bad/id': {}}\n", "devices.bad/id"),
    "reserved_group": ("fleet: demo\ngroups: {default: {routing: {cloud: denied}}}\n",
                       "groups.default: the name 'default' is reserved"),
    "match_not_a_list": ("fleet: demo\ngroups: {kiosks: {match: 7}}\n", "groups.kiosks.match: Input should be"),
    "empty_glob": ("fleet: demo\ngroups: {kiosks: {match: ['']}}\n", "groups.kiosks.match.0:"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_fleet_file_names_the_file_field_and_problem(case: str, tmp_path: Path) -> None:
    text, expected = BROKEN[case]
    f = tmp_path / f"{case}.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_fleet(f)
    message = str(err.value)
    assert message.startswith(f"{f}: "), message
    assert expected in message, message


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "seconds"), [(30, 30.0), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0),
                                               ("1.5h", 5400.0), ("7d", 604800.0), ("250ms", 0.25)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
