"""The simulator at fleet scale: 10,000 devices in one `nanofleet sim` process, each its own MQTT session.

Against a real mosquitto (its open-file limit raised, as `nanofleet up` does), a bare paho subscriber in this process
counts what the broker delivers: the time from the simulator's start until every device's birth is in, and the
telemetry messages per second at a 1 s interval once all are born (expected: one per device a second). The
simulator's own CPU share over the same window shows the headroom. Run twice: live telemetry at QoS 1 (what an agent
sends) and at QoS 0 (`nanofleet sim --telemetry-qos 0`).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from nanofleet.broker import mosquitto_binary
from nanofleet.tcp import free_port, raise_nofile

DEVICES = 10_000
INTERVAL_S = 1.0
WINDOW_S = 10.0
BIRTH_TIMEOUT_S = 240.0
FLEET = "bench"


class _Counter:
    """Counts births (distinct devices) and telemetry messages, in paho's network thread."""

    def __init__(self, port: int) -> None:
        self.born: set[str] = set()
        self.telemetry = 0
        self.all_born_at: float | None = None
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-counter")
        c.on_message = self._on_message
        c.on_connect = lambda cl, *_: cl.subscribe([(f"nanofleet/v1/{FLEET}/+/status", 0),
                                                   (f"nanofleet/v1/{FLEET}/+/telemetry", 0)])
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic.endswith("/telemetry"):
            self.telemetry += 1
        elif b'"online": true' in msg.payload or b'"online":true' in msg.payload:
            self.born.add(topic)
            if len(self.born) == DEVICES and self.all_born_at is None:
                self.all_born_at = time.monotonic()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run() -> dict[str, Any]:
    soft, _ = raise_nofile()  # the broker inherits it: 10,000 client sockets + its own
    if soft < DEVICES + 200:
        raise RuntimeError(f"open-file limit {soft} < {DEVICES + 200}: raise the hard limit (ulimit -Hn)")
    rows = [_one(qos) for qos in (1, 0)]
    load = psutil.getloadavg()[0]
    md = (f"| telemetry QoS | devices | all births in | telemetry at {INTERVAL_S:g} s interval | expected | "
          "simulator CPU | CPU per message | simulator RSS |\n|---|---|---|---|---|---|---|---|\n")
    for f in rows:
        md += (f"| {f['qos']} | {DEVICES:,} | {f['all_births_s']} s | {f['telemetry_msg_per_s']:,} msg/s | "
               f"{DEVICES / INTERVAL_S:,.0f} msg/s | {f['sim_cpu_cores']} cores | {f['sim_cpu_us_per_msg']} µs | "
               f"{f['sim_rss_mb']} MB |\n")
    md += (f"\nOne `nanofleet sim` process (gmqtt sessions), one mosquitto, counted by a bare paho subscriber; "
           f"1-min load average {load:.1f} at the end. QoS 1 is what an agent sends (a PUBACK to handle per "
           "message). Simulator summaries:\n" + "".join(f"- QoS {f['qos']}: {f['summary']}\n" for f in rows))
    figures = {f"qos{f['qos']}": {k: v for k, v in f.items() if k != "summary"} for f in rows}
    figures["load_avg_1m"] = round(load, 1)
    return {"name": "bench_sim", "figures": figures, "markdown": md}


def _one(qos: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n")
        broker = subprocess.Popen([mosquitto_binary() or "mosquitto", "-c", str(conf)])
        sim = None
        try:
            _wait_port(port)
            counter = _Counter(port)
            t0 = time.monotonic()
            sim = subprocess.Popen([sys.executable, "-m", "nanofleet", "sim", "--devices", str(DEVICES),
                                    "--interval", str(INTERVAL_S), "--broker-url", f"mqtt://127.0.0.1:{port}",
                                    "--fleet", FLEET, "--data-dir", str(Path(tmp) / "sim"),
                                    "--telemetry-qos", str(qos)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = t0 + BIRTH_TIMEOUT_S
            while counter.all_born_at is None:
                if time.monotonic() > deadline or sim.poll() is not None:
                    raise RuntimeError(f"{len(counter.born)} of {DEVICES} births after "
                                       f"{time.monotonic() - t0:.0f}s (simulator exit code {sim.poll()})")
                time.sleep(0.05)
            births_s = counter.all_born_at - t0
            time.sleep(2 * INTERVAL_S)  # let the ticker settle after the connection storm
            proc = psutil.Process(sim.pid)
            cpu0, n0, w0 = proc.cpu_times(), counter.telemetry, time.monotonic()
            time.sleep(WINDOW_S)
            cpu1, n1, w1 = proc.cpu_times(), counter.telemetry, time.monotonic()
            rate = (n1 - n0) / (w1 - w0)
            cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (w1 - w0)
            rss_mb = proc.memory_info().rss / 2**20
            sim.terminate()
            out, _ = sim.communicate(timeout=60)
            counter.close()
        finally:
            for p in (sim, broker):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    summary = next((line for line in out.splitlines() if line.startswith("stopped:")), "").removeprefix("stopped: ")
    return {"qos": qos, "all_births_s": round(births_s, 1), "telemetry_msg_per_s": round(rate),
            "sim_cpu_cores": round(cpu, 2), "sim_cpu_us_per_msg": round(1e6 * cpu / max(rate, 1)),
            "sim_rss_mb": round(rss_mb), "summary": summary}


def _wait_port(port: int, within: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


if __name__ == "__main__":
    import json

    result = run()
    print(json.dumps(result["figures"], indent=2))
    print(result["markdown"])
