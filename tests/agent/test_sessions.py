"""Prompt-API sessions: settings, prompt cache reuse, overflow dropping oldest turns, clone, delete, streaming."""

from __future__ import annotations

import httpx

from tests.agent.conftest import sse_events


async def new_session(c: httpx.AsyncClient, **body) -> dict:
    r = await c.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


async def prompt(c: httpx.AsyncClient, sid: str, text: str, **kw) -> dict:
    r = await c.post(f"/v1/sessions/{sid}/prompt", json={"prompt": text, "ignore_eos": True, **kw})
    assert r.status_code == 200, r.text
    assert r.headers["x-nanofleet-route"] == "local"
    return r.json()


async def test_create_reports_settings_and_context(asgi: httpx.AsyncClient) -> None:
    s = await new_session(asgi, system_prompt="You are terse.", temperature=0.2, top_k=5)
    assert s["id"].startswith("sess_")
    assert (s["temperature"], s["top_k"], s["context_window"]) == (0.2, 5, 512)
    assert 0 < s["context_usage"] < 512


async def test_second_turn_reuses_the_prompt_cache(asgi: httpx.AsyncClient) -> None:
    s = await new_session(asgi, system_prompt="You are a helpful assistant on a small device. " * 3)
    first = await prompt(asgi, s["id"], "Tell me about the weather today, please.", max_tokens=8)
    second = await prompt(asgi, s["id"], "And tomorrow?", max_tokens=8)
    u1, u2 = first["usage"], second["usage"]
    assert u1["prompt_tokens_processed"] == u1["prompt_tokens"]  # nothing cached yet
    assert u2["prompt_tokens_details"]["cached_tokens"] >= u1["prompt_tokens"]  # the whole first turn is reused
    assert u2["prompt_tokens_processed"] <= u2["prompt_tokens"] - u1["prompt_tokens"]
    assert second["context_usage"] == u2["prompt_tokens"] + u2["completion_tokens"]
    assert second["context_window"] == 512 and second["context_overflow"] is False


async def test_overflow_drops_oldest_turns_and_says_so(asgi: httpx.AsyncClient) -> None:
    s = await new_session(asgi, system_prompt="SYSTEM RULES")
    answers = [await prompt(asgi, s["id"], f"turn {i} " + "x" * 120, max_tokens=40) for i in range(5)]
    assert answers[0]["context_overflow"] is False
    dropped = [a for a in answers if a["context_overflow"]]
    assert dropped and all(a["dropped_messages"] >= 2 for a in dropped)
    assert all(a["context_usage"] <= 512 for a in answers)
    info = (await asgi.get(f"/v1/sessions/{s['id']}")).json()
    assert info["system_prompt"] == "SYSTEM RULES" and info["turns"] < 10
    assert info["context_usage"] == answers[-1]["context_usage"]


async def test_prompt_that_cannot_fit_is_a_clear_400(asgi: httpx.AsyncClient) -> None:
    s = await new_session(asgi, system_prompt="short")
    r = await asgi.post(f"/v1/sessions/{s['id']}/prompt", json={"prompt": "y" * 700, "max_tokens": 16})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "context window of 512" in err["message"]


async def test_clone_and_delete(asgi: httpx.AsyncClient) -> None:
    s = await new_session(asgi, system_prompt="sys", temperature=0.5, top_k=3)
    await prompt(asgi, s["id"], "one", max_tokens=4)
    r = await asgi.post(f"/v1/sessions/{s['id']}/clone")
    assert r.status_code == 201
    twin = r.json()
    assert twin["id"] != s["id"] and twin["turns"] == 2 and twin["top_k"] == 3
    await prompt(asgi, twin["id"], "two", max_tokens=4)
    assert (await asgi.get(f"/v1/sessions/{s['id']}")).json()["turns"] == 2
    assert (await asgi.get(f"/v1/sessions/{twin['id']}")).json()["turns"] == 4
    r = await asgi.delete(f"/v1/sessions/{s['id']}")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert (await asgi.post(f"/v1/sessions/{s['id']}/prompt", json={"prompt": "x"})).status_code == 404


async def test_streaming_session_prompt_over_the_socket(client: httpx.AsyncClient) -> None:
    s = await new_session(client, system_prompt="sys")
    r = await client.post(f"/v1/sessions/{s['id']}/prompt",
                          json={"prompt": "hello", "stream": True, "max_tokens": 6, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    done = events[-2]
    assert done["object"] == "session.prompt.done" and done["usage"]["completion_tokens"] == 6
    assert done["context_usage"] > 0 and done["context_window"] == 512
    assert all("delta" in e for e in events[:-2])
    assert (await client.get(f"/v1/sessions/{s['id']}")).json()["turns"] == 2
