"""Dashboard cost: what serving the fleet over HTTP adds to reading the store.

Side by side in one run, on a real SQLite store with 1,000 devices (and one with an hour of 10 s telemetry):
the store read alone (the floor) against the REST API and the server-rendered pages, each through real uvicorn on
a loopback port with a Bearer token — so the figures include auth, JSON/HTML rendering, SVG charts and HTTP.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from bench.stats import interleaved, percentile
from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.protos import fleet_pb2

DEVICES = 1000
ROUNDS = 60


def _fill(store: Store, now: int) -> None:
    for i in range(DEVICES):
        store.write_status("bench", fleet_pb2.DeviceStatus(
            fleet="bench", device_id=f"dev-{i:04d}", online=True, bd_seq=1, ts_ms=now, agent_version="0.1.0",
            model=fleet_pb2.ModelState(name="tiny", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
            hardware=fleet_pb2.Hardware(ram_total_mb=4096), policy_version=1 + i % 3, telemetry_interval_s=10), now)
    store.write_telemetry("bench", [
        fleet_pb2.Telemetry(device_id=f"dev-{i:04d}", bd_seq=1, seq=0, ts_ms=now, cpu_percent=i % 100,
                            ram_total_mb=4096, ram_available_mb=2048, temp_max_c=40 + i % 30)
        for i in range(DEVICES)], now)
    store.write_telemetry("bench", [
        fleet_pb2.Telemetry(device_id="dev-0000", bd_seq=1, seq=k % 256, ts_ms=now - 3_600_000 + k * 10_000,
                            cpu_percent=k % 100, ram_total_mb=4096, ram_available_mb=2048 - k, temp_max_c=40 + k % 20)
        for k in range(1, 360)], now)


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store.db")
        now = int(time.time() * 1000)
        _fill(store, now)
        token, token_hash = ensure_operator_token(Path(tmp) / "data")
        app = create_app(store, parse_fleet("fleet: bench\n"), operator_token_hash=token_hash)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"})

        def get(path: str) -> None:
            r = client.get(path)
            r.raise_for_status()

        try:
            times = interleaved({
                "store.list_devices()": store.list_devices,
                "GET /api/devices": lambda: get("/api/devices"),
                "GET / (overview HTML)": lambda: get("/"),
                "store.telemetry(1 h)": lambda: store.telemetry("dev-0000", since_ms=now - 3_600_000, limit=5000),
                "GET /devices/{id} (3 SVG charts)": lambda: get("/devices/dev-0000?window=1h"),
            }, rounds=ROUNDS, budget_s=40)
        finally:
            client.close()
            server.should_exit = True
            thread.join(10)
            store.close()

    p50 = {k: percentile(v, 50) * 1000 for k, v in times.items()}
    p95 = {k: percentile(v, 95) * 1000 for k, v in times.items()}
    figures = {
        "devices": DEVICES,
        "p50_ms": {k: round(v, 2) for k, v in p50.items()},
        "p95_ms": {k: round(v, 2) for k, v in p95.items()},
        "api_devices_over_store_read": round(p50["GET /api/devices"] / p50["store.list_devices()"], 2),
        "overview_over_store_read": round(p50["GET / (overview HTML)"] / p50["store.list_devices()"], 2),
        "device_page_over_store_read": round(
            p50["GET /devices/{id} (3 SVG charts)"] / p50["store.telemetry(1 h)"], 2),
    }
    rows = "\n".join(f"| {k} | {p50[k]:.2f} | {p95[k]:.2f} |" for k in times)
    markdown = (
        f"{DEVICES} devices in a real SQLite store; HTTP through real uvicorn on loopback with a Bearer token; "
        f"{len(next(iter(times.values())))} interleaved rounds.\n\n"
        f"| path | p50 ms | p95 ms |\n|---|---|---|\n{rows}\n\n"
        f"REST list / store read: **{figures['api_devices_over_store_read']}×** · overview page / store read: "
        f"**{figures['overview_over_store_read']}×** · device page (1 h, 360 points, 3 charts) / its telemetry "
        f"read: **{figures['device_page_over_store_read']}×**"
    )
    return {"name": "dashboard", "figures": figures, "markdown": markdown}
