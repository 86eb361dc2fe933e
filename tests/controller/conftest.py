"""Fixtures the controller's web tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
from ctl_helpers import StoreUrls

from nanofleet.controller.auth import ensure_operator_token


@pytest.fixture
def token_and_hash(tmp_path: Path) -> tuple[str, str]:
    """A fresh operator token (shown once) and the hash the app is built with."""
    token, token_hash = ensure_operator_token(tmp_path / "data")
    assert token is not None
    return token, token_hash


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`store_url` for a module-scoped store (one fleet built once per module and backend, read by many tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}"
    return str(request.getfixturevalue("pg_server").create_database())


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> StoreUrls:
    """A maker of fresh, empty store URLs on one backend: for a test that opens a new store per hypothesis example."""
    if request.param == "sqlite":
        return StoreUrls("sqlite", lambda: f"sqlite:///{tmp_path_factory.mktemp('store') / 'store.db'}")
    server = request.getfixturevalue("pg_server")
    return StoreUrls("postgresql", lambda: str(server.create_database()))
