"""Whether the socket API runs on the fast HTTP protocol (agent/api/protocol.py) or on uvicorn's stock one.

The fast protocol subclasses uvicorn's httptools protocol — not a public API — and stands in for its request
cycle (`_HotCycle`). pyproject.toml pins the uvicorn range it was tested with; on top of that, `missing_internals()`
checks at start what the subclass relies on: the module-level names it imports, the methods it overrides or calls,
the instance attributes it reads, and every `self.cycle.<attr>` uvicorn's protocol reads (the stand-in must have
each). When anything is missing the agent logs what and serves on uvicorn's stock protocol (correct, ~0.1–0.3 ms
slower a request); `http_fast_path: false` in agent.yaml chooses the stock protocol by hand. Either way the stock
protocol still carries the peer's uid (`PeerHttpProtocol`, checked by `missing_peer_internals()`); if even that
does not fit, the queue fails closed for unix-socket callers (agent/api/peer.py).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import re
from typing import Any

log = logging.getLogger("nanofleet.agent.api")

_MODULE = "uvicorn.protocols.http.httptools_impl"
_NAMES = ("STATUS_LINE", "HttpToolsProtocol")
_METHODS = ("connection_made", "connection_lost", "data_received", "shutdown", "timeout_keep_alive_handler",
            "on_message_begin", "on_headers_complete", "on_body", "on_message_complete", "on_response_complete")
_ATTRS = ("config", "parser", "expect_100_continue", "cycle", "pipeline", "loop", "tasks", "headers",
          "server_state", "transport")
_SET_LATER = {"url": "on_message_begin"}  # instance attributes uvicorn sets per request, not in __init__
# uvicorn methods that may run while a fast-path request's stand-in cycle is current (disconnect, shutdown,
# the next pipelined request, keep-alive timers): every `self.cycle.<attr>` they use must exist on `_HotCycle`
_SEE_HOT_CYCLE = ("connection_lost", "shutdown", "on_headers_complete", "on_response_complete",
                  "timeout_keep_alive_handler", "data_received")
_CYCLE_USE = re.compile(r"self\.cycle\.(\w+)")


def missing_internals() -> list[str]:
    """What the fast protocol needs of uvicorn and does not find (empty: compatible)."""
    cls, missing = _protocol_class(_NAMES)
    if cls is None:
        return missing
    missing += [f"HttpToolsProtocol.{m}()" for m in _METHODS if not callable(getattr(cls, m, None))]
    instance, error = _built(cls)
    if instance is None:
        return [*missing, error]
    missing += [f"HttpToolsProtocol.{a}" for a in _ATTRS if not hasattr(instance, a)]
    sources = {m: _source(cls, m) for m in _METHODS}
    missing += [f"the source of HttpToolsProtocol.{m}()" for m, src in sources.items() if not src]
    for attr, method in _SET_LATER.items():
        if sources[method] and f"self.{attr} =" not in sources[method]:
            missing.append(f"HttpToolsProtocol.{method}() setting self.{attr}")
    from nanofleet.agent.api.protocol import _HotCycle

    used = {a for m in _SEE_HOT_CYCLE for a in _CYCLE_USE.findall(sources[m])}
    missing += [f"_HotCycle.{a} (uvicorn's protocol uses self.cycle.{a})" for a in sorted(used)
                if a not in _HotCycle.__slots__]
    return missing


def missing_peer_internals() -> list[str]:
    """What `PeerHttpProtocol` (the stock protocol plus the peer's uid) needs of uvicorn and does not find: the
    protocol class, `connection_made()`, and the `self.app` attribute its request cycles are built from."""
    cls, missing = _protocol_class(("HttpToolsProtocol",))
    if cls is None:
        return missing
    if not callable(getattr(cls, "connection_made", None)):
        missing.append("HttpToolsProtocol.connection_made()")
    instance, error = _built(cls)
    if instance is None:
        missing.append(error)
    elif not hasattr(instance, "app"):
        missing.append("HttpToolsProtocol.app")
    if "self.app" not in _source(cls, "on_headers_complete"):
        missing.append("HttpToolsProtocol.on_headers_complete() reading self.app")
    return missing


def _protocol_class(names: tuple[str, ...]) -> tuple[type | None, list[str]]:
    """uvicorn's httptools protocol class, or None and what is missing of `names` in its module."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError as exc:
        return None, [f"module {_MODULE} ({exc})"]
    missing = [f"{_MODULE}.{name}" for name in names if not hasattr(module, name)]
    return (None, missing) if missing else (module.HttpToolsProtocol, [])


def _built(cls: type) -> tuple[Any, str]:
    """An instance of `cls` built as uvicorn builds one, or None and why it could not be."""
    try:
        return _instance(cls), ""
    except Exception as exc:  # noqa: BLE001 - any failure to build one means the internals moved: reported as such
        return None, f"HttpToolsProtocol(config, server_state, app_state) ({type(exc).__name__}: {exc})"


def _source(cls: type, method: str) -> str:
    fn = getattr(cls, method, None)
    try:
        return inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):  # no source shipped (e.g. a compiled build): reported as missing
        return ""


def _instance(cls: type) -> Any:
    import uvicorn
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never called: only the constructor runs
        raise AssertionError("not served")

    config = uvicorn.Config(app, http="httptools", log_config=None, lifespan="off")
    loop = asyncio.new_event_loop()
    try:
        return cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    finally:
        loop.close()


def choose_http_protocol(fast_path: bool) -> Any:
    """The `http` argument for uvicorn.Config: the fast protocol class; else the stock protocol with the peer's
    uid (`PeerHttpProtocol`); else "httptools" (uvicorn's own), on which the queue fails closed (`peer_unknown`)."""
    if fast_path:
        missing = missing_internals()
        if not missing:
            from nanofleet.agent.api.protocol import AgentHttpProtocol

            return AgentHttpProtocol
        log.warning("socket API on uvicorn's stock HTTP protocol: this uvicorn lacks what the fast path needs (%s); "
                    "pin uvicorn to the range in pyproject.toml to get it back", ", ".join(missing))
    else:
        log.info("socket API on uvicorn's stock HTTP protocol (http_fast_path: false)")
    missing = missing_peer_internals()
    if not missing:
        from nanofleet.agent.api.protocol import PeerHttpProtocol

        return PeerHttpProtocol
    log.error("socket API cannot read its peers' uid on this uvicorn (%s): the offline queue refuses unix-socket "
              "callers (503 queue_unavailable, reason peer_unknown) rather than show every user's entries to all; "
              "pin uvicorn to the range in pyproject.toml", ", ".join(missing))
    return "httptools"
