"""Dashboard + REST API in-process (httpx.ASGITransport) over a real SQLite store filled through its write API."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from ctl_helpers import flush_rollups, reject

from nanofleet.config import parse_fleet
from nanofleet.controller.alerts_engine import AlertEngine
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.controller.web.security import COOKIE
from nanofleet.protos import fleet_pb2

FLEET = parse_fleet("fleet: demo\ngroups: {kiosks: {}}\ndevices: {pi-1: {group: kiosks}}\n"
                    "alerts: {thermal_at: severe, min_free_ram_mb: 256, queue_depth: 500}\n")
EVIL_ID = "<img src=x onerror=alert(1)>"
EVIL_MODEL = "</script><script>alert('m')</script>"


def birth(device: str, bd_seq: int = 1, *, policy: int = 7, model: str = "tiny-test",
          ts: int | None = None) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(
        fleet="demo", device_id=device, online=True, bd_seq=bd_seq, ts_ms=ts or int(time.time() * 1000),
        agent_version="0.1.0",
        model=fleet_pb2.ModelState(name=model, availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE),
        hardware=fleet_pb2.Hardware(ram_total_mb=4096), policy_version=policy, telemetry_interval_s=10,
    )


def death(device: str, bd_seq: int = 1) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="demo", device_id=device, online=False, bd_seq=bd_seq, reason="last_will")


def samples(device: str, n: int, *, start_ms: int, bd_seq: int = 1, step_ms: int = 10_000) -> list[fleet_pb2.Telemetry]:
    return [
        fleet_pb2.Telemetry(device_id=device, bd_seq=bd_seq, seq=i % 256, ts_ms=start_ms + i * step_ms,
                            cpu_percent=20.0 + i, ram_total_mb=4096, ram_available_mb=3000 - 10 * i,
                            temp_max_c=45.0 + i / 2, thermal_level=fleet_pb2.THERMAL_LEVEL_LIGHT, throttle_ratio=1.0,
                            queue_depth=i, policy_version=7)
        for i in range(n)
    ]


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The test fleet in a SQLite store, or on the backend a BOTH test names."""
    backend = getattr(request, "param", "sqlite")
    s = Store(tmp_path / "store.db" if backend == "sqlite" else request.getfixturevalue("pg_url"))
    now = int(time.time() * 1000)
    s.write_status("demo", birth("pi-1"), now - 60_000)
    s.write_telemetry("demo", samples("pi-1", 6, start_ms=now - 55_000), now)
    s.write_status("demo", birth("pi-2", policy=7), now - 30_000)
    s.write_status("demo", birth("pi-3", policy=6), now - 30_000)
    s.write_status("demo", death("pi-3"), now - 20_000)
    yield s
    s.close()


@pytest.fixture
async def client(store: Store, token_and_hash: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
        yield c


# the tests whose routes run the dashboard's SQL (device list, overview, device page, groups): on both backends
BOTH = pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)


def bearer(token_and_hash: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_and_hash[0]}"}


async def login(client: httpx.AsyncClient, token: str, next_path: str = "/") -> httpx.Response:
    return await client.post("/login", data={"token": token, "next": next_path})


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


# ---- auth ------------------------------------------------------------------------------------------------------
async def test_healthz_is_the_only_open_route(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"ok": True}
    for path in ["/api/devices", "/api/devices/pi-1", "/api/policy/convergence", "/api/rejections", "/api/usage",
                 "/openapi.json", "/api/devices/pi-1/telemetry"]:
        r = await client.get(path)
        assert r.status_code == 401, path
        assert r.json()["error"] == "missing_token" and "Bearer" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    for path in ["/", "/devices/pi-1", "/api"]:
        r = await client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=" + quote(path, safe=""), path


async def test_docs_pages_that_load_from_a_cdn_are_absent(client: httpx.AsyncClient, token_and_hash) -> None:
    for path in ["/docs", "/redoc"]:
        assert (await client.get(path, headers=bearer(token_and_hash))).status_code == 404


async def test_wrong_and_malformed_tokens_get_clear_401(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.get("/api/devices", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == {"error": "invalid_token", "detail": "the operator token is not valid"}
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    r = await client.get("/api/devices", headers={"Authorization": f"Basic {token_and_hash[0]}"})
    assert r.status_code == 401 and r.json()["error"] == "malformed_authorization"
    r = await client.get("/api/devices", headers={"Authorization": "Bearer " + "x" * 5000})
    assert r.status_code == 401


async def test_cookie_login_then_logout(client: httpx.AsyncClient, token_and_hash) -> None:
    bad = await login(client, "wrong-token")
    assert bad.status_code == 401 and "That operator token is not valid." in bad.text
    assert COOKIE not in bad.cookies
    good = await login(client, token_and_hash[0], "/devices/pi-1?window=15m")
    assert good.status_code == 303 and good.headers["location"] == "/devices/pi-1?window=15m"
    set_cookie = good.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Max-Age=" in set_cookie
    cookie = good.cookies[COOKIE]
    page = await client.get("/")
    assert page.status_code == 200 and "pi-1" in page.text
    assert (await client.get("/api/devices")).status_code == 200  # the session also opens the API for reads

    refused = await client.post("/logout", data={"csrf": "forged"})
    assert refused.status_code == 403 and (await client.get("/")).status_code == 200
    out = await client.post("/logout", data={"csrf": csrf_of(page.text)})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert (await client.get("/")).status_code == 303
    # The old cookie, replayed after logout, is dead (revoked server-side, not only deleted in the browser).
    client.cookies.set(COOKIE, cookie)
    r = await client.get("/api/devices")
    assert r.status_code == 401 and r.json()["error"] == "session_expired"


async def test_login_refuses_cross_site_post_and_open_redirect(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.post("/login", data={"token": token_and_hash[0]}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and COOKIE not in r.cookies
    r = await login(client, token_and_hash[0], "https://evil.example/")
    assert r.status_code == 303 and r.headers["location"] == "/"


async def test_session_expires(store: Store, token_and_hash) -> None:
    now = [1_000_000.0]
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], session_ttl_s=60, clock=lambda: now[0])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        await login(c, token_and_hash[0])
        assert (await c.get("/")).status_code == 200
        now[0] += 61
        r = await c.get("/")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


# ---- REST API ----------------------------------------------------------------------------------------------------
@BOTH
async def test_api_devices(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.get("/api/devices", headers=bearer(token_and_hash))
    assert r.status_code == 200
    body = r.json()
    assert body["next_cursor"] is None and body["total"] == 3
    devices = {d["device_id"]: d for d in body["items"]}
    assert set(devices) == {"pi-1", "pi-2", "pi-3"}
    d1 = devices["pi-1"]
    assert d1["state"] == "online" and d1["group"] == "kiosks" and d1["model_name"] == "tiny-test"
    assert d1["cpu_percent"] == 25.0 and d1["ram_available_mb"] == 2950 and d1["ram_total_mb"] == 4096
    assert d1["thermal_level"] == "light" and d1["queue_depth"] == 5 and d1["policy_version"] == 7
    assert devices["pi-3"]["state"] == "offline"
    one = await client.get("/api/devices/pi-1", headers=bearer(token_and_hash))
    assert one.json() == d1


@BOTH
async def test_api_devices_pages_filters_and_sorts(client: httpx.AsyncClient, token_and_hash) -> None:
    first = (await client.get("/api/devices", params={"limit": 2, "sort": "policy", "desc": "1"},
                              headers=bearer(token_and_hash))).json()
    assert [d["device_id"] for d in first["items"]] == ["pi-2", "pi-1"] and first["total"] == 3  # v7, v7, then v6
    rest = (await client.get("/api/devices", params={"limit": 2, "sort": "policy", "desc": "1",
                                                     "cursor": first["next_cursor"]},
                             headers=bearer(token_and_hash))).json()
    assert [d["device_id"] for d in rest["items"]] == ["pi-3"] and rest["next_cursor"] is None
    kiosks = (await client.get("/api/devices", params={"group": "kiosks"}, headers=bearer(token_and_hash))).json()
    assert [d["device_id"] for d in kiosks["items"]] == ["pi-1"]
    default = (await client.get("/api/devices", params={"group": "default", "state": "online"},
                                headers=bearer(token_and_hash))).json()
    assert [(d["device_id"], d["group"]) for d in default["items"]] == [("pi-2", "default")]
    wrong = await client.get("/api/devices", params={"sort": "cpu", "cursor": first["next_cursor"]},
                             headers=bearer(token_and_hash))
    assert wrong.status_code == 422 and wrong.json()["detail"].startswith("query.cursor: it belongs to sort 'policy'")
    bad = await client.get("/api/devices", params={"limit": 0, "sort": "colour"}, headers=bearer(token_and_hash))
    assert bad.status_code == 422 and "query.limit" in bad.json()["detail"] and "query.sort" in bad.json()["detail"]


async def test_unknown_device_is_a_clear_404(client: httpx.AsyncClient, token_and_hash) -> None:
    for path in ["/api/devices/ghost", "/api/devices/ghost/telemetry"]:
        r = await client.get(path, headers=bearer(token_and_hash))
        assert r.status_code == 404
        assert r.json() == {"error": "device_not_found", "detail": "no device 'ghost' has reported to this controller"}
    await login(client, token_and_hash[0])
    page = await client.get("/devices/ghost")
    assert page.status_code == 404 and "no device &#39;ghost&#39; has reported" in page.text


@BOTH
async def test_api_telemetry_raw_and_rollups(client: httpx.AsyncClient, store: Store, token_and_hash) -> None:
    r = await client.get("/api/devices/pi-1/telemetry", headers=bearer(token_and_hash))
    body = r.json()
    assert body["resolution"] == "raw" and [p["cpu_percent"] for p in body["points"]] == [20, 21, 22, 23, 24, 25]
    ts = [p["ts_ms"] for p in body["points"]]
    assert ts == sorted(ts)
    r = await client.get("/api/devices/pi-1/telemetry", params={"since_ms": ts[3], "limit": 2},
                         headers=bearer(token_and_hash))
    assert [p["ts_ms"] for p in r.json()["points"]] == ts[4:]
    flush_rollups(store)
    r = await client.get("/api/devices/pi-1/telemetry", params={"resolution": "1m"}, headers=bearer(token_and_hash))
    points = r.json()["points"]
    assert points and sum(p["n"] for p in points) == 6
    assert max(p["cpu_max"] for p in points) == 25.0
    assert min(p["ram_available_mb"] for p in points) == 2950


async def test_bad_query_names_the_field(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.get("/api/devices/pi-1/telemetry", params={"limit": 0, "resolution": "5m"},
                         headers=bearer(token_and_hash))
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    assert "query.limit" in r.json()["detail"] and "query.resolution" in r.json()["detail"]


@BOTH
async def test_api_convergence_and_rejections(client: httpx.AsyncClient, store: Store, token_and_hash) -> None:
    r = await client.get("/api/policy/convergence", headers=bearer(token_and_hash))
    assert r.json() == {"latest": 7, "converged": 2, "total": 3,
                        "versions": [{"version": 7, "devices": 2}, {"version": 6, "devices": 1}], "behind": []}
    reject(store, "pi-2", "nanofleet/v1/demo/pi-2/telemetry", "telemetry.cpu_percent: not a number")
    reject(store, "pi-2", "nanofleet/v1/demo/pi-2/telemetry", "telemetry.cpu_percent: not a number")
    rej = (await client.get("/api/rejections", headers=bearer(token_and_hash))).json()
    assert rej == [{"device_id": "pi-2", "topic": "nanofleet/v1/demo/pi-2/telemetry",
                    "reason": "telemetry.cpu_percent: not a number", "count": 2, "last_ms": rej[0]["last_ms"]}]


@BOTH
async def test_convergence_names_devices_behind_their_published_policy(client: httpx.AsyncClient, store: Store,
                                                                       token_and_hash) -> None:
    from nanofleet.controller.views import PublishedPolicy

    store.record_policies([PublishedPolicy(d, 7, "h", "{}", 0) for d in ("pi-1", "pi-2", "pi-3")])
    body = (await client.get("/api/policy/convergence", headers=bearer(token_and_hash))).json()
    assert body["behind"] == [{"device_id": "pi-3", "applied": 6, "published": 7}]
    await login(client, token_and_hash[0])
    assert "1 device not yet on the policy published for it:" in (await client.get("/")).text


async def test_stale_device_and_alert_thresholds_are_visible(tmp_path: Path, token_and_hash) -> None:
    s = Store(tmp_path / "alerts.db")
    try:
        now = int(time.time() * 1000)
        s.write_status("demo", birth("hot"), now)
        s.write_telemetry("demo", [fleet_pb2.Telemetry(
            device_id="hot", bd_seq=1, seq=0, ts_ms=now, cpu_percent=99, ram_total_mb=4096, ram_available_mb=100,
            temp_max_c=91.5, thermal_level=fleet_pb2.THERMAL_LEVEL_CRITICAL, queue_depth=900)], now)
        s.write_status("demo", birth("quiet"), now - 600_000)
        s.sweep_stale(now)  # quiet: 10 s interval, silent for 10 min
        app = create_app(s, FLEET, operator_token_hash=token_and_hash[1])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            answer = (await c.get("/api/devices", headers=bearer(token_and_hash))).json()
            devices = {d["device_id"]: d for d in answer["items"]}
            assert devices["quiet"]["state"] == "stale" and devices["hot"]["state"] == "online"
            await login(c, token_and_hash[0])
            html = (await c.get("/devices")).text
            rows = dict(re.findall(r'<tr class="row-\w+" data-device="([^"]+)">(.*?)</tr>', html))
            assert 'data-state="stale"' in rows["quiet"] and ">stale<" in rows["quiet"]
            hot = rows["hot"]
            assert hot.count('class="warn"') == 4  # temperature, thermal level, RAM, queue depth
            assert "91.5 °C ⚠" in hot and "critical ⚠" in hot and "900 ⚠" in hot
            assert 'title="below 256 MB free"' in hot
            assert re.search(r'data-count="stale"><div class="n">1<', html)  # cards count all devices
    finally:
        s.close()


async def test_openapi_documents_the_api(client: httpx.AsyncClient, token_and_hash) -> None:
    schema = (await client.get("/openapi.json", headers=bearer(token_and_hash))).json()
    for path in ["/api/devices", "/api/devices/{device_id}", "/api/devices/{device_id}/telemetry",
                 "/api/policy/convergence", "/api/rejections", "/api/usage"]:
        assert "get" in schema["paths"][path], path
    assert "404" in schema["paths"]["/api/devices/{device_id}"]["get"]["responses"]
    assert "/login" not in schema["paths"]
    await login(client, token_and_hash[0])
    page = await client.get("/api")
    assert "/api/policy/convergence" in page.text


async def test_usage_not_configured_is_404(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.get("/api/usage", headers=bearer(token_and_hash))
    assert r.status_code == 404 and r.json()["error"] == "usage_not_configured"


async def test_usage_db_not_yet_written_reads_as_empty(tmp_path: Path, store: Store, token_and_hash) -> None:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], usage_db=tmp_path / "absent.db")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        body = (await c.get("/api/usage", headers=bearer(token_and_hash))).json()
        assert body == {"day": None, "rows": [], "total_tokens": 0, "total_cost_usd": 0.0}
        assert "No cloud requests recorded." in (await c.get("/", headers=bearer(token_and_hash))).text
    assert not (tmp_path / "absent.db").exists()


async def test_usage_from_the_gateway_db(tmp_path: Path, store: Store, token_and_hash) -> None:
    from nanofleet.config import DEFAULT_PRICES
    from nanofleet.controller.gateway.db import Database
    from nanofleet.controller.gateway.usage import UsageLedger

    db = Database(tmp_path / "gateway.db")
    ledger = UsageLedger(db, DEFAULT_PRICES)
    now = time.time()
    await ledger.record("pi-1", "com.example.notes", "gemini-2.5-flash", 1000, 200, now)
    await ledger.record("pi-1", "com.example.notes", "gemini-2.5-flash", 1000, 200, now)
    await ledger.record("pi-2", "<b>app</b>", "gemini-2.5-flash", 10, 1, now - 86_400 * 2)
    db.close()

    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], usage_db=tmp_path / "gateway.db")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        body = (await c.get("/api/usage", headers=bearer(token_and_hash))).json()
        assert len(body["rows"]) == 2 and body["total_tokens"] == 2 * 1200 + 11
        notes = next(r for r in body["rows"] if r["app_id"] == "com.example.notes")
        assert notes["requests"] == 2 and notes["cost_usd"] == pytest.approx(2 * (1000 * 0.30 + 200 * 2.50) / 1e6)
        today = time.strftime("%Y-%m-%d", time.gmtime(now))
        day = (await c.get("/api/usage", params={"day": today}, headers=bearer(token_and_hash))).json()
        assert [r["device_id"] for r in day["rows"]] == ["pi-1"]
        bad = await c.get("/api/usage", params={"day": "yesterday"}, headers=bearer(token_and_hash))
        assert bad.status_code == 422 and "query.day" in bad.json()["detail"]
        await login(c, token_and_hash[0])
        page = (await c.get("/")).text
        assert "Gateway usage" in page and "com.example.notes" in page and "2400 tokens, $0.0016" in page
        assert "&lt;b&gt;app&lt;/b&gt;" not in page  # two days ago: the overview shows today's usage
        db = Database(tmp_path / "gateway.db")  # an app with markup in its id, today
        await UsageLedger(db, DEFAULT_PRICES).record("pi-3", "<b>app</b>", "gemini-2.5-flash", 10, 1, now)
        db.close()
        page = (await c.get("/")).text
        assert "&lt;b&gt;app&lt;/b&gt;" in page and "<b>app</b>" not in page
    app.state.close()


# ---- pages -------------------------------------------------------------------------------------------------------
@BOTH
async def test_overview_page(client: httpx.AsyncClient, token_and_hash) -> None:
    await login(client, token_and_hash[0])
    r = await client.get("/")
    assert r.status_code == 200
    overview = r.text
    assert "2 of 3 devices run policy version v7, the newest published" in overview
    assert "No malformed payloads rejected." in overview
    assert 'data-refresh="3"' in overview
    assert re.search(r'data-thermal="light"><div class="n">1<', overview)  # pi-1, linked to its filtered list
    assert 'href="/devices?thermal=light"' in overview and 'href="/devices?state=offline"' in overview
    assert 'data-hot="pi-1"' in overview  # the only device with a temperature
    html = (await client.get("/devices")).text
    rows = dict(re.findall(r'<tr class="row-\w+" data-device="([^"]+)">(.*?)</tr>', html))
    assert set(rows) == {"pi-1", "pi-2", "pi-3"}
    assert 'data-state="online"' in rows["pi-1"] and ">online<" in rows["pi-1"]
    assert 'data-state="offline"' in rows["pi-3"] and ">offline<" in rows["pi-3"]
    assert "kiosks" in rows["pi-1"] and "47.5 °C" in rows["pi-1"] and "2950 MB / 4096 MB" in rows["pi-1"]
    assert "25.0 %" in rows["pi-1"] and "tiny-test" in rows["pi-1"]
    assert re.search(r"<time [^>]*>(just now|\d+ s ago)</time>", rows["pi-1"])
    assert 'data-refresh="3"' in html


@BOTH
async def test_device_list_filters_pages_and_sorts(client: httpx.AsyncClient, store: Store, token_and_hash) -> None:
    await login(client, token_and_hash[0])

    def shown(html: str) -> list[str]:
        return re.findall(r'<tr class="row-\w+" data-device="([^"]+)">', html)

    assert shown((await client.get("/devices", params={"state": "offline"})).text) == ["pi-3"]
    assert shown((await client.get("/devices", params={"q": "KIOSK"})).text) == ["pi-1"]  # group, case-insensitive
    html = (await client.get("/devices", params={"q": '"><script>'})).text
    assert "No device matches this filter." in html and 'value="&#34;&gt;&lt;script&gt;"' in html
    assert (await client.get("/devices", params={"state": "exploded"})).status_code == 422
    first = (await client.get("/devices", params={"limit": 2})).text
    assert shown(first) == ["pi-1", "pi-2"] and "2 shown of 3 matching" in first
    next_link = re.search(r'<a href="([^"]+)" rel="next">', first)
    assert next_link and "limit=2" in next_link.group(1) and "cursor=" in next_link.group(1)
    rest = (await client.get(next_link.group(1).replace("&amp;", "&"))).text
    assert shown(rest) == ["pi-3"] and 'rel="next"' not in rest and 'rel="first"' in rest
    by_policy = (await client.get("/devices", params={"sort": "policy"})).text
    assert shown(by_policy) == ["pi-3", "pi-1", "pi-2"]  # v6 first, then v7 by id
    assert 'data-sort="policy">Policy</a>▲' in by_policy
    header = re.search(r'<a href="([^"]+)" data-sort="policy">', by_policy)
    assert header and "desc=1" in header.group(1)  # the sorting column's header flips the direction
    bad = await client.get("/devices", params={"cursor": "garbage"})
    assert bad.status_code == 422 and "query.cursor" in bad.text


async def test_pages_carry_a_strict_csp_with_matching_nonce(client: httpx.AsyncClient, token_and_hash) -> None:
    await login(client, token_and_hash[0])
    r = await client.get("/")
    csp = r.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert f'<style nonce="{nonce}">' in r.text and f'<script nonce="{nonce}">' in r.text
    assert not re.search(r"(src|href|action)=\"(https?:)?//|url\(|@import", r.text)  # no external asset at all
    assert r.headers["x-frame-options"] == "DENY" and r.headers["cache-control"] == "no-store"


@BOTH
async def test_fragment_refresh(client: httpx.AsyncClient, store: Store, token_and_hash) -> None:
    r = await client.get("/", headers={"X-Fragment": "1"})
    assert r.status_code == 401  # a background fetch gets 401, not a login page to paste into the table
    await login(client, token_and_hash[0])
    r = await client.get("/", headers={"X-Fragment": "1"})
    assert r.status_code == 200 and not r.text.startswith("<!doctype") and "<h1>Fleet</h1>" in r.text
    store.write_status("demo", death("pi-1"), int(time.time() * 1000))
    r = await client.get("/devices", headers={"X-Fragment": "1"})
    assert 'data-device="pi-1"' in r.text and re.search(r'data-device="pi-1">.*?data-state="offline"', r.text)


@BOTH
async def test_device_page_has_svg_charts(client: httpx.AsyncClient, token_and_hash) -> None:
    await login(client, token_and_hash[0])
    r = await client.get("/devices/pi-1", params={"window": "15m"})
    assert r.status_code == 200
    svgs = re.findall(r"<svg class=\"chart\".*?</svg>", r.text)
    assert len(svgs) == 5  # temperature, CPU, RAM, generation speed, queue depth
    assert all("<polyline" in s for s in svgs if 'aria-label="Generation speed"' not in s)  # pi-1: no tokens/s
    assert 'class="band" data-band="light"' in svgs[0]  # pi-1 ran at thermal level light: the band behind
    assert "(none published to it)" in re.search(r"<dd data-policy=\"7\">(.*?)</dd>", r.text).group(1)
    assert "CPU — last 25.0 %" in r.text and "bdSeq 1" in r.text and "State changes" in r.text
    assert (await client.get("/devices/pi-1", params={"window": "2y"})).status_code == 422
    assert "<h2>Commands</h2>" not in r.text  # no command service given: no buttons and no endpoint
    r = await client.post("/api/devices/pi-1/commands", json={"kind": "ping"}, headers=bearer(token_and_hash))
    assert r.status_code in (404, 405)
    empty = await client.get("/devices/pi-2")
    assert empty.text.count("no data in this window") == 4


async def test_device_controlled_strings_are_escaped(tmp_path: Path, token_and_hash) -> None:
    s = Store(tmp_path / "evil.db")
    try:
        now = int(time.time() * 1000)
        s.write_status("demo", birth(EVIL_ID, model=EVIL_MODEL), now)
        s.write_telemetry("demo", samples(EVIL_ID, 3, start_ms=now - 30_000), now)
        reject(s, EVIL_ID, "nanofleet/v1/demo/<x>/telemetry", "<script>alert(2)</script>")
        app = create_app(s, FLEET, operator_token_hash=token_and_hash[1])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            await login(c, token_and_hash[0])
            overview = (await c.get("/")).text
            listing = (await c.get("/devices")).text
            device = await c.get("/devices/" + quote(EVIL_ID, safe=""))
            groups = (await c.get("/groups")).text
            assert device.status_code == 200
            for html in (overview, listing, device.text, groups):
                assert EVIL_ID not in html and EVIL_MODEL not in html and "<script>alert" not in html
            for html in (overview, listing, device.text):
                assert "&lt;img src=x onerror=alert(1)&gt;" in html
            for html in (listing, device.text):  # the overview shows no model names
                assert "&lt;/script&gt;&lt;script&gt;alert(&#39;m&#39;)&lt;/script&gt;" in html
            assert 'href="/devices/%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E"' in overview  # hottest devices
            assert "&lt;script&gt;alert(2)&lt;/script&gt;" in overview
            api = (await c.get("/api/devices/" + quote(EVIL_ID, safe=""))).json()
            assert api["device_id"] == EVIL_ID and api["model_name"] == EVIL_MODEL
    finally:
        s.close()


async def test_alerts_api_and_column_flag_devices_over_each_threshold(tmp_path: Path, token_and_hash) -> None:
    s = Store(tmp_path / "alerts2.db")
    try:
        now = int(time.time() * 1000)
        s.write_status("demo", birth("hot"), now)
        s.write_telemetry("demo", [fleet_pb2.Telemetry(
            device_id="hot", bd_seq=1, seq=0, ts_ms=now, cpu_percent=99, ram_total_mb=4096, ram_available_mb=100,
            temp_max_c=91.5, thermal_level=fleet_pb2.THERMAL_LEVEL_CRITICAL, queue_depth=500, slots_waiting=9000)],
            now)
        s.write_status("demo", birth("calm"), now)  # waiting for a slot is not the offline queue: no queue alert
        s.write_telemetry("demo", [fleet_pb2.Telemetry(
            device_id="calm", bd_seq=1, seq=0, ts_ms=now, ram_total_mb=4096, ram_available_mb=3000,
            queue_depth=499, slots_waiting=9000)], now)
        s.write_status("demo", birth("quiet"), now - 600_000)
        s.sweep_stale(now)  # quiet: 10 s interval, silent for 10 min: stale, and past offline_after_s (60 s)
        s.write_status("demo", birth("gone"), now - 5_000)
        s.write_status("demo", death("gone"), now - 5_000)  # offline 5 s ago: under offline_after_s
        app = create_app(s, FLEET, operator_token_hash=token_and_hash[1])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            assert (await c.get("/api/alerts")).status_code == 401
            AlertEngine(app.state.web.alerts, FLEET).evaluate()  # stored by the engine, not computed on read
            got = (await c.get("/api/alerts", headers=bearer(token_and_hash))).json()["alerts"]
            assert sorted((a["device_id"], a["kind"]) for a in got) == [
                ("hot", "low_ram"), ("hot", "queue_depth"), ("hot", "thermal"), ("quiet", "offline")]
            queue = next(a for a in got if a["kind"] == "queue_depth")
            offline = next(a for a in got if a["kind"] == "offline")
            assert queue["value"] == 500 and queue["threshold"] == 500 and "offline queue" in queue["detail"]
            assert offline["threshold"] == 60 and offline["value"] >= 600
            await login(c, token_and_hash[0])
            html = (await c.get("/devices")).text
            rows = dict(re.findall(r'<tr class="row-\w+" data-device="([^"]+)">(.*?)</tr>', html))
            alerts_of = {d: re.findall(r'data-alert="(\w+)"', row) for d, row in rows.items()}
            assert alerts_of == {"hot": ["thermal", "low_ram", "queue_depth"], "calm": [], "quiet": ["offline"],
                                 "gone": []}
            assert "<th>Alerts</th>" in html
    finally:
        s.close()


async def test_queue_depth_oldest_age_and_slots_waiting_are_shown_apart(tmp_path: Path, token_and_hash) -> None:
    s = Store(tmp_path / "queue.db")
    try:
        now = int(time.time() * 1000)
        s.write_status("demo", birth("q1"), now)
        s.write_telemetry("demo", [fleet_pb2.Telemetry(
            device_id="q1", bd_seq=1, seq=0, ts_ms=now, ram_total_mb=4096, ram_available_mb=3000, queue_depth=17,
            slots_waiting=4, queue_oldest_age_s=125.0, queue_counters={"enqueued": 30, "drained_cloud": 13})], now)
        app = create_app(s, FLEET, operator_token_hash=token_and_hash[1])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            d = (await c.get("/api/devices/q1", headers=bearer(token_and_hash))).json()
            assert (d["queue_depth"], d["slots_waiting"], d["queue_oldest_age_s"]) == (17, 4, 125.0)
            assert d["queue_counters"] == {"enqueued": 30, "drained_cloud": 13}
            points = (await c.get("/api/devices/q1/telemetry", headers=bearer(token_and_hash))).json()["points"]
            assert [(p["queue_depth"], p["slots_waiting"], p["queue_oldest_age_s"]) for p in points] == [(17, 4, 125)]
            await login(c, token_and_hash[0])
            html = (await c.get("/devices")).text
            assert re.search(r'<th class="num"><a href="[^"]+" data-sort="queue">Queue</a></th><th class="num">Oldest'
                             r'</th><th class="num"><a href="[^"]+" data-sort="slots_waiting">Slots waiting</a></th>',
                             html)
            row = re.search(r'<tr class="row-\w+" data-device="q1">(.*?)</tr>', html)
            assert row and re.search(r'<td class="num" data-col="queue">17</td><td class="num" data-col="oldest">'
                                     r'2m 5s</td><td class="num" data-col="slots_waiting">4</td>', row.group(1))
            page = (await c.get("/devices/q1")).text
            assert "<dt>Offline queue</dt><dd>17 <span class=\"muted\">oldest 2m 5s</span></dd>" in page
            assert "<dt>Waiting for a model slot</dt><dd>4</dd>" in page
            assert "<dt>Queue counters</dt><dd>drained_cloud: 13, enqueued: 30</dd>" in page
    finally:
        s.close()


@BOTH
async def test_device_page_shows_policy_recent_commands_and_thermal_bands(client: httpx.AsyncClient, store: Store,
                                                                         token_and_hash) -> None:
    from nanofleet.controller.store import Batch
    from nanofleet.controller.views import PublishedPolicy

    now = int(time.time() * 1000)
    store.record_policies([PublishedPolicy("pi-1", 9, "h", "{}", now)])
    store.apply(Batch("demo", now, command_results=[
        fleet_pb2.CommandResult(id="c-1", device_id="pi-1", status="ok", message="<pong>", data={"rtt": "3"},
                                ts_ms=now - 1000),
        fleet_pb2.CommandResult(id="c-2", device_id="pi-2", status="error", message="elsewhere", ts_ms=now)]))
    await login(client, token_and_hash[0])
    html = (await client.get("/devices/pi-1")).text
    assert re.search(r'<dd data-policy="7">applied v7 <span class="warn">published v9: not yet applied</span>', html)
    row = re.search(r'<tr data-command="c-1">(.*?)</tr>', html)
    assert row and "&lt;pong&gt;" in row.group(1) and "rtt=3" in row.group(1) and ">ok<" in row.group(1)
    assert 'data-command="c-2"' not in html  # another device's result
    assert 'href="/devices?group=kiosks"' in html


@BOTH
async def test_groups_page_shows_each_group_its_policy_and_the_last_apply(tmp_path: Path, store: Store,
                                                                          token_and_hash) -> None:
    from nanofleet.controller.views import PublishedPolicy

    cfg = parse_fleet("fleet: demo\ngroups:\n  kiosks: {match: ['pi-2'], routing: {prefer: cloud}}\n"
                      "devices: {pi-1: {group: kiosks}}\n")
    now = int(time.time() * 1000)
    store.record_policies([PublishedPolicy(d, 7, "h", "{}", now) for d in ("pi-1", "pi-2", "pi-3")],
                          {"pi-1": ["(new)"], "pi-2": ["(new)"], "pi-3": ["prefer: 'local' -> 'cloud'"]})
    app = create_app(store, cfg, operator_token_hash=token_and_hash[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        await login(c, token_and_hash[0])
        html = (await c.get("/groups")).text
    kiosks = re.search(r'<section class="group" data-group="kiosks">(.*?)</section>', html, re.S)
    default = re.search(r'<section class="group" data-group="default">(.*?)</section>', html, re.S)
    assert kiosks and default
    assert "2 devices" in kiosks.group(1) and "Matches <code>pi-2</code>" in kiosks.group(1)  # listed + glob
    assert "Newest policy published to it: v7." in kiosks.group(1)
    assert "<dt>prefer</dt><dd><code>cloud</code></dd>" in kiosks.group(1)
    assert "<dt>prefer</dt><dd><code>local</code></dd>" in default.group(1)
    assert re.search(r'1 behind:</span> <a href="/devices/pi-3">pi-3</a> \(runs v6, published v7\)', default.group(1))
    assert 'data-round="7"' in html and "to 3 devices" in html
    assert "<code>prefer: &#39;local&#39; -&gt; &#39;cloud&#39;</code>" in html


async def test_a_stale_device_row_renders_without_a_stale_flag(tmp_path: Path, token_and_hash) -> None:
    s = Store(tmp_path / "stale.db")
    try:
        now = int(time.time() * 1000)
        s.write_status("demo", birth("slow"), now - 30_000)
        s.sweep_stale(now)  # silent 30 s (> 2.5 x 10 s): stale, but under offline_after_s
        app = create_app(s, FLEET, operator_token_hash=token_and_hash[1])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            await login(c, token_and_hash[0])
            r = await c.get("/devices")
            assert r.status_code == 200
            row = re.search(r'<tr class="row-\w+" data-device="slow">(.*?)</tr>', r.text)
            assert row and "stale" in row.group(1) and "data-alert" not in row.group(1)
    finally:
        s.close()
