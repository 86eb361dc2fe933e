"""Starting without an API key, health, graceful shutdown, and the `nanofleet gateway` CLI (in-process and as a real
process)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanofleet.cli import main
from nanofleet.controller.gateway.server import DETAIL_KEY, INFERENCE_SERVICE, UPSTREAM_SERVICE
from tests.conftest import free_port, wait_for

from .conftest import MakeGateway, request
from .fake_gemini import Reply, answer

NO_KEY = "upstream unavailable: GEMINI_API_KEY not set"


async def test_without_api_key_starts_and_reports_not_serving(make_gateway: MakeGateway,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nanofleet.gateway"):
        gw = await make_gateway(env={})
    assert any(NO_KEY in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    client = gw.client("dev-1")
    health = health_pb2_grpc.HealthStub(client.channel)
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    for service in (INFERENCE_SERVICE, UPSTREAM_SERVICE):
        call = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert (await call).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert dict(await call.trailing_metadata())[DETAIL_KEY] == NO_KEY
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await client.generate()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE and unavailable.value.details() == NO_KEY
    result = await asyncio.to_thread(CliRunner().invoke, main, ["gateway", "health", "--address",
                                                                 gw.gateway.address])
    assert result.exit_code == 1
    assert f"nanofleet.gateway.Upstream: NOT_SERVING — {NO_KEY}" in result.output
    assert "(server): SERVING" in result.output
    assert gw.fake.calls() == []


async def test_health_over_tls_serving(make_gateway: MakeGateway, tls) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(listen="localhost:0", tls_cert=tls.cert, tls_key=tls.key)
    result = await asyncio.to_thread(CliRunner().invoke, main, ["gateway", "health", "--address",
                                                                 gw.gateway.address, "--ca", str(tls.ca)])
    assert result.exit_code == 0, result.output
    assert "nanofleet.v1.Inference: SERVING — upstream gemini configured" in result.output


async def test_graceful_shutdown_lets_streams_finish(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    words = [answer(f"w{i} ", finish=None, output_tokens=1) for i in range(5)] + [answer("end", output_tokens=6)]
    gw.fake.push(Reply(chunks=words, chunk_delay=0.15))
    client = gw.client("dev-1")
    call = client.stub.GenerateStream(request("go"), metadata=client.metadata, timeout=10)
    got = [await call.read()]
    stopping = asyncio.create_task(gw.gateway.stop(grace=5))
    while (chunk := await call.read()) is not grpc.aio.EOF:
        got.append(chunk)
    await stopping
    assert "".join(c.text for c in got) == "w0 w1 w2 w3 w4 end"
    assert got[-1].finish_reason == "stop"
    assert await call.code() == grpc.StatusCode.OK


async def test_graceful_shutdown_is_bounded(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    slow = [answer(f"w{i} ", finish=None, output_tokens=1) for i in range(20)]
    gw.fake.push(Reply(chunks=slow, chunk_delay=0.5))
    client = gw.client("dev-1")
    call = client.stub.GenerateStream(request("go"), metadata=client.metadata, timeout=30)
    await call.read()
    started = time.monotonic()
    await gw.gateway.stop(grace=0.5)
    assert time.monotonic() - started < 3
    with pytest.raises(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            pass


def test_token_cli_issue_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: demo\n")
    data = str(tmp_path / "gw")
    issued = runner.invoke(main, ["gateway", "token", "issue", "pi-01", "--group", "kiosks", "--config", str(fleet),
                                  "--data-dir", data])
    assert issued.exit_code == 0, issued.output
    token = issued.output.strip()
    assert token.startswith("nft_") and len(token) > 40
    assert token not in (tmp_path / "gw" / "gateway.db").read_bytes().decode("latin-1")  # stored hashed
    assert oct((tmp_path / "gw" / "gateway.db").stat().st_mode & 0o777) == "0o600"
    listed = json.loads(runner.invoke(main, ["gateway", "token", "list", "--json", "--data-dir", data]).output)
    assert [(r["device_id"], r["fleet"], r["group"], r["revoked_ms"]) for r in listed] == [
        ("pi-01", "demo", "kiosks", None)]
    assert runner.invoke(main, ["gateway", "token", "revoke", "pi-01", "--data-dir", data]).exit_code == 0
    again = runner.invoke(main, ["gateway", "token", "revoke", "pi-01", "--data-dir", data])
    assert again.exit_code == 1 and "no active token" in again.output
    assert "revoked" in runner.invoke(main, ["gateway", "token", "list", "--data-dir", data]).output
    bad = runner.invoke(main, ["gateway", "token", "issue", "bad id!", "--fleet", "demo", "--data-dir", data])
    assert bad.exit_code == 1 and "device_id" in bad.output


def test_serve_as_a_process_without_key_then_sigterm(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: demo\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "nanofleet", "gateway", "serve", "--config", str(fleet),
                             "--data-dir", str(tmp_path / "gw"), "--listen", f"127.0.0.1:{port}", "--grace", "1"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        runner = CliRunner()

        def healthy() -> str | None:
            result = runner.invoke(main, ["gateway", "health", "--address", f"127.0.0.1:{port}", "--timeout", "1"])
            return result.output if "NOT_SERVING" in result.output else None

        output = wait_for(healthy, timeout=20, what="gateway process answering health")
        assert NO_KEY in str(output)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert NO_KEY in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
