"""The controller's rollout task: every few seconds, each active rollout's state machine (controller/rollouts.py)
over the group's stored device reports; its decisions stored (rollout_store) and delivered as each device's model in
its retained, versioned RoutingPolicy — so a device offline during a rollout gets its model when it comes back.

Run by ControllerService under its TaskSupervisor (restarted when it dies). A tick that fails (the broker did not
take a publish in time) is logged and counted and tried again on the next tick; the stored state only moves on
after the policies of that tick were published.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from nanofleet.config import FleetConfig
from nanofleet.controller import policy as pol
from nanofleet.controller import rollout_store as rs
from nanofleet.controller.rollouts import advance
from nanofleet.controller.store import Store
from nanofleet.mqtt import Publisher

log = logging.getLogger("nanofleet.controller.rollouts")


class RolloutEngine:
    def __init__(self, store: Store, config: FleetConfig, client: Publisher, every_s: float = 2.0) -> None:
        self.store, self.config, self.client, self.every_s = store, config, client, every_s
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
            out = advance(r, reports, pinned, now)
            target = (r.target_source, r.target_sha256)
            wanted = {d: m for d, m in out.desired.items() if m == target}
            back = [d for d, m in out.desired.items() if m != target]
            current = await asyncio.to_thread(rs.desired_models, self.store)
            set_models = {d: m for d, m in wanted.items() if current.get(d) != m}
            clear = [d for d in back if d in current and current[d][1] == r.target_sha256]
            if set_models or clear:
                models = {**{d: m for d, m in current.items() if d not in clear}, **set_models}
                changes = pol.plan(self.config, [*set_models, *clear], await asyncio.to_thread(
                    self.store.published_policies), models)
                await pol.publish(self.client, self.store, changes)
                published += len(changes)
            changed = out.rollout != r or set_models or clear or out.events
            if changed and not await asyncio.to_thread(rs.save, self.store, out.rollout, out.events, set_models,
                                                       clear, r):
                self.counts["changed_meanwhile"] += 1  # the operator paused or aborted: next tick decides
                continue
            for kind, detail in out.events:
                self.counts[kind] += 1
                log.info("rollout %d (%s): %s: %s", r.id, r.group, kind, detail)
        return published
