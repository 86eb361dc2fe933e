"""The durable offline queue: enqueue throughput at 64 concurrent socket clients (`202` only after the commit,
`synchronous=FULL`), our grouped commits side by side with a naive one-commit-per-request queue (the same agent, the
same writer with batches of one), in the same run, and the same pair for the queue store alone (no HTTP); the added
p50 of a `202` over the `503` a request gets when queueing is denied; the drain rate once the device cools (local
model), side by side with the drain rate through a real gateway process to the fake Gemini
(tests/gateway/fake_gemini.py) once the gateway comes up; and what one `fsync` costs on this disk, with the model
that explains the grouped/naive ratio: at commit cost F and per-request CPU cost C, naive ≈ 1/(F+C) (one commit each)
and grouped ≈ 1/C (the commit shared by the burst), so the ratio is about 1 + F/C — a fast disk (small F) caps it
whatever the batching does.

Each contender is a real agent process (`python -m bench.bench_queue serve CONFIG [naive]`) on a hot fake sysfs tree,
so `local_only` requests queue; the clients are raw HTTP/1.1 keep-alive connections on the unix socket (an HTTP
client library would be the bottleneck, not the queue).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile

CLIENTS = 64
SECONDS = 5.0
BODY = json.dumps({"messages": [{"role": "user", "content": "queue me"}], "max_tokens": 1,
                   "nanofleet": {"mode": "local_only"}}).encode()
CLOUD = json.dumps({"messages": [{"role": "user", "content": "queue me"}], "max_tokens": 1,
                    "nanofleet": {"mode": "cloud_only"}}).encode()
CLOUD_ENTRIES = 2000
DENY = json.dumps({"messages": [{"role": "user", "content": "queue me"}], "max_tokens": 1,
                   "nanofleet": {"mode": "local_only", "queue": "deny"}}).encode()


def _request(body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _load(sock: Path, seconds: float, body: bytes = BODY, total: int | None = None) -> tuple[int, float]:
    """64 clients sending queued requests back to back for `seconds` (or until `total` are queued); (202s answered,
    elapsed)."""
    raw = _request(body)
    count = 0
    stop = time.monotonic() + seconds

    async def client() -> None:
        nonlocal count
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            while time.monotonic() < stop and (total is None or count < total):
                status = await _exchange(reader, writer, raw)
                if status != 202:
                    raise RuntimeError(f"expected 202, got {status}")
                count += 1
        finally:
            writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return count, time.monotonic() - t0


async def _latency(sock: Path, raw: bytes, n: int) -> list[float]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await _exchange(reader, writer, raw)
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        writer.close()
    return out


def _sysfs(root: Path, temp_c: float) -> None:
    zone = root / "class/thermal/thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "type").write_text("cpu-thermal\n")
    for i, (t, kind) in enumerate(((80_000, "passive"), (90_000, "hot"), (100_000, "critical"))):
        (zone / f"trip_point_{i}_temp").write_text(f"{t}\n")
        (zone / f"trip_point_{i}_type").write_text(f"{kind}\n")
    (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")


def _start(tmp: Path, name: str, model: Path, naive: bool, **extra: Any) -> tuple[subprocess.Popen[str], Path, Path]:
    home = tmp / name
    sysfs = home / "sys"
    _sysfs(sysfs, 95.0)
    sock = home / "run" / "a.sock"
    cfg = home / "agent.yaml"
    cfg.write_text(json.dumps({"device_id": "bench", "data_dir": str(home / "data"), "socket_path": str(sock),
                               "broker_url": None, "sysfs_root": str(sysfs), "queue_max_items": 10_000_000,
                               "queue_max_bytes": 1 << 34,
                               "model": {"source": f"file:{model}", "n_ctx": 256, "keep_alive": -1}, **extra}))
    argv = [sys.executable, "-m", "bench.bench_queue", "serve", str(cfg), *(["naive"] if naive else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and "serving" in proc.stdout.readline(), f"bench: agent {name} did not start"
    return proc, sock, sysfs


def run() -> dict[str, Any]:
    from nanofleet.agent.tiny_model import make_tiny_gguf

    tmp = Path(tempfile.mkdtemp(prefix="nf-bench-queue-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        model = make_tiny_gguf(tmp / "tiny.gguf")
        grouped, g_sock, g_sys = _start(tmp, "grouped", model, naive=False)
        naive, n_sock, _ = _start(tmp, "naive", model, naive=True)
        procs += [grouped, naive]
        rates: dict[str, list[float]] = {"grouped": [], "naive": []}
        for _ in range(2):  # interleaved rounds: machine noise hits both alike
            for name, sock in (("grouped", g_sock), ("naive", n_sock)):
                n, secs = asyncio.run(_load(sock, SECONDS))
                rates[name].append(n / secs)
        store = _store_only(tmp)
        lat = {"202 queued": asyncio.run(_latency(g_sock, _request(BODY), 300)),
               "503 queue denied": asyncio.run(_latency(g_sock, _request(DENY), 300))}
        # drain: the device cools; entries leave the queue through the local model (1 token each)
        depth = _depth(g_sock)
        _sysfs(g_sys, 40.0)
        drained_window = 20.0
        time.sleep(drained_window)  # a fixed window: the rate is what left the queue in it
        left = _depth(g_sock)
        drain_rate = (depth - left) / drained_window
        fsync_ms = _fsync_p50_ms(tmp)
        cloud = _cloud_drain(tmp, model, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(v) for k, v in rates.items()}
    p50 = {k: percentile(v, 50) for k, v in lat.items()}
    figures = {"clients": CLIENTS, "grouped_req_s": round(best["grouped"]), "naive_req_s": round(best["naive"]),
               "ratio": round(best["grouped"] / best["naive"], 1),
               "p50_ms_202": round(p50["202 queued"], 3), "p50_ms_503": round(p50["503 queue denied"], 3),
               "drain_local_per_s": round(drain_rate, 1), "drain_cloud_per_s": round(cloud, 1),
               "fsync_rewrite_p50_ms": round(fsync_ms[0], 3), "fsync_append_p50_ms": round(fsync_ms[1], 3)}
    figures |= {"store_grouped_req_s": store["grouped"], "store_naive_req_s": store["naive"],
                "store_ratio": round(store["grouped"] / store["naive"], 1)}
    c_ms = 1000 / best["grouped"]  # grouped ≈ 1/C: the per-request CPU cost, from the grouped rate
    figures |= {"cpu_per_request_ms": round(c_ms, 3),
                "commit_cost_ms": round(1000 / best["naive"] - c_ms, 3)}  # what naive pays per commit beyond C
    goal = best["grouped"] >= 2000 and best["grouped"] >= 5 * best["naive"]
    md = (f"Durable enqueue, {CLIENTS} concurrent clients on the unix socket, `synchronous=FULL`, `202` after COMMIT "
          f"(best of 2 interleaved {SECONDS:.0f} s rounds):\n\n"
          "| queue | requests/s |\n|---|---|\n"
          f"| grouped commits (agent) | {figures['grouped_req_s']} |\n"
          f"| naive: one commit per request | {figures['naive_req_s']} |\n\n"
          f"Ratio {figures['ratio']}× — goal ≥ 2,000 req/s and ≥ 5× naive: **{'met' if goal else 'not met'}**.\n\n"
          f"The queue alone, without HTTP (the same QueueStore, {CLIENTS} coroutines in one process, same run): "
          f"grouped {figures['store_grouped_req_s']} vs naive {figures['store_naive_req_s']} enqueues/s = "
          f"{figures['store_ratio']}×: the ceiling any socket path in front of it can reach on this disk.\n\n"
          f"One client, p50: `202` queued {figures['p50_ms_202']} ms vs `503` queue denied "
          f"{figures['p50_ms_503']} ms (+{figures['p50_ms_202'] - figures['p50_ms_503']:.3f} ms for the commit).\n\n"
          f"Drain, entries/s: local (tiny model, 1 token, 2 slots) {figures['drain_local_per_s']}; cloud (a real "
          f"gateway process → fake Gemini, {CLOUD_ENTRIES} entries, 3 at a time) {figures['drain_cloud_per_s']}.\n\n"
          f"Why the ratio is what it is: one `fsync` of a small write on this disk takes "
          f"{figures['fsync_rewrite_p50_ms']} ms in place and {figures['fsync_append_p50_ms']} ms appending (p50). "
          f"Per request the agent spends C ≈ {figures['cpu_per_request_ms']} ms of CPU (1/grouped rate); the naive "
          f"queue pays {figures['commit_cost_ms']} ms more (its commit: the fsync, the commit's own work, the "
          "hand-off to the writer and back), so the ratio is about 1 + commit/C. The store-only ratio above is the "
          "same rule without the HTTP share of C: no socket path can beat it. 5× needs a commit ≥ 4·C — storage "
          "whose fsync is slower than this machine's virtual disk (an SD card or eMMC, where one fsync takes "
          "milliseconds).\n")
    return {"name": "offline queue", "figures": figures, "markdown": md}


def _store_only(tmp: Path, seconds: float = 3.0) -> dict[str, int]:
    """Enqueues/s of the QueueStore itself, grouped vs one commit per request, best of 2 interleaved rounds: no
    HTTP, no router — what is left is the commit (F) against the job's own cost, so its ratio bounds the agent's."""
    import uvloop

    from nanofleet.agent.queue.store import Limits, QueueStore

    request = json.loads(BODY)

    async def rate(batch: int, path: Path) -> int:
        store = QueueStore(path, Limits(max_items=10**9, max_bytes=1 << 40), max_batch=batch)
        count, stop = 0, time.monotonic() + seconds

        async def client() -> None:
            nonlocal count
            while time.monotonic() < stop:
                await store.enqueue({"chat": request, "route": {}}, uid=0, app="bench", reason="bench")
                count += 1

        t0 = time.monotonic()
        try:
            await asyncio.gather(*(client() for _ in range(CLIENTS)))
        finally:
            store.close()
        return round(count / (time.monotonic() - t0))

    best = {"grouped": 0, "naive": 0}
    for i in range(2):
        for name, batch in (("grouped", 512), ("naive", 1)):
            best[name] = max(best[name], uvloop.run(rate(batch, tmp / f"store-{name}-{i}.db")))
    return best


def _fsync_p50_ms(folder: Path, n: int = 200) -> tuple[float, float]:
    """One small write + `os.fsync` on the disk the queue lives on, p50 over `n`: rewriting a block in place, and
    appending one (the file grows, as a WAL does between checkpoints: the filesystem's metadata is synced too)."""
    out: dict[str, list[float]] = {"rewrite": [], "append": []}
    path = folder / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(n):
            for kind, offset in (("rewrite", 0), ("append", (i + 1) * 4096)):
                os.pwrite(fd, b"x" * 128, offset)
                t0 = time.perf_counter()
                os.fsync(fd)
                out[kind].append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(out["rewrite"], 50), percentile(out["append"], 50)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cloud_drain(tmp: Path, model: Path, procs: list[subprocess.Popen[str]]) -> float:
    """Entries queued while the gateway is down (`cloud_only`, hot device), then the gateway comes up: entries/s
    from the first one leaving the queue to the last (the breaker's probe decides when draining starts)."""
    from bench.bench_gateway import FAKE
    from nanofleet.controller.gateway.auth import issue_token

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GEMINI_API_KEY": "bench-key", "PYTHONPATH": str(root)}
    fake = subprocess.Popen([sys.executable, "-c", FAKE], cwd=root, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    procs.append(fake)
    assert fake.stdout is not None
    base_url = fake.stdout.readline().strip()
    port, gw_dir = _free_port(), tmp / "gw"
    fleet = tmp / "fleet.yaml"
    fleet.write_text("fleet: bench\ngateway:\n  upstream: {kind: gemini, model: gemini-2.5-flash, thinking_budget: 0, "
                     f'base_url: "{base_url}"}}\n'
                     "defaults: {routing: {cloud_budget: {tokens_per_day: 1000000000}}}\n")
    token = issue_token(gw_dir / "gateway.db", "bench", "bench")
    agent, sock, _ = _start(tmp, "cloud", model, naive=False, fleet="bench",
                            gateway_address=f"127.0.0.1:{port}", gateway_token=token)
    procs.append(agent)
    asyncio.run(_latency(sock, _request(CLOUD), 1))  # the refused call (503) that opens the breaker
    asyncio.run(_load(sock, 30.0, CLOUD, total=CLOUD_ENTRIES))
    gateway = subprocess.Popen([sys.executable, "-m", "nanofleet", "gateway", "serve", "--config", str(fleet),
                                "--data-dir", str(gw_dir), "--listen", f"127.0.0.1:{port}"],
                               cwd=root, env=env, stderr=subprocess.DEVNULL)
    procs.append(gateway)
    start_depth = _depth(sock)
    deadline = time.monotonic() + 90
    while (depth := _depth(sock)) >= start_depth and time.monotonic() < deadline:
        time.sleep(0.05)
    t0, d0 = time.monotonic(), depth
    while depth and time.monotonic() < deadline:
        time.sleep(0.2)
        depth = _depth(sock)
    return (d0 - depth) / max(time.monotonic() - t0, 1e-9)


def _depth(sock: Path) -> int:
    async def get() -> int:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            total, after = 0, 0
            while True:
                writer.write(f"GET /v1/requests?state=queued&limit=500&after={after} HTTP/1.1\r\nhost: a\r\n\r\n"
                             .encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line[15:]) for line in head.split(b"\r\n")
                              if line[:15].lower() == b"content-length:")
                page = json.loads(await reader.readexactly(length))
                total += len(page["data"])
                if page["next_after"] is None:
                    return total
                after = page["next_after"]
        finally:
            writer.close()

    return asyncio.run(get())


def _serve(config: str, naive: bool) -> None:
    """The agent, in this process; `naive`: its queue commits each request alone (the same writer, batch of 1)."""
    from nanofleet.agent.cli import loop_factory
    from nanofleet.agent.queue.store import QueueStore
    from nanofleet.agent.service import AgentService
    from nanofleet.agent.settings import load_agent_settings

    svc = AgentService(load_agent_settings(config), warmup=False)
    if naive:
        path, limits = svc.queue.path, svc.queue.limits
        svc.queue.close()
        svc.queue = svc.dispatcher.queue = svc.drainer.store = QueueStore(path, limits, max_batch=1)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the event loop `nanofleet agent` runs on
        runner.run(svc.run(ready=lambda _line: print("serving", flush=True)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve(sys.argv[2], sys.argv[3:4] == ["naive"])
    else:
        print(run()["markdown"])
