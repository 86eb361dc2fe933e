"""The controller reads the gateway's tokens (artifact downloads) and usage (dashboard, budget alerts) from the
gateway's store, on SQLite and on a shared PostgreSQL database."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanofleet.controller.artifacts import ArtifactRefused, DeviceTokens
from nanofleet.controller.gateway.auth import issue_token, revoke_token
from nanofleet.controller.gateway.db import connection, transaction
from nanofleet.controller.gateway.usage import UsageRow, _add
from nanofleet.controller.web.context import UsageReader
from nanofleet.store_url import StoreTarget, resolve


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    if request.param == "sqlite":
        return StoreTarget("sqlite", path=tmp_path / "gateway.db")
    return resolve(request.getfixturevalue("pg_server").create_database(), tmp_path, "gateway.db")


def test_device_tokens_and_usage_come_from_the_gateway_store(gateway_store: StoreTarget) -> None:
    assert UsageReader(gateway_store).rows() == []  # no gateway wrote yet: no usage (SQLite: no file at all)
    token = issue_token(gateway_store, "pi-01", "f1")
    tokens = DeviceTokens(gateway_store, "f1", ttl=0)
    assert tokens.check(token) == "pi-01"
    with pytest.raises(ArtifactRefused, match="unknown device token"):
        tokens.check("nft_not-a-token")
    with pytest.raises(ArtifactRefused, match="belongs to fleet 'f1'"):
        DeviceTokens(gateway_store, "other", ttl=0).check(token)
    assert revoke_token(gateway_store, "pi-01") == 1
    with pytest.raises(ArtifactRefused, match="was revoked"):
        tokens.check(token)
    with connection(gateway_store) as conn, transaction(conn):
        _add(conn, UsageRow("2026-11-30", "pi-01", "app", "gemini-2.5-flash", 1, 10, 20, 0.001))
    rows = UsageReader(gateway_store).rows("2026-11-30")
    assert rows is not None and [(r.device_id, r.input_tokens, r.output_tokens) for r in rows] == [("pi-01", 10, 20)]
