"""The controller's REST API errors: bounded integers, one error body (documented), 405 with `Allow`, and a bug in
the command service that is logged, counted and answered 500 with an error id (never a silent 502)."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest

from nanofleet.controller.commands import CommandOutcome, UnknownCommand
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from tests.controller.test_web import FLEET, bearer, client, store

__all__ = ["client", "store"]  # fixtures shared with test_web.py (token_and_hash: conftest.py)


async def test_integers_past_sqlite_are_a_422_naming_the_field(client: httpx.AsyncClient, token_and_hash) -> None:
    for since in (9223372036854775808, 2**70, -1):
        r = await client.get(f"/api/devices/pi-1/telemetry?since_ms={since}", headers=bearer(token_and_hash))
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid_request" and "query.since_ms" in r.json()["detail"]
    r = await client.get("/api/devices/pi-1/telemetry?since_ms=253402300799999&resolution=1m",
                         headers=bearer(token_and_hash))
    assert r.status_code == 200 and r.json()["points"] == []


async def test_405_says_which_methods_the_path_takes(client: httpx.AsyncClient, token_and_hash) -> None:
    r = await client.delete("/api/devices/pi-1", headers=bearer(token_and_hash))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json() == {"error": "method_not_allowed", "detail": "DELETE /api/devices/pi-1: Method Not Allowed"}


async def test_openapi_documents_the_one_error_body(client: httpx.AsyncClient, token_and_hash) -> None:
    schema = (await client.get("/openapi.json", headers=bearer(token_and_hash))).json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    telemetry = schema["paths"]["/api/devices/{device_id}/telemetry"]["get"]
    assert telemetry["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorOut"}
    since = next(p for p in telemetry["parameters"] if p["name"] == "since_ms")
    assert since["schema"]["anyOf"][0]["maximum"] == 253402300799999


class _Commands:
    """A command service answering with a function (as agent/runtime/fake.py does for backends)."""

    def __init__(self, fail: BaseException) -> None:
        self.fail = fail

    async def send(self, device_id: str, kind: str, args: dict[str, str]) -> CommandOutcome:
        raise self.fail


@pytest.mark.parametrize(("fail", "status", "code"), [
    (KeyError("a bug"), 500, "internal_error"),
    (TimeoutError("ping to pi-1: no acknowledgement within 1s"), 504, "command_timeout"),
    (UnknownCommand("unknown command 'ping'"), 422, "unknown_command"),
])
async def test_command_service_errors_map_to_their_status_and_bugs_are_logged(
        store: Store, token_and_hash, caplog: pytest.LogCaptureFixture, fail: BaseException, status: int,
        code: str) -> None:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], commands=_Commands(fail))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        with caplog.at_level(logging.ERROR, logger="nanofleet.controller.web"):
            r = await c.post("/api/devices/pi-1/commands", json={"kind": "ping"}, headers=bearer(token_and_hash))
    assert r.status_code == status and r.json()["error"] == code, r.text
    body: dict[str, Any] = r.json()
    if status == 500:
        error_id = re.search(r"error id ([0-9a-f]{12})", body["detail"]).group(1)  # type: ignore[union-attr]
        assert "a bug" not in body["detail"]  # internals stay in the log
        record = next(rec for rec in caplog.records if error_id in rec.getMessage())
        assert record.exc_info is not None and "KeyError" in caplog.text
        assert app.state.errors["internal_error"] == 1
    else:
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


async def test_command_kind_must_be_a_json_string(store: Store, token_and_hash) -> None:
    app = create_app(store, FLEET, operator_token_hash=token_and_hash[1], commands=_Commands(KeyError()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
        r = await c.post("/api/devices/pi-1/commands", json={"kind": "ping", "args": {"n": 1}},
                         headers=bearer(token_and_hash))
    assert r.status_code == 422 and "body.args.n" in r.json()["detail"]


async def test_a_bug_anywhere_is_a_500_in_the_one_error_body(tmp_path, token_and_hash,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A store that breaks (here: closed under the app) gives the error body with an id, logged and counted."""
    broken = Store(tmp_path / "broken.db")
    broken.close()
    app = create_app(broken, FLEET, operator_token_hash=token_and_hash[1])
    assert app.state.errors["store_groups"] == 1  # giving it fleet.yaml's groups failed: counted, still served
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
        with caplog.at_level(logging.ERROR, logger="nanofleet.controller.web"):
            r = await c.get("/api/devices", headers=bearer(token_and_hash))
    assert r.status_code == 500 and r.json()["error"] == "internal_error", r.text
    error_id = re.search(r"error id ([0-9a-f]{12})", r.json()["detail"]).group(1)  # type: ignore[union-attr]
    assert any(error_id in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert app.state.errors["internal_error"] == 1
