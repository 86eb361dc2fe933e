"""The controller's /metrics over real HTTP (real mosquitto, the real ingest path, real SQLite), parsed with
prometheus_client's own parser: devices by state and thermal level read from the store at scrape time, the ingest
lag, the live-events counters, and open alerts by kind once the alerts table exists."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from ctl_helpers import until
from prometheus_client.parser import text_string_to_metric_families

from bench.bench_live import start_controller, telemetry
from nanofleet.controller.metrics import FleetCounts, fleet_counts
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_fleet_gauges_lag_and_events_in_the_exposition(broker, tmp_path: Path) -> None:
    svc, url, token = await start_controller(broker.url, tmp_path)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        async with MqttClient(broker.url) as pub, httpx.AsyncClient(base_url=url, timeout=10) as c:
            await pub.wait_connected(5)
            for device, level in (("a", 0), ("b", 3), ("c", 3)):
                await pub.publish(topics.telemetry("live", device), telemetry(device, 0, level), qos=1)
            await pub.publish(topics.status("live", "c"), json.dumps(
                {"fleet": "live", "deviceId": "c", "online": False, "bdSeq": "0", "reason": "last_will"}).encode(),
                qos=1)
            await until(lambda: (d := svc.store.get_device("c")) is not None and d.state == "offline", 10,
                        "three devices, one of them offline")
            assert (await c.get("/metrics")).status_code == 401
            m = samples((await c.get("/metrics", headers=auth)).text)
            assert m[("nanofleet_controller_devices", (("state", "online"),))] == 2
            assert m[("nanofleet_controller_devices", (("state", "offline"),))] == 1
            assert m[("nanofleet_controller_devices", (("state", "stale"),))] == 0
            # the offline device's last level is not counted: 1 none + 1 severe
            assert m[("nanofleet_controller_devices_thermal", (("level", "severe"),))] == 1
            assert m[("nanofleet_controller_devices_thermal", (("level", "none"),))] == 1
            assert m[("nanofleet_controller_devices_thermal", (("level", "critical"),))] == 0
            lag = m[("nanofleet_controller_ingest_lag_seconds", (("stat", "max"),))]
            assert 0 <= lag < 10
            assert m[("nanofleet_controller_ingest_received_total", ())] >= 4
            assert m[("nanofleet_controller_ingest_hook_errors_total", ())] == 0
            assert m[("nanofleet_controller_events_subscribers", ())] == 0

            def stored_open() -> dict[tuple[str, str], int]:
                rows = svc.store.read(lambda conn: conn.execute(
                    "SELECT kind, state, count(*) FROM alerts WHERE state != 'cleared' GROUP BY kind, state"
                ).fetchall())
                return {(k, st): n for k, st, n in rows}

            async def exposed_open() -> dict[tuple[str, str], int]:
                text = (await c.get("/metrics", headers=auth)).text
                return {(dict(lab)["kind"], dict(lab)["state"]): int(v) for (name, lab), v in samples(text).items()
                        if name == "nanofleet_controller_alerts_open" and v}

            # the engine raises b's severe level (the thresholds' thermal_at): the gauge shows the stored alerts
            await until(lambda: stored_open().get(("thermal", "raised"), 0) >= 1, 10, "b's thermal alert")
            assert await exposed_open() == stored_open()
    finally:
        await svc.stop()


def test_open_alerts_by_kind_and_a_store_without_the_alerts_table(tmp_path: Path, store_url: str) -> None:
    import sqlite3

    from nanofleet.controller.store import Store

    bare = sqlite3.connect(tmp_path / "bare.db")  # a store older than migration 004_alerts: no alerts table
    bare.execute("CREATE TABLE devices (state TEXT, thermal_level INTEGER)")
    bare.execute("INSERT INTO devices VALUES ('online', 3)")
    assert fleet_counts(bare) == FleetCounts({"online": 1}, {"severe": 1}, None)
    bare.close()
    with Store(store_url) as store:
        assert store.read(fleet_counts) == FleetCounts(alerts={})
        now = int(time.time() * 1000)

        def seed(conn) -> None:  # type: ignore[no-untyped-def]  # the table as migration 004_alerts makes it
            conn.execute("CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, device_id TEXT, kind TEXT, "
                         "state TEXT, detail TEXT, value REAL, threshold REAL, raised_ms INTEGER)")
            conn.executemany("INSERT INTO alerts (device_id, kind, state, detail, value, threshold, raised_ms) "
                             "VALUES (?, ?, ?, '', 0, 0, ?)",
                             [("a", "thermal", "raised", now), ("b", "thermal", "raised", now),
                              ("a", "offline", "acknowledged", now), ("c", "thermal", "cleared", now)])

        store.submit(seed).result()
        assert store.read(fleet_counts).alerts == {("thermal", "raised"): 2, ("offline", "acknowledged"): 1}
