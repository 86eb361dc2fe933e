"""The CLI commands that change who may do what are audited in the controller's store: enrolment, gateway-token
revocation (and a clear warning when no controller store is there to audit into), operator token rotation."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.store import Store

ROOT = Path(__file__).resolve().parents[2]


def _entries(db: Path) -> list[tuple[str, str, str]]:
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
