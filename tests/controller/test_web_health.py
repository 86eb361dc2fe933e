"""The controller's own health over real HTTP (uvicorn on loopback, real mosquitto, real SQLite): /healthz turns
503 once a part the controller needs died, /metrics serves the Prometheus text behind the operator token (with the
web layer's counted 500s), and the dashboard's "Controller" panel shows the broker, ingest counters and task deaths."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
from ctl_helpers import start_service, until

from nanofleet.controller import metrics
from nanofleet.mqtt import MqttClient
from nanofleet.protos import topics


def _sample(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


async def test_metrics_need_the_operator_and_show_the_controller_and_its_500s(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("hm1", broker.url, tmp_path)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        await svc.ingest.wait_subscribed(5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            r = await c.get("/metrics")
            assert r.status_code == 401 and r.json()["error"] == "missing_token"
            r = await c.get("/metrics", headers=auth)
            assert r.status_code == 200 and r.headers["content-type"] == metrics.CONTENT_TYPE
            assert _sample(r.text, "nanofleet_controller_up") == 1
            assert _sample(r.text, "nanofleet_controller_broker_connected") == 1
            assert _sample(r.text, "nanofleet_controller_web_errors_total", '{code="internal_error"}') == 0
            assert _sample(r.text, "nanofleet_controller_policy_failures_total") == 0
            assert _sample(r.text, "nanofleet_controller_command_issues_total", '{reason="fire_not_sent"}') == 0

            def broken(fn: object) -> list:  # type: ignore[type-arg]
                raise RuntimeError("store read bug")

            svc.store.read = broken  # type: ignore[method-assign]  # every read of the web app goes through it
            r = await c.get("/api/devices", headers=auth)
            assert r.status_code == 500 and r.json()["error"] == "internal_error"
            r = await c.get("/metrics", headers=auth)
            assert _sample(r.text, "nanofleet_controller_web_errors_total", '{code="internal_error"}') == 1
            assert (await c.get("/healthz")).json() == {"ok": True, "broker_connected": True, "leader": True,
                                                         "failed": None}
    finally:
        await svc.stop()


async def test_healthz_is_503_and_the_panel_shows_the_death_once_ingest_died(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("hm2", broker.url, tmp_path)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        await svc.ingest.wait_subscribed(5)
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            page = (await c.get("/", headers=auth)).text
            assert "<h2>Controller</h2>" in page and 'data-health="ok">Controller running.' in page
            assert re.search(r'data-health="broker">connected <span class="muted">\w+ reader', page)
            assert "No task has died." in page

            def broken(items: list) -> None:  # type: ignore[type-arg]
                raise TypeError("decode bug")

            svc.ingest.decode = broken  # type: ignore[method-assign]
            async with MqttClient(broker.url) as pub:
                await pub.wait_connected(5)
                await pub.publish(topics.telemetry("hm2", "d1"), b'{"tsMs": "1"}', qos=1)
            await asyncio.wait_for(svc.wait_failed(), 10)
            r = await c.get("/healthz")
            assert r.status_code == 503 and r.json()["ok"] is False and r.json()["failed"] == "ingest"
            assert "decode bug" not in r.text  # the error is for the operator, not for an open endpoint
            r = await c.get("/metrics", headers=auth)
            assert _sample(r.text, "nanofleet_controller_up") == 0
            page = (await c.get("/", headers=auth)).text
            assert "Controller failed: ingest died (TypeError: decode bug)" in page
    finally:
        await svc.stop()


async def test_the_panel_counts_rejections_and_a_restarted_tasks_death(broker, tmp_path: Path) -> None:
    svc, url, token = await start_service("hm3", broker.url, tmp_path, sweep_every_s=0.05)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        await svc.ingest.wait_subscribed(5)
        store, calls = svc.store, []
        real = store.sweep_stale

        def flaky(at_ms: int | None = None) -> list:  # type: ignore[type-arg]
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("sweep <bug>")
            return real(at_ms)

        store.sweep_stale = flaky  # type: ignore[method-assign]
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            await pub.publish(topics.telemetry("hm3", "d1"), b"not json", qos=1)
        await until(lambda: len(calls) >= 3 and (svc.status()["ingest"] or {}).get("rejected"), 10,
                    "a sweep death and a rejection")
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            page = (await c.get("/", headers=auth)).text
            assert (await c.get("/healthz")).status_code == 200  # a restarted task does not fail the controller
        assert re.search(r'data-health="rejected" class="warn">1 ⚠', page)
        death = re.search(r'<tr data-task="sweep">(.*?)</tr>', page)
        assert death and '<td class="num">1</td>' in death.group(1)
        assert "RuntimeError: sweep &lt;bug&gt;" in death.group(1)  # escaped
    finally:
        await svc.stop()
