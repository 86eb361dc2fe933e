"""Constants from one source (protos/names.py): thermal level names from the proto enum, command kinds from one list
that the controller's web API, dashboard and command service use and the agent handles, no more, no fewer."""

from __future__ import annotations

import re
import time
import typing
from pathlib import Path

import httpx

from nanofleet.protos import fleet_pb2, names

ROOT = Path(__file__).resolve().parents[2]
_SPELLED = re.compile(r'"none",\s*"light",\s*"moderate",\s*"severe"')


def test_thermal_names_come_from_the_proto_enum() -> None:
    from nanofleet.config import THERMAL_LEVELS
    from nanofleet.controller.devstate import thermal_name
    from nanofleet.controller.web.format import THERMAL_ORDER
    from nanofleet.thermal import level_name

    from_enum = tuple(n.removeprefix("THERMAL_LEVEL_").lower() for n in fleet_pb2.ThermalLevel.keys())  # noqa: SIM118
    assert from_enum == names.THERMAL_LEVELS
    assert THERMAL_LEVELS is names.THERMAL_LEVELS and THERMAL_ORDER is names.THERMAL_LEVELS
    assert [thermal_name(v) for v in range(7)] == [level_name(v) for v in range(7)] == list(names.THERMAL_LEVELS)


def test_the_names_are_spelled_out_only_in_protos_names() -> None:
    spelled = sorted(str(p.relative_to(ROOT)) for folder in ("agent", "controller", "nanofleet", "protos")
                     for p in (ROOT / folder).rglob("*.py") if _SPELLED.search(p.read_text(encoding="utf-8")))
    assert spelled == ["protos/names.py"]


def test_one_list_of_command_kinds_for_the_service_and_the_web_api() -> None:
    from nanofleet.controller import commands
    from nanofleet.controller.web import schemas

    assert commands.KINDS is names.COMMAND_KINDS
    assert typing.get_args(schemas.CommandIn.model_fields["kind"].annotation) == names.COMMAND_KINDS


def test_the_agent_handles_exactly_the_command_kinds() -> None:
    """Every kind the agent's device session or service compares a command against, and nothing else."""
    files = [*sorted((ROOT / "agent" / "device_session").glob("*.py")), ROOT / "agent" / "service.py"]
    src = "\n".join(f.read_text(encoding="utf-8") for f in files)
    handled = set(re.findall(r'\b(?:cmd|command)\.kind == "([a-z-]+)"', src))
    assert handled == set(names.COMMAND_KINDS)


async def test_the_dashboard_offers_every_command_kind(tmp_path: Path) -> None:
    from nanofleet.config import parse_fleet
    from nanofleet.controller.auth import ensure_operator_token
    from nanofleet.controller.store import Store
    from nanofleet.controller.web import create_app

    class Unused:
        async def send(self, device_id: str, kind: str, args: dict[str, str]) -> None:
            raise AssertionError("not called")

    store = Store(tmp_path / "store.db")
    now = int(time.time() * 1000)
    store.write_status("demo", fleet_pb2.DeviceStatus(fleet="demo", device_id="pi-1", online=True, bd_seq=1,
                                                      ts_ms=now), now)
    token, token_hash = ensure_operator_token(tmp_path / "data")
    app = create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, commands=Unused())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            await c.post("/login", data={"token": token})
            page = (await c.get("/devices/pi-1")).text
    finally:
        store.close()
    offered = re.findall(r'name="kind" value="([^"]+)"', page)
    assert tuple(offered) == names.COMMAND_KINDS


def test_the_cli_offers_and_checks_the_one_list(tmp_path: Path) -> None:
    """`nanofleet devices cmd` names every kind in its help and refuses another before connecting anywhere."""
    from click.testing import CliRunner

    from nanofleet.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["devices", "cmd", "--help"]).output
    assert [k for k in names.COMMAND_KINDS if k not in help_text] == []
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("fleet: demo\nbroker: {url: mqtt://127.0.0.1:1}\n")
    out = runner.invoke(main, ["devices", "cmd", "pi-1", "format-disk", "--config", str(fleet)])
    assert out.exit_code == 2 and "format-disk" in out.output and "reload-model" in out.output, out.output
