"""Several controllers of one fleet: leadership over a real PostgreSQL advisory lock gates the once-per-fleet work;
ingest runs on all of them ($share, real mosquitto); gaps are judged from the stored rows by the leader.

Each controller here keeps its own SQLite store (the controller store on PostgreSQL is controller/store.py's, merged
separately); the lock is on a real PostgreSQL server, which is all leadership needs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
import urllib.request
from pathlib import Path

from ctl_helpers import fleet, until

from nanofleet.controller.leader import Leadership
from nanofleet.controller.metrics import render
from nanofleet.controller.service import ControllerService
from nanofleet.controller.web.panels import controller_panel
from nanofleet.mqtt import MqttClient
from nanofleet.pg_db import connect as pg_connect
from nanofleet.protos import topics
from nanofleet.tcp import free_port


def _service(name: str, broker_url: str, path: Path, pg_url: str | None, **kw: object) -> ControllerService:
    svc = ControllerService(fleet(name, broker_url), path, share_group="g", sweep_every_s=0.1, alerts_every_s=0.1,
                            **kw)  # type: ignore[arg-type]
    if pg_url is not None:  # the lock on PostgreSQL, the store on SQLite (see the module docstring)
        svc.leader = Leadership(pg_url, svc.config.fleet, retry_s=0.1, check_s=0.1, on_change=svc._on_leadership)
    return svc


def _gauge(svc: ControllerService, name: str) -> float:
    for line in render(svc.metrics).decode().splitlines():
        if line.startswith(f"nanofleet_controller_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


async def test_only_the_leader_does_the_fleet_work_and_a_follower_takes_over(broker, tmp_path: Path,
                                                                            pg_url: str) -> None:
    a = await _service("mc1", broker.url, tmp_path / "a", pg_url).start()
    b: ControllerService | None = None
    try:
        await until(lambda: a.leader.is_leader, 10, "the first controller leads")
        b = await _service("mc1", broker.url, tmp_path / "b", pg_url).start()
        follower = b
        await until(lambda: a.alert_engine is not None and a.alert_engine.rounds >= 3, 10, "the leader's alerts run")
        assert follower.alert_engine is not None
        assert not follower.leader.is_leader and follower.alert_engine.rounds == 0  # several rounds later: none
        assert (_gauge(a, "leader"), _gauge(follower, "leader")) == (1.0, 0.0)
        assert follower.status()["leader"]["backend"] == "postgresql"
        assert 'data-health="leader">yes' in controller_panel(a.status())
        assert 'data-health="leader">no' in controller_panel(follower.status())
        # ingest runs on both: a burst through $share reaches both stores
        await asyncio.gather(a.ingest.wait_subscribed(5), follower.ingest.wait_subscribed(5))  # type: ignore[union-attr]
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            await asyncio.gather(*[pub.publish(topics.telemetry("mc1", f"d{i % 5}"),
                                               f'{{"tsMs": "{int(time.time() * 1000) + i}", "seq": {i % 256}}}',
                                               qos=1) for i in range(200)])
        await until(lambda: a.ingest.stats.telemetry + follower.ingest.stats.telemetry == 200, 10,  # type: ignore
                    "200 rows between the two")
        assert follower.ingest.stats.telemetry > 0  # type: ignore[union-attr]
        stopped_at = time.monotonic()
        await a.stop()  # the leader goes (kill -9 of a lock holder: tests/controller/test_leader.py)
        await until(lambda: follower.leader.is_leader, 5, "the follower takes over")
        took = time.monotonic() - stopped_at
        await until(lambda: follower.alert_engine is not None and follower.alert_engine.rounds >= 1, 5,
                    "its alert engine starts")
        assert took < 5 and _gauge(follower, "leader") == 1.0
    finally:
        if b is not None:
            await b.stop()
        if a.started_at is not None and a.ingest is not None and a.ingest.connected:
            await a.stop()


async def test_gaps_are_judged_from_the_store_under_share(broker, tmp_path: Path) -> None:
    svc = await _service("mc2", broker.url, tmp_path / "c", None, gaps_every_s=0.1, gap_settle_ms=300).start()
    try:
        await until(lambda: svc.leader.is_leader and svc.gap_rounds >= 1, 10, "the SQLite controller leads, judges")
        assert svc.store is not None and not svc.store.check_gaps  # the live check is off under $share
        async with MqttClient(broker.url) as pub, MqttClient(broker.url) as device:
            await pub.wait_connected(5)
            await device.wait_connected(5)
            device.subscribe([(topics.cmd("mc2", "d1"), 1)])  # d1's command topic: the rebirth request comes there
            requests: list[dict[str, object]] = []

            async def collect() -> None:
                async for msg in device.messages():
                    requests.append(json.loads(msg.payload))

            collector = asyncio.ensure_future(collect())
            await pub.publish(topics.status("mc2", "d1"), json.dumps(
                {"deviceId": "d1", "fleet": "mc2", "online": True, "bdSeq": "4",
                 "tsMs": str(int(time.time() * 1000))}).encode(), qos=1)
            await until(lambda: svc.store.get_device("d1") is not None, 10, "d1's birth")  # type: ignore[union-attr]
            now = int(time.time() * 1000)
            sent = [(250 + i) % 256 for i in range(12)]  # 250..255, 0..5 across the wrap; 254, 0 and 1 lost
            for i, seq in enumerate(sent):
                if seq not in (254, 0, 1):
                    await pub.publish(topics.telemetry("mc2", "d1"), json.dumps(
                        {"tsMs": str(now + i * 10), "seq": seq, "bdSeq": "4"}).encode(), qos=1)
            await until(lambda: svc.store.get_device("d1").gap_count == 3, 10,  # type: ignore[union-attr]
                        "3 missing seqs counted")
            assert svc.status()["gaps"]["missing"] == 3 and _gauge(svc, "stored_gaps_total") == 3.0
            await until(lambda: any(r.get("kind") == "rebirth" for r in requests), 10, "a rebirth asked for")
            # the next row (seq 6, no gap) rewrites d1's row from the store's in-memory devices: the count stays
            await pub.publish(topics.telemetry("mc2", "d1"), json.dumps(
                {"tsMs": str(now + 12 * 10), "seq": 6, "bdSeq": "4"}).encode(), qos=1)
            await until(lambda: len(svc.store.telemetry("d1")) == 10, 10, "the tenth row")  # type: ignore[union-attr]
            rounds = svc.gap_rounds
            await until(lambda: svc.gap_rounds >= rounds + 3, 10, "more rounds")
            assert svc.store.get_device("d1").gap_count == 3  # type: ignore[union-attr]  # judged once
            collector.cancel()
    finally:
        await svc.stop()


def _stored(db: Path) -> set[tuple[str, int]]:
    """(device_id, seq) of every telemetry row in a controller's SQLite file (read while it runs: WAL)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {(d, s) for d, s in conn.execute("SELECT device_id, seq FROM telemetry")}


def _health(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return dict(json.loads(r.read()))
    except OSError:
        return {}


async def test_kill_9_of_one_of_two_controller_processes_under_load(broker, tmp_path: Path, pg_url: str) -> None:
    """Two controller processes share ingest ($share) into one PostgreSQL store; one is killed with SIGKILL
    mid-stream and started again (as systemd would), with the same data folder and so the same MQTT client id: every
    message published is stored exactly once. What the dead one had taken but not stored was never acknowledged
    (durable ingest), and what the broker routed to its persistent session meanwhile waits there for its return."""
    (tmp_path / "fleet.yaml").write_text(f"fleet: mc3\nbroker: {{url: {broker.url}}}\n")
    ports = [free_port(), free_port()]

    async def start(name: str, port: int) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nanofleet", "controller", "--config", str(tmp_path / "fleet.yaml"),
            "--data-dir", str(tmp_path / name), "--share-group", "g", "--listen", f"127.0.0.1:{port}",
            "--store", pg_url, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    procs = [await start(name, port) for name, port in zip("ab", ports, strict=True)]
    conn = pg_connect(pg_url)

    def stored() -> tuple[int, int]:
        row = conn.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry").fetchone()
        return int(row[0]), int(row[1])

    try:
        for port in ports:
            await until(lambda p=port: _health(p).get("broker_connected"), 30, "both controllers subscribed")
        n, devices, killed_at = 1_500, 20, -1
        async with MqttClient(broker.url) as pub:
            await pub.wait_connected(5)
            start_t = time.monotonic()
            for i in range(n):
                await pub.publish(topics.telemetry("mc3", f"d{i % devices}"), json.dumps(
                    {"tsMs": str(int(time.time() * 1000) + i), "seq": (i // devices) % 256}).encode(), qos=1)
                if i == n // 3:
                    procs[0].kill()  # kill -9 of controller a, mid-stream
                    await procs[0].wait()
                    killed_at = i
                if i == n // 2:
                    procs[0] = await start("a", ports[0])  # back with the same client id: its session waits
                await asyncio.sleep(max(0.0, start_t + (i + 1) / 500 - time.monotonic()))  # paced: 500 msg/s
        await until(lambda: stored()[0] >= n, 30, f"all {n} messages stored (killed at {killed_at})")
        assert stored() == (n, n)  # each stored once, none lost
    finally:
        conn.close()
        for p in procs:
            if p.returncode is None:
                p.terminate()
                await p.wait()


async def test_a_command_result_reaches_the_controller_that_sent_it(broker, tmp_path: Path) -> None:
    """Under $share a device's result could go to the other controller: the sender (the one serving the dashboard
    request) then timed out. Every controller now hears every result (few and small); each stores it (idempotent)."""
    from google.protobuf import json_format

    from nanofleet.protos import fleet_pb2

    a = await _service("mc4", broker.url, tmp_path / "a", None).start()
    b = await _service("mc4", broker.url, tmp_path / "b", None).start()
    try:
        await asyncio.gather(a.ingest.wait_subscribed(5), b.ingest.wait_subscribed(5))  # type: ignore[union-attr]
        async with MqttClient(broker.url) as device:
            await device.wait_connected(5)
            device.subscribe([(topics.cmd("mc4", "d1"), 1)])

            subscribed = asyncio.Event()

            async def answer() -> None:
                async for msg in device.messages():
                    if msg.payload == b"probe":  # our own probe came back: the subscription is in place
                        subscribed.set()
                        continue
                    cmd = json_format.Parse(msg.payload, fleet_pb2.Command())
                    await device.publish(topics.cmd_result("mc4", "d1"), json_format.MessageToJson(
                        fleet_pb2.CommandResult(id=cmd.id, device_id="d1", status="ok", message="pong")), qos=1)

            responder = asyncio.ensure_future(answer())
            try:
                while not subscribed.is_set():
                    await device.publish(topics.cmd("mc4", "d1"), b"probe", qos=1)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscribed.wait(), 0.2)
                for sender in (a, a, a, b, b, b):  # not in step with the broker's round robin
                    assert sender.commands is not None
                    out = await sender.commands.send("d1", "ping", timeout_s=5)
                    assert out.status == "ok" and out.message == "pong"
            finally:
                responder.cancel()
        assert a.commands is not None and b.commands is not None
        await until(lambda: a.commands.counters["results_unclaimed"] == 3
                    and b.commands.counters["results_unclaimed"] == 3, 5, "each heard the other's 3 results")
    finally:
        await a.stop()
        await b.stop()
