"""Operator token file and session cookies: creation, hashing, permissions, rotation, signing, expiry, revocation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.controller.auth import (
    TOKEN_FILE,
    TokenFileError,
    ensure_operator_token,
    hash_token,
    rotate_operator_token,
    verify_token,
)
from nanofleet.controller.web.security import safe_next
from nanofleet.controller.web.sessions import SessionSigner


def test_first_call_creates_token_stored_only_as_hash(tmp_path: Path) -> None:
    token, token_hash = ensure_operator_token(tmp_path / "data")
    assert token is not None and len(token) >= 40
    path = tmp_path / "data" / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    assert path.read_text().strip() == token_hash == hash_token(token)
    assert verify_token(token, token_hash)


def test_second_call_returns_no_plaintext_and_same_hash(tmp_path: Path) -> None:
    token, first = ensure_operator_token(tmp_path)
    again, second = ensure_operator_token(tmp_path)
    assert again is None and second == first and verify_token(token or "", second)


def test_tokens_are_random(tmp_path: Path) -> None:
    a, _ = ensure_operator_token(tmp_path / "a")
    b, _ = ensure_operator_token(tmp_path / "b")
    assert a != b


def test_rotation_invalidates_old_token(tmp_path: Path) -> None:
    old, old_hash = ensure_operator_token(tmp_path)
    new, new_hash = rotate_operator_token(tmp_path)
    assert new != old and new_hash != old_hash
    assert not verify_token(old or "", new_hash) and verify_token(new, new_hash)
    assert ensure_operator_token(tmp_path) == (None, new_hash)
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600


def test_world_readable_hash_file_is_refused(tmp_path: Path) -> None:
    ensure_operator_token(tmp_path)
    os.chmod(tmp_path / TOKEN_FILE, 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        ensure_operator_token(tmp_path)


def test_malformed_hash_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / TOKEN_FILE
    path.write_text("plaintext-token\n")
    os.chmod(path, 0o600)
    with pytest.raises(TokenFileError, match=TOKEN_FILE):
        ensure_operator_token(tmp_path)


@pytest.mark.parametrize("bad", [None, "", "x", "sha256:zz"])
def test_verify_rejects_bad_inputs(bad: str | None) -> None:
    good = hash_token("secret")
    assert not verify_token(bad, good)
    assert not verify_token("secret", bad or "")


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_verify_matches_only_the_same_token(a: str, b: str) -> None:
    assert verify_token(a, hash_token(a))
    assert verify_token(b, hash_token(a)) == (a == b)


def test_session_round_trip_and_expiry() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    cookie, session = signer.issue(now_ms=1_000)
    assert signer.check(cookie, 1_000 + 59_999) == session
    assert signer.check(cookie, 1_000 + 60_000) is None


def test_session_forgery_and_other_keys_rejected() -> None:
    signer = SessionSigner(b"k" * 32)
    cookie, _ = signer.issue(0)
    version, expires, sid, mac = cookie.split(".")
    assert signer.check(f"{version}.{int(expires) * 10}.{sid}.{mac}", 0) is None  # extended expiry
    assert signer.check(f"{version}.{expires}.{sid}x.{mac}", 0) is None
    assert SessionSigner(b"j" * 32).check(cookie, 0) is None
    for junk in ["", "v1", "a.b.c.d", "v1.x.y.z", "v1.1.2.3.4", "." * 300]:
        assert signer.check(junk, 0) is None


def test_revoked_session_stays_dead_and_csrf_is_per_session() -> None:
    signer = SessionSigner(b"k" * 32)
    cookie, session = signer.issue(0)
    other_cookie, other = signer.issue(0)
    assert signer.check_csrf(session, signer.csrf_token(session))
    assert not signer.check_csrf(session, signer.csrf_token(other))
    assert not signer.check_csrf(session, None) and not signer.check_csrf(session, "")
    signer.revoke(session, 1)
    assert signer.check(cookie, 2) is None
    assert signer.check(other_cookie, 2) == other


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        SessionSigner(b"short")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "/"), ("", "/"), ("/devices/a?window=1h", "/devices/a?window=1h"), ("//evil.example/", "/"),
     ("https://evil.example/", "/"), ("/\\evil", "/"), ("/a\r\nSet-Cookie: x", "/"), ("devices", "/")],
)
def test_safe_next_only_allows_local_paths(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_operator_token_file_and_data_dir_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ensure_operator_token(tmp_path / "ctl")
        rotate_operator_token(tmp_path / "ctl")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ctl").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "ctl" / TOKEN_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "ctl").iterdir()) == [TOKEN_FILE]  # no temp file left behind
