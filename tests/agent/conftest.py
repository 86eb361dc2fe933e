"""Agent fixtures: settings in a private tmp folder with the tiny model, the service on a real unix socket
(uvicorn in-process), an httpx client over that socket, and an in-process ASGI client for fast API tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings


@pytest.fixture
def make_settings(tmp_path: Path, tiny_gguf: Path) -> Callable[..., AgentSettings]:
    def make(**overrides: Any) -> AgentSettings:
        model = {"source": f"file:{tiny_gguf}", "n_ctx": 512, "n_parallel": 2, **overrides.pop("model", {})}
        data = {"device_id": "dev-test", "data_dir": tmp_path / "data", "socket_path": tmp_path / "run" / "a.sock",
                "broker_url": None, "model": model, **overrides}
        return AgentSettings.model_validate(data)

    return make


@pytest.fixture
async def service(make_settings: Callable[..., AgentSettings]) -> AsyncIterator[AgentService]:
    svc = AgentService(make_settings(), warmup=False)
    await svc.start()
    yield svc
    await svc.stop()


def uds_client(path: Path, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://agent",
                             timeout=30, **kwargs)


@pytest.fixture
async def client(service: AgentService) -> AsyncIterator[httpx.AsyncClient]:
    async with uds_client(service.settings.socket_path) as c:
        yield c


@pytest.fixture
async def asgi(make_settings: Callable[..., AgentSettings]) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process through httpx.ASGITransport (no socket): for fast request/response tests."""
    svc = AgentService(make_settings(), warmup=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://agent",
                                 timeout=30) as c:
        c.service = svc  # type: ignore[attr-defined]
        yield c
    await svc.models.close()


def sse_events(text: str) -> list[Any]:
    import json

    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture
async def llama(tmp_path: Path, tiny_gguf: Path) -> AsyncIterator[LlamaBackend]:
    """A small llama.cpp backend of the tiny model, e.g. behind a test Inference bridge."""
    b = LlamaBackend(tiny_gguf, model_name="tiny", private_dir=tmp_path / "p", n_ctx=256, n_parallel=2)
    yield b
    await b.close()
