"""The controller's rollout task: every few seconds, each active rollout's state machine (controller/rollouts.py)
over the group's stored device reports; its decisions stored (rollout_store) and delivered as each device's model in
its retained, versioned RoutingPolicy — so a device offline during a rollout gets its model when it comes back.

Run by ControllerService under its TaskSupervisor (restarted when it dies). A tick that fails (the broker did not
take a publish in time) is logged and counted and tried again on the next tick; the stored state only moves on
after the policies of that tick were published.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from typing import Any

from nanofleet.config import FleetConfig
from nanofleet.controller import policy as pol
from nanofleet.controller import rollout_store as rs
from nanofleet.controller.audit import AuditLog
from nanofleet.controller.rollouts import advance
from nanofleet.controller.store import Store
from nanofleet.mqtt import Publisher

log = logging.getLogger("nanofleet.controller.rollouts")


class RolloutEngine:
    def __init__(self, store: Store, config: FleetConfig, client: Publisher, every_s: float = 2.0,
                 audit: AuditLog | None = None) -> None:
        self.store, self.config, self.client, self.every_s, self.audit = store, config, client, every_s, audit
        self.counts: Counter[str] = Counter()

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except (TimeoutError, OSError) as exc:  # the broker or disk for a moment: next tick tries again
                self.counts["tick_failed"] += 1
                log.error("rollouts: tick failed, tried again in %.0f s: %r", self.every_s, exc)
            await asyncio.sleep(self.every_s)

    async def tick(self, now_ms: int | None = None) -> int:
        """Advance every active rollout once; returns how many device policies were published."""
        published = 0
        for r in await asyncio.to_thread(rs.active, self.store):
            now = int(time.time() * 1000) if now_ms is None else now_ms
            reports = await asyncio.to_thread(rs.group_reports, self.store, r.group)
            pinned = await asyncio.to_thread(rs.pins, self.store)
            models = await asyncio.to_thread(rs.desired_models, self.store)
            settings = await asyncio.to_thread(rs.desired_settings, self.store)
            if r.kind == "settings":  # a device has the settings once it reports the version that carried them
                reports = [dataclasses.replace(d, sha256=r.target_sha256 if (s := settings.get(d.device_id))
                                               and s[1] == r.target_sha256 and s[2] and d.policy_version >= s[2]
                                               else "") for d in reports]
            out = advance(r, reports, pinned, now)
            target = (r.target_source, r.target_sha256)
            wanted = [d for d, m in out.desired.items() if m == target]
            back = [d for d, m in out.desired.items() if m != target]
            if r.kind == "settings":
                add = [d for d in wanted if d not in settings or settings[d][1] != r.target_sha256]
                clear = [d for d in back if d in settings and settings[d][1] == r.target_sha256]
                new_settings = {d: s[0] for d, s in settings.items() if d not in clear} | dict.fromkeys(add, r.settings)
                new_models = models
            else:
                add = [d for d in wanted if models.get(d) != target]
                clear = [d for d in back if d in models and models[d][1] == r.target_sha256]
                new_models = {d: m for d, m in models.items() if d not in clear} | dict.fromkeys(add, target)
                new_settings = {d: s[0] for d, s in settings.items()}
            # every tick, not only when the assignment changes: another publisher (the birth round for a new
            # device, `policy apply` planned a moment earlier) may have replaced a device's policy after ours
            before = await asyncio.to_thread(self.store.published_policies)
            changes = pol.plan(self.config, [*wanted, *clear], before, new_models, new_settings) \
                if wanted or clear else []
            version = await pol.publish(self.client, self.store, changes) if changes else 0
            published += len(changes)
            repaired = [ch.device_id for ch in changes if ch.device_id in wanted and ch.device_id not in add]
            if repaired:
                self.counts["republished"] += len(repaired)
                log.warning("rollout %d: %d device policies had lost the rollout's %s (another publish came "
                            "after ours); published again", r.id, len(repaired), r.kind)
            carried = {d: p.version for d, p in before.items()} | {ch.device_id: version for ch in changes}
            if r.kind == "settings":
                kw: dict[str, Any] = {"settings": {d: carried.get(d, 0) for d in [*add, *repaired]},
                                      "clear_settings": clear}
            else:
                kw = {"models": dict.fromkeys(add, target), "clear_models": clear}
            changed = out.rollout != r or add or clear or repaired or out.events
            if changed and not await asyncio.to_thread(
                    functools.partial(rs.save, self.store, out.rollout, out.events, expect=r, **kw)):
                self.counts["changed_meanwhile"] += 1  # the operator paused or aborted: next tick decides
                continue
            for kind, detail in out.events:
                self.counts[kind] += 1
                log.info("rollout %d (%s): %s: %s", r.id, r.group, kind, detail)
                if self.audit is not None and kind != "baking":  # the decisions, not every bake's start
                    self.audit.record_soon("controller", "rollout", f"rollout {r.id}",
                                           {"kind": kind, "group": r.group, "detail": detail}, source="controller")
        return published
