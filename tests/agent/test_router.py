"""The pure router: examples for each rule, and hypothesis for the invariants over every input combination."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nanofleet.agent.router import (
    MODES,
    AppRule,
    Connectivity,
    Decision,
    DeviceState,
    Policy,
    RouteRequest,
    decide,
    next_route,
)
from nanofleet.protos import fleet_pb2

UP = Connectivity(gateway_configured=True, gateway_reachable=True)
OK = DeviceState()

requests = st.builds(RouteRequest, mode=st.sampled_from([None, *MODES]), sensitive=st.booleans(),
                     queue_allowed=st.booleans(), prompt_tokens=st.integers(0, 20_000),
                     app_id=st.sampled_from(["", "notes", "other"]))
policies = st.builds(Policy, prefer=st.sampled_from(["local", "cloud"]), cloud_allowed=st.booleans(),
                     thermal_limit=st.integers(1, 6), min_free_ram_mb=st.integers(0, 4096),
                     battery_floor_pct=st.integers(0, 100), metered_local_only=st.booleans(),
                     max_local_prompt_tokens=st.integers(1, 10_000), cloud_tokens_per_day=st.integers(0, 1000),
                     apps=st.sampled_from([{}, {"notes": AppRule(privacy="sensitive")},
                                           {"notes": AppRule(mode="cloud_only")}]))
devices = st.builds(DeviceState, thermal_level=st.integers(0, 6), ram_available_mb=st.integers(0, 8192),
                    battery_pct=st.none() | st.floats(0, 100), charging=st.none() | st.booleans(),
                    metered=st.booleans(),
                    model_availability=st.sampled_from(["unavailable", "downloadable", "downloading", "available"]),
                    model_refused=st.booleans())
conns = st.builds(Connectivity, gateway_configured=st.booleans(), gateway_reachable=st.booleans(),
                  circuit_open=st.booleans(), cloud_tokens_used_today=st.integers(0, 2000),
                  gateway_serving=st.booleans(), gateway_refused=st.booleans())


def routes(d: Decision) -> set[str]:
    return {d.route, *d.fallbacks}


@given(requests, policies, devices, conns)
def test_sensitive_and_local_only_never_reach_the_cloud(req, policy, dev, conn) -> None:
    d = decide(req, policy, dev, conn)
    sensitive = req.sensitive or policy.apps.get(req.app_id, AppRule()).privacy == "sensitive"
    if sensitive or req.mode == "local_only":
        assert "cloud" not in routes(d)


@given(requests, policies, devices, conns)
def test_cloud_denied_policy_never_yields_cloud(req, policy, dev, conn) -> None:
    if not policy.cloud_allowed:
        assert "cloud" not in routes(decide(req, policy, dev, conn))


def test_a_zero_cloud_budget_means_no_cloud() -> None:
    """0 tokens a day means no cloud (the gateway reads fleet.yaml the same way); there is no "unlimited"."""
    for mode in ("cloud_only", "prefer_cloud"):
        d = decide(RouteRequest(mode=mode), Policy(cloud_tokens_per_day=0), OK, UP)
        assert "cloud" not in routes(d)
    zero = decide(RouteRequest(mode="cloud_only"), Policy(cloud_tokens_per_day=0), OK, UP)
    assert (zero.reason, zero.permanent) == ("cloud_denied", True)  # waiting for tomorrow would not help
    spent = decide(RouteRequest(mode="cloud_only"), Policy(cloud_tokens_per_day=10), OK,
                   Connectivity(gateway_configured=True, gateway_reachable=True, cloud_tokens_used_today=10))
    assert (spent.reason, spent.permanent) == ("cloud_budget_exhausted", False)
    assert decide(RouteRequest(mode="cloud_only"), Policy(cloud_tokens_per_day=1), OK, UP).route == "cloud"


@given(requests, policies, devices, conns)
def test_decision_is_well_formed(req, policy, dev, conn) -> None:
    d = decide(req, policy, dev, conn)
    assert d.route in ("local", "cloud", "queue", "reject")
    assert d.reason
    assert d.route not in d.fallbacks
    assert set(d.fallbacks) <= {"local", "cloud"}
    if d.route == "queue":
        assert req.queue_allowed
    if "cloud" in routes(d):
        assert conn.gateway_configured and conn.gateway_reachable and not conn.circuit_open
    if "local" in routes(d):
        assert dev.thermal_level < policy.thermal_limit and dev.model_availability != "unavailable"


IDEAL_DEVICE = DeviceState()


@given(requests, policies, devices, conns)
def test_permanent_exactly_when_no_change_of_conditions_could_open_a_route(req, policy, dev, conn) -> None:
    """4xx (permanent) vs 503 + Retry-After: waiting helps iff the same request under the same policy would be served
    once the device and the connection were at their best (a gateway that is not configured stays unconfigured)."""
    d = decide(req, policy, dev, conn)
    if d.route in ("local", "cloud"):
        assert not d.permanent
        return
    best = decide(req, policy, IDEAL_DEVICE, Connectivity(conn.gateway_configured, True))
    assert d.permanent == (best.route not in ("local", "cloud")), (d, best)
    if d.permanent:
        assert d.route == "reject" and best.permanent


@given(st.lists(st.sampled_from(["local", "cloud"]), unique=True, max_size=2), st.integers(0, 100),
       st.lists(st.sampled_from(["local", "cloud"]), max_size=2))
def test_no_fallback_after_the_first_token(fallbacks, tokens, tried) -> None:
    d = Decision("local", "x", tuple(f for f in fallbacks if f != "local"))
    nxt = next_route(d, ("local", *tried), tokens)
    if tokens > 0:
        assert nxt is None
    elif nxt is not None:
        assert nxt in d.fallbacks and nxt not in tried


def test_examples() -> None:
    p = Policy()
    assert decide(RouteRequest(), p, OK, UP) == Decision("local", "prefer_local", ("cloud",))
    assert decide(RouteRequest(), p, OK, Connectivity()) == Decision("local", "prefer_local", ())
    hot = DeviceState(thermal_level=3)
    assert decide(RouteRequest(), p, hot, UP) == Decision("cloud", "thermal_severe")
    assert decide(RouteRequest(sensitive=True), p, hot, UP) == Decision("queue", "thermal_severe")
    assert decide(RouteRequest(sensitive=True, queue_allowed=False), p, hot, UP).route == "reject"
    assert decide(RouteRequest(mode="cloud_only", sensitive=True), p, OK, UP) == Decision("reject", "sensitive",
                                                                                       permanent=True)
    # the gateway away: cloud_only waits (queue), it is not refused for good
    down = Connectivity(gateway_configured=True, gateway_reachable=False, circuit_open=True)
    assert decide(RouteRequest(mode="cloud_only"), p, OK, down) == Decision("queue", "gateway_unreachable")
    assert decide(RouteRequest(mode="cloud_only", queue_allowed=False), p, OK, down) == Decision(
        "reject", "gateway_unreachable")
    # too large for local and the gateway away: the block that can pass is the one reported
    assert decide(RouteRequest(prompt_tokens=7000), p, OK, down) == Decision("queue", "gateway_unreachable")
    assert decide(RouteRequest(prompt_tokens=7000), p, OK, Connectivity()) == Decision(
        "reject", "prompt_too_large", permanent=True)
    assert decide(RouteRequest(mode="cloud_only"), Policy(cloud_allowed=False), OK, UP) == Decision(
        "reject", "cloud_denied", permanent=True)
    assert decide(RouteRequest(mode="prefer_cloud"), p, OK, UP) == Decision("cloud", "prefer_cloud", ("local",))
    low = DeviceState(battery_pct=5, charging=False)
    assert decide(RouteRequest(), p, low, UP).route == "cloud"
    assert decide(RouteRequest(), p, DeviceState(ram_available_mb=100), UP) == Decision("cloud", "low_ram")
    assert decide(RouteRequest(prompt_tokens=7000), p, OK, UP).reason == "prompt_too_large"
    assert decide(RouteRequest(), p, DeviceState(metered=True, thermal_level=5), UP).reason == "thermal_emergency"
    assert decide(RouteRequest(), p, DeviceState(model_availability="downloading"), UP).route == "cloud"
    assert decide(RouteRequest(mode="local_only"), p, DeviceState(model_availability="downloading"), UP).route == \
        "local"
    apps = Policy(apps={"notes": AppRule(privacy="sensitive")})
    assert decide(RouteRequest(app_id="notes", mode="cloud_only"), apps, OK, UP).route == "reject"


def test_policy_from_proto() -> None:
    proto = fleet_pb2.RoutingPolicy(version=7, prefer="cloud", cloud_allowed=False, thermal_limit=2,
                                    min_free_ram_mb=256, metered_network="allowed", max_local_prompt_tokens=100,
                                    apps={"notes": fleet_pb2.AppPolicy(privacy="sensitive")})
    p = Policy.from_proto(proto)
    assert (p.version, p.prefer, p.cloud_allowed, p.thermal_limit, p.metered_local_only) == (7, "cloud", False, 2,
                                                                                              False)
    assert p.apps["notes"].privacy == "sensitive"
    assert decide(RouteRequest(), p, OK, UP).route == "local"  # cloud denied: prefer=cloud cannot apply


def test_a_gateway_that_answers_but_cannot_serve_or_refuses_is_not_called_unreachable() -> None:
    p, ok = Policy(), DeviceState()
    not_serving = Connectivity(gateway_configured=True, gateway_reachable=True, circuit_open=True,
                               gateway_serving=False)
    refused = Connectivity(gateway_configured=True, gateway_reachable=True, circuit_open=True, gateway_refused=True)
    assert decide(RouteRequest(mode="cloud_only"), p, ok, not_serving) == Decision("queue", "cloud_not_serving")
    assert decide(RouteRequest(mode="cloud_only"), p, ok, refused) == Decision("queue", "cloud_refused")
    # prefer_cloud still falls back to the local model, with the cloud's reason
    assert decide(RouteRequest(mode="prefer_cloud"), p, ok, not_serving) == Decision("local", "cloud_not_serving")
    # neither is permanent: a restored upstream or a re-issued token opens the route again
    assert not decide(RouteRequest(mode="cloud_only", queue_allowed=False), p, ok, refused).permanent
    # sensitive and cloud-denied still come first
    assert decide(RouteRequest(mode="cloud_only"), Policy(cloud_allowed=False), ok, refused).reason == "cloud_denied"


def test_charging_unknown_is_no_battery_rule_without_a_battery_and_unplugged_with_one() -> None:
    p = Policy(battery_floor_pct=20)
    assert decide(RouteRequest(), p, DeviceState(battery_pct=None, charging=None), UP) == Decision(
        "local", "prefer_local", ("cloud",))
    assert decide(RouteRequest(), p, DeviceState(battery_pct=10, charging=None), UP).reason == "battery_low"
    assert decide(RouteRequest(), p, DeviceState(battery_pct=10, charging=True), UP).route == "local"
