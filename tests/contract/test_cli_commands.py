"""The `nanofleet` command group (nanofleet/cli.py): commands are found lazily, a command whose extra is missing
says which extra to install instead of a traceback, and `nanofleet bench` runs only from a source checkout."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from nanofleet import cli


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An importable package whose `needs_extra` module imports a dependency that is not installed."""
    pkg = tmp_path / "nf_fake_cmds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_extra.py").write_text("import nf_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("nf_fake_cmds")]:
        del sys.modules[name]


def test_every_command_is_listed_in_help() -> None:
    result = CliRunner().invoke(cli.main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in [*cli.COMMANDS, "bench"]:
        assert f"  {name} " in result.output, name


def test_a_command_whose_module_is_absent_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", "nf_no_such_package.sub:ghost")
    monkeypatch.setitem(cli.COMMANDS, "ghost2", "nf_no_such_module:ghost")
    help_text = CliRunner().invoke(cli.main, ["--help"]).output
    assert "ghost" not in help_text
    result = CliRunner().invoke(cli.main, ["ghost"])
    assert result.exit_code == 2 and "No such command 'ghost'" in result.output


def test_a_command_missing_its_extra_names_the_dependency_and_the_extra(
        fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.COMMANDS, "needy", "nf_fake_cmds.needs_extra:cmd")
    result = CliRunner().invoke(cli.main, ["needy"])
    assert result.exit_code == 1
    assert "'nanofleet needy' needs a dependency that is not installed (nf_dependency_not_installed)" in result.output
    assert "pip install 'nanofleet[controller]'" in result.output
    assert "Traceback" not in result.output


def test_bench_outside_a_checkout_says_where_to_run_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, ["bench"])
    assert result.exit_code == 1
    assert "no bench/ folder here" in result.output


def test_bench_runs_the_checkouts_bench_with_names_and_passes_its_status(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__main__.py").write_text(
        "import sys\nprint('bench ran with', sys.argv[1:])\nsys.exit(3)\n")
    run = subprocess.run([sys.executable, "-m", "nanofleet", "bench", "socket", "ingest"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert "bench ran with ['socket', 'ingest']" in run.stdout
