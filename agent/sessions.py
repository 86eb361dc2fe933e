"""Prompt-API-style sessions: a system prompt, sampling settings and the conversation so far, kept by the agent.

Each prompt sends the whole conversation; llama.cpp's prompt cache (slot reuse by longest common prefix) means only
the new turn is processed. When the conversation outgrows the context window the oldest non-system turns are
dropped (and the answer says how many); a prompt that does not fit even alone is a ContextOverflow.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nanofleet.agent.errors import AgentError
from nanofleet.agent.runtime.base import ContextOverflow

Messages = list[dict[str, str]]


@dataclass
class Session:
    id: str
    system_prompt: str | None = None
    temperature: float | None = None
    top_k: int | None = None
    turns: Messages = field(default_factory=list)  # user/assistant messages, oldest first
    context_usage: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def messages(self, extra: Messages = ()) -> Messages:  # type: ignore[assignment]
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*head, *self.turns, *extra]


class SessionLimit(AgentError):
    status = 429
    code = "too_many_sessions"


class SessionStore:
    def __init__(self, max_sessions: int = 256) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, **kwargs: object) -> Session:
        if len(self._sessions) >= self.max_sessions:
            raise SessionLimit(f"too many sessions ({self.max_sessions}); delete some first")
        session = Session(id="sess_" + secrets.token_hex(12), **kwargs)  # type: ignore[arg-type]
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def delete(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def clone(self, session: Session) -> Session:
        twin = self.create(system_prompt=session.system_prompt, temperature=session.temperature,
                           top_k=session.top_k, turns=copy.deepcopy(session.turns))
        twin.context_usage = session.context_usage
        return twin


def _drop_oldest(turns: Messages) -> int:
    """Drop the oldest turn: a user message and the assistant reply after it. Returns messages dropped."""
    n = 2 if len(turns) > 1 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant" else 1
    del turns[:n]
    return n


async def fit(
    session: Session, new: dict[str, str], reserve: int, window: int,
    count: Callable[[Messages], Awaitable[int]],
) -> tuple[Messages, int, int]:
    """Messages to send, messages dropped from the session, prompt tokens. Drops from `session.turns` in place."""
    dropped = 0
    while True:
        messages = session.messages([new])
        tokens = await count(messages)
        if tokens + reserve <= window:
            return messages, dropped, tokens
        if not session.turns:
            raise ContextOverflow(
                f"the prompt needs {tokens} tokens (with the system prompt) plus max_tokens {reserve}, more than "
                f"the context window of {window} tokens, even after dropping every earlier turn", param="prompt")
        dropped += _drop_oldest(session.turns)
