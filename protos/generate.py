"""Regenerate the committed Python code for the .proto files.

protoc writes imports from the path it is given, so it gets a proto root in which `nanofleet/protos` links to this
folder: the generated files then import `from nanofleet.protos import …`, which is how the package is installed.
Used by `make protos` (writes here) and by the test that checks the committed files are fresh (writes elsewhere).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("fleet.proto", "inference.proto")


def generate(out_dir: Path) -> list[Path]:
    """Generate *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into `out_dir`; return the files written."""
    from grpc_tools import protoc  # dev extra only

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "nanofleet").mkdir(parents=True)
        (root / "nanofleet" / "protos").symlink_to(HERE)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            f"--pyi_out={gen}",
            *(f"nanofleet/protos/{name}" for name in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        written = []
        for f in sorted((gen / "nanofleet" / "protos").iterdir()):
            shutil.copy(f, out_dir / f.name)
            written.append(out_dir / f.name)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for path in generate(target):
        print(path)
