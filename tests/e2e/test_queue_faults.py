"""The offline queue's promise under faults, as real processes: app → agent (unix socket) → gRPC → gateway →
fake Gemini. The agent is the real `AgentService` in its own process (forked by tests/e2e/agent_zygote.py, so a
restart costs no imports), on the tiny model, with a fake sysfs tree that heats and cools; between it and the
gateway process sits a TCP relay the test cuts and restores (the gateway "goes away" without restarting it).

1. `kill -9` at random moments during bursts of enqueues and during drains, 50 cycles: every request answered 202
   ends `done` exactly once with its result, none is lost, and Gemini saw each cloud request at most once (the
   entry id is the gateway request_id, so a drain cut after the cloud answered is not charged twice).
2. The relay cut → `cloud_only` requests queue (`gateway_unreachable`); restored → they drain through the gateway.
3. The device heats (fake sysfs) → `local_only` requests queue; it cools → they drain locally.
4. The disk fills (a small tmpfs when the test may mount one, else `queue_max_file_bytes`): 507 `queue_disk_full`,
   a local request is still answered 200 meanwhile, and every entry acknowledged before ends `done` once space
   returns and the agent restarts.
5. Restart with entries queued, one of them `running` (its cloud call in flight at a slow Gemini): draining resumes
   after the restart, that entry runs again (`restarts` 1) and Gemini sees its prompt once (the gateway's
   request_id idempotency answers the re-run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.server import DB_NAME
from tests.conftest import free_port
from tests.e2e.cloud_procs import Proc, clean_env, gateway_proc, write_fleet
from tests.gateway.fake_gemini import FakeGemini
from tests.telemetry.fake_sysfs import FakeSysfs

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CYCLES = 50


class Relay:
    """A TCP relay on loopback: `up` forwards to the gateway, down it accepts and closes at once (refused calls)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.up = True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self.listener.close()


@dataclass
class Stack:
    fake: FakeGemini
    relay: Relay
    sysfs: FakeSysfs
    socket: Path
    zygote: subprocess.Popen[str]
    gateway: Proc
    config: dict[str, Any]
    pid: int = 0

    def start_agent(self, config: Path | None = None) -> None:
        """A real agent process, on the stack's agent.yaml or on `config`."""
        assert self.zygote.stdin is not None and self.zygote.stdout is not None
        self.zygote.stdin.write(f"start {config}\n" if config else "start\n")
        self.zygote.stdin.flush()
        self.pid = int(self.zygote.stdout.readline())

    def kill_agent(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = 0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)), base_url="http://a",
                                 timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("queue-faults")
    fake = FakeGemini()
    gw_port = free_port()
    gw_dir = tmp / "gateway-data"
    fleet = write_fleet(tmp / "fleet.yaml", fake.base_url, "127.0.0.1:0")
    token = issue_token(gw_dir / DB_NAME, "q-1", "e2e")
    gateway = gateway_proc(tmp, fleet, gw_dir, gw_port, "key").start()
    relay = Relay(gw_port)
    sysfs = FakeSysfs(tmp / "sys")
    sock = tmp / "run" / "q.sock"
    config = tmp / "agent.yaml"
    settings: dict[str, Any] = {
        "fleet": "e2e", "device_id": "q-1", "data_dir": str(tmp / "data"), "socket_path": str(sock),
        "broker_url": None, "gateway_address": f"127.0.0.1:{relay.port}", "gateway_token": token,
        "model": {"source": f"file:{tiny_gguf}", "n_ctx": 256, "n_parallel": 2, "keep_alive": -1},
        "sysfs_root": str(sysfs.root)}
    config.write_text(yaml.safe_dump(settings))
    log = (tmp / "agent.log").open("ab")
    zygote = subprocess.Popen([sys.executable, "-m", "tests.e2e.agent_zygote", str(config)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                              env=clean_env())
    s = Stack(fake, relay, sysfs, sock, zygote, gateway, settings)
    try:
        gateway.wait_ready()
        yield s
    finally:
        s.kill_agent()
        zygote.kill()
        zygote.wait(10)
        for f in (zygote.stdin, zygote.stdout):
            if f is not None:
                f.close()
        log.close()
        relay.close()
        gateway.stop()
        fake.close()


def body(text: str, mode: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "ignore_eos": True,
            "nanofleet": {"mode": mode, "app": f"app-{mode}"}}


def denied(b: dict[str, Any]) -> dict[str, Any]:
    """`queue: deny`: the failed try that opens the breaker is answered, not queued after it."""
    return {**b, "nanofleet": {**b["nanofleet"], "queue": "deny"}}


async def serving(stack: Stack) -> None:
    async def ok() -> bool:
        try:
            async with stack.client() as c:
                return (await c.get("/v1/models")).status_code == 200
        except httpx.TransportError:
            return False

    deadline = time.monotonic() + 30
    while not await ok():
        assert time.monotonic() < deadline, "the agent did not serve within 30 s"
        await asyncio.sleep(0.02)


async def drain_moving(c: httpx.AsyncClient, within: float = 60) -> None:
    """Until this agent process has finished an entry (or has none left). A kill at a fixed moment after start lands,
    on a loaded machine, before the first generation ends: every cycle then kills the same running entry, which
    fails at its 21st restart (the queue's poison-entry rule), a property of the load, not of the queue."""
    end = time.monotonic() + within
    while True:
        q = (await c.get("/v1/status")).json()["queue"]
        if q["depth"] == 0 or q["counters"].get("drained_local", 0) + q["counters"].get("drained_cloud", 0):
            return
        assert time.monotonic() < end, f"the queue made no progress within {within} s: {q}"
        await asyncio.sleep(0.02)


async def test_kill_9_during_enqueues_and_drains_loses_nothing_and_charges_once(stack: Stack) -> None:
    rng = random.Random(9)
    acked: dict[str, str] = {}     # entry id → its unique prompt
    counter = 0
    startup: list[float] = []
    started = time.monotonic()
    for cycle in range(CYCLES):
        draining = cycle % 2 == 1
        stack.sysfs.set(temp_c=40.0 if draining else 95.0)  # hot: local_only queues; cool: it drains
        if draining:
            stack.relay.up = True
        else:
            stack.relay.cut()                                 # cut: cloud_only queues after one refused call
        t0 = time.monotonic()
        stack.start_agent()
        await serving(stack)
        startup.append(time.monotonic() - t0)
        async with stack.client() as c:
            if not draining:
                async def one(mode: str) -> None:
                    nonlocal counter
                    counter += 1
                    text = f"q-{counter}-end"
                    try:
                        r = await c.post("/v1/chat/completions", json=body(text, mode))
                    except httpx.TransportError:
                        return  # killed before answering: not acknowledged, nothing promised
                    if r.status_code == 202:
                        acked[r.json()["id"]] = text

                await one("cloud_only")  # the refused call that opens the breaker (queued after its failed try)
                burst = [asyncio.ensure_future(one(rng.choice(["local_only", "cloud_only"]))) for _ in range(24)]
                await asyncio.sleep(rng.uniform(0.01, 0.25))
                stack.kill_agent()
                await asyncio.gather(*burst)
            else:
                await drain_moving(c)
                await asyncio.sleep(rng.uniform(0.0, 0.6))
                stack.kill_agent()
    cycles_s = time.monotonic() - started
    print(f"{CYCLES} kill -9 cycles in {cycles_s:.1f}s (agent up in {sorted(startup)[len(startup) // 2]:.2f}s p50, "
          f"max {max(startup):.2f}s): {len(acked)} acknowledged")

    stack.sysfs.set(temp_c=40.0)
    stack.relay.up = True
    stack.start_agent()
    await serving(stack)
    async with stack.client() as c:
        async def left() -> int:
            listing = (await c.get("/v1/requests", params={"limit": 500, "state": "queued"})).json()["data"]
            running = (await c.get("/v1/requests", params={"limit": 500, "state": "running"})).json()["data"]
            return len(listing) + len(running)

        for _ in range(450):  # at most 90 s
            if not (n := await left()):
                break
            await asyncio.sleep(0.2)
        assert n == 0, f"{n} entries not drained"
        entries = {}
        after = 0
        while True:
            page = (await c.get("/v1/requests", params={"limit": 500, "after": after})).json()
            entries.update({e["id"]: e for e in page["data"]})
            if page["next_after"] is None:
                break
            after = page["next_after"]
    stack.kill_agent()
    assert len(acked) >= CYCLES, f"only {len(acked)} requests acknowledged in {CYCLES} cycles"
    assert set(acked) <= set(entries), f"lost: {sorted(set(acked) - set(entries))[:5]}"
    for rid, text in acked.items():
        e = entries[rid]
        assert e["state"] == "done", json.dumps(e)
        assert e["result"]["choices"][0]["message"]["content"] is not None
        if e["app"] == "app-cloud_only":
            assert e["route"] == "cloud" and text in e["result"]["choices"][0]["message"]["content"], e
    seen: dict[str, int] = {}
    for call in stack.fake.calls():
        for text in acked.values():
            if text in json.dumps(call.body):
                seen[text] = seen.get(text, 0) + 1
    assert max(seen.values(), default=0) <= 1, {t: n for t, n in seen.items() if n > 1}
    cloud = sum(1 for rid in acked if entries[rid]["app"] == "app-cloud_only")
    assert len(seen) == cloud
    print(f"{cloud} of them drained by the cloud, each charged once")


async def finished(c: httpx.AsyncClient, rid: str, within: float) -> dict[str, Any]:
    """Long-poll (`?wait=`) until the entry ends or `within` seconds pass; the entry as it is then."""
    end = time.monotonic() + within
    while True:
        left = end - time.monotonic()
        e: dict[str, Any] = (await c.get(f"/v1/requests/{rid}", params={"wait": max(0.1, left)})).json()
        if e["state"] not in ("queued", "running") or left <= 0:
            return e


async def test_gateway_away_queues_cloud_requests_and_they_drain_when_it_returns(stack: Stack) -> None:
    stack.sysfs.set(temp_c=95.0)  # the local model may not serve: prefer_local can only wait
    stack.relay.cut()
    stack.start_agent()
    await serving(stack)
    async with stack.client() as c:
        first = await c.post("/v1/chat/completions", json=body("away-0-end", "prefer_local"))
        # tried on the cloud, refused before answering: the router would now queue it, so it is queued
        assert (first.status_code, first.headers["x-nanofleet-route"]) == (202, "queue"), first.text
        ids = [first.json()["id"]]
        for i in range(1, 4):
            r = await c.post("/v1/chat/completions", json=body(f"away-{i}-end", "prefer_local"))
            assert (r.status_code, r.headers["x-nanofleet-route"]) == (202, "queue"), r.text
            assert r.headers["x-nanofleet-reason"].startswith("thermal_")  # the local block named first
            ids.append(r.json()["id"])
        r = await c.post("/v1/chat/completions", json=body("away-4-end", "cloud_only"))
        assert (r.status_code, r.headers["x-nanofleet-reason"]) == (202, "gateway_unreachable")
        ids.append(r.json()["id"])
        back = time.monotonic()
        stack.relay.up = True  # the breaker's next probe (within its 5 s cooldown) finds it back
        for rid in ids:
            e = await finished(c, rid, within=20)
            assert (e["state"], e["route"]) == ("done", "cloud"), e
        assert time.monotonic() - back < 15
    stack.kill_agent()


def upstream_calls(stack: Stack, text: str) -> int:
    """How many times Gemini was asked a prompt containing `text` (each is a charge)."""
    return sum(1 for call in stack.fake.calls() if text in json.dumps(call.body))


async def test_device_heats_local_only_queues_and_drains_locally_when_it_cools(stack: Stack) -> None:
    stack.sysfs.set(temp_c=95.0)
    stack.relay.up = True
    stack.start_agent()
    await serving(stack)
    async with stack.client() as c:
        ids = []
        for i in range(3):
            r = await c.post("/v1/chat/completions", json=body(f"heat-{i}-end", "local_only"))
            assert (r.status_code, r.headers["x-nanofleet-route"]) == (202, "queue"), r.text
            assert r.headers["x-nanofleet-reason"].startswith("thermal_"), r.headers
            ids.append(r.json()["id"])
        assert (await c.get("/v1/status")).json()["queue"]["depth"] >= 3
        cooled = time.monotonic()
        stack.sysfs.set(temp_c=40.0)  # the agent's sampler sees it within its 2 s period and kicks the drainer
        for rid in ids:
            e = await finished(c, rid, within=20)
            assert (e["state"], e["route"]) == ("done", "local"), e
            assert e["result"]["usage"]["completion_tokens"] >= 1
        assert time.monotonic() - cooled < 15
    stack.kill_agent()
    assert all(upstream_calls(stack, f"heat-{i}-end") == 0 for i in range(3))  # local_only never left the device


@contextlib.contextmanager
def small_disk(folder: Path) -> Iterator[tuple[Path, dict[str, Any], Any]]:
    """A data dir whose disk fills: a 320 KB tmpfs when this process may mount one (root), else a `queue.db` capped
    by `queue_max_file_bytes` (SQLite's max_page_count). Yields (data dir, settings to add, give_space())."""
    data = folder / "small-disk"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k,mode=0700", "tmpfs", str(data)],
                             capture_output=True, check=False).returncode == 0 if os.geteuid() == 0 else False
    extra: dict[str, Any] = {} if mounted else {"queue_max_file_bytes": 160 * 1024}

    def give_space() -> None:
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(data)], check=True, capture_output=True)
        else:
            extra.pop("queue_max_file_bytes")

    try:
        yield data, extra, give_space
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(data)], check=False, capture_output=True)


async def test_disk_full_is_a_507_other_routes_serve_and_nothing_acknowledged_is_lost(
        stack: Stack, tmp_path: Path) -> None:
    stack.sysfs.set(temp_c=40.0)
    stack.relay.cut()  # the cloud is away: cloud_only requests queue, the local model serves
    with small_disk(tmp_path) as (data, extra, give_space):
        config = tmp_path / "agent-small.yaml"
        config.write_text(yaml.safe_dump({**stack.config, "data_dir": str(data), **extra}))
        stack.start_agent(config)
        await serving(stack)
        acked: dict[str, str] = {}
        async with stack.client() as c:
            opening = await c.post("/v1/chat/completions", json=denied(body("full-0-end", "cloud_only")))
            assert opening.status_code == 503
            full = None
            for i in range(1, 400):
                text = f"full-{i}-end " + "x" * 4000
                r = await c.post("/v1/chat/completions", json=body(text, "cloud_only"))
                if r.status_code == 202:
                    acked[r.json()["id"]] = f"full-{i}-end"
                    continue
                full = r
                break
            assert full is not None, "the disk never filled"
            assert (full.status_code, full.json()["error"]["code"], full.headers["retry-after"]) == (
                507, "queue_disk_full", "60"), full.text
            assert len(acked) >= 3, len(acked)
            local = await c.post("/v1/chat/completions", json=body("full-local-end", "local_only"))
            assert (local.status_code, local.headers["x-nanofleet-route"]) == (200, "local"), local.text
            again = await c.post("/v1/chat/completions", json=body("full-again-end " + "y" * 4000, "cloud_only"))
            assert again.status_code == 507, again.text
            counters = (await c.get("/v1/status")).json()["queue"]["counters"]
            assert counters["disk_full"] >= 2, counters
        stack.kill_agent()
        give_space()
        config.write_text(yaml.safe_dump({**stack.config, "data_dir": str(data), **extra}))
        stack.relay.up = True
        stack.start_agent(config)
        await serving(stack)
        async with stack.client() as c:
            for rid, text in acked.items():
                e = await finished(c, rid, within=30)
                assert (e["state"], e["route"]) == ("done", "cloud"), e
                assert text in e["result"]["choices"][0]["message"]["content"]
            listed = (await c.get("/v1/requests", params={"limit": 500})).json()["data"]
            assert {e["id"] for e in listed} == set(acked)  # and nothing that got a 507 was queued after all
        stack.kill_agent()
    assert all(upstream_calls(stack, text) == 1 for text in acked.values())


async def test_restart_resumes_draining_and_reruns_the_running_entry_once(stack: Stack) -> None:
    from tests.gateway.fake_gemini import Reply

    stack.sysfs.set(temp_c=95.0)  # only the cloud may serve these
    stack.relay.cut()
    stack.start_agent()
    await serving(stack)
    texts: dict[str, str] = {}
    async with stack.client() as c:
        assert (await c.post("/v1/chat/completions", json=denied(body("rr-0-end", "cloud_only")))).status_code == 503
        for i in range(1, 5):
            r = await c.post("/v1/chat/completions", json=body(f"rr-{i}-end", "cloud_only"))
            assert r.status_code == 202, r.text
            texts[r.json()["id"]] = f"rr-{i}-end"
        before = len(stack.fake.calls())
        stack.fake.push(Reply(delay=4.0))  # the next upstream call hangs: its entry is `running` when we kill
        stack.relay.up = True  # the breaker's cooldown ends within 5 s: the drainer's first entry is the probe
        deadline = time.monotonic() + 15
        while len(stack.fake.calls()) == before:
            assert time.monotonic() < deadline, "no entry reached Gemini"
            await asyncio.sleep(0.01)
        slow_text = next(t for t in texts.values() if t in json.dumps(stack.fake.calls()[before].body))
        slow = next(rid for rid, t in texts.items() if t == slow_text)
        assert (await c.get(f"/v1/requests/{slow}")).json()["state"] == "running"
    stack.kill_agent()
    stack.start_agent()
    await serving(stack)
    async with stack.client() as c:
        for rid, text in texts.items():
            e = await finished(c, rid, within=30)
            assert (e["state"], e["route"]) == ("done", "cloud"), e
            assert text in e["result"]["choices"][0]["message"]["content"]
        e = (await c.get(f"/v1/requests/{slow}")).json()
        # run again after the crash, once: the cut attempt is counted in `restarts`, not against its attempts
        assert (e["restarts"], e["attempts"]) == (1, 1), e
    stack.kill_agent()
    assert {t: upstream_calls(stack, t) for t in texts.values()} == {t: 1 for t in texts.values()}
