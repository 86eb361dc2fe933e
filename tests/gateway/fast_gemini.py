"""A fast fake Gemini for load: the same wire format as `fake_gemini.FakeGemini` (generateContent,
streamGenerateContent?alt=sse, countTokens; an echo of the last user message; 403 without an API key), on a lean
asyncio protocol (uvloop when installed) with HTTP/1.1 keep-alive, in one or several processes sharing the port
through SO_REUSEPORT — so a benchmark measures the gateway, not the fake (the threaded, scriptable FakeGemini tops
out near 200 calls/s). No scripting: tests that need errors or delays use FakeGemini.

`python -m tests.gateway.fast_gemini [--port P] [--processes N]` prints its base URL, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
from typing import Any

import msgspec

PATH = re.compile(rb"^/(?:v1beta|v1)/models/(?P<model>[^:/?]+):(?P<method>generateContent|streamGenerateContent|"
                  rb"countTokens)(?:\?.*)?$")
MAX_HEAD = 64 << 10
MAX_BODY = 16 << 20
_decode = msgspec.json.Decoder()
_encode = msgspec.json.Encoder()


def answer(text: str, model: str, prompt_tokens: int = 5, output_tokens: int | None = None,
           finish: str | None = "STOP") -> dict[str, Any]:
    """A generateContent response body (also one stream event), as FakeGemini's."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    out = len(text.split()) if output_tokens is None else output_tokens
    return {"candidates": [candidate], "usageMetadata": {"promptTokenCount": prompt_tokens,
                                                         "candidatesTokenCount": out,
                                                         "totalTokenCount": prompt_tokens + out},
            "modelVersion": model, "responseId": "fake"}


def _last_user_text(body: Any) -> str:
    last = ""
    for content in body.get("contents", []) if isinstance(body, dict) else []:
        if isinstance(content, dict) and content.get("role") == "user":
            last = " ".join(str(p.get("text", "")) for p in content.get("parts", []) if isinstance(p, dict))
    return last


def _json(status: int, reason: str, body: Any) -> bytes:
    data = _encode.encode(body)
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _error(status: int, reason: str, message: str) -> bytes:
    return _json(status, reason, {"error": {"code": status, "message": message, "status": reason.upper()
                                            .replace(" ", "_"), "details": []}})


def respond(target: bytes, headers: dict[bytes, bytes], raw: bytes) -> bytes:
    """The whole HTTP answer to one POST."""
    match = PATH.match(target)
    if match is None:
        return _error(404, "Not Found", f"no route {target.decode(errors='replace')}")
    if not headers.get(b"x-goog-api-key"):
        return _error(403, "Permission Denied", "API key missing")
    try:
        body = _decode.decode(raw) if raw else {}
    except msgspec.DecodeError:
        return _error(400, "Invalid Argument", "body is not JSON")
    model, method = match["model"].decode(), match["method"]
    if method == b"countTokens":
        words = len(_last_user_text(body).split())
        return _json(200, "OK", {"totalTokens": words})
    text = f"echo: {_last_user_text(body)}"
    if method == b"generateContent":
        return _json(200, "OK", answer(text, model))
    words = text.split(" ")
    events = [answer(w + " ", model, finish=None, output_tokens=1) for w in words[:-1]]
    events.append(answer(words[-1], model, output_tokens=len(words)))
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for event in events:
        data = b"data: " + _encode.encode(event) + b"\r\n\r\n"
        out.append(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    out.append(b"0\r\n\r\n")
    return b"".join(out)


class _Http(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies (what google-genai's httpx client sends), one answer per request."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: Any = None  # asyncio's or uvloop's transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._close(_error(431, "Request Header Fields Too Large", "headers too large"))
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            parts = lines[0].split(b" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            try:
                length = int(headers.get(b"content-length", b"0"))
            except ValueError:
                length = -1
            if len(parts) != 3 or not 0 <= length <= MAX_BODY:
                self._close(_error(400, "Bad Request", "bad request line or Content-Length"))
                return
            if len(self.buffer) < end + 4 + length:
                return
            raw = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            if parts[0] != b"POST":
                self.transport.write(_error(405, "Method Not Allowed", "POST only"))
            else:
                self.transport.write(respond(parts[1], headers, raw))
            if headers.get(b"connection", b"").lower() == b"close":
                self._close(b"")

    def _close(self, last: bytes) -> None:
        if self.transport is not None:
            if last:
                self.transport.write(last)
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def listen_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(sock: socket.socket) -> asyncio.Server:
    return await asyncio.get_running_loop().create_server(_Http, sock=sock)


def _run(port: int, ready: bool) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # plain asyncio still answers; only slower
        pass

    async def main() -> None:
        server = await serve(listen_socket(port))
        if ready:
            print(f"http://127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        server.close()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    port = args.port
    if port == 0:
        with listen_socket(0) as probe:  # a port for all processes (SO_REUSEPORT lets them share it)
            port = probe.getsockname()[1]
    children = [subprocess.Popen([sys.executable, "-m", "tests.gateway.fast_gemini", "--port", str(port), "--child"],
                                 stdin=subprocess.PIPE, env=os.environ) for _ in range(args.processes - 1)]
    try:
        _run(port, ready=not args.child)
    finally:
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(10)


if __name__ == "__main__":
    main()
