"""Checking device requests and turning them into upstream requests — pure, so every rejection is unit-tested.

Each problem raises `InvalidRequest` naming the field, as the device sent it."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable

from nanofleet.protos import inference_pb2

from .errors import InvalidRequest
from .upstreams.base import Message, UpstreamRequest

MAX_ID = 128
MAX_PROMPT_CHARS = 1_000_000
ROLES = ("system", "user", "assistant")
_CONTROL = re.compile(r"[\x00-\x1f]")  # one regex scan, not a Python loop per character (on every call)


def pick_model(requested: str, default: str, offered: Collection[str]) -> str:
    """The configured model unless the device asks for another one the gateway prices (no surprise spending)."""
    if not requested or requested == default:
        return default
    if requested in offered:
        return requested
    raise InvalidRequest(f"model: {requested!r} is not offered by this gateway "
                         f"(offered: {', '.join(sorted({default, *offered}))})")


def _messages(messages: Iterable[inference_pb2.ChatMessage], field: str = "messages",
              need_user: bool = True) -> tuple[Message, ...]:
    out = []
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequest(f"{field}[{i}].role: expected one of {', '.join(ROLES)}, got {m.role!r}")
        total += len(m.content)
        out.append(Message(m.role, m.content))
    if need_user and not any(m.role != "system" for m in out):
        raise InvalidRequest(f"{field}: at least one user or assistant message is required")
    if total > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"{field}: prompt too large ({total} characters, at most {MAX_PROMPT_CHARS})")
    return tuple(out)


def _check_id(field: str, value: str) -> None:
    if len(value) > MAX_ID:
        raise InvalidRequest(f"{field}: at most {MAX_ID} characters, got {len(value)}")
    if _CONTROL.search(value):
        raise InvalidRequest(f"{field}: control characters are not allowed")


def to_upstream(req: inference_pb2.GenerateRequest, model: str, default_thinking: int | None) -> UpstreamRequest:
    """A validated upstream request; the device's thinking budget wins over the fleet's default."""
    _check_id("request_id", req.request_id)
    _check_id("app_id", req.app_id)
    messages = _messages(req.messages)
    if len(req.system_instruction) > MAX_PROMPT_CHARS:
        raise InvalidRequest("system_instruction: too large")
    cfg = req.config
    temperature = cfg.temperature if cfg.HasField("temperature") else None
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidRequest(f"config.temperature: expected 0..2, got {temperature}")
    top_p = cfg.top_p if cfg.HasField("top_p") else None
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise InvalidRequest(f"config.top_p: expected 0..1, got {top_p}")
    top_k = cfg.top_k if cfg.HasField("top_k") else None
    if top_k is not None and top_k < 1:
        raise InvalidRequest(f"config.top_k: expected >= 1, got {top_k}")
    max_out = cfg.max_output_tokens if cfg.HasField("max_output_tokens") else None
    if max_out is not None and max_out < 1:
        raise InvalidRequest(f"config.max_output_tokens: expected >= 1, got {max_out}")
    thinking = cfg.thinking_budget if cfg.HasField("thinking_budget") else default_thinking
    if thinking is not None and not -1 <= thinking <= 24_576:
        raise InvalidRequest(f"config.thinking_budget: expected -1..24576, got {thinking}")
    if len(cfg.stop) > 5:
        raise InvalidRequest(f"config.stop: at most 5 stop sequences, got {len(cfg.stop)}")
    return UpstreamRequest(model=model, messages=messages, system_instruction=req.system_instruction,
                           temperature=temperature, top_k=top_k, top_p=top_p, max_output_tokens=max_out,
                           thinking_budget=thinking, stop=tuple(cfg.stop))


def count_request(req: inference_pb2.CountTokensRequest, model: str) -> UpstreamRequest:
    return UpstreamRequest(model=model, messages=_messages(req.messages), system_instruction=req.system_instruction)
