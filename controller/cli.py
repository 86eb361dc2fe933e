"""`nanofleet controller`, `nanofleet devices`, `nanofleet policy`: thin commands over the controller library."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import click

from nanofleet.config import ConfigError, FleetConfig, load_fleet
from nanofleet.params import BROKER_URL, DEVICE_ID
from nanofleet.protos.names import COMMAND_KINDS

_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=Path("nanofleet-controller"),
                         show_default=True, help="The controller's state folder (controller.db, operator token).")


def _mqtt_options(f: Any) -> Any:
    f = click.option("--mqtt-password", envvar="NANOFLEET_MQTT_PASSWORD", default=None,
                     help="MQTT password (env NANOFLEET_MQTT_PASSWORD).")(f)
    f = click.option("--mqtt-username", envvar="NANOFLEET_MQTT_USERNAME", default=None, help="MQTT user name.")(f)
    return click.option("--broker-url", type=BROKER_URL, default=None,
                        help="mqtt://host:port (default: fleet.yaml broker.url).")(f)


def _load(path: Path) -> FleetConfig:
    try:
        return load_fleet(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="fleet.yaml")
@_DATA_DIR
@click.option("--listen", default=None, help="Dashboard/API address (default: fleet.yaml controller.listen).")
@_mqtt_options
@click.option("--share-group", default=None, help="Subscribe via $share/<group>/ so controllers split the load.")
@click.option("--gateway-db", type=click.Path(path_type=Path), default=None, help="Gateway usage DB to show.")
@click.option("--ingest-reader", type=click.Choice(["builtin", "paho"]), default=None,
              help="MQTT reader for ingest (default: fleet.yaml controller.ingest_reader, builtin).")
@click.pass_context
def controller(ctx: click.Context, config_path: Path | None, data_dir: Path, listen: str | None,
               broker_url: str | None, mqtt_username: str | None, mqtt_password: str | None,
               share_group: str | None, gateway_db: Path | None, ingest_reader: str | None) -> None:
    """Run the controller: MQTT ingest into SQLite, policy, commands, dashboard + REST API."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("--config fleet.yaml is required")
    cfg = _load(config_path)
    from nanofleet.controller.service import ControllerService

    async def main() -> None:
        svc = ControllerService(cfg, data_dir, broker_url=broker_url, mqtt_username=mqtt_username,
                                mqtt_password=mqtt_password, share_group=share_group,
                                listen=listen or cfg.controller.listen, usage_db=gateway_db,
                                ingest_reader=ingest_reader,  # type: ignore[arg-type]
                                echo=lambda line: click.echo(line, err=False))
        await svc.start()
        click.echo(f"controller: fleet {cfg.fleet!r}, broker {svc.broker_url} ({svc.ingest_reader} reader), "
                   f"store {data_dir / 'controller.db'}")
        signal_task = asyncio.ensure_future(_until_signal())
        failed_task = asyncio.ensure_future(svc.wait_failed())
        try:
            await asyncio.wait([signal_task, failed_task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            signal_task.cancel()
            failed_task.cancel()
            try:
                await svc.stop()
            except BaseExceptionGroup as group:  # each failure was logged with its traceback by stop()
                problems = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
                raise click.ClickException(f"{group.message}: {problems}") from group
        if svc.failed is not None:
            name, exc = svc.failed
            raise click.ClickException(f"controller stopped: {name} died ({type(exc).__name__}: {exc})")

    asyncio.run(main())


@controller.command("rotate-token")
@_DATA_DIR
def rotate_token(data_dir: Path) -> None:
    """Issue a new operator token (the old one stops working) and print it once."""
    from nanofleet.controller.auth import rotate_operator_token

    token, _ = rotate_operator_token(data_dir)
    click.echo(f"operator token: {token}")


@click.group()
def devices() -> None:
    """List devices and send them commands."""


@devices.command("list")
@_DATA_DIR
def devices_list(data_dir: Path) -> None:
    """Devices the controller knows, with state, last seen, temperature and policy version."""
    from nanofleet.controller.store import Store

    db = data_dir / "controller.db"
    if not db.exists():
        raise click.ClickException(f"no controller store at {db}")
    with Store(db) as store:
        rows = store.list_devices()
    now = time.time() * 1000
    click.echo(f"{'DEVICE':24} {'STATE':8} {'SEEN':>7} {'TEMP':>6} {'THERMAL':9} {'CPU%':>5} {'RAM FREE':>9} POLICY")
    for d in rows:
        seen = f"{(now - d.last_seen_ms) / 1000:.0f}s" if d.last_seen_ms else "-"
        temp = f"{d.temp_max_c:.1f}" if d.temp_max_c is not None else "-"
        click.echo(f"{d.device_id:24} {d.state:8} {seen:>7} {temp:>6} {d.thermal_level:9} {d.cpu_percent:5.1f} "
                   f"{d.ram_available_mb:>7}MB {d.policy_version}")


def _parse_args(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected key=value", param_hint="ARGS")
        out[key] = value
    return out


async def _client(cfg: FleetConfig, broker_url: str | None, user: str | None, password: str | None) -> Any:
    from nanofleet.mqtt import MqttClient

    url = broker_url or cfg.broker.url
    client = MqttClient(url, username=user, password=password, backoff=(0.2, 2),
                        ca=cfg.broker.ca if url.startswith("mqtts://") else None)
    await client.start()
    try:
        await client.wait_connected(10)
    except TimeoutError:
        await client.stop()
        raise click.ClickException(f"cannot reach the broker at {client.url}: {client.last_error}") from None
    return client


@devices.command("cmd", help=f"Send KIND ({', '.join(COMMAND_KINDS)}) to DEVICE with key=value ARGS; print the "
                             "result.")  # the kinds from their one list (protos/names.py)
@click.argument("device", type=DEVICE_ID)
@click.argument("kind", type=click.Choice(COMMAND_KINDS))
@click.argument("args", nargs=-1)
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=Path("fleet.yaml"), show_default=True)
@_mqtt_options
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True)
def devices_cmd(device: str, kind: str, args: tuple[str, ...], config_path: Path, broker_url: str | None,
                mqtt_username: str | None, mqtt_password: str | None, timeout_s: float) -> None:
    from nanofleet.controller.commands import CommandService, UnknownCommand

    cfg = _load(config_path)
    kv = _parse_args(args)

    services: list[Any] = [None]

    async def main() -> Any:
        client = await _client(cfg, broker_url, mqtt_username, mqtt_password)
        svc = services[0] = CommandService(client, cfg.fleet)
        listener = asyncio.create_task(svc.listen())
        try:
            await asyncio.sleep(0.05)
            return await svc.send(device, kind, kv, timeout_s)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await client.stop()

    try:
        out = asyncio.run(main())
    except UnknownCommand as exc:
        raise click.UsageError(str(exc)) from None
    except TimeoutError as exc:
        raise click.ClickException(str(exc)) from None
    finally:  # each skipped result was logged; say so here too (a timeout may be why), a CLI user may not see logs
        rejected = services[0].counters["results_rejected"] if services[0] is not None else 0
        if rejected:
            click.echo(f"warning: {rejected} malformed command result(s) on the fleet's result topic were skipped",
                       err=True)
    click.echo(f"{device} {kind}: {out.status} {out.message} ({out.elapsed_ms:.0f} ms)")
    for k, v in sorted(out.data.items()):
        click.echo(f"  {k} = {v}")
    if out.status != "ok":
        raise SystemExit(1)


@click.group()
def policy() -> None:
    """Compile fleet.yaml into per-device routing policy and publish it."""


@policy.command("apply")
@click.argument("config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@_DATA_DIR
@_mqtt_options
@click.option("--dry-run", is_flag=True, help="Show the diff only.")
def policy_apply(config_path: Path, data_dir: Path, broker_url: str | None, mqtt_username: str | None,
                 mqtt_password: str | None, dry_run: bool) -> None:
    """Show what changed since the last published policy, then publish it (retained) with a new version."""
    from nanofleet.controller import policy as pol
    from nanofleet.controller.store import Store

    cfg = _load(config_path)
    with Store(data_dir / "controller.db") as store:
        if not dry_run:
            store.set_group_resolver(cfg.group_of)  # the dashboard's groups follow the fleet.yaml applied
        from nanofleet.controller.rollout_store import desired_models, desired_settings

        changes = pol.plan(cfg, pol.target_devices(cfg, store), store.published_policies(), desired_models(store),
                           {d: s for d, (s, _, _) in desired_settings(store).items()})
        if not changes:
            click.echo("no change: every device already has this policy")
            return
        for ch in changes:
            was = f"v{ch.old_version}" if ch.old_version is not None else "none"
            click.echo(f"{ch.device_id} (was {was}):")
            for line in ch.changes:
                click.echo(f"  {line}")
        if dry_run:
            return

        async def main() -> int:
            client = await _client(cfg, broker_url, mqtt_username, mqtt_password)
            try:
                return await pol.publish(client, store, changes)
            finally:
                await client.stop()

        version = asyncio.run(main())
    click.echo(f"published policy version {version} to {len(changes)} device(s)")
