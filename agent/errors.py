"""The agent's one exception root. Domain code (runtime, router/dispatcher, queue, sessions, device session) raises
these; only the HTTP layer (`agent/api/errors.py`) turns them into responses, by their `status` and `code`.

    AgentError                        root; .status (HTTP status the socket API answers with), .code, .retry_after,
    │                                 .route / .reason (the X-Nanofleet-* headers of the answer)
    ├── BackendError                  a model backend failed (runtime/base.py has its own tree: 400/403/429/503/504)
    ├── SessionLimit                  too many Prompt-API sessions (sessions.py)
    ├── ModelFileError                a model file could not be fetched or verified (models/download.py)
    ├── SocketError                   the socket could not be served (unix_socket.py)
    ├── DeviceSessionError            the MQTT device session (device_session/)
    ├── PolicyError                   a policy refused (not addressed to this device) or its file unusable
    │                                 (device_policy.py: PolicyRefused, PolicyFileError)
    ├── AgentFatal                    a part the agent cannot run without died (the socket server): the process
    │                                 stops with an error so its supervisor (systemd, `nanofleet up`) restarts it
    ├── NoRoute                       no route serves this request now (403 for good, 429/503 + Retry-After)
    └── QueueError                    the offline queue (agent/queue/)
        ├── QueueFull                 429 queue_full: the item or byte bound of the policy is reached
        ├── QueueDiskFull             507 queue_disk_full: SQLite said SQLITE_FULL; nothing was acknowledged
        ├── QueueUnavailable          503 queue_unavailable: the queue is closed or could not be opened
        ├── IdempotencyConflict       409 idempotency_conflict: the key was used with another body
        ├── RequestNotFound           404 not_found: no such entry for this caller
        └── NotCancellable            409 not_cancellable: the entry is running or finished
"""

from __future__ import annotations


class AgentError(Exception):
    status = 500
    code = "agent_error"
    route = "agent"
    param: str | None = None
    reason = ""                     # the X-Nanofleet-Reason; "" = the code

    def __init__(self, message: str, *, retry_after: float | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if reason is not None:
            self.reason = reason


class NoRoute(AgentError):
    """The router's decision (or the routes it tried) leaves nothing to serve the request now. `status`/`code`
    are per instance: 403 route_forbidden (no retry helps), 429 busy (only the local model can serve, soon),
    503 cloud_unavailable / no_route (waiting can help)."""

    def __init__(self, message: str, *, status: int, code: str, route: str, reason: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status, self.code, self.route, self.reason = status, code, route, reason


class QueueError(AgentError):
    status = 503
    code = "queue_error"
    route = "queue"


class QueueFull(QueueError):
    status = 429
    code = "queue_full"


class QueueDiskFull(QueueError):
    status = 507
    code = "queue_disk_full"


class QueueUnavailable(QueueError):
    status = 503
    code = "queue_unavailable"


class IdempotencyConflict(QueueError):
    status = 409
    code = "idempotency_conflict"
    param = "Idempotency-Key"


class RequestNotFound(QueueError):
    status = 404
    code = "not_found"


class NotCancellable(QueueError):
    status = 409
    code = "not_cancellable"


class AgentFatal(AgentError):
    code = "agent_fatal"
