"""Commands with ack, result and timeout; and the CLI around a real controller process and a real sim process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from ctl_helpers import command_results, fleet, until

from nanofleet.cli import main
from nanofleet.controller.commands import UnknownCommand
from nanofleet.controller.service import ControllerService
from nanofleet.sim import Simulation
from tests.conftest import free_port, wait_for
from tests.contract.test_docs_examples import doc_block


async def test_commands_ack_result_timeout(broker, tmp_path: Path, reader: str) -> None:
    svc = await ControllerService(fleet("cmd1", broker.url), tmp_path / "ctl", ingest_reader=reader).start()
    sim = await Simulation(broker.url, 1, fleet="cmd1", interval_s=0.2, data_dir=tmp_path / "sim").start()
    try:
        await sim.wait_connected(10)
        await svc.ingest.wait_subscribed(5)
        dev = sim.devices[0]
        # its policy arrived, so its subscriptions are in place (a command sent earlier could beat its SUBSCRIBE)
        await until(lambda: dev.policy is not None, 10, "policy received")
        out = await svc.commands.send("sim-0000", "ping", timeout_s=5)
        assert out.acked and out.status == "ok" and out.message == "pong"
        assert out.data["bd_seq"] == str(dev.bd_seq)
        dev.queue_depth = 9
        out = await svc.commands.send("sim-0000", "drain-queue", {"max": "10"}, timeout_s=5)
        assert out.status == "ok" and dev.commands[-1] == "drain-queue" and out.data["drained"] == "9"
        out = await svc.commands.send("sim-0000", "unload-model", timeout_s=5)
        assert out.status == "ok"
        await until(lambda: svc.store.get_device("sim-0000").model_availability == "downloadable", 5, "unloaded")
        births = len(svc.store.device_events("sim-0000"))
        out = await svc.commands.send("sim-0000", "rebirth", timeout_s=5)
        assert out.status == "ok" and len(svc.store.device_events("sim-0000")) == births  # same bd_seq: no new event
        out = await svc.commands.send("sim-0000", "reload-policy", timeout_s=5)
        assert out.status == "ok" and "re-applied" in out.message
        await until(lambda: [r[0] for r in command_results(svc.store, out.id)] == ["ack", "ok"], 5, "results stored")
        with pytest.raises(UnknownCommand, match="unknown command 'format-disk'"):
            await svc.commands.send("sim-0000", "format-disk")
        with pytest.raises(TimeoutError, match=r"no acknowledgement within 0\.5s"):
            await svc.commands.send("nobody-here", "ping", timeout_s=0.5)
    finally:
        await sim.stop()
        await svc.stop()


class _Child:
    """A `python -m nanofleet …` process whose output is read as it comes (a thread), so a test can wait for a line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "nanofleet", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_line(self, fragment: str, timeout: float = 60) -> None:
        """Until the process printed `fragment` (it exited first: fail with its output)."""
        wait_for(lambda: any(fragment in line for line in self.lines) or self.proc.poll() is not None, timeout,
                 what=f"{fragment!r} printed")
        assert any(fragment in line for line in self.lines), "".join(self.lines)

    def stop(self) -> str:
        """SIGTERM; it must exit 0 (a clean stop). Its whole output."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        self._reader.join(5)
        out = "".join(self.lines)
        assert self.proc.returncode == 0, out
        return out


def test_cli_controller_sim_devices_list_and_cmd(broker, tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(f"fleet: cli1\nbroker: {{url: {broker.url}}}\ndefaults: {{telemetry_interval_s: 1}}\n")
    data = tmp_path / "ctl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ctl = _Child("controller", "--config", str(cfg), "--data-dir", str(data), "--listen", f"127.0.0.1:{free_port()}",
                 env=env)
    sim = _Child("sim", "--devices", "2", "--broker-url", broker.url, "--fleet", "cli1", "--interval", "0.2",
                 "--data-dir", str(tmp_path / "sim"), env=env)
    runner = CliRunner()
    try:
        # started (its SIGTERM handler is set after start): on a loaded machine the devices can be listed before
        ctl.wait_line("controller: fleet 'cli1'")

        def listed() -> str | None:
            if not (data / "controller.db").exists():
                return None
            r = runner.invoke(main, ["devices", "list", "--data-dir", str(data)])
            return r.output if r.output.count(" online ") == 2 else None

        out = str(wait_for(listed, 20, what="two simulated devices online in `devices list`"))
        assert "sim-0000" in out and "sim-0001" in out
        r = runner.invoke(main, ["devices", "cmd", "sim-0001", "drain-queue", "limit=5", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        assert "sim-0001 drain-queue: ok drained" in r.output and "drained = " in r.output
        r = runner.invoke(main, ["devices", "cmd", "sim-0001", "ping", "--config", str(cfg)])
        assert r.exit_code == 0, r.output
        shown = doc_block("operations.md", "ping --config /etc/nanofleet/fleet.yaml --mqtt-username controller\n```\n")
        pattern = re.sub(r"\d+", r"\\d+", re.escape(shown.replace("pi-lab-01", "sim-0001")))  # any time, any id
        assert re.fullmatch(pattern, r.output), f"docs/operations.md's ping output is not what it prints:\n{r.output}"
        r = runner.invoke(main, ["devices", "cmd", "sim-0001", "ping", "oops", "--config", str(cfg)])
        assert r.exit_code == 2 and "expected key=value" in r.output
        r = runner.invoke(main, ["devices", "cmd", "ghost", "ping", "--config", str(cfg), "--timeout", "0.5"])
        assert r.exit_code == 1 and "no acknowledgement" in r.output
    finally:
        sim_out = sim.stop()
        # the devices' shutdown statuses reach the controller before it stops
        wait_for(lambda: runner.invoke(main, ["devices", "list", "--data-dir", str(data)]).output.count(" offline ")
                 == 2, 20, what="both devices offline")
        ctl_out = ctl.stop()
    assert "simulating 2 devices" in sim_out
    assert "operator token: " in ctl_out and "dashboard: http://127.0.0.1:" in ctl_out
    r = CliRunner().invoke(main, ["devices", "list", "--data-dir", str(data)])
    assert r.output.count(" offline ") == 2, r.output


async def test_a_fire_the_client_did_not_take_is_counted_and_raised() -> None:
    """fire() used to ignore publish_nowait's False: a rebirth request lost without a trace."""
    from nanofleet.controller.commands import CommandNotSent, CommandService
    from nanofleet.controller.mqtt_reader import AsyncPublisher, MqttReader

    never_connected = AsyncPublisher(MqttReader(f"mqtt://127.0.0.1:{free_port()}", [], lambda _m: None))
    svc = CommandService(never_connected, "cmdf")  # type: ignore[arg-type]
    with pytest.raises(CommandNotSent, match="rebirth to d1: not sent"):
        svc.fire("d1", "rebirth")
    assert svc.counters["fire_not_sent"] == 1


async def test_listen_counts_and_logs_the_results_it_cannot_use(broker, caplog: pytest.LogCaptureFixture) -> None:
    """listen() (the CLI's results) used to skip a malformed result without a count; a good one still answers."""
    import asyncio
    import contextlib

    from google.protobuf import json_format

    from nanofleet.controller.commands import CommandService
    from nanofleet.mqtt import MqttClient
    from nanofleet.protos import fleet_pb2, topics

    async with MqttClient(broker.url) as client, MqttClient(broker.url) as device:
        await client.wait_connected(5)
        await device.wait_connected(5)
        svc = CommandService(client, "cmdl")
        listener = asyncio.create_task(svc.listen())
        try:
            device.subscribe([(topics.cmd("cmdl", "d1"), 1)])
            await asyncio.sleep(0.2)  # both subscriptions in place (SUBACK is not awaited by subscribe)
            sent = asyncio.create_task(svc.send("d1", "ping", timeout_s=10))
            cmd_msg = await asyncio.wait_for(anext(device.messages()), 10)
            cmd = json_format.Parse(cmd_msg.payload, fleet_pb2.Command())
            result_topic = topics.cmd_result("cmdl", "d1")
            await device.publish(result_topic, b"not json", qos=1)
            await device.publish(result_topic, json_format.MessageToJson(fleet_pb2.CommandResult(
                id=cmd.id, device_id="d1", status="ok", message="pong")), qos=1)
            out = await asyncio.wait_for(sent, 10)
            assert out.status == "ok" and out.message == "pong"
            assert svc.counters["results_rejected"] == 1
            assert "command result on" in caplog.text and "skipped" in caplog.text
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
