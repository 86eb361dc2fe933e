"""`nanofleet gateway …`: serve, manage device tokens, check health, read usage. Each command is a few lines over
one library call."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import click

from nanofleet.config import ConfigError, FleetConfig, load_fleet
from nanofleet.pg_db import DB_ERRORS
from nanofleet.store_url import StoreTarget

from .auth import issue_token, list_tokens, revoke_token
from .db import gateway_target
from .errors import GatewayError

_data_dir = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("gateway-data"),
                         show_default=True, help="Folder of the gateway's SQLite file (tokens, usage).")
_store = click.option("--store", "store_url", default=None, metavar="URL",
                      help="The gateway's database: postgresql://… (shared by several gateways) or sqlite:///path "
                           "(default: store.url of --config when PostgreSQL, else DATA_DIR/gateway.db).")
_store_config = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                             default=Path("fleet.yaml"), show_default=True,
                             help="The fleet.yaml whose store.url is used when --store is not given (if it exists).")


def _target(store_url: str | None, data_dir: Path, config_path: Path | None) -> StoreTarget:
    """--store, else fleet.yaml's store.url when PostgreSQL (its sqlite:/// is the controller's file), else
    DATA_DIR/gateway.db."""
    if store_url is None and config_path is not None and config_path.exists():
        url = load_fleet(config_path).store.url
        store_url = url if url and not url.startswith("sqlite:") else None
    try:
        return gateway_target(store_url, data_dir)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from exc


@click.group()
def gateway() -> None:
    """The gRPC gateway to Gemini Flash: device auth, policy, budgets, usage."""


@gateway.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("fleet.yaml"),
              show_default=True, help="The fleet.yaml to enforce.")
@_data_dir
@click.option("--listen", default=None, help="host:port (default: gateway.listen in fleet.yaml).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds calls in flight may take to finish on SIGTERM/SIGINT.")
@_store
def serve(config_path: Path, data_dir: Path, listen: str | None, tls_cert: str | None, tls_key: str | None,
          grace: float, store_url: str | None) -> None:
    """Serve Inference until SIGTERM/SIGINT, then shut down gracefully."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_fleet(config_path)
        target = _target(store_url, data_dir, config_path)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(config, data_dir, listen, tls_cert, tls_key, grace, target))
    except (ConfigError, GatewayError) as exc:
        raise click.ClickException(str(exc)) from exc
    except BaseExceptionGroup as group:  # stop() went through every step; each failure was logged with its traceback
        raise click.ClickException(_failures(group)) from group


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the controller extra brings it): less CPU a call on the gateway's hot path."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _failures(group: BaseExceptionGroup[BaseException]) -> str:
    return f"{group.message}: " + "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)


async def _serve(config: FleetConfig, data_dir: Path, listen: str | None, tls_cert: str | None, tls_key: str | None,
                 grace: float, store: StoreTarget) -> None:
    from .server import Gateway

    stop = asyncio.Event()  # handlers first: a SIGTERM during a slow start stops it cleanly, not the process
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw = Gateway(config, data_dir, listen=listen, tls_cert=tls_cert, tls_key=tls_key, grace=grace, store=store)
    try:
        await gw.start()
    except DB_ERRORS as exc:  # the store's server is down or refuses us: one line, no traceback
        raise click.ClickException(f"gateway: cannot open its store {store}: {exc}") from None
    click.echo(f"gateway listening on {gw.address}; {gw.upstream_detail}; store {gw.store}", err=True)
    await stop.wait()
    click.echo("gateway stopping: letting calls in flight finish", err=True)
    await gw.stop()


@gateway.group()
def token() -> None:
    """Device tokens (stored hashed; issuing a new one revokes the old)."""


@token.command("issue")
@click.argument("device")
@click.option("--group", default=None, help="The device's group (used when fleet.yaml does not list the device).")
@click.option("--fleet", default=None, help="Fleet name (default: `fleet` of --config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("fleet.yaml"),
              show_default=True)
@_data_dir
@_store
def token_issue(device: str, group: str | None, fleet: str | None, config_path: Path, data_dir: Path,
                store_url: str | None) -> None:
    """Issue a token for DEVICE and print it (shown once; only its hash is kept)."""
    try:
        fleet = fleet or load_fleet(config_path).fleet
        click.echo(issue_token(_target(store_url, data_dir, config_path), device, fleet, group))
    except (ConfigError, GatewayError) as exc:
        raise click.ClickException(str(exc)) from exc


@token.command("revoke")
@click.argument("device")
@_data_dir
@_store
@_store_config
@click.option("--controller-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the controller's --data-dir, whose audit log records the revocation (default: "
                   "DATA_DIR/../controller, the `nanofleet up` layout, when it holds a controller.db)")
def token_revoke(device: str, data_dir: Path, store_url: str | None, config_path: Path,
                 controller_dir: Path | None) -> None:
    """Revoke DEVICE's token (a running gateway notices within its cache TTL, 2 s)."""
    from nanofleet.controller.audit import record_cli

    revoked = revoke_token(_target(store_url, data_dir, config_path), device)
    if revoked == 0:
        raise click.ClickException(f"device {device!r} has no active token")
    db = (controller_dir or data_dir.parent / "controller") / "controller.db"
    if record_cli(db, "token_revoke", device, {"tokens": revoked}, create=controller_dir is not None) is None:
        click.echo(f"warning: not audited: no controller store at {db} (give --controller-dir)", err=True)
    click.echo(f"revoked {device}")


@token.command("list")
@_data_dir
@_store
@_store_config
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def token_list(data_dir: Path, store_url: str | None, config_path: Path, as_json: bool) -> None:
    """List issued tokens (device, fleet, group, issued, revoked) — never the tokens themselves."""
    rows = list_tokens(_target(store_url, data_dir, config_path))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows]))
        return
    for r in rows:
        issued = dt.datetime.fromtimestamp(r.created_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        state = "active" if r.active else "revoked"
        click.echo(f"{r.device_id}\t{r.fleet}\t{r.group or '-'}\t{issued}\t{state}")


@gateway.command()
@click.option("--address", default="127.0.0.1:50051", show_default=True, help="The gateway's host:port.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA certificate (PEM) for a TLS gateway.")
@click.option("--timeout", type=float, default=5.0, show_default=True)
def health(address: str, ca: str | None, timeout: float) -> None:
    """Ask a running gateway for its health, with the reason when a service is NOT_SERVING (exit 1 then)."""
    from .health import check

    try:
        report = check(address, ca, timeout)
    except GatewayError as exc:
        raise click.ClickException(str(exc)) from exc
    for service, (status, detail) in report.items():
        click.echo(f"{service or '(server)'}: {status}" + (f" — {detail}" if detail else ""))
    if any(status != "SERVING" for status, _ in report.values()):
        raise SystemExit(1)


@gateway.command()
@_data_dir
@_store
@_store_config
@click.option("--day", default=None, help="UTC day YYYY-MM-DD (default: all days).")
def usage(data_dir: Path, store_url: str | None, config_path: Path, day: str | None) -> None:
    """Tokens and cost per day, device, app and model."""
    from .usage import UsageStore

    store = UsageStore(_target(store_url, data_dir, config_path))
    try:
        for r in store.summary(day):
            click.echo(f"{r.day}\t{r.device_id}\t{r.app_id or '-'}\t{r.model}\t{r.requests}\t{r.input_tokens}\t"
                       f"{r.output_tokens}\t${r.cost_usd:.6f}")
    finally:
        store.close()
