"""Ingest into PostgreSQL with 1, 2 and 4 controller processes, side by side with SQLite in the same run.

Same workload and machinery as bench/bench_ingest.py (pre-encoded agent telemetry written as raw MQTT packets to a
real mosquitto, QoS 0; controllers with the builtin reader; several split the load through `$share/`): the burst
("capacity") phase, so each figure is the consumers' drain rate. The PostgreSQL server is a throwaway one
(nanofleet.pg_server: initdb + pg_ctl in a temp folder, fsync off) on the same machine; each round gets a fresh
database. Also, in process and without MQTT: the store's own rate for the same batches on SQLite, on PostgreSQL by
COPY and by executemany (the store keeps the faster: COPY). The server's CPU per message is read from its
postmaster's own and reaped children's times, so where the CPU goes is in the report, with the machine's load.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_ingest import DEVICES, N_CAPACITY, _Mosquitto, _packets, _round

ROUNDS = (("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2), ("postgresql", 4))
_TICK = os.sysconf("SC_CLK_TCK")


def _server_cpu_s(data: Path) -> float:
    """CPU seconds of the server: its postmaster's own and its reaped children's (backends that have exited)."""
    pid = int((data / "postmaster.pid").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / _TICK  # utime, stime, cutime, cstime


def _pid_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:13]) / _TICK


def _store_rates(pg: Any, tmp: Path, batches: int = 15, size: int = 2000, reps: int = 3) -> dict[str, float]:
    """Rows/s of Store.apply for the same telemetry batches (one row per device a batch, as ingest makes them), and
    the CPU µs a row of this process (decode excluded: the store's Python and the driver) and of the server's
    backend that wrote them: CPU time is what the machine's other load changes least."""
    from nanofleet.controller.store import Batch, Store, TelemetryRow

    now = int(time.time() * 1000)
    work = [[TelemetryRow(f"dev-{d:05d}", 1, b % 256, now + b * 10, cpu_percent=12.5, ram_available_mb=2000,
                          temp_max_c=48.5, queue_depth=d % 4, policy_version=3, route_counts={"local": 10})
             for d in range(size)] for b in range(batches)]
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for rep in range(reps):
        kinds = ["sqlite", "pg_copy", "pg_executemany"]
        for kind in kinds if rep % 2 == 0 else kinds[::-1]:
            url = str(tmp / f"inproc-{rep}.db") if kind == "sqlite" else pg.create_database()
            with Store(url) as store:
                store.check_gaps = False
                store.telemetry_by_copy = kind == "pg_copy"
                store.apply(Batch(FLEET, now, telemetry=work[0]))  # devices made, partitions made: not timed
                backend = None if kind == "sqlite" else store.submit(lambda c: c.raw.info.backend_pid).result()
                server0 = _pid_cpu_s(backend) if backend else 0.0
                t0, cpu0 = time.perf_counter(), time.process_time()
                for rows in work[1:]:
                    store.apply(Batch(FLEET, now + 1000, telemetry=rows))
                n = (batches - 1) * size
                rates.setdefault(kind, []).append(n / (time.perf_counter() - t0))
                cpu.setdefault(f"{kind}_client_us", []).append((time.process_time() - cpu0) / n * 1e6)
                if backend:
                    cpu.setdefault(f"{kind}_server_us", []).append((_pid_cpu_s(backend) - server0) / n * 1e6)
    return {**{k: round(statistics.median(v)) for k, v in rates.items()},
            **{k: round(statistics.median(v), 1) for k, v in cpu.items()}}


FLEET = "bench"


def run(rounds: tuple[tuple[str, int], ...] = ROUNDS) -> dict[str, Any]:
    from nanofleet.pg_server import PgServer

    with tempfile.TemporaryDirectory(prefix="bench-ingest-pg-") as d, PgServer() as pg:
        tmp = Path(d)
        pkts = _packets(N_CAPACITY, int(time.time() * 1000))
        figures: dict[str, Any] = {"devices": DEVICES, "messages": N_CAPACITY, "cpus": os.cpu_count(),
                                   "load_before": [round(x, 2) for x in os.getloadavg()],
                                   "store_rows_per_s": _store_rates(pg, tmp)}
        for backend, procs in rounds:
            db = str(tmp / f"store-{procs}.db") if backend == "sqlite" else pg.create_database()
            broker = _Mosquitto(tmp, 0)
            cpu0 = _server_cpu_s(pg.data)
            try:
                r = _round("ingest-builtin", procs, broker.port, pkts, None, tmp, db=db)
            finally:
                broker.stop()
            if backend == "postgresql":
                time.sleep(0.2)  # the backends exit when their controllers close: then the postmaster reaps them
                r["server_cpu_us_per_msg"] = round((_server_cpu_s(pg.data) - cpu0) / max(r["delivered"], 1) * 1e6, 1)
            figures[f"{backend}_{procs}p"] = r
        figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"name": "ingest_pg", "figures": figures, "markdown": _markdown(figures)}


def _markdown(f: dict[str, Any]) -> str:
    rows = ["| store | controllers | msg/s | vs 1 on the same store | dropped | publisher msg/s | controllers' CPU "
            "µs/msg | server CPU µs/msg |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for backend, procs in ROUNDS:
        r = f.get(f"{backend}_{procs}p")
        if r is None:
            continue
        one = f.get(f"{backend}_1p", r)["msgs_per_s"] or 1
        rows.append(f"| {backend} | {procs} | {r['msgs_per_s']:,} | {r['msgs_per_s'] / one:.2f} | {r['dropped']:,} | "
                    f"{r['publish_msgs_per_s']:,} | {r['cpu_us_per_msg']} | {r.get('server_cpu_us_per_msg', '–')} |")
    s = f["store_rows_per_s"]
    return (f"{f['messages']:,}-message burst of {f['devices']:,} devices' telemetry through mosquitto (QoS 0), "
            f"builtin reader, `$share/` when several; PostgreSQL is a throwaway local server (fsync off) on the same "
            f"{f['cpus']}-core machine as the broker, the publisher and the controllers. Load average before "
            f"{f['load_before']}, after {f['load_after']}.\n\n" + "\n".join(rows)
            + f"\n\nStore alone, in process (2,000-row batches, one row per device; CPU µs a row: this process + the "
            f"server's backend): SQLite {s['sqlite']:,} rows/s ({s['sqlite_client_us']} µs); PostgreSQL by COPY "
            f"{s['pg_copy']:,} rows/s ({s['pg_copy_client_us']} + {s['pg_copy_server_us']} µs), by executemany "
            f"{s['pg_executemany']:,} rows/s ({s['pg_executemany_client_us']} + {s['pg_executemany_server_us']} µs).")


if __name__ == "__main__":
    import json
    import sys

    picked = tuple((k.split(":")[0], int(k.split(":")[1]) if ":" in k else 1) for k in sys.argv[1:]) or ROUNDS
    result = run(picked)
    print(json.dumps(result["figures"], indent=2))
    print(result["markdown"])
