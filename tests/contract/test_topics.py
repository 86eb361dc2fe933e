from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.protos import topics

ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")


@pytest.mark.parametrize(
    ("fn", "kind"),
    [(topics.status, "status"), (topics.telemetry, "telemetry"), (topics.policy, "policy"), (topics.cmd, "cmd"),
     (topics.cmd_result, "cmd/result")],
)
def test_each_topic_function_follows_the_scheme(fn, kind) -> None:
    assert fn("demo", "pi-01") == f"nanofleet/v1/demo/pi-01/{kind}"


@given(fleet=ids, device=ids, kind=st.sampled_from(topics.KINDS))
def test_parse_inverts_every_topic(fleet: str, device: str, kind: topics.Kind) -> None:
    assert topics.parse(topics.topic(fleet, device, kind)) == topics.Topic(fleet, device, kind)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("other/v1/demo/pi/status", "not a nanofleet topic"),
        ("nanofleet/v1/demo/pi", "too short"),
        ("nanofleet/v1/demo/pi/firmware", "unknown kind 'firmware'"),
        ("nanofleet/v1/demo/pi/cmd/other", "unknown kind 'cmd/other'"),
        ("nanofleet/v1/demo/+/status", "invalid device '+'"),
        ("nanofleet/v1/$SYS/pi/status", "invalid fleet '$SYS'"),
    ],
)
def test_a_topic_that_is_not_ours_gets_a_clear_error(name: str, problem: str) -> None:
    with pytest.raises(topics.TopicError, match=problem.replace("+", r"\+").replace("$", r"\$")):
        topics.parse(name)


@pytest.mark.parametrize("bad", ["", "a/b", "#", "+", "$SYS", "x" * 129, "spa ce"])
def test_ids_that_could_widen_a_subscription_are_refused(bad: str) -> None:
    with pytest.raises(topics.TopicError, match="invalid device"):
        topics.status("demo", bad)


def test_device_prefix_and_fleet_filter() -> None:
    assert topics.device_prefix("demo", "pi-01") == "nanofleet/v1/demo/pi-01/#"
    assert topics.fleet_filter("demo", "telemetry") == "nanofleet/v1/demo/+/telemetry"
