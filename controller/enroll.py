"""`nanofleet enroll`: give a device its identity — a broker account confined by the ACL to its own topics, a
gateway token, and the `agent.yaml` that carries both to the device.

Run on the fleet's server (it writes the gateway's token table and the broker's accounts), so it lives with the
controller; it validates agent.yaml with the agent's own settings model (the controller may import the agent's
schema; the agent never imports the controller, and `nanofleet/` neither: tests/contract/test_layers.py)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from nanofleet.agent.settings import AgentSettings
from nanofleet.broker import BrokerAccounts, mosquitto_binary, write_mosquitto_config
from nanofleet.config import ConfigError, FleetConfig, load_fleet
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.params import DEVICE_ID
from nanofleet.protos import topics


@dataclass(frozen=True)
class AgentYaml:
    path: Path
    settings: AgentSettings


def gateway_db(state_dir: Path) -> Path:
    return state_dir / "gateway" / "gateway.db"


def enroll_device(cfg: FleetConfig, state_dir: Path, device_id: str, *, broker_url: str,
                  gateway_address: str | None, local: bool = False, socket_path: Path | None = None) -> AgentYaml:
    """Create (or refresh the addresses of) a device's credentials and agent.yaml under state/devices/<id>/.

    `local` is for an agent on this machine (`nanofleet up`): its data folder and socket are paths here. For a real
    device they are left out of agent.yaml, so the agent uses the device's own defaults (XDG folders).
    """
    topics.check_id(device_id, "device")
    folder = state_dir / "devices" / device_id
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / "agent.yaml"
    previous = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}
    accounts = BrokerAccounts(state_dir, cfg.fleet)
    token = previous.get("gateway_token")
    if not token:
        gateway_db(state_dir).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = issue_token(gateway_db(state_dir), device_id, cfg.fleet, cfg.group_of(device_id))
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
        "gateway_address": gateway_address, "gateway_token": token, "model": profile.model,
        "telemetry_interval_s": profile.telemetry_interval_s, **paths,
    })
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True, exclude=_DEVICE_LOCAL - set(paths)),
                       f, sort_keys=False)
    return AgentYaml(path, settings)


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


@click.command()
@click.argument("device_id", type=DEVICE_ID)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="fleet.yaml",
              show_default=True)
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=".nanofleet", show_default=True)
@click.option("--broker-url", default=None, help="the broker as the device reaches it (default: fleet.yaml broker.url)")
@click.option("--gateway", "gateway_address", default=None,
              help="host:port of the gateway as the device reaches it (default: fleet.yaml gateway.listen)")
@click.option("--controller-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the controller's --data-dir, whose audit log records the enrolment (default: STATE_DIR/controller)")
def enroll(config_path: Path, state_dir: Path, device_id: str, broker_url: str | None,
           gateway_address: str | None, controller_dir: Path | None) -> None:
    """Create a device's broker account and gateway token, and write the agent.yaml to copy to it."""
    try:
        cfg = load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    result = enroll_device(cfg, state_dir.resolve(), device_id, broker_url=broker_url or cfg.broker.url,
                           gateway_address=gateway_address or cfg.gateway.listen)
    reloaded = reload_broker(state_dir.resolve(), cfg.fleet)
    from nanofleet.controller.audit import record_cli

    record_cli((controller_dir or state_dir / "controller") / "controller.db", "enroll", device_id,
               {"fleet": cfg.fleet, "group": cfg.group_of(device_id), "agent_yaml": str(result.path)})
    click.echo(f"enrolled {device_id} in fleet {cfg.fleet}: {result.path} (mode 0600; copy it to the device and run "
               f"`nanofleet agent --config agent.yaml`)")
    click.echo("broker reloaded" if reloaded else "start (or restart) the broker to load the new account")
