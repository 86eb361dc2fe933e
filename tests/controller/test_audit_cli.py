"""The CLI commands that change who may do what are audited in the controller's store: enrolment, gateway-token
revocation (and a clear warning when no controller store is there to audit into), operator token rotation."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.store import Store

ROOT = Path(__file__).resolve().parents[2]


def _entries(db: Path | str) -> list[tuple[str, str, str]]:
    with Store(db) as store:
        return [(e.action, e.target, e.source) for e in reversed(AuditLog(store).page()[0])]


def test_enroll_and_revoke_are_audited_in_the_up_layout(tmp_path: Path) -> None:
    state = tmp_path / "state"
    runner = CliRunner()
    r = runner.invoke(main, ["enroll", "pi-lab-01", "--config", str(ROOT / "fleet.yaml"), "--state-dir", str(state),
                             "--init"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["gateway", "token", "revoke", "pi-lab-01", "--data-dir", str(state / "gateway")])
    assert r.exit_code == 0, r.output
    assert "not audited" not in r.output
    assert _entries(state / "controller" / "controller.db") == [("enroll", "pi-lab-01", "cli"),
                                                                ("token_revoke", "pi-lab-01", "cli")]
    with Store(state / "controller" / "controller.db") as store:
        [enrolled] = AuditLog(store).page(action="enroll")[0]
    assert enrolled.detail["group"] == "kiosks" and enrolled.actor.startswith("cli:")
    assert "gateway_token" not in str(enrolled.detail) and "password" not in str(enrolled.detail)


def test_revoke_without_a_controller_store_warns_it_was_not_audited(tmp_path: Path) -> None:
    state = tmp_path / "state"
    runner = CliRunner()
    ctl = tmp_path / "elsewhere"
    r = runner.invoke(main, ["enroll", "pi-lab-01", "--config", str(ROOT / "fleet.yaml"), "--state-dir", str(state),
                             "--controller-dir", str(ctl), "--init"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["gateway", "token", "revoke", "pi-lab-01", "--data-dir", str(state / "gateway")])
    assert r.exit_code == 0 and "warning: not audited: no controller store at" in r.output
    assert not (state / "controller").exists()
    r = runner.invoke(main, ["gateway", "token", "revoke", "pi-lab-01", "--data-dir", str(state / "gateway"),
                             "--controller-dir", str(ctl)])
    assert r.exit_code != 0 and "no active token" in r.output  # refused: nothing revoked, nothing audited
    assert _entries(ctl / "controller.db") == [("enroll", "pi-lab-01", "cli")]


def test_rotate_token_is_audited_without_the_token(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["controller", "rotate-token", "--data-dir", str(tmp_path / "ctl")])
    assert r.exit_code == 0, r.output
    token = r.output.split()[2]
    assert _entries(tmp_path / "ctl" / "controller.db") == [("token_rotate", "operator_token", "cli")]
    assert token not in (tmp_path / "ctl" / "controller.db").read_bytes().decode("latin-1")


def test_cli_commands_write_the_store_given_by_store_or_fleet_yaml(tmp_path: Path, store_url: str) -> None:
    """`--store URL` (or fleet.yaml's store.url) chooses the controller store on either backend: enrolment, token
    rotation and operators are audited there, and no controller.db is made in the data folder."""
    runner = CliRunner()
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text((ROOT / "fleet.yaml").read_text() + f"\nstore: {{url: '{store_url}'}}\n")
    r = runner.invoke(main, ["enroll", "pi-lab-01", "--config", str(cfg), "--state-dir", str(tmp_path / "state"),
                             "--init"])
    assert r.exit_code == 0, r.output
    ctl = tmp_path / "ctl"
    for args in (["controller", "rotate-token"], ["controller", "operator", "add", "ana"],
                 ["controller", "operator", "remove", "ana"]):
        r = runner.invoke(main, [*args, "--data-dir", str(ctl), "--store", store_url])
        assert r.exit_code == 0, r.output
    assert _entries(store_url) == [("enroll", "pi-lab-01", "cli"), ("token_rotate", "operator_token", "cli"),
                                   ("operator_add", "ana", "cli"), ("operator_remove", "ana", "cli")]
    assert not (ctl / "controller.db").exists() and not (tmp_path / "state" / "controller" / "controller.db").exists()
    r = runner.invoke(main, ["devices", "list", "--data-dir", str(ctl), "--store", "mysql://x"])
    assert r.exit_code == 2 and "--store" in r.output and "expected sqlite:///path or postgresql://" in r.output
