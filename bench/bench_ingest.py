"""Ingest throughput: telemetry through a real mosquitto into the controller's SQLite store, messages/s.

Side by side in one run, against the same broker and the same pre-encoded agent telemetry (proto3 JSON, QoS 0):
- a bare paho and a bare gmqtt subscriber that only count (the client libraries' ceilings),
- 1 controller ingest process (the builtin reader, gmqtt or paho -> decode + validate -> batched SQLite, WAL),
- 2 controller ingest processes splitting the load through `$share/`, writing the same store file (both readers).
"capacity": a burst the broker queues without limit, so the figure is the consumer's drain rate. "sustained": a
paced 20,000 msg/s with mosquitto's default per-client queue (1000), so a consumer that falls behind loses
messages and the drop count shows it. Also, in-process: the per-message cost of decoding (our fast path vs
json_format.Parse) and of decode + store without MQTT. The publisher writes pre-built MQTT packets to a raw socket,
so the devices' side is never the bottleneck.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from nanofleet.controller.mqtt_reader import _varint  # MQTT's remaining-length encoding

FLEET = "bench"
DEVICES = 2000
N_CAPACITY = 100_000
RATE = 20_000
SUSTAIN_S = 5.0


# -- workload ----------------------------------------------------------------------------------------------------
def _templates() -> list[tuple[str, str]]:
    from google.protobuf import json_format

    from nanofleet.protos import fleet_pb2, topics

    out = []
    for d in range(DEVICES):
        t = fleet_pb2.Telemetry(
            device_id=f"dev-{d:05d}", bd_seq=1, seq=0, ts_ms=1, cpu_percent=12.5 + d % 50, load1=0.5,
            ram_total_mb=4096, ram_available_mb=2000 + d % 500, disk_free_mb=20_000,
            temperatures_c={"cpu-thermal": 48.5}, temp_max_c=48.5, thermal_level=fleet_pb2.THERMAL_LEVEL_NONE,
            throttle_ratio=1.0, queue_depth=d % 4, policy_version=3, route_counts={"local": 10},
        )
        body = json_format.MessageToJson(t, indent=None).replace('"tsMs": "1"', '"tsMs": "%d"')
        out.append((topics.telemetry(FLEET, t.device_id), body.replace('"bdSeq": "1"', '"bdSeq": "1", "seq": %d')))
    return out


def _packets(n: int, start_ts: int) -> list[bytes]:
    """n QoS 0 PUBLISH packets, round-robin over the devices, each with its own seq and timestamp."""
    tpl = _templates()
    out = []
    for i in range(n):
        topic, body = tpl[i % DEVICES]
        k = i // DEVICES
        payload = (body % (k % 256, start_ts + k * 10)).encode()
        tb = topic.encode()
        var = struct.pack("!H", len(tb)) + tb + payload
        out.append(b"\x30" + _varint(len(var)) + var)
    return out


def _raw_publish(port: int, packets: list[bytes], rate: float | None) -> float:
    """Connect (MQTT 3.1.1) and write the packets, paced at `rate` msg/s or as fast as possible; returns seconds."""
    s = socket.create_connection(("127.0.0.1", port))
    cid = b"bench-pub"
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    s.sendall(b"\x10" + _varint(len(var)) + var)
    assert s.recv(4)[:2] == b"\x20\x02", "no CONNACK"
    t0 = time.perf_counter()
    chunk = max(1, int(rate / 200)) if rate else 2000
    for i in range(0, len(packets), chunk):
        s.sendall(b"".join(packets[i:i + chunk]))
        if rate:
            delay = t0 + (i + chunk) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    s.sendall(b"\xe0\x00")  # DISCONNECT
    s.close()
    return time.perf_counter() - t0


# -- consumers (child processes) ---------------------------------------------------------------------------------
def _bare(port: int, expect: int, ready: Any, out: Any) -> None:
    import paho.mqtt.client as paho

    state = {"n": 0, "last": 0.0}

    def on_message(c: Any, u: Any, m: Any) -> None:
        state["n"] += 1
        state["last"] = time.time()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-bare")
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.on_connect = lambda cl, *a: cl.subscribe(f"nanofleet/v1/{FLEET}/+/telemetry", 0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    cpu0 = time.process_time()
    _wait_done(lambda: state["n"], expect)
    cpu = time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    out.put({"received": state["n"], "done": state["last"], "cpu_s": cpu})


def _bare_gmqtt(port: int, expect: int, ready: Any, out: Any) -> None:
    """The same count-only subscriber over gmqtt (asyncio, MQTT 3.1.1 here as for the others)."""
    import asyncio

    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    async def main() -> dict[str, Any]:
        state = {"n": 0, "last": 0.0}

        def on_message(c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
            state["n"] += 1
            state["last"] = time.time()
            return 0

        c = gmqtt.Client("bench-bare-gmqtt")
        c.on_message = on_message
        c.on_subscribe = lambda *a: ready.set()
        c.on_connect = lambda cl, *a: cl.subscribe(f"nanofleet/v1/{FLEET}/+/telemetry", 0)
        await c.connect("127.0.0.1", port, version=MQTTv311)
        cpu0 = time.process_time()
        await asyncio.to_thread(_wait_done, lambda: state["n"], expect)
        cpu = time.process_time() - cpu0
        await c.disconnect()
        return {"received": state["n"], "done": state["last"], "cpu_s": cpu}

    out.put(asyncio.run(main()))


def _controller(port: int, expect: int, db: str, share: str | None, ready: Any, out: Any,
                transport: str = "paho", counts: Any = None, slot: int = 0) -> None:
    """One controller ingest process. With several (`$share`), `counts` holds each one's progress so that all stop
    when the fleet's messages are in, together: one that quit at its 1/N share would lose what mosquitto still
    had queued for it (QoS 0 is not redistributed), and $share never splits exactly evenly."""
    import asyncio

    from nanofleet.controller.ingest import Ingest
    from nanofleet.controller.store import Store

    async def main() -> dict[str, Any]:
        store = Store(db)
        store.check_gaps = share is None
        if transport == "gmqtt":
            from bench.gmqtt_transport import GmqttIngest as make
        else:
            make = functools.partial(Ingest, transport=transport)
        ingest = make(store, FLEET, f"mqtt://127.0.0.1:{port}", share_group=share, telemetry_qos=0,
                      client_id=f"bench-ctl-{mp.current_process().pid}")
        await ingest.start()
        await ingest.wait_subscribed(10)
        await asyncio.sleep(0.3)  # SUBACK
        ready.set()
        cpu0 = time.process_time()
        s = ingest.stats
        last_change = [0.0, -1]

        def progress() -> int:
            n = s.stored + s.duplicates + s.rejected
            if n != last_change[1]:
                last_change[:] = [time.time(), n]
            if counts is None:
                return n
            counts[slot] = n
            return sum(counts[:])

        await asyncio.to_thread(_wait_done, progress, expect)
        cpu = time.process_time() - cpu0
        result = {"cpu_s": cpu, "received": s.received, "stored": s.stored, "duplicates": s.duplicates,
                  "rejected": s.rejected, "batches": s.batches, "done": last_change[0]}
        await ingest.stop()
        await asyncio.to_thread(store.close)
        return result

    out.put(asyncio.run(main()))


def _wait_done(progress: Any, expect: int, idle_s: float = 3.0, cap_s: float = 40.0) -> None:
    """Until `expect` messages are in, or nothing moved for idle_s (the rest was dropped)."""
    start = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - start < cap_s:
        n = progress()
        if n >= expect:
            return
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > idle_s and n > 0:
            return
        time.sleep(0.01)


_TRANSPORT = {"ingest": "paho", "ingest-builtin": "builtin", "ingest-gmqtt": "gmqtt"}
# (kind, processes) of each round, in this order in both phases; the first is the reference ("vs bare paho")
ROUNDS = (("bare", 1), ("bare-gmqtt", 1), ("ingest", 1), ("ingest-builtin", 1), ("ingest-gmqtt", 1),
          ("ingest", 2), ("ingest-builtin", 2))
LABELS = {"bare_1p": "bare paho subscriber (counts only)", "bare-gmqtt_1p": "bare gmqtt subscriber (counts only)",
          "ingest_1p": "1 controller (paho)", "ingest-builtin_1p": "1 controller (builtin reader)",
          "ingest-gmqtt_1p": "1 controller (gmqtt)", "ingest_2p": "2 controllers ($share, paho)",
          "ingest-builtin_2p": "2 controllers ($share, builtin reader)"}


# -- broker ------------------------------------------------------------------------------------------------------
class _Mosquitto:
    def __init__(self, workdir: Path, max_queued: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = workdir / f"mosq-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"max_queued_messages {max_queued}\nmax_queued_bytes 0\nlog_dest none\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def _round(kind: str, procs: int, port: int, packets: list[bytes], rate: float | None, tmp: Path,
           db: str | None = None) -> dict[str, Any]:
    """One round; `db`: the store's path or URL (bench_ingest_pg: a PostgreSQL database), else a new SQLite file."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    readies, children = [], []
    share = "bench" if procs > 1 else None
    db = db or str(tmp / f"store-{kind}-{procs}-{time.monotonic_ns()}.db")
    counts = ctx.Array("q", procs, lock=False)  # each controller's progress; all stop when the sum is in
    for slot in range(procs):
        ready = ctx.Event()
        if kind.startswith("bare"):
            target, args = (_bare_gmqtt if kind == "bare-gmqtt" else _bare), (port, len(packets), ready, out)
        else:
            target, args = _controller, (port, len(packets), db, share, ready, out, _TRANSPORT[kind], counts, slot)
        p = ctx.Process(target=target, args=args, daemon=True)
        p.start()
        readies.append(ready)
        children.append(p)
    for r in readies:
        if not r.wait(30):
            raise RuntimeError(f"{kind} consumer did not subscribe")
    t0 = time.time()
    pub_s = _raw_publish(port, packets, rate)
    results = [out.get(timeout=60) for _ in children]
    for p in children:
        p.join(10)
    got = sum(r.get("stored", r.get("received", 0)) + r.get("duplicates", 0) + r.get("rejected", 0)
              for r in results)
    done = max(r["done"] for r in results)
    return {"msgs_per_s": round(got / max(done - t0, 1e-9)), "delivered": got, "dropped": len(packets) - got,
            "publish_msgs_per_s": round(len(packets) / pub_s), "rejected": sum(r.get("rejected", 0) for r in results),
            "lag_s": round(max(0.0, done - t0 - pub_s), 2),
            # CPU seconds the consumer process(es) spent per message, all threads: what the machine's other load
            # does not change much (wall-clock rates on a shared machine do)
            "cpu_us_per_msg": round(sum(r.get("cpu_s", 0.0) for r in results) / max(got, 1) * 1e6, 1)}


# -- in-process per-message cost ---------------------------------------------------------------------------------
def _per_message_cost(packets: list[bytes], tmp: Path) -> dict[str, float]:
    from google.protobuf import json_format

    from nanofleet.controller.decode import decode_telemetry
    from nanofleet.controller.ingest import Ingest
    from nanofleet.controller.store import Store
    from nanofleet.protos import fleet_pb2

    msgs = []
    for pkt in packets[:20_000]:
        i = 1
        while pkt[i] & 0x80:
            i += 1
        body = pkt[i + 1:]
        tlen = struct.unpack("!H", body[:2])[0]
        msgs.append((body[2:2 + tlen].decode(), body[2 + tlen:]))
    t0 = time.perf_counter()
    for topic, payload in msgs:
        decode_telemetry(payload, topic.split("/")[3])
    fast = (time.perf_counter() - t0) / len(msgs) * 1e6
    t0 = time.perf_counter()
    for _, payload in msgs[:5000]:
        json_format.Parse(payload, fleet_pb2.Telemetry())
    slow = (time.perf_counter() - t0) / 5000 * 1e6

    items = msgs
    store = Store(tmp / "inproc.db")
    ingest = Ingest(store, FLEET, "mqtt://127.0.0.1:1")
    t0 = time.perf_counter()
    for i in range(0, len(items), 2000):
        store.apply(ingest.decode(items[i:i + 2000]))
    both = (time.perf_counter() - t0) / len(items) * 1e6
    store.close()
    return {"decode_fast_us": round(fast, 2), "decode_json_format_us": round(slow, 2),
            "decode_plus_store_us": round(both, 2)}


def run(rounds: tuple[tuple[str, int], ...] = ROUNDS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        tmp = Path(d)
        now = int(time.time() * 1000)
        capacity_pkts = _packets(N_CAPACITY, now)
        sustained_pkts = _packets(int(RATE * SUSTAIN_S), now + 10_000_000)
        figures: dict[str, Any] = {"payload_bytes": len(capacity_pkts[0]), "devices": DEVICES,
                                   "per_message": _per_message_cost(capacity_pkts, tmp)}
        for phase, pkts, rate, queued in (("capacity", capacity_pkts, None, 0),
                                          ("sustained", sustained_pkts, float(RATE), 1000)):
            for kind, procs in rounds:
                broker = _Mosquitto(tmp, queued)
                try:
                    figures[f"{phase}_{kind}_{procs}p"] = _round(kind, procs, broker.port, pkts, rate, tmp)
                finally:
                    broker.stop()
    return {"name": "ingest", "figures": figures, "markdown": _markdown(figures)}


def paired(kinds: list[str], reps: int) -> dict[str, Any]:
    """The same rounds interleaved `reps` times (order alternating), for a machine whose other load moves the
    figures more than the difference between two consumers: medians per kind, and each kind's median ratio to the
    first kind over the repetitions (each pair measured back to back)."""
    import statistics

    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        tmp = Path(d)
        now = int(time.time() * 1000)
        phases = (("capacity", _packets(N_CAPACITY, now), None, 0),
                  ("sustained", _packets(int(RATE * SUSTAIN_S), now + 10_000_000), float(RATE), 1000))
        for rep in range(reps):
            for phase, pkts, rate, queued in phases:
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    broker = _Mosquitto(tmp, queued)
                    try:
                        runs.setdefault(f"{phase}_{kind}", []).append(_round(kind, 1, broker.port, pkts, rate, tmp))
                    finally:
                        broker.stop()
    out: dict[str, Any] = {"reps": reps}
    for key, rs in runs.items():
        phase = key.split("_")[0]
        ref = runs[f"{phase}_{kinds[0]}"]
        metrics = ("msgs_per_s", "dropped", "lag_s", "cpu_us_per_msg")
        out[key] = {m: statistics.median(r[m] for r in rs) for m in metrics}
        out[key]["runs"] = [{m: r[m] for m in metrics} for r in rs]
        out[key]["met"] = sum(goal_met(r) for r in rs) if phase == "sustained" else None
        out[key][f"rate_vs_{kinds[0]}"] = round(statistics.median(
            r["msgs_per_s"] / max(f["msgs_per_s"], 1) for r, f in zip(rs, ref, strict=True)), 2)
        out[key][f"cpu_vs_{kinds[0]}"] = round(statistics.median(
            r["cpu_us_per_msg"] / max(f["cpu_us_per_msg"], 1e-9) for r, f in zip(rs, ref, strict=True)), 2)
    return out


def goal_met(sustained: dict[str, Any]) -> bool:
    """The ingest goal on the paced round: every message in, at the pace, at most 1 s behind the publisher."""
    return (sustained["dropped"] == 0 and sustained["lag_s"] <= 1.0
            and sustained["msgs_per_s"] >= 0.95 * RATE)


def _markdown(f: dict[str, Any]) -> str:
    bare = f["capacity_bare_1p"]["msgs_per_s"] or 1
    rows = ["| phase | consumer | msg/s | vs bare paho | delivered | dropped | done after the publisher (s) "
            "| CPU µs/msg |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for phase in ("capacity", "sustained"):
        for key, label in LABELS.items():
            r = f.get(f"{phase}_{key}")
            if r is None:
                continue
            ref = f[f"{phase}_bare_1p"]["msgs_per_s"] or bare
            rows.append(f"| {phase} | {label} | {r['msgs_per_s']:,} | {r['msgs_per_s'] / ref:.2f} | "
                        f"{r['delivered']:,} | {r['dropped']:,} | {r['lag_s']} | {r.get('cpu_us_per_msg', '–')} |")
    pm = f["per_message"]
    verdicts = []
    for key, label in (("ingest-builtin_1p", "builtin reader"), ("ingest-gmqtt_1p", "gmqtt"), ("ingest_1p", "paho")):
        cap, sus = f.get(f"capacity_{key}"), f.get(f"sustained_{key}")
        if cap is None or sus is None:
            continue
        met = goal_met(sus)
        verdicts.append(f"{label}: **{cap['msgs_per_s'] / bare:.2f}×** bare paho at capacity; at a paced {RATE:,} "
                        f"msg/s {sus['msgs_per_s']:,} msg/s, **{sus['dropped']:,} dropped**, done {sus['lag_s']} s "
                        f"after the publisher — **{'met' if met else 'missed'}**")
    goal = ("\n\nGoal (one controller process: ≥ 20,000 msg/s sustained — at the paced round: every message in, at "
            "≥ 95 % of the pace, ≤ 1 s behind the publisher):\n"
            + "".join(f"- {v}\n" for v in verdicts))
    return (
        f"{f['devices']:,} devices' telemetry, {f['payload_bytes']} bytes a message, QoS 0, mosquitto on loopback; "
        f"capacity = a {N_CAPACITY:,}-message burst queued without limit (drain rate); sustained = paced at "
        f"{RATE:,} msg/s for {SUSTAIN_S:g} s with mosquitto's queue at 1000 per client (a consumer that keeps up "
        f"finishes with the publisher; ingest's reader drains the socket into a bounded in-process backlog, so lag "
        f"shows as time, not drops, until that backlog is full). Each controller row names its MQTT reader: the "
        f"builtin one (controller/mqtt_reader.py, the default), gmqtt (bench/gmqtt_transport.py) or paho; CPU "
        f"µs/msg is what the consumer process spent per message, all threads; the 2-process cases share one "
        f"SQLite file (one writer at a time).\n\n"
        + "\n".join(rows)
        + f"\n\nPer message, in process (no MQTT): decode fast path {pm['decode_fast_us']} µs vs json_format.Parse "
        f"{pm['decode_json_format_us']} µs; decode + validate + SQLite batch {pm['decode_plus_store_us']} µs "
        f"(= {1e6 / pm['decode_plus_store_us']:,.0f} msg/s on one core before any MQTT cost; SQLite's own work runs "
        f"without the GIL, beside the decoding of the next batch)."
        + goal
    )


if __name__ == "__main__":
    import json
    import sys

    # `python -m bench.bench_ingest [kind[:procs] ...]`: only those rounds (the first should be `bare`);
    # `python -m bench.bench_ingest --pairs N kind kind ...`: those kinds interleaved N times (see paired())
    if sys.argv[1:2] == ["--pairs"]:
        print(json.dumps(paired(sys.argv[3:], int(sys.argv[2])), indent=1))
        sys.exit(0)
    picked = tuple((k.split(":")[0], int(k.split(":")[1]) if ":" in k else 1) for k in sys.argv[1:]) or ROUNDS
    result = run(picked)
    print(json.dumps(result["figures"], indent=2))
    print(result["markdown"])
