"""Bad input on the socket API: each case a 4xx with an OpenAI-style error body naming the problem."""

from __future__ import annotations

import httpx

from tests.agent.conftest import CHAT


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, says: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if status in (400, 413) else err["type"])
    if param is not None:
        assert err["param"] == param
    assert says.lower() in err["message"].lower()
    assert "x-nanofleet-route" in r.headers and "x-nanofleet-reason" in r.headers
    return err


async def test_invalid_json(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert assert_error(r, 400, says="invalid JSON")["code"] == "invalid_json"


async def test_body_not_an_object(asgi: httpx.AsyncClient) -> None:
    assert_error(await asgi.post("/v1/chat/completions", json=[1, 2]), 400, says="JSON object")


async def test_wrong_type(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "temperature": "hot"})
    assert_error(r, 400, param="temperature", says="temperature")


async def test_wrong_message_shape(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert_error(r, 400, param="messages.0.role", says="messages.0.role")


async def test_unknown_session(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/sessions/sess_nope/prompt", json={"prompt": "hi"})
    assert assert_error(r, 404, param="session_id", says="sess_nope")["code"] == "session_not_found"
    assert_error(await asgi.delete("/v1/sessions/sess_nope"), 404, param="session_id")


async def test_negative_max_tokens(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "max_tokens": -5})
    assert_error(r, 400, param="max_tokens", says="greater than or equal to 1")


async def test_huge_max_tokens(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100_000})
    assert_error(r, 400, param="max_tokens", says="context window of 512")
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10**12})
    assert_error(r, 400, param="max_tokens")


async def test_empty_messages(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json={"messages": []})
    assert_error(r, 400, param="messages", says="at least 1")
    r = await asgi.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert_error(r, 400, param="messages", says="user")


async def test_missing_messages(asgi: httpx.AsyncClient) -> None:
    assert_error(await asgi.post("/v1/chat/completions", json={"max_tokens": 3}), 400, param="messages",
                 says="required")


async def test_body_over_the_limit(asgi: httpx.AsyncClient) -> None:
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}]}
    err = assert_error(await asgi.post("/v1/chat/completions", json=big), 413, says="over the limit")
    assert err["code"] == "body_too_large"


async def test_bad_routing_hint(asgi: httpx.AsyncClient) -> None:
    r = await asgi.post("/v1/chat/completions", json=CHAT, headers={"X-Nanofleet-Mode": "sideways"})
    assert_error(r, 400, param="X-Nanofleet-Mode", says="prefer_local")
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "nanofleet": {"privacy": "secret"}})
    assert_error(r, 400, param="nanofleet.privacy")


async def test_empty_session_prompt(asgi: httpx.AsyncClient) -> None:
    sid = (await asgi.post("/v1/sessions", json={})).json()["id"]
    assert_error(await asgi.post(f"/v1/sessions/{sid}/prompt", json={"prompt": ""}), 400, param="prompt")


async def test_unknown_path_and_rejections_counted(asgi: httpx.AsyncClient) -> None:
    assert_error(await asgi.get("/v1/nothing"), 404, says="/v1/nothing")
    await asgi.post("/v1/chat/completions", json={"max_tokens": 3})
    assert asgi.service.dispatcher.counts["bad_request"] == 2  # type: ignore[attr-defined]


async def test_strict_booleans_and_numbers(asgi: httpx.AsyncClient) -> None:
    """A public API takes JSON types as they are: "yes" is not true, "5" is not 5 (no pydantic lax mode)."""
    r = await asgi.post("/v1/chat/completions", json={**CHAT, "stream": "yes"})
    assert assert_error(r, 400, param="stream", says="stream")["code"] == "invalid_bool"
    assert_error(await asgi.post("/v1/chat/completions", json={**CHAT, "max_tokens": "5"}), 400, param="max_tokens")
    assert_error(await asgi.post("/v1/chat/completions", json={**CHAT, "temperature": True}), 400,
                 param="temperature")
    assert_error(await asgi.post("/v1/chat/completions", json={**CHAT, "top_k": 2.0}), 400, param="top_k")
    assert_error(await asgi.post("/v1/sessions", json={"temperature": "0.5"}), 400, param="temperature")
    sid = (await asgi.post("/v1/sessions", json={})).json()["id"]
    assert_error(await asgi.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "hi", "stream": 1}), 400,
                 param="stream")
    assert (await asgi.post("/v1/chat/completions", json={**CHAT, "temperature": 1})).status_code == 200


async def test_every_integer_is_bounded(asgi: httpx.AsyncClient) -> None:
    """Integers past what llama.cpp takes (a 32-bit seed) are refused naming the field, never passed down."""
    for field in ("seed",):
        for value in (2**32, -2, 10**30):
            assert_error(await asgi.post("/v1/chat/completions", json={**CHAT, field: value}), 400, param=field)
    sid = (await asgi.post("/v1/sessions", json={})).json()["id"]
    assert_error(await asgi.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "hi", "seed": 2**63}), 400,
                 param="seed")


async def test_405_lists_every_method_of_the_path(asgi: httpx.AsyncClient) -> None:
    r = await asgi.put("/v1/sessions/sess_x")
    assert_error(r, 405)
    assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "DELETE"}
    r = await asgi.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


async def test_openapi_documents_the_statuses_the_api_answers(asgi: httpx.AsyncClient) -> None:
    schema = (await asgi.get("/openapi.json")).json()
    ops = {f"{m.upper()} {p}": op for p, item in schema["paths"].items() for m, op in item.items()}
    assert not [k for k, op in ops.items() if "422" in op["responses"]], "the agent never answers 422"
    chat = ops["POST /v1/chat/completions"]["responses"]
    assert {"400", "403", "413", "429", "503"} <= set(chat)
    assert "Retry-After" in chat["429"]["headers"] and "Retry-After" in chat["503"]["headers"]
    assert chat["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert {"400", "404", "413"} <= set(ops["POST /v1/sessions/{session_id}/prompt"]["responses"])
    assert "404" in ops["DELETE /v1/sessions/{session_id}"]["responses"]
    assert "429" in ops["POST /v1/sessions"]["responses"]


async def test_a_bug_outside_the_chat_path_is_a_json_500(tmp_path, caplog) -> None:
    """Not Starlette's plain-text 500: the OpenAI-style body, logged with its traceback and counted."""
    import logging

    from nanofleet.agent.api import Dispatcher, create_app
    from nanofleet.agent.runtime.lifecycle import ModelManager
    from nanofleet.agent.sessions import SessionStore
    from nanofleet.config import ModelSpec

    class BrokenSessions(SessionStore):
        def create(self, **kwargs: object):  # type: ignore[no-untyped-def]
            raise KeyError("a bug")

    dispatcher = Dispatcher(ModelManager(ModelSpec(), tmp_path / "models", tmp_path / "private", warmup=False))
    app = create_app(dispatcher, BrokenSessions())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as c:
        with caplog.at_level(logging.ERROR, logger="nanofleet.agent.api"):
            r = await c.post("/v1/sessions", json={})
    assert assert_error(r, 500)["code"] == "internal_error"
    assert "a bug" not in r.text and any(rec.exc_info for rec in caplog.records)
    assert dispatcher.counts["internal_error"] == 1
