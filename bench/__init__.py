"""Benchmarks: each `bench/bench_*.py` exposes `run() -> dict` ({"name", "figures", "markdown"}); `make bench` runs them
all and writes bench/report.md and bench/report.json. Figures are ratios measured side by side in one run."""
