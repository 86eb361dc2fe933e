"""The broker `nanofleet up` starts is closed: passwords required, devices confined to their own topics.

Runs against real brokers: Mosquitto, and the embedded amqtt fallback, with the config files we generate.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from nanofleet.broker import CONTROLLER_USER, BrokerAccounts, write_amqtt_config, write_mosquitto_config
from nanofleet.protos import topics
from tests.conftest import _port_open, free_port, mosquitto_binary, until, wait_for


def _client(port: int, user: str | None, password: str | None) -> tuple[mqtt.Client, int]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{free_port()}")
    if user:
        c.username_pw_set(user, password)
    result: dict[str, int] = {}
    c.on_connect = lambda _c, _u, _f, reason, _p: result.setdefault("rc", reason.value)
    c.connect("127.0.0.1", port)
    wait_for(lambda: c.loop(timeout=0.05) is not None and "rc" in result, timeout=10, interval=0, what="CONNACK")
    if result["rc"] == 0:
        c.loop_start()
    return c, result["rc"]


@pytest.fixture(params=["mosquitto", "amqtt"])
def closed_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, BrokerAccounts]]:
    accounts = BrokerAccounts(tmp_path, "demo")
    accounts.ensure(CONTROLLER_USER, "controller")
    accounts.ensure("dev-1", "device")
    accounts.ensure("dev-2", "device")
    port = free_port()
    if request.param == "mosquitto":
        cmd = [mosquitto_binary(), "-c", str(write_mosquitto_config(accounts, "127.0.0.1", port))]
    else:
        cmd = [str(Path(__import__("sys").executable).with_name("amqtt")), "-c",
               str(write_amqtt_config(accounts, "127.0.0.1", port))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), timeout=20, what=f"{request.param} listening")
        yield port, accounts
    finally:
        proc.terminate()
        proc.wait(10)


def test_password_files_are_private(closed_broker: tuple[int, BrokerAccounts]) -> None:
    _, accounts = closed_broker
    for f in (accounts.state_dir / "broker").iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o077 == 0, f"{f} is readable by others"


def test_anonymous_and_wrong_password_are_refused(closed_broker: tuple[int, BrokerAccounts]) -> None:
    port, _ = closed_broker
    for user, password in ((None, None), ("dev-1", "wrong"), ("nobody", "x")):
        c, rc = _client(port, user, password)
        try:
            assert rc != 0, f"{user!r} connected"
        finally:
            c.loop_stop()
            c.disconnect()


def test_a_device_reaches_only_its_own_topics(closed_broker: tuple[int, BrokerAccounts]) -> None:
    port, accounts = closed_broker
    pw = accounts.load()
    ctl, rc = _client(port, CONTROLLER_USER, pw[CONTROLLER_USER]["password"])
    assert rc == 0
    got: list[str] = []
    ctl.on_message = lambda _c, _u, m: got.append(m.topic)
    subscribed = threading.Event()
    ctl.on_subscribe = lambda *_a: subscribed.set()
    ctl.subscribe("nanofleet/v1/demo/#", qos=1)
    assert subscribed.wait(10), "no SUBACK"
    dev, rc = _client(port, "dev-1", pw["dev-1"]["password"])
    assert rc == 0
    try:
        # A publish the ACL forbids is dropped by the broker; the allowed one that follows proves delivery works.
        dev.publish(topics.telemetry("demo", "dev-2"), b"spoofed", qos=1).wait_for_publish(5)
        dev.publish(topics.policy("demo", "dev-1"), b"self-granted policy", qos=1).wait_for_publish(5)
        dev.publish(topics.telemetry("demo", "dev-1"), b"mine", qos=1).wait_for_publish(5)
        wait_for(lambda: topics.telemetry("demo", "dev-1") in got, what="the device's own telemetry")
        assert got == [topics.telemetry("demo", "dev-1")]
    finally:
        for c in (dev, ctl):
            c.loop_stop()
            c.disconnect()


def test_password_hashes_are_made_once_per_account_not_at_every_config_write(tmp_path: Path) -> None:
    """10,000 simulated accounts: rehashing all of them at every start or enroll cost seconds (hours with amqtt's
    argon2 defaults); each account's hash is made once and the files are rewritten from it."""
    accounts = BrokerAccounts(tmp_path, "demo")
    accounts.ensure_many([f"sim-{i:04d}" for i in range(50)], "device")
    first = write_mosquitto_config(accounts, "127.0.0.1", 1883).with_name("passwd").read_text()
    assert write_mosquitto_config(accounts, "127.0.0.1", 1883).with_name("passwd").read_text() == first
    first = write_amqtt_config(accounts, "127.0.0.1", 1883).with_name("amqtt-passwd").read_text()
    assert write_amqtt_config(accounts, "127.0.0.1", 1883).with_name("amqtt-passwd").read_text() == first
    assert "max_connections -1" in (tmp_path / "broker" / "mosquitto.conf").read_text()


def test_simulated_devices_log_in_each_with_its_own_password(tmp_path: Path) -> None:
    """What `nanofleet up --simulate` does: an account per simulated device, the simulator logging in as each."""
    import json

    from nanofleet.sim import device_ids

    accounts = BrokerAccounts(tmp_path, "demo")
    path = accounts.credentials_file(device_ids(3), "sim-credentials.json")
    creds = json.loads(path.read_text())
    assert sorted(creds) == device_ids(3) and len(set(creds.values())) == 3, "one password shared by devices"
    assert path.stat().st_mode & 0o777 == 0o600
    assert {u: accounts.load()[u]["password"] for u in creds} == creds
    port = free_port()
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(write_mosquitto_config(accounts, "127.0.0.1", port))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), timeout=20, what="mosquitto listening")
        asyncio.run(_log_in_as_each(port, creds, tmp_path))
    finally:
        proc.terminate()
        proc.wait(10)


async def _log_in_as_each(port: int, creds: dict[str, str], tmp_path: Path) -> None:
    from nanofleet.sim import Simulation

    sim = await Simulation(f"mqtt://127.0.0.1:{port}", 3, fleet="demo", passwords=creds, data_dir=tmp_path).start()
    try:
        await sim.wait_connected(20)
    finally:
        await sim.stop()
    swapped = dict(zip(creds, [*list(creds.values())[1:], next(iter(creds.values()))], strict=True))
    wrong = await Simulation(f"mqtt://127.0.0.1:{port}", 3, fleet="demo", passwords=swapped, data_dir=tmp_path,
                             backoff=(5, 5)).start()
    try:
        await until(lambda: wrong.counters.connect_failures >= 3, 20, "three refused logins")
        assert wrong.connected == 0 and "MQTTConnectError" in wrong.counters.last_error
    finally:
        await wrong.stop()
