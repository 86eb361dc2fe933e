"""The controller's artifact store: model files (and any other blob devices fetch) named by their sha256, so a fleet
needs no internet access and a device can verify every byte it got.

Layout, under `<controller data dir>/artifacts/` (0700): `<sha256>` (the bytes, 0600) and `<sha256>.json` (name,
size, when added). A file is copied into a hidden temp file in the same folder while it is hashed, fsynced, then
renamed to its hash: a crash leaves the old store or the new one, never a half artifact under a real name. The same
bytes added twice are one artifact (the later name wins).

Devices fetch `GET /artifacts/{sha256}` (controller/web/routes_artifacts.py) with their gateway token: one device
credential for everything, so revoking a device's token also closes the artifact store to it.

    ArtifactError (ControllerError)   root
    ├── ArtifactNotFound              no artifact has that sha256 or name
    └── ArtifactRefused               bad input: not a file, bad sha256, ambiguous name (the message names it)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nanofleet.controller.errors import ControllerError
from nanofleet.pg_db import DB_ERRORS
from nanofleet.store_url import StoreTarget, as_target

__all__ = ["Artifact", "ArtifactError", "ArtifactNotFound", "ArtifactRefused", "ArtifactStore", "DeviceTokens"]

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_BLOCK = 1 << 20


class ArtifactError(ControllerError):
    """An artifact cannot be stored, found or served as asked."""


class ArtifactNotFound(ArtifactError):
    """No artifact has that sha256 or name."""


class ArtifactRefused(ArtifactError):
    """Bad input (the message names what is wrong)."""


@dataclass(frozen=True, slots=True)
class Artifact:
    sha256: str
    name: str
    size: int
    added_ms: int


class ArtifactStore:
    """Content-addressed files in one folder. Safe for one writer process and any number of readers."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def path(self, sha256: str) -> Path:
        """Where the bytes of `sha256` are (ArtifactNotFound when they are not)."""
        sha = check_sha(sha256)
        p = self.root / sha
        if not p.is_file():
            raise ArtifactNotFound(f"no artifact with sha256 {sha}")
        return p

    def add_file(self, source: Path, name: str | None = None) -> Artifact:
        """Copy `source` in under its sha256 (hashing while copying: the file is read once)."""
        source = Path(source)
        if not source.is_file():
            raise ArtifactRefused(f"FILE: {source} is not a readable file")
        name = check_name(name or source.name)
        tmp = self.root / f".add-{os.getpid()}-{threading.get_ident()}.tmp"
        h = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                                  "wb") as dst:
                while block := src.read(_BLOCK):
                    h.update(block)
                    dst.write(block)
                    size += len(block)
                dst.flush()
                os.fsync(dst.fileno())
            sha = h.hexdigest()
            os.replace(tmp, self.root / sha)
        finally:
            tmp.unlink(missing_ok=True)
        return self._record(Artifact(sha, name, size, int(time.time() * 1000)))

    def add_url(self, url: str, sha256: str, name: str | None = None) -> Artifact:
        """Download `url` (http(s) or hf://) with resume and verification into the store (the agent's pull code:
        the same Range resume and sha256 check a device uses)."""
        from nanofleet.agent.models.download import ModelFileError, pull
        from nanofleet.agent.models.files import url_for

        sha = check_sha(sha256)
        try:
            real = url_for(url)
        except ValueError as exc:
            raise ArtifactRefused(f"URL: {exc}") from exc
        dest = self.root / sha
        try:
            pull(real, dest, sha)
        except ModelFileError as exc:
            raise ArtifactError(f"{url}: {exc}") from exc
        os.chmod(dest, 0o600)
        return self._record(Artifact(sha, check_name(name or Path(real).name), dest.stat().st_size,
                                     int(time.time() * 1000)))

    def _record(self, art: Artifact) -> Artifact:
        meta = self.root / f"{art.sha256}.json"
        tmp = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            json.dump(asdict(art), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta)
        return art

    def list(self) -> list[Artifact]:
        out = []
        for meta in sorted(self.root.glob("*.json")):
            sha = meta.name.removesuffix(".json")
            if SHA256.match(sha) and (self.root / sha).is_file():
                out.append(self._meta(sha))
        return sorted(out, key=lambda a: (a.name, a.added_ms))

    def _meta(self, sha: str) -> Artifact:
        try:
            data = json.loads((self.root / f"{sha}.json").read_text(encoding="utf-8"))
            return Artifact(sha, str(data["name"]), int(data["size"]), int(data["added_ms"]))
        except (OSError, ValueError, KeyError, TypeError):  # bytes without readable metadata: still an artifact
            return Artifact(sha, sha[:12], (self.root / sha).stat().st_size, 0)

    def get(self, ref: str) -> Artifact:
        """The artifact named by a sha256 (or a unique prefix of 8+ hex digits) or by its name."""
        ref = ref.strip()
        if SHA256.match(ref):
            self.path(ref)
            return self._meta(ref)
        matches = [a for a in self.list() if a.name == ref or (len(ref) >= 8 and a.sha256.startswith(ref))]
        if not matches:
            raise ArtifactNotFound(f"no artifact named {ref!r} (nanofleet artifacts list shows them)")
        if len({a.sha256 for a in matches}) > 1:
            raise ArtifactRefused(f"{ref!r} names {len(matches)} artifacts; give the sha256: "
                                  + ", ".join(a.sha256 for a in matches))
        return matches[0]

    def remove(self, ref: str) -> Artifact:
        art = self.get(ref)
        (self.root / art.sha256).unlink()
        (self.root / f"{art.sha256}.json").unlink(missing_ok=True)
        return art


def check_sha(value: str) -> str:
    v = value.strip().lower()
    if not SHA256.match(v):
        raise ArtifactRefused(f"sha256: expected 64 hex digits, got {value!r}")
    return v


def check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ArtifactRefused(f"name: expected letters, digits and . _ + - (1-128 characters), got {value!r}")
    return value


class DeviceTokens:
    """Checks a device's gateway token against the gateway's token table (read-only; never creates the db).
    Answers are cached `ttl` seconds, so a revocation takes effect within that time."""

    def __init__(self, gateway_db: Path | StoreTarget | None, fleet: str, ttl: float = 2.0) -> None:
        self.db = None if gateway_db is None else as_target(gateway_db)
        self.fleet, self.ttl = fleet, ttl
        self._cache: dict[str, tuple[float, str | None, str]] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def check(self, token: str) -> str:
        """The device id of an active token of this fleet; ArtifactRefused with the reason otherwise."""
        if self.db is None:
            raise ArtifactRefused("this controller was started without --gateway-db: it cannot check device tokens")
        h = hashlib.sha256(token.encode("utf-8")).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(h)
        if hit is None or hit[0] < now:
            device, why = self._lookup(h)
            hit = (now + self.ttl, device, why)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[h] = hit
        if hit[1] is None:
            raise ArtifactRefused(hit[2])
        return hit[1]

    def _lookup(self, token_hash: str) -> tuple[str | None, str]:
        assert self.db is not None
        sql = "SELECT device_id, fleet, revoked_ms FROM tokens WHERE token_hash = ?"
        if self.db.kind == "postgresql":  # the gateways' shared store (their tables live beside the controller's)
            from nanofleet.controller.gateway.db import connection

            try:
                with connection(self.db) as pg:
                    row = pg.execute(sql, (token_hash,)).fetchone()
            except DB_ERRORS as exc:
                raise ArtifactError(f"cannot read device tokens from {self.db}: {exc}") from exc
            return self._judge(row)
        assert self.db.path is not None
        if not self.db.path.exists():
            return None, "unknown device token (no gateway token table yet)"
        try:
            conn = sqlite3.connect(f"file:{self.db.path}?mode=ro", uri=True, timeout=5)
            try:
                row = conn.execute(sql, (token_hash,)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise ArtifactError(f"cannot read device tokens from {self.db}: {exc}") from exc
        return self._judge(row)

    def _judge(self, row: Any) -> tuple[str | None, str]:
        if row is None:
            return None, "unknown device token"
        device_id, fleet, revoked_ms = row
        if revoked_ms is not None:
            return None, f"device token of {device_id!r} was revoked"
        if fleet != self.fleet:
            return None, f"device token of {device_id!r} belongs to fleet {fleet!r}, not {self.fleet!r}"
        return str(device_id), ""
