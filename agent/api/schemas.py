"""Request bodies of the socket API (parsed from raw bytes with pydantic: invalid JSON and wrong types become
400s naming the field), the error body, and the routing hints (`nanofleet` body field or `X-Nanofleet-*` headers).

Every model is strict: a public API takes JSON types as they are (`"stream": "yes"` is a 400, not `true`), and every
integer has bounds that the code below it (llama.cpp's 32-bit seed, the context window) can take."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from nanofleet.agent.api.errors import ApiError
from nanofleet.agent.router import MODES, RouteRequest

MAX_TOKENS_LIMIT = 1 << 20  # past any context window; the real check is against the model's window
SEED_MAX = (1 << 32) - 1  # llama.cpp samples with a uint32 seed


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong, for a person")
    type: str = Field(description="OpenAI error type, e.g. invalid_request_error, rate_limit_error")
    param: str | None = Field(description="the field or header at fault, when one is")
    code: str | None = Field(description="machine-readable code (docs/socket-api.md, Errors)")


class ErrorBody(BaseModel):
    """Every error answer of the socket API (OpenAI's shape)."""

    error: ErrorDetail


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class Hints(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Literal["prefer_local", "local_only", "cloud_only", "prefer_cloud"] | None = None
    privacy: Literal["normal", "sensitive"] | None = None
    queue: Literal["allow", "deny"] | None = None
    app: str | None = Field(None, max_length=256)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class ChatCompletionBody(BaseModel):
    """OpenAI's chat completion request; unknown OpenAI fields are ignored, llama.cpp extensions pass through."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1000)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    user: str | None = None
    nanofleet: Hints | None = None

    @field_validator("messages")
    @classmethod
    def _has_user(cls, v: list[Message]) -> list[Message]:
        if all(m.role in ("system", "developer") for m in v):
            raise ValueError("needs at least one user or assistant message")
        return v


class SessionCreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    system_prompt: str | None = None  # bounded by the body limit, then by the context window (400)
    temperature: float | None = Field(None, ge=0, le=2)
    top_k: int | None = Field(None, ge=0, le=1000)
    initial_prompts: list[Message] = []
    nanofleet: Hints | None = None


class SessionPromptBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str | list[TextPart] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    stream: bool = False
    seed: Seed | None = None
    ignore_eos: bool | None = None
    nanofleet: Hints | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(p.text for p in self.prompt)


CHAT = TypeAdapter(ChatCompletionBody)
SESSION_CREATE = TypeAdapter(SessionCreateBody)
SESSION_PROMPT = TypeAdapter(SessionPromptBody)

_HEADER_VALUES = {"mode": MODES, "privacy": ("normal", "sensitive"), "queue": ("allow", "deny")}


def route_request(hints: Hints | None, headers: Any, prompt_tokens: int = 0) -> RouteRequest:
    """Merge body hints (win) over `X-Nanofleet-*` headers; a bad header value is a 400 naming the header."""
    values: dict[str, str | None] = {}
    for name, allowed in _HEADER_VALUES.items():
        raw = headers.get(f"x-nanofleet-{name}")
        if raw is not None:
            raw = raw.strip().lower()
            if raw not in allowed:
                raise ApiError(400, f"header X-Nanofleet-{name.title()}: expected one of {', '.join(allowed)}, "
                               f"got {raw!r}", param=f"X-Nanofleet-{name.title()}", code="invalid_header")
        values[name] = raw
    values["app"] = headers.get("x-nanofleet-app")
    if hints is not None:
        for name in ("mode", "privacy", "queue", "app"):
            if getattr(hints, name) is not None:
                values[name] = getattr(hints, name)
    return RouteRequest(
        mode=values["mode"],  # type: ignore[arg-type]
        sensitive=values["privacy"] == "sensitive",
        queue_allowed=values["queue"] != "deny",
        prompt_tokens=prompt_tokens,
        app_id=values["app"] or "",
    )
