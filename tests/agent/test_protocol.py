"""The agent's HTTP protocol: status line + headers + body in one write, and the chat completions fast path keeps
HTTP/1.1 semantics (pipelining, hand-back to uvicorn, Connection: close, graceful shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import json

from nanofleet.agent.runtime import ChatRequest, FunctionBackend
from nanofleet.agent.service import AgentService
from tests.conftest import until


async def test_headers_and_body_arrive_in_one_read(service: AgentService) -> None:
    body = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
    reader, writer = await asyncio.open_unix_connection(str(service.settings.socket_path))
    try:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
        first = await asyncio.wait_for(reader.read(65536), 10)
        head, _, rest = first.partition(b"\r\n\r\n")
        length = next(int(v) for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n")[1:])
                      if k.lower() == b"content-length")
        assert len(rest) == length  # headers and body came in the same read
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        first = await asyncio.wait_for(reader.read(65536), 10)
        assert first.startswith(b"HTTP/1.1 200") and b"x-nanofleet-route: local" in first
        assert first.endswith(b"}")
    finally:
        writer.close()
        await writer.wait_closed()


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_coalescing_transport_joins_header_block_and_body() -> None:
    from nanofleet.agent.api.protocol import _CoalescingTransport

    rec = _Recorder()
    t = _CoalescingTransport(rec)  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert rec.writes == []
    t.write(b"{}")
    assert rec.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    t.write(b"5\r\nhello\r\n")  # a streamed chunk goes straight out
    assert rec.writes[-1] == b"5\r\nhello\r\n"
    t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    t.close()  # a pending header block is never lost
    assert rec.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n" and rec.closed
    assert t.get_extra_info("peername") == "info:peername"


# -- the chat completions fast path (agent/api/protocol.py): HTTP semantics as under uvicorn ------------------------

def _request(method: str, path: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: agent", *(f"{k}: {v}" for k, v in headers)]
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _responses(reader: asyncio.StreamReader, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read n responses off one connection with h11 (a real client-side HTTP/1.1 parser)."""
    import h11

    conn, out = h11.Connection(h11.CLIENT), []
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))  # h11 needs a request per response
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, {}, b""
    while len(out) < n:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), 20)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            status, headers, body = event.status_code, {k.decode(): v.decode() for k, v in event.headers}, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, headers, body))
            if len(out) < n and conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                conn.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
                conn.send(h11.EndOfMessage())
        elif isinstance(event, h11.ConnectionClosed):
            break
    return out


CHAT1 = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


async def test_pipelined_requests_are_answered_in_order(service: AgentService) -> None:
    """A request that arrives while a fast-path completion runs waits for it, as uvicorn queues pipelined ones."""
    reader, writer = await asyncio.open_unix_connection(str(service.settings.socket_path))
    try:
        writer.write(_request("POST", "/v1/chat/completions", CHAT1) + _request("GET", "/v1/models")
                     + _request("POST", "/v1/chat/completions", CHAT1)
                     + _request("POST", "/v1/chat/completions", b'{"messages": []}'))
        got = await _responses(reader, 4)
        assert [s for s, _, _ in got] == [200, 200, 200, 400]
        assert json.loads(got[0][2])["object"] == "chat.completion" and got[0][1]["x-nanofleet-route"] == "local"
        assert json.loads(got[1][2])["object"] == "list"
        assert json.loads(got[2][2])["usage"]["completion_tokens"] == 2
        assert json.loads(got[3][2])["error"]["param"] == "messages"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_what_the_fast_path_does_not_take_is_answered_by_uvicorn_on_the_same_connection(
        service: AgentService) -> None:
    """Invalid JSON, a bad field, a stream and an oversize body are handed back to uvicorn mid-request; the
    connection stays usable for the next request after each."""
    limit = service.settings.max_body_bytes
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (limit + 10)}]}).encode()
    reader, writer = await asyncio.open_unix_connection(str(service.settings.socket_path))
    try:
        cases = [
            (b"{not json", 400, "invalid_json"),
            (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(), 400, None),
            (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "stream": True}).encode(), 200, "stream"),
            (CHAT1, 200, None),
        ]
        for body, status, kind in cases:
            writer.write(_request("POST", "/v1/chat/completions", body))
            [(got, headers, payload)] = await _responses(reader, 1)
            assert got == status, payload[:200]
            if kind == "invalid_json":
                assert json.loads(payload)["error"]["code"] == "invalid_json"
            if kind == "stream":
                assert headers["content-type"].startswith("text/event-stream") and payload.endswith(b"[DONE]\n\n")
        writer.write(_request("POST", "/v1/chat/completions", big))
        [(got, _, payload)] = await _responses(reader, 1)
        assert got == 413 and json.loads(payload)["error"]["code"] == "body_too_large"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_connection_close_is_honoured_on_the_fast_path(service: AgentService) -> None:
    reader, writer = await asyncio.open_unix_connection(str(service.settings.socket_path))
    try:
        writer.write(_request("POST", "/v1/chat/completions", CHAT1, (("Connection", "close"),)))
        [(status, headers, _)] = await _responses(reader, 1)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the agent closed its end
    finally:
        writer.close()
        await writer.wait_closed()


async def test_shutdown_waits_for_a_fast_path_completion_in_flight(make_settings) -> None:
    """Stopping the agent while a completion runs: the listener closes, the answer still comes (with
    `connection: close`), then the agent stops. The model is a function held on an Event, so the overlap is sure."""
    release = asyncio.Event()

    async def slow(req: ChatRequest) -> str:
        await release.wait()
        return "done"

    svc = AgentService(make_settings(), warmup=False, backend_factory=lambda file, spec: FunctionBackend(slow))
    await svc.start()
    reader, writer = await asyncio.open_unix_connection(str(svc.settings.socket_path))
    try:
        writer.write(_request("POST", "/v1/chat/completions", CHAT1))
        await until(lambda: svc.dispatcher.admission.active == 1, what="the completion to start")
        stopping = asyncio.create_task(svc.stop())

        async def refused() -> bool:
            try:
                _, w = await asyncio.open_unix_connection(str(svc.settings.socket_path))
            except OSError:
                return True
            w.close()
            return False

        deadline = asyncio.get_running_loop().time() + 10
        while not await refused():  # the server is shutting down: no new connections
            assert asyncio.get_running_loop().time() < deadline, "the listener did not close"
            await asyncio.sleep(0.01)
        assert not stopping.done()  # waiting for the completion in flight
        release.set()
        [(status, headers, payload)] = await _responses(reader, 1)
        assert status == 200 and json.loads(payload)["choices"][0]["message"]["content"] == "do"  # max_tokens 2
        assert headers.get("connection") == "close"  # shutting down: no keep-alive
        await asyncio.wait_for(stopping, 20)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
