"""The agent's HTTP protocol: uvicorn's httptools protocol with two changes for the hot path (bench/bench_socket.py).

1. uvicorn writes a response's header block and its body with two socket writes; on a small device each can wake
   the client separately. `_CoalescingTransport` holds the header block back until the first body write.
2. A non-streaming `POST /v1/chat/completions` skips ASGI: uvicorn's request cycle (an Event, message dicts, header
   checks, Starlette Request/Response) costs about as much as all of the agent's routing. The body is collected
   here; if it is a valid non-streaming chat body, `HotPath.complete` answers it and the response goes out in one
   write; anything else (a stream, invalid JSON, a bad field, an oversize body, `Expect: 100-continue`) is handed
   to uvicorn exactly as if it had been read normally, so every error keeps coming from one place.
   Keep-alive, pipelining (a request that arrives meanwhile waits, as uvicorn queues it), disconnects and graceful
   shutdown (the task is one of the server's) behave as under uvicorn.
3. The unix-socket peer's uid (SO_PEERCRED, agent/api/peer.py) is read once per connection and given to every
   request (ASGI scope key `nanofleet.peer_uid`): the offline queue's entries are visible only to their owner.

`PeerHttpProtocol` is uvicorn's stock protocol with only change 3, for when the fast path is off or does not fit
this uvicorn: it wraps the protocol's ASGI app per connection (`self.app`, read when each request's cycle starts).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from nanofleet.agent.api.app import header_dict
from nanofleet.agent.api.peer import PEER_KEY, WithPeer, peer_uid

_CHAT = b"/v1/chat/completions"


class _CoalescingTransport:
    __slots__ = ("_pending", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._pending is not None:
            data, self._pending = self._pending + data, None
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._pending = data  # a header block: the body (always written next under ASGI) joins it
            return
        self._transport.write(data)

    def _flush(self) -> None:
        if self._pending is not None:
            data, self._pending = self._pending, None
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HotCycle:
    """Stands in for uvicorn's RequestResponseCycle while a fast-path request runs: what the protocol reads of
    `self.cycle` (a pipelined request waits until `response_complete`; disconnect and shutdown are recorded)."""

    __slots__ = ("disconnected", "keep_alive", "message_event", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.response_complete = False
        self.disconnected = False
        self.message_event = asyncio.Event()


class AgentHttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]
        app = self.config.app  # the HotPath, under any wrapper uvicorn adds
        self._hot_app: Any = app if hasattr(app, "parse_fast") else None
        self._hot_parts: list[bytes] | None = None
        self._hot_size = 0
        self._peer_uid = peer_uid(transport.get_extra_info("socket"))  # who may see the entries it queues

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[PEER_KEY] = self._peer_uid  # type: ignore[literal-required]

    def on_headers_complete(self) -> None:
        if (self._hot_app is not None and self.url == _CHAT and self.parser.get_method() == b"POST"
                and not self.expect_100_continue and not self.parser.should_upgrade()
                and (self.cycle is None or self.cycle.response_complete) and not self.pipeline):
            self._hot_parts, self._hot_size = [], 0  # collect the body here (uvicorn's cycle is not created)
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._hot_parts is None:
            return super().on_body(body)
        self._hot_parts.append(body)
        self._hot_size += len(body)
        if self._hot_size > self._hot_app.max_body_bytes:  # uvicorn's path answers 413 (and reads no more)
            self._to_uvicorn()

    def on_message_complete(self) -> None:
        if self._hot_parts is None:
            return super().on_message_complete()
        raw = b"".join(self._hot_parts)
        body = self._hot_app.parse_fast(raw)
        if body is None:  # not the fast path's: uvicorn reads it (the parser is still on this request)
            self._to_uvicorn()
            return super().on_message_complete()
        self._hot_parts = None
        headers = header_dict(self.headers)
        cycle = _HotCycle(keep_alive=self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1")
        self.cycle = cycle  # type: ignore[assignment]
        task = self.loop.create_task(self._answer(body, headers, cycle))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _to_uvicorn(self) -> None:
        parts, self._hot_parts = self._hot_parts or [], None
        super().on_headers_complete()
        if parts:
            super().on_body(b"".join(parts))

    async def _answer(self, body: Any, headers: dict[str, str], cycle: _HotCycle) -> None:
        try:
            response = await self._hot_app.complete(body, headers, self._peer_uid)
        finally:
            cycle.response_complete = True
        if cycle.disconnected or self.transport.is_closing():
            return
        out = [STATUS_LINE[response.status_code]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers):
            out += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            out.append(b"connection: close\r\n")
        out += [b"\r\n", response.body]
        self.transport.write(b"".join(out))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


class PeerHttpProtocol(HttpToolsProtocol):
    """uvicorn's stock protocol, plus the peer's uid in each request's scope (nothing else differs)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.app = WithPeer(self.app, peer_uid(transport.get_extra_info("socket")))
