"""The official `openai` client over the unix socket; OpenAPI schema; stale socket replaced; TCP loopback opt-in."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import httpx
import openai
import pytest

from nanofleet.agent.service import AgentService
from nanofleet.agent.unix_socket import AlreadyServing, UnsafeListen, bind_tcp, bind_unix
from tests.agent.conftest import CHAT, uds_client
from tests.conftest import free_port


async def test_official_openai_client_over_the_unix_socket(service: AgentService) -> None:
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(service.settings.socket_path)))
    async with openai.AsyncOpenAI(base_url="http://agent/v1", api_key="unused", http_client=http,
                                  max_retries=0) as client:
        models = await client.models.list()
        name = models.data[0].id
        raw = await client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6)
        assert raw.headers["x-nanofleet-route"] == "local"
        done = raw.parse()
        assert done.choices[0].message.role == "assistant" and done.usage.completion_tokens == 6
        stream = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 6
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model=name, messages=[], max_tokens=3)
        assert err.value.body["param"] == "messages"


async def test_openapi_schema_documents_the_api(asgi: httpx.AsyncClient) -> None:
    r = await asgi.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/status", "/v1/sessions",
                 "/v1/sessions/{session_id}/prompt", "/v1/sessions/{session_id}/clone"):
        assert path in doc["paths"], path
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = body["$ref"].rsplit("/", 1)[1]
    assert {"messages", "max_tokens", "stream", "nanofleet"} <= set(doc["components"]["schemas"][name]["properties"])
    assert "Hints" in doc["components"]["schemas"] and "Message" in doc["components"]["schemas"]


async def test_every_response_names_route_and_reason(asgi: httpx.AsyncClient) -> None:
    for r in (await asgi.get("/v1/models"), await asgi.get("/v1/status"), await asgi.get("/openapi.json"),
              await asgi.post("/v1/sessions", json={})):
        assert r.headers["x-nanofleet-route"] and r.headers["x-nanofleet-reason"], r.url


def test_stale_socket_is_replaced_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "agent.sock"
    first = bind_unix(path)
    with pytest.raises(AlreadyServing, match="already serving"):
        bind_unix(path)
    first.close()  # the process "crashed": the file stays, nothing accepts
    assert path.exists()
    second = bind_unix(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(str(path))
        probe.close()
    finally:
        second.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(UnsafeListen, match="not a socket"):
        bind_unix(path)


def test_tcp_is_loopback_only() -> None:
    for bad in ("0.0.0.0:8765", "192.168.1.5:80", "example.com:80", "127.0.0.1:http"):
        with pytest.raises(UnsafeListen, match="loopback"):
            bind_tcp(bad)
    s = bind_tcp(f"127.0.0.1:{free_port()}")
    s.close()


async def test_tcp_loopback_when_configured(make_settings) -> None:
    port = free_port()
    svc = AgentService(make_settings(tcp_listen=f"127.0.0.1:{port}"), warmup=False)
    await svc.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
        async with uds_client(svc.settings.socket_path) as c:
            assert (await c.get("/v1/models")).status_code == 200
    finally:
        await svc.stop()
    assert not svc.settings.socket_path.exists()
