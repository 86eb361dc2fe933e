"""An agent with two real gateway processes (`nanofleet gateway serve`, each with its own fake Gemini so the test
sees which one served): kill -9 one under a stream of requests — every request is answered (the calls in flight
on the dead one are sent again to the live one, or fall back per the agent's cloud-failure rules), new calls move
to the live gateway at once, and come back to both after it restarts."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nanofleet.agent.runtime.grpc_backend import GatewayUnreachable, GrpcBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.tcp import free_port
from tests.conftest import until
from tests.e2e.cloud_procs import Proc, gateway_proc, write_fleet
from tests.gateway.conftest import Tls, tls  # noqa: F401 - the throwaway CA and server certificate
from tests.gateway.fake_gemini import FakeGemini, Reply

BODY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "nanofleet": {"mode": "prefer_cloud"}}


def _gateways(tmp_path: Path, fakes: list[FakeGemini]) -> tuple[list[Proc], list[str], str]:
    """Two gateway processes sharing one device token (the same tokens table copied into each data folder)."""
    token = issue_token(tmp_path / "g0" / "data" / "gateway.db", "dev-test", "e2e")
    (tmp_path / "g1" / "data").mkdir(parents=True, mode=0o700)
    shutil.copy(tmp_path / "g0" / "data" / "gateway.db", tmp_path / "g1" / "data" / "gateway.db")
    procs, addresses = [], []
    for i, fake in enumerate(fakes):
        port = free_port()
        fleet = write_fleet(tmp_path / f"g{i}" / "fleet.yaml", fake.base_url, f"127.0.0.1:{port}")
        procs.append(gateway_proc(tmp_path / f"g{i}", fleet, tmp_path / f"g{i}" / "data", port, "test-key"))
        addresses.append(f"127.0.0.1:{port}")
    return procs, addresses, token


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_kill_one_of_two_gateways_under_load(tmp_path: Path, make_settings: Callable[..., AgentSettings],
                                                   stream: bool) -> None:
    fakes = [FakeGemini(), FakeGemini()]
    procs, addresses, token = _gateways(tmp_path, fakes)
    svc: AgentService | None = None
    try:
        await asyncio.gather(*(asyncio.to_thread(lambda p=p: p.start().wait_ready()) for p in procs))
        svc = AgentService(make_settings(fleet="e2e", gateway_addresses=addresses, gateway_token=token),
                           warmup=False)
        cloud = svc.dispatcher.cloud
        assert isinstance(cloud, GrpcBackend) and cloud.target == "ipv4:" + ",".join(addresses)
        answers: list[tuple[float, int, str, str]] = []  # (time, status, route, reason)
        cut: list[tuple[float, str]] = []  # (start, text) of streams that ended in an error event
        stop = asyncio.Event()

        async def worker(c: httpx.AsyncClient) -> None:
            while not stop.is_set():
                started = time.monotonic()
                r = await c.post("/v1/chat/completions", json={**BODY, "stream": stream})
                if stream and not (r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text):
                    cut.append((started, r.text))  # judged below: only a stream the kill cut mid-way may end so
                answers.append((time.monotonic(), r.status_code, r.headers.get("x-nanofleet-route", ""),
                                r.headers.get("x-nanofleet-reason", "")))

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a",
                                     timeout=30) as c:
            workers = [asyncio.create_task(worker(c)) for _ in range(4)]
            for task in workers:
                task.add_done_callback(lambda _: stop.set())  # a worker that fails stops the others
            try:
                await until(lambda: all(len(f.calls()) >= 5 for f in fakes), 20, "calls on both gateways")
                # calls in flight on gateway 0 when it dies: its fake holds the next ones for a while
                fakes[0].push(*[Reply(delay=2.0) for _ in range(4)])
                await until(lambda: len(fakes[0].script) < 4, 10, "a call held on gateway 0")
                assert procs[0].proc is not None
                procs[0].proc.kill()  # kill -9
                killed = time.monotonic()
                procs[0].proc.wait(10)
                # what the dead gateway sent before it died has landed a second later; nothing may follow it
                await until(lambda: time.monotonic() > killed + 1.0, 5, "a second after the kill")
                seen0 = len(fakes[0].calls())
                seen1 = len(fakes[1].calls())
                await until(lambda: stop.is_set() or (len(fakes[1].calls()) >= seen1 + 40
                                                      and time.monotonic() > killed + 4), 20,
                            "the live gateway serving alone for 4 s")
                assert not stop.is_set(), [w.exception() for w in workers if w.done()]  # a worker died: say why
                assert len(fakes[0].calls()) == seen0  # nothing reached the dead one's upstream
                assert cloud.failovers >= 1  # the call cut on gateway 0 went again, to gateway 1
                gap = [a for a in answers if a[0] > killed]
                assert all(status == 200 for _, status, _, _ in gap), gap
                late = [a for a in gap if a[0] > killed + 3.0]
                assert late and all(route == "cloud" for _, _, route, _ in late), late[:5]
                in_gap = sum(route != "cloud" for t, _, route, _ in gap if t <= killed + 3.0)

                await asyncio.to_thread(lambda: procs[0].start().wait_ready())
                seen0 = len(fakes[0].calls())
                await until(lambda: len(fakes[0].calls()) >= seen0 + 5, 20, "calls back on the restarted gateway")
            finally:
                stop.set()
                outcomes = await asyncio.gather(*workers, return_exceptions=True)
        assert not [o for o in outcomes if o is not None], outcomes
        # a stream cut before its first token went again; one cut after it (tokens already with the app) ends in an
        # error event: only a stream that had started before the kill (under load one may be mid-way then)
        assert all(started < killed for started, _ in cut), cut
        assert all(status == 200 for _, status, _, _ in answers), [a for a in answers if a[1] != 200][:5]
        failed_cloud = [a for a in answers if a[2] != "cloud"]
        # every one of these was still answered (locally, reason fallback_…): the cloud-failure rules, nothing lost
        assert all(reason.startswith("fallback_") for _, _, _, reason in failed_cloud), failed_cloud
        print(f"answers={len(answers)} local_fallbacks_in_gap={in_gap} failovers={cloud.failovers}")
    finally:
        if svc is not None:
            await svc.stop()
        for p in procs:
            p.stop()
        for f in fakes:
            f.close()


async def test_gateway_tls_name_verifies_every_gateway(tmp_path: Path, tls: Tls) -> None:  # noqa: F811
    """Two TLS gateways behind an IP list: the certificate is checked against `tls_name`, not the list."""
    from nanofleet.agent.runtime.base import ChatRequest
    from nanofleet.config import parse_fleet
    from nanofleet.controller.gateway.server import Gateway

    fake = FakeGemini()
    fleet = parse_fleet("fleet: test\ngateway:\n  listen: 127.0.0.1:0\n  upstream: {kind: gemini, base_url: "
                        f'"{fake.base_url}", thinking_budget: 0}}\n')
    gws = [Gateway(fleet, tmp_path / f"gw{i}", env={"GEMINI_API_KEY": "k"}, tls_cert=tls.cert, tls_key=tls.key)
           for i in range(2)]
    token = issue_token(gws[0].db_path, "dev-1", "test")
    gws[1].data_dir.mkdir(mode=0o700)
    shutil.copy(gws[0].db_path, gws[1].db_path)  # the token known to both
    try:
        for gw in gws:
            await gw.start()
        req = ChatRequest([{"role": "user", "content": "hi"}], max_tokens=5)
        addresses = [gw.address for gw in gws]
        async with GrpcBackend(addresses, token=token, ca=tls.ca, tls_name="localhost", timeout=10) as b:
            answers = [await b.generate(req) for _ in range(4)]
            assert all(a.text.startswith("echo") for a in answers)
        async with GrpcBackend(addresses, token=token, ca=tls.ca, timeout=3, cooldown=0.01) as b:
            with pytest.raises(GatewayUnreachable):  # without the name, the list itself is the authority
                await b.generate(req)
            assert b.state == "unreachable" and "Hostname Verification" in b.why
    finally:
        for gw in gws:
            await gw.stop(grace=0.5)
        fake.close()
