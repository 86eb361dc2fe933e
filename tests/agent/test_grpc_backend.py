"""GrpcBackend (the local bridge and the cloud route) against a real gRPC Inference server wrapping llama.cpp."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest

from nanofleet.agent.runtime.base import BackendTimeout, ChatRequest, Refused
from nanofleet.agent.runtime.grpc_backend import GatewayRefused, GatewayUnreachable, GrpcBackend
from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.agent.service import AgentService
from tests.agent import inference_server
from tests.agent.conftest import CHAT
from tests.conftest import free_port

HI = ChatRequest([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], max_tokens=5)


@pytest.fixture
async def bridge(llama: LlamaBackend) -> AsyncIterator[tuple[inference_server.Servicer, int]]:
    servicer = inference_server.Servicer(llama, token="tok-1")
    server, port = await inference_server.start(servicer)
    yield servicer, port
    await server.stop(None)


async def test_generate_stream_count_with_bearer_token(bridge, llama: LlamaBackend) -> None:
    servicer, port = bridge
    async with GrpcBackend(f"127.0.0.1:{port}", token="tok-1", timeout=10, name="bridge") as b:
        c = await b.generate(HI)
        assert c.usage.completion_tokens == 5 and c.model == "bridge-tiny" and c.finish_reason == "length"
        chunks = [ch async for ch in b.stream(HI)]
        assert "".join(ch.text for ch in chunks) and chunks[-1].usage.completion_tokens == 5
        assert await b.count_tokens(HI.messages) == await llama.count_tokens(HI.messages)
    assert servicer.seen_metadata[0]["authorization"] == "Bearer tok-1"


async def test_wrong_token_is_refused(bridge) -> None:
    _, port = bridge
    async with GrpcBackend(f"127.0.0.1:{port}", token="wrong", timeout=10) as b:
        with pytest.raises(Refused, match="device token"):
            await b.generate(HI)
        # refused, not unreachable: calls pause (a revoked token stays refused) until a probe after the cooldown
        assert b.state == "refused" and "device token" in b.why and b.circuit_open
        with pytest.raises(GatewayRefused, match="refused this device"):
            await b.generate(HI)


async def test_deadline_on_every_call(llama: LlamaBackend) -> None:
    server, port = await inference_server.start(inference_server.Servicer(llama, delay=5))
    try:
        async with GrpcBackend(f"127.0.0.1:{port}", timeout=0.2, cooldown=0.0) as b:  # each call probes again
            with pytest.raises(BackendTimeout, match="deadline"):
                await b.generate(HI)
            with pytest.raises(BackendTimeout):
                await b.count_tokens(HI.messages)
    finally:
        await server.stop(None)


async def test_unreachable_opens_the_circuit() -> None:
    async with GrpcBackend(f"127.0.0.1:{free_port()}", timeout=2, failure_threshold=2, cooldown=30) as b:
        with pytest.raises(GatewayUnreachable, match="unavailable"):
            await b.generate(HI)
        assert b.reachable  # one failure of two allowed
        with pytest.raises(GatewayUnreachable) as caught:
            await b.generate(HI)
        assert not b.reachable and b.circuit_open and 29 < b.retry_in <= 30
        assert caught.value.code == "cloud_unavailable" and caught.value.status == 503
        assert caught.value.retry_after is not None and caught.value.retry_after > 29
        with pytest.raises(GatewayUnreachable, match="calls paused"):  # no call is sent while open
            await b.generate(HI)


async def test_tls_with_a_private_ca(llama: LlamaBackend, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "ca.pem").write_bytes(pem)
    creds = grpc.ssl_server_credentials([(key_pem, pem)])
    server, port = await inference_server.start(inference_server.Servicer(llama, token="t"), creds)
    try:
        async with GrpcBackend(f"localhost:{port}", token="t", ca=tmp_path / "ca.pem", timeout=10) as b:
            assert (await b.generate(HI)).usage.completion_tokens == 5
    finally:
        await server.stop(None)


async def test_agent_routes_to_the_gateway_and_falls_back(bridge, make_settings) -> None:
    servicer, port = bridge
    settings = make_settings(gateway_address=f"127.0.0.1:{port}", gateway_token="tok-1")
    free = {"bytes": 64 << 30}
    svc = AgentService(settings, warmup=False, free_ram=lambda: free["bytes"])
    assert isinstance(svc.dispatcher.cloud, GrpcBackend)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"mode": "cloud_only"}})
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud", "cloud_only")
        assert r.json()["model"] == "bridge-tiny"
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True},
                         headers={"X-Nanofleet-Mode": "prefer_cloud"})
        assert r.headers["x-nanofleet-route"] == "cloud" and r.text.endswith("data: [DONE]\n\n")
        calls = servicer.calls
        r = await c.post("/v1/chat/completions", json=CHAT, headers={"X-Nanofleet-Privacy": "sensitive",
                                                                    "X-Nanofleet-Mode": "cloud_only"})
        assert r.status_code == 403 and r.headers["x-nanofleet-reason"] == "sensitive"
        assert r.json()["error"]["code"] == "route_forbidden" and "retry-after" not in r.headers
        assert servicer.calls == calls  # never sent
        free["bytes"] = 1 << 20  # the local model cannot load: prefer_local falls back to the cloud
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud",
                                                                                     "fallback_insufficient_ram")
        status = (await c.get("/v1/status")).json()
        assert status["routes"]["cloud"]["configured"] and status["routes"]["cloud"]["reachable"]
        assert status["route_counts"]["cloud"] == 3
    await svc.stop()


async def test_stream_falls_back_before_the_first_token_never_after(llama: LlamaBackend, make_settings) -> None:
    servicer = inference_server.Servicer(llama, fail_after=0)
    server, port = await inference_server.start(servicer)
    cloud = GrpcBackend(f"127.0.0.1:{port}", timeout=10, cooldown=0.0)  # retry the cloud at once after a failure
    svc = AgentService(make_settings(), warmup=False, cloud=cloud)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
            body = {**CHAT, "stream": True, "nanofleet": {"mode": "prefer_cloud"}}
            r = await c.post("/v1/chat/completions", json=body)  # the cloud fails before any token: local serves
            assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (
                "local", "fallback_cloud_unavailable")
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
            await svc.models.unload()
            servicer.fail_after = 2  # now the cloud fails after two tokens: no fallback, an error event instead
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "cloud"
            events = [e for e in r.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and '"error"' in events[-2] and "mid-stream" in events[-2]
            assert sum('"content"' in e for e in events) == 2
            assert not svc.models.loaded  # the local model was never asked
    finally:
        await svc.stop()
        await server.stop(None)
