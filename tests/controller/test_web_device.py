"""The device page and its telemetry API over a real SQLite store: the agent's generation speed (tokens/s) stored
end to end and charted with gaps where none was measured, on raw and rollup windows; the device's stored alerts
(raised, acknowledged by whom, cleared) as the alert engine keeps them, and nothing on the page saying otherwise."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from ctl_helpers import flush_rollups
from test_web import FLEET, bearer, birth, death, login

from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.alerts_engine import AlertEngine
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.protos import fleet_pb2

RATES = [12.0, 14.0, 0.0, 0.0, 0.0, 16.0, 18.0]  # 0: the agent measured no generation then


def sample(device: str, i: int, ts: int, rate: float) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(
        device_id=device, bd_seq=1, seq=i, ts_ms=ts, cpu_percent=20.0, ram_total_mb=4096, ram_available_mb=3000,
        temp_max_c=45.0, throttle_ratio=1.0,
        model=fleet_pb2.ModelState(name="tiny-test", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE,
                                   tokens_per_s=rate))


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    now = int(time.time() * 1000)
    start = now - 70_000
    s.write_status("demo", birth("pi-1"), start - 1000)
    s.write_telemetry("demo", [sample("pi-1", i, start + i * 10_000, r) for i, r in enumerate(RATES)], now)
    s.write_status("demo", birth("pi-2"), now)
    flush_rollups(s)
    yield s
    s.close()


@pytest.fixture
async def client(store: Store, token_and_hash: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
        yield c


def tokens_chart(html: str) -> str:
    charts = [c for c in re.findall(r'<svg class="chart".*?</svg>', html) if 'aria-label="Generation speed"' in c]
    assert len(charts) == 1, "the device page has no tokens/s chart"
    return charts[0]


async def test_rest_telemetry_carries_tokens_per_s_null_when_none_was_measured(client: httpx.AsyncClient,
                                                                               token_and_hash) -> None:
    r = await client.get("/api/devices/pi-1/telemetry", headers=bearer(token_and_hash))
    assert [p["tokens_per_s"] for p in r.json()["points"]] == [12.0, 14.0, None, None, None, 16.0, 18.0]
    for resolution in ("1m", "1h"):  # averages of the measured samples (the store's tests hold the arithmetic)
        r = await client.get("/api/devices/pi-1/telemetry", params={"resolution": resolution},
                             headers=bearer(token_and_hash))
        points = r.json()["points"]
        assert sum(p["n"] for p in points) == 7
        rates = [p["tokens_per_s"] for p in points if p["tokens_per_s"] is not None]
        assert rates and all(12.0 <= v <= 18.0 for v in rates), points


async def test_device_page_charts_tokens_per_s_with_a_gap_where_none_was_measured(client: httpx.AsyncClient,
                                                                                   token_and_hash) -> None:
    await login(client, token_and_hash[0])
    page = (await client.get("/devices/pi-1", params={"window": "15m"})).text
    assert "no tokens/s" not in page
    chart = tokens_chart(page)
    assert "last 18.0 tokens/s" in chart
    lines = re.findall(r'<polyline points="([^"]+)"', chart)
    assert len(lines) == 2 and all(len(pts.split()) == 2 for pts in lines)  # 12, 14 | gap | 16, 18: no zeros
    ys = [float(p.split(",")[1]) for pts in lines for p in pts.split()]
    assert max(ys) < 22 + 134  # no point sits on the chart's floor (a zero)
    for window in ("6h", "24h", "7d"):  # the rollups carry the average: the long windows chart it too
        chart = tokens_chart((await client.get("/devices/pi-1", params={"window": window})).text)
        assert "<polyline" in chart or "<circle" in chart, window
    assert "no data in this window" in tokens_chart((await client.get("/devices/pi-2")).text)


def state_of(device: str, seq: int, now: int, *, level: int, ram: int) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(device_id=device, bd_seq=1, seq=seq, ts_ms=now, cpu_percent=50, ram_total_mb=4096,
                               ram_available_mb=ram, temp_max_c=60.0 + 10 * level, thermal_level=level)


def alert_rows(html: str) -> dict[str, str]:
    """kind -> the device page's row of that stored alert (its state in data-state)."""
    section = html.split('<section class="device-alerts"', 1)
    assert len(section) == 2, "the device page has no alerts section"
    body = section[1].split("</section>", 1)[0]
    return {m.group(1): m.group(0) for m in re.finditer(r'<tr data-kind="([a-z_]+)".*?</tr>', body, re.S)}


async def test_device_page_lists_its_stored_alerts_open_and_recently_cleared(store_url: str, token_and_hash) -> None:
    now = int(time.time() * 1000)
    with Store(store_url) as store:
        engine = AlertEngine(AlertStore(store), FLEET)
        store.write_status("demo", birth("hot-1"), now)
        store.write_telemetry("demo", [state_of("hot-1", 0, now, level=fleet_pb2.THERMAL_LEVEL_CRITICAL, ram=100)], now)
        store.write_status("demo", birth("other"), now)
        store.write_telemetry("demo", [state_of("other", 0, now, level=fleet_pb2.THERMAL_LEVEL_CRITICAL, ram=100)], now)
        engine.evaluate(now)  # raises thermal + low_ram for both devices
        (thermal,), _ = engine.alerts.page(device_id="hot-1", kind="thermal")
        engine.alerts.acknowledge(thermal.id, "alice", "fan ordered", now + 1)
        store.write_telemetry("demo", [state_of("hot-1", 1, now + 2, level=fleet_pb2.THERMAL_LEVEL_CRITICAL,
                                                ram=3000)], now + 2)
        engine.evaluate(now + 2)  # RAM recovered: low_ram cleared; still hot: thermal stays acknowledged
        app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], alerts=engine.alerts)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
            await login(c, token_and_hash[0])
            page = (await c.get("/devices/hot-1")).text
            rows = alert_rows(page)
            assert set(rows) == {"thermal", "low_ram"}  # this device's only: not other's
            assert 'data-state="acknowledged"' in rows["thermal"] and "alice" in rows["thermal"]
            assert "fan ordered" in rows["thermal"] and "critical" in rows["thermal"]
            assert 'data-state="cleared"' in rows["low_ram"]
            assert 'href="/alerts?state=all&amp;device=hot-1"' in page
            # the alerts page follows that link: this device's alerts, every state
            listing = (await c.get("/alerts", params={"state": "all", "device": "hot-1"})).text
            ids = set(re.findall(r'<tr data-alert-id="\d+" data-kind="([a-z_]+)"', listing))
            assert ids == {"thermal", "low_ram"} and ">other<" not in listing


async def test_nothing_on_the_device_page_contradicts_the_stored_alerts(store_url: str, token_and_hash) -> None:
    """Over a threshold now but no alert stored yet (the engine has not run), or the alert acknowledged: the page
    says what is stored — no 'raised' flag of its own making."""
    now = int(time.time() * 1000)
    with Store(store_url) as store:
        engine = AlertEngine(AlertStore(store), FLEET)
        store.write_status("demo", birth("hot-1"), now)
        store.write_telemetry("demo", [state_of("hot-1", 0, now, level=fleet_pb2.THERMAL_LEVEL_CRITICAL, ram=3000)],
                              now)
        app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], alerts=engine.alerts)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
            await login(c, token_and_hash[0])
            page = (await c.get("/devices/hot-1")).text
            assert 'data-alert="thermal"' not in page  # a flag of the page's own making, stored nowhere
            assert alert_rows(page) == {} and "No open alerts" in page
            engine.evaluate(now)
            (thermal,), _ = engine.alerts.page(device_id="hot-1")
            page = (await c.get("/devices/hot-1")).text
            assert 'data-state="raised"' in alert_rows(page)["thermal"]
            engine.alerts.acknowledge(thermal.id, "bob", "", now + 1)
            page = (await c.get("/devices/hot-1")).text
            assert 'data-state="acknowledged"' in alert_rows(page)["thermal"]
            assert "raised" not in re.sub(r"<section class=\"device-alerts\".*?</section>", "", page, flags=re.S)
            store.write_status("demo", death("hot-1"), now + 2)
            assert (await c.get("/devices/hot-1")).status_code == 200
