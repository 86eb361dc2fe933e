"""The dependency between the top-level folders goes one way: `protos/` ← `nanofleet/` (what both sides share, and the
CLI) ← `agent/`, `controller/`. A shared module that imported the agent (the simulator once took its thermal scale
from `nanofleet.agent.thermal`; enroll the agent's settings) would make `nanofleet/` and `agent/` depend on each
other. The CLI reaches the parts only when a command runs: by name (cli.py's table) or one import inside a function,
listed below."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("nanofleet.agent", "nanofleet.controller")
# modules of nanofleet/ that only the command line uses: the parts must not import them
CLI_ONLY = {"nanofleet.cli", "nanofleet.__main__", "nanofleet.up", "nanofleet.sim", "nanofleet.sim_device",
            "nanofleet.supervisor"}
# (module, what it imports inside a command's function): the CLI starting a part, never the other way round
CLI_REACHES = {("nanofleet.up", "nanofleet.controller.enroll")}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "nanofleet":  # setup.py maps agent/ → nanofleet.agent, controller/ → …, protos/ → …
        parts.insert(0, "nanofleet")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported module, at module level) for every import in `path`, relative ones resolved."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    in_function = {id(node) for f in functions for node in ast.walk(f) if node is not f}
    for node in ast.walk(tree):
        at_top = id(node) not in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, at_top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, at_top
            for alias in node.names:  # `from nanofleet import thermal` names a module too
                yield f"{base}.{alias.name}", at_top


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts and not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def _under(target: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _reach(module: str, target: str) -> bool:
    return any(module == m and _under(target, (t,)) for m, t in CLI_REACHES)


def test_nanofleet_imports_neither_part() -> None:
    bad = sorted((_module(f), target) for f in _files("nanofleet") for target, _ in _imports(f)
                 if _under(target, PARTS) and not _reach(_module(f), target))
    assert bad == [], f"nanofleet/ imports a part (move the shared piece into nanofleet/ or protos/): {bad}"


def test_the_cli_reaches_a_part_only_inside_a_command() -> None:
    for f in _files("nanofleet"):
        for target, at_top in _imports(f):
            if _reach(_module(f), target):
                assert not at_top, f"{_module(f)} imports {target} at module level"


def test_the_parts_and_protos_do_not_import_the_cli() -> None:
    bad = sorted((_module(f), target) for folder in ("agent", "controller", "protos") for f in _files(folder)
                 for target, _ in _imports(f) if _under(target, CLI_ONLY))
    assert bad == [], f"a part imports a command-line module of nanofleet/: {bad}"


def test_protos_import_nothing_of_ours_but_protos() -> None:
    bad = sorted((_module(f), target) for f in _files("protos") for target, _ in _imports(f)
                 if _under(target, ("nanofleet",)) and not _under(target, ("nanofleet.protos",)))
    assert bad == [], bad


def test_importing_every_shared_and_cli_module_loads_no_part() -> None:
    """The same, as the interpreter sees it (a probe like test_packaging's)."""
    modules = [_module(f) for f in _files("nanofleet") if _module(f) != "nanofleet.__main__"]
    probe = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
             f"print(','.join(sorted(m for m in sys.modules if m.startswith({PARTS!r}))))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"importing nanofleet/ loaded part modules: {out.stdout}"
