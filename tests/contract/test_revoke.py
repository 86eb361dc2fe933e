"""`nanofleet revoke` on a real Mosquitto, a real gateway and the controller's store: the connected device is cut
and cannot connect or publish again, its gateway calls are refused, its retained status says `revoked` (the broker
sends no last will when a reload cuts a session), the store shows it revoked, the audit log has it; enrolling it
again issues fresh credentials."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
import yaml
from click.testing import CliRunner, Result

from nanofleet.broker import CONTROLLER_USER, BrokerAccounts, write_mosquitto_config
from nanofleet.cli import main
from nanofleet.config import parse_fleet
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.gateway.auth import token_is_active
from nanofleet.controller.gateway.server import Gateway
from nanofleet.controller.store import Store
from tests.conftest import _port_open, free_port, mosquitto_binary, wait_for
from tests.contract.test_broker import _client
from tests.gateway.conftest import FLEET_YAML, Client
from tests.gateway.fake_gemini import FakeGemini

STATUS = "nanofleet/v1/test/dev-1/status"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[int, Path, Path, FakeGemini]]:
    """Mosquitto on the state folder's config (pid where `nanofleet up` writes it), the gateway's fake upstream,
    and a fleet.yaml naming both; yields (port, state, fleet.yaml, fake)."""
    state = tmp_path / "state"
    accounts = BrokerAccounts(state, "test")
    accounts.ensure(CONTROLLER_USER, "controller")
    port = free_port()
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(write_mosquitto_config(accounts, "127.0.0.1", port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (state / "broker" / "broker.pid").write_text(str(proc.pid))
    fake = FakeGemini()
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET_YAML.format(base_url=fake.base_url, device_budget=10**6, fleet_budget=10**7, timeout=5)
                    + f"broker: {{url: 'mqtt://127.0.0.1:{port}'}}\n")
    try:
        wait_for(lambda: _port_open(port), timeout=20, what="mosquitto listening")
        yield port, state, path, fake
    finally:
        fake.close()
        proc.terminate()
        proc.wait(10)


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _retained(port: int, password: str) -> dict[str, object]:
    c, rc = _client(port, CONTROLLER_USER, password)
    assert rc == 0
    got: list[bytes] = []
    c.on_message = lambda _c, _u, msg: got.append(msg.payload)
    c.subscribe(STATUS, 1)
    wait_for(lambda: got, timeout=10, what="the retained status")
    c.loop_stop()
    c.disconnect()
    return json.loads(got[-1])


async def test_revoke_cuts_the_device_off_broker_and_gateway(fleet: tuple[int, Path, Path, FakeGemini]) -> None:
    port, state, path, _ = fleet
    r = _cli("enroll", "dev-1", "--config", str(path), "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    settings = yaml.safe_load((state / "devices" / "dev-1" / "agent.yaml").read_text())
    controller_password = BrokerAccounts(state, "test").load()[CONTROLLER_USER]["password"]
    gw = Gateway(parse_fleet(path.read_text()), state / "gateway", env={"GEMINI_API_KEY": "k"}, auth_cache_ttl=0.0,
                 retry_base_delay=0.01)
    await gw.start()
    client = Client(gw.address, settings["gateway_token"], None)
    try:
        assert (await client.generate()).text
        # the device, connected with its last will, says it is online (retained), as the agent does
        device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-1")
        device.username_pw_set("dev-1", settings["mqtt_password"])
        device.will_set(STATUS, json.dumps({"online": False, "bdSeq": "1", "reason": "last_will"}), 1, True)
        device.reconnect_delay_set(30, 30)
        cut: list[object] = []
        device.on_disconnect = lambda *a: cut.append(a[3])
        device.connect("127.0.0.1", port)
        device.loop_start()
        device.publish(STATUS, json.dumps({"online": True, "bdSeq": "1"}), 1, retain=True).wait_for_publish(10)
        assert _retained(port, controller_password)["online"] is True

        r = await asyncio.to_thread(_cli, "revoke", "dev-1", "--config", str(path), "--state-dir", str(state))
        assert r.exit_code == 0, r.output
        assert "revoked dev-1: broker account removed, 1 gateway token(s) revoked" in r.output
        assert "broker reloaded" in r.output and "retained status replaced: revoked" in r.output
        await asyncio.to_thread(wait_for, lambda: cut, 15, 0.05, "the broker to cut the revoked session")
        device.loop_stop()
        status = _retained(port, controller_password)
        assert status.get("reason") == "revoked" and not status.get("online")  # not its will, not `online`
        connect, rc = _client(port, "dev-1", settings["mqtt_password"])
        connect.disconnect()
        assert rc != 0  # refused: it cannot connect, so it cannot publish
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.generate()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in refused.value.details()
    finally:
        await client.close()
        await gw.stop(grace=0.5)
    with Store(state / "controller" / "controller.db") as store:
        d = store.get_device("dev-1")
        assert d is not None and d.state == "revoked"
        [entry] = AuditLog(store).page(action="revoke")[0]
    assert entry.target == "dev-1" and entry.source == "cli"
    assert entry.detail == {"broker_account": True, "broker_reloaded": True, "gateway_tokens": 1,
                            "status_replaced": True}

    # enrolled again: fresh credentials that work, and the revocation lifted
    r = _cli("enroll", "dev-1", "--config", str(path), "--state-dir", str(state))
    assert r.exit_code == 0 and "with fresh credentials (the previous were revoked)" in r.output, r.output
    again = yaml.safe_load((state / "devices" / "dev-1" / "agent.yaml").read_text())
    assert again["gateway_token"] != settings["gateway_token"] and token_is_active(
        state / "gateway" / "gateway.db", again["gateway_token"])
    assert again["mqtt_password"] != settings["mqtt_password"]
    wait_for(lambda: _client(port, "dev-1", again["mqtt_password"])[1] == 0, timeout=15, interval=0.2,
             what="the fresh account to work")


def test_enroll_again_after_a_token_revocation_issues_a_fresh_token(tmp_path: Path) -> None:
    """The old enroll kept the revoked token in agent.yaml and printed `enrolled`."""
    state = tmp_path / "state"
    config = Path(__file__).resolve().parents[2] / "fleet.yaml"
    assert _cli("enroll", "pi-lab-01", "--config", str(config), "--state-dir", str(state), "--init").exit_code == 0
    first = yaml.safe_load((state / "devices" / "pi-lab-01" / "agent.yaml").read_text())["gateway_token"]
    r = _cli("gateway", "token", "revoke", "pi-lab-01", "--data-dir", str(state / "gateway"))
    assert r.exit_code == 0, r.output
    r = _cli("enroll", "pi-lab-01", "--config", str(config), "--state-dir", str(state))
    assert r.exit_code == 0 and "with fresh credentials (the previous were revoked)" in r.output, r.output
    token = yaml.safe_load((state / "devices" / "pi-lab-01" / "agent.yaml").read_text())["gateway_token"]
    assert token != first and token_is_active(state / "gateway" / "gateway.db", token)


def test_revoke_of_an_unknown_device_or_without_state_is_refused(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "fleet.yaml"
    r = _cli("revoke", "pi-lab-01", "--config", str(config), "--state-dir", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "--state-dir" in r.output and "no fleet state at" in r.output
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    r = _cli("revoke", "pi-lab-01", "--config", str(config), "--state-dir", str(tmp_path / "empty"))
    assert r.exit_code == 1 and "nothing to revoke: pi-lab-01 has no broker account or gateway token" in r.output
    (tmp_path / "empty" / "controller").mkdir()
    Store(tmp_path / "empty" / "controller" / "controller.db").close()
    r = _cli("revoke", "pi-lab-0l", "--config", str(config), "--state-dir", str(tmp_path / "empty"))  # a typo
    assert r.exit_code == 1 and "is not in the controller store" in r.output
    with Store(tmp_path / "empty" / "controller" / "controller.db") as store:
        assert store.list_devices() == [] and AuditLog(store).page()[0] == []  # nothing recorded


async def test_a_running_controller_shows_the_revocation_and_rejects_what_follows(
        fleet: tuple[int, Path, Path, FakeGemini]) -> None:
    import time

    from google.protobuf import json_format

    from nanofleet.controller.service import ControllerService
    from nanofleet.mqtt import MqttClient
    from nanofleet.protos import fleet_pb2, topics
    from tests.conftest import until

    port, state, path, _ = fleet
    password = BrokerAccounts(state, "test").load()[CONTROLLER_USER]["password"]
    r = await asyncio.to_thread(_cli, "enroll", "dev-1", "--config", str(path), "--state-dir", str(state))
    assert r.exit_code == 0, r.output
    settings = yaml.safe_load((state / "devices" / "dev-1" / "agent.yaml").read_text())
    svc = ControllerService(parse_fleet(path.read_text()), state / "controller", mqtt_username=CONTROLLER_USER,
                            mqtt_password=password, listen="127.0.0.1:0", echo=lambda _line: None)
    await svc.start()
    try:
        assert svc.ingest is not None and svc.store is not None
        store = svc.store
        await svc.ingest.wait_subscribed(5)

        def state_of(device: str) -> str | None:
            d = store.get_device(device)
            return None if d is None else d.state

        assert await asyncio.to_thread(state_of, "clinic-1") == "never_seen"  # in fleet.yaml, never heard from
        birth = fleet_pb2.DeviceStatus(fleet="test", device_id="dev-1", online=True, bd_seq=1,
                                       ts_ms=int(time.time() * 1000), telemetry_interval_s=10)
        async with MqttClient(f"mqtt://127.0.0.1:{port}", client_id="dev-1", username="dev-1",
                              password=settings["mqtt_password"]) as device:
            await device.wait_connected(5)
            await device.publish(topics.status("test", "dev-1"), json_format.MessageToJson(birth).encode(), 1, True)
            await until(lambda: state_of("dev-1") == "online", 10, "dev-1 online")
            r = await asyncio.to_thread(_cli, "revoke", "dev-1", "--config", str(path), "--state-dir", str(state))
            assert r.exit_code == 0, r.output
            await until(lambda: state_of("dev-1") == "revoked", 10, "dev-1 revoked at the running controller")
            await until(lambda: not device.connected, 10, "the device's session cut")
        # a message under its name that still reaches the broker (here: the controller's account) is rejected
        async with MqttClient(f"mqtt://127.0.0.1:{port}", username=CONTROLLER_USER, password=password) as other:
            await other.wait_connected(5)
            await other.publish(topics.status("test", "dev-1"), json_format.MessageToJson(birth).encode(), 1)
            await until(lambda: svc.ingest.stats.rejected_by_reason["revoked"] >= 1, 10,  # type: ignore[union-attr]
                        "the revoked device's birth rejected and counted")
        assert state_of("dev-1") == "revoked"
    finally:
        await svc.stop()
