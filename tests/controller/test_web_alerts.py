"""Stored alerts and the audit log through the REST API, in-process over a real store on each backend (SQLite,
PostgreSQL): the engine raises,
the API lists and pages them, an operator acknowledges (audited), the engine clears; logins, failed logins and
logouts are audited with the client's address; the audit table refuses changes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ctl_helpers import reject, until
from test_web import FLEET, bearer, birth, csrf_of, death, login

from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.alerts_engine import AlertEngine
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.pg_db import DB_ERRORS
from nanofleet.protos import fleet_pb2


def hot(device: str, now: int, *, level: int = fleet_pb2.THERMAL_LEVEL_CRITICAL, ram: int = 100,
        queue: int = 500, seq: int = 0) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(device_id=device, bd_seq=1, seq=seq, ts_ms=now, cpu_percent=99, ram_total_mb=4096,
                               ram_available_mb=ram, temp_max_c=91.5, thermal_level=level, queue_depth=queue,
                               slots_waiting=9000)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    now = int(time.time() * 1000)
    s.write_status("demo", birth("hot"), now)
    s.write_telemetry("demo", [hot("hot", now)], now)
    s.write_status("demo", birth("calm"), now)  # slot waiters are not the offline queue: no queue alert
    s.write_telemetry("demo", [hot("calm", now, level=1, ram=3000, queue=499)], now)
    s.write_status("demo", birth("quiet"), now - 600_000)
    s.sweep_stale(now)  # silent for 10 min: stale, and past offline_after_s (60 s)
    s.write_status("demo", birth("gone"), now - 5_000)
    s.write_status("demo", death("gone"), now - 5_000)  # offline 5 s ago: under offline_after_s
    yield s
    s.close()


@pytest.fixture
def engine(store: Store) -> AlertEngine:
    return AlertEngine(AlertStore(store), FLEET)


@pytest.fixture
async def client(store: Store, engine: AlertEngine,
                 token_and_hash: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], alerts=engine.alerts,
                     audit=AuditLog(store))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        yield c


async def test_engine_raises_api_lists_pages_and_filters(client: httpx.AsyncClient, engine: AlertEngine,
                                                         token_and_hash: tuple[str, str]) -> None:
    assert (await client.get("/api/alerts")).status_code == 401
    auth = bearer(token_and_hash)
    assert (await client.get("/api/alerts", headers=auth)).json() == {"alerts": [], "next_cursor": None}  # not
    # computed when read: nothing until the engine ran
    changed = engine.evaluate()
    assert {(a.device_id, a.kind) for a in changed} == {("hot", "thermal"), ("hot", "low_ram"),
                                                        ("hot", "queue_depth"), ("quiet", "offline")}
    assert engine.evaluate() == []  # the same conditions: no duplicate alert
    got = (await client.get("/api/alerts", headers=auth)).json()
    assert [a["id"] for a in got["alerts"]] == sorted((a["id"] for a in got["alerts"]), reverse=True)
    queue = next(a for a in got["alerts"] if a["kind"] == "queue_depth")
    assert (queue["value"], queue["threshold"], queue["state"]) == (500, 500, "raised")
    assert "offline queue" in queue["detail"]
    page1 = (await client.get("/api/alerts?limit=3", headers=auth)).json()
    page2 = (await client.get(f"/api/alerts?limit=3&cursor={page1['next_cursor']}", headers=auth)).json()
    assert len(page1["alerts"]) == 3 and page2["next_cursor"] is None
    assert [a["id"] for a in page1["alerts"] + page2["alerts"]] == [a["id"] for a in got["alerts"]]
    only = (await client.get("/api/alerts?device_id=quiet", headers=auth)).json()["alerts"]
    assert [(a["device_id"], a["kind"]) for a in only] == [("quiet", "offline")]
    thermal = (await client.get("/api/alerts?kind=thermal", headers=auth)).json()["alerts"]
    assert [a["device_id"] for a in thermal] == ["hot"]
    for bad in ("state=closed", "limit=0", "limit=1001", "cursor=-1", "kind=fire"):
        r = await client.get(f"/api/alerts?{bad}", headers=auth)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", bad
    one = (await client.get(f"/api/alerts/{queue['id']}", headers=auth)).json()
    assert one == queue
    r = await client.get("/api/alerts/999999", headers=auth)
    assert r.status_code == 404 and r.json()["error"] == "alert_not_found"
    assert (await client.get("/api/alerts/99999999999999999999", headers=auth)).status_code == 422


async def test_acknowledge_audited_then_cleared_when_it_cools(client: httpx.AsyncClient, store: Store,
                                                              engine: AlertEngine,
                                                              token_and_hash: tuple[str, str]) -> None:
    auth = bearer(token_and_hash)
    engine.evaluate()
    [thermal] = (await client.get("/api/alerts?kind=thermal", headers=auth)).json()["alerts"]
    assert (await client.post(f"/api/alerts/{thermal['id']}/ack", json={"note": "x"})).status_code == 401
    r = await client.post(f"/api/alerts/{thermal['id']}/ack", json={"note": 5}, headers=auth)
    assert r.status_code == 422 and "note" in r.json()["detail"]
    r = await client.post(f"/api/alerts/{thermal['id']}/ack", json={"note": "fan replaced <b>"}, headers=auth)
    acked = r.json()
    assert r.status_code == 200 and acked["state"] == "acknowledged" and acked["acked_by"] == "operator"
    assert acked["ack_note"] == "fan replaced <b>" and acked["acked_ms"] >= thermal["raised_ms"]
    again = (await client.post(f"/api/alerts/{thermal['id']}/ack", json={"note": "again"}, headers=auth)).json()
    assert again == acked  # acknowledging twice changes nothing
    entries = await until(lambda: AuditLog(store).page(action="alert_ack")[0], what="the ack audited")
    assert len(entries) == 1 and entries[0].target == str(thermal["id"])  # type: ignore[index]
    assert entries[0].detail["note"] == "fan replaced <b>" and entries[0].source == "127.0.0.1"  # type: ignore[index]
    engine.evaluate()  # still hot: the acknowledged alert stays acknowledged, no new one
    assert (await client.get(f"/api/alerts/{thermal['id']}", headers=auth)).json()["state"] == "acknowledged"
    now = int(time.time() * 1000)
    store.write_telemetry("demo", [hot("hot", now + 1, level=1, ram=3000, queue=0, seq=1)], now + 1)
    cleared = {(a.device_id, a.kind) for a in engine.evaluate() if a.state == "cleared"}
    assert cleared == {("hot", "thermal"), ("hot", "low_ram"), ("hot", "queue_depth")}
    history = (await client.get(f"/api/alerts/{thermal['id']}", headers=auth)).json()
    assert history["state"] == "cleared" and history["acked_by"] == "operator"
    assert history["raised_ms"] <= history["acked_ms"] <= history["cleared_ms"]
    r = await client.post(f"/api/alerts/{thermal['id']}/ack", json={}, headers=auth)
    assert r.status_code == 409 and r.json()["error"] == "alert_cleared"
    assert (await client.post("/api/alerts/424242/ack", json={}, headers=auth)).status_code == 404
    store.write_telemetry("demo", [hot("hot", now + 2, seq=2)], now + 2)  # hot again: a new alert, not the old one
    engine.evaluate()
    [new] = (await client.get("/api/alerts?kind=thermal", headers=auth)).json()["alerts"]
    assert new["id"] != thermal["id"] and new["state"] == "raised"
    states = [a["state"] for a in (await client.get("/api/alerts?kind=thermal&state=all", headers=auth)).json()[
        "alerts"]]
    assert states == ["raised", "cleared"]


async def test_ack_from_a_browser_session_needs_csrf(client: httpx.AsyncClient, engine: AlertEngine,
                                                     token_and_hash: tuple[str, str]) -> None:
    engine.evaluate()
    await login(client, token_and_hash[0])
    alert_id = (await client.get("/api/alerts")).json()["alerts"][0]["id"]
    r = await client.post(f"/api/alerts/{alert_id}/ack", json={"note": "n"})
    assert r.status_code == 403 and r.json()["error"] == "csrf_failed"
    csrf = csrf_of((await client.get("/")).text)
    r = await client.post(f"/api/alerts/{alert_id}/ack", json={"note": "n"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["acked_by"] == "operator"


async def test_rejections_and_policy_lag_raise_and_clear(store: Store, engine: AlertEngine) -> None:
    now = int(time.time() * 1000)
    reject(store, "calm", "nanofleet/v1/demo/calm/telemetry", "bad json", now)
    reject(store, None, "nanofleet/v1/demo", "no device", now)
    raised = {(a.device_id, a.kind): a for a in engine.evaluate(now)}
    assert {("calm", "rejections"), ("", "rejections")} <= set(raised)
    assert raised["calm", "rejections"].detail.startswith("1 payload(s) rejected in the last 300 s (1 reason(s);")
    assert engine.evaluate(now + 301_000) and not engine.alerts.page(kind="rejections")[0]  # the window passed
    from nanofleet.controller.views import PublishedPolicy

    store.record_policies([PublishedPolicy("calm", 8, "h", "{}", now - 301_000)])  # calm applies v7
    assert [(a.device_id, a.kind) for a in engine.evaluate(now) if a.kind == "policy_behind"] == [
        ("calm", "policy_behind")]
    store.record_policies([PublishedPolicy("calm", 7, "h", "{}", now - 301_000)])
    assert [a.state for a in engine.evaluate(now) if a.kind == "policy_behind"] == ["cleared"]
    assert engine.status()["rounds"] == 4 and engine.status()["failures"] == 0
    assert engine.status()["open"] == len(engine.alerts.page()[0]) > 0


async def test_logins_failures_and_logouts_are_audited(client: httpx.AsyncClient, store: Store,
                                                       token_and_hash: tuple[str, str]) -> None:
    r = await client.post("/login", data={"token": "nft_wrong-token-value", "next": "/"})
    assert r.status_code == 401
    await login(client, token_and_hash[0])
    csrf = csrf_of((await client.get("/")).text)
    await client.post("/logout", data={"csrf": csrf})
    audit = AuditLog(store)
    entries = await until(lambda: (e := audit.page()[0]) and len(e) == 3 and e, what="three audit entries")
    assert [e.action for e in reversed(entries)] == ["login_failed", "login", "logout"]  # type: ignore[union-attr]
    assert all(e.source == "127.0.0.1" for e in entries)  # type: ignore[union-attr]
    raw = " ".join(d for (d,) in store.read(lambda c: c.execute("SELECT detail FROM audit").fetchall()))
    assert "nft_wrong" not in raw and token_and_hash[0] not in raw  # never the token
    assert client._transport.app.state.web.logins_failed == 1  # type: ignore[attr-defined]
    auth = bearer(token_and_hash)
    got = (await client.get("/api/audit?action=login", headers=auth)).json()
    assert [e["action"] for e in got["entries"]] == ["login"] and got["entries"][0]["actor"] == "operator"
    page1 = (await client.get("/api/audit?limit=2", headers=auth)).json()
    page2 = (await client.get(f"/api/audit?limit=2&cursor={page1['next_cursor']}", headers=auth)).json()
    assert [e["action"] for e in page1["entries"] + page2["entries"]] == ["logout", "login", "login_failed"]
    later = entries[0].ts_ms + 1  # type: ignore[index]
    assert (await client.get(f"/api/audit?since_ms={later}", headers=auth)).json()["entries"] == []
    assert (await client.get("/api/audit?actor=nobody", headers=auth)).json()["entries"] == []
    r = await client.get("/api/audit?action=drop_table", headers=auth)
    assert r.status_code == 422 and "action" in r.json()["detail"]
    assert (await client.get("/api/audit")).status_code == 401


def test_audit_log_refuses_update_and_delete(store: Store) -> None:
    entry = AuditLog(store).record("ops", "token_rotate", "operator_token", {"k": 1}, "cli")
    refused = (sqlite3.IntegrityError, *DB_ERRORS)  # SQLite's trigger aborts; PostgreSQL's raises
    truncate = ["TRUNCATE audit"] if store.target.kind == "postgresql" else []  # SQLite has no TRUNCATE
    for sql in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit", *truncate):
        with pytest.raises(refused, match="append-only"):
            store.submit(lambda c, sql=sql: c.execute(sql)).result()
    assert AuditLog(store).page()[0] == [entry]
    with pytest.raises(ValueError, match="audit action 'nuke'"):
        AuditLog(store).record("ops", "nuke")


async def test_budget_alerts_from_the_gateways_usage_per_device_and_fleet(tmp_path: Path, store: Store) -> None:
    """Real gateway usage db (its own writer and ledger); budgets from fleet.yaml: per device and fleet-wide."""
    from nanofleet.config import parse_fleet
    from nanofleet.controller.gateway.db import Database
    from nanofleet.controller.gateway.usage import UsageLedger
    from nanofleet.controller.web.context import UsageReader

    cfg = parse_fleet("fleet: demo\ngateway: {budgets: {fleet_tokens_per_day: 10000}}\n"
                      "defaults: {routing: {cloud_budget: {tokens_per_day: 1000}}}\n"
                      "groups: {big: {routing: {cloud_budget: {tokens_per_day: 100000}}}}\n"
                      "devices: {calm: {group: big}}\n")
    db = Database(tmp_path / "gateway.db")
    ledger = UsageLedger(db, cfg.gateway.prices_per_million)
    reader = UsageReader(tmp_path / "gateway.db")
    clock = [time.time()]
    engine = AlertEngine(AlertStore(store), cfg, usage=reader.rows, budget_every_s=10, clock=lambda: clock[0])
    try:
        await ledger.record("hot", "app", "gemini-2.5-flash", 500, 299, clock[0])  # 799 of 1000: under 80 %
        await ledger.record("calm", "app", "gemini-2.5-flash", 7000, 0, clock[0])  # 7 % of its group's budget
        assert [a for a in engine.evaluate() if a.kind == "budget"] == []
        await ledger.record("hot", "app", "gemini-2.5-flash", 1, 0, clock[0])  # 800: at 80 %
        assert [a for a in engine.evaluate() if a.kind == "budget"] == []  # budgets are read every 10 s
        clock[0] += 10
        got = [(a.device_id, a.value, a.threshold) for a in engine.evaluate() if a.kind == "budget"]
        assert got == [("hot", 800, 1000)]  # the fleet: 7,800 of 10,000, under 80 %
        await ledger.record("calm", "app", "gemini-2.5-flash", 200, 0, clock[0])
        clock[0] += 10
        got = [(a.device_id, a.value, a.threshold) for a in engine.evaluate() if a.kind == "budget"]
        assert got == [("", 8000, 10000)]  # fleet-wide: device_id ''
        [fleet_alert] = engine.alerts.page(device_id="", kind="budget")[0]
        assert "fleet" in fleet_alert.detail and "80 %" in fleet_alert.detail
        clock[0] += 86_400  # the next UTC day: nothing used yet, both clear
        assert {a.state for a in engine.evaluate() if a.kind == "budget"} == {"cleared"}
    finally:
        reader.close()
        db.close()


async def test_the_loop_evaluates_on_a_nudge_and_survives_a_failed_round(engine: AlertEngine,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    real, calls = engine.evaluate, []

    def flaky(now_ms: int | None = None) -> list[Any]:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real(now_ms)

    engine.evaluate = flaky  # type: ignore[method-assign]
    nudges = [0]
    task = asyncio.create_task(engine.run(every_s=3600, poll_s=0.01, min_gap_s=0.0, changed=lambda: nudges[0]))
    try:
        await until(lambda: engine.failures == 1, 10, "the failed first round counted")
        assert "evaluation round failed" in caplog.text
        nudges[0] += 1  # a batch committed: evaluated at once, not an hour later
        await until(lambda: engine.rounds == 1, 10, "a round after the nudge")
        assert len(engine.alerts.page()[0]) == 4
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_alerts_page_acknowledge_form_and_audit_page(client: httpx.AsyncClient, store: Store,
                                                           engine: AlertEngine,
                                                           token_and_hash: tuple[str, str]) -> None:
    evil = "<img src=x onerror=alert(1)>"
    now = int(time.time() * 1000)
    store.write_status("demo", birth(evil), now)
    store.write_telemetry("demo", [hot(evil, now)], now)
    engine.evaluate()
    for path in ("/alerts", "/audit"):
        r = await client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    await login(client, token_and_hash[0])
    page = (await client.get("/alerts")).text
    rows = re.findall(r'<tr data-alert-id="(\d+)" data-kind="(\w+)" data-state="(\w+)">', page)
    assert len(rows) == 7 and all(state == "raised" for _, _, state in rows)
    assert evil not in page and "&lt;img src=x onerror=alert(1)&gt;" in page  # autoescaped, as every device id
    assert 'data-open-alerts="7"' in page and 'data-count="alerts"' not in page  # the header's count
    assert '<div class="n">7</div><div class="l">alerts open</div>' in (await client.get("/")).text
    thermal = next(i for i, kind, _ in rows if kind == "thermal")
    form = re.search(rf'<form class="cmd ack" method="post" action="/alerts/{thermal}/ack">(.*?)</form>', page, re.S)
    assert form and 'name="note"' in form.group(1)
    csrf = csrf_of(page)
    r = await client.post(f"/alerts/{thermal}/ack", data={"note": "<b>on it</b>", "csrf": "forged"})
    assert r.status_code == 403 and "CSRF" in r.text  # a page's error: an HTML answer
    r = await client.post(f"/alerts/{thermal}/ack", data={"note": "<b>on it</b>", "csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    page = (await client.get("/alerts")).text
    assert f'<tr data-alert-id="{thermal}" data-kind="thermal" data-state="acknowledged">' in page
    assert "operator" in page and "&lt;b&gt;on it&lt;/b&gt;" in page and "<b>on it</b>" not in page
    fragment = await client.get("/alerts", headers={"X-Fragment": "1"})
    assert fragment.text.lstrip().startswith("<h1>Alerts</h1>") and "<html" not in fragment.text
    store.write_telemetry("demo", [hot(evil, now + 1, level=1, ram=3000, queue=0, seq=1)], now + 1)
    engine.evaluate()
    cleared = next(a for a in engine.alerts.page("cleared")[0])
    r = await client.post(f"/alerts/{cleared.id}/ack", data={"note": "late", "csrf": csrf})
    assert r.status_code == 409 and "nothing to acknowledge" in r.text and "<h1>Alerts</h1>" in r.text
    history = (await client.get("/alerts?state=all")).text
    assert f'data-alert-id="{cleared.id}"' in history and 'class="current">History' in history
    older = (await client.get("/alerts?state=all&limit=1")).text  # the page pages by 100: no "Older" link here
    assert "Older" not in older
    audit = await until(lambda: AuditLog(store).page(action="alert_ack")[0], 10, "the ack audited")
    assert audit[0].actor == "operator" and audit[0].detail["via"] == "session"  # type: ignore[index]
    page = (await client.get("/audit?action=alert_ack&actor=")).text
    entries = re.findall(r'<tr data-audit-id="\d+" data-action="(\w+)">', page)
    assert entries == ["alert_ack"] and "&lt;b&gt;on it&lt;/b&gt;" in page
    page = (await client.get("/audit")).text
    assert re.findall(r'data-action="(\w+)"', page) == ["alert_ack", "login"]
    r = await client.get("/audit?action=drop")
    assert r.status_code == 422


async def test_pages_of_alerts_and_audit_page_through_older_entries(client: httpx.AsyncClient, store: Store,
                                                                    token_and_hash: tuple[str, str]) -> None:
    log = AuditLog(store)
    for i in range(105):
        log.record("cli:ops", "enroll", f"dev-{i}", {}, "cli")
    await login(client, token_and_hash[0])
    page = (await client.get("/audit?action=enroll")).text
    link = re.search(r'<a href="(/audit\?[^"]+)">Older', page)
    assert link and len(re.findall(r"data-audit-id", page)) == 100
    older = (await client.get(link.group(1).replace("&amp;", "&"))).text
    assert re.findall(r"<td>(dev-\d+)</td>", older) == ["dev-4", "dev-3", "dev-2", "dev-1", "dev-0"]


async def test_a_nul_character_in_any_parameter_is_a_422_naming_it(client: httpx.AsyncClient, engine: AlertEngine,
                                                                     token_and_hash: tuple[str, str]) -> None:
    """PostgreSQL text cannot hold NUL (psycopg raises DataError: a 500 there, while SQLite stores it): refused at
    the edge on both backends, naming the parameter."""
    auth = bearer(token_and_hash)
    [alert, *_] = engine.evaluate()
    for path, field in (("/api/devices?q=a%00b", "query.q"), ("/api/devices?group=%00", "query.group"),
                        ("/api/devices/x%00y", "path.device_id"), ("/api/devices/x%00y/telemetry", "path.device_id"),
                        ("/api/alerts?device_id=%00", "query.device_id"), ("/api/audit?actor=%00", "query.actor"),
                        ("/devices?q=%00", "query.q")):
        r = await client.get(path, headers={**auth, "X-Fragment": "1"})
        assert (r.status_code, r.json()["error"]) == (422, "invalid_request"), (path, r.text)
        assert r.json()["detail"].startswith(f"{field}: ") and "NUL" in r.json()["detail"], r.text
    r = await client.post(f"/api/alerts/{alert.id}/ack", json={"note": "seen\x00"}, headers=auth)
    assert r.status_code == 422 and "body.note" in r.json()["detail"], r.text
    assert (await client.get("/api/devices?q=ok", headers=auth)).status_code == 200
    assert client._transport.app.state.errors == {}  # type: ignore[attr-defined]  # no 500 anywhere
