"""Chat completions over the agent's real unix socket (uvicorn), non-streaming and SSE; and once as a subprocess."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent.conftest import CHAT, sse_events, uds_client
from tests.conftest import wait_for


async def test_completion_over_unix_socket_says_local(client: httpx.AsyncClient, service) -> None:
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    assert r.headers["x-nanofleet-route"] == "local"
    assert r.headers["x-nanofleet-reason"] == "prefer_local"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] > 0
    assert service.dispatcher.counts["local"] == 1


async def test_streaming_sse_ends_with_done(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True, "ignore_eos": True,
                                                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-nanofleet-route"] == "local"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


async def test_socket_is_0660_in_a_0750_folder(make_settings: Callable[..., AgentSettings]) -> None:
    # llama.cpp's socket goes in data_dir/private only while its path fits AF_UNIX's 108 bytes (else a mkdtemp
    # folder): pytest's tmp_path under xdist (…/popen-gw0/<test name>/…) is too long for that, so a short folder
    with tempfile.TemporaryDirectory(prefix="nf-") as short:
        service = AgentService(make_settings(data_dir=Path(short) / "data"), warmup=False)
        await service.start()
        try:
            async with uds_client(service.settings.socket_path) as client:
                await _socket_and_private_listener(service, client)
        finally:
            await service.stop()


async def _socket_and_private_listener(service: AgentService, client: httpx.AsyncClient) -> None:
    path = service.settings.socket_path
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750  # DESIGN.md: the agent's group may connect
    r = await client.post("/v1/chat/completions", json=CHAT)  # loads the model: llama.cpp's own listener opens
    assert r.status_code == 200
    private_dir = service.settings.data_dir / "private"
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    private = list(private_dir.glob("*.sock"))
    assert len(private) == 1 and stat.S_IMODE(private[0].stat().st_mode) & 0o077 == 0


def test_nanofleet_agent_subprocess_serves_and_stops_cleanly(tmp_path: Path, tiny_gguf: Path) -> None:
    """`nanofleet agent` for real: prints the socket line, answers, SIGTERM removes the socket."""
    cfg = tmp_path / "agent.yaml"
    sock = tmp_path / "run" / "agent.sock"
    cfg.write_text(f"device_id: sub-1\ndata_dir: {tmp_path / 'data'}\nbroker_url: null\n"
                   f"model: {{source: 'file:{tiny_gguf}', n_ctx: 512}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "nanofleet", "agent", "--config", str(cfg), "--socket",
                             str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"unix:{sock}" in line, (line, proc.poll())
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=30) as c:
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
            r = c.post("/v1/chat/completions", json={**CHAT, "stream": True})
            assert sse_events(r.text)[-1] == "[DONE]"
        proc.terminate()
        assert proc.wait(15) == 0
        assert not sock.exists()
        assert not list((tmp_path / "data" / "private").glob("*.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_second_agent_on_live_socket_is_refused(tmp_path: Path, tiny_gguf: Path) -> None:
    import socket

    sock_path = tmp_path / "run" / "agent.sock"
    sock_path.parent.mkdir(mode=0o700)
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(sock_path))
    live.listen(1)
    try:
        r = subprocess.run([sys.executable, "-m", "nanofleet", "agent", "--device-id", "x2", "--socket",
                            str(sock_path), "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                           timeout=30, env={**os.environ, "NANOFLEET_BROKER_URL": ""})
        assert r.returncode != 0
        assert "another nanofleet agent is already serving" in r.stderr
        assert sock_path.exists()
    finally:
        live.close()
    wait_for(lambda: sock_path.exists(), what="socket still there")
