"""`python -m bench [names...]`: run the benchmarks and write bench/report.md + bench/report.json."""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if argv:
        names = [n for n in names if any(a in n for a in argv)]
    results, failed = [], []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            result = importlib.import_module(f"bench.{name}").run()
        except Exception:  # noqa: BLE001 - one broken bench must not hide the others' figures: its traceback is reported
            failed.append(name)
            result = {"name": name, "error": traceback.format_exc(), "figures": {},
                      "markdown": f"**failed**\n\n```\n{traceback.format_exc()}\n```"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        results.append(result)
        print(result.get("markdown", ""), flush=True)
    header = (f"# nanofleet benchmarks\n\n{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {platform.machine()} · "
              f"{platform.python_implementation()} {platform.python_version()} · command: `make bench`\n\n"
              "All figures compare our path with a baseline measured side by side in the same run.\n")
    body = "\n".join(f"## {r['name']}\n\n{r.get('markdown', '')}\n\n_{r['seconds']} s_\n" for r in results)
    (HERE / "report.md").write_text(header + "\n" + body, encoding="utf-8")
    (HERE / "report.json").write_text(json.dumps({"results": results}, indent=2, default=str), encoding="utf-8")
    print(f"wrote {HERE / 'report.md'} and report.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
