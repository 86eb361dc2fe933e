"""Who is on the other end of a socket-API connection: the peer's uid, from SO_PEERCRED on the unix socket.

`AgentHttpProtocol` reads it once per connection and puts it in each request's ASGI scope under `PEER_KEY` (and
passes it to the hot path). Peers on the optional loopback TCP listener, and requests served without that protocol
(uvicorn's own, the in-process ASGI transport of tests), have no credentials: they are `TCP_UID`, one owner of
their own that never sees a uid's entries.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from starlette.requests import Request

from nanofleet.agent.queue.store import TCP_UID

PEER_KEY = "nanofleet.peer_uid"
ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def peer_uid(sock: Any) -> int:
    """The uid of a unix-socket peer (SO_PEERCRED); `TCP_UID` for anything else."""
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return TCP_UID
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return TCP_UID
    return int(struct.unpack("3i", creds)[1])


def scope_uid(request: Request) -> int:
    return int(request.scope.get(PEER_KEY, TCP_UID))
