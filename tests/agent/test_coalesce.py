"""The response writer sends status line + headers + body in one write (the hot path's fewer wake-ups)."""

from __future__ import annotations

import asyncio

from nanofleet.agent.service import AgentService


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
    from nanofleet.agent.api.coalesce import _CoalescingTransport

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
