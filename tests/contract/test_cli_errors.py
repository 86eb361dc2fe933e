"""Bad input on the command line gets one clear line naming the argument and exit code 2 (or 1), never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.config import ConfigError, parse_fleet

ROOT = Path(__file__).resolve().parents[2]
FLEET = str(ROOT / "fleet.yaml")


@pytest.mark.parametrize(("argv", "names", "code"), [
    (["sim", "--fleet", "a/#", "--devices", "1", "--duration", "0"], "'--fleet'", 2),
    (["sim", "--broker-url", "http://x", "--devices", "1", "--duration", "0"], "'--broker-url'", 2),
    (["devices", "cmd", "a/#", "ping", "--config", FLEET], "'DEVICE'", 2),
    (["devices", "cmd", "$SYS", "ping", "--config", FLEET], "'DEVICE'", 2),
    (["devices", "cmd", "dev-01", "ping", "--config", FLEET, "--broker-url", "foo://x"], "'--broker-url'", 2),
    (["devices", "cmd", "dev-01", "ping", "--config", FLEET, "--timeout", "-1"], "'--timeout'", 2),
    (["enroll", "a/+", "--config", FLEET], "'DEVICE_ID'", 2),
    (["gateway", "token", "issue", "a/#", "--fleet", "demo"], "device_id: expected", 1),
    (["gateway", "token", "issue", "dev-01", "--fleet", "a b"], "fleet: expected", 1),
    (["gateway", "token", "revoke", "#"], "device '#' has no active token", 1),
])
def test_bad_ids_and_urls_are_usage_errors_naming_the_argument(argv: list[str], names: str, code: int,
                                                                 tmp_path: Path) -> None:
    if argv[0] == "gateway":
        argv = [*argv, "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an escaped Python exception
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and names in error[0], result.output


def test_a_real_process_prints_one_line_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "nanofleet", "sim", "--fleet", "a/#", "--devices", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "Error: Invalid value for '--fleet': invalid fleet 'a/#'" in proc.stderr


def test_fleet_yaml_keys_are_escaped_in_errors_and_ids_checked_by_the_topic_rule() -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet('fleet: demo\ndevices:\n  "a\\0b": {}\n')
    message = str(err.value)
    assert "\x00" not in message and "'a\\x00b'" in message and "invalid device" in message
    assert message.startswith("fleet.yaml: devices.")
    with pytest.raises(ConfigError, match=r"fleet.yaml: fleet: invalid fleet 'a/#'"):
        parse_fleet('fleet: "a/#"\n')
    with pytest.raises(ConfigError) as err:
        parse_fleet('fleet: demo\ngroups:\n  "g\\u0007": {routing: {nope: 1}}\n')
    assert "\x07" not in str(err.value) and "unknown field" in str(err.value)
