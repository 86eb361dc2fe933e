"""Operator credentials for the dashboard and REST API.

The controller has a default operator token — its holder is the operator named ``operator`` —: 32 random bytes,
shown once when created, stored only as a SHA-256 hash in ``<data_dir>/operator_token.sha256`` (mode 0600). Named
operators (`nanofleet controller operator add NAME`) each get a token of their own, hashed the same way, one
``NAME sha256:<hex>`` line each in ``<data_dir>/operators.sha256`` (mode 0600): the audit log and acknowledgements
then say who. The controller reads both files when it starts. A fast hash is enough because the token is random and
long — there is nothing to brute-force — and it keeps every request's check cheap. Comparisons are constant-time.

Exception tree (under ControllerError, see errors.py)::

    AuthError                 any problem with the operator token file
    └── TokenFileError        the hash file is unreadable, malformed or too open (names the file and the problem)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

from .errors import AuthError, TokenFileError

__all__ = [
    "OPERATORS_FILE",
    "TOKEN_FILE",
    "AuthError",
    "TokenFileError",
    "add_operator",
    "ensure_operator_token",
    "hash_token",
    "read_operators",
    "remove_operator",
    "rotate_operator_token",
    "verify_token",
]

TOKEN_FILE = "operator_token.sha256"
OPERATORS_FILE = "operators.sha256"
OPERATOR_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # no dots: a session cookie carries it between dots
_RESERVED = {"operator", "controller"}  # the default token's holder; the controller's own audit entries
_PREFIX = "sha256:"
_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """The stored form of a token: ``sha256:<hex>``."""
    return _PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify_token(token: str | None, token_hash: str) -> bool:
    """True when `token` hashes to `token_hash`; constant-time in the token's content, False for any bad input."""
    if not token or not isinstance(token, str) or not _HASH_RE.match(token_hash or ""):
        return False
    return hmac.compare_digest(hash_token(token).encode(), token_hash.encode())


def _new_token() -> str:
    return "nft_" + secrets.token_urlsafe(32)


def _write_hash(path: Path, token_hash: str) -> None:
    """Write atomically with mode 0600 from the first byte (no window where the file is world-readable)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(token_hash + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_hash(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TokenFileError(f"{path}: mode {mode:04o} lets other users read it; run chmod 600 {path}")
    try:
        value = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: cannot read: {exc}") from exc
    if not _HASH_RE.match(value):
        raise TokenFileError(f"{path}: expected 'sha256:' and 64 hex digits; rotate the token to replace it")
    return value


def ensure_operator_token(data_dir: Path) -> tuple[str | None, str]:
    """Create the operator token on first use.

    Returns ``(plaintext, hash)`` when a token was just created (print the plaintext once; it is not stored) and
    ``(None, hash)`` when one already exists.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / TOKEN_FILE
    if path.exists():
        return None, _read_hash(path)
    token = _new_token()
    token_hash = hash_token(token)
    _write_hash(path, token_hash)
    return token, token_hash


def rotate_operator_token(data_dir: Path) -> tuple[str, str]:
    """Replace the operator token; the old one stops working once the controller reloads the hash (restart)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = _new_token()
    token_hash = hash_token(token)
    _write_hash(data_dir / TOKEN_FILE, token_hash)
    return token, token_hash


def read_operators(data_dir: Path) -> dict[str, str]:
    """Named operators' token hashes (name -> hash); {} when there is no operators file."""
    path = Path(data_dir) / OPERATORS_FILE
    if not path.exists():
        return {}
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TokenFileError(f"{path}: mode {mode:04o} lets other users read it; run chmod 600 {path}")
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"{path}: cannot read: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, _, token_hash = line.strip().partition(" ")
        if not OPERATOR_NAME.match(name) or not _HASH_RE.match(token_hash.strip()):
            raise TokenFileError(f"{path}: line {number}: expected 'NAME sha256:<64 hex digits>'")
        out[name] = token_hash.strip()
    return out


def _write_operators(data_dir: Path, operators: dict[str, str]) -> None:
    _write_hash(Path(data_dir) / OPERATORS_FILE, "\n".join(f"{n} {h}" for n, h in sorted(operators.items())))


def add_operator(data_dir: Path, name: str) -> str:
    """Give operator `name` a new token (replacing theirs if they had one); returns it, to be shown once."""
    if not OPERATOR_NAME.match(name) or name in _RESERVED:
        raise AuthError(f"operator name {name!r}: expected 1-32 of a-z 0-9 _ - starting with a letter, and not "
                        f"{' or '.join(sorted(_RESERVED))}")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    operators = read_operators(data_dir)
    token = _new_token()
    operators[name] = hash_token(token)
    _write_operators(data_dir, operators)
    return token


def remove_operator(data_dir: Path, name: str) -> bool:
    """Remove operator `name`'s token (effective when the controller restarts); False when there was none."""
    operators = read_operators(data_dir)
    if operators.pop(name, None) is None:
        return False
    _write_operators(data_dir, operators)
    return True
