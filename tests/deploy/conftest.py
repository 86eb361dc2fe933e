"""A target for the Ansible installer on this machine: an sshd on a loopback port (throwaway host and client keys,
root login by key only) and a staging root under /tmp, so the playbook runs for real over SSH without touching
/opt, /etc or /run. Needs root (the playbook creates system users) and openssh-server: `make test` installs it
(deploy/system-deps.sh sshd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import _port_open, free_port, wait_for

SSHD = "/usr/sbin/sshd"


@dataclass
class SshTarget:
    port: int
    key: Path
    known_hosts: Path


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshTarget]:
    if os.geteuid() != 0:
        pytest.fail("the installer test needs root: the playbook creates system users and groups")
    if not os.access(SSHD, os.X_OK) or not shutil.which("ssh-keygen"):
        pytest.fail(f"{SSHD} missing: install it with `sh deploy/system-deps.sh sshd` (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host.pub').read_text()}")
    conf = d / "sshd_config"
    conf.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "Subsystem sftp internal-sftp", "LogLevel ERROR",
        # the key lives under /tmp (1777), which StrictModes refuses whatever the file's own modes (0700 root)
        "StrictModes no", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    log = (d / "sshd.log").open("wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _port_open(port) or proc.poll() is not None, timeout=20, what="sshd listening")
        assert proc.poll() is None, (d / "sshd.log").read_text()
        yield SshTarget(port, d / "client", d / "known_hosts")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def stage_root() -> Iterator[Path]:
    """A folder the service user can traverse (pytest's own tmp is 0700 root): the playbook's nanofleet_root."""
    root = Path(tempfile.mkdtemp(prefix="nanofleet-stage-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@dataclass
class Users:
    service: str
    app: str
    outsider: str


@pytest.fixture(scope="module")
def users() -> Iterator[Users]:
    """Names unique to this run: the service user/group the playbook creates, an app user it adds to the group, and
    a user it does not. All removed afterwards."""
    tag = os.getpid() % 100_000
    u = Users(f"nft{tag}", f"nfa{tag}", f"nfo{tag}")
    _remove(u)  # what a killed earlier run with the same pid may have left
    for name in (u.app, u.outsider):
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield u
    finally:
        _remove(u)


def _remove(u: Users) -> None:
    """userdel/groupdel each name; one that does not exist is not an error here."""
    for name in (u.app, u.outsider, u.service):
        subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["groupdel", u.service], capture_output=True, check=False)
