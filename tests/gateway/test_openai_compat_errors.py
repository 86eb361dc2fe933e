"""The OpenAI-compatible upstream against a real scripted HTTP server on loopback: every failure an upstream can
produce (status codes, malformed answers, errors mid-stream, refused and slow connections) becomes the gateway error
that carries the right gRPC status and retry decision — never a stray exception."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nanofleet.controller.gateway.errors import (
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    UpstreamUnsupported,
)
from nanofleet.controller.gateway.upstreams.base import Message, UpstreamRequest
from nanofleet.controller.gateway.upstreams.openai_compat import OpenAICompatUpstream
from nanofleet.tcp import free_port

REQ = UpstreamRequest(model="m", messages=(Message("user", "hi"),), system_instruction="be brief", top_k=7,
                      temperature=0.5, max_output_tokens=9, stop=("END",))


@dataclass
class Canned:
    status: int = 200
    body: bytes = b""
    lines: list[bytes] | None = None  # streamed raw, each followed by a blank line
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Script:
    replies: deque[Canned] = field(default_factory=deque)
    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class _QuietServer(ThreadingHTTPServer):
    """The timeout test hangs up on purpose: the server's broken pipe then is expected, not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server() -> Iterator[tuple[Script, str]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            script.bodies.append((self.path, json.loads(body)))
            reply = script.replies.popleft()
            time.sleep(reply.delay)
            self.send_response(reply.status)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            if reply.lines is None:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)
                return
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for line in reply.lines:
                self.wfile.write(line + b"\n\n")
            self.close_connection = True

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _json(status: int, data: object, **headers: str) -> Canned:
    return Canned(status, json.dumps(data).encode(), headers={"Content-Type": "application/json", **headers})


async def test_request_body_carries_stop_and_top_k_only_to_llamacpp(server: tuple[Script, str]) -> None:
    script, url = server
    answer = {"choices": [{"message": {"content": "ok"}, "finish_reason": "length"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    script.replies.extend([_json(200, answer), _json(200, answer)])
    for llamacpp in (True, False):
        up = OpenAICompatUpstream(url, api_key="k", llamacpp=llamacpp)
        try:
            result = await up.generate(REQ)
        finally:
            await up.close()
        assert (result.text, result.finish_reason, result.model) == ("ok", "length", "m")
    (_, sent_llama), (_, sent_openai) = script.bodies
    assert sent_llama["stop"] == ["END"] and sent_llama["top_k"] == 7
    assert sent_llama["messages"][0] == {"role": "system", "content": "be brief"}
    assert "top_k" not in sent_openai and sent_openai["stop"] == ["END"]
    assert (sent_openai["temperature"], sent_openai["max_tokens"], "top_p" in sent_openai) == (0.5, 9, False)


@pytest.mark.parametrize(("canned", "error", "retryable", "text"), [
    (_json(429, {"error": {"message": "slow down"}}, **{"Retry-After": "7"}), UpstreamRateLimited, False,
     "slow down"),
    (_json(400, {"error": {"message": "bad field"}}), UpstreamRejected, False, "bad field"),
    (_json(422, {"error": "plain string error"}), UpstreamRejected, False, "plain string error"),
    (Canned(503, b"overloaded"), UpstreamUnavailable, True, "upstream error 503: overloaded"),
    (Canned(501, b""), UpstreamUnavailable, False, "HTTP 501"),
    (_json(200, {"choices": []}), UpstreamMalformed, False, "IndexError"),
    (Canned(200, b"not json"), UpstreamMalformed, False, "malformed upstream answer"),
])
async def test_generate_maps_each_failure(server: tuple[Script, str], canned: Canned, error: type[Exception],
                                          retryable: bool, text: str) -> None:
    script, url = server
    script.replies.append(canned)
    up = OpenAICompatUpstream(url)
    try:
        with pytest.raises(error) as info:
            await up.generate(REQ)
    finally:
        await up.close()
    assert text in str(info.value)
    assert getattr(info.value, "retryable", False) is retryable
    if error is UpstreamRateLimited:
        assert info.value.retry_after == 7  # type: ignore[attr-defined]


async def test_stream_skips_comments_and_stops_at_done(server: tuple[Script, str]) -> None:
    script, url = server
    script.replies.append(Canned(lines=[
        b": keep-alive",
        b'data: {"choices": [{"delta": {"content": "he"}}]}',
        b'data: {"choices": [{"delta": {"content": "y"}, "finish_reason": "content_filter"}],'
        b' "usage": {"prompt_tokens": 2, "completion_tokens": 2}}',
        b"data: [DONE]",
        b'data: {"choices": [{"delta": {"content": "after done"}}]}',
    ]))
    up = OpenAICompatUpstream(url)
    try:
        chunks = [c async for c in up.stream(REQ)]
    finally:
        await up.close()
    assert "".join(c.text for c in chunks) == "hey"
    assert chunks[-1].finish_reason == "safety" and chunks[-1].output_tokens == 2
    assert script.bodies[0][1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("canned", "error", "text"), [
    (_json(503, {"error": {"message": "busy"}}), UpstreamUnavailable, "busy"),
    (Canned(lines=[b'data: {"error": "model crashed"}']), UpstreamUnavailable, "upstream error mid-stream"),
    (Canned(lines=[b"data: {not json"]), UpstreamMalformed, "malformed upstream stream chunk"),
    (Canned(lines=[b'data: {"choices": [{"delta": "text, not an object"}]}']), UpstreamMalformed, "AttributeError"),
])
async def test_stream_maps_each_failure(server: tuple[Script, str], canned: Canned, error: type[Exception],
                                        text: str) -> None:
    script, url = server
    script.replies.append(canned)
    up = OpenAICompatUpstream(url)
    try:
        with pytest.raises(error, match=text) as info:
            [c async for c in up.stream(REQ)]
    finally:
        await up.close()
    if "mid-stream" in text:
        assert info.value.retryable is False  # type: ignore[attr-defined]  # the answer may be half sent


async def test_refused_connection_is_unavailable_and_retryable_on_every_call() -> None:
    up = OpenAICompatUpstream(f"http://127.0.0.1:{free_port()}/v1", llamacpp=True)
    try:
        for call in (up.generate(REQ), up.count_tokens(REQ), _drain(up)):
            with pytest.raises(UpstreamUnavailable, match="connection failed") as info:
                await call
            assert info.value.retryable is True
    finally:
        await up.close()


async def _drain(up: OpenAICompatUpstream) -> None:
    async for _ in up.stream(REQ):
        pass


async def test_a_slow_upstream_times_out_as_unavailable(server: tuple[Script, str]) -> None:
    script, url = server
    script.replies.append(Canned(200, b"{}", delay=1.0))
    up = OpenAICompatUpstream(url, timeout=0.2)
    try:
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await up.generate(REQ)
    finally:
        await up.close()


async def test_token_counting_llamacpp_only_and_checked(server: tuple[Script, str]) -> None:
    script, url = server
    plain = OpenAICompatUpstream(url)
    with pytest.raises(UpstreamUnsupported, match="token counting"):
        await plain.count_tokens(REQ)
    await plain.close()
    script.replies.extend([_json(200, {"tokens": [1, 2, 3]}), _json(200, {"count": 3}), _json(500, {})])
    up = OpenAICompatUpstream(url, llamacpp=True)
    try:
        assert await up.count_tokens(REQ) == 3
        with pytest.raises(UpstreamMalformed, match="/tokenize"):
            await up.count_tokens(REQ)
        with pytest.raises(UpstreamUnavailable, match="500"):
            await up.count_tokens(REQ)
    finally:
        await up.close()
    path, body = script.bodies[0]
    assert path == "/tokenize" and body == {"content": "be brief\nhi"}
    assert not script.replies
