"""The local route served by a local Inference bridge (agent.yaml `local_bridge`): a real gRPC Inference server
wrapping the tiny llama.cpp model, as an Android companion or a Jetson's llama.cpp bridge would expose, reached over
the agent's real unix socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanofleet.agent.runtime.grpc_backend import GrpcBackend
from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings, load_agent_settings
from nanofleet.config import ConfigError
from tests.agent import inference_server
from tests.agent.conftest import CHAT, sse_events, uds_client

LOCAL_ONLY = {**CHAT, "nanofleet": {"mode": "local_only", "queue": "deny"}}  # a 503 now, not the queue


async def until(check: Callable[[], Awaitable[Any]], within: float = 10.0, what: str = "") -> Any:
    """Await `check()` until it is truthy; fail naming `what` after `within` seconds (the loop keeps running)."""
    deadline = time.monotonic() + within
    while not (value := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


@pytest.fixture
def bridge_settings(tmp_path: Path) -> Callable[..., AgentSettings]:
    def make(bridge: Any, **overrides: Any) -> AgentSettings:
        # a model file that does not exist: with a bridge nothing is loaded, downloaded or RAM-checked
        return AgentSettings.model_validate({
            "device_id": "dev-bridge", "data_dir": tmp_path / "data", "socket_path": tmp_path / "run" / "a.sock",
            "broker_url": None, "model": {"source": f"file:{tmp_path / 'absent.gguf'}", "n_ctx": 512},
            "local_bridge": bridge, **overrides})

    return make


async def status(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get("/v1/status")
    assert r.status_code == 200
    return r.json()


# -- settings --------------------------------------------------------------------------------------------------------

def test_bridge_setting_forms_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = AgentSettings(device_id="d", local_bridge="unix:/run/bridge.sock")
    assert s.local_bridge is not None and s.local_bridge.address == "unix:/run/bridge.sock"
    s = AgentSettings(device_id="d", local_bridge={"address": "[::1]:7000", "token": "t", "timeout": 3})
    assert s.local_bridge is not None and (s.local_bridge.token, s.local_bridge.timeout) == ("t", 3)
    assert AgentSettings(device_id="d").local_bridge is None
    f = tmp_path / "agent.yaml"
    for bad, words in [("10.1.2.3:50051", "not loopback"), ("bridge", "host:port"), ("unix:", "unix:/path"),
                       ("127.0.0.1:0", "host:port")]:
        f.write_text(f"device_id: d\nlocal_bridge: {{address: '{bad}'}}\n")
        with pytest.raises(ConfigError, match=rf"local_bridge\.address: .*{words}"):
            load_agent_settings(f)
    f.write_text("device_id: d\nlocal_bridge: {address: 'unix:/x.sock', port: 1}\n")
    with pytest.raises(ConfigError, match=r"local_bridge\.port"):
        load_agent_settings(f)
    f.write_text("device_id: d\nmodel: {threads: 0}\n")
    with pytest.raises(ConfigError, match=r"model\.threads"):
        load_agent_settings(f)
    monkeypatch.setenv("NANOFLEET_LOCAL_BRIDGE", "127.0.0.1:7001")
    f.write_text("device_id: d\nmodel: {threads: 1}\n")
    s = load_agent_settings(f)
    assert s.local_bridge is not None and s.local_bridge.address == "127.0.0.1:7001" and s.model.threads == 1


# -- the bridge as the local route -----------------------------------------------------------------------------------

async def test_bridge_serves_the_local_route_goes_down_and_comes_back(
        llama: LlamaBackend, bridge_settings: Callable[..., AgentSettings]) -> None:
    servicer = inference_server.Servicer(llama, token="tok-b")
    server, port = await inference_server.start(servicer)
    settings = bridge_settings({"address": f"127.0.0.1:{port}", "token": "tok-b", "timeout": 10, "cooldown": 0.5})
    svc = AgentService(settings)
    await svc.start()
    try:
        async with uds_client(settings.socket_path) as client:
            before = await status(client)
            assert before["model"]["availability"] == "available" and before["model"]["reason"] == ""
            assert before["local_bridge"]["address"] == f"127.0.0.1:{port}"

            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            assert r.headers["x-nanofleet-route"] == "local" and r.json()["model"] == "bridge-tiny"
            assert r.json()["usage"]["completion_tokens"] == 8
            assert servicer.seen_metadata[-1]["authorization"] == "Bearer tok-b"
            r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and "".join(
                e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
            assert servicer.calls == 2

            up = await status(client)
            assert up["model"]["name"] == "bridge-tiny"  # learned from the bridge's answers
            assert up["local_bridge"]["reachable"] and not up["local_bridge"]["circuit_open"]
            assert not (settings.cache_dir.exists() and any(settings.cache_dir.iterdir()))  # no model file

            await server.stop(None)
            r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            assert r.headers["x-nanofleet-route"] == "local"
            assert r.json()["error"]["code"] == "backend_unavailable"
            down = await status(client)
            assert down["model"]["availability"] == "unavailable"
            assert down["model"]["reason"].startswith("local bridge unreachable: UNAVAILABLE")
            assert down["routes"]["local"]["healthy"] is False and down["local_bridge"]["circuit_open"]
            r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)  # the router says no without a call
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.headers["x-nanofleet-reason"] == "model_unavailable"
            assert servicer.calls == 2

            server, _ = await inference_server.start(servicer, port=port)
            await until(lambda: _available(client), what="the bridge offered again after its cooldown")
            r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local", r.text
            back = await status(client)
            assert back["model"]["availability"] == "available" and not back["local_bridge"]["circuit_open"]
    finally:
        await svc.stop()
        await server.stop(None)


async def _available(client: httpx.AsyncClient) -> bool:
    return (await status(client))["model"]["availability"] == "available"


async def test_bridge_busy_means_local_unavailable_for_now(
        llama: LlamaBackend, bridge_settings: Callable[..., AgentSettings], tmp_path: Path) -> None:
    """RESOURCE_EXHAUSTED from the bridge (ML Kit's BUSY): prefer_local falls back to the cloud before the first
    token; local_only gets 503 + the bridge's Retry-After; the local route rests that long."""
    bridge = inference_server.Servicer(llama)
    gateway = inference_server.Servicer(llama)
    sock = tmp_path / "b.sock"
    bridge_server, _ = await inference_server.start(bridge, unix=f"unix:{sock}")
    gateway_server, gport = await inference_server.start(gateway)
    settings = bridge_settings({"address": f"unix:{sock}", "model": "gemini-nano"})
    svc = AgentService(settings, cloud=GrpcBackend(f"127.0.0.1:{gport}", timeout=10))
    await svc.start()
    try:
        async with uds_client(settings.socket_path) as client:
            r = await client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local" and bridge.calls == 1

            bridge.rate_limit = 0  # busy, but no delay: only this request falls back
            r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "cloud"
            assert r.headers["x-nanofleet-reason"] == "fallback_backend_unavailable"
            assert sse_events(r.text)[-1] == "[DONE]" and gateway.calls == 1
            assert (await status(client))["model"]["availability"] == "available"

            bridge.rate_limit = 30
            r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
            assert r.status_code == 503 and r.headers["retry-after"] == "30", r.text
            assert r.headers["x-nanofleet-reason"] == "model_unavailable"
            assert "RESOURCE_EXHAUSTED" in r.json()["error"]["message"]
            st = await status(client)
            assert st["model"]["availability"] == "unavailable" and st["model"]["name"] == "gemini-nano"
            assert st["model"]["reason"].startswith("local bridge busy: RESOURCE_EXHAUSTED")
            assert 25 < st["local_bridge"]["retry_in"] <= 30

            calls = bridge.calls
            r = await client.post("/v1/chat/completions", json=CHAT)  # prefer_local: the cloud meanwhile
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "cloud"
            assert r.headers["x-nanofleet-reason"] == "model_unavailable" and gateway.calls == 2
            r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
            assert r.status_code == 503 and 20 < int(r.headers["retry-after"]) <= 30  # the bridge's delay, not 5 s
            assert bridge.calls == calls  # resting: the bridge is not called again before its delay
    finally:
        await svc.stop()
        await bridge_server.stop(None)
        await gateway_server.stop(None)


async def test_without_a_bridge_the_gguf_path_is_unchanged(make_settings: Callable[..., AgentSettings]) -> None:
    svc = AgentService(make_settings(model={"threads": 1}), warmup=False)
    try:
        assert type(svc.models).__name__ == "ModelManager" and svc.models.spec.threads == 1
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://agent") as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
            assert "local_bridge" not in (await c.get("/v1/status")).json()
    finally:
        await svc.models.close()

