"""FunctionBackend: the API over a handler function (no llama.cpp), errors from the handler mapped to statuses."""

from __future__ import annotations

import httpx

from nanofleet.agent.runtime import BackendUnavailable, ChatRequest, FunctionBackend
from nanofleet.agent.service import AgentService
from tests.agent.conftest import sse_events


async def test_api_over_a_function_backend(make_settings) -> None:
    def answer(req: ChatRequest) -> str:
        if req.messages[-1]["content"] == "fail":
            raise BackendUnavailable("the fake model is down")
        return "echo: " + req.messages[-1]["content"]

    fake = FunctionBackend(answer, name="echo")
    svc = AgentService(make_settings(), warmup=False, backend_factory=lambda file, spec: fake)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 100, "temperature": 0.3})
        assert r.json()["choices"][0]["message"]["content"] == "echo: hi" and r.json()["model"] == "echo"
        assert fake.requests[-1].temperature == 0.3 and fake.requests[-1].max_tokens == 100
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}],
                                                       "max_tokens": 4, "stream": True})
        events = sse_events(r.text)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == "echo"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "fail"}]})
        assert r.status_code == 503 and r.json()["error"]["message"] == "the fake model is down"
        assert r.headers["x-nanofleet-route"] == "local"
    await svc.models.close()
