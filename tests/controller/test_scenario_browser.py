"""The operator's day in a real Chromium (issue #10's scenario): log in; a simulated fleet of 50 (nanofleet.sim, each
device its own MQTT session on a real mosquitto, the real ingest path into SQLite); filter and page through the
device list; open a device; heat it with the simulator's heatwave and see its thermal level and a raised alert
within seconds, without a reload; acknowledge the alert; see the acknowledgement in the audit log; log out and be
refused. A screenshot of each page is kept under $NANOFLEET_ARTIFACTS (default /tmp/nanofleet-artifacts)/scenario."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright

from bench.bench_live import CHROMIUM_ARGS, chromium, login
from nanofleet.config import parse_fleet
from nanofleet.controller.service import ControllerService
from nanofleet.sim import Simulation

pytestmark = pytest.mark.browser
FLEET = """
fleet: scen
broker: {{url: {url}}}
alerts: {{offline_after_s: 60, thermal_at: severe, min_free_ram_mb: 256, queue_depth: 500}}
"""
HOT = ("severe", "critical", "emergency", "shutdown")
# the device page shows a thermal level at or above severe, as a level badge or its "thermal <level>" text
_HOT_SHOWN = """(levels) => {
  const main = document.getElementById("content");
  const text = main ? main.innerText : "";
  return levels.some((l) => text.includes("thermal " + l) || main.querySelector('[data-thermal="' + l + '"]'))
    ? Date.now() : false;
}"""


@pytest.fixture
def artifacts() -> Path:
    path = Path(os.environ.get("NANOFLEET_ARTIFACTS", "/tmp/nanofleet-artifacts")) / "scenario"
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _shot(page: Page, folder: Path, name: str) -> None:
    await page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


async def _hot_arrival(svc: ControllerService, device: str) -> float:
    """Wall-clock time the store first holds a hot thermal level for `device` (telemetry's arrival, polled)."""
    while True:
        d = await asyncio.to_thread(svc.store.get_device, device)  # type: ignore[union-attr]
        if d is not None and d.thermal_level in HOT:
            return time.time()
        await asyncio.sleep(0.01)


async def test_operator_scenario_on_a_simulated_fleet(broker: Any, tmp_path: Path, artifacts: Path) -> None:
    lines: list[str] = []
    svc = await ControllerService(parse_fleet(FLEET.format(url=broker.url)), tmp_path / "ctl",
                                  listen="127.0.0.1:0", echo=lines.append, sweep_every_s=0.5).start()
    token = next(line.split()[2] for line in lines if line.startswith("operator token:"))
    url = f"http://127.0.0.1:{svc.web_port}"
    sim = Simulation(broker.url, 50, fleet="scen", interval_s=1.0, data_dir=tmp_path / "sim")
    try:
        await sim.start()
        await sim.wait_connected(30)
        deadline = time.monotonic() + 30
        while len(await asyncio.to_thread(svc.store.list_devices)) < 50:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "50 simulated devices did not all report within 30 s"
            await asyncio.sleep(0.05)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS, headless=True)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                problems: list[str] = []
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

                # log in; the overview counts the fleet
                await page.goto(url + "/login")
                await _shot(page, artifacts, "01-login")
                await login(page, url, token)
                await page.wait_for_selector('#live-state[data-live="live"]', timeout=10_000)
                await _shot(page, artifacts, "02-overview")

                # the device list: filtered (in the URL), 25 a page, then the next page
                await page.goto(url + "/devices")
                await page.select_option('select[name="state"]', "online")
                await page.select_option('select[name="limit"]', "25")
                await page.click('form.filter button[type="submit"]')
                await page.wait_for_url("**/devices?*state=online*", timeout=10_000)
                assert "limit=25" in page.url
                first = await page.eval_on_selector_all("table.devices tbody tr[data-device]",
                                                        "rows => rows.map(r => r.dataset.device)")
                assert len(first) == 25
                await _shot(page, artifacts, "03-devices-filtered")
                await page.click('a[rel="next"]')
                await page.wait_for_url("**cursor=**", timeout=10_000)
                second = await page.eval_on_selector_all("table.devices tbody tr[data-device]",
                                                         "rows => rows.map(r => r.dataset.device)")
                assert len(second) == 25 and not set(first) & set(second)
                assert set(first) | set(second) == {d.device_id for d in sim.devices}
                await _shot(page, artifacts, "04-devices-page-2")

                # open a device from the list, then heat it with the simulator's heatwave (from a warm 72 °C, so
                # the test does not wait half a minute for a cool device to climb)
                device = second[3]
                await page.click(f'tr[data-device="{device}"] a[href="/devices/{device}"]')
                await page.wait_for_url(f"**/devices/{device}", timeout=10_000)
                await page.wait_for_selector('#live-state[data-live="live"]', timeout=10_000)
                await _shot(page, artifacts, "05-device")
                sim_device = next(d for d in sim.devices if d.device_id == device)
                arrival = asyncio.create_task(_hot_arrival(svc, device))
                sim_device.temp, sim_device.scenario = 72.0, "heatwave"
                shown = await page.wait_for_function(_HOT_SHOWN, arg=list(HOT), timeout=30_000, polling="raf")
                on_screen = await shown.json_value() / 1000
                arrived = await asyncio.wait_for(arrival, 5)
                telemetry_to_screen = on_screen - arrived
                print(f"telemetry to screen: {telemetry_to_screen:.3f} s")
                assert telemetry_to_screen < 2.0
                # the raised alert, as stored: the device page lists the engine's alerts, not flags of its own
                await page.wait_for_selector('#content .device-alerts tr[data-kind="thermal"][data-state="raised"]',
                                             timeout=10_000)
                assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload
                await page.wait_for_selector(".alert-count", timeout=10_000)  # the header's count, live too
                await _shot(page, artifacts, "06-device-hot")

                # acknowledge the alert on the alerts page
                await page.click('header.top nav a[href="/alerts"]')
                await page.wait_for_url("**/alerts", timeout=10_000)
                row = page.locator(f'tr[data-kind="thermal"][data-state="raised"]:has(a[href="/devices/{device}"])')
                await row.wait_for(timeout=10_000)
                alert_id = await row.get_attribute("data-alert-id")
                await row.locator('input[name="note"]').fill("fan replaced")
                await row.locator('button[type="submit"]').click()
                acked = page.locator(f'tr[data-alert-id="{alert_id}"][data-state="acknowledged"]')
                if not await acked.count():  # the page lists open alerts: acknowledged ones may be on another tab
                    await page.goto(url + "/alerts?state=all")
                await acked.wait_for(timeout=10_000)
                assert "fan replaced" in await acked.inner_text()
                await _shot(page, artifacts, "07-alert-acknowledged")

                # the acknowledgement in the audit log
                await page.click('header.top nav a[href="/audit"]')
                await page.wait_for_url("**/audit", timeout=10_000)
                ack = page.locator('tr[data-action="alert_ack"]').first
                await ack.wait_for(timeout=10_000)
                assert alert_id is not None and alert_id in await ack.inner_text()
                await _shot(page, artifacts, "08-audit")

                # log out and be refused
                await page.click('header.top form[action="/logout"] button')
                await page.wait_for_url("**/login**", timeout=10_000)
                await page.goto(url + "/devices")
                assert "/login" in page.url
                api = await page.request.get(url + "/api/devices")
                assert api.status == 401
                events = await page.request.get(url + "/events")
                assert events.status == 401
                await _shot(page, artifacts, "09-logged-out")
                assert [p for p in problems if "401" not in p] == []
            finally:
                await browser.close()
    finally:
        await sim.stop()
        await svc.stop()
