"""Commands from the dashboard and the REST API, through the real CommandService and a real mosquitto to a device
that answers on its cmd topic (pi-1), and one that never answers (pi-2)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format

from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.commands import CommandService
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.mqtt import MqttClient
from nanofleet.protos import fleet_pb2, topics


async def _answering_device(client: MqttClient, fleet: str, device: str) -> None:
    """What an agent does with a command: ack at once, then the result."""
    async for msg in client.messages():
        cmd = json_format.Parse(msg.payload, fleet_pb2.Command())
        for status, message in (("ack", ""), ("ok", f"pong to {cmd.kind}")):
            result = fleet_pb2.CommandResult(id=cmd.id, device_id=device, status=status, message=message,
                                             data={"kind": cmd.kind}, ts_ms=int(time.time() * 1000))
            await client.publish(topics.cmd_result(fleet, device), json_format.MessageToJson(result), 1)


@pytest.fixture
async def setup(tmp_path: Path, broker) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    fleet = f"web-{uuid.uuid4().hex[:8]}"
    store = Store(tmp_path / "store.db")
    now = int(time.time() * 1000)
    for device in ("pi-1", "pi-2"):
        store.write_status(fleet, fleet_pb2.DeviceStatus(fleet=fleet, device_id=device, online=True, bd_seq=1,
                                                         ts_ms=now, telemetry_interval_s=10), now)
    token, token_hash = ensure_operator_token(tmp_path / "data")
    controller = await MqttClient(broker.url, client_id=f"{fleet}-controller").start()
    device = await MqttClient(broker.url, client_id=f"{fleet}-pi-1").start()
    await controller.wait_connected(5)
    await device.wait_connected(5)
    device.subscribe([(topics.cmd(fleet, "pi-1"), 1)])
    service = CommandService(controller, fleet, default_timeout_s=1.0)
    tasks = [asyncio.create_task(service.listen()), asyncio.create_task(_answering_device(device, fleet, "pi-1"))]
    await asyncio.sleep(0)  # let listen() register its subscription before the first command
    app = create_app(store, parse_fleet(f"fleet: {fleet}\n"), operator_token_hash=token_hash, commands=service)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            yield c, token or ""
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await device.stop()
        await controller.stop()
        store.close()


async def _until_ok(c: httpx.AsyncClient, token: str) -> httpx.Response:
    """The first command may race the subscriptions being set up; retry on timeout within a deadline."""
    deadline = time.monotonic() + 10
    while True:
        r = await c.post("/api/devices/pi-1/commands", json={"kind": "ping"},
                         headers={"Authorization": f"Bearer {token}"})
        if r.status_code != 504 or time.monotonic() > deadline:
            return r


async def test_api_command_round_trip(setup) -> None:
    c, token = setup
    r = await _until_ok(c, token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and body["message"] == "pong to ping" and body["data"] == {"kind": "ping"}
    assert body["device_id"] == "pi-1" and len(body["id"]) == 32 and body["elapsed_ms"] >= 0


async def test_api_command_errors(setup) -> None:
    c, token = setup
    auth = {"Authorization": f"Bearer {token}"}
    r = await c.post("/api/devices/pi-2/commands", json={"kind": "ping"}, headers=auth)
    assert r.status_code == 504 and r.json() == {"error": "command_timeout",
                                                 "detail": "ping to pi-2: no acknowledgement within 1s"}
    r = await c.post("/api/devices/ghost/commands", json={"kind": "ping"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"] == "device_not_found"
    r = await c.post("/api/devices/pi-1/commands", json={"kind": "format-disk"}, headers=auth)
    assert r.status_code == 422 and "body.kind" in r.json()["detail"]
    assert (await c.post("/api/devices/pi-1/commands", json={"kind": "ping"})).status_code == 401


async def test_dashboard_command_button_needs_csrf(setup) -> None:
    c, token = setup
    await _until_ok(c, token)  # subscriptions are up
    await c.post("/login", data={"token": token})
    page = (await c.get("/devices/pi-1")).text
    assert 'action="/devices/pi-1/commands"' in page and ">ping</button>" in page and ">rebirth</button>" in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = await c.post("/devices/pi-1/commands", data={"kind": "ping", "csrf": "forged"})
    assert r.status_code == 403
    r = await c.post("/api/devices/pi-1/commands", json={"kind": "ping"})  # cookie + JSON without the header
    assert r.status_code == 403 and r.json()["error"] == "csrf_failed"
    r = await c.post("/api/devices/pi-1/commands", json={"kind": "ping"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = await c.post("/devices/pi-1/commands", data={"kind": "ping", "csrf": csrf})
    assert r.status_code == 200
    assert re.search(r'class="flash ok" role="status">ping: ok in \d+ ms pong to ping<', r.text)
    r = await c.post("/devices/pi-2/commands", data={"kind": "ping", "csrf": csrf})
    assert 'class="flash error"' in r.text and "no acknowledgement within 1s" in r.text


async def test_commands_are_audited_with_their_result(setup) -> None:
    c, token = setup
    assert (await _until_ok(c, token)).status_code == 200
    auth = {"Authorization": f"Bearer {token}"}
    assert (await c.post("/api/devices/pi-2/commands", json={"kind": "ping"}, headers=auth)).status_code == 504
    deadline = time.monotonic() + 10
    while True:  # the entries are written without holding the answer: wait for them with a deadline
        entries = (await c.get("/api/audit?action=command", headers=auth)).json()["entries"]
        if any(e["target"] == "pi-2" for e in entries) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    ok = next(e for e in entries if e["target"] == "pi-1" and e["detail"]["result"] == "ok")
    assert ok["actor"] == "operator" and ok["detail"]["kind"] == "ping" and ok["source"] == "127.0.0.1"
    assert ok["detail"]["via"] == "token" and len(ok["detail"]["id"]) == 32
    timeout = next(e for e in entries if e["target"] == "pi-2")
    assert timeout["detail"]["result"] == "command_timeout" and "no acknowledgement" in timeout["detail"]["message"]
