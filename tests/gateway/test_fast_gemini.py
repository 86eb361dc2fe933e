"""The fast fake speaks the same Gemini wire format as FakeGemini: our real google-genai upstream runs against it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from nanofleet.controller.gateway.upstreams.base import Message, UpstreamRequest
from nanofleet.controller.gateway.upstreams.gemini import GeminiUpstream

REQ = UpstreamRequest(model="gemini-2.5-flash", messages=(Message("user", "two words"),), thinking_budget=0)


@pytest.fixture(scope="module")
def fast_url() -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.gateway.fast_gemini", "--processes", "2"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    yield proc.stdout.readline().strip()
    proc.stdin.close()
    assert proc.wait(10) == 0


async def test_generate_stream_and_count_through_google_genai(fast_url: str) -> None:
    up = GeminiUpstream("key", base_url=fast_url)
    try:
        result = await up.generate(REQ)
        assert (result.text, result.finish_reason, result.input_tokens, result.output_tokens) == (
            "echo: two words", "stop", 5, 3)
        chunks = [c async for c in up.stream(REQ)]
        assert "".join(c.text for c in chunks) == "echo: two words" and chunks[-1].finish_reason == "stop"
        assert await up.count_tokens(REQ) == 2
        answers = [await up.generate(REQ) for _ in range(50)]  # keep-alive: many calls on one connection
        assert {a.text for a in answers} == {"echo: two words"}
    finally:
        await up.close()


async def test_refusals(fast_url: str) -> None:
    async with httpx.AsyncClient(base_url=fast_url) as c:
        r = await c.post("/v1beta/models/m:generateContent", json={})
        assert r.status_code == 403 and r.json()["error"]["message"] == "API key missing"
        r = await c.post("/v1beta/models/m:nothing", json={}, headers={"x-goog-api-key": "k"})
        assert r.status_code == 404
        r = await c.post("/v1beta/models/m:generateContent", content=b"{", headers={"x-goog-api-key": "k"})
        assert r.status_code == 400
        r = await c.get("/v1beta/models/m:generateContent")
        assert r.status_code == 405
        r = await c.post("/v1beta/models/m:generateContent", content=b"{}",
                         headers={"x-goog-api-key": "k", "connection": "close"})
        assert r.status_code == 200
