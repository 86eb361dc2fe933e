"""`nanofleet artifacts add|list|rm`: the controller's artifact store (controller/artifacts.py) from the shell."""

from __future__ import annotations

from pathlib import Path

import click

from nanofleet.controller import store_cli
from nanofleet.controller.artifacts import Artifact, ArtifactError, ArtifactStore

_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=Path("nanofleet-controller"),
                         show_default=True, help="The controller's state folder (artifacts/ is inside it).")


def _store(data_dir: Path, store_url: str | None) -> ArtifactStore:
    """The artifacts folder of the controller's data folder, refused where no controller keeps its state (its
    SQLite store missing; with --store postgresql://… the data folder itself) — never an empty one made there."""
    target = store_cli.target(data_dir, store_url)
    if target.kind == "postgresql" and not data_dir.is_dir():
        raise click.ClickException(f"--data-dir: no controller state in {data_dir} (no such folder); "
                                   "give the controller's --data-dir")
    if not store_cli.exists(target):
        raise click.ClickException(f"--data-dir: no controller state in {data_dir} (no controller.db); "
                                   "give the controller's --data-dir")
    return ArtifactStore(data_dir / "artifacts")


def _line(a: Artifact) -> str:
    return f"{a.sha256}  {a.size:>12}  {a.name}"


@click.group()
def artifacts() -> None:
    """Files devices fetch from the controller (models), named by sha256."""


@artifacts.command("add")
@click.argument("source")
@click.option("--name", default=None, help="A name to refer to it by (default: the file name).")
@click.option("--sha256", default=None, help="For a URL or hf:// source: the expected sha256 (required).")
@_DATA_DIR
@store_cli.STORE_OPTION
def add(source: str, name: str | None, sha256: str | None, data_dir: Path, store_url: str | None) -> None:
    """Add SOURCE (a file, or an http(s):// / hf:// URL with --sha256) and print its sha256."""
    store = _store(data_dir, store_url)
    try:
        if source.startswith(("http://", "https://", "hf://")):
            if not sha256:
                raise click.UsageError("--sha256 is required for a URL: the download is verified against it")
            art = store.add_url(source, sha256, name)
        else:
            art = store.add_file(Path(source), name)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_line(art))


@artifacts.command("list")
@_DATA_DIR
@store_cli.STORE_OPTION
def list_(data_dir: Path, store_url: str | None) -> None:
    """The artifacts: sha256, size in bytes, name."""
    for art in _store(data_dir, store_url).list():
        click.echo(_line(art))


@artifacts.command("rm")
@click.argument("ref")
@_DATA_DIR
@store_cli.STORE_OPTION
def rm(ref: str, data_dir: Path, store_url: str | None) -> None:
    """Remove the artifact REF (sha256, 8+ digit prefix, or name)."""
    try:
        art = _store(data_dir, store_url).remove(ref)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {art.sha256} ({art.name})")
