"""Named operators: each their own token (operators.sha256), so the audit log and acknowledgements say who; the
default token keeps working as `operator`."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from ctl_helpers import until
from test_web import FLEET, birth, csrf_of

from nanofleet.cli import main
from nanofleet.controller.alert_store import AlertStore
from nanofleet.controller.alerts_engine import AlertEngine
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.auth import (
    AuthError,
    TokenFileError,
    add_operator,
    ensure_operator_token,
    read_operators,
    remove_operator,
)
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.controller.web.security import COOKIE
from nanofleet.controller.web.sessions import SessionSigner
from nanofleet.protos import fleet_pb2


def test_operators_file_add_replace_remove_and_refusals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert read_operators(data) == {}
    alice = add_operator(data, "alice")
    bob = add_operator(data, "bob-2")
    ops = read_operators(data)
    assert sorted(ops) == ["alice", "bob-2"] and alice not in str(ops) and bob not in str(ops)
    assert os.stat(data / "operators.sha256").st_mode & 0o777 == 0o600
    again = add_operator(data, "alice")  # a new token replaces the old one
    assert again != alice and read_operators(data)["alice"] != ops["alice"]
    for bad in ("operator", "controller", "Alice", "a.b", "", "x" * 33, "cli:me", "1st"):
        with pytest.raises(AuthError, match="operator name"):
            add_operator(data, bad)
    assert remove_operator(data, "bob-2") and not remove_operator(data, "bob-2")
    assert sorted(read_operators(data)) == ["alice"]
    (data / "operators.sha256").write_text("alice not-a-hash\n")
    with pytest.raises(TokenFileError, match="line 1"):
        read_operators(data)
    os.chmod(data / "operators.sha256", 0o644)
    with pytest.raises(TokenFileError, match="chmod 600"):
        read_operators(data)


def test_session_cookie_carries_the_name_signed() -> None:
    signer = SessionSigner(b"k" * 32)
    cookie, session = signer.issue(0, "alice")
    assert cookie.startswith("v2.") and signer.check(cookie, 1) == session and session.name == "alice"
    forged = cookie.replace(".alice.", ".bob.")
    assert signer.check(forged, 1) is None
    default, s2 = signer.issue(0)
    assert default.startswith("v1.") and signer.check(default, 1) == s2 and s2.name == "operator"


@pytest.fixture
async def setup(tmp_path: Path, store_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Store, str, str]]:
    data = tmp_path / "data"
    token, token_hash = ensure_operator_token(data)
    alice = add_operator(data, "alice")
    store = Store(store_url)
    now = int(time.time() * 1000)
    store.write_status("demo", birth("hot"), now)
    store.write_telemetry("demo", [fleet_pb2.Telemetry(device_id="hot", bd_seq=1, seq=0, ts_ms=now,
                                                       ram_available_mb=3000,
                                                       thermal_level=fleet_pb2.THERMAL_LEVEL_CRITICAL)], now)
    app = create_app(store, FLEET, operator_token_hash=token_hash, operators=read_operators(data))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            yield c, store, token or "", alice
    finally:
        store.close()


async def test_acks_and_logins_name_the_operator(setup) -> None:
    c, store, default, alice = setup
    AlertEngine(AlertStore(store), FLEET).evaluate()
    [alert] = (await c.get("/api/alerts", headers={"Authorization": f"Bearer {alice}"})).json()["alerts"]
    r = await c.post(f"/api/alerts/{alert['id']}/ack", json={"note": "mine"},
                     headers={"Authorization": f"Bearer {alice}"})
    assert r.json()["acked_by"] == "alice"
    assert (await c.get("/api/audit", headers={"Authorization": f"Bearer {default}"})).status_code == 200
    await c.post("/login", data={"token": alice, "next": "/"})
    assert c.cookies[COOKIE].startswith("v2.")
    csrf = csrf_of((await c.get("/")).text)
    await c.post("/logout", data={"csrf": csrf})
    audit = AuditLog(store)
    await until(lambda: len(audit.page()[0]) == 3, 10, "three audit entries")
    assert [(e.action, e.actor) for e in reversed(audit.page()[0])] == [
        ("alert_ack", "alice"), ("login", "alice"), ("logout", "alice")]


def test_operator_cli_add_list_remove_audited(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    runner = CliRunner()
    r = runner.invoke(main, ["controller", "operator", "add", "alice", "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("operator token for alice: nft_")
    r = runner.invoke(main, ["controller", "operator", "add", "Bad.Name", "--data-dir", str(data)])
    assert r.exit_code == 2 and "NAME" in r.output and "operator name" in r.output
    r = runner.invoke(main, ["controller", "operator", "list", "--data-dir", str(data)])
    assert r.output.split("\n")[:2] == ["operator (default token)", "alice"]
    r = runner.invoke(main, ["controller", "operator", "remove", "alice", "--data-dir", str(data)])
    assert r.exit_code == 0 and "removed alice" in r.output
    r = runner.invoke(main, ["controller", "operator", "remove", "alice", "--data-dir", str(data)])
    assert r.exit_code == 1 and "no operator 'alice'" in r.output
    with Store(data / "controller.db") as store:
        got = [(e.action, e.target) for e in reversed(AuditLog(store).page()[0])]
    assert got == [("operator_add", "alice"), ("operator_remove", "alice")]


def test_operator_cli_names_a_broken_operators_file(tmp_path: Path) -> None:
    data = tmp_path / "ctl"
    data.mkdir()
    (data / "operators.sha256").write_text("garbage\n")
    os.chmod(data / "operators.sha256", 0o600)
    for args in (["add", "bob"], ["remove", "bob"], ["list"]):
        r = CliRunner().invoke(main, ["controller", "operator", *args, "--data-dir", str(data)])
        assert r.exit_code == 1 and "operators.sha256: line 1" in r.output, args
