"""A fake Gemini API: a real HTTP/1.1 server on loopback speaking the Gemini REST wire format that google-genai uses
(POST /v1beta/models/{model}:generateContent, :streamGenerateContent?alt=sse, :countTokens).

By default it echoes the last user message (one token a word, cut at generationConfig.maxOutputTokens); tests queue
`Reply`s to script errors, delays and malformed answers, and read `requests` to assert what our code sent.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PATH = re.compile(r"^/(?P<version>v1beta|v1)/models/(?P<model>[^:/]+):(?P<method>generateContent|"
                  r"streamGenerateContent|countTokens)$")


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up early (the gateway's deadline tests do it on purpose) is not an error worth a
    traceback on the test output."""

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class Reply:
    status: int = 200
    body: Any = None                    # dict → JSON; bytes → sent raw; None → the default echo answer
    chunks: list[Any] | None = None     # streamed: dicts become `data: {json}` events, bytes are sent raw
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0                  # before the status line
    chunk_delay: float = 0.0            # between streamed events


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    model: str
    rpc: str
    headers: dict[str, str]
    body: Any


def answer(text: str, prompt_tokens: int = 5, output_tokens: int | None = None, finish: str | None = "STOP",
           model: str = "gemini-2.5-flash", thoughts: int | None = None) -> dict[str, Any]:
    """A generateContent response body (also one stream event)."""
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    out = len(text.split()) if output_tokens is None else output_tokens
    usage = {"promptTokenCount": prompt_tokens, "candidatesTokenCount": out,
             "totalTokenCount": prompt_tokens + out + (thoughts or 0)}
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "fake"}


def error(code: int, status: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": details or []}}


def rate_limited(seconds: float = 36.7) -> Reply:
    """Gemini's 429: a QuotaFailure, a RetryInfo and "Please retry in …s" in the message."""
    details = [
        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
         "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                         "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]},
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{int(seconds)}s"},
    ]
    message = f"You exceeded your current quota. Please retry in {seconds}s."
    return Reply(429, error(429, "RESOURCE_EXHAUSTED", message, details))


class FakeGemini:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.script: deque[Reply] = deque()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body go out as separate writes: without this, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._handle(self)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def push(self, *replies: Reply) -> None:
        with self.lock:
            self.script.extend(replies)

    def calls(self, rpc: str | None = None) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if rpc is None or r.rpc == rpc]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        match = PATH.match(path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        with self.lock:
            self.requests.append(Recorded("POST", path, query, match["model"] if match else "",
                                          match["method"] if match else "", dict(h.headers.items()), body))
            reply = self.script.popleft() if self.script else Reply()
        if match is None:
            return self._send(h, Reply(404, error(404, "NOT_FOUND", f"no route {path}")))
        if h.headers.get("x-goog-api-key") in (None, ""):
            return self._send(h, Reply(403, error(403, "PERMISSION_DENIED", "API key missing")))
        if reply.delay:
            time.sleep(reply.delay)
        if reply.status != 200 or reply.body is not None:
            return self._send(h, reply)
        if match["method"] == "countTokens":
            words = sum(len(p.get("text", "").split()) for c in body.get("contents", []) for p in c.get("parts", []))
            return self._send(h, Reply(body={"totalTokens": words}))
        last = ""
        for content in body.get("contents", []):
            if content.get("role") == "user":
                last = " ".join(p.get("text", "") for p in content.get("parts", []))
        text = f"echo: {last}"
        cap = (body.get("generationConfig") or {}).get("maxOutputTokens")
        if cap and len(text.split(" ")) > cap:  # one token a word, as Gemini honours maxOutputTokens
            text = " ".join(text.split(" ")[:cap])
        if match["method"] == "generateContent":
            return self._send(h, Reply(body=answer(text, model=match["model"])))
        if reply.chunks is None:
            words = text.split(" ")
            reply.chunks = [answer(w + " ", finish=None, output_tokens=1) for w in words[:-1]]
            reply.chunks.append(answer(words[-1], output_tokens=len(words), model=match["model"]))
        self._stream(h, reply)

    def _send(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body or {}).encode()
        h.send_response(reply.status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        for key, value in reply.headers.items():
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data)

    def _stream(self, h: BaseHTTPRequestHandler, reply: Reply) -> None:
        h.send_response(reply.status)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        try:
            for i, chunk in enumerate(reply.chunks or []):
                if i and reply.chunk_delay:
                    time.sleep(reply.chunk_delay)
                data = chunk if isinstance(chunk, bytes) else b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"
                h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
