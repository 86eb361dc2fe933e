"""`nanofleet agent` and `nanofleet model …`: thin commands over the service and the model-file helpers."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from nanofleet.config import ConfigError

if TYPE_CHECKING:
    from nanofleet.agent.settings import AgentSettings


def _settings(config: str | None, **overrides: object) -> AgentSettings:
    from nanofleet.agent.settings import load_agent_settings

    try:
        return load_agent_settings(config, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the agent extra brings it): a cheaper event loop on the request path."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@click.command()
@click.option("--config", type=click.Path(dir_okay=False), help="agent.yaml (what `nanofleet enroll` writes)")
@click.option("--device-id", help="this device's id (overrides the config)")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="unix socket to serve on")
@click.option("--data-dir", type=click.Path(file_okay=False), help="model cache and private files (0700)")
def agent(config: str | None, device_id: str | None, socket_path: str | None, data_dir: str | None) -> None:
    """Run the device agent: local model, router and the socket API (and MQTT when a broker is set)."""
    from nanofleet.agent.errors import AgentFatal
    from nanofleet.agent.service import AgentService
    from nanofleet.agent.unix_socket import SocketError

    settings = _settings(config, device_id=device_id, socket_path=socket_path, data_dir=data_dir)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(AgentService(settings).run())
    except (SocketError, AgentFatal) as exc:  # exit 1: systemd / `nanofleet up` restart the agent
        raise click.ClickException(str(exc)) from None


@click.group()
def model() -> None:
    """Model files in the agent's cache: pull, list, make-test."""


def _cache_dir(config: str | None, data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir) / "models"
    if config:
        return _settings(config).cache_dir
    from nanofleet.agent.settings import default_data_dir

    return default_data_dir() / "models"


F = TypeVar("F", bound=Callable[..., Any])
_cache_options = [
    click.option("--config", type=click.Path(dir_okay=False), help="agent.yaml (its data_dir holds the cache)"),
    click.option("--data-dir", type=click.Path(file_okay=False), help="the agent's data folder"),
]


def _with_cache(f: F) -> F:
    for option in reversed(_cache_options):
        f = option(f)
    return f


@model.command()
@click.argument("url")
@click.option("--sha256", required=True, help="expected sha256 of the file (64 hex digits)")
@_with_cache
def pull(url: str, sha256: str, config: str | None, data_dir: str | None) -> None:
    """Download URL (http(s):// or hf://owner/repo/file.gguf) into the cache: resumable, verified."""
    from nanofleet.agent.models.download import ModelFileError, ProgressPrinter
    from nanofleet.agent.models.download import pull as do_pull
    from nanofleet.agent.models.files import cache_name, human_size, url_for

    sha = sha256.strip().lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise click.BadParameter("expected 64 hexadecimal digits", param_hint="--sha256")
    real = url_for(url)
    dest = _cache_dir(config, data_dir) / cache_name(real, sha)
    printer = ProgressPrinter(sys.stderr)
    try:
        path = do_pull(real, dest, sha, progress=printer, notice=printer.notice)
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path} ({human_size(path.stat().st_size)}, sha256 verified)")


@model.command("list")
@_with_cache
def list_(config: str | None, data_dir: str | None) -> None:
    """The cache's model files with their sizes, and the total."""
    from nanofleet.agent.models.files import cache_report

    click.echo(cache_report(_cache_dir(config, data_dir)))


@model.command("make-test")
@_with_cache
@click.option("--output", type=click.Path(dir_okay=False), help="write here instead of the cache")
def make_test(config: str | None, data_dir: str | None, output: str | None) -> None:
    """Generate the tiny random-weight test model (builtin:tiny-test)."""
    from nanofleet.agent.models.download import sha256_file
    from nanofleet.agent.tiny_model import make_tiny_gguf

    path = make_tiny_gguf(Path(output) if output else _cache_dir(config, data_dir) / "tiny-test.gguf")
    click.echo(f"{path} sha256={sha256_file(path)}")
