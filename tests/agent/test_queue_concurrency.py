"""Issue #12, in the dispatcher: under 200 concurrent clients, a request the busy local model could not take must
not fall back to an unreachable cloud and come back `503 cloud_unavailable, Retry-After: 60` — only the local
route can serve soon, so the honest answer is `429` with the local model's short Retry-After."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.tcp import free_port
from tests.agent.conftest import uds_client


async def test_busy_local_model_answers_429_not_cloud_unavailable(make_settings: Callable[..., AgentSettings]
                                                                  ) -> None:
    settings = make_settings(gateway_address=f"127.0.0.1:{free_port()}")
    svc = AgentService(settings, warmup=False, max_waiting=4)
    await svc.start()
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "ignore_eos": True,
                "nanofleet": {"queue": "deny"}}
        async with uds_client(settings.socket_path, limits=None) as c:
            answers: list[Any] = await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(200)))
        seen = Counter((r.status_code, r.json().get("error", {}).get("code") if r.status_code != 200 else "")
                       for r in answers)
        assert seen[(200, "")] >= 2, seen
        for r in answers:
            if r.status_code == 200:
                continue
            assert (r.status_code, r.json()["error"]["code"]) == (429, "busy"), (seen, r.headers)
            assert r.headers["x-nanofleet-route"] == "local"
            assert 1 <= int(r.headers["retry-after"]) <= 5, r.headers
    finally:
        await svc.stop()
