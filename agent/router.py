"""Routing: which route serves a request — `local`, `cloud`, `queue` — or `reject`, and why.

`decide()` is pure (no I/O, no clock): everything it needs is in its four arguments, so it is tested exhaustively
with hypothesis. Invariants:
- a `sensitive` or `local_only` request never gets `cloud`, as the route or as a fallback;
- a policy that denies the cloud never yields `cloud`;
- fallback happens only before the first streamed token (`next_route`);
- `permanent` is set exactly when no change of device state or connectivity could open a route for this request
  under this policy (then the route is `reject`: queueing or retrying cannot help).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanofleet.protos import fleet_pb2
from nanofleet.protos.names import THERMAL_LEVELS

Route = Literal["local", "cloud", "queue", "reject"]
Mode = Literal["prefer_local", "local_only", "cloud_only", "prefer_cloud"]
MODES: tuple[str, ...] = ("prefer_local", "local_only", "cloud_only", "prefer_cloud")
# Blocks that waiting cannot clear (only a new policy, or a different request, can): the rest pass with time.
PERMANENT_BLOCKS = frozenset({"sensitive", "local_only", "cloud_denied", "no_gateway", "prompt_too_large"})


@dataclass(frozen=True, slots=True)
class RouteRequest:
    mode: Mode | None = None      # None: the policy's `prefer`
    sensitive: bool = False
    queue_allowed: bool = True
    prompt_tokens: int = 0
    app_id: str = ""


@dataclass(frozen=True, slots=True)
class AppRule:
    privacy: str = ""             # "" | sensitive
    mode: str = ""                # "" | one of MODES


@dataclass(frozen=True, slots=True)
class Policy:
    """The routing part of `RoutingPolicy`; the defaults equal fleet.yaml's defaults (used before any arrives)."""

    version: int = 0
    prefer: str = "local"
    cloud_allowed: bool = True
    thermal_limit: int = 3        # severe
    min_free_ram_mb: int = 512
    battery_floor_pct: int = 20
    metered_local_only: bool = True
    max_local_prompt_tokens: int = 6000
    cloud_tokens_per_day: int = 200_000
    apps: dict[str, AppRule] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, p: fleet_pb2.RoutingPolicy) -> Policy:
        return cls(
            version=p.version,
            prefer=p.prefer or "local",
            cloud_allowed=p.cloud_allowed,
            thermal_limit=int(p.thermal_limit) or 3,
            min_free_ram_mb=p.min_free_ram_mb,
            battery_floor_pct=p.battery_floor_pct,
            metered_local_only=p.metered_network != "allowed",
            max_local_prompt_tokens=p.max_local_prompt_tokens or 6000,
            cloud_tokens_per_day=p.cloud_budget.tokens_per_day if p.HasField("cloud_budget") else 200_000,
            apps={k: AppRule(v.privacy, v.mode) for k, v in p.apps.items()},
        )


@dataclass(frozen=True, slots=True)
class DeviceState:
    thermal_level: int = 0        # ThermalLevel: NONE=0 … SHUTDOWN=6
    ram_available_mb: int = 1 << 20
    battery_pct: float | None = None
    charging: bool | None = None  # None: unknown (no battery); with a battery below the floor, unknown = unplugged
    metered: bool = False
    model_availability: str = "available"  # unavailable | downloadable | downloading | available
    model_refused: bool = False   # the runtime refused to load it (e.g. insufficient RAM)


@dataclass(frozen=True, slots=True)
class Connectivity:
    """The cloud route as last seen. `gateway_serving` False: reachable, but it says its upstream cannot serve;
    `gateway_refused`: it refused this device's credentials. Each blocks the cloud with its own reason."""

    gateway_configured: bool = False
    gateway_reachable: bool = False
    circuit_open: bool = False
    cloud_tokens_used_today: int = 0
    gateway_serving: bool = True
    gateway_refused: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    reason: str
    fallbacks: tuple[Route, ...] = ()
    permanent: bool = False       # `reject` that no retry can help (a 4xx, not a 503)


def _local_block(req: RouteRequest, policy: Policy, dev: DeviceState) -> str | None:
    """Why the local model cannot serve now, or None. A block for good comes before those that pass."""
    if req.prompt_tokens > policy.max_local_prompt_tokens:
        return "prompt_too_large"
    if dev.model_availability == "unavailable" or dev.model_refused:
        return "model_unavailable"
    if dev.thermal_level >= policy.thermal_limit:
        return f"thermal_{THERMAL_LEVELS[min(max(dev.thermal_level, 0), len(THERMAL_LEVELS) - 1)]}"
    if dev.ram_available_mb < policy.min_free_ram_mb:
        return "low_ram"
    return None


def _cloud_block(req: RouteRequest, mode: str, policy: Policy, dev: DeviceState, conn: Connectivity) -> str | None:
    if req.sensitive:
        return "sensitive"
    if mode == "local_only":
        return "local_only"
    if not policy.cloud_allowed or policy.cloud_tokens_per_day == 0:  # a budget of 0 is no cloud (as the gateway)
        return "cloud_denied"
    if not conn.gateway_configured:
        return "no_gateway"
    if dev.metered and policy.metered_local_only:
        return "metered_network"
    if not conn.gateway_reachable:
        return "gateway_unreachable"
    if conn.gateway_refused:
        return "cloud_refused"
    if not conn.gateway_serving:
        return "cloud_not_serving"
    if conn.circuit_open:
        return "circuit_open"
    if conn.cloud_tokens_used_today >= policy.cloud_tokens_per_day:
        return "cloud_budget_exhausted"
    return None


def decide(req: RouteRequest, policy: Policy, dev: DeviceState, conn: Connectivity) -> Decision:
    rule = policy.apps.get(req.app_id, AppRule())
    sensitive = req.sensitive or rule.privacy == "sensitive"
    if sensitive != req.sensitive:
        req = RouteRequest(req.mode, sensitive, req.queue_allowed, req.prompt_tokens, req.app_id)
    mode: str = req.mode or (rule.mode if rule.mode in MODES else "") or (
        "prefer_cloud" if policy.prefer == "cloud" else "prefer_local")
    local_why = _local_block(req, policy, dev)
    cloud_why = _cloud_block(req, mode, policy, dev, conn)
    local_ok, cloud_ok = local_why is None, cloud_why is None
    def queue_or_reject(*blocks: str) -> Decision:
        """Every route this request may take is blocked: by waiting (queue, or a retryable reject) or for good."""
        transient = [b for b in blocks if b not in PERMANENT_BLOCKS]
        if not transient:
            return Decision("reject", blocks[0], permanent=True)
        return Decision("queue", transient[0]) if req.queue_allowed else Decision("reject", transient[0])

    if mode == "cloud_only":
        if sensitive:
            return Decision("reject", "sensitive", permanent=True)  # a sensitive request never leaves the device
        return Decision("cloud", "cloud_only") if cloud_ok else queue_or_reject(cloud_why or "")
    if mode == "local_only" or sensitive:
        why = "sensitive" if sensitive else "local_only"
        return Decision("local", why) if local_ok else queue_or_reject(local_why or "")
    battery_low = (dev.battery_pct is not None and not dev.charging and dev.battery_pct < policy.battery_floor_pct)
    # While the model downloads, prefer-local asks the cloud meanwhile (local-only waits for it, above).
    cloud_first = mode == "prefer_cloud" or battery_low or dev.model_availability == "downloading"
    if cloud_first and cloud_ok:
        reason = "battery_low" if battery_low and mode != "prefer_cloud" else (
            "model_downloading" if mode != "prefer_cloud" else "prefer_cloud")
        return Decision("cloud", reason, ("local",) if local_ok else ())
    if local_ok:
        return Decision("local", mode if not cloud_first else (cloud_why or mode), ("cloud",) if cloud_ok else ())
    if cloud_ok:
        return Decision("cloud", local_why or "", ())
    return queue_or_reject(local_why or "", cloud_why or "")


def next_route(decision: Decision, tried: tuple[Route, ...], tokens_sent: int) -> Route | None:
    """The fallback after `tried` failed: the next untried fallback, but never once a token has been sent."""
    if tokens_sent > 0:
        return None
    for route in decision.fallbacks:
        if route not in tried:
            return route
    return None
