"""`--store` and fleet.yaml's `store.url` for the gateway's commands, and `nanofleet enroll` against a PostgreSQL
gateway store: the token commands, usage and enrolment reach the database the gateways share."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.config import parse_fleet
from nanofleet.controller.enroll import enroll_device, gateway_store
from nanofleet.controller.gateway.auth import list_tokens, token_is_active
from nanofleet.controller.gateway.db import gateway_target


def test_token_commands_and_usage_on_a_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(tmp_path / "gw")
    issued = runner.invoke(main, ["gateway", "token", "issue", "dev-1", "--fleet", "demo", "--store", pg_url,
                                  "--data-dir", data])
    assert issued.exit_code == 0, issued.output
    token = issued.output.strip().splitlines()[-1]
    assert token_is_active(pg_url, token) and not (tmp_path / "gw").exists()  # nothing written to the data folder
    listed = runner.invoke(main, ["gateway", "token", "list", "--json", "--store", pg_url])
    assert [row["device_id"] for row in json.loads(listed.output)] == ["dev-1"]
    usage = runner.invoke(main, ["gateway", "usage", "--store", pg_url])
    assert usage.exit_code == 0 and usage.output == ""
    revoked = runner.invoke(main, ["gateway", "token", "revoke", "dev-1", "--store", pg_url, "--data-dir", data])
    assert revoked.exit_code == 0 and "revoked dev-1" in revoked.output
    assert not token_is_active(pg_url, token)
    bad = runner.invoke(main, ["gateway", "token", "list", "--store", "mysql://x"])
    assert bad.exit_code == 2 and "--store" in bad.output and "store.url" in bad.output


def test_fleet_yaml_store_url_is_the_gateways_when_postgresql(pg_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(f"fleet: demo\nstore: {{url: '{pg_url}'}}\n")
    out = runner.invoke(main, ["gateway", "token", "issue", "dev-2", "--config", str(fleet), "--data-dir",
                               str(tmp_path / "gw")])
    assert out.exit_code == 0, out.output
    assert [t.device_id for t in list_tokens(pg_url)] == ["dev-2"]
    # a sqlite:/// store.url names the controller's file: the gateway keeps its own in its data folder
    fleet.write_text(f"fleet: demo\nstore: {{url: 'sqlite:///{tmp_path / 'controller.db'}'}}\n")
    out = runner.invoke(main, ["gateway", "token", "issue", "dev-3", "--config", str(fleet), "--data-dir",
                               str(tmp_path / "gw")])
    assert out.exit_code == 0, out.output
    assert [t.device_id for t in list_tokens(tmp_path / "gw" / "gateway.db")] == ["dev-3"]
    assert gateway_target(None, tmp_path).path == tmp_path / "gateway.db"


def test_enroll_issues_into_the_shared_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    cfg = parse_fleet(f"fleet: demo\nstore: {{url: '{pg_url}'}}\n")
    assert gateway_store(cfg, tmp_path) == pg_url
    agent = enroll_device(cfg, tmp_path, "pi-1", broker_url="mqtt://127.0.0.1:1883", gateway_address=None)
    token = str(agent.settings.gateway_token)
    assert token_is_active(pg_url, token) and not (tmp_path / "gateway").exists()
    assert enroll_device(cfg, tmp_path, "pi-1", broker_url="mqtt://127.0.0.1:1883",
                         gateway_address=None).settings.gateway_token == agent.settings.gateway_token
