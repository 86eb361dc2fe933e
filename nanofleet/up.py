"""`nanofleet up`: the whole system on one machine — broker, controller, gateway and one agent — on loopback."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import click

from nanofleet.broker import CONTROLLER_USER, BrokerAccounts, broker_command
from nanofleet.config import ConfigError, FleetConfig, load_fleet
from nanofleet.sim import argv as sim_argv
from nanofleet.sim import device_ids
from nanofleet.store_url import resolve
from nanofleet.supervisor import Child, StartError, Supervisor, http_ok, tcp_open
from nanofleet.tcp import free_port, port_free, raise_nofile


@dataclass(frozen=True)
class Ports:
    broker: int
    controller: int
    gateway: int


def choose_ports(cfg: FleetConfig, free: bool) -> tuple[Ports, list[str]]:
    """The configured ports, or free ones (all with --free-ports; one by one when the configured one is taken)."""
    notes: list[str] = []
    wanted = {
        "broker": urlparse(cfg.broker.url).port or 1883,
        "controller": int(cfg.controller.listen.rsplit(":", 1)[1]),
        "gateway": int(cfg.gateway.listen.rsplit(":", 1)[1]),
    }
    chosen = {}
    for name, port in wanted.items():
        if free:
            chosen[name] = free_port()
        elif not port_free(port):
            chosen[name] = free_port()
            notes.append(f"port {port} for the {name} is in use; using {chosen[name]}")
        else:
            chosen[name] = port
    return Ports(**chosen), notes


def store_args(store_url: str | None, state_dir: Path) -> tuple[list[str], str]:
    """`--store URL` for the controller and the gateway (none: each its own SQLite file in the state folder, or
    fleet.yaml's store.url), and how to name it to the user (the password left out)."""
    if store_url is None:
        return [], "SQLite in the state folder (or fleet.yaml's store.url)"
    try:
        target = resolve(store_url, state_dir, "controller.db")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None
    return ["--store", store_url], str(target)


def _nanofleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanofleet", *args]


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="fleet.yaml",
              show_default=True, help="the fleet to run")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=".nanofleet",
              show_default=True, help="databases, credentials, logs and the model cache")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="the agent's unix socket (default: $XDG_RUNTIME_DIR/nanofleet/agent.sock)")
@click.option("--free-ports", is_flag=True, help="use free loopback ports instead of those in fleet.yaml")
@click.option("--simulate", type=click.IntRange(0, 100_000), default=0, show_default=True,
              help="also run N simulated devices (each its own MQTT session and broker account)")
@click.option("--broker", "broker_kind", type=click.Choice(["auto", "mosquitto", "amqtt"]), default="auto",
              show_default=True, help="auto: mosquitto when it is installed, else the embedded amqtt broker")
@click.option("--restart-delay", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="seconds before a crashed child (broker, gateway, controller, agent, simulator) is restarted; "
                   "the delay grows with each crash, and 5 crashes of one child within 60 s stop everything")
@click.option("--store", "store_url", default=None, metavar="URL",
              help="postgresql://… (or sqlite:///path): the controller's and the gateway's store on that server "
                   "instead of SQLite files in the state folder; the password from PGPASSWORD or ~/.pgpass")
def up(config_path: Path, state_dir: Path, socket_path: Path | None, free_ports: bool, simulate: int,
       broker_kind: str, restart_delay: float, store_url: str | None) -> None:
    """Start the broker, controller, gateway and one agent on this machine; Ctrl-C stops them all.

    A child that dies is restarted (after a growing delay); only Ctrl-C or a child crashing again and again stops
    the rest."""
    try:
        cfg = load_fleet(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    state_dir = state_dir.resolve()
    store, store_desc = store_args(store_url, state_dir)
    if store_url is not None:  # as the children read it: the device's gateway token goes where the gateway looks
        cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"url": store_url})})
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ports, notes = choose_ports(cfg, free_ports)
    for note in notes:
        click.echo(f"note: {note}")
    host = "127.0.0.1"
    broker_url = f"mqtt://{host}:{ports.broker}"
    logs = state_dir / "logs"

    accounts = BrokerAccounts(state_dir, cfg.fleet)
    controller_password = accounts.ensure(CONTROLLER_USER, "controller")
    device_id = next(iter(cfg.devices), "dev-01")
    from nanofleet.controller.enroll import enroll_device  # the CLI reaches a side only when a command runs

    agent_yaml = enroll_device(cfg, state_dir, device_id, broker_url=broker_url,
                               gateway_address=f"{host}:{ports.gateway}", local=True, socket_path=socket_path)
    if simulate:  # each simulated device its own broker account, as `nanofleet enroll` gives a real one
        sim_credentials = accounts.credentials_file(device_ids(simulate), "sim-credentials.json")
    try:
        broker_argv, broker_desc = broker_command(accounts, host, ports.broker, broker_kind)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None

    raise_nofile()  # the broker and the simulator inherit it: a socket per simulated device
    sup = Supervisor()
    sup.install_signals()  # a SIGTERM while the children start stops them all once they are up (tested: it raced)
    try:
        click.echo(f"broker:     {broker_desc}")
        sup.start(Child("broker", broker_argv, logs / "broker.log", tcp_open(host, ports.broker),
                        restart_delay=restart_delay, pid_file=state_dir / "broker" / "broker.pid"))
        click.echo(f"store:      {store_desc}")
        click.echo(f"gateway:    gRPC Inference on {host}:{ports.gateway}")
        sup.start(Child("gateway", _nanofleet("gateway", "serve", "--config", str(config_path),
                                              "--data-dir", str(state_dir / "gateway"),
                                              "--listen", f"{host}:{ports.gateway}", *store),
                        logs / "gateway.log", tcp_open(host, ports.gateway), restart_delay=restart_delay))
        controller = Child("controller", _nanofleet("controller", "--config", str(config_path),
                                                    "--data-dir", str(state_dir / "controller"),
                                                    "--listen", f"{host}:{ports.controller}",
                                                    "--broker-url", broker_url,
                                                    "--mqtt-username", CONTROLLER_USER,
                                                    # the gateway's tokens and usage: where `--store` put them
                                                    "--gateway-db", store[1] if store else
                                                    str(state_dir / "gateway" / "gateway.db"),
                                                    *store),
                           logs / "controller.log", http_ok("/healthz", host=host, port=ports.controller),
                           env={"NANOFLEET_MQTT_PASSWORD": controller_password}, restart_delay=restart_delay)
        sup.start(controller)
        settings = agent_yaml.settings
        sup.start(Child(f"agent {device_id}", _nanofleet("agent", "--config", str(agent_yaml.path)),
                        logs / f"agent-{device_id}.log", http_ok("/v1/status", uds=str(settings.socket_path)),
                        ready_timeout=120, restart_delay=restart_delay))
        if simulate:
            sup.start(Child(f"simulator ({simulate} devices)",
                            _nanofleet(*sim_argv(broker_url, simulate, fleet=cfg.fleet,
                                                 interval_s=cfg.defaults.telemetry_interval_s),
                                       "--credentials", str(sim_credentials), "--data-dir", str(state_dir / "sim")),
                            logs / "sim.log", ready=lambda: True,
                            restart_delay=restart_delay))
    except StartError as exc:
        sup.stop_all()
        raise click.ClickException(str(exc)) from None
    except BaseException:
        sup.stop_all()
        raise

    token_line = _operator_token_line(state_dir / "controller", controller)
    sock = shlex.quote(str(settings.socket_path))
    body = '{"messages":[{"role":"user","content":"Say hello"}],"max_tokens":24}'
    simulated = f" and {simulate} simulated devices" if simulate else ""
    click.echo(f"""
nanofleet is up (fleet {cfg.fleet!r}, device {device_id!r}{simulated}).
  dashboard:  http://{host}:{ports.controller}/   {token_line}
  socket:     {settings.socket_path}
  logs:       {logs}/
Try it:
  curl --unix-socket {sock} http://localhost/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'
Ctrl-C stops everything.""", nl=True)
    sys.stdout.flush()
    died = sup.wait(report=lambda line: click.echo(line, err=True))
    if died is not None:
        click.echo(f"\n{died.name} crashed {len(died.crashes)} times within {sup.crash_window_s:.0f}s "
                   f"(last exit code {died.proc.returncode if died.proc else '?'}); its log ends:\n"
                   f"{died.tail()}\nstopping everything.", err=True)
    else:
        click.echo("\nstopping ...")
    codes = sup.stop_all()
    click.echo("stopped: " + ", ".join(f"{name} ({code})" for name, code in codes.items()))
    if died is not None:
        sys.exit(1)


def _operator_token_line(controller_dir: Path, controller: Child) -> str:
    """The controller prints a new operator token once (this run's output only: an old one may be rotated)."""
    for line in controller.output().splitlines():
        if "operator token:" in line:
            return "operator " + line.split("operator ", 1)[1].strip()
    return ("(operator token printed at first start; rotate with: "
            f"nanofleet controller rotate-token --data-dir {controller_dir})")
