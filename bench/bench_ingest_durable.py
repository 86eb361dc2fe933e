"""Durable ingest (the controller's default) against acknowledging on receipt, side by side in one run.

Agents publish telemetry with QoS 1. With durable ingest (controller/ingest.py, `durable=True`: a persistent session
under a fixed client id, each PUBACK sent only once the batch holding the message is committed) a controller killed
mid-batch loses nothing; this measures what that costs against the reader acknowledging as it reads. Workload: a
burst of pre-encoded QoS 1 PUBLISH packets of 2,000 devices written by a raw publisher (its PUBACKs read and
dropped) into a real mosquitto (`max_inflight_messages 20000`, as `nanofleet up` configures it), one in-process
Ingest into a SQLite store; the rounds alternate, twice each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from nanofleet.tcp import free_port

N = 40_000
DEVICES = 2_000




def _packets(n: int) -> bytes:
    from nanofleet.controller.mqtt_reader import publish_packet

    now = int(time.time() * 1000)
    return b"".join(publish_packet(f"nanofleet/v1/bf/d{i % DEVICES}/telemetry", json.dumps(
        {"tsMs": str(now + i), "seq": (i // DEVICES) % 256, "cpuPercent": 12.5}).encode(), qos=1,
        packet_id=(i % 65535) + 1) for i in range(n))


def _until_stored(ingest: Any, deadline: float) -> None:
    while ingest.stats.stored + ingest.stats.duplicates < N and time.time() < deadline:
        time.sleep(0.01)


async def _round(port: int, durable: bool, tmp: Path, packets: bytes) -> dict[str, Any]:
    from nanofleet.controller.ingest import Ingest
    from nanofleet.controller.mqtt_reader import connect_packet
    from nanofleet.controller.store import Store

    store = Store(tmp / f"store-{durable}-{time.monotonic_ns()}.db")
    ingest = Ingest(store, "bf", f"mqtt://127.0.0.1:{port}", durable=durable,
                    client_id=f"bench-ctl-{durable}-{time.monotonic_ns()}")
    await ingest.start()
    await ingest.wait_subscribed(10)
    await asyncio.sleep(0.3)  # SUBACK processed by the broker
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(connect_packet(f"bench-pub-{time.monotonic_ns()}"))
    sock.recv(4)  # CONNACK
    threading.Thread(target=lambda: [None for _ in iter(lambda: sock.recv(1 << 16), b"")], daemon=True).start()
    t0, cpu0 = time.time(), time.process_time()
    sock.sendall(packets)
    await asyncio.to_thread(_until_stored, ingest, t0 + 60)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    stored = ingest.stats.stored
    sock.close()
    await ingest.stop()
    await asyncio.to_thread(store.close)
    return {"stored": stored, "msgs_per_s": round(stored / wall),
            "cpu_us_per_msg": round(cpu / max(stored, 1) * 1e6, 1)}


def run() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-durable-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 20000\nlog_dest none\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])
    figures: dict[str, Any] = {"messages": N, "devices": DEVICES, "load_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        time.sleep(0.5)
        packets = _packets(N)

        async def main() -> None:
            for r in range(2):
                for durable in (False, True):
                    figures[f"{'durable' if durable else 'on_receipt'}_{r}"] = await _round(port, durable, tmp,
                                                                                            packets)

        asyncio.run(main())
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    figures["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return {"name": "ingest_durable", "figures": figures, "markdown": _markdown(figures)}


def _markdown(f: dict[str, Any]) -> str:
    rows = ["| round | acknowledged | msg/s | vs on receipt (same round) | CPU µs/msg | stored |",
            "|---|---|---:|---:|---:|---:|"]
    for r in range(2):
        base = f[f"on_receipt_{r}"]["msgs_per_s"] or 1
        for kind, label in (("on_receipt", "on receipt"), ("durable", "after commit (durable)")):
            x = f[f"{kind}_{r}"]
            rows.append(f"| {r + 1} | {label} | {x['msgs_per_s']:,} | {x['msgs_per_s'] / base:.2f} | "
                        f"{x['cpu_us_per_msg']} | {x['stored']:,} |")
    return (f"{f['messages']:,} QoS 1 telemetry messages of {f['devices']:,} devices in one burst, one controller "
            f"ingest (builtin reader, SQLite store). Load average before {f['load_before']}, after "
            f"{f['load_after']}.\n\n" + "\n".join(rows))


if __name__ == "__main__":
    print(run()["markdown"])
