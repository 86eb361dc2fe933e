"""`GET /v1/status`: what the agent knows about itself, from small providers, each one section of the answer.

The built-in sections (model, routes, device, counters) read the dispatcher; the process adds its own providers
(policy, MQTT, tasks, local bridge) through `install(app, providers)`. A provider that raises does not take the
endpoint down: the answer lists it under `errors`, the failure is logged with its traceback and counted under
`status_errors` in `route_counts`.

The cloud route's `state` tells apart `unknown` (no call yet), `serving`, `unreachable` (transport), `not_serving`
(the gateway answers but says its upstream cannot serve) and `refused` (it refused this device's token), with `why`
in the gateway's words; `reachable`, `serving` and `refused` are what the router sees now (the breaker's view).

`queue` (also under `routes.queue`) is the offline queue's own figures; `slots_waiting` is the other, distinct
thing: requests waiting in memory for a local model slot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from nanofleet.agent.api.dispatch import Dispatcher

StatusProvider = Callable[[], dict[str, Any]]
log = logging.getLogger("nanofleet.agent.api")


def model_section(dispatcher: Dispatcher) -> dict[str, Any]:
    models = dispatcher.models
    st = models.status()
    guard = getattr(models, "ram_guard", None)  # a local bridge has no RAM of ours to guard
    return {"model": {"name": st.name, "availability": st.availability, "progress": round(st.progress, 4),
                      "loaded": st.loaded, "reason": st.reason, "tokens_per_s": round(st.tokens_per_s, 1),
                      "context_window": st.context_window, "slots": st.n_parallel,
                      "keep_alive": models.spec.keep_alive,
                      "ram_guard": guard.status() if guard is not None else {"state": "not_applicable", "why": None,
                                                                              "errors": 0}}}


def cloud_route(dispatcher: Dispatcher) -> dict[str, Any]:
    cloud: Any = dispatcher.cloud
    conn = dispatcher.connectivity()
    if cloud is None:
        return {"configured": False, "state": "none", "why": "no gateway configured", "reachable": False,
                "serving": False, "refused": False, "circuit_open": False, "tokens_today": 0, "retry_in": 0.0}
    state = str(getattr(cloud, "state", "serving" if getattr(cloud, "reachable", True) else "unreachable"))
    # `state`/`why`: the last call's outcome; the booleans: what the router sees now (once the breaker's cooldown
    # has passed, a probe call may go: reachable and serving again until it fails)
    return {"configured": True, "state": state, "why": getattr(cloud, "why", "") or None,
            "reachable": conn.gateway_reachable, "serving": conn.gateway_serving,
            "refused": conn.gateway_refused, "circuit_open": conn.circuit_open,
            "tokens_today": conn.cloud_tokens_used_today,
            "retry_in": round(float(getattr(cloud, "retry_in", 0.0) or 0.0), 1)}


def queue_route(dispatcher: Dispatcher) -> dict[str, Any]:
    """The offline queue as the store sees it (availability, depth, oldest age, bytes, limits, counters)."""
    if dispatcher.queue is None:
        return {"available": False, "reason": "this agent has no offline queue", "depth": 0}
    return dispatcher.queue.status()


def routes_section(dispatcher: Dispatcher) -> dict[str, Any]:
    st = dispatcher.models.status()
    adm = dispatcher.admission
    queue = queue_route(dispatcher)
    return {
        "routes": {
            "local": {"healthy": st.availability != "unavailable" and not st.reason, "reason": st.reason},
            "cloud": cloud_route(dispatcher),
            "queue": queue,
        },
        "queue": queue,
        "slots_waiting": adm.waiting,
        "concurrency": {"active": adm.active, "waiting": adm.waiting, "slots": adm.slots,
                        "max_waiting": adm.max_waiting},
    }


def device_section(dispatcher: Dispatcher) -> dict[str, Any]:
    dev = dispatcher.device()
    return {"device": {"thermal_level": dev.thermal_level, "ram_available_mb": dev.ram_available_mb,
                       "battery_pct": dev.battery_pct, "charging": dev.charging, "metered": dev.metered},
            "policy_version": dispatcher.policy.version}


def install(app: FastAPI, providers: list[StatusProvider] | None = None) -> None:
    """Add `GET /v1/status` to `app`; `app.state.status_providers` may be extended later (the process does)."""
    from nanofleet.agent.api.app import JsonAnswer

    dispatcher: Dispatcher = app.state.dispatcher
    app.state.status_providers = [lambda: model_section(dispatcher), lambda: routes_section(dispatcher),
                                  lambda: device_section(dispatcher), *(providers or [])]

    @app.get("/v1/status", tags=["nanofleet"],
             summary="Model availability, route health (reachable / serving / refused), MQTT, policy, device")
    async def status() -> Response:
        body: dict[str, Any] = {}
        for provider in app.state.status_providers:
            try:
                body.update(provider())
            except Exception as exc:  # one broken section must not hide the others: logged, counted, shown
                dispatcher.counts["status_errors"] += 1
                log.error("a /v1/status provider failed", exc_info=exc)
                body.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
        body["route_counts"] = dict(dispatcher.counts)
        body["sessions"] = len(app.state.sessions)
        return JsonAnswer(body, "agent", "status")
