"""The installer's files agree with each other and with the docs, without running anything heavy: the role's
names are the unit's and sysusers' names, every variable is documented, the unit gives apps the socket by group
(no ExecStartPost chmod), the example inventory and the playbook parse (`ansible-playbook --syntax-check`)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.contract.test_docs import doc_rows, section
from tests.deploy.unit_file import parse_unit

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "deploy" / "ansible"
SYSTEMD = ROOT / "deploy" / "systemd"
DEFAULTS = yaml.safe_load((ANSIBLE / "roles" / "nanofleet_agent" / "defaults" / "main.yml").read_text())
PLAY = yaml.safe_load((ANSIBLE / "agent.yml").read_text())[0]
PLAY_VARS = set(re.findall(r"\b(nanofleet_\w+)", f"{PLAY['serial']} {PLAY['max_fail_percentage']}"))


def test_the_role_uses_the_units_and_sysusers_names() -> None:
    unit = parse_unit(SYSTEMD / "nanofleet-agent.service")
    kind, name, _, comment, home, *_ = shlex.split(
        next(line for line in (SYSTEMD / "nanofleet.sysusers.conf").read_text().splitlines()
             if line.startswith("u ")))
    assert (kind, DEFAULTS["nanofleet_user"], DEFAULTS["nanofleet_group"]) == ("u", name, name)
    assert (unit.one("User"), unit.one("Group")) == (name, name)
    tasks = (ANSIBLE / "roles" / "nanofleet_agent" / "tasks" / "main.yml").read_text()
    assert f"comment: {comment}" in tasks and 'home: "{{ nanofleet_root }}' + home + '"' in tasks
    argv = unit.argv
    assert argv[0] == "/opt/nanofleet/bin/nanofleet" and DEFAULTS["_nanofleet_venv"].endswith("/opt/nanofleet")
    assert argv[argv.index("--config") + 1] == "/etc/nanofleet/agent.yaml"
    assert DEFAULTS["_nanofleet_socket"].endswith(argv[argv.index("--socket") + 1])


def test_the_unit_gives_the_socket_to_its_group_without_a_chmod() -> None:
    unit = parse_unit(SYSTEMD / "nanofleet-agent.service")
    assert "ExecStartPost" not in unit.service and "ExecStartPre" not in unit.service
    sock = Path(unit.argv[unit.argv.index("--socket") + 1])
    assert sock.parent == Path("/run") / unit.one("RuntimeDirectory")
    assert unit.one("RuntimeDirectoryMode") == "0750" and unit.one("Group") == "nanofleet"
    assert int(unit.one("UMask"), 8) & 0o060 == 0  # the group keeps read/write on what the agent creates


def test_every_installer_variable_is_documented_and_every_documented_one_exists() -> None:
    rows = doc_rows(section((ROOT / "docs" / "operations.md").read_text(), "Installing agents with Ansible"))
    documented = set(rows)
    public = {k for k in DEFAULTS if not k.startswith("_")} | PLAY_VARS
    assert sorted(public - documented) == [] and sorted(documented - public) == []
    for name, rest in rows.items():  # the default column says the role's default
        default, cell = DEFAULTS.get(name), rest.split("|")[0]
        if isinstance(default, bool):
            assert f"`{str(default).lower()}`" in cell, name
        elif isinstance(default, int | str) and "{{" not in str(default) and "/" not in str(default):
            assert f"`{default}`" in cell or (default == "" and '`""`' in cell), name


def test_the_example_inventory_and_the_playbook_parse() -> None:
    inventory = yaml.safe_load((ANSIBLE / "inventory.example.yml").read_text())
    assert list(inventory) == [PLAY["hosts"]]
    used = {k for host in inventory[PLAY["hosts"]]["hosts"].values() for k in host} | set(
        inventory[PLAY["hosts"]]["vars"])
    unknown = {k for k in used if k.startswith("nanofleet_")} - set(DEFAULTS) - PLAY_VARS
    assert unknown == set()
    playbook = Path(sys.executable).parent / "ansible-playbook"
    p = subprocess.run([str(playbook), "--syntax-check", "-i", "inventory.example.yml", "agent.yml"], cwd=ANSIBLE,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
