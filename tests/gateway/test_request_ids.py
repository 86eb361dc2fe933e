"""request_id / app_id checks: the regex on the hot path refuses exactly what the per-character rule refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.controller.gateway.errors import InvalidRequest
from nanofleet.controller.gateway.requests import MAX_ID, _check_id


@given(st.text(max_size=MAX_ID))
def test_control_characters_refused_exactly(value: str) -> None:
    refused = any(ord(c) < 32 for c in value)
    if refused:
        with pytest.raises(InvalidRequest, match="request_id: control characters are not allowed"):
            _check_id("request_id", value)
    else:
        _check_id("request_id", value)


def test_too_long_names_the_field() -> None:
    with pytest.raises(InvalidRequest, match=f"app_id: at most {MAX_ID} characters"):
        _check_id("app_id", "a" * (MAX_ID + 1))
