"""`nanofleet enroll` against a running Mosquitto: the new device's account works at once (password file rewritten,
broker sent SIGHUP), and without a broker to reload the command says to start one instead of failing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from nanofleet.broker import CONTROLLER_USER, BrokerAccounts, write_mosquitto_config
from nanofleet.controller.enroll import enroll, reload_broker
from tests.conftest import _port_open, free_port, mosquitto_binary, wait_for
from tests.contract.test_broker import _client


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """Mosquitto on the state folder's config, its pid where `nanofleet up` writes it; yields (port, state, fleet)."""
    state = tmp_path / "state"
    accounts = BrokerAccounts(state, "demo")
    accounts.ensure(CONTROLLER_USER, "controller")
    port = free_port()
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(write_mosquitto_config(accounts, "127.0.0.1", port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "broker" / "broker.pid").write_text(str(proc.pid))
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: demo\nbroker: {{url: 'mqtt://127.0.0.1:{port}'}}\n")
    try:
        wait_for(lambda: _port_open(port), timeout=20, what="mosquitto listening")
        yield port, state, fleet
    finally:
        proc.terminate()
        proc.wait(10)


def _connects(port: int, user: str, password: str) -> bool:
    client, rc = _client(port, user, password)
    client.loop_stop()
    client.disconnect()
    return rc == 0


def test_an_enrolled_device_can_connect_at_once(running: tuple[int, Path, Path]) -> None:
    port, state, fleet = running
    assert not _connects(port, "pi-new", "anything")
    result = CliRunner().invoke(enroll, ["pi-new", "--config", str(fleet), "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "enrolled pi-new in fleet demo" in result.output and "broker reloaded" in result.output
    password = BrokerAccounts(state, "demo").load()["pi-new"]["password"]
    wait_for(lambda: _connects(port, "pi-new", password), timeout=15, interval=0.2,
             what="the new account to work after SIGHUP")


def test_no_reload_without_a_live_broker_pid(running: tuple[int, Path, Path]) -> None:
    _, state, _ = running
    pid_file = state / "broker" / "broker.pid"
    pid_file.write_text("not a pid")
    assert reload_broker(state, "demo") is False
    pid_file.write_text("999999999")  # beyond any pid: no such process
    assert reload_broker(state, "demo") is False
    pid_file.unlink()
    assert reload_broker(state, "demo") is False


def test_enroll_without_a_running_broker_says_to_start_it(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: demo\n")
    result = CliRunner().invoke(enroll, ["pi-2", "--config", str(fleet), "--state-dir", str(tmp_path / "s"), "--init"])
    assert result.exit_code == 0, result.output
    assert "start (or restart) the broker to load the accounts" in result.output
    assert (tmp_path / "s" / "devices" / "pi-2" / "agent.yaml").stat().st_mode & 0o777 == 0o600


def test_enroll_refuses_a_bad_device_id_naming_it(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: demo\n")
    result = CliRunner().invoke(enroll, ["a/#", "--config", str(fleet), "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == 2  # a usage error, as click gives for every bad argument
    assert "invalid device 'a/#'" in result.output and "Traceback" not in result.output
