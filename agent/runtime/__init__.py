"""Model backends behind one interface (`Backend`), and the local model's lifecycle (`ModelManager`)."""

from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    Busy,
    ChatRequest,
    Chunk,
    Completion,
    ContextOverflow,
    InsufficientMemory,
    Refused,
    Usage,
)
from nanofleet.agent.runtime.fake import FunctionBackend
from nanofleet.agent.runtime.lifecycle import ModelManager, ModelStatus

__all__ = [
    "Backend", "BackendError", "BackendTimeout", "BackendUnavailable", "BadRequest", "Busy", "ChatRequest", "Chunk",
    "Completion", "ContextOverflow", "FunctionBackend", "InsufficientMemory", "ModelManager", "ModelStatus", "Refused",
    "Usage",
]
