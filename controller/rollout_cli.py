"""`nanofleet rollout start|status|pause|resume|abort|pin|unpin`: thin commands over the store; the running
controller's rollout task (controller/rollout_engine.py) does the rest."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click
import yaml

from nanofleet.config import DEFAULT_GROUP, ConfigError, FleetConfig, load_fleet
from nanofleet.controller import rollout_store as rs
from nanofleet.controller import store_cli
from nanofleet.controller.artifacts import ArtifactError, ArtifactStore
from nanofleet.controller.audit import AuditLog, cli_actor
from nanofleet.controller.rollouts import (
    Rollout,
    RolloutInputError,
    advance,
    parse_bake,
    parse_gate,
    parse_settings,
    parse_steps,
    settings_hash,
)
from nanofleet.controller.store import Store
from nanofleet.params import DEVICE_ID

_DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=Path("nanofleet-controller"),
                         show_default=True, help="The controller's state folder (controller.db).")
_CONFIG = click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                       default=Path("fleet.yaml"), show_default=True, help="fleet.yaml")


def _store(data_dir: Path, store_url: str | None, config_url: str | None = None) -> Store:
    """The controller store (--store, else fleet.yaml's store.url for `start`, else DATA_DIR/controller.db)."""
    t = store_cli.target(data_dir, store_url, config_url)
    if not store_cli.exists(t):
        raise click.ClickException(f"--data-dir: no controller state in {data_dir} (no controller.db); "
                                   "give the controller's --data-dir or --store URL")
    return Store(t)


def _config(path: Path) -> FleetConfig:
    try:
        return load_fleet(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _audit(store: Store, target: str, detail: dict[str, object]) -> None:
    """The operator's rollout action in the audit log (controller/audit.py), as the other CLI commands do."""
    AuditLog(store).record(cli_actor(), "rollout", target, detail, source="cli")


@click.group()
def rollout() -> None:
    """Roll a model out to a group in steps, gated on the canaries against the rest of the group."""


@rollout.command("start")
@click.option("--group", required=True, help="The fleet.yaml group (default: devices no group takes).")
@click.option("--model", "model_ref", default=None, help="The artifact: sha256, 8+ digit prefix or name.")
@click.option("--settings", "settings_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="A YAML partial profile (routing:, queue:, telemetry_interval_s:) to roll out.")
@click.option("--steps", default="5,25,100", show_default=True, help="Percent of the group per step.")
@click.option("--gate", default="errors<2%,p95_latency<+20%,tokens_per_s>-10%,thermal<severe", show_default=True,
              help="Terms the canaries must meet at the end of each step's bake.")
@click.option("--bake", default="10m", show_default=True, help="How long each step runs before the gate.")
@click.option("--url", default=None, help="The controller's URL as devices reach it (default: http://<fleet.yaml "
                                          "controller.listen>).")
@_CONFIG
@_DATA_DIR
@store_cli.STORE_OPTION
def start(group: str, model_ref: str | None, settings_file: Path | None, steps: str, gate: str, bake: str,
          url: str | None, config_path: Path, data_dir: Path, store_url: str | None) -> None:
    """Start a rollout of --model or --settings; the running controller advances, pauses or rolls it back by
    itself."""
    if (model_ref is None) == (settings_file is None):
        raise click.UsageError("give one of --model (an artifact) or --settings FILE")
    cfg = _config(config_path)
    if group != DEFAULT_GROUP and group not in cfg.groups:
        raise click.BadParameter(f"unknown group {group!r} (groups: {', '.join(sorted(cfg.groups)) or 'none'})",
                                 param_hint="--group")
    with _store(data_dir, store_url, cfg.store.url) as store:
        try:
            step_tuple, bake_s = parse_steps(steps), parse_bake(bake)
            gate_text = str(parse_gate(gate))
            base_profile = cfg.group_profile(group)
            if settings_file is not None:
                try:
                    data = yaml.safe_load(settings_file.read_text(encoding="utf-8"))
                except (OSError, yaml.YAMLError) as exc:
                    raise RolloutInputError(f"--settings {settings_file}: {exc}") from None
                settings = parse_settings(data, base_profile)
                h = settings_hash(settings)
                r = Rollout(0, group, "settings", h, "fleet.yaml", "", step_tuple, gate_text, bake_s,
                            kind="settings", settings=settings)
                what = f"settings {settings_file.name} ({h[:12]})"
            else:
                assert model_ref is not None
                art = ArtifactStore(data_dir / "artifacts").get(model_ref)
                base = (url or f"http://{cfg.controller.listen}").rstrip("/")
                old = base_profile.model
                r = Rollout(0, group, f"{base}/artifacts/{art.sha256}", art.sha256, old.source, old.sha256 or "",
                            step_tuple, gate_text, bake_s)
                what = f"{art.name} ({art.sha256[:12]})"
            r = rs.create(store, r)
        except (RolloutInputError, ArtifactError) as exc:
            raise click.ClickException(str(exc)) from None
        _audit(store, f"rollout {r.id}", {"kind": "start", "group": group, "what": what, "steps": steps,
                                          "gate": gate_text, "bake_s": bake_s})
    click.echo(f"rollout {r.id}: {what} to group {group} in steps {steps}, gate {gate_text}, bake {bake_s:g} s")


@rollout.command("status")
@click.argument("rollout_id", type=int, required=False)
@_DATA_DIR
@store_cli.STORE_OPTION
def status(rollout_id: int | None, data_dir: Path, store_url: str | None) -> None:
    """A rollout (the latest by default): state, progress per step, its events."""
    with _store(data_dir, store_url) as store:
        r = rs.get(store, rollout_id) if rollout_id is not None else rs.latest(store)
        if r is None:
            raise click.ClickException(f"no rollout {rollout_id}" if rollout_id else "no rollout yet")
        now = advance(r, rs.group_reports(store, r.group), rs.pins(store), int(time.time() * 1000))
        events = rs.events(store, r.id)
    click.echo(f"rollout {r.id} group {r.group}: {r.state}" + (f" ({r.reason})" if r.reason else ""))
    what = (f"settings {r.target_sha256[:12]} {r.settings}" if r.kind == "settings"
            else f"model {r.target_sha256[:12]} <- {r.baseline_sha256[:12] or r.baseline_source}")
    click.echo(f"  {what}; gate {r.gate}; bake {r.bake_s:g} s")
    for i, pct in enumerate(r.steps):
        done = next((s for s in r.step_results if s["step"] == pct), None)
        if done is not None:
            line = f"{done['gate']}: {done['applied']}/{done['devices']} applied, {done['failed']} failed"
        elif i == r.step and r.active:
            p = now.progress
            line = (f"{r.state}: {p.get('applied', 0)}/{p.get('assigned', 0)} applied, {p.get('failed', 0)} failed, "
                    f"{p.get('pending', 0)} pending")
        else:
            line = "-"
        click.echo(f"  step {i + 1} {pct:>3}%  {line}")
    for e in events[-10:]:
        click.echo(f"  {time.strftime('%H:%M:%S', time.gmtime(e.ts_ms / 1000))} {e.kind}: {e.detail}")


def _set_state(data_dir: Path, store_url: str | None, rollout_id: int, allowed: tuple[str, ...], state: str, event: str,
               verb: str) -> None:
    with _store(data_dir, store_url) as store:
        r = rs.get(store, rollout_id)
        if r is None:
            raise click.ClickException(f"no rollout {rollout_id}")
        if r.state not in allowed:
            raise click.ClickException(f"rollout {rollout_id} is {r.state}: cannot {verb} it")
        new = dataclasses.replace(r, state=state, bake_started_ms=0)  # type: ignore[arg-type]
        if not rs.save(store, new, [(event, "by the operator")], expect=r):
            raise click.ClickException(f"rollout {rollout_id} changed meanwhile; run the command again")
        _audit(store, f"rollout {rollout_id}", {"kind": verb, "group": r.group})
    click.echo(f"rollout {rollout_id}: {state}")


@rollout.command("pause")
@click.argument("rollout_id", type=int)
@_DATA_DIR
@store_cli.STORE_OPTION
def pause(rollout_id: int, data_dir: Path, store_url: str | None) -> None:
    """Hold a rollout where it is (its devices keep what they got)."""
    _set_state(data_dir, store_url, rollout_id, ("running", "baking"), "paused", "paused", "pause")


@rollout.command("resume")
@click.argument("rollout_id", type=int)
@_DATA_DIR
@store_cli.STORE_OPTION
def resume(rollout_id: int, data_dir: Path, store_url: str | None) -> None:
    """Go on with a paused rollout (the current step bakes again)."""
    _set_state(data_dir, store_url, rollout_id, ("paused",), "running", "resumed", "resume")


@rollout.command("abort")
@click.argument("rollout_id", type=int)
@_DATA_DIR
@store_cli.STORE_OPTION
def abort(rollout_id: int, data_dir: Path, store_url: str | None) -> None:
    """Stop a rollout and send its devices back to the group's model."""
    _set_state(data_dir, store_url, rollout_id, ("running", "baking", "paused"), "aborting", "abort_requested", "abort")


@rollout.command("pin")
@click.argument("device", type=DEVICE_ID)
@click.option("--note", default="", help="Why (shown in status).")
@_DATA_DIR
@store_cli.STORE_OPTION
def pin(device: str, note: str, data_dir: Path, store_url: str | None) -> None:
    """Leave DEVICE alone in every rollout (it keeps the model it has)."""
    with _store(data_dir, store_url) as store:
        rs.pin(store, device, note)
        _audit(store, device, {"kind": "pin", "note": note})
    click.echo(f"{device}: pinned")


@rollout.command("unpin")
@click.argument("device", type=DEVICE_ID)
@_DATA_DIR
@store_cli.STORE_OPTION
def unpin(device: str, data_dir: Path, store_url: str | None) -> None:
    """Let rollouts reach DEVICE again."""
    with _store(data_dir, store_url) as store:
        was = rs.unpin(store, device)
        if was:
            _audit(store, device, {"kind": "unpin"})
    click.echo(f"{device}: {'unpinned' if was else 'was not pinned'}")
