"""The gateway end to end: real grpc.aio server and client, the real google-genai client, a fake Gemini at the wire."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import grpc
import pytest

from nanofleet.controller.gateway.usage import UsageStore
from nanofleet.protos import inference_pb2

from .conftest import MakeGateway, request
from .fake_gemini import Reply, answer, error, rate_limited


def _seconds_to_midnight() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


async def test_generate_sends_gemini_request_and_accounts_usage(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    client = gw.client("dev-1")
    response = await client.generate("what is two plus two", system="be brief", app_id="com.example.chat",
                                     config={"temperature": 0.25, "max_output_tokens": 64, "top_k": 5})
    assert response.text == "echo: what is two plus two"
    assert response.finish_reason == "stop"
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (5, 6, 11)
    [sent] = gw.fake.calls()
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.headers["x-goog-api-key"] == "test-key"
    body = sent.body
    assert body["contents"] == [{"role": "user", "parts": [{"text": "what is two plus two"}]}]
    assert body["systemInstruction"]["parts"] == [{"text": "be brief"}]
    config = body["generationConfig"]
    assert config["temperature"] == 0.25 and config["maxOutputTokens"] == 64 and config["topK"] == 5
    thinking = config["thinkingConfig"]
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 0  # fleet.yaml default
    rows = await asyncio.to_thread(lambda: UsageStore(gw.gateway.db_path).summary())
    [row] = rows
    assert (row.device_id, row.app_id, row.model, row.requests, row.input_tokens, row.output_tokens) == (
        "dev-1", "com.example.chat", "gemini-2.5-flash", 1, 5, 6)
    assert row.cost_usd == pytest.approx((5 * 0.30 + 6 * 2.50) / 1e6)
    assert row.day == dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


async def test_device_thinking_budget_and_assistant_turns_reach_gemini(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    req = inference_pb2.GenerateRequest(messages=[
        inference_pb2.ChatMessage(role="user", content="hi"),
        inference_pb2.ChatMessage(role="assistant", content="hello"),
        inference_pb2.ChatMessage(role="user", content="again")],
        config=inference_pb2.GenerationConfig(thinking_budget=512))
    client = gw.client("dev-1")
    await client.stub.Generate(req, metadata=client.metadata, timeout=5)
    body = gw.fake.calls()[0].body
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    thinking = body["generationConfig"]["thinkingConfig"]
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 512
    assert "systemInstruction" not in body


async def test_stream_goes_over_sse_and_ends_with_usage(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    chunks = await gw.client("dev-1").stream("one two three", request_id="s-1")
    assert "".join(c.text for c in chunks) == "echo: one two three"
    assert len([c for c in chunks if c.text]) == 4  # one per upstream event: streamed, not buffered
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage.output_tokens == 4 and last.usage.input_tokens == 5
    assert all(not c.finish_reason for c in chunks[:-1])
    [sent] = gw.fake.calls()
    assert (sent.path, sent.query) == ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "alt=sse")


async def test_count_tokens(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    client = gw.client("dev-1")
    req = inference_pb2.CountTokensRequest(system_instruction="be brief",
                                           messages=[inference_pb2.ChatMessage(role="user", content="a b c")])
    response = await client.stub.CountTokens(req, metadata=client.metadata, timeout=5)
    assert response.total_tokens == 5
    assert gw.fake.calls()[0].path == "/v1beta/models/gemini-2.5-flash:countTokens"


async def test_auth_missing_unknown_revoked(make_gateway: MakeGateway) -> None:
    from nanofleet.controller.gateway.auth import revoke_token

    gw = await make_gateway()
    with pytest.raises(grpc.aio.AioRpcError) as no_token:
        await gw.client(None).generate()
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await gw.client(token="nft_not-a-real-token").generate()
    assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED
    client = gw.client("dev-1")
    await client.generate()
    assert revoke_token(gw.gateway.db_path, "dev-1") == 1
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await client.generate()
    assert revoked.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in revoked.value.details()
    other_fleet = gw.client(token=gw.token("dev-9", fleet="elsewhere"))
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await other_fleet.generate()
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED and "elsewhere" in foreign.value.details()
    assert len(gw.fake.calls()) == 1


@pytest.mark.parametrize(("device", "group", "kw", "reason"), [
    ("clinic-1", None, {}, "cloud denied by policy"),
    ("tablet-77", "clinic-tablets", {}, "cloud denied by policy"),  # unlisted device: its token's group applies
    ("dev-1", None, {"sensitive": True}, "marked sensitive"),
    ("dev-1", None, {"app_id": "com.example.notes"}, "'com.example.notes' is sensitive"),
])
async def test_policy_refusals_never_reach_upstream(make_gateway: MakeGateway, device: str, group: str | None,
                                                    kw: dict[str, object], reason: str) -> None:
    gw = await make_gateway()
    client = gw.client(device, group=group)
    for call in (client.generate, client.stream):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(**kw)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason in refused.value.details()
    assert gw.fake.calls() == []
    assert gw.gateway.service is not None and gw.gateway.service.refusals["FAILED_PRECONDITION"] == 2


def _retry_after(exc: grpc.aio.AioRpcError) -> int:
    return int(dict(exc.trailing_metadata() or ())["retry-after"])


@pytest.mark.parametrize(("budgets", "app", "scope"), [
    ({"device_budget": 12}, "com.example.chat", "device"),
    ({"fleet_budget": 12}, "com.example.chat", "fleet"),
    ({}, "com.example.small", "app"),  # routing.apps[app].tokens_per_day = 10
])
async def test_budget_exhausted_until_next_utc_day(make_gateway: MakeGateway, budgets: dict[str, int], app: str,
                                                   scope: str) -> None:
    gw = await make_gateway(**budgets)
    client = gw.client("dev-1")
    # "a" reserves 5 (its UTF-8 byte + 4) + the output that fits; the fake answers 5 + 2 ("echo: a") = 7 tokens
    await client.generate("a", app_id=app)
    with pytest.raises(grpc.aio.AioRpcError) as over:  # 12 - 7 leaves no room for a 5-token prompt + 1
        await client.generate("a", app_id=app)
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{scope} cloud budget exhausted" in over.value.details()
    delay = _retry_after(over.value)
    assert abs(delay - _seconds_to_midnight()) < 5
    assert f"retry in {delay}s" in over.value.details()
    assert _used(gw.gateway.db_path) == 7
    if scope == "app":  # another app of the same device still has budget
        await client.generate("a", app_id="com.example.chat")


def _used(store: object) -> int:
    usage = UsageStore(store)  # type: ignore[arg-type]
    try:
        return sum(r.input_tokens + r.output_tokens for r in usage.summary())
    finally:
        usage.close()


async def test_the_output_is_capped_at_what_the_budget_has_left(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(device_budget=7)
    client = gw.client("dev-1")
    answer = await client.generate("a", config={"max_output_tokens": 50})  # reserves 5 (prompt bound) + 2
    assert gw.fake.calls()[0].body["generationConfig"]["maxOutputTokens"] == 2
    assert answer.usage.total_tokens == 7 == _used(gw.gateway.db_path)
    with pytest.raises(grpc.aio.AioRpcError) as over:
        await client.generate("a")
    assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(gw.fake.calls()) == 1


async def test_a_call_without_max_output_tokens_is_capped_at_the_output_reserve(make_gateway: MakeGateway) -> None:
    from nanofleet.controller.gateway.budgets import OUTPUT_RESERVE

    gw = await make_gateway()
    await gw.client("dev-1").generate("a b")
    assert gw.fake.calls()[0].body["generationConfig"]["maxOutputTokens"] == OUTPUT_RESERVE


async def test_gemini_429_passes_its_retry_delay_without_retrying(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(rate_limited(36.7))
    with pytest.raises(grpc.aio.AioRpcError) as limited:
        await gw.client("dev-1").generate()
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Please retry in 36.7s" in limited.value.details()
    assert _retry_after(limited.value) == 37
    assert len(gw.fake.calls()) == 1


async def test_5xx_is_retried_with_backoff_then_unavailable(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    overloaded = Reply(503, error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."))
    gw.fake.push(overloaded, Reply(500, error(500, "INTERNAL", "boom")))
    response = await gw.client("dev-1").generate("recovered")
    assert response.text == "echo: recovered" and len(gw.fake.calls()) == 3
    gw.fake.push(overloaded, overloaded, overloaded, overloaded)
    with pytest.raises(grpc.aio.AioRpcError) as unavailable:
        await gw.client("dev-2").generate()
    assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "overloaded" in unavailable.value.details()
    assert len(gw.fake.calls()) == 6  # 1 + max_retries (2), not google-genai's own 5 attempts


async def test_400_is_invalid_argument_with_gemini_message(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(Reply(400, error(400, "INVALID_ARGUMENT", "Invalid value at 'generation_config.temperature'")))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await gw.client("dev-1").generate()
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Invalid value at 'generation_config.temperature'" in bad.value.details()
    assert len(gw.fake.calls()) == 1


async def test_bad_device_requests_name_the_field(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    client = gw.client("dev-1")
    cases = [
        (inference_pb2.GenerateRequest(), "messages: at least one"),
        (inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="robot", content="x")]),
         "messages[0].role"),
        (inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="user", content="x")],
                                       config=inference_pb2.GenerationConfig(temperature=7)), "config.temperature"),
        (inference_pb2.GenerateRequest(messages=[inference_pb2.ChatMessage(role="user", content="x")],
                                       model="gemini-2.5-pro"), "model: 'gemini-2.5-pro' is not offered"),
    ]
    for req, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.stub.Generate(req, metadata=client.metadata, timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in bad.value.details()
    assert gw.fake.calls() == []


@pytest.mark.parametrize("reply", [
    Reply(body=b"<html>proxy error</html>"),
    Reply(body={"candidates": "not-a-list"}),
    Reply(body={"usageMetadata": {"promptTokenCount": 1}}),  # no candidates, no promptFeedback
    Reply(body={"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}]}),  # no usage
])
async def test_malformed_gemini_answers_are_unavailable_not_crashes(make_gateway: MakeGateway, reply: Reply) -> None:
    gw = await make_gateway()
    gw.fake.push(reply)
    client = gw.client("dev-1")
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await client.generate()
    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "malformed upstream answer" in broken.value.details()
    assert (await client.generate("still alive")).text == "echo: still alive"


async def test_malformed_stream_event_fails_the_stream_not_the_gateway(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(Reply(chunks=[answer("first ", finish=None), b"data: {not json\r\n\r\n", answer("never")]))
    client = gw.client("dev-1")
    call = client.stub.GenerateStream(inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content="x")]), metadata=client.metadata, timeout=5)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        async for chunk in call:
            got.append(chunk.text)
    assert got == ["first "]
    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE and "malformed" in broken.value.details()
    assert [c.text for c in await client.stream("ok")][-2] == "ok"


async def test_same_request_id_one_upstream_call_even_concurrently(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    client = gw.client("dev-1")
    gw.fake.push(Reply(delay=0.3))
    answers = await asyncio.gather(*(client.generate("once", request_id="r-1") for _ in range(5)))
    assert len(gw.fake.calls()) == 1
    assert all(a == answers[0] for a in answers) and answers[0].request_id == "r-1"
    again = await client.generate("once", request_id="r-1")
    assert again == answers[0] and len(gw.fake.calls()) == 1
    replayed = await client.stream("once", request_id="r-1")
    assert [c.text for c in replayed] == ["echo: once"] and replayed[0].usage == answers[0].usage
    assert len(gw.fake.calls()) == 1
    await gw.client("dev-2").generate("once", request_id="r-1")  # the key is per device
    assert len(gw.fake.calls()) == 2
    rows = await asyncio.to_thread(lambda: UsageStore(gw.gateway.db_path).summary())
    assert sum(r.requests for r in rows) == 2  # charged once per upstream call


async def test_retry_after_a_deadline_gets_the_answer_without_a_second_call(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(Reply(delay=0.8))
    client = gw.client("dev-1")
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await client.generate("slow", request_id="slow-1", deadline=0.3)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    retried = await client.generate("slow", request_id="slow-1", deadline=5)
    assert retried.text == "echo: slow" and len(gw.fake.calls()) == 1


async def test_idempotency_survives_restart(make_gateway: MakeGateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nanofleet.controller.gateway.server import Gateway

    gw = await make_gateway()
    token = gw.token("dev-1")
    first = await gw.client(token=token).generate("persist", request_id="p-1")
    await gw.gateway.stop(grace=0.5)
    gw.gateway = Gateway(gw.gateway.config, gw.gateway.data_dir, env={"GEMINI_API_KEY": "k"}, auth_cache_ttl=0)
    await gw.gateway.start()  # the fixture stops it
    assert await gw.client(token=token).generate("persist", request_id="p-1") == first
    assert len(gw.fake.calls()) == 1


async def test_deadline_is_honoured(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(Reply(delay=3))
    client = gw.client("dev-1")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await client.generate(deadline=0.4)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2
    assert (await client.generate("next")).text == "echo: next"


async def test_gateway_caps_every_call_at_the_upstream_timeout(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(upstream_timeout=0.5)
    gw.fake.push(Reply(delay=3), Reply(chunks=[answer("a ", finish=None), answer("b")], chunk_delay=3))
    client = gw.client("dev-1")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:  # no client deadline at all: the gateway's cap applies
        await client.stub.Generate(request("x"), metadata=client.metadata)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline exceeded" in late.value.details()
    call = client.stub.GenerateStream(request("x"), metadata=client.metadata, timeout=30)
    assert (await call.read()).text == "a "
    with pytest.raises(grpc.aio.AioRpcError) as late_stream:
        await call.read()
    assert late_stream.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    assert len(gw.fake.calls()) == 2  # a deadline is not retried


async def test_concurrent_duplicate_streams_share_one_upstream_call(make_gateway: MakeGateway) -> None:
    gw = await make_gateway()
    gw.fake.push(Reply(chunks=[answer("one ", finish=None), answer("two", output_tokens=2)], chunk_delay=0.2))
    client = gw.client("dev-1")
    both = await asyncio.gather(client.stream("x", request_id="dup"), client.stream("x", request_id="dup"))
    follower, leader = sorted(both, key=len)  # whichever came first streamed live; the other got the replay
    assert [c.text for c in leader if c.text] == ["one ", "two"]
    assert [c.text for c in follower] == ["one two"] and follower[0].usage == leader[-1].usage
    assert len(gw.fake.calls()) == 1


async def test_tls(make_gateway: MakeGateway, tls) -> None:  # type: ignore[no-untyped-def]
    gw = await make_gateway(listen="localhost:0", tls_cert=tls.cert, tls_key=tls.key)
    response = await gw.client("dev-1", ca=tls.ca).generate("secure")
    assert response.text == "echo: secure"
    plain = gw.client("dev-1")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await plain.generate(deadline=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_plaintext_off_loopback_is_refused(fake_gemini, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nanofleet.config import parse_fleet
    from nanofleet.controller.gateway.server import Gateway, ListenError

    with pytest.raises(ListenError, match="plaintext"):
        Gateway(parse_fleet("fleet: t"), tmp_path, listen="0.0.0.0:0")

