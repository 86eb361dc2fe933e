"""The dashboard in a real Chromium: log in through the form, see the fleet, open a device's charts, watch a device
turn offline when the store records its last will and another raise its offline-queue alert — served by real
uvicorn on a loopback port."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import sync_playwright

from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.events import FleetEvents
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.protos import fleet_pb2
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path("/tmp/nanofleet-dashboard.png")


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        raise RuntimeError("Debian's chromium is needed for the browser test: apt-get install -y chromium")
    return path


@dataclass
class Served:
    url: str
    token: str
    store: Store
    events: FleetEvents  # the test publishes each write's changes here, as ingest does after its commits


def _status(device: str, online: bool, **kw: object) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="demo", device_id=device, online=online, bd_seq=1,
                                  ts_ms=int(time.time() * 1000), **kw)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    store = Store(tmp_path / "store.db")
    now = int(time.time() * 1000)
    for i, device in enumerate(["pi-kitchen", "pi-lobby"]):
        store.write_status("demo", _status(
            device, True, agent_version="0.1.0", policy_version=3, telemetry_interval_s=10,
            model=fleet_pb2.ModelState(name="gemma-3-270m", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
            hardware=fleet_pb2.Hardware(ram_total_mb=8192)), now - 600_000)
        store.write_telemetry("demo", [
            fleet_pb2.Telemetry(device_id=device, bd_seq=1, seq=k % 256, ts_ms=now - 590_000 + k * 10_000,
                                cpu_percent=30 + 25 * ((k * 7 + i) % 5) / 4, ram_total_mb=8192,
                                ram_available_mb=5000 - 20 * k, temp_max_c=48 + k * 0.3 + i,
                                thermal_level=fleet_pb2.THERMAL_LEVEL_LIGHT, throttle_ratio=1.0, queue_depth=k % 3)
            for k in range(59)], now)
    token, token_hash = ensure_operator_token(tmp_path / "data")
    assert token is not None
    events = FleetEvents()
    app = create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, refresh_s=1, events=events)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws="none",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10, what="uvicorn to start")
    try:
        yield Served(f"http://127.0.0.1:{port}", token, store, events)
    finally:
        server.should_exit = True
        thread.join(10)
        store.close()


def test_login_overview_device_charts_and_offline_transition(served: Served) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            page.goto(served.url + "/devices/pi-lobby")
            assert "/login" in page.url  # nothing is shown before logging in
            page.fill("#token", "not-the-token")
            page.click("button[type=submit]")
            page.wait_for_selector("text=That operator token is not valid.", timeout=5000)
            page.fill("#token", served.token)
            page.click("button[type=submit]")
            page.wait_for_url(served.url + "/devices/pi-lobby", timeout=5000)  # back where we were headed
            problems.clear()  # the refused login above is logged as a 401; from here on nothing may fail
            page.goto(served.url + "/devices")
            page.wait_for_selector('tr[data-device="pi-kitchen"] [data-state="online"]', timeout=5000)
            assert page.locator("table.devices tbody tr").count() == 2

            page.click('a[href="/devices/pi-kitchen"]')
            page.wait_for_selector("svg.chart polyline", timeout=5000)
            assert page.locator("svg.chart").count() == 4  # temperature (thermal bands), CPU, RAM, queue depth
            assert page.locator('svg.chart rect.band[data-band="light"]').count() >= 1
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            page.goto(served.url + "/devices")
            page.wait_for_selector('tr[data-device="pi-kitchen"] [data-state="online"]', timeout=5000)
            started = time.monotonic()
            death = _status("pi-kitchen", False, reason="last_will")
            served.events.publish_devices(served.store.write_status("demo", death, int(time.time() * 1000)).changed)
            # The page refreshes itself on the event; no reload here.
            page.wait_for_selector('tr[data-device="pi-kitchen"] [data-state="offline"]', timeout=8000)
            assert time.monotonic() - started < 8
            assert page.locator('tr[data-device="pi-lobby"] [data-state="online"]').count() == 1
            # the cards count from the fleet summary, refreshed in the background at most a second behind
            page.wait_for_selector('[data-count="offline"] .n:text-is("1")', timeout=5000)
            assert page.locator('tr[data-device="pi-kitchen"] [data-alert="offline"]').count() == 0  # < 60 s ago

            # the offline queue over alerts.queue_depth (500) raises the row's alert badge on the next refresh;
            # requests waiting for a model slot are shown apart and raise none
            now = int(time.time() * 1000)
            served.events.publish_devices(served.store.write_telemetry("demo", [fleet_pb2.Telemetry(
                device_id="pi-lobby", bd_seq=1, seq=59, ts_ms=now, ram_total_mb=8192, ram_available_mb=4000,
                queue_depth=650, slots_waiting=3, queue_oldest_age_s=75)], now).changed)
            badge = 'tr[data-device="pi-lobby"] [data-alert="queue_depth"]'
            page.wait_for_selector(badge, timeout=8000)
            assert "650" in (page.get_attribute(badge, "title") or "")
            lobby = page.locator('tr[data-device="pi-lobby"]')
            assert lobby.locator('[data-col="oldest"]').inner_text() == "1m 15s"
            assert lobby.locator('[data-col="slots_waiting"]').inner_text() == "3"
            assert problems == []  # e.g. a CSP violation blocking our own inline script or style
        finally:
            browser.close()
