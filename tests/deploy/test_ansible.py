"""The Ansible installer (deploy/ansible) run for real over SSH against this machine: it creates the system user and
group, a venv with the wheel built from this tree, agent.yaml from a real `nanofleet enroll`, the hardened unit; a
second run changes nothing. The installed agent, started as its unit says (systemd is not PID 1 here), comes online
at a real controller through a real Mosquitto with its enrolled credentials; apps in the group reach its socket,
others do not; the health check the rolling upgrade relies on fails when the agent is down."""

from __future__ import annotations

import base64
import contextlib
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nanofleet.broker import CONTROLLER_USER, BrokerAccounts, write_mosquitto_config
from nanofleet.controller.enroll import enroll
from tests.conftest import _port_open, free_port, mosquitto_binary, wait_for
from tests.deploy.conftest import SshTarget, Users
from tests.deploy.unit_file import parse_unit, start_as_unit
from tests.e2e.cloud_procs import Proc, clean_env

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "deploy" / "ansible"
UNIT = ROOT / "deploy" / "systemd" / "nanofleet-agent.service"
DEVICE = "pi-ansible-01"
BIN = Path(sys.executable).parent


@dataclass
class Fleet:
    state: Path
    config: Path
    controller_data: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Mosquitto with the fleet's accounts and ACL, the device enrolled against it, and `nanofleet controller`."""
    d = tmp_path_factory.mktemp("fleet")
    state, port = d / "state", free_port()
    accounts = BrokerAccounts(state, "demo")
    password = accounts.ensure(CONTROLLER_USER, "controller")
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(write_mosquitto_config(accounts, "127.0.0.1", port))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "broker" / "broker.pid").write_text(str(broker.pid))
    config = d / "fleet.yaml"
    config.write_text(f"fleet: demo\nbroker: {{url: 'mqtt://127.0.0.1:{port}'}}\n"
                      f"controller: {{listen: '127.0.0.1:{free_port()}'}}\n")
    controller = Proc("controller", ["controller", "--config", str(config), "--data-dir", str(d / "controller"),
                                     "--mqtt-username", CONTROLLER_USER],
                      clean_env(NANOFLEET_MQTT_PASSWORD=password), d / "controller.log", ready="")
    try:
        wait_for(lambda: _port_open(port), timeout=20, what="mosquitto listening")
        result = CliRunner().invoke(enroll, [DEVICE, "--config", str(config), "--state-dir", str(state),
                                             "--gateway", f"127.0.0.1:{free_port()}"])
        assert result.exit_code == 0 and "broker reloaded" in result.output, result.output
        controller.start()
        yield Fleet(state, config, d / "controller")
    finally:
        controller.stop()
        broker.terminate()
        broker.wait(10)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's wheel of this tree (`pip wheel --no-deps .`)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=120)
    return next(out.glob("nanofleet-*.whl"))


def _agent_requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines (its METADATA): what the agent extra pulls in, the wheelhouse's key."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return [line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]


@pytest.fixture(scope="module")
def wheelhouse(wheel: Path) -> Path:
    """nanofleet[agent]'s dependencies as wheels in a folder the playbook installs from with `--no-index
    --find-links` (the path docs/operations.md gives fleets without internet). Downloading and resolving them
    against the index is most of an install's time (~100 s on a loaded CI box, ~15 s from the folder), so the folder
    is kept between runs under ~/.cache, keyed by the wheel's requirements and this Python: a changed requirement
    makes a new one. The install itself (the real 275 MB venv, every file unpacked) is done in full by every run."""
    reqs = _agent_requirements(wheel)
    key = hashlib.sha256("\n".join([sys.version, sys.platform, *reqs]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanofleet-tests"
    house = cache / f"agent-wheels-{key}"
    if not house.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="agent-wheels-", dir=cache))
        p = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(staging), f"{wheel}[agent]"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"pip download of the agent's dependencies failed: {p.stderr[-3000:]}"
        for own in staging.glob("nanofleet-*"):
            own.unlink()  # the playbook's wheel comes from nanofleet_wheel, never from here
        with contextlib.suppress(OSError):  # another run made it first: theirs holds the same wheels
            staging.rename(house)
        shutil.rmtree(staging, ignore_errors=True)
    return house


@dataclass
class Run:
    rc: int
    output: str
    seconds: float

    def recap(self, host: str = DEVICE) -> dict[str, int]:
        m = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", self.output, re.M)
        assert m, self.output[-3000:]
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


@dataclass
class Playbook:
    """ansible-playbook agent.yml from deploy/ansible, with the test's inventory (an `-i` in `args` replaces it)."""

    inventory: Path
    env: dict[str, str]

    def __call__(self, *args: str) -> Run:
        t0 = time.monotonic()
        inv = [] if "-i" in args else ["-i", str(self.inventory)]
        p = subprocess.run([str(BIN / "ansible-playbook"), *inv, "agent.yml", *args], cwd=ANSIBLE, env=self.env,
                           capture_output=True, text=True, timeout=240)
        return Run(p.returncode, p.stdout + p.stderr, time.monotonic() - t0)


@pytest.fixture(scope="module")
def playbook(sshd: SshTarget, stage_root: Path, users: Users, fleet: Fleet, wheel: Path, wheelhouse: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Playbook]:
    d = tmp_path_factory.mktemp("ansible")
    inventory = d / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"nanofleet_agents": {"hosts": {DEVICE: {
        "ansible_host": "127.0.0.1", "ansible_port": sshd.port, "ansible_user": "root",
        "ansible_ssh_private_key_file": str(sshd.key), "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_ssh_common_args": f"-o UserKnownHostsFile={sshd.known_hosts} -o StrictHostKeyChecking=yes",
        "nanofleet_root": str(stage_root), "nanofleet_user": users.service, "nanofleet_group": users.service,
        "nanofleet_wheel": str(wheel), "nanofleet_enroll_dir": str(fleet.state / "devices"),
        "nanofleet_app_users": [users.app], "nanofleet_systemd": False, "nanofleet_python": "/usr/bin/python3",
        "nanofleet_health_retries": 20, "nanofleet_pip_args": f"--no-index --find-links {wheelhouse}"}}}}))
    env = clean_env(ANSIBLE_HOME=str(d / "home"), ANSIBLE_LOCAL_TEMP=str(d / "tmp"), ANSIBLE_NOCOLOR="1",
                    ANSIBLE_REMOTE_TMP=str(d / "remote"), ANSIBLE_SSH_CONTROL_PATH_DIR=str(d / "cp"),
                    PATH=f"{BIN}:{os.environ['PATH']}")
    if not (BIN / "ansible-playbook").exists():
        pytest.fail("ansible-playbook missing: pip install -e '.[dev]' (the deploy extra brings ansible-core)")
    yield Playbook(inventory, env)
    for master in (d / "cp").glob("*"):  # ansible's ssh ControlPersist masters outlive the play by 60 s
        subprocess.run(["ssh", "-o", f"ControlPath={master}", "-O", "exit", "-p", str(sshd.port), "root@127.0.0.1"],
                       capture_output=True, timeout=10, check=False)


@pytest.fixture(scope="module")
def first_run(playbook: Playbook) -> Run:
    run = playbook("--skip-tags", "health")  # nothing is started yet: systemd is not PID 1 here
    assert run.rc == 0, run.output[-4000:]
    print(f"first run: {run.seconds:.1f} s")
    return run


@pytest.fixture(scope="module")
def agent(first_run: Run, stage_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The installed agent, started exactly as the installed unit's [Service] says; yields its socket path."""
    unit = parse_unit(stage_root / "etc" / "systemd" / "system" / "nanofleet-agent.service")
    log = tmp_path_factory.mktemp("agent") / "agent.log"
    proc = start_as_unit(unit, stage_root, log)
    sock = Path(unit.argv[unit.argv.index("--socket") + 1])
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, timeout=60, what="the agent's socket")
        assert proc.poll() is None, log.read_text()
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# -- the install -----------------------------------------------------------------------------------------------------

def test_the_playbook_installs_user_venv_config_and_unit(first_run: Run, stage_root: Path, users: Users,
                                                         fleet: Fleet) -> None:
    assert first_run.recap()["changed"] >= 8 and first_run.recap()["failed"] == 0
    svc = pwd.getpwnam(users.service)
    group = grp.getgrnam(users.service)
    assert svc.pw_gid == group.gr_gid and svc.pw_shell == "/usr/sbin/nologin" and svc.pw_uid < 1000
    assert svc.pw_dir == f"{stage_root}/var/lib/nanofleet" and svc.pw_gecos == "nanofleet services"
    assert users.app in group.gr_mem and users.outsider not in group.gr_mem

    conf = stage_root / "etc" / "nanofleet" / "agent.yaml"
    st = conf.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 0, group.gr_gid)
    assert conf.read_bytes() == (fleet.state / "devices" / DEVICE / "agent.yaml").read_bytes()
    etc = (stage_root / "etc" / "nanofleet").stat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_gid) == (0o750, group.gr_gid)

    venv = stage_root / "opt" / "nanofleet"
    version = subprocess.run([str(venv / "bin" / "nanofleet"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert "0.1.0" in version
    subprocess.run([str(venv / "bin" / "python"), "-c", "import xllamacpp, uvloop, fastapi"], check=True)
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import google.genai"],
                          capture_output=True).returncode != 0  # the agent extra only

    # the repository's unit, byte for byte, with only its paths moved under the staging root and the names set
    installed = (stage_root / "etc" / "systemd" / "system" / "nanofleet-agent.service").read_text()
    expected = UNIT.read_text()
    for path in ("/opt/nanofleet", "/etc/nanofleet", "/run/nanofleet", "/var/lib/nanofleet"):
        expected = expected.replace(path, f"{stage_root}{path}")
    expected = expected.replace("User=nanofleet", f"User={users.service}").replace(
        "Group=nanofleet", f"Group={users.service}")
    assert installed == expected


def test_the_installed_unit_passes_systemd_analyze_verify(first_run: Run, stage_root: Path) -> None:
    """The installed unit, and the controller's and gateway's with their ExecStart pointed at the installed venv
    (verify needs the binary to exist): no error, and no warning either (an unknown key is only a warning)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd (deploy/system-deps.sh systemd-analyze)"
    units = [stage_root / "etc" / "systemd" / "system" / "nanofleet-agent.service"]
    for name in ("nanofleet-controller.service", "nanofleet-gateway.service"):
        moved = stage_root / name
        moved.write_text((UNIT.parent / name).read_text().replace("/opt/nanofleet", f"{stage_root}/opt/nanofleet"))
        units.append(moved)
    for unit in units:
        p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stderr) == (0, ""), f"{unit.name}: {p.stderr}"


def _devices(fleet: Fleet) -> str:
    p = subprocess.run([str(BIN / "nanofleet"), "devices", "list", "--data-dir", str(fleet.controller_data)],
                       capture_output=True, text=True, env=clean_env())
    return p.stdout


def test_the_installed_agent_comes_online_at_the_controller(agent: Path, fleet: Fleet) -> None:
    wait_for(lambda: re.search(rf"^{DEVICE}\s+online\b", _devices(fleet), re.M), timeout=60, interval=0.5,
             what=f"{DEVICE} online in `nanofleet devices list`")


def test_a_second_run_changes_nothing_and_its_health_check_passes(agent: Path, playbook: Playbook,
                                                                  fleet: Fleet) -> None:
    wait_for(lambda: re.search(rf"^{DEVICE}\s+online\b", _devices(fleet), re.M), timeout=60, interval=0.5,
             what=f"{DEVICE} online")
    run = playbook()
    print(f"second run: {run.seconds:.1f} s")
    assert run.rc == 0, run.output[-4000:]
    recap = run.recap()
    assert recap["changed"] == 0 and recap["failed"] == 0, run.output[-4000:]
    assert f"{DEVICE}: model " in run.output and "mqtt connected True" in run.output


def _release(wheel: Path, version: str, out: Path) -> Path:
    """The same wheel as release `version` (METADATA, dist-info folder, RECORD rewritten): an upgrade to install."""
    old = wheel.name.split("-")[1]
    target = out / wheel.name.replace(f"-{old}-", f"-{version}-")
    records: list[str] = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            name = info.filename.replace(f"nanofleet-{old}.dist-info/", f"nanofleet-{version}.dist-info/")
            if name.endswith(".dist-info/RECORD"):
                record = name
                continue
            data = src.read(info)
            if name.endswith(".dist-info/METADATA"):
                data = data.replace(f"\nVersion: {old}\n".encode(), f"\nVersion: {version}\n".encode())
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
            dst.writestr(name, data)
        dst.writestr(record, "\n".join([*records, f"{record},,"]) + "\n")
    return target


def test_an_upgrade_installs_the_new_release_and_passes_its_health_check(
        agent: Path, playbook: Playbook, wheel: Path, stage_root: Path, tmp_path: Path) -> None:
    """A new wheel: copied, installed (deps kept), remembered (so a rerun skips pip, as the second run shows);
    the health check runs after it."""
    new = _release(wheel, "0.1.1", tmp_path)
    run = playbook("-e", f"nanofleet_wheel={new}")
    print(f"upgrade run: {run.seconds:.1f} s")
    assert run.rc == 0 and run.recap()["changed"] >= 3, run.output[-4000:]
    assert "mqtt connected True" in run.output
    venv = stage_root / "opt" / "nanofleet"
    out = subprocess.run([str(venv / "bin" / "nanofleet"), "--version"], capture_output=True, text=True, check=True)
    assert "0.1.1" in out.stdout
    assert (venv / ".installed-wheel").read_text() == hashlib.sha1(new.read_bytes()).hexdigest()  # a rerun: quiet


def _connect_as(user: str, sock: Path, python: Path) -> subprocess.CompletedProcess[str]:
    pw = pwd.getpwnam(user)
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(type(e).__name__); sys.exit(3)\n"
             "s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n"
             "print(s.recv(64).decode().splitlines()[0])\n")
    return subprocess.run([str(python), "-c", probe, str(sock)], capture_output=True, text=True, timeout=30,
                          user=pw.pw_uid, group=pw.pw_gid, extra_groups=os.getgrouplist(user, pw.pw_gid))


def test_apps_in_the_group_reach_the_socket_and_others_do_not(agent: Path, stage_root: Path, users: Users) -> None:
    folder = agent.parent.stat()
    assert stat.S_IMODE(folder.st_mode) == 0o750 and folder.st_gid == grp.getgrnam(users.service).gr_gid
    sock = agent.stat()
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == grp.getgrnam(users.service).gr_gid
    python = stage_root / "opt" / "nanofleet" / "bin" / "python"
    app = _connect_as(users.app, agent, python)
    assert app.returncode == 0 and app.stdout.strip() == "HTTP/1.1 200 OK", app.stdout + app.stderr
    outsider = _connect_as(users.outsider, agent, python)
    assert outsider.returncode == 3 and outsider.stdout.strip() == "PermissionError", outsider.stdout + outsider.stderr


def test_a_rolling_run_stops_at_the_first_batch_that_fails_its_health_check(
        agent: Path, playbook: Playbook, stage_root: Path, tmp_path: Path) -> None:
    """serial 1, max_fail_percentage 0: the first host's agent is down, so the healthy second host is never
    touched (what keeps a bad upgrade to one batch)."""
    inventory = yaml.safe_load(playbook.inventory.read_text())
    hosts = inventory["nanofleet_agents"]["hosts"]
    broken = {**hosts[DEVICE], "_nanofleet_socket": f"{stage_root}/run/absent.sock", "nanofleet_health_retries": 1}
    inventory["nanofleet_agents"]["hosts"] = {"pi-broken": broken, DEVICE: hosts[DEVICE]}
    (tmp_path / "rolling.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    run = playbook("--tags", "health", "-i", str(tmp_path / "rolling.yml"), "-e", "nanofleet_serial=1")
    assert run.rc != 0 and run.recap("pi-broken")["failed"] == 1, run.output[-3000:]
    assert "fatal: [pi-broken]" in run.output and "The agent answers /v1/status on its socket" in run.output
    assert not re.search(rf"^{DEVICE}\s*:", run.output, re.M), run.output[-3000:]  # never reached
    assert f"[{DEVICE}]" not in run.output
