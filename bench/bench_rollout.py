"""A rollout of one model to 1,000 simulated devices through steps 5, 25, 100 %, end to end: mosquitto, `nanofleet
controller` (its rollout task, policy publishing, ingest of the devices' reports) and `nanofleet sim` each in their
own process; the rollout started with `nanofleet rollout start` as an operator would.

Figures: the time from `rollout start` to `done` and how much of it is bake time (3 × BAKE_S), the time until every
device reports the new model, the controller's CPU over the rollout (seconds, and cores on average) against the same
window length of steady ingest before it, and policies published. Simulated devices switch on the policy at once
and do not download (the artifact route's throughput is bench_artifacts; a cut download resuming rather than starting
from zero is held by tests/agent/test_model_update.py).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.bench_sim import _wait_port
from nanofleet.broker import mosquitto_binary
from nanofleet.tcp import free_port, raise_nofile

DEVICES = 1000
INTERVAL_S = 2.0
BAKE_S = 5.0
FLEET = "bench-ro"


def _q(db: Path, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        conn.close()


def _until(pred: Any, within: float, what: str) -> float:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic()


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def run() -> dict[str, Any]:
    raise_nofile()
    nf = [sys.executable, "-m", "nanofleet"]
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        root = Path(tmp)
        port, web = free_port(), free_port()
        conf = root / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
                        "max_queued_messages 100000\n")
        cfg = root / "fleet.yaml"
        cfg.write_text(f"fleet: {FLEET}\nbroker: {{url: 'mqtt://127.0.0.1:{port}'}}\n"
                       f"defaults: {{telemetry_interval_s: {INTERVAL_S:g}}}\n"
                       "groups:\n  fleet1k: {match: ['sim-*']}\n")
        data, db = root / "ctl", root / "ctl" / "controller.db"
        procs: list[subprocess.Popen[Any]] = []
        try:
            procs.append(subprocess.Popen([mosquitto_binary() or "mosquitto", "-c", str(conf)]))
            _wait_port(port)
            ctl = subprocess.Popen([*nf, "controller", "--config", str(cfg), "--data-dir", str(data), "--listen",
                                    f"127.0.0.1:{web}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(ctl)
            _wait_port(web, 60)
            procs.append(subprocess.Popen([*nf, "sim", "--devices", str(DEVICES), "--interval", str(INTERVAL_S),
                                           "--broker-url", f"mqtt://127.0.0.1:{port}", "--fleet", FLEET,
                                           "--data-dir", str(root / "sim")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            online = "SELECT count(*) FROM devices d JOIN device_groups g USING (device_id) " \
                     "WHERE g.grp = 'fleet1k' AND d.state = 'online'"
            _until(lambda: (_q(db, online) or [(0,)])[0][0] == DEVICES, 240, "every device online")
            time.sleep(3 * INTERVAL_S)  # births' policy round settled
            proc = psutil.Process(ctl.pid)
            c0, w0 = _cpu(proc), time.monotonic()
            time.sleep(10.0)
            idle_cores = (_cpu(proc) - c0) / (time.monotonic() - w0)
            model = make_model(root)
            add = subprocess.run([*nf, "artifacts", "add", str(model), "--name", "bench", "--data-dir", str(data)],
                                 capture_output=True, text=True, check=True)
            sha = add.stdout.split()[0]
            rounds0 = (_q(db, "SELECT count(*) FROM policy_rounds") or [(0,)])[0][0]
            c0, t0 = _cpu(proc), time.monotonic()
            subprocess.run([*nf, "rollout", "start", "--group", "fleet1k", "--model", "bench", "--steps", "5,25,100",
                            "--gate", "errors<2%,p95_latency<+20%,thermal<severe", "--bake", f"{BAKE_S:g}s",
                            "--config", str(cfg), "--data-dir", str(data)], check=True, capture_output=True)
            on_new = "SELECT count(*) FROM devices WHERE model_report LIKE ?"
            t_all = _until(lambda: (_q(db, on_new, (f'%"sha":"{sha}"%',)) or [(0,)])[0][0] == DEVICES, 600,
                           "every device reporting the new model")
            t_done = _until(lambda: any(json.loads(s)["state"] == "done"
                                        for (s,) in _q(db, "SELECT state_json FROM rollouts")), 600, "done")
            cpu = _cpu(proc) - c0
            state = json.loads(_q(db, "SELECT state_json FROM rollouts")[0][0])
            rounds = (_q(db, "SELECT count(*) FROM policy_rounds") or [(0,)])[0][0] - rounds0
            published = (_q(db, "SELECT coalesce(sum(devices), 0) FROM (SELECT devices FROM policy_rounds "
                                "ORDER BY version LIMIT -1 OFFSET ?)", (rounds0,)) or [(0,)])[0][0]
        finally:
            for p in reversed(procs):
                p.terminate()
            for p in reversed(procs):
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
    total = t_done - t0
    figures = {"devices": DEVICES, "steps": "5,25,100", "bake_s": BAKE_S, "start_to_done_s": round(total, 1),
               "start_to_done_minus_bakes_s": round(total - 3 * BAKE_S, 1),
               "start_to_all_reporting_s": round(t_all - t0, 1), "controller_cpu_s": round(cpu, 1),
               "controller_cores_during": round(cpu / total, 2), "controller_cores_steady": round(idle_cores, 2),
               "policy_rounds": rounds, "policies_published": published, "state": state["state"],
               "step_devices": [s["devices"] for s in state["step_results"]]}
    md = ("| devices | steps | bake | start → done | of it not baking | start → all report it | controller CPU "
          "(cores avg) | steady ingest (cores) | policies published |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {DEVICES:,} | 5, 25, 100 % ({', '.join(map(str, figures['step_devices']))} devices) | {BAKE_S:g} s | "
          f"{figures['start_to_done_s']} s | {figures['start_to_done_minus_bakes_s']} s | "
          f"{figures['start_to_all_reporting_s']} s | {figures['controller_cpu_s']} s "
          f"({figures['controller_cores_during']}) | {figures['controller_cores_steady']} | {published} in "
          f"{rounds} rounds |\n\nTelemetry every {INTERVAL_S:g} s per device; the controller's rollout task ticks "
          "every 2 s. Simulated devices switch at once and do not download.")
    return {"name": "bench_rollout", "figures": figures, "markdown": md}


def make_model(root: Path) -> Path:
    from nanofleet.agent.tiny_model import make_tiny_gguf

    return make_tiny_gguf(root / "bench-model.gguf", seed=11)


if __name__ == "__main__":
    r = run()
    print(json.dumps(r["figures"], indent=2))
    print(r["markdown"])
