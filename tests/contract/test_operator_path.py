"""The operator's path on the production layout: a separately run Mosquitto whose password and ACL files fleet.yaml
names (enroll and revoke keep them and reload it), commands that read fleet state refuse a missing folder naming
the flag (never an empty one made in the working folder), `devices cmd` refused by the broker says which setting."""

from __future__ import annotations

import getpass
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from nanofleet.broker import BrokerAccounts, mosquitto_password_hash, write_mosquitto_auth
from nanofleet.cli import main
from tests.conftest import Broker, _port_open, free_port, mosquitto_binary, wait_for
from tests.contract.test_broker import _client
from tests.contract.test_docs_examples import doc_block

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _connects(port: int, user: str, password: str) -> bool:
    client, rc = _client(port, user, password)
    client.loop_stop()
    client.disconnect()
    return rc == 0


def test_enroll_and_revoke_keep_a_separate_mosquittos_files_and_reload_it(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    passwd, acl, pid = etc / "nanofleet.passwd", etc / "nanofleet.acl", etc / "mosquitto.pid"
    # the operator's own users, the controller's included: kept as they are
    passwd.write_text(f"ops:$7$101$c2FsdA==$aGFzaA==\ncontroller:{mosquitto_password_hash('ctl-pw')}\n")
    passwd.chmod(0o640)
    port = free_port()
    conf = etc / "mosquitto.conf"
    conf.write_text(f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {passwd}\nacl_file {acl}\npersistence false\n")
    acl.write_text("")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: demo\nbroker: {{url: 'mqtt://127.0.0.1:{port}', password_file: {passwd}, "
                     f"acl_file: {acl}, pid_file: {pid}}}\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pid.write_text(f"{proc.pid}\n")  # as mosquitto's own pid_file (or systemd) holds it
    try:
        wait_for(lambda: _port_open(port), timeout=20, what="mosquitto listening")
        state = tmp_path / "state"
        r = _cli("enroll", "pi-lab-01", "--config", str(fleet), "--state-dir", str(state), "--init")
        assert r.exit_code == 0, r.output
        assert f"{passwd} and {acl} written; broker reloaded (SIGHUP to {proc.pid})" in r.output
        password = yaml.safe_load((state / "devices" / "pi-lab-01" / "agent.yaml").read_text())["mqtt_password"]
        wait_for(lambda: _connects(port, "pi-lab-01", password), timeout=15, interval=0.2, what="the new account")
        assert passwd.read_text().startswith("ops:") and passwd.stat().st_mode & 0o777 == 0o640
        assert "pattern write nanofleet/v1/demo/%u/telemetry" in acl.read_text()
        r = _cli("revoke", "pi-lab-01", "--config", str(fleet), "--state-dir", str(state), "--mqtt-password", "ctl-pw")
        assert r.exit_code == 0, r.output
        shown = doc_block("operations.md", "### Revoking a device")
        shown = doc_block("operations.md", shown + "```\n")  # the command, then its output
        real = r.output.replace(str(passwd), "/etc/mosquitto/nanofleet.passwd").replace(
            str(acl), "/etc/mosquitto/nanofleet.acl").replace(f"SIGHUP to {proc.pid})", "SIGHUP to 812)")
        assert real == shown, "docs/operations.md's revoke output is not what it prints"
        assert "broker reloaded" in r.output and "pi-lab-01:" not in passwd.read_text()
        assert passwd.read_text().startswith("ops:")
        wait_for(lambda: not _connects(port, "pi-lab-01", password), timeout=15, interval=0.2, what="refused")
    finally:
        proc.terminate()
        proc.wait(10)
    # without a pid file setting: the exact command to run
    fleet.write_text(f"fleet: demo\nbroker: {{password_file: {passwd}, acl_file: {acl}}}\n")
    r = _cli("enroll", "pi-2", "--config", str(fleet), "--state-dir", str(state))
    assert r.exit_code == 0 and "reload the broker to apply them: sudo systemctl reload mosquitto" in r.output


def test_state_reading_commands_refuse_a_missing_folder_naming_the_flag(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "fleet.yaml").write_text((ROOT / "fleet.yaml").read_text())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = _cli("enroll", "pi-lab-01", "--config", str(conf / "fleet.yaml"))
    assert r.exit_code == 2 and "--state-dir" in r.output and "--init" in r.output
    r = _cli("devices", "list")
    assert r.exit_code == 2 and "--data-dir" in r.output
    r = _cli("policy", "apply", str(conf / "fleet.yaml"), "--dry-run")
    assert r.exit_code == 2 and "--data-dir" in r.output
    assert list(work.iterdir()) == [] and sorted(p.name for p in conf.iterdir()) == ["fleet.yaml"]
    # the state `nanofleet up` keeps beside fleet.yaml is found from any working folder
    (conf / ".nanofleet").mkdir()
    r = _cli("enroll", "pi-lab-01", "--config", str(conf / "fleet.yaml"))
    assert r.exit_code == 0 and (conf / ".nanofleet" / "devices" / "pi-lab-01" / "agent.yaml").exists(), r.output


def test_devices_cmd_refused_by_the_broker_names_the_setting_at_once(tmp_path: Path,
                                                                    make_broker: Callable[..., Broker]) -> None:
    accounts = BrokerAccounts(tmp_path / "state", "demo")
    accounts.ensure("pi-1", "device")
    write_mosquitto_auth(accounts, tmp_path / "passwd", tmp_path / "acl")
    broker = make_broker([f"user {getpass.getuser()}", "allow_anonymous false", f"password_file {tmp_path / 'passwd'}"])
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: demo\nbroker: {{url: '{broker.url}'}}\n")
    started = time.monotonic()
    r = _cli("devices", "cmd", "pi-1", "ping", "--config", str(fleet))
    took = time.monotonic() - started
    assert r.exit_code == 1 and "Not authorized" in r.output and "no password given" in r.output
    assert "--mqtt-password" in r.output and "NANOFLEET_MQTT_PASSWORD" in r.output
    assert took < 5, f"took {took:.1f} s: it retried a refusal instead of saying what is missing"
    r = _cli("devices", "cmd", "pi-1", "ping", "--config", str(fleet), "--mqtt-username", "controller",
             "--mqtt-password", "wrong")
    assert r.exit_code == 1 and "the password given for 'controller'" in r.output


def test_sync_broker_says_what_it_could_not_do(tmp_path: Path) -> None:
    import click

    from nanofleet.config import parse_fleet
    from nanofleet.controller.enroll import sync_broker

    etc = tmp_path / "etc"
    one = parse_fleet(f"fleet: demo\nbroker: {{password_file: {etc / 'p'}}}\n")
    with pytest.raises(click.ClickException, match=r"set broker\.acl_file too"):
        sync_broker(one, tmp_path)
    pid = etc / "pid"
    both = parse_fleet(f"fleet: demo\nbroker: {{password_file: {etc / 'p'}, acl_file: {etc / 'a'}, pid_file: {pid}}}\n")
    done, line = sync_broker(both, tmp_path)
    assert not done and f"no broker pid in broker.pid_file {pid}" in line and (etc / "p").exists()
    assert (etc / "p").stat().st_mode & 0o777 == 0o640  # made readable by the broker's group
    pid.write_text("999999999")  # beyond any pid
    done, line = sync_broker(both, tmp_path)
    assert not done and "no process 999999999" in line and "start the broker" in line


def test_revoke_without_a_reachable_broker_prints_the_command_to_replace_the_status(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: demo\nbroker: {{url: 'mqtt://127.0.0.1:{free_port()}'}}\n")
    state = tmp_path / "state"
    assert _cli("enroll", "pi-9", "--config", str(fleet), "--state-dir", str(state), "--init").exit_code == 0
    r = _cli("revoke", "pi-9", "--config", str(fleet), "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    assert "warning: retained status not replaced (cannot reach the broker at" in r.output
    assert "mosquitto_pub -r -q 1 -u controller -P PASSWORD -t nanofleet/v1/demo/pi-9/status -m '{" in r.output
