"""The offline queue through the real unix socket: a hot device queues `local_only` requests (202 after commit,
Location, route headers), Idempotency-Key, 409/404/400 answers, cancel, list; it cools and they drain locally —
the result is the completion the synchronous call would have returned. Entries are per peer uid (SO_PEERCRED)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent.conftest import CHAT, uds_client
from tests.conftest import until
from tests.telemetry.fake_sysfs import FakeSysfs

LOCAL_ONLY = {**CHAT, "nanofleet": {"mode": "local_only", "app": "com.example.notes"}}


async def test_queued_round_trip_hot_then_cool(make_settings: Callable[..., AgentSettings], tmp_path: Path) -> None:
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.set(temp_c=95.0)
    svc = AgentService(make_settings(sysfs_root=sysfs.root), warmup=False)
    await svc.start()
    try:
        async with uds_client(svc.settings.socket_path) as c:
            r = await c.post("/v1/chat/completions", json=LOCAL_ONLY, headers={"Idempotency-Key": "note-1"})
            assert r.status_code == 202, r.text
            rid = r.json()["id"]
            assert r.headers["location"] == f"/v1/requests/{rid}" and r.headers["x-nanofleet-route"] == "queue"
            assert r.headers["x-nanofleet-reason"].startswith("thermal_") and r.json()["state"] == "queued"
            again = await c.post("/v1/chat/completions", json=LOCAL_ONLY, headers={"Idempotency-Key": "note-1"})
            assert (again.status_code, again.json()["id"]) == (202, rid)
            other = {**LOCAL_ONLY, "messages": [{"role": "user", "content": "another"}]}
            clash = await c.post("/v1/chat/completions", json=other, headers={"Idempotency-Key": "note-1"})
            assert (clash.status_code, clash.json()["error"]["code"]) == (409, "idempotency_conflict")
            bad = await c.post("/v1/chat/completions", json=other, headers={"Idempotency-Key": "a b"})
            assert (bad.status_code, bad.json()["error"]["param"]) == (400, "Idempotency-Key")
            streamed = await c.post("/v1/chat/completions", json={**LOCAL_ONLY, "stream": True})
            assert streamed.status_code == 202  # answered later, as a whole completion
            gone = (await c.post("/v1/chat/completions", json=other)).json()["id"]
            assert (await c.delete(f"/v1/requests/{gone}")).json()["state"] == "cancelled"
            r = await c.delete(f"/v1/requests/{gone}")
            assert (r.status_code, r.json()["error"]["code"]) == (409, "not_cancellable")
            r = await c.get("/v1/requests/req_nothing")
            assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
            r = await c.get(f"/v1/requests/{rid}", params={"wait": "soon"})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "wait")
            entry = (await c.get(f"/v1/requests/{rid}")).json()
            assert (entry["state"], entry["attempts"], entry["app"]) == ("queued", 0, "com.example.notes")
            page = (await c.get("/v1/requests", params={"state": "queued"})).json()
            assert [e["id"] for e in page["data"]] == [rid, streamed.json()["id"]]
            st = svc.queue.status()
            assert st["available"] and st["depth"] == 2 and st["counters"]["enqueued"] == 3
            assert svc.agent_metrics().queue_depth == 2 and svc.agent_metrics().slots_waiting == 0
            status = (await c.get("/v1/status")).json()  # the queue as /v1/status shows it, apart from slots
            assert status["routes"]["queue"]["available"] is True and status["slots_waiting"] == 0
            q = status["queue"]
            assert (q["depth"], q["counters"]["enqueued"], q["counters"]["cancelled"]) == (2, 3, 1), q
            assert q["oldest_age_s"] >= 0 and q["bytes"] > 0 and q["limits"]["max_items"] == 10_000
            assert "queue_depth" not in status

            sysfs.set(temp_c=40.0)  # it cools: the sampler sees it, kicks the drainer
            seen = []
            for _ in range(30):  # each long-poll returns at a change of state (queued → running → done)
                done = (await c.get(f"/v1/requests/{rid}", params={"wait": 30}, timeout=40)).json()
                seen.append((done["state"], done["reason"], done["attempts"]))
                if done["state"] not in ("queued", "running"):
                    break
            assert (done["state"], done["route"]) == ("done", "local"), (seen, done, svc.drainer.counts)
            assert done["result"]["object"] == "chat.completion" and done["result"]["choices"][0]["message"]
            assert done["result"]["usage"]["completion_tokens"] >= 1
            for _ in range(30):  # (the depth counter drops inside the commit: read the entry's own state)
                s = (await c.get(f"/v1/requests/{streamed.json()['id']}", params={"wait": 30}, timeout=40)).json()
                if s["state"] not in ("queued", "running"):
                    break
            assert s["state"] == "done" and s["result"]["object"] == "chat.completion", s
            assert svc.queue.depth == 0
            m = svc.agent_metrics()
            assert m.queue_counters["drained_local"] == 2 and m.route_counts["queued"] == 3
    finally:
        await svc.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_protocol", "stock_protocol"])
async def test_another_uid_sees_only_its_own_entries(make_settings: Callable[..., AgentSettings],
                                                     tmp_path: Path, fast_path: bool) -> None:
    """On the fast protocol and on uvicorn's stock one (`http_fast_path: false`) alike."""
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.set(temp_c=95.0)
    run_dir = Path(tempfile.mkdtemp(prefix="nf-queue-"))  # pytest's tmp is root-only: the other user needs a path
    svc = AgentService(make_settings(sysfs_root=sysfs.root, socket_path=run_dir / "a.sock",
                                     http_fast_path=fast_path), warmup=False)
    await svc.start()
    try:
        sock = svc.settings.socket_path
        os.chmod(run_dir, 0o755)
        os.chmod(sock, 0o666)
        async with uds_client(sock) as c:
            root_id = (await c.post("/v1/chat/completions", json=LOCAL_ONLY)).json()["id"]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child becomes another user, then talks to the agent (no exec: the venv is root's)
            code = 1
            try:
                os.close(r)
                os.setgid(65534)
                os.setuid(65534)
                os.write(w, json.dumps(_as_other_user(str(sock), root_id)).encode())
                code = 0
            except BaseException as exc:  # noqa: BLE001 - the child reports to the parent, which fails the test
                os.write(w, repr(exc).encode())
            finally:
                os._exit(code)
        os.close(w)
        raw = await asyncio.to_thread(_read_all, r)
        _, status = await asyncio.to_thread(os.waitpid, pid, 0)
        assert status == 0, raw
        posted, own, peek, cancel, listed, their_id = json.loads(raw)
        assert (posted, own, peek, cancel, listed) == (202, 200, 404, 404, [their_id])
        async with uds_client(sock) as c:  # root sees both
            ids = {e["id"] for e in (await c.get("/v1/requests")).json()["data"]}
            assert ids == {root_id, their_id}
    finally:
        await svc.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_a_unix_peer_that_cannot_be_known_is_refused_not_shared(
        make_settings: Callable[..., AgentSettings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A uvicorn whose internals moved: neither the fast protocol nor the stock one with peer credentials can be
    used, so no request carries its peer's uid. Queueing and /v1/requests then fail closed (503, `peer_unknown`)
    rather than give every local user one shared owner; routes that need no owner still serve."""
    from nanofleet.agent.api import fastpath

    monkeypatch.setattr(fastpath, "_MODULE", "uvicorn.protocols.http.moved_away")
    assert fastpath.choose_http_protocol(True) == "httptools"
    sysfs = FakeSysfs(tmp_path / "sys")
    sysfs.set(temp_c=95.0)
    svc = AgentService(make_settings(sysfs_root=sysfs.root), warmup=False)
    await svc.start()
    try:
        async with uds_client(svc.settings.socket_path) as c:
            for r in (await c.post("/v1/chat/completions", json=LOCAL_ONLY), await c.get("/v1/requests"),
                      await c.get("/v1/requests/req_x"), await c.delete("/v1/requests/req_x")):
                assert (r.status_code, r.json()["error"]["code"], r.headers["x-nanofleet-reason"]) == (
                    503, "queue_unavailable", "peer_unknown"), r.text
            assert svc.queue.depth == 0 and svc.queue.counts["peer_unknown"] == 4
            sysfs.set(temp_c=40.0)
            await until(lambda: svc._device.thermal_level == 0, within=15, what="the device to cool")
            r = await c.post("/v1/chat/completions", json=LOCAL_ONLY)
            assert (r.status_code, r.headers["x-nanofleet-route"]) == (200, "local"), r.text
    finally:
        await svc.stop()


async def test_without_a_socket_peer_the_asgi_path_is_one_owner(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"mode": "cloud_only"}})
    assert r.status_code == 403  # no gateway: no route ever; nothing queued
    r = await asgi.get("/v1/requests", params={"state": "sleeping"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "state")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("agent", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def _call(path: str, method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    conn = _UnixHTTP(path)
    conn.request(method, url, json.dumps(body) if body is not None else None, {"content-type": "application/json"})
    resp = conn.getresponse()
    out = (resp.status, json.loads(resp.read() or b"{}"))
    conn.close()
    return out


def _as_other_user(sock: str, root_id: str) -> list:
    posted, body = _call(sock, "POST", "/v1/chat/completions", LOCAL_ONLY)
    mine = body["id"]
    listed = [e["id"] for e in _call(sock, "GET", "/v1/requests")[1]["data"]]
    return [posted, _call(sock, "GET", f"/v1/requests/{mine}")[0], _call(sock, "GET", f"/v1/requests/{root_id}")[0],
            _call(sock, "DELETE", f"/v1/requests/{root_id}")[0], listed, mine]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
