"""Fixtures the controller's web tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanofleet.controller.auth import ensure_operator_token


@pytest.fixture
def token_and_hash(tmp_path: Path) -> tuple[str, str]:
    """A fresh operator token (shown once) and the hash the app is built with."""
    token, token_hash = ensure_operator_token(tmp_path / "data")
    assert token is not None
    return token, token_hash
