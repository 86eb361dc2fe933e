"""A rollout to real agents: the controller (real mosquitto, its web app serving artifacts, the gateway's token
table) and two AgentService instances with the real tiny llama.cpp model. Each agent fetches the new model from the
controller with its own device token, loads it beside the old one, switches and reports; the controller sees the
reports, bakes each step and ends the rollout `done`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ctl_helpers import fleet, until

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import AgentSettings
from nanofleet.agent.tiny_model import make_tiny_gguf
from nanofleet.controller import rollout_store as rs
from nanofleet.controller.artifacts import ArtifactStore
from nanofleet.controller.gateway.auth import issue_token
from nanofleet.controller.rollouts import Rollout
from nanofleet.controller.service import ControllerService
from tests.telemetry.fake_sysfs import FakeSysfs


async def test_real_agents_take_a_rollout_from_the_controller(broker, tmp_path: Path) -> None:
    name = "roa"
    gw = tmp_path / "gateway" / "gateway.db"
    gw.parent.mkdir()
    cfg = fleet(name, broker.url, "defaults: {telemetry_interval_s: 1}\ngroups:\n  pis: {match: ['pi-*']}\n")
    svc = await ControllerService(cfg, tmp_path / "ctl", listen="127.0.0.1:0", usage_db=gw,
                                  rollout_every_s=0.1, echo=lambda line: None).start()
    new = make_tiny_gguf(tmp_path / "new.gguf", seed=7)
    sha = ArtifactStore(tmp_path / "ctl" / "artifacts").add_file(new, "tiny-7").sha256
    assert sha == hashlib.sha256(new.read_bytes()).hexdigest()
    agents = []
    try:
        for i in range(2):
            device = f"pi-{i}"
            settings = AgentSettings.model_validate({
                "fleet": name, "device_id": device, "broker_url": broker.url, "data_dir": tmp_path / device,
                "socket_path": tmp_path / "run" / f"{device}.sock", "telemetry_interval_s": 1,
                "gateway_token": issue_token(gw, device, name), "model": {"source": "builtin:tiny-test", "n_ctx": 256}})
            agent = AgentService(settings, warmup=True)
            await agent.start()
            agents.append(agent)
        store = svc.store
        assert store is not None
        await until(lambda: len([d for d in rs.group_reports(store, "pis") if d.online]) == 2, 20, "agents online")
        r = rs.create(store, Rollout(0, "pis", f"http://127.0.0.1:{svc.web_port}/artifacts/{sha}", sha,
                                     "builtin:tiny-test", "", (50, 100), "errors<2%,thermal<severe", bake_s=0.5))
        await until(lambda: (got := rs.get(store, r.id)) is not None and not got.active, 60, "the rollout to end")
        done = rs.get(store, r.id)
        assert done is not None and done.state == "done", (done, [a.updater.reason for a in agents])  # type: ignore[union-attr]
        for a in agents:
            assert a.updater is not None and a.updater.state == "applied" and a.models.spec.sha256 == sha
            assert a.models.loaded  # loaded and warmed before the switch
            assert (a.settings.cache_dir / f"{sha[:12]}-{sha}.gguf").read_bytes() == new.read_bytes()
        assert {d.sha256 for d in rs.group_reports(store, "pis")} == {sha}
    finally:
        for a in agents:
            await a.stop()
        await svc.stop()


async def test_a_canary_agent_running_hot_rolls_back_and_the_other_never_gets_it(broker, tmp_path: Path) -> None:
    """Two real agents on fake /sys trees; the one the first step takes heats up once it runs the new model (as a
    heavier model would): the gate's thermal term fails, the canary goes back to the old model, the other agent
    never downloads or loads the new one."""
    name = "rob"
    gw = tmp_path / "gateway" / "gateway.db"
    gw.parent.mkdir()
    cfg = fleet(name, broker.url, "defaults: {telemetry_interval_s: 1}\ngroups:\n  pis: {match: ['pi-*']}\n")
    svc = await ControllerService(cfg, tmp_path / "ctl", listen="127.0.0.1:0", usage_db=gw,
                                  rollout_every_s=0.1, echo=lambda line: None).start()
    new = make_tiny_gguf(tmp_path / "new.gguf", seed=8)
    sha = ArtifactStore(tmp_path / "ctl" / "artifacts").add_file(new, "tiny-8").sha256
    agents: dict[str, AgentService] = {}
    trees: dict[str, FakeSysfs] = {}
    try:
        for i in range(2):
            device = f"pi-{i}"
            trees[device] = FakeSysfs(tmp_path / f"sys-{i}")
            settings = AgentSettings.model_validate({
                "fleet": name, "device_id": device, "broker_url": broker.url, "data_dir": tmp_path / device,
                "socket_path": tmp_path / "run" / f"{device}.sock", "telemetry_interval_s": 1,
                "sysfs_root": trees[device].root, "gateway_token": issue_token(gw, device, name),
                "model": {"source": "builtin:tiny-test", "n_ctx": 256}})
            agents[device] = AgentService(settings, warmup=True)
            await agents[device].start()
        store = svc.store
        assert store is not None
        await until(lambda: len([d for d in rs.group_reports(store, "pis") if d.online]) == 2, 20, "agents online")
        r = rs.create(store, Rollout(0, "pis", f"http://127.0.0.1:{svc.web_port}/artifacts/{sha}", sha,
                                     "builtin:tiny-test", "", (50, 100), "errors<2%,thermal<severe", bake_s=3.0))
        await until(lambda: any(a.models.spec.sha256 == sha for a in agents.values()), 30, "the canary switching")
        canary = next(d for d, a in agents.items() if a.models.spec.sha256 == sha)
        other = next(d for d in agents if d != canary)
        trees[canary].set(temp_c=95.0)  # past its 'hot' trip: severe
        await until(lambda: (got := rs.get(store, r.id)) is not None and not got.active, 60, "the rollout to end")
        done = rs.get(store, r.id)
        assert done is not None and done.state == "rolled_back", done
        assert "thermal<severe: hottest canary at critical" in done.reason  # 95 °C: past the hot trip
        await until(lambda: agents[canary].models.spec.source == "builtin:tiny-test", 20, "the canary back")
        assert agents[other].updater is not None and agents[other].updater.state == ""  # never asked to update
        assert not list(agents[other].settings.cache_dir.glob(f"{sha[:12]}-*"))
    finally:
        for a in agents.values():
            await a.stop()
        await svc.stop()
