"""The queue's bounds come from the controller's policy (`queue.max_items`, `queue.ttl`, `queue.max_bytes` in
fleet.yaml), and replace the agent's own settings once a policy is applied."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.config import parse_fleet
from nanofleet.controller import policy
from nanofleet.protos import fleet_pb2


def chat(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4}


async def test_the_policy_byte_bound_turns_away_what_does_not_fit(make_settings: Callable[..., AgentSettings]) -> None:
    cfg = parse_fleet("fleet: demo\ndefaults:\n  routing: {min_free_ram_mb: 1048576}\n"
                      "  queue: {max_items: 100, ttl: 2h, max_bytes: 2048}\n")
    compiled = policy.compile_policy(cfg, "dev-test", 3)
    assert (compiled.queue_max_items, compiled.queue_ttl_s, compiled.queue_max_bytes) == (100, 7200, 2048)
    svc = AgentService(make_settings(), warmup=False)  # its own bound: 64 MiB
    assert svc.queue.limits.max_bytes == 64 << 20
    await svc.apply_policy(compiled)  # no RAM is ever enough: every request waits in the queue
    assert (svc.queue.limits.max_items, svc.queue.limits.max_bytes, svc.queue.limits.ttl_s) == (100, 2048, 7200)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://a") as c:
        small = await c.post("/v1/chat/completions", json=chat("hi"))
        assert (small.status_code, small.headers["x-nanofleet-reason"]) == (202, "low_ram"), small.text
        big = await c.post("/v1/chat/completions", json=chat("x" * 4000))
        assert big.status_code == 429 and big.json()["error"]["code"] == "queue_full", big.text
    await svc.apply_policy(fleet_pb2.RoutingPolicy(fleet="demo", device_id="dev-test", version=4))
    assert svc.queue.limits.max_bytes == 2048  # a policy without a byte bound keeps the one in force
    await svc.stop()
