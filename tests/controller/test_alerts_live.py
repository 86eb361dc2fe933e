"""Alerts end to end: a device's telemetry crosses a threshold through the real ingest path (real mosquitto, the
running ControllerService) and its alert is stored within 2 s, acknowledged through the HTTP API (audited), cleared
when it cools; and a CLI process writes the audit log while the controller writes it too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from ctl_helpers import fleet, until
from google.protobuf import json_format

from nanofleet.controller.audit import record_cli
from nanofleet.controller.service import ControllerService
from nanofleet.mqtt import MqttClient
from nanofleet.protos import fleet_pb2, topics


def _telemetry(device: str, seq: int, level: int) -> bytes:
    now = int(time.time() * 1000)
    return json_format.MessageToJson(fleet_pb2.Telemetry(
        device_id=device, bd_seq=1, seq=seq, ts_ms=now, cpu_percent=50, ram_total_mb=4096, ram_available_mb=3000,
        temp_max_c=60.0 + 10 * level, thermal_level=level, throttle_ratio=1.0)).encode()


async def test_heat_raises_within_2s_ack_is_audited_cooling_clears(broker, tmp_path: Path) -> None:
    lines: list[str] = []
    events: list[tuple[str, dict[str, Any]]] = []
    svc = ControllerService(fleet("alive", broker.url), tmp_path / "ctl", listen="127.0.0.1:0", echo=lines.append,
                            on_event=lambda kind, data: events.append((kind, data)))
    await svc.start()
    try:
        assert svc.ingest is not None and svc.alerts is not None
        await svc.ingest.wait_subscribed(5)
        token = next(line.split()[2] for line in lines if line.startswith("operator token:"))
        auth = {"Authorization": f"Bearer {token}"}
        async with MqttClient(broker.url) as dev:
            await dev.wait_connected(5)
            status = fleet_pb2.DeviceStatus(fleet="alive", device_id="d1", online=True, bd_seq=1,
                                            ts_ms=int(time.time() * 1000), telemetry_interval_s=10)
            await dev.publish(topics.status("alive", "d1"), json_format.MessageToJson(status).encode(), qos=1)
            await dev.publish(topics.telemetry("alive", "d1"), _telemetry("d1", 0, fleet_pb2.THERMAL_LEVEL_LIGHT),
                              qos=1)
            await until(lambda: svc.store.get_device("d1") is not None, 10, "d1 stored")  # type: ignore[union-attr]
            assert svc.alerts.page()[0] == []
            sent = time.monotonic()
            await dev.publish(topics.telemetry("alive", "d1"),
                              _telemetry("d1", 1, fleet_pb2.THERMAL_LEVEL_CRITICAL), qos=1)
            await until(lambda: svc.alerts.page(kind="thermal")[0], 10, "the thermal alert")  # type: ignore[union-attr]
            took = time.monotonic() - sent
            assert took < 2.0, f"alert stored {took:.2f} s after the telemetry was sent"
            [alert] = svc.alerts.page(kind="thermal")[0]
            assert alert.device_id == "d1" and "critical" in alert.detail
            raised = await until(lambda: [d for k, d in events if k == "alert" and d["state"] == "raised"], 10,
                                 "the raise handed to the live-update hub (after its commit)")
            assert raised[0]["id"] == alert.id  # type: ignore[index]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.web_port}") as http:
                r = await http.post(f"/api/alerts/{alert.id}/ack", json={"note": "on it"}, headers=auth)
                assert r.status_code == 200 and r.json()["acked_by"] == "operator"
                audit = await until(lambda: svc.audit.page(action="alert_ack")[0], 10,  # type: ignore[union-attr]
                                    "the acknowledgement in the audit log")
                assert audit[0].target == str(alert.id) and audit[0].source == "127.0.0.1"  # type: ignore[index]
                assert (await http.get("/api/alerts", headers=auth)).json()["alerts"][0]["state"] == "acknowledged"
            await dev.publish(topics.telemetry("alive", "d1"), _telemetry("d1", 2, fleet_pb2.THERMAL_LEVEL_NONE),
                              qos=1)
            await until(lambda: svc.alerts.page(kind="thermal")[0] == [], 10,  # type: ignore[union-attr]
                        "the alert cleared")
        [done] = svc.alerts.page("cleared", kind="thermal")[0]
        assert done.id == alert.id and done.acked_by == "operator" and done.cleared_ms is not None
        await until(lambda: [d["state"] for k, d in events if k == "alert" and d["id"] == alert.id] == [
            "raised", "acknowledged", "cleared"], 10, "each change handed to the hub, in order")
        st = svc.status()
        assert "alerts" in st["tasks"]["running"] and st["alerts"]["rounds"] > 0 and st["alerts"]["failures"] == 0
    finally:
        await svc.stop()


async def test_cli_and_running_controller_write_the_audit_log_together(broker, tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    svc = await ControllerService(fleet("aud", broker.url), data).start()
    try:
        assert svc.audit is not None
        stop = threading.Event()
        written: list[int] = []

        def controller_side() -> None:  # the controller's writer, busy with its own entries meanwhile
            while not stop.is_set():
                written.append(svc.audit.record("controller", "policy_apply", "v1", {"n": len(written)},  # type: ignore[union-attr]
                                                "controller").id)

        thread = threading.Thread(target=controller_side)
        thread.start()
        try:
            cli = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "nanofleet", "controller",
                                                           "rotate-token", "--data-dir", str(data)],
                                          capture_output=True, text=True, timeout=120)
            in_process = [await asyncio.to_thread(record_cli, data / "controller.db", "enroll", f"dev-{i}")
                          for i in range(5)]
        finally:
            stop.set()
            thread.join()
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.startswith("operator token: ")
        rotations = svc.audit.page(action="token_rotate")[0]
        assert len(rotations) == 1 and rotations[0].actor.startswith("cli:") and rotations[0].source == "cli"
        assert cli.stdout.split()[2] not in str(rotations[0].detail)  # never the token
        assert {e.target for e in svc.audit.page(action="enroll")[0]} == {f"dev-{i}" for i in range(5)}
        assert all(e is not None for e in in_process)
        ours = svc.store.read(lambda c: c.execute(  # type: ignore[union-attr]
            "SELECT count(*) FROM audit WHERE actor = 'controller'").fetchone()[0])
        assert ours == len(written) > 0  # nothing of either writer lost
    finally:
        await svc.stop()
