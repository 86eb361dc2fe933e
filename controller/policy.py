"""Routing policy: `fleet.yaml` compiled per device (pure), diffed against what was last published, published.

`compile_policy` is pure: defaults ← group ← device (FleetConfig.profile_for) into a RoutingPolicy. A device's
policy is republished only when its content changed (a hash over everything but version and issue time); each
publishing round takes the fleet's next version from the store, so versions only ever increase. Policies are
retained, so a device that connects later (or reconnects after a broker restart, once `republish` ran) gets its
policy without asking.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from nanofleet.config import FleetConfig, Profile
from nanofleet.controller.rollout_store import desired_models, desired_settings
from nanofleet.controller.rollouts import overlay
from nanofleet.controller.store import Store
from nanofleet.controller.views import PublishedPolicy
from nanofleet.mqtt import Publisher
from nanofleet.protos import fleet_pb2, topics

_VOLATILE = ("version", "issued_at_ms")


def compile_policy(config: FleetConfig, device_id: str, version: int, issued_at_ms: int = 0,
                   model: tuple[str, str] | None = None,
                   settings: dict[str, Any] | None = None) -> fleet_pb2.RoutingPolicy:
    """`model`: (source, sha256) a rollout wants on this device instead of fleet.yaml's; `settings`: a settings
    rollout's partial profile over fleet.yaml's (controller/rollouts.py)."""
    profile = config.profile_for(device_id)
    if settings:
        profile = overlay(profile, settings)
    policy = compile_profile(config, profile, config.group_of(device_id), device_id, version, issued_at_ms)
    if model is not None:
        policy.model_source, policy.model_sha256 = model
    return policy


def group_policy(config: FleetConfig, group: str) -> fleet_pb2.RoutingPolicy:
    """What a device of `group` without its own overrides runs (the groups page shows it)."""
    return compile_profile(config, config.group_profile(group), group, "", 0)


def compile_profile(config: FleetConfig, profile: Profile, group: str, device_id: str, version: int,
                    issued_at_ms: int = 0) -> fleet_pb2.RoutingPolicy:
    r = profile.routing
    return fleet_pb2.RoutingPolicy(
        fleet=config.fleet, device_id=device_id, group=group, version=version,
        issued_at_ms=issued_at_ms, prefer=r.prefer, cloud_allowed=r.cloud == "allowed",
        thermal_limit=f"THERMAL_LEVEL_{r.thermal_limit.upper()}", min_free_ram_mb=r.min_free_ram_mb,
        battery_floor_pct=r.battery_floor_pct, metered_network=r.metered_network,
        max_local_prompt_tokens=r.max_local_prompt_tokens,
        cloud_budget=fleet_pb2.CloudBudget(tokens_per_day=r.cloud_budget.tokens_per_day),
        apps={name: fleet_pb2.AppPolicy(privacy="" if rule.privacy == "normal" else rule.privacy, mode=rule.mode or "")
              for name, rule in r.apps.items()},
        telemetry_interval_s=max(1, round(profile.telemetry_interval_s)), model_source=profile.model.source,
        model_sha256=profile.model.sha256 or "", queue_max_items=profile.queue.max_items,
        queue_ttl_s=int(profile.queue.ttl), queue_max_bytes=profile.queue.max_bytes,
    )


def content_of(policy: fleet_pb2.RoutingPolicy) -> dict[str, Any]:
    d = json_format.MessageToDict(policy, preserving_proto_field_name=True)
    for key in _VOLATILE:
        d.pop(key, None)
    return d


def content_hash(policy: fleet_pb2.RoutingPolicy) -> str:
    p = fleet_pb2.RoutingPolicy()
    p.CopyFrom(policy)
    for key in _VOLATILE:
        p.ClearField(key)
    return hashlib.sha256(p.SerializeToString(deterministic=True)).hexdigest()


@dataclass(frozen=True)
class PolicyChange:
    device_id: str
    old_version: int | None  # None: never published
    changes: tuple[str, ...]  # "routing field: old -> new"
    policy: fleet_pb2.RoutingPolicy


def _spelled(key: str, value: Any) -> tuple[str, Any]:
    """A policy field as fleet.yaml spells it (`thermal_limit: severe`, `cloud: denied`), not as the proto does."""
    if key == "thermal_limit":  # absent: the enum's zero, `none`
        return key, str(value or "THERMAL_LEVEL_NONE").removeprefix("THERMAL_LEVEL_").lower()
    if key == "cloud_allowed":  # absent: proto3's false
        return "cloud", "allowed" if value else "denied"
    return key, value


def diff(old: dict[str, Any] | None, new: dict[str, Any]) -> tuple[str, ...]:
    if old is None:
        return ("(new)",)
    lines = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            (name, was), (_, now) = _spelled(k, old.get(k)), _spelled(k, new.get(k))
            lines.append(f"{name}: {was!r} -> {now!r}")
    return tuple(lines)


def plan(config: FleetConfig, device_ids: Iterable[str], published: dict[str, PublishedPolicy],
         models: dict[str, tuple[str, str]] | None = None,
         settings: dict[str, dict[str, Any]] | None = None) -> list[PolicyChange]:
    """Pure: which devices need a new policy, and what changed for each (version still 0). `models`: the rollouts'
    models per device (rollout_store.desired_models), which take the place of fleet.yaml's; `settings`: the settings
    rollouts' partial profiles per device, laid over fleet.yaml's."""
    out = []
    models, settings = models or {}, settings or {}
    for device_id in sorted(set(device_ids)):
        policy = compile_policy(config, device_id, 0, model=models.get(device_id), settings=settings.get(device_id))
        last = published.get(device_id)
        if last is not None and last.content_hash == content_hash(policy):
            continue
        old = content_of(json_format.Parse(last.policy_json, fleet_pb2.RoutingPolicy())) if last else None
        out.append(PolicyChange(device_id, last.version if last else None, diff(old, content_of(policy)), policy))
    return out


def target_devices(config: FleetConfig, store: Store) -> set[str]:
    """Devices listed in fleet.yaml and every device the controller has seen, but no revoked one."""
    rows = store.list_devices()
    revoked = {d.device_id for d in rows if d.state == "revoked"}
    return (set(config.devices) | {d.device_id for d in rows if d.fleet in ("", config.fleet)}) - revoked


async def publish(client: Publisher, store: Store, changes: list[PolicyChange], *, within: float = 10) -> int:
    """Give `changes` the fleet's next version, publish them retained (QoS 1), record them. Returns the version."""
    if not changes:
        return 0
    version = await asyncio.to_thread(store.next_policy_version)
    now = int(time.time() * 1000)
    records, futs = [], []
    for ch in changes:
        ch.policy.version, ch.policy.issued_at_ms = version, now
        body = json_format.MessageToJson(ch.policy, indent=None)
        futs.append(client.publish(topics.policy(ch.policy.fleet, ch.device_id), body, qos=1, retain=True))
        records.append(PublishedPolicy(ch.device_id, version, content_hash(ch.policy), body, now))
    await asyncio.wait_for(asyncio.gather(*futs), within)
    await asyncio.to_thread(store.record_policies, records, {ch.device_id: ch.changes for ch in changes})
    return version


async def republish(client: Publisher, store: Store, fleet: str, *, only: Iterable[str] | None = None,
                    within: float = 10) -> int:
    """Publish last-published policies again, all or `only` some (retained messages vanish when a broker restarts
    empty; a live copy also tells a device the controller is listening)."""
    published = await asyncio.to_thread(store.published_policies)
    wanted = published.keys() if only is None else set(only) & published.keys()
    futs = [client.publish(topics.policy(fleet, d), published[d].policy_json, qos=1, retain=True) for d in wanted]
    await asyncio.wait_for(asyncio.gather(*futs), within)
    return len(futs)


async def apply(client: Publisher, store: Store, config: FleetConfig,
                device_ids: Iterable[str] | None = None, *, new_only: bool = False) -> tuple[int, list[PolicyChange]]:
    """Publish what changed. `new_only`: only devices that never had a policy — the running controller's rule, so a
    later `nanofleet policy apply` is never undone by the fleet.yaml the controller happened to start with."""
    ids = target_devices(config, store) if device_ids is None else set(device_ids)
    published = await asyncio.to_thread(store.published_policies)
    if new_only:
        ids -= published.keys()
    changes = plan(config, ids, published, await asyncio.to_thread(desired_models, store),
                   {d: s for d, (s, _, _) in (await asyncio.to_thread(desired_settings, store)).items()})
    return await publish(client, store, changes), changes
