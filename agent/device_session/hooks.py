"""What the MQTT device session needs from the rest of the agent, as a Protocol.

The device session (telemetry, birth/death, policy, commands) is written against this, not against the runtime or
the router, so each side can be tested alone and the simulator can supply its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from nanofleet.protos import fleet_pb2


@dataclass(slots=True)
class AgentMetrics:
    route_counts: dict[str, int] = field(default_factory=dict)  # "local" | "cloud" | "queued" | "rejected" -> n
    queue_depth: int = 0            # entries in the offline queue not finished (queued + running)
    slots_waiting: int = 0          # requests waiting for a local slot now (not the offline queue)
    queue_oldest_age_s: float = 0.0
    queue_counters: dict[str, int] = field(default_factory=dict)  # enqueued, drained_<route>, expired, failed, …
    policy_version: int = 0
    gateway_reachable: bool = False


class AgentHooks(Protocol):
    def model_state(self) -> fleet_pb2.ModelState:
        """Current model availability / loaded / tokens_per_s, for birth and telemetry."""
        ...

    def agent_metrics(self) -> AgentMetrics: ...

    async def apply_policy(self, policy: fleet_pb2.RoutingPolicy) -> None:
        """Install a newly received policy (called only for a version newer than the one applied)."""
        ...

    async def handle_command(self, command: fleet_pb2.Command) -> fleet_pb2.CommandResult:
        """Run one controller command (unload-model, drain-queue, ...); rebirth/ping are the session's own."""
        ...
