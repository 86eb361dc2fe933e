"""A device install stays small: `nanofleet[agent]` pulls nothing controller-only, and the agent never imports it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER_ONLY = ("google-genai", "amqtt", "grpcio-health-checking", "playwright", "jinja2")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_agent_extra_pulls_nothing_controller_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    device = _names(project["dependencies"]) | _names(project["optional-dependencies"]["agent"])
    assert not device & set(CONTROLLER_ONLY), device & set(CONTROLLER_ONLY)
    assert "google-genai" in _names(project["optional-dependencies"]["controller"])


def test_running_the_agent_imports_no_controller_code() -> None:
    probe = (
        "import sys, nanofleet.agent.service, nanofleet.agent.cli, nanofleet.agent.device_session\n"
        "from nanofleet.cli import main\n"
        "main.get_command(None, 'agent')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('nanofleet.controller', 'google.genai', 'amqtt')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"the agent imports controller-side modules: {out.stdout}"


def test_every_package_data_pattern_ships_something() -> None:
    """No package-data for files or folders that do not exist (a pattern matching nothing hides a typo)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    packages = [p for folder in ("agent", "controller", "nanofleet", "protos")
                for p in [ROOT / folder, *(ROOT / folder).rglob("*")] if p.is_dir() and "__pycache__" not in p.parts]
    for pattern in patterns:
        assert any(any(f.is_file() for f in pkg.glob(pattern)) for pkg in packages), f"{pattern!r} matches no file"
