"""The gateway's cost: gateway + fake Gemini vs the fake Gemini called directly, side by side in one run.

Three processes, as in production: the fake Gemini (tests/gateway/fake_gemini.py, a real HTTP server), the gateway
(`nanofleet gateway serve`), and this one, which drives both paths with the same google-genai code the gateway uses
for the direct path and a grpc.aio device client for the gateway path (device token, request_id, usage accounting
on). Latency samples are interleaved; throughput runs each path for a fixed time at 1, 8 and 64 concurrent clients.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from bench.stats import percentile
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.upstreams.base import Message, UpstreamRequest
from nanofleet.controller.gateway.upstreams.gemini import GeminiUpstream
from nanofleet.protos import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 300
THROUGHPUT_S = 3.0
CONCURRENCY = (1, 8, 64)
FAKE = ("from tests.gateway.fake_gemini import FakeGemini\nimport sys, time\nf = FakeGemini()\n"
        "print(f.base_url, flush=True)\nsys.stdin.read()\n")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_ready(channel: grpc.aio.Channel) -> None:
    async with asyncio.timeout(20):
        await channel.channel_ready()


class _Paths:
    def __init__(self, base_url: str, address: str, token: str) -> None:
        self.direct = GeminiUpstream("bench-key", base_url=base_url)
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.req = UpstreamRequest(model="gemini-2.5-flash", messages=(Message("user", "two words"),),
                                   thinking_budget=0)

    def _grpc_req(self) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(request_id=uuid.uuid4().hex, app_id="bench",
                                             messages=[inference_pb2.ChatMessage(role="user", content="two words")])

    async def direct_unary(self) -> None:
        await self.direct.generate(self.req)

    async def gateway_unary(self) -> None:
        await self.stub.Generate(self._grpc_req(), metadata=self.metadata, timeout=10)

    async def direct_first_chunk(self) -> float:
        t0 = time.perf_counter()
        chunks = self.direct.stream(self.req)
        await anext(chunks)
        first = time.perf_counter() - t0
        async for _ in chunks:
            pass
        return first

    async def gateway_first_chunk(self) -> float:
        t0 = time.perf_counter()
        call = self.stub.GenerateStream(self._grpc_req(), metadata=self.metadata, timeout=10)
        await call.read()
        first = time.perf_counter() - t0
        while await call.read() is not grpc.aio.EOF:
            pass
        return first

    async def close(self) -> None:
        await self.direct.close()
        await self.channel.close()


async def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def _throughput(fn: Any, clients: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await fn()
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.monotonic() - t0)


async def _measure(paths: _Paths) -> dict[str, Any]:
    for _ in range(20):  # warm connections on both paths
        await paths.direct_unary()
        await paths.gateway_unary()
    unary: dict[str, list[float]] = {"direct": [], "gateway": []}
    first: dict[str, list[float]] = {"direct": [], "gateway": []}
    for _ in range(SAMPLES):
        unary["direct"].append(await _timed(paths.direct_unary))
        unary["gateway"].append(await _timed(paths.gateway_unary))
        first["direct"].append(await paths.direct_first_chunk())
        first["gateway"].append(await paths.gateway_first_chunk())
    figures: dict[str, Any] = {}
    for kind, samples in (("unary", unary), ("first_chunk", first)):
        for q in (50, 95):
            d, g = percentile(samples["direct"], q) * 1000, percentile(samples["gateway"], q) * 1000
            figures[f"{kind}_direct_p{q}_ms"] = round(d, 3)
            figures[f"{kind}_gateway_p{q}_ms"] = round(g, 3)
            figures[f"{kind}_added_p{q}_ms"] = round(g - d, 3)
    for clients in CONCURRENCY:
        d = await _throughput(paths.direct_unary, clients, THROUGHPUT_S)
        g = await _throughput(paths.gateway_unary, clients, THROUGHPUT_S)
        figures[f"direct_cps_c{clients}"] = round(d, 1)
        figures[f"gateway_cps_c{clients}"] = round(g, 1)
        figures[f"gateway_to_direct_c{clients}"] = round(g / d, 3)
    return figures


def run() -> dict[str, Any]:
    env = {**os.environ, "GEMINI_API_KEY": "bench-key", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        fake = subprocess.Popen([sys.executable, "-c", FAKE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        gateway = None
        try:
            assert fake.stdout is not None
            base_url = fake.stdout.readline().strip()
            port = _free_port()
            fleet = Path(tmp) / "fleet.yaml"
            fleet.write_text(
                "fleet: bench\ngateway:\n  upstream: {kind: gemini, model: gemini-2.5-flash, thinking_budget: 0, "
                f'base_url: "{base_url}"}}\n'
                "defaults: {routing: {cloud_budget: {tokens_per_day: 1000000000}}}\n")
            token = issue_token(Path(tmp) / "gw" / "gateway.db", "bench-device", "bench")
            gateway = subprocess.Popen([sys.executable, "-m", "nanofleet", "gateway", "serve", "--config", str(fleet),
                                        "--data-dir", str(Path(tmp) / "gw"), "--listen", f"127.0.0.1:{port}"],
                                       cwd=ROOT, env=env, stderr=subprocess.DEVNULL)

            async def main() -> dict[str, Any]:
                paths = _Paths(base_url, f"127.0.0.1:{port}", token)
                try:
                    await _wait_ready(paths.channel)
                    return await _measure(paths)
                finally:
                    await paths.close()

            figures = asyncio.run(main())
        finally:
            for proc in (gateway, fake):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if fake.stdin:
                fake.stdin.close()
            if fake.stdout:
                fake.stdout.close()
    return {"name": "gateway", "figures": figures, "markdown": _markdown(figures)}


def _markdown(f: dict[str, Any]) -> str:
    lines = [
        "Gateway (grpc.aio, device token, policy, budget, request_id, usage row per call) in front of a fake Gemini "
        "(HTTP on loopback, own process) vs the same google-genai call straight to the fake. "
        f"{SAMPLES} interleaved samples; throughput {THROUGHPUT_S:.0f} s per path and concurrency.",
        "",
        "| latency | direct p50 | gateway p50 | added p50 | direct p95 | gateway p95 | added p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, label in (("unary", "unary Generate"), ("first_chunk", "first streamed chunk")):
        lines.append(f"| {label} | {f[f'{kind}_direct_p50_ms']} ms | {f[f'{kind}_gateway_p50_ms']} ms | "
                     f"**{f[f'{kind}_added_p50_ms']} ms** | {f[f'{kind}_direct_p95_ms']} ms | "
                     f"{f[f'{kind}_gateway_p95_ms']} ms | **{f[f'{kind}_added_p95_ms']} ms** |")
    lines += ["", "| concurrent clients | direct calls/s | via gateway calls/s | gateway / direct |",
              "|---|---|---|---|"]
    for c in CONCURRENCY:
        lines.append(f"| {c} | {f[f'direct_cps_c{c}']} | {f[f'gateway_cps_c{c}']} | {f[f'gateway_to_direct_c{c}']} |")
    lines += ["", "Both client paths run in this one process: on the direct path it also does google-genai's work "
              "(request building, pydantic parsing), which on the gateway path happens in the gateway's process — "
              "so at high concurrency the direct path can be the slower one on a small machine."]
    return "\n".join(lines)
