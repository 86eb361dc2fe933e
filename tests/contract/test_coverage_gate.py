"""tools/coverage_gate.py: names each module under the floor and fails, judged on real coverage data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from coverage import CoverageData
from coverage.python import PythonParser

ROOT = Path(__file__).resolve().parents[2]


def _load_gate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("coverage_gate", ROOT / "tools" / "coverage_gate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def _statements(path: Path) -> set[int]:
    parser = PythonParser(filename=str(path))
    parser.parse_source()
    return set(parser.statements)


def _data(tmp_path: Path, executed: dict[str, float]) -> Path:
    """A real coverage data file in which each given repo file had the given share of its statements run."""
    data = CoverageData(basename=str(tmp_path / ".coverage"))
    lines = {}
    for rel, share in executed.items():
        stmts = sorted(_statements(ROOT / rel))
        lines[str(ROOT / rel)] = set(stmts[: round(len(stmts) * share)])
    data.add_lines(lines)
    data.write()
    return tmp_path / ".coverage"


def test_module_names_follow_setup_py_mapping() -> None:
    roots = gate.package_roots()
    assert gate.module_name("agent/models/files.py", roots) == "nanofleet.agent.models.files"
    assert gate.module_name("controller/gateway/__init__.py", roots) == "nanofleet.controller.gateway"
    assert gate.module_name("nanofleet/tcp.py", roots) == "nanofleet.tcp"
    assert gate.module_name("protos/topics.py", roots) == "nanofleet.protos.topics"


def test_names_each_module_under_the_floor_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path, {"protos/topics.py": 1.0, "agent/router.py": 0.5, "nanofleet/tcp.py": 0.0})
    assert gate.gate(data) == 1
    out = capsys.readouterr().out
    assert "nanofleet.protos.topics" in out and "100.0 %" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("coverage gate: 2 module(s) under 80 %")
    assert "nanofleet.agent.router (" in verdict and "nanofleet.tcp (0.0 %)" in verdict
    assert "nanofleet.protos.topics" not in verdict


def test_passes_when_every_module_is_at_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _data(tmp_path, {"protos/topics.py": 1.0, "nanofleet/tcp.py": 0.85})
    assert gate.gate(data) == 0
    assert capsys.readouterr().out.strip().endswith("every module at or above 80 %")


def test_report_only_prints_the_same_verdict_without_failing(tmp_path: Path) -> None:
    data = _data(tmp_path, {"nanofleet/tcp.py": 0.0})
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "coverage_gate.py"), "--data-file", str(data),
                          "--report-only"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "1 module(s) under 80 %: nanofleet.tcp (0.0 %)" in run.stdout


def test_counts_data_a_late_process_left_beside_the_combined_file(tmp_path: Path) -> None:
    combined = _data(tmp_path, {"nanofleet/tcp.py": 0.0})
    late = CoverageData(basename=str(combined), suffix="late.1")
    late.add_lines({str(ROOT / "nanofleet/tcp.py"): _statements(ROOT / "nanofleet/tcp.py")})
    late.write()
    [tcp] = gate.figures(combined)
    assert tcp.module == "nanofleet.tcp" and tcp.percent == 100.0
    assert not list(tmp_path.glob(".coverage.*")), "the late file is merged, not left to be counted twice"


def test_missing_data_is_an_error_not_a_pass(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "coverage_gate.py"), "--data-file",
                          str(tmp_path / "nothing")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "no coverage data" in run.stdout and "--cov" in run.stdout
