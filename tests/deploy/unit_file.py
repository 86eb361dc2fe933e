"""Start a program exactly as a systemd unit's [Service] section would, where systemd is not PID 1 (containers, CI):
the unit file is parsed, never hand-copied, so a test of the installed agent runs what the unit runs.

What is honoured: ExecStart (one command, line continuations, no specifiers), User, Group (with the user's own
supplementary groups, as systemd's initgroups), Environment, UMask, RuntimeDirectory/StateDirectory with their
modes (created under `root`/run and `root`/var/lib, owned by User:Group), and the variables systemd itself sets
(HOME, USER, LOGNAME, SHELL, PATH, RUNTIME_DIRECTORY, STATE_DIRECTORY). Sandboxing options are not applied: they
are checked by `systemd-analyze verify` instead."""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Unit:
    path: Path
    service: dict[str, list[str]] = field(default_factory=dict)

    def one(self, key: str, default: str | None = None) -> str:
        values = self.service.get(key)
        if not values:
            if default is None:
                raise KeyError(f"{self.path}: [Service] has no {key}=")
            return default
        return values[-1]

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.one("ExecStart"))

    @property
    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.service.get("Environment", []):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
        return env


def parse_unit(path: Path) -> Unit:
    """The [Service] section of a unit file: key -> every value given (continuation lines joined)."""
    unit = Unit(path)
    section, pending = "", ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            unit.service.setdefault(key.strip(), []).append(value.strip())
    return unit


def start_as_unit(unit: Unit, root: Path, log: Path) -> subprocess.Popen[bytes]:
    """Run the unit's ExecStart as systemd would; RuntimeDirectory/StateDirectory live under `root`."""
    user = pwd.getpwnam(unit.one("User"))
    group = grp.getgrnam(unit.one("Group", user.pw_name))
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": user.pw_dir,
           "USER": user.pw_name, "LOGNAME": user.pw_name, "SHELL": user.pw_shell, **unit.environment}
    for key, base, var in (("RuntimeDirectory", "run", "RUNTIME_DIRECTORY"),
                           ("StateDirectory", "var/lib", "STATE_DIRECTORY")):
        if key in unit.service:
            folder = root / base / unit.one(key)
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, user.pw_uid, group.gr_gid)
            os.chmod(folder, int(unit.one(f"{key}Mode", "0755"), 8))
            env[var] = str(folder)
    groups = [g for g in os.getgrouplist(user.pw_name, group.gr_gid) if g != group.gr_gid]
    with log.open("ab") as out:
        return subprocess.Popen(unit.argv, env=env, user=user.pw_uid, group=group.gr_gid, extra_groups=groups,
                                umask=int(unit.one("UMask", "0022"), 8), cwd="/", stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)
