"""`nanofleet enroll` and the pieces of `nanofleet up` that stand alone: ports, the supervisor."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import yaml
from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.config import load_fleet
from nanofleet.supervisor import Child, StartError, Supervisor, tcp_open
from nanofleet.tcp import free_port
from nanofleet.up import _operator_token_line, choose_ports
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_enroll_writes_a_private_agent_yaml_with_broker_account_and_gateway_token(tmp_path: Path) -> None:
    from nanofleet.controller.gateway.auth import list_tokens

    tmp_path = tmp_path / "state"  # does not exist yet: enroll creates it private

    result = CliRunner().invoke(main, ["enroll", "pi-lab-01", "--config", str(ROOT / "fleet.yaml"),
                                       "--state-dir", str(tmp_path), "--init"])
    assert result.exit_code == 0, result.output
    agent_yaml = tmp_path / "devices" / "pi-lab-01" / "agent.yaml"
    assert agent_yaml.stat().st_mode & 0o777 == 0o600
    settings = yaml.safe_load(agent_yaml.read_text())
    assert settings["device_id"] == settings["mqtt_username"] == "pi-lab-01"
    assert len(settings["mqtt_password"]) >= 24 and len(settings["gateway_token"]) >= 24
    assert not {"data_dir", "socket_path", "sysfs_root"} & set(settings), "controller-host paths leaked to the device"
    assert tmp_path.stat().st_mode & 0o077 == 0
    accounts = yaml.safe_load((tmp_path / "broker" / "accounts.json").read_text())
    assert accounts["pi-lab-01"]["role"] == "device" and accounts["pi-lab-01"]["password"] == settings["mqtt_password"]
    tokens = list_tokens(tmp_path / "gateway" / "gateway.db")
    assert [(t.device_id, t.group) for t in tokens] == [("pi-lab-01", "kiosks")]
    # Enrolling again keeps the same credentials (a re-run must not lock a deployed device out).
    again = CliRunner().invoke(main, ["enroll", "pi-lab-01", "--config", str(ROOT / "fleet.yaml"),
                                      "--state-dir", str(tmp_path)])
    assert again.exit_code == 0
    assert yaml.safe_load(agent_yaml.read_text())["mqtt_password"] == settings["mqtt_password"]


def test_enroll_refuses_a_device_id_that_could_escape_its_acl(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["enroll", "a/#", "--config", str(ROOT / "fleet.yaml"),
                                       "--state-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "invalid device 'a/#'" in result.output


def test_a_busy_configured_port_is_replaced_and_reported() -> None:
    import socket

    cfg = load_fleet(ROOT / "fleet.yaml")
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cfg = cfg.model_copy(update={"controller": cfg.controller.model_copy(update={"listen": f"127.0.0.1:{port}"})})
        ports, notes = choose_ports(cfg, free=False)
    finally:
        busy.close()
    assert ports.controller != port
    assert notes == [f"port {port} for the controller is in use; using {ports.controller}"]


def test_a_child_that_dies_while_starting_is_reported_with_its_log(tmp_path: Path) -> None:
    child = Child("broken", [sys.executable, "-c", "import sys; print('cannot bind'); sys.exit(3)"],
                  tmp_path / "broken.log", ready=lambda: False)
    try:
        Supervisor().start(child)
    except StartError as exc:
        assert "broken exited with code 3 while starting" in str(exc)
        assert "cannot bind" in str(exc)
    else:
        raise AssertionError("StartError not raised")


def test_children_are_stopped_in_reverse_order_and_leave_no_orphans(tmp_path: Path) -> None:
    sup = Supervisor()
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        server = (f"import socket,signal,sys,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); "
                  f"signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1],'a').write('{i}'), sys.exit(0))); "
                  "time.sleep(600)")
        sup.start(Child(f"c{i}", [sys.executable, "-c", server, str(tmp_path / "order")], tmp_path / f"c{i}.log",
                        tcp_open("127.0.0.1", port)))
    pids = [c.proc.pid for c in sup.children if c.proc]
    assert sup.stop_all() == {"c1": 0, "c0": 0}
    assert (tmp_path / "order").read_text() == "10"
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_a_restarted_child_reports_only_its_own_output(tmp_path: Path) -> None:
    """`up` shows the operator token from this run's controller output, never a stale one from an earlier run."""
    log = tmp_path / "controller.log"
    log.write_text("operator token: nft_old (shown once)\n")
    child = Child("controller", [sys.executable, "-c", "print('dashboard: http://127.0.0.1:1/')"], log,
                  ready=lambda: True)
    child.start()
    assert child.proc is not None and child.proc.wait(10) == 0
    assert child.output() == "dashboard: http://127.0.0.1:1/\n"
    assert "nft_old" not in _operator_token_line(tmp_path, child)
    assert "nft_old" in log.read_text()  # the log itself keeps every run


def _server(port: int) -> list[str]:
    return [sys.executable, "-c", f"import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, "
            f"socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',{port})); s.listen(); time.sleep(600)"]


def test_a_child_killed_with_9_is_restarted_while_the_others_keep_running(tmp_path: Path) -> None:
    """`kill -9` of the controller under `nanofleet up` stopped everything; any child is now restarted."""
    import signal
    import threading

    sup = Supervisor()
    ports = {"controller": free_port(), "agent": free_port()}
    for name, port in ports.items():
        sup.start(Child(name, _server(port), tmp_path / f"{name}.log", tcp_open("127.0.0.1", port),
                        restart_delay=0.2))
    controller, agent = sup.children
    assert controller.proc is not None and agent.proc is not None
    first, agent_pid = controller.proc.pid, agent.proc.pid
    lines: list[str] = []
    result: list[Child | None] = []
    waiter = threading.Thread(target=lambda: result.append(sup.wait(lines.append, install_signals=False)))
    waiter.start()
    try:
        controller.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: controller.proc is not None and controller.proc.pid != first and controller.alive()
                 and tcp_open("127.0.0.1", ports["controller"])(), timeout=20, what="the controller restarted")
        assert agent.proc.pid == agent_pid and agent.alive(), "the agent was stopped with the controller"
        assert any("controller exited (code -9); restarting in" in line for line in lines), lines
        assert any(line.startswith("controller restarted") for line in lines), lines
    finally:
        sup.request_stop()
        waiter.join(10)
        sup.stop_all()
    assert result == [None]


def test_a_child_crashing_at_once_again_and_again_stops_everything(tmp_path: Path) -> None:
    sup = Supervisor(max_crashes=3, crash_window_s=30)
    port = free_port()
    sup.start(Child("steady", _server(port), tmp_path / "steady.log", tcp_open("127.0.0.1", port)))
    sup.start(Child("broken", [sys.executable, "-c", "import sys; print('bad config'); sys.exit(3)"],
                    tmp_path / "broken.log", ready=lambda: True, restart_delay=0.05))
    lines: list[str] = []
    try:
        died = sup.wait(lines.append, install_signals=False)
    finally:
        codes = sup.stop_all()
    assert died is not None and died.name == "broken" and len(died.crashes) == 3
    assert lines[-1] == "broken exited (code 3): 3 crashes within 30s, giving up"
    assert sum("broken exited (code 3); restarting in" in line for line in lines) == 2
    assert "bad config" in died.tail()
    assert codes["steady"] is not None  # stopped by stop_all, not left running
