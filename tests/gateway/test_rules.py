"""The gateway's pure decisions, exhaustively: policy, budgets, retry delays, backoff, prices, request checks."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.config import DEFAULT_PRICES, parse_fleet
from nanofleet.controller.gateway import rules
from nanofleet.controller.gateway.errors import InvalidRequest
from nanofleet.controller.gateway.requests import pick_model, to_upstream
from nanofleet.protos import inference_pb2

FLEET = parse_fleet("""
fleet: t
defaults:
  routing:
    cloud_budget: {tokens_per_day: 100}
    apps: {notes: {privacy: sensitive}, local: {mode: local_only}, small: {tokens_per_day: 7}}
groups: {clinic: {routing: {cloud: denied}}}
devices: {c1: {group: clinic}}
""")


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_next_utc_day_is_positive_and_lands_on_midnight(now: float) -> None:
    wait = rules.seconds_until_next_utc_day(now)
    assert 0 < wait <= 86_400
    landed = dt.datetime.fromtimestamp(now + wait, dt.UTC)
    assert (landed.hour, landed.minute) in ((0, 0), (23, 59))  # float rounding may land a hair before midnight
    assert rules.utc_day(now + wait + 0.01) != rules.utc_day(now)


def test_policy() -> None:
    default = FLEET.profile_for("d1")
    assert rules.check_policy(default, "d1", "chat", False) is None
    assert "cloud denied" in str(rules.check_policy(FLEET.profile_for("c1"), "c1", "chat", False))
    assert "sensitive" in str(rules.check_policy(default, "d1", "chat", True))
    assert "'notes' is sensitive" in str(rules.check_policy(default, "d1", "notes", False))
    assert "local_only" in str(rules.check_policy(default, "d1", "local", False))


@given(st.integers(0, 200), st.integers(0, 200), st.integers(1, 200), st.integers(1, 50), st.integers(1, 100))
def test_a_call_reserves_only_what_fits_and_is_refused_when_nothing_does(used: int, reserved: int, limit: int,
                                                                         prompt: int, wanted: int) -> None:
    fit = rules.fit_output("device", used, reserved, limit, prompt, wanted, 1_700_000_000.0)
    if isinstance(fit, int):
        assert 1 <= fit <= wanted and used + reserved + prompt + fit <= limit  # never past the limit
        assert fit == wanted or used + reserved + prompt + fit == limit  # capped only by what is left
    else:
        assert used + reserved + prompt + 1 > limit
        busy = used + prompt + 1 <= limit  # it would fit without the calls in flight
        assert (fit.retry_after == rules.BUSY_RETRY_S) == busy and fit.retry_after > 0
        assert ("held by calls in flight" in fit.message) == busy
        assert busy or f"{used} of {limit} tokens used today (UTC), this call needs up to {prompt + 1}" in fit.message
        assert f"retry in {math.ceil(fit.retry_after)}s" in fit.message


def test_limits_for_apps() -> None:
    profile = FLEET.profile_for("d1")
    assert rules.limits_for(profile, "small", 50, 1000) == rules.Limits(100, 7, 1000)
    assert rules.limits_for(profile, "chat", 50, None) == rules.Limits(100, 50, None)
    assert rules.limits_for(profile, "", None, None) == rules.Limits(100, None, None)


@pytest.mark.parametrize(("message", "details", "header", "expected"), [
    ("You exceeded your quota. Please retry in 36.7s.", None, None, 36.7),
    ("Please retry in 250ms", None, None, 0.25),
    ("quota", [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}], None, 12.0),
    ("Please retry in 36.7s.", {"error": {"details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36s"}]}}, None, 36.7),
    ("no hint", None, "7", 7.0),
    ("no hint", None, "nan", None),
    ("no hint", None, "Wed, 21 Oct 2015 07:28:00 GMT", None),
    ("no hint", [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": 5}], None, None),
    (None, None, None, None),
    ("Please retry in 99999999s", None, None, rules.MAX_RETRY_DELAY),
])
def test_retry_delay(message: str | None, details: object, header: str | None, expected: float | None) -> None:
    assert rules.retry_delay(message, details, header) == expected


@given(st.text(), st.none() | st.text(), st.recursive(st.none() | st.text() | st.integers(),
       lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=10))
def test_retry_delay_never_crashes(message: str, header: str | None, details: object) -> None:
    delay = rules.retry_delay(message, details, header)
    assert delay is None or 0 <= delay <= rules.MAX_RETRY_DELAY


@given(st.integers(0, 10), st.floats(0.001, 5), st.floats(0.01, 60), st.floats(0, 0.999999))
def test_the_upstream_retry_delay_is_the_one_backoff_rule(attempt: int, base: float, cap: float,
                                                           rand: float) -> None:
    """The retry loop takes its delay from nanofleet.backoff with the injected rand: equal jitter within the cap."""
    from nanofleet.backoff import backoff
    from nanofleet.controller.gateway.errors import UpstreamUnavailable
    from nanofleet.controller.gateway.upstreams.base import UnavailableUpstream
    from nanofleet.controller.gateway.upstreams.retrying import RetryingUpstream

    up = RetryingUpstream(UnavailableUpstream("x"), max_retries=100, base_delay=base, max_delay=cap,
                          rand=lambda: rand)
    delay = up._delay_or_raise(attempt, UpstreamUnavailable("5xx"), None)
    ceiling = min(cap, base * 2 ** attempt)
    assert delay == backoff(attempt, base, cap, rand) and ceiling / 2 <= delay <= ceiling
    assert up.retries == 1


def test_prices() -> None:
    assert rules.price_for("gemini-2.5-flash-lite", DEFAULT_PRICES) == DEFAULT_PRICES["gemini-2.5-flash-lite"]
    assert rules.price_for("models/gemini-2.5-flash-001", DEFAULT_PRICES) == DEFAULT_PRICES["gemini-2.5-flash"]
    assert rules.price_for("gemini-2.5-flash-lite-preview", DEFAULT_PRICES) == DEFAULT_PRICES["gemini-2.5-flash-lite"]
    assert rules.price_for("llama-3", DEFAULT_PRICES) is None
    assert rules.cost_usd("gemini-2.5-flash", 1_000_000, 1_000_000, DEFAULT_PRICES) == pytest.approx(2.80)
    assert rules.cost_usd("unknown", 10, 10, DEFAULT_PRICES) == 0.0


def _req(**kw: object) -> inference_pb2.GenerateRequest:
    kw.setdefault("messages", [inference_pb2.ChatMessage(role="user", content="x")])
    return inference_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


def test_to_upstream_defaults_and_overrides() -> None:
    up = to_upstream(_req(system_instruction="s", config=inference_pb2.GenerationConfig(stop=["\n"])), "m", 0)
    assert (up.model, up.system_instruction, up.thinking_budget, up.stop, up.temperature) == ("m", "s", 0, ("\n",),
                                                                                               None)
    up = to_upstream(_req(config=inference_pb2.GenerationConfig(thinking_budget=-1, top_p=0.5)), "m", 0)
    assert (up.thinking_budget, up.top_p) == (-1, 0.5)


@pytest.mark.parametrize(("kw", "field"), [
    ({"request_id": "x" * 129}, "request_id"),
    ({"app_id": "a\x00b"}, "app_id"),
    ({"messages": []}, "messages:"),
    ({"messages": [inference_pb2.ChatMessage(role="system", content="only system")]}, "messages:"),
    ({"messages": [inference_pb2.ChatMessage(role="user", content="x" * 1_000_001)]}, "prompt too large"),
    ({"config": inference_pb2.GenerationConfig(top_p=1.5)}, "config.top_p"),
    ({"config": inference_pb2.GenerationConfig(top_k=0)}, "config.top_k"),
    ({"config": inference_pb2.GenerationConfig(max_output_tokens=0)}, "config.max_output_tokens"),
    ({"config": inference_pb2.GenerationConfig(thinking_budget=30000)}, "config.thinking_budget"),
    ({"config": inference_pb2.GenerationConfig(stop=list("abcdef"))}, "config.stop"),
])
def test_to_upstream_rejects_naming_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest, match=field.replace("[", r"\[").replace(".", r"\.")):
        to_upstream(_req(**kw), "m", None)


def test_pick_model() -> None:
    offered = frozenset(DEFAULT_PRICES)
    assert pick_model("", "gemini-2.5-flash", offered) == "gemini-2.5-flash"
    assert pick_model("gemini-2.5-flash-lite", "gemini-2.5-flash", offered) == "gemini-2.5-flash-lite"
    with pytest.raises(InvalidRequest, match="not offered"):
        pick_model("gemini-2.5-pro", "gemini-2.5-flash", offered)
