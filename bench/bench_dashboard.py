"""Dashboard at fleet scale: server time of each page at 10,000 devices, and how it grows from 1,000.

Each size gets a real SQLite store filled through the store's write API: devices in three groups (two by fleet.yaml
`match` globs, the rest `default`), all states and thermal levels, a policy published to each (some behind it),
route counters with an hour-old snapshot, and — for the device being viewed — a day of 10 s telemetry (8,640 rows)
rolled up. Each store is served by real uvicorn on a loopback port with a Bearer token. The figure is server time:
from the request entering the ASGI app to its last body byte (auth, SQL, Jinja2, SVG), measured by a wrapper around
the app; the client's round trip is given beside it. Goal: p95 <= 200 ms each, and 10k / 1k p95 <= 1.5.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.stats import interleaved, percentile
from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.store import Batch, Store, TelemetryRow
from nanofleet.controller.views import PublishedPolicy
from nanofleet.controller.web import create_app
from nanofleet.protos import fleet_pb2

SIZES = (1_000, 10_000)
ROUNDS = 200
VIEWED = "dev-00000"
DAY_MS = 86_400_000
FLEET = parse_fleet("fleet: bench\ngroups:\n  kiosks: {match: ['dev-0*']}\n  lab: {match: ['dev-1*']}\n"
                    "gateway: {budgets: {fleet_tokens_per_day: 5000000}}\n")

Scope = MutableMapping[str, Any]
ASGI = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _fill(store: Store, n: int, now: int) -> None:
    rng = random.Random(n)
    ids = [f"dev-{i:05d}" for i in range(n)]
    for chunk in range(0, n, 2000):
        store.apply(Batch("bench", now - 60_000, statuses=[fleet_pb2.DeviceStatus(
            fleet="bench", device_id=d, online=True, bd_seq=1, ts_ms=now - 60_000, agent_version="0.1.0",
            model=fleet_pb2.ModelState(name=rng.choice(("tiny", "gemma-3-270m")),
                                       availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
            hardware=fleet_pb2.Hardware(ram_total_mb=4096), policy_version=2 if rng.random() < 0.9 else 1,
            telemetry_interval_s=10) for d in ids[chunk:chunk + 2000]]))
    store.snapshot_routes(now - 3_600_000)  # the hour-old counters (all zero): the route mix counts from here
    for chunk in range(0, n, 2000):
        part = ids[chunk:chunk + 2000]
        store.apply(Batch("bench", now, telemetry=[TelemetryRow(
            d, 1, 1, now - 1000, cpu_percent=rng.uniform(0, 100), ram_total_mb=4096,
            ram_available_mb=rng.randrange(100, 4000), temp_max_c=rng.uniform(35, 90),
            thermal_level=rng.choice((0, 0, 0, 1, 1, 2, 3, 4)), queue_depth=rng.choice((0, 0, 0, 2, 40)),
            slots_waiting=rng.choice((0, 0, 1)), policy_version=2 if rng.random() < 0.9 else 1,
            route_counts={"local": rng.randrange(500), "cloud": rng.randrange(50)}) for d in part]))
        gone = [fleet_pb2.DeviceStatus(fleet="bench", device_id=d, online=False, bd_seq=1, reason="last_will")
                for d in part if rng.random() < 0.1]
        store.apply(Batch("bench", now, statuses=gone))
    store.record_policies([PublishedPolicy(d, 2, "h", "{}", now) for d in ids], {d: ["(new)"] for d in ids})
    for start in range(0, 8640, 1440):  # a day of 10 s telemetry for the viewed device, oldest first
        store.apply(Batch("bench", now, telemetry=[TelemetryRow(
            VIEWED, 1, k % 256, now - DAY_MS + k * 10_000, cpu_percent=k % 100, ram_total_mb=4096,
            ram_available_mb=2048 - k % 500, temp_max_c=40 + (k % 360) / 10, thermal_level=(k // 720) % 4,
            queue_depth=k % 7) for k in range(start, start + 1440)]))
    store.db.call(store._flush_rollups)  # what housekeeping does every few seconds, done now


class _Timed:
    """ASGI wrapper recording each request's server time (entry to the last body byte) by path."""

    def __init__(self, app: ASGI) -> None:
        self.app = app
        self.times: dict[str, list[float]] = {}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        key = scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")

        async def timed_send(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.times.setdefault(key, []).append(time.perf_counter() - t0)

        await self.app(scope, receive, timed_send)


class _Served:
    """One size's store, served by real uvicorn on a loopback port, with the paths to time."""

    def __init__(self, n: int, tmp: Path) -> None:
        self.n = n
        self.store = Store(tmp / f"store-{n}.db")
        now = int(time.time() * 1000)
        t_fill = time.monotonic()
        _fill(self.store, n, now)
        self.fill_s = time.monotonic() - t_fill
        token, token_hash = ensure_operator_token(tmp / f"data-{n}")
        self.timed = _Timed(create_app(self.store, FLEET, operator_token_hash=token_hash))
        self.server = uvicorn.Server(uvicorn.Config(self.timed, host="127.0.0.1", port=0, log_level="warning",
                                                    ws="none", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})
        filtered = "group=kiosks&state=online&sort=temp&desc=1&limit=50"
        cursor = None
        for _ in range(3):  # the filtered list's 4th page, reached by following the cursor
            cursor = self.client.get(f"/api/devices?{filtered}" + (f"&cursor={cursor}" if cursor else "")).json()[
                "next_cursor"]
        api_cursor = self.client.get("/api/devices?limit=100").json()["next_cursor"]
        self.paths = {
            "overview": "/",
            "devices, first page": "/devices",
            "devices, filtered 4th page": f"/devices?{filtered}&cursor={cursor}",
            "/api/devices, 2nd page of 100": f"/api/devices?limit=100&cursor={api_cursor}",
            "device page, 24 h": f"/devices/{VIEWED}?window=24h",
        }

    def getter(self, path: str) -> Callable[[], None]:
        def get() -> None:
            self.client.get(path).raise_for_status()
        return get

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()

    def figures(self, client_times: dict[str, list[float]]) -> dict[str, Any]:
        out: dict[str, Any] = {"fill_s": round(self.fill_s, 1)}
        for name, path in self.paths.items():
            server_t = self.timed.times[path][3:]  # the interleaved warm-up rounds left out
            out[name] = {"p50_ms": round(percentile(server_t, 50) * 1000, 1),
                         "p95_ms": round(percentile(server_t, 95) * 1000, 1),
                         "client_p50_ms": round(percentile(client_times[f"{self.n}:{name}"], 50) * 1000, 1),
                         "n": len(server_t)}
        return out


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        served = [_Served(n, Path(tmp)) for n in SIZES]
        try:  # both sizes served at once and timed in turn, so the machine's noise hits them alike
            client_times = interleaved({f"{s.n}:{name}": s.getter(path) for s in served
                                        for name, path in s.paths.items()}, rounds=ROUNDS, budget_s=240)
        finally:
            for s in served:
                s.close()
        by_size = {s.n: s.figures(client_times) for s in served}
    small, big = by_size[SIZES[0]], by_size[SIZES[-1]]
    names = [k for k in big if k != "fill_s"]
    ratio = {k: round(big[k]["p95_ms"] / max(small[k]["p95_ms"], 0.1), 2) for k in names}
    ok = all(big[k]["p95_ms"] <= 200 for k in names) and all(r <= 1.5 for r in ratio.values())
    rows = "\n".join(
        f"| {k} | {small[k]['p50_ms']} / {small[k]['p95_ms']} | {big[k]['p50_ms']} / {big[k]['p95_ms']} | "
        f"{big[k]['client_p50_ms']} | {ratio[k]}× |" for k in names)
    markdown = (
        f"Server time (ASGI entry to last body byte) through real uvicorn, Bearer token; both sizes served at once, "
        f"{ROUNDS} rounds interleaving every path of both; {VIEWED} has a day of 10 s telemetry (8,640 rows).\n\n"
        f"| path | {SIZES[0]:,} devices p50 / p95 ms | {SIZES[-1]:,} devices p50 / p95 ms | "
        f"client p50 ms at {SIZES[-1]:,} | p95 {SIZES[-1] // 1000}k / {SIZES[0] // 1000}k |\n"
        f"|---|---|---|---|---|\n{rows}\n\n"
        f"Goal p95 <= 200 ms and ratio <= 1.5: **{'met' if ok else 'NOT met'}**.")
    return {"name": "dashboard", "figures": {"sizes": by_size, "p95_ratio": ratio, "goal_met": ok},
            "markdown": markdown}
