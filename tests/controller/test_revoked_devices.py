"""The store's side of `nanofleet revoke`: a revoked device shows `revoked`, its later messages are rejected and
counted, a re-enrolment lifts it; `nanofleet devices remove`; fleet.yaml's devices never seen show as never_seen."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.config import parse_fleet
from nanofleet.controller import alerting
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.devstate import Batch, row_from_pb
from nanofleet.controller.revocation import mark_revoked, reinstate, revoked_status
from nanofleet.controller.store import Store
from nanofleet.controller.store_cli import target
from nanofleet.controller.web import create_app
from nanofleet.protos import fleet_pb2

FLEET = parse_fleet("fleet: demo\ngroups: {kiosks: {}}\ndevices: {pi-1: {group: kiosks}, pi-new: {group: kiosks}}\n")


def now_ms() -> int:
    return int(time.time() * 1000)


def birth(device: str, bd_seq: int) -> fleet_pb2.DeviceStatus:
    return fleet_pb2.DeviceStatus(fleet="demo", device_id=device, online=True, bd_seq=bd_seq, ts_ms=now_ms(),
                                  telemetry_interval_s=10)


def telemetry(device: str, bd_seq: int, seq: int) -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(device_id=device, bd_seq=bd_seq, seq=seq, ts_ms=now_ms(), cpu_percent=5.0)


def the_revoked_status(device: str) -> fleet_pb2.DeviceStatus:
    """What `nanofleet revoke` publishes, parsed as ingest parses it."""
    from google.protobuf import json_format

    return json_format.Parse(revoked_status("demo", device, now_ms()), fleet_pb2.DeviceStatus())


def state(store: Store, device: str) -> str | None:
    d = store.get_device(device)
    return None if d is None else d.state


def rejected_revoked(store: Store) -> int:
    return sum(r.count for r in store.rejections() if r.reason == "revoked")


def test_a_revoked_device_is_shown_revoked_and_its_later_messages_are_rejected(tmp_path: Path,
                                                                              store_url: str) -> None:
    db = target(tmp_path, store_url)
    with Store(db) as store:
        store.write_status("demo", birth("pi-1", 1), now_ms())
        # the device may publish reason `revoked` on its own topic: without the CLI's row it is a plain death
        forged = the_revoked_status("pi-1")
        forged.bd_seq = 1
        store.write_status("demo", forged, now_ms())
        assert state(store, "pi-1") == "offline"
        store.write_status("demo", birth("pi-1", 2), now_ms())
        mark_revoked(db, "demo", "pi-1", "cli:test", now_ms())  # the CLI, another writer of the file
        store.write_status("demo", the_revoked_status("pi-1"), now_ms())  # its retained status reaches ingest
        assert state(store, "pi-1") == "revoked"
        out = store.apply(Batch("demo", now_ms(), telemetry=[row_from_pb(telemetry("pi-1", 2, 0))]))
        assert out.revoked_rejected == 1 and out.inserted == 0
        store.write_status("demo", birth("pi-1", 3), now_ms())
        result = fleet_pb2.CommandResult(id="c-1", device_id="pi-1", status="ok")
        assert store.apply(Batch("demo", now_ms(), command_results=[result])).revoked_rejected == 1
        assert state(store, "pi-1") == "revoked" and rejected_revoked(store) == 3
        assert store.read(lambda c: c.execute("SELECT count(*) FROM command_results").fetchone()[0]) == 0
        assert [e.state for e in store.device_events("pi-1")][-1] == "revoked"
    with Store(db) as store:  # a restarted controller knows it from the table
        out = store.apply(Batch("demo", now_ms(), telemetry=[row_from_pb(telemetry("pi-1", 3, 0))]))
        assert out.revoked_rejected == 1 and state(store, "pi-1") == "revoked"
        assert reinstate(db, "pi-1") is True  # `nanofleet enroll` again: fresh credentials, revocation lifted
        store.write_status("demo", birth("pi-1", 4), now_ms())
        assert state(store, "pi-1") == "online"
    assert reinstate(db, "pi-1") is False


def test_a_revoked_device_never_seen_gets_a_revoked_row(tmp_path: Path, store_url: str) -> None:
    db = target(tmp_path, store_url)
    Store(db).close()
    mark_revoked(db, "demo", "ghost", "cli:test", now_ms())
    with Store(db) as store:
        assert state(store, "ghost") == "revoked"


def test_devices_remove_takes_a_revoked_device_off_and_refuses_an_online_one(tmp_path: Path,
                                                                            store_url: str) -> None:
    data = tmp_path / "ctl"
    data.mkdir()
    db = target(data, store_url)
    with Store(db) as store:
        store.write_status("demo", birth("pi-1", 1), now_ms())
    runner = CliRunner()
    r = runner.invoke(main, ["devices", "remove", "pi-1", "--data-dir", str(data), "--store", store_url])
    assert r.exit_code == 1 and "pi-1 is online: revoke it first" in r.output
    mark_revoked(db, "demo", "pi-1", "cli:test", now_ms())
    r = runner.invoke(main, ["devices", "remove", "pi-1", "--data-dir", str(data), "--store", store_url])
    assert r.exit_code == 0 and "removed pi-1 (was revoked)" in r.output, r.output
    r = runner.invoke(main, ["devices", "remove", "pi-1", "--data-dir", str(data), "--store", store_url])
    assert r.exit_code == 1 and "no device 'pi-1'" in r.output
    with Store(db) as store:
        assert state(store, "pi-1") is None
        # its retained revoked status and any late message are rejected, and do not bring it back
        store.write_status("demo", the_revoked_status("pi-1"), now_ms())
        store.write_status("demo", birth("pi-1", 2), now_ms())
        assert state(store, "pi-1") is None and rejected_revoked(store) == 1
        entries = [(e.action, e.target, e.detail) for e in AuditLog(store).page()[0]]
    assert entries == [("device_remove", "pi-1", {"state": "revoked"})]
    r = runner.invoke(main, ["devices", "remove", "pi-1", "--data-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "--data-dir" in r.output and not (tmp_path / "nowhere").exists()


@pytest.fixture
async def web(tmp_path: Path, store_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Store, dict[str, str]]]:
    token, token_hash = ensure_operator_token(tmp_path / "data")
    assert token is not None
    store = Store(store_url)
    store.set_group_resolver(FLEET.group_of)
    app = create_app(store, FLEET, operator_token_hash=token_hash)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
        yield c, store, {"Authorization": f"Bearer {token}"}
    store.close()


async def test_fleet_yaml_devices_never_seen_are_listed_and_filterable(
        web: tuple[httpx.AsyncClient, Store, dict[str, str]]) -> None:
    client, store, auth = web
    store.write_status("demo", birth("pi-1", 1), now_ms())
    store.write_status("demo", birth("pi-2", 1), now_ms())
    assert store.expect_devices("demo", list(FLEET.devices)) == ["pi-new"]
    assert store.expect_devices("demo", list(FLEET.devices)) == []  # once
    mark_revoked(store.target, "demo", "pi-2", "cli:test", now_ms())
    store.write_status("demo", the_revoked_status("pi-2"), now_ms())
    body = (await client.get("/api/devices", headers=auth)).json()
    states = {d["device_id"]: (d["state"], d["group"]) for d in body["items"]}
    assert states == {"pi-1": ("online", "kiosks"), "pi-2": ("revoked", "default"), "pi-new": ("never_seen", "kiosks")}
    never = (await client.get("/api/devices", params={"state": "never_seen"}, headers=auth)).json()
    assert [d["device_id"] for d in never["items"]] == ["pi-new"]
    page = (await client.get("/devices", headers=auth)).text
    assert 'data-state="never_seen"' in page and 'data-state="revoked"' in page and ">never seen<" in page
    assert 'class="badge state-revoked"' in page and '<option value="never_seen"' in page
    overview = (await client.get("/", headers=auth)).text
    assert 'href="/devices?state=never_seen"' in overview and 'href="/devices?state=revoked"' in overview
    # neither a device never seen nor a revoked one is an `offline` or `policy_behind` alert
    published = {"published_version": 3, "published_ms": 0}  # a policy published long ago, never applied
    facts = [alerting.DeviceFacts(d.device_id, d.state, d.last_seen_ms, 0, 1000, 0, 0, **published)
             for d in store.list_devices() if d.device_id != "pi-1"]
    facts.append(alerting.DeviceFacts("gone", "offline", 0, 0, 1000, 0, 3))
    conditions = [c for f in facts for c in alerting.device_conditions(f, FLEET.alerts, now_ms() + 3_600_000)]
    assert {(c.device_id, c.kind) for c in conditions} == {("gone", "offline")}
    store.write_status("demo", birth("pi-new", 1), now_ms())
    assert state(store, "pi-new") == "online"
