"""Who is on the other end of a socket-API connection: the peer's uid, from SO_PEERCRED on the unix socket.

The agent's HTTP protocols read it once per connection and put it in each request's ASGI scope under `PEER_KEY`:
`AgentHttpProtocol` (the fast path, agent/api/protocol.py) and `PeerHttpProtocol` (uvicorn's stock protocol plus
this, for `http_fast_path: false` or a uvicorn the fast path does not fit). Peers on the optional loopback TCP
listener, and the in-process ASGI transport of tests, have no credentials: they are `TCP_UID`, one owner of their
own that never sees a uid's entries.

A unix-socket peer whose uid cannot be known (SO_PEERCRED failed, or a uvicorn on which neither protocol can run,
so the scope carries no uid) is `PEER_UNKNOWN`, and the queue FAILS CLOSED for it: queueing and /v1/requests answer
503 `queue_unavailable`, reason `peer_unknown`, rather than lump every local user into one owner who would see the
others' entries. Routes that need no owner (a local or cloud answer now) still serve.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import MutableMapping
from typing import Any

from nanofleet.agent.errors import QueueUnavailable
from nanofleet.agent.queue.store import PEER_UNKNOWN, TCP_UID

PEER_KEY = "nanofleet.peer_uid"
ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def peer_uid(sock: Any) -> int:
    """The uid of a unix-socket peer (SO_PEERCRED); `TCP_UID` for a TCP peer; `PEER_UNKNOWN` when neither can
    be told (no socket, no SO_PEERCRED on this OS, the call failed)."""
    family = getattr(sock, "family", None)
    if sock is not None and family in (socket.AF_INET, socket.AF_INET6):
        return TCP_UID
    if sock is None or family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return PEER_UNKNOWN
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return PEER_UNKNOWN
    return int(struct.unpack("3i", creds)[1])


def scope_uid(scope: MutableMapping[str, Any]) -> int:
    """The uid a request acts as. Without the protocol's key: a peer with a TCP address (the loopback listener,
    the in-process ASGI transport) is `TCP_UID`; anything else — a unix socket, whose ASGI `client` is empty —
    is `PEER_UNKNOWN`."""
    if PEER_KEY in scope:
        return int(scope[PEER_KEY])
    client = scope.get("client")
    if isinstance(client, (tuple, list)) and len(client) == 2 and isinstance(client[1], int):
        return TCP_UID
    return PEER_UNKNOWN


def owner(scope: MutableMapping[str, Any], counts: Any = None) -> int:
    """`scope_uid`, refusing `PEER_UNKNOWN` (counted under `peer_unknown` in `counts` when given)."""
    uid = scope_uid(scope)
    if uid == PEER_UNKNOWN:
        if counts is not None:
            counts["peer_unknown"] += 1
        raise QueueUnavailable("the offline queue needs the caller's uid (SO_PEERCRED) and this connection's could "
                               "not be read: not queued, nothing shown (see the agent's log about its HTTP "
                               "protocol)", retry_after=None, reason="peer_unknown")
    return uid


class WithPeer:
    """An ASGI app that puts one connection's peer uid in each of its requests' scope, then calls `app`."""

    __slots__ = ("app", "uid")

    def __init__(self, app: Any, uid: int) -> None:
        self.app, self.uid = app, uid

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        scope[PEER_KEY] = self.uid
        await self.app(scope, receive, send)
