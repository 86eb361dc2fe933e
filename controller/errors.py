"""The controller's exceptions: one root, the domain errors under it; the web layer maps them to HTTP at its edge.

    ControllerError                   any failure of the controller's own code
    ├── StoreError                    the SQLite store refused a read or write         (store.py)
    │   └── StoreClosed               written to after close()
    ├── AuthError                     the operator token                               (auth.py)
    │   └── TokenFileError            hash file unreadable, malformed or too open
    ├── CommandError                  a command to a device                            (commands.py)
    │   ├── UnknownCommand            a kind the agent does not implement
    │   └── CommandNotSent            the MQTT client did not take a fire-and-forget publish
    ├── PayloadError(reason)          an MQTT payload refused by ingest; also a ValueError (decode.py)
    ├── AlertError                    an alert operation                               (alert_store.py)
    │   ├── AlertNotFound             no alert with that id
    │   └── AlertCleared              acknowledging an alert that already cleared
    └── WebError(status, code, detail)  HTTP-facing: status, stable code, detail       (web/security.py)
        └── Unauthorized              401: no, wrong or expired credentials

Each class stays importable from the module named beside it. Errors of sqlite3, paho and uvicorn are converted
where they enter the controller's code (`raise … from exc`).
"""

from __future__ import annotations

__all__ = [
    "AlertCleared",
    "AlertError",
    "AlertNotFound",
    "AuthError",
    "CommandError",
    "CommandNotSent",
    "ControllerError",
    "PayloadError",
    "StoreClosed",
    "StoreError",
    "TokenFileError",
    "UnknownCommand",
    "WebError",
]


class ControllerError(Exception):
    """Root of the controller's errors."""


class StoreError(ControllerError):
    """The store cannot do what was asked."""


class StoreClosed(StoreError):
    """The store was closed; nothing more can be written."""


class AuthError(ControllerError):
    """A problem with the operator's credentials."""


class TokenFileError(AuthError):
    """The operator token hash file cannot be used (the message names the file and the problem)."""


class CommandError(ControllerError):
    """A command to a device cannot be sent as asked."""


class UnknownCommand(CommandError):
    """A kind the agent does not implement."""


class CommandNotSent(CommandError):
    """fire(): the MQTT client did not take the publish (not connected, queue full); the client counted why."""


class PayloadError(ControllerError, ValueError):
    """A payload that is not a valid message for its topic; `reason` is short and stable for counting."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AlertError(ControllerError):
    """An alert operation that cannot be done as asked."""


class AlertNotFound(AlertError):
    """No alert has that id."""


class AlertCleared(AlertError):
    """The alert already cleared: there is nothing left to acknowledge."""


class WebError(ControllerError):
    """An HTTP-facing error: the answer's status and a JSON body {"error": code, "detail": detail}."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
