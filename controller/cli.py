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
from nanofleet.controller import store_cli
from nanofleet.controller.store_cli import STORE_OPTION
from nanofleet.params import BROKER_URL, DEVICE_ID
from nanofleet.pg_db import DB_ERRORS
from nanofleet.protos.names import COMMAND_KINDS
from nanofleet.store_url import StoreTarget, as_target

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


def _store_at(data_dir: Path, store_url: str | None, config_url: str | None = None) -> StoreTarget:
    """The controller store a command opens (controller/store_cli.py's rule): refused when it is a SQLite file that
    does not exist, naming the flag (never an empty one made here)."""
    return store_cli.require(store_cli.target(data_dir, store_url, config_url))


def _stop_event() -> asyncio.Event:
    """Set on SIGINT/SIGTERM; the handlers are in place when this returns (call it before a slow start)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def gateway_store_target(value: str | None) -> StoreTarget | None:
    """--gateway-db: a file path, or a store URL (sqlite:///… or postgresql://…)."""
    if value is None:
        return None
    try:
        return as_target(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gateway-db") from None


@click.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="fleet.yaml")
@_DATA_DIR
@click.option("--listen", default=None, help="Dashboard/API address (default: fleet.yaml controller.listen).")
@_mqtt_options
@click.option("--share-group", default=None, help="Subscribe via $share/<group>/ so controllers split the load.")
@STORE_OPTION  # several controllers of one fleet share one PostgreSQL store and elect a leader
@click.option("--gateway-db", default=None, metavar="PATH|URL",
              help="The gateway's store, for usage and device tokens: its SQLite file or postgresql://… (default: "
                   "the controller's own store when that is PostgreSQL, where gateways sharing it keep theirs).")
@click.option("--ingest-reader", type=click.Choice(["builtin", "paho"]), default=None,
              help="MQTT reader for ingest (default: fleet.yaml controller.ingest_reader, builtin).")
@click.pass_context
def controller(ctx: click.Context, config_path: Path | None, data_dir: Path, listen: str | None,
               broker_url: str | None, mqtt_username: str | None, mqtt_password: str | None,
               share_group: str | None, store_url: str | None, gateway_db: str | None,
               ingest_reader: str | None) -> None:
    """Run the controller: MQTT ingest into its store (SQLite or PostgreSQL), policy, commands, dashboard + API."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("--config fleet.yaml is required")
    cfg = _load(config_path)
    from nanofleet.controller.service import ControllerService
    store_cli.target(data_dir, store_url, cfg.store.url)  # a malformed URL: a usage error naming --store, up front

    async def main() -> None:
        svc = ControllerService(cfg, data_dir, broker_url=broker_url, mqtt_username=mqtt_username,
                                mqtt_password=mqtt_password, share_group=share_group,
                                listen=listen or cfg.controller.listen, usage_db=gateway_store_target(gateway_db),
                                ingest_reader=ingest_reader,  # type: ignore[arg-type]
                                echo=lambda line: click.echo(line, err=False), store_url=store_url)
        stop = _stop_event()  # before start: a SIGTERM during a slow start stops it cleanly
        try:
            await svc.start()
        except DB_ERRORS as exc:  # the store's server is down or refuses us: one line, no traceback
            raise click.ClickException(f"controller: cannot open the store {svc.target}: {exc}") from None
        click.echo(f"controller: fleet {cfg.fleet!r}, broker {svc.broker_url} ({svc.ingest_reader} reader), "
                   f"store {svc.target}")
        signal_task = asyncio.ensure_future(stop.wait())
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
            name, why = svc.failed
            raise click.ClickException(f"controller stopped: {name} died ({type(why).__name__}: {why})")

    asyncio.run(main())


@controller.command("rotate-token")
@_DATA_DIR
@STORE_OPTION
def rotate_token(data_dir: Path, store_url: str | None) -> None:
    """Issue a new operator token (the old one stops working) and print it once."""
    from nanofleet.controller.audit import record_cli
    from nanofleet.controller.auth import rotate_operator_token

    token, _ = rotate_operator_token(data_dir)
    record_cli(store_cli.target(data_dir, store_url), "token_rotate", "operator_token",
               {"file": "operator_token.sha256"})
    click.echo(f"operator token: {token}")


@controller.group("operator")
def operator() -> None:
    """Named operators: each their own token, so the audit log and acknowledgements say who (restart to apply)."""


@operator.command("add")
@click.argument("name")
@_DATA_DIR
@STORE_OPTION
def operator_add(name: str, data_dir: Path, store_url: str | None) -> None:
    """Give operator NAME a token (a new one if they had one) and print it once."""
    from nanofleet.controller.audit import record_cli
    from nanofleet.controller.auth import AuthError, TokenFileError, add_operator

    try:
        token = add_operator(data_dir, name)
    except TokenFileError as exc:
        raise click.ClickException(str(exc)) from None
    except AuthError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    record_cli(store_cli.target(data_dir, store_url), "operator_add", name, {"file": "operators.sha256"})
    click.echo(f"operator token for {name}: {token}")
    click.echo("restart the controller to let it in", err=True)


@operator.command("remove")
@click.argument("name")
@_DATA_DIR
@STORE_OPTION
def operator_remove(name: str, data_dir: Path, store_url: str | None) -> None:
    """Remove operator NAME's token (refused from the controller's next start)."""
    from nanofleet.controller.audit import record_cli
    from nanofleet.controller.auth import AuthError, remove_operator

    try:
        removed = remove_operator(data_dir, name)
    except AuthError as exc:  # the operators file is unreadable or too open: say which and why
        raise click.ClickException(str(exc)) from None
    if not removed:
        raise click.ClickException(f"no operator {name!r} in {data_dir}")
    record_cli(store_cli.target(data_dir, store_url), "operator_remove", name, {"file": "operators.sha256"})
    click.echo(f"removed {name}")


@operator.command("list")
@_DATA_DIR
def operator_list(data_dir: Path) -> None:
    """The named operators (never their tokens); `operator` is the default token's holder."""
    from nanofleet.controller.auth import AuthError, read_operators

    try:
        names = sorted(read_operators(data_dir))
    except AuthError as exc:
        raise click.ClickException(str(exc)) from None
    for name in ["operator (default token)", *names]:
        click.echo(name)


@click.group()
def devices() -> None:
    """List devices and send them commands."""


@devices.command("list")
@_DATA_DIR
@STORE_OPTION
def devices_list(data_dir: Path, store_url: str | None) -> None:
    """Devices the controller knows, with state, last seen, temperature and policy version."""
    from nanofleet.controller.store import Store

    with Store(_store_at(data_dir, store_url)) as store:
        rows = store.list_devices()
    now = time.time() * 1000
    click.echo(f"{'DEVICE':24} {'STATE':10} {'SEEN':>7} {'TEMP':>6} {'THERMAL':9} {'CPU%':>5} {'RAM FREE':>9} POLICY")
    for d in rows:
        seen = f"{(now - d.last_seen_ms) / 1000:.0f}s" if d.last_seen_ms else "-"
        temp = f"{d.temp_max_c:.1f}" if d.temp_max_c is not None else "-"
        click.echo(f"{d.device_id:24} {d.state:10} {seen:>7} {temp:>6} {d.thermal_level:9} {d.cpu_percent:5.1f} "
                   f"{d.ram_available_mb:>7}MB {d.policy_version}")


@devices.command("remove")
@click.argument("device", type=DEVICE_ID)
@_DATA_DIR
@STORE_OPTION
def devices_remove(device: str, data_dir: Path, store_url: str | None) -> None:
    """Take DEVICE off the dashboard and API (a revoked or offline device; an online one is refused)."""
    from nanofleet.controller.audit import record_cli
    from nanofleet.controller.revocation import RemoveRefused, remove_device

    db = _store_at(data_dir, store_url)
    try:
        was = remove_device(db, device)
    except RemoveRefused as exc:
        raise click.ClickException(str(exc)) from None
    record_cli(db, "device_remove", device, {"state": was}, create=False)
    click.echo(f"removed {device} (was {was}); a device fleet.yaml lists shows again as never_seen when the "
               "controller restarts: take it out of fleet.yaml too")


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
    problem = await connect_or_explain(client, user, password, 10)
    if problem is not None:
        await client.stop()
        raise click.ClickException(problem)
    return client


async def connect_or_explain(client: Any, user: str | None, password: str | None, within: float) -> str | None:
    """Wait for a started MqttClient to connect: None when it did, else what to tell the operator. A refused login
    is answered at once (retrying cannot help), naming the settings that hold the controller's account."""
    deadline = time.monotonic() + within
    while not client.connected:
        if (client.last_error or "").startswith("connection refused"):
            what = "no password given" if password is None else f"the password given for {user or 'anonymous'!r}"
            return (f"the broker at {client.url} refused the controller's login ({client.last_error}; {what}): "
                    "set --mqtt-username/--mqtt-password (env NANOFLEET_MQTT_USERNAME/NANOFLEET_MQTT_PASSWORD) to "
                    "the controller's broker account")
        if time.monotonic() > deadline:
            return f"cannot reach the broker at {client.url}: {client.last_error}"
        with contextlib.suppress(TimeoutError):
            await client.wait_connected(0.05)
    return None


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
@STORE_OPTION
@_mqtt_options
@click.option("--dry-run", is_flag=True, help="Show the diff only.")
def policy_apply(config_path: Path, data_dir: Path, store_url: str | None, broker_url: str | None,
                 mqtt_username: str | None, mqtt_password: str | None, dry_run: bool) -> None:
    """Show what changed since the last published policy, then publish it (retained) with a new version."""
    from nanofleet.controller import policy as pol
    from nanofleet.controller.audit import AuditLog, cli_actor
    from nanofleet.controller.store import Store

    cfg = _load(config_path)
    with Store(_store_at(data_dir, store_url, cfg.store.url)) as store:
        if not dry_run:
            store.set_group_resolver(cfg.group_of)  # the dashboard's groups follow the fleet.yaml applied
        from nanofleet.controller.rollout_store import desired_models, desired_settings

        changes = pol.plan(cfg, pol.target_devices(cfg, store), store.published_policies(), desired_models(store),
                           {d: s for d, (s, _, _) in desired_settings(store).items()})
        if not changes:
            click.echo("no change: every device already has this policy")
            return
        seen = {d.device_id for d in store.list_devices() if d.state != "never_seen"}
        for ch in changes:
            was = f"v{ch.old_version}" if ch.old_version is not None else "none"
            click.echo(f"{ch.device_id} (was {was}{'' if ch.device_id in seen else ', never seen'}):")
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
        AuditLog(store).record(cli_actor(), "policy_apply", f"v{version}", {
            "version": version, "config": str(config_path), "device_count": len(changes),
            "changes": {ch.device_id: list(ch.changes)[:20] for ch in changes[:100]}}, "cli")
    unseen = sum(ch.device_id not in seen for ch in changes)
    click.echo(f"published policy version {version} to {len(changes) - unseen} device(s)"
               + (f"; {unseen} listed in fleet.yaml but never seen get it (retained) when they first connect"
                  if unseen else ""))
