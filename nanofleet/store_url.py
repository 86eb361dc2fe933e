"""Where a store lives: fleet.yaml's `store.url` (or `--store`) read one way for the controller and the gateway."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nanofleet.pg_db import is_postgres, redact


@dataclass(frozen=True)
class StoreTarget:
    """A SQLite file (`path`) or a PostgreSQL database (`url`)."""

    kind: Literal["sqlite", "postgresql"]
    path: Path | None = None
    url: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.kind == "sqlite" else redact(self.url or "")


def resolve(url: str | None, data_dir: Path, filename: str) -> StoreTarget:
    """`postgresql://…` as given; `sqlite:///path` that file (relative; `sqlite:////abs` absolute, as SQLAlchemy reads
    it); None the part's own file in its data folder."""
    if url is None:
        return StoreTarget("sqlite", path=data_dir / filename)
    if is_postgres(url):
        return StoreTarget("postgresql", url=url)
    if url.startswith("sqlite:///"):
        return StoreTarget("sqlite", path=Path(url.removeprefix("sqlite:///")))  # sqlite:////abs, sqlite:///rel
    raise ValueError(f"store.url: expected sqlite:///path or postgresql://…, got {redact(url)!r}")


def as_target(value: str | Path | StoreTarget) -> StoreTarget:
    """The one coercion of what callers hold — a StoreTarget, a store URL, or a SQLite file's path — to a target.
    Something with a scheme that is not a store URL is refused (ValueError), never taken for a file name."""
    if isinstance(value, StoreTarget):
        return value
    text = str(value)
    if "://" in text:
        return resolve(text, Path("."), "")
    return StoreTarget("sqlite", path=Path(value))
