"""Runs mypy on the installed package layout (agent/ → nanofleet.agent, …), which setup.py maps from top-level folders.

mypy cannot follow setuptools' editable-install finder, so this lays the same layout out as symlinks in
.typecheck/nanofleet and checks `-p nanofleet` there. Exit status is mypy's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".typecheck"


def main() -> int:
    shutil.rmtree(TREE, ignore_errors=True)
    pkg = TREE / "nanofleet"
    pkg.mkdir(parents=True)
    for folder in ("agent", "controller", "protos"):
        (pkg / folder).symlink_to(ROOT / folder, target_is_directory=True)
    for f in (ROOT / "nanofleet").glob("*.py"):
        (pkg / f.name).symlink_to(f)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "nanofleet",
           *sys.argv[1:]]
    return subprocess.call(cmd, cwd=TREE)


if __name__ == "__main__":
    sys.exit(main())
