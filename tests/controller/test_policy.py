"""Policy: pure compilation (defaults <- group <- device), change detection, versions, `nanofleet policy apply`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from nanofleet.cli import main
from nanofleet.config import THERMAL_LEVELS, parse_fleet
from nanofleet.controller import policy
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.queries import Queries
from nanofleet.controller.store import Store
from nanofleet.mqtt import MqttClient
from nanofleet.protos import fleet_pb2, topics

FLEET = """
fleet: pol
defaults:
  telemetry_interval_s: 7
  routing: {thermal_limit: severe, apps: {com.example.notes: {privacy: sensitive}}}
  queue: {max_items: 50, ttl: 1h}
groups:
  clinic: {routing: {cloud: denied}}
  kiosks: {routing: {prefer: cloud, thermal_limit: moderate}, telemetry_interval_s: 3}
devices:
  k1: {group: kiosks, routing: {min_free_ram_mb: 100}}
  c1: {group: clinic}
"""


def test_compile_layers_defaults_group_device() -> None:
    cfg = parse_fleet(FLEET)
    k1 = policy.compile_policy(cfg, "k1", 4, 123)
    assert (k1.fleet, k1.device_id, k1.group, k1.version, k1.issued_at_ms) == ("pol", "k1", "kiosks", 4, 123)
    assert k1.prefer == "cloud" and k1.cloud_allowed and k1.thermal_limit == fleet_pb2.THERMAL_LEVEL_MODERATE
    assert k1.min_free_ram_mb == 100 and k1.telemetry_interval_s == 3
    assert k1.apps["com.example.notes"].privacy == "sensitive" and k1.queue_max_items == 50 and k1.queue_ttl_s == 3600
    c1 = policy.compile_policy(cfg, "c1", 1)
    assert not c1.cloud_allowed and c1.prefer == "local" and c1.thermal_limit == fleet_pb2.THERMAL_LEVEL_SEVERE
    other = policy.compile_policy(cfg, "unlisted", 1)
    assert other.group == "default" and other.telemetry_interval_s == 7 and other.min_free_ram_mb == 512


@given(st.sampled_from(THERMAL_LEVELS), st.integers(0, 100), st.sampled_from(["allowed", "denied"]))
def test_compile_matches_the_profile(limit: str, floor: int, cloud: str) -> None:
    cfg = parse_fleet(f"fleet: p\ndefaults: {{routing: {{thermal_limit: {limit}, battery_floor_pct: {floor}, "
                      f"cloud: {cloud}}}}}")
    p = policy.compile_policy(cfg, "d", 1)
    assert THERMAL_LEVELS[p.thermal_limit] == limit and p.battery_floor_pct == floor
    assert p.cloud_allowed == (cloud == "allowed")
    assert policy.content_hash(p) == policy.content_hash(policy.compile_policy(cfg, "d", 99, 5))


def test_plan_only_changed_devices_with_a_readable_diff(tmp_path: Path) -> None:
    cfg = parse_fleet(FLEET)
    with Store(tmp_path / "s.db") as store:
        changes = policy.plan(cfg, ["k1", "c1"], store.published_policies())
        assert [c.device_id for c in changes] == ["c1", "k1"] and changes[0].changes == ("(new)",)
        from nanofleet.controller.views import PublishedPolicy

        store.record_policies([PublishedPolicy(c.device_id, 1, policy.content_hash(c.policy),
                                               json_format.MessageToJson(c.policy), 0) for c in changes])
        assert policy.plan(cfg, ["k1", "c1"], store.published_policies()) == []
        cfg2 = parse_fleet(FLEET.replace("clinic: {routing: {cloud: denied}}", "clinic: {routing: {cloud: allowed}}"))
        again = policy.plan(cfg2, ["k1", "c1"], store.published_policies())
        assert [c.device_id for c in again] == ["c1"] and again[0].changes == ("cloud: 'denied' -> 'allowed'",)
        # spelled as fleet.yaml spells it, not as the proto enum does (THERMAL_LEVEL_MODERATE)
        cfg3 = parse_fleet(FLEET.replace("thermal_limit: moderate}", "thermal_limit: critical}"))
        hot = policy.plan(cfg3, ["k1", "c1"], store.published_policies())
        assert [(c.device_id, c.changes) for c in hot] == [("k1", ("thermal_limit: 'moderate' -> 'critical'",))]


def test_policy_apply_cli_shows_diff_publishes_retained_with_increasing_versions(broker, tmp_path: Path) -> None:
    cfg_path = tmp_path / "fleet.yaml"
    cfg_path.write_text(FLEET + f"broker: {{url: {broker.url}}}\n")
    data = tmp_path / "ctl"
    runner = CliRunner()
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(data), "--dry-run"])
    assert r.exit_code == 2 and "--data-dir" in r.output and not data.exists()  # no empty store made here
    data.mkdir()
    with Store(data / "controller.db") as store:  # the controller's store, which has seen k1 only
        store.write_status("pol", fleet_pb2.DeviceStatus(fleet="pol", device_id="k1", online=True, bd_seq=1), 1)
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(data), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "k1 (was none):" in r.output and "(new)" in r.output and "c1 (was none, never seen):" in r.output
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert ("published policy version 1 to 1 device(s); 1 listed in fleet.yaml but never seen get it (retained) "
            "when they first connect") in r.output
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(data)])
    assert "no change" in r.output
    broker_line = f"broker: {{url: {broker.url}}}\n"
    cfg_path.write_text(FLEET.replace("min_free_ram_mb: 100", "min_free_ram_mb: 300") + broker_line)
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert "k1 (was v1):" in r.output and "min_free_ram_mb: 100 -> 300" in r.output and "c1" not in r.output
    assert "published policy version 2 to 1 device(s)" in r.output
    with Store(data / "controller.db") as store:  # what the groups page shows: the last round's diff
        last = Queries(store).last_policy_round()
        assert last is not None and (last.version, last.devices) == (2, 1)
        assert last.changes == [{"changes": ["min_free_ram_mb: 100 -> 300"], "devices": ["k1"]}]

    async def retained() -> dict[str, fleet_pb2.RoutingPolicy]:
        async with MqttClient(broker.url) as c:
            c.subscribe([(topics.fleet_filter("pol", "policy"), 1)])
            got: dict[str, fleet_pb2.RoutingPolicy] = {}
            async for msg in c.messages():
                got[topics.parse(msg.topic).device] = json_format.Parse(msg.payload, fleet_pb2.RoutingPolicy())
                if len(got) == 2:
                    return got
        raise AssertionError("unreachable")

    got = asyncio.run(asyncio.wait_for(retained(), 10))
    assert got["k1"].version == 2 and got["k1"].min_free_ram_mb == 300 and got["c1"].version == 1
    r = runner.invoke(main, ["policy", "apply", str(tmp_path / "missing.yaml")])
    assert r.exit_code != 0
    with Store(data / "controller.db") as store:  # each publishing audited; the dry run and "no change" are not
        entries = AuditLog(store).page(action="policy_apply")[0]
    assert [(e.target, e.detail["device_count"], e.source) for e in entries] == [("v2", 1, "cli"), ("v1", 2, "cli")]
    assert entries[0].actor.startswith("cli:") and entries[0].detail["changes"] == {
        "k1": ["min_free_ram_mb: 100 -> 300"]}


def test_policy_apply_uses_the_store_fleet_yaml_names(broker, tmp_path: Path, store_url: str) -> None:
    """fleet.yaml's store.url chooses the store `policy apply` reads and records in, on either backend; `--store`
    overrides it."""
    cfg_path = tmp_path / "fleet.yaml"
    cfg_path.write_text(FLEET + f"broker: {{url: {broker.url}}}\nstore: {{url: '{store_url}'}}\n")
    with Store(store_url) as store:
        store.write_status("pol", fleet_pb2.DeviceStatus(fleet="pol", device_id="k1", online=True, bd_seq=1), 1)
    runner = CliRunner()
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--data-dir", str(tmp_path / "nowhere")])
    assert r.exit_code == 0, r.output
    assert "published policy version 1 to 1 device(s)" in r.output and not (tmp_path / "nowhere").exists()
    r = runner.invoke(main, ["policy", "apply", str(cfg_path), "--store", f"sqlite:///{tmp_path / 'none.db'}"])
    assert r.exit_code == 2 and "--data-dir" in r.output and "none.db" in r.output  # --store wins: no store there
    with Store(store_url) as store:
        last = Queries(store).last_policy_round()
        assert last is not None and (last.version, last.devices) == (1, 2)
        assert [(e.target, e.source) for e in AuditLog(store).page(action="policy_apply")[0]] == [("v1", "cli")]


async def test_a_running_controller_never_undoes_policy_apply(broker, tmp_path: Path) -> None:
    """The controller compiles policy only for devices that never had one; births get the last published policy."""
    from ctl_helpers import until

    from nanofleet.controller.service import ControllerService

    cfg_path = tmp_path / "fleet.yaml"
    cfg_path.write_text(FLEET.replace("fleet: pol", "fleet: pol2") + f"broker: {{url: {broker.url}}}\n")
    data = tmp_path / "ctl"
    svc = await ControllerService(parse_fleet(cfg_path.read_text()), data, broker_url=broker.url,
                                  listen="127.0.0.1:0", echo=lambda _line: None).start()
    seen: list[fleet_pb2.RoutingPolicy] = []
    try:
        async with MqttClient(broker.url) as dev:
            dev.subscribe([(topics.policy("pol2", "k1"), 1)])

            async def listen() -> None:
                async for msg in dev.messages():
                    seen.append(json_format.Parse(msg.payload, fleet_pb2.RoutingPolicy()))

            reader = asyncio.create_task(listen())

            async def birth(bd_seq: int) -> None:
                status = fleet_pb2.DeviceStatus(fleet="pol2", device_id="k1", online=True, bd_seq=bd_seq,
                                                ts_ms=1_795_000_000_000 + bd_seq)
                await dev.publish(topics.status("pol2", "k1"), json_format.MessageToJson(status), qos=1, retain=True)

            await birth(1)
            await until(lambda: seen and seen[-1].min_free_ram_mb == 100, what="the first policy (v1)")
            cfg_path.write_text(cfg_path.read_text().replace("min_free_ram_mb: 100", "min_free_ram_mb: 300"))
            r = await asyncio.to_thread(CliRunner().invoke, main, ["policy", "apply", str(cfg_path),
                                                                    "--data-dir", str(data)])
            assert r.exit_code == 0 and "min_free_ram_mb: 100 -> 300" in r.output, r.output
            await until(lambda: seen[-1].min_free_ram_mb == 300, what="the applied policy (v2)")
            applied = seen[-1].version
            count = len(seen)
            await birth(2)  # a reboot: the controller answers with a live copy of the last published policy
            await until(lambda: len(seen) > count, what="the policy answering the new birth")
            assert (seen[-1].version, seen[-1].min_free_ram_mb) == (applied, 300)
            count = len(seen)
            await birth(2)  # a rebirth of the same session (the `rebirth` command): the policy again, too
            await until(lambda: len(seen) > count, what="the policy answering the rebirth")
            assert (seen[-1].version, seen[-1].min_free_ram_mb) == (applied, 300)
            reader.cancel()
    finally:
        await svc.stop()
