"""The telemetry fast path never changes the verdict of json_format.Parse (hypothesis), and rejections say why."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofleet.controller.decode import PayloadError, decode_result, decode_status, decode_telemetry
from nanofleet.controller.devstate import row_from_pb
from nanofleet.protos import fleet_pb2


def full_telemetry() -> fleet_pb2.Telemetry:
    return fleet_pb2.Telemetry(
        device_id="d1", bd_seq=7, seq=200, ts_ms=1_795_000_000_000, cpu_percent=12.5, load1=0.25, ram_total_mb=4096,
        ram_available_mb=1024, swap_used_mb=1, disk_free_mb=9, temperatures_c={"cpu": 51.5}, temp_max_c=51.5,
        thermal_level=fleet_pb2.THERMAL_LEVEL_LIGHT, throttle_ratio=0.75, throttled=True, pi_throttled_flags=5,
        battery=fleet_pb2.Battery(present=True, percent=40, charging=True),
        model=fleet_pb2.ModelState(name="tiny", availability=fleet_pb2.MODEL_AVAILABILITY_AVAILABLE, loaded=True,
                                   tokens_per_s=12.5),
        route_counts={"local": 3, "cloud": 1}, queue_depth=2, policy_version=9, gateway_reachable=True, replayed=True,
    )


def test_fast_path_equals_parse_on_agent_output() -> None:
    t = full_telemetry()
    for payload in (json_format.MessageToJson(t, indent=None),
                    json_format.MessageToJson(t, preserving_proto_field_name=True),
                    json_format.MessageToJson(t, use_integers_for_enums=True)):
        assert decode_telemetry(payload.encode(), "d1") == row_from_pb(t)
    assert row_from_pb(t).tokens_per_s == 12.5


@pytest.mark.parametrize("rate", ["0", "0.0", "-3.5", '"Infinity"', '"NaN"'])
def test_no_measured_tokens_per_s_is_stored_as_null_by_both_paths(rate: str) -> None:
    """0 is the agent's "no generation measured recently" (a negative or non-finite rate means nothing either):
    NULL, so the chart shows a gap, not a zero; absent model or absent field alike."""
    payload = b'{"tsMs": "5", "model": {"name": "m", "tokensPerS": %s}}' % rate.encode()
    assert decode_telemetry(payload, "d1").tokens_per_s is None
    assert row_from_pb(json_format.Parse(payload, fleet_pb2.Telemetry())).tokens_per_s is None
    assert decode_telemetry(b'{"tsMs": "5", "model": {"name": "m"}}', "d1").tokens_per_s is None
    assert decode_telemetry(b'{"tsMs": "5"}', "d1").tokens_per_s is None
    assert decode_telemetry(b'{"tsMs": "5", "model": {"tokensPerS": 7.25}}', "d1").tokens_per_s == 7.25


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "invalid json"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"deviceId": "other", "tsMs": "1"}', "device_id does not match the topic"),
        (b'{"seq": 256, "tsMs": "1"}', "seq out of range 0..255"),
        (b'{"seq": 1}', "ts_ms missing"),
        (b'{"tsMs": "1", "bogus": 1}', "schema:"),
        (b'{"tsMs": "1", "cpuPercent": "hot"}', "schema:"),
        (b'{"tsMs": "1", "thermalLevel": "THERMAL_LEVEL_MELTING"}', "schema:"),
        (b'{"tsMs": "1", "seq": -1}', "schema:"),
        (b"\xff\xfe", "invalid json"),
        (b"{" + b'"a":' * 0 + b'"x": "' + b"y" * 70_000 + b'"}', "payload too large"),
    ],
)
def test_rejections_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as err:
        decode_telemetry(payload, "d1")
    assert err.value.reason.startswith(reason)


def test_topic_device_fills_a_missing_device_id_and_status_result_checks() -> None:
    assert decode_telemetry(b'{"tsMs": "5"}', "d9").device_id == "d9"
    s = decode_status(b'{"online": true, "bdSeq": "3"}', "f", "d1")
    assert (s.fleet, s.device_id, s.bd_seq, s.online) == ("f", "d1", 3, True)
    with pytest.raises(PayloadError):
        decode_status(b'{"deviceId": "x"}', "f", "d1")
    with pytest.raises(PayloadError, match="without id"):
        decode_result(b'{"status": "ok"}', "d1")
    assert decode_result(b'{"id": "c1", "status": "ok"}', "d1").device_id == "d1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(["deviceId", "bdSeq", "seq", "tsMs", "cpuPercent", "ramTotalMb", "temperaturesC",
                        "thermalLevel", "battery", "model", "routeCounts", "replayed", "throttled", "cpu_percent",
                        "queueDepth", "unknown"])
plausible = st.one_of(
    st.integers(-5, 300), st.integers(2**31, 2**64 + 5), st.floats(-1e39, 1e39, allow_nan=False),
    st.sampled_from(["1", "x", "THERMAL_LEVEL_SEVERE", "", "12345678901234567890", "NaN", "1.5"]),
    st.booleans(), st.none(),
    st.dictionaries(st.sampled_from(["present", "percent", "charging", "name", "availability", "tokensPerS",
                                      "cpu", "x"]),
                    st.one_of(st.booleans(), st.floats(0, 100), st.integers(-1, 5), st.text(max_size=3)),
                    max_size=3),
    json_values,
)


def test_duplicate_keys_keep_the_last_value() -> None:
    """The one documented difference from Parse (which refuses the payload): the last value of a key wins."""
    row = decode_telemetry(b'{"tsMs": "5", "seq": 1, "seq": 2}', "d1")
    assert row.seq == 2
    with pytest.raises(json_format.ParseError):
        json_format.Parse(b'{"tsMs": "5", "seq": 1, "seq": 2}', fleet_pb2.Telemetry())


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, plausible, max_size=8))
def test_fast_path_agrees_with_parse(doc: dict) -> None:
    doc.setdefault("tsMs", "1")
    payload = json.dumps(doc).encode()
    try:
        reference = row_from_pb(json_format.Parse(payload, fleet_pb2.Telemetry()))
    except (json_format.ParseError, ValueError):
        reference = None
    try:
        got = decode_telemetry(payload, "d1")
    except PayloadError:
        got = None
    if reference is None:
        assert got is None, f"the fast path accepted what Parse refuses: {payload!r}"
        return
    if reference.device_id not in ("", "d1") or reference.seq > 255 or reference.ts_ms <= 0:
        assert got is None
        return
    assert got is not None
    ref = reference._replace(device_id="d1")
    for a, b in zip(got, ref, strict=True):
        if isinstance(a, float) and isinstance(b, float):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30)
        elif isinstance(a, dict) and isinstance(b, dict):
            assert a.keys() == b.keys()
        else:
            assert a == b
