"""Agent fixtures: settings in a private tmp folder with the tiny model, the service on a real unix socket
(uvicorn in-process), an httpx client over that socket, and an in-process ASGI client for fast API tests."""

from __future__ import annotations

import json
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from google.protobuf import json_format

from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.protos import fleet_pb2, topics
from tests.conftest import until
from tests.gateway.conftest import fake_gemini, make_gateway  # noqa: F401 - the real gateway, for cloud-route tests


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


@pytest.fixture
async def gateway(llama: LlamaBackend) -> AsyncIterator[Any]:
    """A stand-in gateway: the test Inference server over the tiny model (stop/start it to cut the cloud route)."""
    from tests.agent import inference_server
    from tests.agent.test_cloud_breaker import Gateway

    gw = await Gateway(inference_server.Servicer(llama)).start()
    yield gw
    await gw.stop()


FLEET, DEV = "pol", "dev-01"


class Controller:
    """A stand-in for the controller's MQTT side: publishes policies and commands, collects results."""

    def __init__(self, port: int) -> None:
        self.got: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.c.on_message = lambda c, u, m: self.got.put((m.topic, json.loads(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe([(topics.cmd_result(FLEET, DEV), 1)])

    def policy(self, **fields: Any) -> None:
        p = fleet_pb2.RoutingPolicy(**{"fleet": FLEET, "device_id": DEV, **fields})
        self.c.publish(topics.policy(FLEET, DEV), json_format.MessageToJson(p), qos=1, retain=True).wait_for_publish()

    def cmd(self, cid: str, kind: str) -> None:
        c = fleet_pb2.Command(id=cid, kind=kind, issued_at_ms=1)
        self.c.publish(topics.cmd(FLEET, DEV), json_format.MessageToJson(c), qos=1).wait_for_publish()

    async def result(self, cid: str) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            while not self.got.empty():
                self.seen.append(self.got.get_nowait())
            return next((m for _, m in self.seen if m.get("id") == cid and m.get("status") != "ack"), None)

        return await until(final, what=f"the result of command {cid}")  # type: ignore[return-value]

    def close(self) -> None:
        self.c.publish(topics.policy(FLEET, DEV), b"", qos=1, retain=True).wait_for_publish()
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def controller(broker: Any) -> Iterator[Controller]:
    ctl = Controller(broker.port)
    yield ctl
    ctl.close()
