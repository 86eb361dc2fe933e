"""`nanofleet rollout …` with click's runner over a real store on each backend (`--store`, or fleet.yaml's
store.url): inputs refused with the flag and term named, the state changes an operator makes (pause, resume, abort)
and what `status` prints."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nanofleet.cli import main
from nanofleet.controller import rollout_store as rs
from nanofleet.controller.artifacts import ArtifactStore
from nanofleet.controller.rollouts import DeviceReport, advance
from nanofleet.controller.store import Store


def _setup(tmp_path: Path, tiny_gguf: Path, store_url: str) -> tuple[Path, Path, str]:
    data = tmp_path / "ctl"
    Store(store_url).close()
    sha = ArtifactStore(data / "artifacts").add_file(tiny_gguf, "tiny").sha256
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text("fleet: demo\ncontroller: {listen: '10.0.0.5:8080'}\ngroups:\n  kiosks: {match: ['k-*']}\n")
    return data, cfg, sha


def test_start_status_pause_resume_abort_and_pin(tmp_path: Path, tiny_gguf: Path, store_url: str) -> None:
    data, cfg, sha = _setup(tmp_path, tiny_gguf, store_url)
    run = CliRunner().invoke
    common = ["--config", str(cfg), "--data-dir", str(data), "--store", store_url]
    r = run(main, ["rollout", "start", "--group", "nope", "--model", "tiny", *common])
    assert r.exit_code == 2 and "unknown group 'nope' (groups: kiosks)" in r.output
    r = run(main, ["rollout", "start", "--group", "kiosks", "--model", "tiny", "--gate", "errors<2%,heat<9", *common])
    assert r.exit_code == 1 and "--gate term 'heat<9': unknown metric 'heat'" in r.output
    r = run(main, ["rollout", "start", "--group", "kiosks", "--model", "tiny", "--steps", "5,50", *common])
    assert r.exit_code == 1 and "the last step must be 100" in r.output
    r = run(main, ["rollout", "start", "--group", "kiosks", "--model", "missing", *common])
    assert r.exit_code == 1 and "no artifact named 'missing'" in r.output
    r = run(main, ["rollout", "start", "--group", "kiosks", "--model", "tiny", "--bake", "1m", *common])
    assert r.exit_code == 0 and r.output.startswith("rollout 1: tiny") and "bake 60 s" in r.output
    with Store(store_url) as store:
        ro = rs.get(store, 1)
        assert ro is not None and ro.target_source == f"http://10.0.0.5:8080/artifacts/{sha}"
        assert ro.baseline_source == "builtin:tiny-test"
    r = run(main, ["rollout", "start", "--group", "kiosks", "--model", "tiny", *common])
    assert r.exit_code == 1 and "rollout 1 is still running" in r.output
    r = run(main, ["rollout", "status", "--data-dir", str(data), "--store", store_url])
    assert r.exit_code == 0 and "rollout 1 group kiosks: running" in r.output and "step 1   5%" in r.output
    assert "started:" in r.output
    dd = ["--data-dir", str(data), "--store", store_url]
    assert run(main, ["rollout", "resume", "1", *dd]).output.strip().endswith("rollout 1 is running: cannot resume it")
    assert run(main, ["rollout", "pause", "1", *dd]).output.strip() == "rollout 1: paused"
    assert run(main, ["rollout", "resume", "1", *dd]).output.strip() == "rollout 1: running"
    assert run(main, ["rollout", "abort", "1", *dd]).output.strip() == "rollout 1: aborting"
    with Store(store_url) as store:  # the engine's next tick ends it
        ro = rs.get(store, 1)
        assert ro is not None
        out = advance(ro, [DeviceReport("k-1", True)], set(), 0)
        assert out.rollout.state == "aborted" and out.events == [("aborted", "aborted by the operator")]
        rs.save(store, out.rollout, out.events, expect=ro)
    r = run(main, ["rollout", "status", "1", *dd])
    assert "rollout 1 group kiosks: aborted (aborted by the operator)" in r.output
    assert run(main, ["rollout", "abort", "1", *dd]).exit_code == 1
    assert run(main, ["rollout", "status", "9", *dd]).output.strip().endswith("no rollout 9")
    assert run(main, ["rollout", "pin", "k-7", "--note", "customer", *dd]).output.strip() == "k-7: pinned"
    assert run(main, ["rollout", "unpin", "k-7", *dd]).output.strip() == "k-7: unpinned"
    assert run(main, ["rollout", "unpin", "k-7", *dd]).output.strip() == "k-7: was not pinned"
    with Store(store_url) as store:  # each operator action in the audit log
        from nanofleet.controller.audit import AuditLog

        entries, _ = AuditLog(store).page(action="rollout")
        assert [(e.target, e.detail["kind"], e.source) for e in reversed(entries)] == [
            ("rollout 1", "start", "cli"), ("rollout 1", "pause", "cli"), ("rollout 1", "resume", "cli"),
            ("rollout 1", "abort", "cli"), ("k-7", "pin", "cli"), ("k-7", "unpin", "cli")]
        assert entries[0].actor.startswith("cli:")
    r = run(main, ["rollout", "status", "--data-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "--data-dir: no controller state" in r.output


async def test_the_rollouts_page_shows_progress_per_step(tmp_path: Path, tiny_gguf: Path, store_url: str) -> None:
    import dataclasses

    import httpx

    from nanofleet.config import parse_fleet
    from nanofleet.controller.auth import ensure_operator_token
    from nanofleet.controller.rollouts import Rollout
    from nanofleet.controller.web.app import create_app

    data, _, sha = _setup(tmp_path, tiny_gguf, store_url)
    token, token_hash = ensure_operator_token(data)
    with Store(store_url) as store:
        r = rs.create(store, Rollout(0, "kiosks", f"http://c/artifacts/{sha}", sha, "builtin:tiny-test", "",
                                     (50, 100), "errors<2%", 0))
        done = dataclasses.replace(r, step=1, step_results=[{"step": 50, "devices": 2, "applied": 2, "failed": 0,
                                                             "canary": {"errors_pct": 0.5, "p95_ms": 41.0},
                                                             "baseline": {}, "gate": "passed"}])
        rs.save(store, done, [("step_passed", "step 1 (50%) passed the gate errors<2%")], expect=r)
        rs.pin(store, "k-9")
        app = create_app(store, parse_fleet("fleet: demo\ngroups:\n  kiosks: {match: ['k-*']}\n"),
                         operator_token_hash=token_hash)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            assert (await c.get("/rollouts")).status_code == 303  # the login page for a browser without a session
            page = (await c.get("/rollouts", headers={"Authorization": f"Bearer {token}"})).text
    assert f'data-rollout="{r.id}" data-state="running"' in page
    assert 'data-step="50" data-step-state="passed"' in page and "errors 0.5 %, p95 41.0 ms" in page
    assert 'data-step="100" data-step-state="running"' in page
    assert "step_passed" in page and "k-9" in page and '<a href="/rollouts">Rollouts</a>' in page


def test_a_settings_rollout_is_checked_against_the_group_profile(tmp_path: Path, tiny_gguf: Path,
                                                                 store_url: str) -> None:
    data, cfg, _ = _setup(tmp_path, tiny_gguf, store_url)
    cfg.write_text(cfg.read_text() + f"store: {{url: '{store_url}'}}\n")  # `start` reads fleet.yaml's store.url
    run = CliRunner().invoke
    common = ["--group", "kiosks", "--config", str(cfg), "--data-dir", str(data)]
    f = tmp_path / "settings.yaml"
    r = run(main, ["rollout", "start", *common])
    assert r.exit_code == 2 and "give one of --model (an artifact) or --settings FILE" in r.output
    for text, why in (("- a\n", "--settings: expected a mapping"),
                      ("model: {source: 'builtin:tiny-test'}\n", "--settings: model: roll a model out with --model"),
                      ("routing: {battery_floor_pct: 500}\n", "--settings: routing.battery_floor_pct: "),
                      ("routing: {colour: red}\n", "--settings: routing.colour: "),
                      ("routing: [\n", "--settings ")):
        f.write_text(text)
        r = run(main, ["rollout", "start", "--settings", str(f), *common])
        assert r.exit_code == 1 and why in r.output, (text, r.output)
    f.write_text("routing: {battery_floor_pct: 33}\ntelemetry_interval_s: 5\n")
    r = run(main, ["rollout", "start", "--settings", str(f), "--steps", "50,100", *common])
    assert r.exit_code == 0 and r.output.startswith("rollout 1: settings settings.yaml (")
    with Store(store_url) as store:
        ro = rs.get(store, 1)
        assert ro is not None and ro.kind == "settings" and ro.settings == {"routing": {"battery_floor_pct": 33},
                                                                            "telemetry_interval_s": 5}
    r = run(main, ["rollout", "status", "--data-dir", str(data), "--store", store_url])
    assert "settings " in r.output and "'battery_floor_pct': 33" in r.output


def test_rollout_models_settings_and_pins_are_replaced_not_doubled(store_url: str) -> None:
    """The engine's writes of a device's rollout model, settings and pin, twice over: the second replaces the first
    (an upsert on both backends)."""
    from nanofleet.controller.rollouts import Rollout

    with Store(store_url) as store:
        r = rs.create(store, Rollout(0, "kiosks", "http://c/artifacts/x", "x" * 64, "builtin:tiny-test", "",
                                     (50, 100), "errors<2%", 0))
        for n in (1, 2):
            r.settings = {"telemetry_interval_s": n}
            assert rs.save(store, r, [("step", f"round {n}")], models={"k-1": (f"src{n}", f"sha{n}")},
                           settings={"k-1": n})
            rs.pin(store, "k-2", f"note {n}")
        assert rs.desired_models(store) == {"k-1": ("src2", "sha2")}
        assert rs.desired_settings(store) == {"k-1": ({"telemetry_interval_s": 2}, "x" * 64, 2)}
        assert rs.pins(store) == {"k-2"}
        assert rs.save(store, r, [], clear_models=["k-1"], clear_settings=["k-1"])
        assert rs.desired_models(store) == {} and rs.desired_settings(store) == {}
        assert [e.kind for e in rs.events(store, r.id)] == ["started", "step", "step"]
