"""The one CLI, `nanofleet`. Each command lives beside the part it drives and is imported only when used, so a
device install (`nanofleet[agent]`) never imports the controller's dependencies."""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> "module:attribute" (a click command or group)
COMMANDS: dict[str, str] = {
    "up": "nanofleet.up:up",
    "agent": "nanofleet.agent.cli:agent",
    "model": "nanofleet.agent.cli:model",
    "controller": "nanofleet.controller.cli:controller",
    "devices": "nanofleet.controller.cli:devices",
    "policy": "nanofleet.controller.cli:policy",
    "artifacts": "nanofleet.controller.artifacts_cli:artifacts",
    "rollout": "nanofleet.controller.rollout_cli:rollout",
    "enroll": "nanofleet.controller.enroll:enroll",
    "revoke": "nanofleet.controller.enroll:revoke",
    "gateway": "nanofleet.controller.gateway.cli:gateway",
    "sim": "nanofleet.sim:sim",
}


def _available(target: str) -> bool:
    module = target.split(":")[0]
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except ModuleNotFoundError:
        return False
    return True


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = {name for name, target in COMMANDS.items() if _available(target)}
        return sorted(lazy | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(target):
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr, None)
        except ImportError as exc:  # e.g. a controller command on a device install
            raise click.ClickException(
                f"'nanofleet {cmd_name}' needs a dependency that is not installed ({exc.name}); "
                "install the matching extra, e.g. pip install 'nanofleet[controller]'"
            ) from exc


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nanofleet")
def main() -> None:
    """Run small language models on fleets of edge devices."""


@main.command()
@click.argument("names", nargs=-1)
def bench(names: tuple[str, ...]) -> None:
    """Run the benchmarks in ./bench (a source checkout) and write bench/report.md; NAMES filter them."""
    import subprocess
    import sys
    from pathlib import Path

    if not (Path.cwd() / "bench" / "__main__.py").exists():
        raise click.ClickException("no bench/ folder here: run `nanofleet bench` from a nanofleet source checkout")
    sys.exit(subprocess.call([sys.executable, "-m", "bench", *names]))
