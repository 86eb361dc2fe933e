"""Prints every module's line coverage from the last `make test` and fails naming each module under the floor.

`make test` runs pytest with `--cov` (configured in pyproject's [tool.coverage.*]: the processes the e2e tests start
are measured too and combined into one `.coverage`), then this. Modules are named as they are imported
(agent/router.py → nanofleet.agent.router), from setup.py's folder mapping, so the figures match the code's names.

Exit status: 0 when every module is at or above the floor (or with --report-only), 1 when some are under it,
2 when there is no coverage data to judge (pytest ran without --cov, or not at all).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import coverage

ROOT = Path(__file__).resolve().parent.parent
FLOOR = 80.0


@dataclass(frozen=True)
class Figure:
    module: str
    statements: int
    missing: int
    percent: float


def package_roots(setup_py: Path = ROOT / "setup.py") -> dict[str, str]:
    """folder → package name, read from setup.py's ROOTS so the two cannot disagree."""
    for node in ast.walk(ast.parse(setup_py.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ROOTS" for t in node.targets):
            roots: dict[str, str] = ast.literal_eval(node.value)
            return {folder: name for name, folder in roots.items()}
    raise SystemExit(f"coverage gate: no ROOTS mapping in {setup_py}")


def module_name(path: str, roots: dict[str, str]) -> str:
    """`agent/models/files.py` → `nanofleet.agent.models.files`; a path outside the mapped folders stays a path."""
    parts = Path(path).with_suffix("").parts
    if not parts or parts[0] not in roots:
        return path
    tail = [p for p in parts[1:] if p != "__init__"]
    return ".".join([roots[parts[0]], *tail])


def figures(data_file: Path, root: Path = ROOT) -> list[Figure]:
    """Per-module figures from a coverage data file, as coverage's own report computes them (pyproject's omit)."""
    cov = coverage.Coverage(data_file=str(data_file), config_file=str(root / "pyproject.toml"))
    cov.load()
    # A process that outlived pytest-cov's combine (a child still stopping) leaves its own file: count it too.
    if late := sorted(str(p) for p in data_file.parent.glob(f"{data_file.name}.*")):
        cov.combine(late)
        cov.save()
    roots = package_roots(root / "setup.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        report = json.loads(out.read_text())
    result = []
    for path, entry in report["files"].items():
        summary = entry["summary"]
        if not summary["num_statements"]:
            continue  # an empty __init__.py holds nothing to cover (the text report's skip_empty)
        rel = Path(path).resolve().relative_to(root.resolve()) if Path(path).is_absolute() else Path(path)
        result.append(Figure(module_name(str(rel), roots), summary["num_statements"], summary["missing_lines"],
                             summary["percent_covered"]))
    return sorted(result, key=lambda f: f.module)


def gate(data_file: Path, floor: float = FLOOR, report_only: bool = False, root: Path = ROOT) -> int:
    """Prints the table and the verdict; returns the exit status (see the module docstring)."""
    if not data_file.exists():
        print(f"coverage gate: no coverage data at {data_file}: run pytest with --cov (make test does)")
        return 2
    rows = figures(data_file, root)
    if not rows:
        print(f"coverage gate: {data_file} holds no measured module: run pytest with --cov (make test does)")
        return 2
    width = max(len(r.module) for r in rows)
    print(f"{'module':<{width}}  stmts  miss  cover")
    for r in rows:
        flag = f"  < {floor:g} %" if r.percent < floor else ""
        print(f"{r.module:<{width}}  {r.statements:5d}  {r.missing:4d}  {r.percent:5.1f} %{flag}")
    total = sum(r.statements for r in rows)
    missed = sum(r.missing for r in rows)
    print(f"{'TOTAL':<{width}}  {total:5d}  {missed:4d}  {100.0 * (total - missed) / max(total, 1):5.1f} %")
    under = [r for r in rows if r.percent < floor]
    if not under:
        print(f"coverage gate: every module at or above {floor:g} %")
        return 0
    names = ", ".join(f"{r.module} ({r.percent:.1f} %)" for r in under)
    print(f"coverage gate: {len(under)} module(s) under {floor:g} %: {names}")
    return 0 if report_only else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-file", type=Path, default=ROOT / ".coverage", help="combined coverage data")
    parser.add_argument("--floor", type=float, default=FLOOR, help="lowest acceptable percent per module")
    parser.add_argument("--report-only", action="store_true", help="print the figures, do not fail (make STRICT=0)")
    args = parser.parse_args(argv)
    return gate(args.data_file, args.floor, args.report_only)


if __name__ == "__main__":
    sys.exit(main())
