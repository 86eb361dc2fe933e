"""The local Inference bridge contract an Android companion implements (docs/android.md), run for real: the
reference bridge (`nanofleet.agent.bridge`) over the tiny llama.cpp model, reached by a real agent over gRPC on a unix
socket; every ML Kit state and error code it maps is checked by what the app then gets from the agent's socket."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from nanofleet.agent.bridge import ERRORS, NOT_READY, Bridge, BridgeError, FeatureStatus, start
from nanofleet.agent.runtime.base import Backend, ChatRequest, Chunk, Completion
from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent.conftest import CHAT, uds_client
from tests.agent.test_local_bridge import status, until

ROOT = Path(__file__).resolve().parents[2]
LOCAL_ONLY = {**CHAT, "nanofleet": {"mode": "local_only", "queue": "deny"}}


class AICore(Backend):
    """Stands for ML Kit's model on the phone: answers with the tiny model, or fails as `fail` says."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.fail: Exception | None = None

    async def generate(self, request: ChatRequest) -> Completion:
        if self.fail is not None:
            raise self.fail
        return await self.inner.generate(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        if self.fail is not None:
            raise self.fail
        async for chunk in self.inner.stream(request):
            yield chunk

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        if self.fail is not None:
            raise self.fail
        return await self.inner.count_tokens(messages)


@pytest.fixture
async def phone(llama: LlamaBackend, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """(bridge, aicore, agent settings) for a bridge on a unix socket and an agent using it; started on call."""
    started: list[tuple[grpc.aio.Server, AgentService]] = []

    async def make(**bridge_args: Any) -> tuple[Bridge, AICore, AgentSettings]:
        aicore = AICore(llama)
        bridge = Bridge(aicore, token="t", model="gemini-nano", options={"ignore_eos": True}, **bridge_args)
        sock = tmp_path / f"bridge{len(started)}.sock"
        server, _ = await start(bridge, unix=f"unix:{sock}")
        settings = AgentSettings.model_validate({
            "device_id": "pixel-1", "data_dir": tmp_path / f"data{len(started)}",
            "socket_path": tmp_path / "run" / f"a{len(started)}.sock", "broker_url": None,
            "model": {"source": f"file:{tmp_path / 'absent.gguf'}", "n_ctx": 512},
            "local_bridge": {"address": f"unix:{sock}", "token": "t", "cooldown": 0.5}})
        svc = AgentService(settings)
        await svc.start()
        started.append((server, svc))
        return bridge, aicore, settings

    yield make
    for server, svc in started:
        await svc.stop()
        await server.stop(None)


@pytest.mark.parametrize("code", sorted(ERRORS))
async def test_each_ml_kit_error_reaches_the_app_as_documented(phone: Callable[..., Any], code: str) -> None:
    bridge, aicore, settings = await phone()
    async with uds_client(settings.socket_path) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        aicore.fail = BridgeError(code, "from AICore")
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        row = ERRORS[code]
        assert bridge.answered[row.status.name] == 1
        if row.retry_after is None:  # the request itself: no rest, no fallback
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
            assert code in r.json()["error"]["message"]
            assert (await status(client))["model"]["availability"] == "available"
            return
        assert r.status_code == 503 and r.headers["x-nanofleet-reason"] == "model_unavailable", r.text
        assert int(r.headers["retry-after"]) == row.retry_after and code in r.json()["error"]["message"]
        st = await status(client)
        assert st["model"]["availability"] == "unavailable" and st["model"]["reason"].startswith("local bridge busy")
        assert row.retry_after - 5 < st["local_bridge"]["retry_in"] <= row.retry_after


async def test_a_retry_delay_from_ml_kit_wins_over_the_default(phone: Callable[..., Any]) -> None:
    _, aicore, settings = await phone()
    aicore.fail = BridgeError("BUSY", "quota", retry_after=7)  # GenAiException.getRetryDelay()
    async with uds_client(settings.socket_path) as client:
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        assert r.status_code == 503 and r.headers["retry-after"] == "7", r.text


async def test_downloading_model_then_available(phone: Callable[..., Any]) -> None:
    bridge, _, settings = await phone(status=FeatureStatus.DOWNLOADABLE)
    bridge.not_ready[FeatureStatus.DOWNLOADING] = 1  # the companion's estimate of the download's end
    async with uds_client(settings.socket_path) as client:
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        assert r.status_code == 503 and r.headers["retry-after"] == str(int(NOT_READY[FeatureStatus.DOWNLOADABLE]))
        assert bridge.download_requested and bridge.answered["UNAVAILABLE"] == 1
        st = await status(client)
        assert st["model"]["availability"] == "unavailable" and st["local_bridge"]["state"] == "not_serving"
        assert "download started" in st["model"]["reason"] and "[health: NOT_SERVING]" in st["model"]["reason"]

    bridge, _, settings = await phone(status=FeatureStatus.DOWNLOADING)
    bridge.not_ready[FeatureStatus.DOWNLOADING] = 1
    bridge.progress = 0.42
    async with uds_client(settings.socket_path) as client:
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "model downloading (42%)" in (await status(client))["model"]["reason"]
        bridge.status = FeatureStatus.AVAILABLE
        await until(lambda: _serves(client), within=15, what="the local route back once the model is available")
        assert (await status(client))["model"]["name"] == "gemini-nano"


async def _serves(client: httpx.AsyncClient) -> bool:
    r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
    return r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"


async def test_a_device_without_the_model_rests_the_local_route_for_a_day(phone: Callable[..., Any]) -> None:
    _, _, settings = await phone(status=FeatureStatus.UNAVAILABLE)
    async with uds_client(settings.socket_path) as client:
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        assert r.status_code == 503 and r.headers["retry-after"] == "86400", r.text
        assert "not supported on this device" in (await status(client))["model"]["reason"]


async def test_a_bug_in_the_bridge_is_internal_logged_and_counted(phone: Callable[..., Any],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    bridge, aicore, settings = await phone()
    aicore.fail = KeyError("oops")
    async with uds_client(settings.socket_path) as client:
        r = await client.post("/v1/chat/completions", json=LOCAL_ONLY)
        assert r.status_code == 503 and "INTERNAL" in r.json()["error"]["message"], r.text
    assert bridge.answered["INTERNAL"] == 1 and "the model call failed" in caplog.text


def test_an_unknown_error_code_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown bridge error code 'NOPE'; known: BUSY"):
        BridgeError("NOPE")


def test_the_android_doc_maps_every_state_and_error_as_the_bridge_does() -> None:
    text = (ROOT / "docs" / "android.md").read_text(encoding="utf-8")
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\| `([A-Z_]+)`[^|]*\| `([A-Z_]+)` \| (\S+) \|", text, re.M)}
    expected = {code: (a.status.name, "—" if a.retry_after is None else f"{a.retry_after:g}")
                for code, a in ERRORS.items()}
    expected |= {s.name: ("UNAVAILABLE", f"{v:g}") for s, v in NOT_READY.items()}
    assert rows == expected


def _block(lang: str) -> str:
    text = (ROOT / "docs" / "android.md").read_text(encoding="utf-8")
    blocks = re.findall(rf"^```{lang}\n(.*?)^```$", text, re.S | re.M)
    assert len(blocks) == 1, f"docs/android.md: expected one {lang} block"
    return blocks[0]


def test_the_android_doc_agent_yaml_is_a_valid_bridge_setting() -> None:
    import yaml

    s = AgentSettings.model_validate(yaml.safe_load(_block("yaml")))
    assert s.local_bridge is not None and s.local_bridge.address == "127.0.0.1:50061" and s.local_bridge.token


async def test_the_android_doc_bridge_example_serves_the_agent(tmp_path: Path) -> None:
    """The page's Python example, run: the agent's own bridge client gets its answer, then its BUSY."""
    from nanofleet.agent.runtime.grpc_backend import BridgeUnavailable, GrpcBackend

    scope: dict[str, Any] = {}
    exec(compile(_block("python"), "docs/android.md", "exec"), scope)
    server, bridge = await scope["serve"](f"unix:{tmp_path / 'b.sock'}", "tok")
    try:
        async with GrpcBackend(f"unix:{tmp_path / 'b.sock'}", token="tok", role="bridge", name="local bridge") as b:
            done = await b.generate(ChatRequest([{"role": "user", "content": "hi"}]))
            assert done.text == "Hello from the phone." and done.model == "gemini-nano"
            scope["calls"] = 40
            with pytest.raises(BridgeUnavailable, match="BUSY: per-app quota spent") as exc:
                await b.generate(ChatRequest([{"role": "user", "content": "hi"}]))
            assert 59 < (exc.value.retry_after or 0) <= 60 and bridge.answered["RESOURCE_EXHAUSTED"] == 1
    finally:
        await server.stop(None)
