"""Device tokens: issued per device, stored hashed, revocable, carrying the device's fleet and group.

A token is 256 random bits, so one SHA-256 of it is as strong as a slow password hash (nothing to brute-force) and
cheap enough to check on every call. Issuing a token for a device revokes its previous one.
The functions below take the gateway's store: a SQLite file's path (as always), a store URL
(`postgresql://…`, `sqlite:///…`) or a nanofleet.store_url.StoreTarget.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .db import GatewayDb, Target, as_target, connection, transaction
from .errors import InvalidRequest, PermissionDenied, Unauthenticated

TOKEN_PREFIX = "nft_"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    fleet: str
    group: str | None


@dataclass(frozen=True)
class TokenInfo:
    device_id: str
    fleet: str
    group: str | None
    created_ms: int
    revoked_ms: int | None

    @property
    def active(self) -> bool:
        return self.revoked_ms is None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_id(field: str, value: str | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or not _ID.match(value):
        raise InvalidRequest(f"{field}: expected letters, digits and . _ : - (1-128 characters), got {value!r}")


def _issue(conn: Any, device_id: str, fleet: str, group: str | None, token_hash: str) -> None:
    now = int(time.time() * 1000)
    conn.execute("UPDATE tokens SET revoked_ms = ? WHERE device_id = ? AND revoked_ms IS NULL", (now, device_id))
    conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)", (token_hash, device_id, fleet, group, now))


def issue_token(store: Target, device_id: str, fleet: str, group: str | None = None) -> str:
    """Issue a new token for `device_id` (revoking its previous one) and return it; only its hash is stored."""
    _check_id("device_id", device_id)
    _check_id("fleet", fleet)
    _check_id("group", group, optional=True)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with connection(store) as conn, transaction(conn):
        _issue(conn, device_id, fleet, group, hash_token(token))
    return token


def revoke_token(store: Target, device_id: str) -> int:
    """Revoke every active token of `device_id`; returns how many were revoked (0: none was active)."""
    with connection(store) as conn:
        cur = conn.execute("UPDATE tokens SET revoked_ms = ? WHERE device_id = ? AND revoked_ms IS NULL",
                           (int(time.time() * 1000), device_id))
        return int(cur.rowcount)


def list_tokens(store: Target) -> list[TokenInfo]:
    """Every token ever issued (never the hashes), newest first per device."""
    with connection(store) as conn:
        rows = conn.execute("SELECT device_id, fleet, grp, created_ms, revoked_ms FROM tokens "
                            "ORDER BY device_id, created_ms DESC").fetchall()
    return [TokenInfo(*row) for row in rows]


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of `authorization: Bearer <token>` metadata, or Unauthenticated."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Unauthenticated("malformed authorization metadata: expected 'Bearer <device token>'")
    raise Unauthenticated("missing authorization metadata: expected 'authorization: Bearer <device token>'")


class Authenticator:
    """Checks device tokens against the database, caching answers for `cache_ttl` seconds.

    Revocations made by this process take effect at once; those made by another process (the CLI) within the TTL.
    """

    def __init__(self, db: GatewayDb, fleet: str, cache_ttl: float = 2.0) -> None:
        self._db = db
        self._fleet = fleet
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, DeviceIdentity | None, str]] = {}

    def forget(self) -> None:
        self._cache.clear()

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> DeviceIdentity:
        token_hash = hash_token(bearer_token(metadata))
        now = time.monotonic()
        hit = self._cache.get(token_hash)
        if hit is None or hit[0] < now:
            identity, why = await self._db.aread(lambda conn: _lookup(conn, token_hash))
            if len(self._cache) > 100_000:
                self._cache.clear()
            hit = (now + self._ttl, identity, why)
            self._cache[token_hash] = hit
        _, identity, why = hit
        if identity is None:
            raise PermissionDenied(why)
        if identity.fleet != self._fleet:
            raise PermissionDenied(f"token of device {identity.device_id!r} belongs to fleet {identity.fleet!r}, "
                                   f"this gateway serves {self._fleet!r}")
        return identity


def _lookup(conn: Any, token_hash: str) -> tuple[DeviceIdentity | None, str]:
    row = conn.execute("SELECT device_id, fleet, grp, revoked_ms FROM tokens WHERE token_hash = ?",
                       (token_hash,)).fetchone()
    if row is None:
        return None, "unknown device token"
    device_id, fleet, group, revoked_ms = row
    if revoked_ms is not None:
        return None, f"device token of {device_id!r} was revoked"
    return DeviceIdentity(device_id, fleet, group), ""


def token_is_active(store: Target, token: str) -> bool:
    """True if `token` was issued here and is not revoked (`nanofleet enroll` must not hand out a dead one)."""
    where = as_target(store)
    if where.kind == "sqlite" and (where.path is None or not where.path.exists()):
        return False
    with connection(where) as conn:
        row = conn.execute("SELECT revoked_ms FROM tokens WHERE token_hash = ?", (hash_token(token),)).fetchone()
    return row is not None and row[0] is None
