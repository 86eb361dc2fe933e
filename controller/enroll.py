"""`nanofleet enroll`: give a device its identity — a broker account confined by the ACL to its own topics, a
gateway token, and the `agent.yaml` that carries both to the device.

Run on the fleet's server (it writes the gateway's token table and the broker's accounts), so it lives with the
controller; it validates agent.yaml with the agent's own settings model (the controller may import the agent's
schema; the agent never imports the controller, and `nanofleet/` neither: tests/contract/test_layers.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from nanofleet.agent.runtime.grpc_target import channel_target
from nanofleet.agent.settings import AgentSettings
from nanofleet.broker import (
    CONTROLLER_USER,
    BrokerAccounts,
    mosquitto_binary,
    write_mosquitto_auth,
    write_mosquitto_config,
)
from nanofleet.config import ConfigError, FleetConfig, load_fleet
from nanofleet.controller.gateway.auth import issue_token, token_is_active
from nanofleet.controller.store_cli import STORE_OPTION
from nanofleet.controller.store_cli import exists as store_exists
from nanofleet.controller.store_cli import target as store_target
from nanofleet.params import DEVICE_ID
from nanofleet.pg_db import is_postgres
from nanofleet.protos import topics


@dataclass(frozen=True)
class AgentYaml:
    path: Path
    settings: AgentSettings
    replaced_revoked: bool = False  # agent.yaml held a revoked gateway token: a fresh one was issued


def gateway_db(state_dir: Path) -> Path:
    return state_dir / "gateway" / "gateway.db"


def gateway_store(cfg: FleetConfig, state_dir: Path) -> str | Path:
    """Where device tokens go: fleet.yaml's store.url when it is PostgreSQL (the database the fleet's gateways
    share), else the state folder's gateway.db."""
    url = cfg.store.url
    return url if url and is_postgres(url) else gateway_db(state_dir)


def enroll_device(cfg: FleetConfig, state_dir: Path, device_id: str, *, broker_url: str,
                  gateway_address: str | Sequence[str] | None, local: bool = False,
                  socket_path: Path | None = None) -> AgentYaml:
    """Create (or refresh the addresses of) a device's credentials and agent.yaml under state/devices/<id>/.

    Several gateway addresses are written as `gateway_addresses` (the agent round-robins over them), one as
    `gateway_address`. `local` is for an agent on this machine (`nanofleet up`): its data folder and socket are
    paths here. For a real device they are left out of agent.yaml, so the agent uses the device's own defaults
    (XDG folders).
    """
    topics.check_id(device_id, "device")
    folder = state_dir / "devices" / device_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "agent.yaml"
    previous = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    accounts = BrokerAccounts(state_dir, cfg.fleet)
    token = previous.get("gateway_token")
    store = gateway_store(cfg, state_dir)
    replaced = token is not None and not token_is_active(store, str(token))
    if replaced:
        token = None  # revoked (`nanofleet revoke`, `gateway token revoke`): a fresh one, never the dead one
    if not token:
        if isinstance(store, Path):
            store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = issue_token(store, device_id, cfg.fleet, cfg.group_of(device_id))
    profile = cfg.profile_for(device_id)
    paths: dict[str, Path | bool] = {}
    if local:
        paths["preload"] = True  # `nanofleet up` shows a ready model, not one that loads on the first request
        paths["data_dir"] = folder / "data"
        if socket_path:
            paths["socket_path"] = socket_path
    settings = AgentSettings.model_validate({
        "fleet": cfg.fleet, "device_id": device_id,
        "broker_url": broker_url, "mqtt_username": device_id, "mqtt_password": accounts.ensure(device_id, "device"),
        **_gateway_fields(gateway_address), "gateway_token": token, "model": profile.model,
        "telemetry_interval_s": profile.telemetry_interval_s, **paths,
    })
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True, exclude=_DEVICE_LOCAL - set(paths)),
                       f, sort_keys=False)
    return AgentYaml(path, settings, replaced)


def _gateway_fields(address: str | Sequence[str] | None) -> dict[str, str | list[str] | None]:
    """agent.yaml's gateway lines: one address keeps the one-gateway field, several the list."""
    if address is None or isinstance(address, str):
        return {"gateway_address": address}
    return {"gateway_addresses": list(address)} if len(address) > 1 else {"gateway_address": address[0]}


_DEVICE_LOCAL = {"data_dir", "socket_path", "sysfs_root"}  # the device's own defaults, unless running here


def reload_broker(state_dir: Path, fleet: str) -> bool:
    """Rewrite mosquitto's password file and SIGHUP a running broker so a new account works at once."""
    pid_file = state_dir / "broker" / "broker.pid"
    if not mosquitto_binary() or not pid_file.exists():
        return False
    conf = (state_dir / "broker" / "mosquitto.conf").read_text(encoding="utf-8")
    listener = next(line.split() for line in conf.splitlines() if line.startswith("listener "))
    write_mosquitto_config(BrokerAccounts(state_dir, fleet), listener[2], int(listener[1]))
    try:
        os.kill(int(pid_file.read_text()), signal.SIGHUP)
    except (ProcessLookupError, ValueError):
        return False
    return True


def sync_broker(cfg: FleetConfig, state_dir: Path, drop: tuple[str, ...] = ()) -> tuple[bool, str]:
    """After an account changed: bring the broker's password file and ACL up to date and make it reload them —
    the one `nanofleet up` runs (state/broker), or a separately run mosquitto whose files fleet.yaml names
    (`broker.password_file`, `broker.acl_file`, SIGHUP to `broker.pid_file`). (reloaded, what to tell the operator)"""
    b = cfg.broker
    if b.password_file is None and b.acl_file is None:
        if reload_broker(state_dir, cfg.fleet):
            return True, "broker reloaded"
        return False, ("start (or restart) the broker to load the accounts (a separately run mosquitto: set "
                       "broker.password_file, broker.acl_file and broker.pid_file in fleet.yaml)")
    if b.password_file is None or b.acl_file is None:
        missing = "broker.password_file" if b.password_file is None else "broker.acl_file"
        raise click.ClickException(f"fleet.yaml sets one of broker.password_file/broker.acl_file: set {missing} too")
    write_mosquitto_auth(BrokerAccounts(state_dir, cfg.fleet), b.password_file, b.acl_file, keep=True, drop=drop)
    files = f"{b.password_file} and {b.acl_file} written"
    if b.pid_file is None:
        return False, (f"{files}; reload the broker to apply them: sudo systemctl reload mosquitto (or set "
                       "broker.pid_file in fleet.yaml and nanofleet sends the SIGHUP)")
    try:
        pid = int(b.pid_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as exc:
        return False, f"{files}; no broker pid in broker.pid_file {b.pid_file} ({exc}): reload the broker yourself"
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False, f"{files}; no process {pid} (broker.pid_file {b.pid_file}): start the broker"
    except PermissionError:
        return False, f"{files}; not allowed to signal the broker: run `sudo kill -HUP {pid}`"
    return True, f"{files}; broker reloaded (SIGHUP to {pid})"


def resolve_state_dir(state_dir: Path | None, config_path: Path, *, init: bool = False) -> Path:
    """The fleet state folder: --state-dir, else `.nanofleet` beside fleet.yaml (where `nanofleet up` keeps it).
    A missing one is refused (a wrong path would start an empty fleet silently) unless `init` asks for it."""
    path = (state_dir if state_dir is not None else config_path.parent / ".nanofleet").resolve()
    if not path.is_dir():
        if not init:
            raise click.BadParameter(f"no fleet state at {path}: give the folder `nanofleet up` or the first "
                                     "enrolment made, or --init to start a new one there", param_hint="--state-dir")
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


_CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                       default="fleet.yaml", show_default=True)
_STATE_DIR = click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                          help="the fleet state folder (default: .nanofleet beside fleet.yaml)")
_CONTROLLER_DIR = click.option(
    "--controller-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="the controller's --data-dir: its store and audit log (default: STATE_DIR/controller)")


def _load(config_path: Path) -> FleetConfig:
    try:
        return load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.argument("device_id", type=DEVICE_ID)
@_CONFIG
@_STATE_DIR
@click.option("--init", is_flag=True, help="create the state folder if it does not exist (the fleet's first device)")
@click.option("--broker-url", default=None, help="the broker as the device reaches it (default: fleet.yaml broker.url)")
@click.option("--gateway", "gateway_address", multiple=True,
              help="host:port of the gateway as the device reaches it (default: fleet.yaml gateway.listen); "
                   "repeat it for several gateways (IP:port each)")
@_CONTROLLER_DIR
@STORE_OPTION
def enroll(config_path: Path, state_dir: Path | None, init: bool, device_id: str, broker_url: str | None,
           gateway_address: tuple[str, ...], controller_dir: Path | None, store_url: str | None) -> None:
    """Create a device's broker account and gateway token, and write the agent.yaml to copy to it. Run again for a
    revoked device, it issues fresh credentials and lifts the revocation."""
    from nanofleet.controller.audit import record_cli
    from nanofleet.controller.revocation import reinstate

    cfg = _load(config_path)
    state = resolve_state_dir(state_dir, config_path, init=init)
    if gateway_address:
        try:  # several --gateway must be IP addresses of one family: what the agent would refuse is refused here
            channel_target(gateway_address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gateway") from None
    result = enroll_device(cfg, state, device_id, broker_url=broker_url or cfg.broker.url,
                           gateway_address=gateway_address or cfg.gateway.listen)
    _, broker_line = sync_broker(cfg, state)
    db = store_target(controller_dir or state / "controller", store_url, cfg.store.url)
    reinstated = reinstate(db, device_id)
    record_cli(db, "enroll", device_id, {"fleet": cfg.fleet, "group": cfg.group_of(device_id),
                                         "agent_yaml": str(result.path), "reinstated": reinstated})
    fresh = " with fresh credentials (the previous were revoked)" if reinstated or result.replaced_revoked else ""
    click.echo(f"enrolled {device_id} in fleet {cfg.fleet}{fresh}: {result.path} (mode 0600; copy it to the device "
               f"and run `nanofleet agent --config agent.yaml`)")
    click.echo(broker_line)


async def _replace_status(cfg: FleetConfig, url: str, user: str, password: str | None, device_id: str,
                          payload: bytes) -> str | None:
    """Publish the retained revoked status as the controller; None when the broker acknowledged it, else why not."""
    from nanofleet.mqtt import MqttClient, MqttError

    client = MqttClient(url, username=user, password=password, backoff=(0.2, 1),
                        ca=cfg.broker.ca if url.startswith("mqtts://") else None)
    from nanofleet.controller.cli import connect_or_explain

    await client.start()
    try:
        problem = await connect_or_explain(client, user, password, 5)
        if problem is not None:
            return problem
        try:
            await asyncio.wait_for(client.publish(topics.status(cfg.fleet, device_id), payload, qos=1, retain=True), 5)
        except (TimeoutError, MqttError) as exc:
            return f"the broker did not take the status: {type(exc).__name__}: {exc}"
        return None
    finally:
        await client.stop()


@click.command()
@click.argument("device_id", type=DEVICE_ID)
@_CONFIG
@_STATE_DIR
@_CONTROLLER_DIR
@STORE_OPTION
@click.option("--mqtt-username", envvar="NANOFLEET_MQTT_USERNAME", default=CONTROLLER_USER, show_default=True,
              help="the controller's broker account, to replace the device's retained status")
@click.option("--mqtt-password", envvar="NANOFLEET_MQTT_PASSWORD", default=None,
              help="its password (env NANOFLEET_MQTT_PASSWORD; default: the state folder's account)")
def revoke(device_id: str, config_path: Path, state_dir: Path | None, controller_dir: Path | None,
           store_url: str | None, mqtt_username: str, mqtt_password: str | None) -> None:
    """Take DEVICE back: remove its broker account (the broker reloads and cuts its session), revoke its gateway
    token, replace its retained status with `revoked`, show it revoked on the dashboard; audited."""
    from nanofleet.controller.audit import cli_actor, now_ms, record_cli
    from nanofleet.controller.gateway.auth import revoke_token
    from nanofleet.controller.revocation import is_known, mark_revoked, revoked_status

    cfg = _load(config_path)
    state = resolve_state_dir(state_dir, config_path)
    accounts = BrokerAccounts(state, cfg.fleet)
    account = accounts.remove(device_id)
    reloaded, broker_line = sync_broker(cfg, state, drop=(device_id,))
    gateway = gateway_store(cfg, state)
    tokens = revoke_token(gateway, device_id) if not isinstance(gateway, Path) or gateway.exists() else 0
    db = store_target(controller_dir or state / "controller", store_url, cfg.store.url)
    if not (account or tokens or is_known(db, device_id)):
        raise click.ClickException(f"nothing to revoke: {device_id} has no broker account or gateway token in {state} "
                                   f"and is not in the controller store {db}")
    at = now_ms()
    if mqtt_password is None and mqtt_username == CONTROLLER_USER:
        mqtt_password = accounts.load().get(CONTROLLER_USER, {}).get("password")
    payload = revoked_status(cfg.fleet, device_id, at)
    why = asyncio.run(_replace_status(cfg, cfg.broker.url, mqtt_username, mqtt_password, device_id, payload))
    if store_exists(db):
        mark_revoked(db, cfg.fleet, device_id, cli_actor(), at)
        record_cli(db, "revoke", device_id, {"broker_account": account, "broker_reloaded": reloaded,
                                             "gateway_tokens": tokens, "status_replaced": why is None}, create=False)
    click.echo(f"revoked {device_id}: broker account {'removed' if account else 'was not there'}, "
               f"{tokens} gateway token(s) revoked")
    click.echo(broker_line)
    if why is None:
        click.echo("retained status replaced: revoked")
    else:
        click.echo(f"warning: retained status not replaced ({why}); to do it: mosquitto_pub -r -q 1 -u "
                   f"{mqtt_username} -P PASSWORD -t {topics.status(cfg.fleet, device_id)} -m '{payload.decode()}' "
                   "(plus -h/-p for the broker)", err=True)
    if not store_exists(db):
        click.echo(f"warning: not on the dashboard, not audited: no controller store at {db} "
                   "(--controller-dir, --store)", err=True)
