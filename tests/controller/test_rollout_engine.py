"""Rollouts end to end on a real mosquitto: the controller's rollout task over the store, simulated devices that
switch to the model their retained policy names (and report it as agents do), real SQLite. A good rollout reaches
every eligible device step by step while a pinned one is left alone and an offline one catches up on return; canaries
that fail requests roll it back, and the rest of the group never receives the model."""

from __future__ import annotations

from pathlib import Path

from ctl_helpers import fleet, until
from google.protobuf import json_format

from nanofleet.controller import rollout_store as rs
from nanofleet.controller.artifacts import ArtifactStore
from nanofleet.controller.rollouts import Rollout
from nanofleet.controller.service import ControllerService
from nanofleet.protos import fleet_pb2
from nanofleet.sim import Simulation

GROUPS = "groups:\n  kiosks: {match: ['sim-*', 'late-*']}\n"


async def _setup(name: str, broker_url: str, tmp_path: Path, tiny_gguf: Path, n: int,
                 ) -> tuple[ControllerService, Simulation, str]:
    svc = await ControllerService(fleet(name, broker_url, GROUPS), tmp_path / "ctl", rollout_every_s=0.1,
                                  echo=lambda line: None).start()
    sim = await Simulation(broker_url, n, fleet=name, interval_s=0.2, data_dir=tmp_path / "sim").start()
    await sim.wait_connected(20)
    assert svc.store is not None
    store = svc.store
    await until(lambda: len([d for d in rs.group_reports(store, "kiosks") if d.online]) == n, 20,
                "every simulated device online in its group")
    sha = ArtifactStore(tmp_path / "ctl" / "artifacts").add_file(tiny_gguf, "tiny").sha256
    return svc, sim, sha


def _rollout(sha: str, steps: tuple[int, ...], gate: str = "errors<2%,thermal<severe", bake_s: float = 0.6,
             ) -> Rollout:
    return Rollout(0, "kiosks", f"http://127.0.0.1:8080/artifacts/{sha}", sha, "builtin:tiny-test", "", steps,
                   gate, bake_s=bake_s)


async def test_a_good_rollout_reaches_the_group_pinned_left_alone_offline_catches_up(
        broker, tmp_path: Path, tiny_gguf: Path) -> None:
    svc, sim, sha = await _setup("ro1", broker.url, tmp_path, tiny_gguf, 12)
    late = await Simulation(broker.url, 1, fleet="ro1", interval_s=0.2, prefix="late",
                            data_dir=tmp_path / "late").start()
    store = svc.store
    assert store is not None
    try:
        await late.wait_connected(10)
        await until(lambda: any(d.device_id == "late-0000" and d.online for d in rs.group_reports(store, "kiosks")),
                    10, "the late device online")
        await late.stop()  # offline for the whole rollout
        await until(lambda: any(d.device_id == "late-0000" and not d.online
                                for d in rs.group_reports(store, "kiosks")), 10, "the late device offline")
        rs.pin(store, "sim-0003", "kept on the old model for a customer")
        r = rs.create(store, _rollout(sha, (10, 50, 100)))
        await until(lambda: (got := rs.get(store, r.id)) is not None and not got.active, 60, "the rollout to end")
        done = rs.get(store, r.id)
        assert done is not None and done.state == "done", done
        assert [s["gate"] for s in done.step_results] == ["passed"] * 3
        kinds = [e.kind for e in rs.events(store, r.id)]
        assert kinds[0] == "started" and kinds[-1] == "done" and kinds.count("step_passed") == 3
        on = {d.device_id for d in sim.devices if d.model_sha256 == sha}
        assert on == {d.device_id for d in sim.devices} - {"sim-0003"}
        assert next(d for d in sim.devices if d.device_id == "sim-0003").switches == 0
        # the late device returns and takes its retained policy, with the model
        back = await Simulation(broker.url, 1, fleet="ro1", interval_s=0.2, prefix="late",
                                data_dir=tmp_path / "late").start()
        try:
            await until(lambda: back.devices[0].model_sha256 == sha, 10, "the late device catching up")
            await until(lambda: any(d.device_id == "late-0000" and d.sha256 == sha
                                    for d in rs.group_reports(store, "kiosks")), 10, "its report stored")
        finally:
            await back.stop()
        # a later `policy apply` of the same fleet.yaml keeps the rollout's model (it rides every compilation)
        from nanofleet.controller import policy as pol
        changes = pol.plan(svc.config, ["sim-0001"], store.published_policies(), rs.desired_models(store))
        assert changes == []
    finally:
        await sim.stop()
        await svc.stop()


async def test_canaries_failing_requests_roll_back_and_the_rest_never_receive_it(
        broker, tmp_path: Path, tiny_gguf: Path) -> None:
    svc, sim, sha = await _setup("ro2", broker.url, tmp_path, tiny_gguf, 20)
    store = svc.store
    assert store is not None
    for d in sim.devices:
        d.bad_models[sha] = 1.0  # every local request on the new model fails
    try:
        # a bake long enough for the canaries to serve requests on the new model (ticks every 0.2 s, 0-3 each)
        r = rs.create(store, _rollout(sha, (10, 50, 100), bake_s=2.0))
        await until(lambda: (got := rs.get(store, r.id)) is not None and not got.active, 60, "the rollout to end")
        done = rs.get(store, r.id)
        assert done is not None and done.state == "rolled_back"
        assert done.reason.startswith("gate failed at step 1 (10%): errors<2%: canaries' errors"), done.reason
        canaries = {d.device_id for d in sim.devices if d.switches}
        assert len(canaries) == 2  # 10 % of 20
        await until(lambda: all(d.model_sha256 == "" for d in sim.devices), 10, "the canaries back on the old model")
        assert all(d.switches == 2 for d in sim.devices if d.device_id in canaries)
        for device_id, p in store.published_policies().items():  # the others' policies never named the model
            if device_id not in canaries:
                assert json_format.Parse(p.policy_json, fleet_pb2.RoutingPolicy()).model_sha256 == ""
        assert rs.desired_models(store) == {}
        # counted by the task once its save returned (the store may show the state a moment before)
        await until(lambda: svc.status()["rollouts"].get("rolled_back") == 1, 5, "the rollback counted")
        assert svc.audit is not None
        await until(lambda: [e.detail["kind"] for e in svc.audit.page(action="rollout")[0]] == ["rolled_back"], 5,
                    "the rollback in the audit log")
    finally:
        await sim.stop()
        await svc.stop()


async def test_a_settings_rollout_reaches_the_group_and_policy_apply_keeps_it(
        broker, tmp_path: Path, tiny_gguf: Path) -> None:
    from nanofleet.controller import policy as pol
    from nanofleet.controller.rollouts import settings_hash

    svc, sim, _ = await _setup("ro3", broker.url, tmp_path, tiny_gguf, 10)
    store = svc.store
    assert store is not None
    settings = {"routing": {"battery_floor_pct": 33}}
    try:
        rs.pin(store, "sim-0002")
        h = settings_hash(settings)
        r = rs.create(store, Rollout(0, "kiosks", "settings", h, "fleet.yaml", "", (20, 100), "errors<2%",
                                     bake_s=0.3, kind="settings", settings=settings))
        await until(lambda: (got := rs.get(store, r.id)) is not None and not got.active, 60, "the rollout to end")
        done = rs.get(store, r.id)
        assert done is not None and done.state == "done", done
        floors = {d.device_id: d.policy.battery_floor_pct if d.policy else None for d in sim.devices}
        assert {k for k, v in floors.items() if v == 33} == {d.device_id for d in sim.devices} - {"sim-0002"}
        assert floors["sim-0002"] == 20  # fleet.yaml's default: the pinned device was left alone
        desired = {d: s for d, (s, _, _) in rs.desired_settings(store).items()}
        assert pol.plan(svc.config, [d.device_id for d in sim.devices], store.published_policies(),
                        rs.desired_models(store), desired) == []
    finally:
        await sim.stop()
        await svc.stop()


async def test_a_policy_published_over_the_rollouts_is_repaired(broker, tmp_path: Path, tiny_gguf: Path) -> None:
    """Another publisher (the birth round of a new device, a `policy apply` planned a moment before) may replace a
    canary's policy with one without the rollout's model after the rollout published it: the rollout's task
    publishes it again instead of waiting forever for that canary."""
    from nanofleet.controller import policy as pol

    svc, sim, sha = await _setup("ro4", broker.url, tmp_path, tiny_gguf, 10)
    store = svc.store
    assert store is not None and svc.ingest is not None
    try:
        rs.pin(store, "sim-0000")  # keeps a baseline beside the canaries
        r = rs.create(store, _rollout(sha, (50, 100), bake_s=30.0))  # a long bake: the step stays put
        await until(lambda: (got := rs.get(store, r.id)) is not None and got.state == "baking", 30, "step 1 baking")
        await until(lambda: any(d.model_sha256 == sha for d in sim.devices), 10, "a canary on the model")
        victim = next(d for d in sim.devices if d.model_sha256 == sha)

        def published_sha() -> str:
            body = store.published_policies()[victim.device_id].policy_json
            return json_format.Parse(body, fleet_pb2.RoutingPolicy()).model_sha256

        await until(lambda: published_sha() == sha, 10, "the canary's published policy naming the model")
        repaired, switches = svc.rollouts.counts["republished"] if svc.rollouts else 0, victim.switches
        stale = pol.plan(svc.config, [victim.device_id], store.published_policies())  # without the rollout
        assert stale and stale[0].policy.model_sha256 == ""
        await pol.publish(svc.ingest.client, store, stale)
        await until(lambda: victim.switches >= switches + 2 and victim.model_sha256 == sha, 10,
                    "the canary off the model and back on it")
        engine = svc.rollouts
        assert engine is not None  # counted once its publish returned: the device may have switched a moment before
        await until(lambda: engine.counts["republished"] > repaired, 5, "the repair counted")
    finally:
        await sim.stop()
        await svc.stop()
