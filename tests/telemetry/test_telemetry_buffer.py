from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanofleet.agent.telemetry_buffer import TelemetryBuffer


def test_fifo_bounded_drops_oldest_and_survives_reopen(tmp_path: Path) -> None:
    b = TelemetryBuffer(tmp_path / "b.db", max_items=3)
    for i in range(5):
        b.push(bytes([i]))
    assert len(b) == 3 and b.dropped == 2
    items = b.peek(10)
    assert [p for _, p in items] == [b"\x02", b"\x03", b"\x04"]
    b.delete([items[0][0]])
    b.close()
    b = TelemetryBuffer(tmp_path / "b.db", max_items=3)
    assert [p for _, p in b.peek(10)] == [b"\x03", b"\x04"] and b.dropped == 2
    b.close()
    with pytest.raises(ValueError):
        TelemetryBuffer(tmp_path / "c.db", max_items=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.lists(st.binary(max_size=8), max_size=20))
def test_keeps_the_newest_max_items_in_order(tmp_path_factory: pytest.TempPathFactory, cap: int,
                                             payloads: list[bytes]) -> None:
    b = TelemetryBuffer(tmp_path_factory.mktemp("buf") / "b.db", max_items=cap)
    for p in payloads:
        b.push(p)
    assert [p for _, p in b.peek(100)] == (payloads[-cap:] if payloads else [])
    assert b.dropped == max(0, len(payloads) - cap)
    b.close()


def test_the_buffer_file_is_private_whatever_the_umask(tmp_path) -> None:
    import os
    import stat

    from nanofleet.agent.telemetry_buffer import TelemetryBuffer

    old = os.umask(0o002)  # a permissive umask, as a service manager might leave it
    try:
        buf = TelemetryBuffer(tmp_path / "telemetry_buffer.db", 10)
        buf.push(b"x")
        buf.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "telemetry_buffer.db").stat().st_mode) == 0o600
