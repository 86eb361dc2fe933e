"""The suite's hypothesis profile (tests/conftest.py): no per-example deadline, since on a loaded 2-core CI machine
a slow example is not a failing one. Everything else is hypothesis's own default for where it runs (with CI set,
that is derandomized examples)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st


def test_the_suite_profile_has_no_deadline_and_keeps_hypothesis_defaults() -> None:
    assert settings().deadline is None
    assert settings().max_examples == settings.get_profile("default").max_examples


@given(st.integers())
def test_a_given_test_takes_the_profile(n: int) -> None:
    assert settings().deadline is None
    assert isinstance(n, int)
