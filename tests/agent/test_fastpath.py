"""The fast HTTP protocol leans on uvicorn internals: a uvicorn that moved them must be caught by name at start, and
the agent must then (or when told to) serve on uvicorn's stock protocol, correctly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nanofleet.agent.api import fastpath
from nanofleet.agent.api.protocol import AgentHttpProtocol, PeerHttpProtocol
from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from tests.agent.conftest import uds_client


def test_installed_uvicorn_has_everything_the_fast_protocol_uses() -> None:
    # If this fails after a uvicorn upgrade, the message names each internal that moved: adapt protocol.py, or keep
    # the pin in pyproject.toml (the agent falls back to the stock protocol meanwhile, see the tests below).
    assert fastpath.missing_internals() == []
    assert fastpath.choose_http_protocol(True) is AgentHttpProtocol
    assert fastpath.missing_peer_internals() == []  # the stock protocol can carry the peer's uid too


def test_the_stock_protocols_peer_hook_names_what_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_headers_complete(self: Any) -> None:  # a uvicorn that builds its cycles from something else
        self.handler = None

    monkeypatch.setattr(HttpToolsProtocol, "on_headers_complete", on_headers_complete)
    assert fastpath.missing_peer_internals() == ["HttpToolsProtocol.on_headers_complete() reading self.app"]


def test_a_moved_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_message_begin(self: Any) -> None:  # a uvicorn that keeps the URL somewhere else
        self.target = b""

    def shutdown(self: Any) -> None:  # a uvicorn whose shutdown reads a cycle attribute our stand-in lacks
        self.cycle.trailers = None

    monkeypatch.setattr(HttpToolsProtocol, "on_message_begin", on_message_begin)
    monkeypatch.setattr(HttpToolsProtocol, "shutdown", shutdown)
    monkeypatch.delattr(HttpToolsProtocol, "on_response_complete")
    missing = fastpath.missing_internals()
    assert "HttpToolsProtocol.on_response_complete()" in missing
    assert "HttpToolsProtocol.on_message_begin() setting self.url" in missing
    assert any(m.startswith("_HotCycle.trailers") for m in missing)


def test_a_missing_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastpath, "_MODULE", "uvicorn.protocols.http.gone_impl")
    assert fastpath.missing_internals()[0].startswith("module uvicorn.protocols.http.gone_impl")


def test_incompatible_uvicorn_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "on_response_complete")
    with caplog.at_level(logging.WARNING, logger="nanofleet.agent.api"):
        assert fastpath.choose_http_protocol(True) is PeerHttpProtocol  # stock, with the peer's uid
    assert "on_response_complete" in caplog.text and "stock HTTP protocol" in caplog.text
    assert fastpath.choose_http_protocol(False) is PeerHttpProtocol


async def test_the_fallback_switch_serves_on_the_stock_protocol(
        make_settings: Callable[..., AgentSettings]) -> None:
    svc = AgentService(make_settings(http_fast_path=False))
    await svc.start()
    try:
        assert svc._server is not None and svc._server.config.http is PeerHttpProtocol
        async with uds_client(svc.settings.socket_path) as c:
            r = await c.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
            assert r.json()["choices"][0]["message"]["role"] == "assistant"
            bad = await c.post("/v1/chat/completions", content=b"{nope")
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    finally:
        await svc.stop()
