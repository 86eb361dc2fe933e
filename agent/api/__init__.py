"""The agent's local socket API: `create_app(dispatcher, sessions)` → a FastAPI app (served by `unix_socket`)."""

from nanofleet.agent.api.app import create_app
from nanofleet.agent.api.dispatch import Admission, Dispatcher
from nanofleet.agent.api.errors import ApiError

__all__ = ["Admission", "ApiError", "Dispatcher", "create_app"]
