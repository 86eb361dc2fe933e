"""How a CLI command finds the controller store: `--store URL` (the one option, defined here, that every command
opening the store takes), else fleet.yaml's `store.url` where the command reads fleet.yaml, else controller.db in
the controller's data folder — nanofleet.store_url.resolve's rule, as the controller and the gateway read it.

`writer()` opens a bare writer of the store (no device mirror, no housekeeping) for a one-off write beside a running
controller: on SQLite the file's write lock and busy timeout serialise the two processes, on PostgreSQL the server
does. A SQLite store that does not exist is refused by the commands (never an empty one made where the operator did
not mean one); a PostgreSQL URL was given on purpose, so its database is used (and migrated) as it is.
"""

from __future__ import annotations

from pathlib import Path

import click

from nanofleet.sqlite_db import Writer
from nanofleet.store_url import StoreTarget, as_target, resolve

__all__ = ["STORE_OPTION", "exists", "require", "target", "writer"]

FILENAME = "controller.db"
STORE_OPTION = click.option(
    "--store", "store_url", default=None, metavar="URL", envvar="NANOFLEET_STORE_URL",
    help="The controller store: sqlite:///path or postgresql://user@host/db (env NANOFLEET_STORE_URL; default: "
         "fleet.yaml store.url where the command reads fleet.yaml, else controller.db in the data folder).")


def target(data_dir: Path, store_url: str | None = None, config_url: str | None = None) -> StoreTarget:
    """`--store`, else fleet.yaml's store.url, else DATA_DIR/controller.db; a malformed URL is a usage error."""
    try:
        return resolve(store_url or config_url, data_dir, FILENAME)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix("store.url: "), param_hint="--store") from None


def exists(store: Path | StoreTarget) -> bool:
    """Whether there is a store there: a SQLite file; a PostgreSQL URL always names one."""
    t = as_target(store)
    return t.kind == "postgresql" or (t.path is not None and t.path.exists())


def require(store: StoreTarget) -> StoreTarget:
    """The store, refused when it is a SQLite file that does not exist, naming the options that choose it."""
    if not exists(store):
        assert store.path is not None
        raise click.BadParameter(f"no controller store at {store.path.resolve()}: give the controller's --data-dir "
                                 "(`nanofleet up` keeps it in .nanofleet/controller) or --store URL",
                                 param_hint="--data-dir")
    return store


def writer(store: Path | StoreTarget, name: str = "cli-store") -> Writer:
    """A bare writer of the store with its migrations run (close it after use)."""
    t = as_target(store)
    if t.kind == "postgresql":
        from nanofleet.pg_db import PgWriter

        from .pg_migrations import PG_MIGRATIONS

        assert t.url is not None
        return PgWriter(t.url, PG_MIGRATIONS, name=name)
    from .migrations import MIGRATIONS

    assert t.path is not None
    return Writer(t.path, MIGRATIONS, name=name, migrations_table="_migrations")
