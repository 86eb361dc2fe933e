"""`nanofleet.tcp.is_loopback`: the one rule for what may listen without TLS or a token (agent TCP listener, local
bridge address, gateway without TLS, gateway metrics without a token)."""

from __future__ import annotations

import pytest

from nanofleet.tcp import is_loopback


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.168.1.5", "10.0.0.1", "example.com", "localhost.",
                                  "127.0.0.1.nip.io", "", "[127.0.0.1"])
def test_everything_else_is_not(host: str) -> None:
    assert not is_loopback(host)
