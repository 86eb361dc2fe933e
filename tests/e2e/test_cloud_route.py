"""The cloud route end to end, as real processes: app → agent (unix socket) → gRPC → gateway → HTTP → fake Gemini.

A fake Gemini (tests/gateway/fake_gemini.py: a real HTTP server on loopback speaking Gemini's REST API, running in
this process so the test can script it and count what reached it), `nanofleet gateway serve` pointed at it (the API
key only in the gateway's environment), and two `nanofleet agent` processes with device tokens: `phone-1` (cloud
allowed) and `clinic-7` (token issued for group `clinic-tablets`, whose fleet.yaml routing denies the cloud; the agent
itself has no MQTT, so its own policy stays the permissive default and only the gateway can refuse it).

The tests run in file order; the last one stops and restarts the gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.gateway.server import DB_NAME
from nanofleet.controller.gateway.usage import UsageRow, UsageStore
from tests.conftest import free_port, wait_for
from tests.e2e.cloud_procs import Agent, Proc, agent_proc, gateway_proc, write_fleet
from tests.gateway.fake_gemini import FakeGemini, rate_limited

pytestmark = pytest.mark.e2e

API_KEY = "e2e-gemini-key"
MODEL = "gemini-2.5-flash"
CLOUD_ONLY = {"mode": "cloud_only"}


@dataclass
class Stack:
    fake: FakeGemini
    gateway: Proc
    gateway_dir: Path
    phone: Agent
    clinic: Agent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cloud")
    fake = FakeGemini()
    port = free_port()
    address = f"127.0.0.1:{port}"
    gw_dir = tmp / "gateway-data"
    fleet = write_fleet(tmp / "fleet.yaml", fake.base_url, "127.0.0.1:0")
    # tokens go into DATA_DIR/gateway.db before the gateway starts, as `nanofleet enroll` does
    phone = agent_proc(tmp, "phone-1", address, issue_token(gw_dir / DB_NAME, "phone-1", "e2e"), tiny_gguf)
    clinic = agent_proc(tmp, "clinic-7", address,
                        issue_token(gw_dir / DB_NAME, "clinic-7", "e2e", "clinic-tablets"), tiny_gguf)
    gateway = gateway_proc(tmp, fleet, gw_dir, port, API_KEY)
    procs = [gateway, phone.proc, clinic.proc]
    try:
        for p in procs:  # start all three at once: their imports overlap
            p.start()
        for p in procs:
            p.wait_ready()
        yield Stack(fake, gateway, gw_dir, phone, clinic)
    finally:
        codes = {p.name: p.stop() for p in procs}
        fake.close()
    assert codes["gateway"] == 0, gateway.output()
    assert codes["agent phone-1"] == 0, phone.proc.output()
    assert codes["agent clinic-7"] == 0, clinic.proc.output()


def chat(client: httpx.Client, text: str, hints: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
         **body: Any) -> httpx.Response:
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "max_tokens": 16, **body}
    if hints is not None:
        payload["nanofleet"] = hints
    return client.post("/v1/chat/completions", json=payload, headers=headers or {})


def sse_events(r: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]  # type: ignore[no-any-return]


def usage_of(store_path: Path, device: str) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens) the gateway accounted to `device`, all days."""
    store = UsageStore(store_path)
    try:
        rows: list[UsageRow] = [r for r in store.summary() if r.device_id == device]
    finally:
        store.close()
    return sum(r.requests for r in rows), sum(r.input_tokens for r in rows), sum(r.output_tokens for r in rows)


# -- 1. cloud_only reaches Gemini --------------------------------------------------------------------------------


def test_cloud_only_in_the_body_is_answered_by_gemini_through_the_gateway(stack: Stack) -> None:
    before = len(stack.fake.calls())
    with stack.phone.client() as c:
        r = chat(c, "hello from the phone", CLOUD_ONLY)
    assert r.status_code == 200, r.text
    assert r.headers["x-nanofleet-route"] == "cloud"
    assert r.headers["x-nanofleet-reason"] == "cloud_only"
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "echo: hello from the phone"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["model"] == MODEL
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 5  # the fake's counts
    calls = stack.fake.calls()[before:]
    assert len(calls) == 1, calls
    assert (calls[0].rpc, calls[0].model) == ("generateContent", MODEL)
    assert calls[0].headers.get("x-goog-api-key") == API_KEY  # the gateway's key; the agent never had one
    assert calls[0].body["contents"][-1]["parts"][0]["text"] == "hello from the phone"


def test_cloud_only_as_a_header_is_honoured_and_the_body_hint_wins_over_it(stack: Stack) -> None:
    before = len(stack.fake.calls())
    with stack.phone.client() as c:
        r = chat(c, "header routed", headers={"X-Nanofleet-Mode": "cloud_only"})
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud", "cloud_only")
        assert r.json()["choices"][0]["message"]["content"] == "echo: header routed"
        assert len(stack.fake.calls()) == before + 1
        # body hints win over headers: this one stays on the device
        r = chat(c, "stay here", {"mode": "local_only"}, headers={"X-Nanofleet-Mode": "cloud_only"}, max_tokens=4)
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("local", "local_only")
        # a bad header value is a 400 naming the header, and nothing is sent anywhere
        r = chat(c, "typo", headers={"X-Nanofleet-Mode": "cloud-only"})
        assert r.status_code == 400, r.text
        assert error_of(r)["param"] == "X-Nanofleet-Mode" and "cloud_only" in error_of(r)["message"]
    assert len(stack.fake.calls()) == before + 1


def test_a_streamed_cloud_answer_arrives_in_chunks_and_ends_in_done(stack: Stack) -> None:
    before = len(stack.fake.calls())
    with stack.phone.client() as c, c.stream(
        "POST", "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "stream this to me"}], "stream": True,
              "stream_options": {"include_usage": True}, "nanofleet": CLOUD_ONLY},
    ) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud", "cloud_only")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == "echo: stream this to me"
    assert sum(1 for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content")) > 1  # streamed
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"] and
            ch["choices"][0]["finish_reason"]] == ["stop"]
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 5
    calls = stack.fake.calls()[before:]
    assert [(x.rpc, x.model, x.query) for x in calls] == [("streamGenerateContent", MODEL, "alt=sse")]


# -- 2. sensitive never leaves the device ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["body", "header"])
def test_sensitive_and_cloud_only_never_reaches_gemini(stack: Stack, how: str) -> None:
    before = len(stack.fake.calls())
    with stack.phone.client() as c:
        if how == "body":
            r = chat(c, "my diagnosis", {"mode": "cloud_only", "privacy": "sensitive"})
        else:
            r = chat(c, "my diagnosis", headers={"X-Nanofleet-Mode": "cloud_only", "X-Nanofleet-Privacy": "sensitive"})
        # the agent refuses outright (no route may ever serve it) rather than queueing or trying the cloud: a 4xx
        assert r.status_code == 403, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("reject", "sensitive")
        err = error_of(r)
        assert (err["code"], err["type"]) == ("route_forbidden", "permission_error") and "sensitive" in err["message"]
        assert "retry-after" not in r.headers  # retrying cannot help
    assert len(stack.fake.calls()) == before


# -- 3. the gateway enforces the fleet's policy whatever the device thinks ----------------------------------------


def test_a_cloud_denied_group_is_refused_by_the_gateway_not_the_device(stack: Stack) -> None:
    before = len(stack.fake.calls())
    with stack.clinic.client() as c:
        status = c.get("/v1/status").json()
        # the device's own view: default policy, cloud configured and allowed — it will try
        assert status["policy_version"] == 0 and status["routes"]["cloud"]["configured"] is True
        r = chat(c, "patient notes", CLOUD_ONLY)
        assert r.status_code == 403, r.text
        # the router chose the cloud (so the device did not refuse it); the gateway's answer says why it refused
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud", "cloud_denied")
        assert "retry-after" not in r.headers
        err = error_of(r)
        assert (err["code"], err["type"]) == ("cloud_refused", "permission_error"), err
        assert "cloud denied by policy for device 'clinic-7'" in err["message"], err

        # prefer_cloud: the refusal comes before any token, so the local model answers instead
        r = chat(c, "notes, anywhere", {"mode": "prefer_cloud"}, max_tokens=4)
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("local", "fallback_cloud_refused")
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "stream, anywhere"}], "max_tokens": 4, "stream": True,
                "nanofleet": {"mode": "prefer_cloud"}}) as r:
            assert r.status_code == 200, r.read()
            assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (
                "local", "fallback_cloud_refused")
            events = sse_events(r)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    assert len(stack.fake.calls()) == before
    assert usage_of(stack.gateway_dir / DB_NAME, "clinic-7") == (0, 0, 0)


# -- 4. Gemini's 429 comes back as a retry hint -------------------------------------------------------------------


def test_gemini_rate_limit_reaches_the_app_as_429_with_retry_after(stack: Stack) -> None:
    before = len(stack.fake.calls())
    stack.fake.push(rate_limited(7))  # "… Please retry in 7s." + RetryInfo 7s
    with stack.phone.client() as c:
        r = chat(c, "are you there", CLOUD_ONLY)
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "7"
    assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("cloud", "rate_limited")
    err = error_of(r)
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limited")  # not the local slots' `busy`
    assert "retry in 7" in err["message"].lower()
    assert len(stack.fake.calls()) == before + 1  # the gateway does not retry a 429 itself: the delay goes back


def test_a_rate_limited_stream_fails_before_its_first_chunk_with_the_same_hint(stack: Stack) -> None:
    stack.fake.push(rate_limited(7))
    with stack.phone.client() as c, c.stream(
        "POST", "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "stream?"}], "stream": True, "nanofleet": CLOUD_ONLY},
    ) as r:
        r.read()
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "7" and r.headers["x-nanofleet-route"] == "cloud"
    assert r.headers["x-nanofleet-reason"] == "rate_limited" and error_of(r)["code"] == "rate_limited"


def test_prefer_cloud_falls_back_to_the_local_model_when_gemini_is_rate_limited(stack: Stack) -> None:
    before = len(stack.fake.calls())
    stack.fake.push(rate_limited(7))
    with stack.phone.client() as c:
        r = chat(c, "anyone", {"mode": "prefer_cloud"}, max_tokens=4)
    assert r.status_code == 200, r.text
    assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("local", "fallback_rate_limited")
    assert len(stack.fake.calls()) == before + 1


# -- 6. usage accounting ------------------------------------------------------------------------------------------


def test_the_gateway_accounts_the_devices_cloud_tokens(stack: Stack) -> None:
    db = stack.gateway_dir / DB_NAME
    before = usage_of(db, "phone-1")  # the cloud answers of the tests above; checked as deltas so it runs alone too
    with stack.phone.client() as c:
        unary = chat(c, "count my tokens please", CLOUD_ONLY)
        assert unary.status_code == 200, unary.text
        with c.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "and these"}], "stream": True,
                "stream_options": {"include_usage": True}, "nanofleet": CLOUD_ONLY}) as r:
            events = sse_events(r)
    streamed = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")][-1]
    u = unary.json()["usage"]
    expect = (before[0] + 2, before[1] + u["prompt_tokens"] + streamed["prompt_tokens"],
              before[2] + u["completion_tokens"] + streamed["completion_tokens"])
    wait_for(lambda: usage_of(db, "phone-1") == expect, timeout=5,
             what=f"phone-1's usage to become {expect} (is {usage_of(db, 'phone-1')})")
    store = UsageStore(db)
    try:
        rows = [r for r in store.summary() if r.device_id == "phone-1"]
    finally:
        store.close()
    assert {r.model for r in rows} == {MODEL} and all(r.cost_usd > 0 for r in rows)
    assert usage_of(db, "clinic-7") == (0, 0, 0)  # refused calls cost nothing


# -- 5. gateway down ----------------------------------------------------------------------------------------------


def test_with_the_gateway_down_local_still_answers_and_cloud_only_fails_fast(stack: Stack) -> None:
    assert stack.gateway.stop() == 0, stack.gateway.output()
    before = len(stack.fake.calls())
    with stack.phone.client() as c:
        r = chat(c, "local please", headers={"X-Nanofleet-Mode": "prefer_local"}, max_tokens=4)
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("local", "prefer_local")

        # first the call fails at connect (refused: no waiting for the 30 s deadline); from then on the router
        # knows the gateway is away and answers without trying. One outage, one error shape: only the route says
        # whether the cloud was tried; Retry-After counts down to the breaker's next probe (cooldown 5 s).
        # (`queue: deny`: allowed to wait, the second would be queued — tests/e2e/test_queue_faults.py)
        # (gRPC's round_robin words it "connections to all backends failing … Connection refused")
        expected = [("cloud", "unavailable: connections to all backends failing"), ("reject", "(gateway_unreachable)")]
        for route, says in expected:
            t0 = time.monotonic()
            r = chat(c, "cloud please", {**CLOUD_ONLY, "queue": "deny"})
            elapsed = time.monotonic() - t0
            assert elapsed < 10, f"{route}: took {elapsed:.1f}s"
            assert r.status_code == 503, r.text
            assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == (route, "gateway_unreachable")
            assert error_of(r)["code"] == "cloud_unavailable", r.text
            assert 1 <= int(r.headers["retry-after"]) <= 5, r.headers
            assert says in error_of(r)["message"], r.text

        r = chat(c, "cloud if you can", {"mode": "prefer_cloud"}, max_tokens=4)
        assert r.status_code == 200, r.text
        assert (r.headers["x-nanofleet-route"], r.headers["x-nanofleet-reason"]) == ("local", "gateway_unreachable")
    assert len(stack.fake.calls()) == before


def test_the_cloud_route_comes_back_when_the_gateway_does(stack: Stack) -> None:
    if not stack.gateway.alive():
        stack.gateway.start().wait_ready()
    before = len(stack.fake.calls())

    def answered() -> httpx.Response | None:
        # `queue: deny`: a poll allowed to wait would be queued (202) and drained by the agent itself as soon as
        # the breaker's cooldown ends — more Gemini calls than this one (tests/e2e/test_queue_faults.py covers that)
        with stack.phone.client() as c:
            r = chat(c, "back again", {**CLOUD_ONLY, "queue": "deny"})
        return r if r.status_code == 200 else None

    # the breaker's cooldown is 5 s: by then the agent must try the gateway again
    r = wait_for(answered, timeout=8, interval=0.25, what="cloud_only to be answered again")
    assert isinstance(r, httpx.Response)
    assert r.headers["x-nanofleet-route"] == "cloud"
    assert r.json()["choices"][0]["message"]["content"] == "echo: back again"
    assert len(stack.fake.calls()) == before + 1
