"""The agent's one exception root. Domain code (runtime, router/dispatcher, queue, sessions, device session) raises
these; only the HTTP layer (`agent/api/errors.py`) turns them into responses, by their `status` and `code`.

    AgentError                        root; .status (HTTP status the socket API answers with), .code, .retry_after
    ├── BackendError                  a model backend failed (runtime/base.py has its own tree: 400/403/429/503/504)
    ├── SessionLimit                  too many Prompt-API sessions (sessions.py)
    ├── ModelFileError                a model file could not be fetched or verified (models/download.py)
    ├── SocketError                   the socket could not be served (unix_socket.py)
    ├── DeviceSessionError            the MQTT device session (device_session.py)
    ├── PolicyError                   a policy refused (not addressed to this device) or its file unusable
    │                                 (device_policy.py: PolicyRefused, PolicyFileError)
    └── AgentFatal                    a part the agent cannot run without died (the socket server): the process
                                      stops with an error so its supervisor (systemd, `nanofleet up`) restarts it
"""

from __future__ import annotations


class AgentError(Exception):
    status = 500
    code = "agent_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class AgentFatal(AgentError):
    code = "agent_fatal"
