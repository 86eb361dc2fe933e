"""Every route of the controller's web app refuses a caller without credentials — walked from `app.routes`, so a
route added later is held to it the day it lands — except the few that are open on purpose, named here with why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI, routing
from fastapi.routing import APIRoute

from nanofleet.config import parse_fleet
from nanofleet.controller.auth import ensure_operator_token
from nanofleet.controller.commands import CommandService
from nanofleet.controller.store import Store
from nanofleet.controller.web import create_app
from nanofleet.mqtt import MqttClient

# (method, path) -> why it answers without credentials
OPEN = {
    ("GET", "/healthz"): "load balancers and supervisors probe it; it names a dead part, never its error",
    ("GET", "/login"): "the form where an operator gives credentials",
    ("POST", "/login"): "checks the token it is given; same-origin checked; failures audited",
    ("POST", "/logout"): "only clears the cookie without a session; with one it checks CSRF before revoking it",
}
# answered 401 + JSON (a client that is not a browser, or a stream); every other path is a page: 303 to /login
JSON_PATHS = ("/api/", "/events", "/metrics", "/openapi.json", "/artifacts/")
# the routers create_app composes: the walk must have seen each (a router dropped from the app is a failure too)
MUST_COVER = {("GET", "/api/devices"), ("POST", "/api/devices/{device_id}/commands"), ("GET", "/events"),
              ("GET", "/api/alerts"), ("POST", "/api/alerts/{alert_id}/ack"), ("GET", "/api/audit"),
              ("GET", "/alerts"), ("POST", "/alerts/{alert_id}/ack"), ("GET", "/audit"), ("GET", "/metrics"),
              ("GET", "/"), ("POST", "/devices/{device_id}/commands"), ("GET", "/openapi.json")}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    _, token_hash = ensure_operator_token(tmp_path / "data")
    store = Store(tmp_path / "walk.db")
    commands = CommandService(MqttClient("mqtt://127.0.0.1:1"), "demo")  # never started: no handler is reached
    yield create_app(store, parse_fleet("fleet: demo\n"), operator_token_hash=token_hash, commands=commands,
                     usage_db=tmp_path / "usage.db")
    store.close()


def served(app: FastAPI) -> list[tuple[str, set[str], object]]:
    """(path, methods, route) of everything the app serves, included routers flattened with their prefixes
    (FastAPI >= 0.165 keeps an included router as one lazy entry of `app.routes`; this is how its OpenAPI walks
    them)."""
    return [(c.path, set(c.methods or ()), c.original_route) for c in routing.iter_route_contexts(app.routes)]


def concrete(path: str, route: APIRoute) -> str:
    """The route's path with each parameter filled with a value of its type (ids exist or not: auth comes first)."""
    for param in route.dependant.path_params:
        value = "1" if param.field_info.annotation is int else "pi-1"
        path = path.replace("{" + param.name + "}", quote(value))
    return path


async def unauthenticated_answers(app: FastAPI) -> dict[tuple[str, str], str]:
    """(method, route path) -> what is wrong with the answer to a caller without credentials ('' when right)."""
    found: dict[tuple[str, str], str] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
        for route_path, methods, route in served(app):
            if not isinstance(route, APIRoute):  # a Mount or plain Route would bypass FastAPI's dependencies
                found[("*", route_path)] = f"not an APIRoute: {type(route).__name__}"
                continue
            for method in sorted(methods):
                key, path = (method, route_path), concrete(route_path, route)
                if key in OPEN:
                    continue
                r = await c.request(method, path)
                if path.startswith(JSON_PATHS):
                    # a HEAD answer has no body to name the error in
                    ok = r.status_code == 401 and (method == "HEAD" or r.json().get("error") == "missing_token")
                    want = "401 missing_token"
                else:
                    ok = r.status_code == 303 and r.headers.get("location") == "/login?next=" + quote(path, safe="")
                    want = "303 to /login"
                found[key] = "" if ok else f"{method} {path}: {r.status_code} {r.text[:120]!r}, expected {want}"
    return found


async def test_every_route_but_the_open_ones_refuses_a_caller_without_credentials(app: FastAPI) -> None:
    answers = await unauthenticated_answers(app)
    assert answers.keys() >= MUST_COVER, MUST_COVER - answers.keys()
    assert [problem for problem in answers.values() if problem] == []
    routes = {(m, path) for path, methods, _ in served(app) for m in methods}
    assert set(OPEN) <= routes  # each exemption names a route that exists: no stale allowance
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as c:
        assert (await c.get("/healthz")).json() == {"ok": True}
        assert (await c.get("/login")).status_code == 200


async def test_the_walk_catches_a_route_that_forgot_its_auth_dependency(app: FastAPI) -> None:
    """The guard itself: a JSON route and a page added without `Authed` are both reported."""

    @app.get("/api/forgotten")
    def forgotten_api() -> dict[str, int]:
        return {"secret": 1}

    @app.post("/forgotten/{thing}")
    def forgotten_page(thing: str) -> dict[str, str]:
        return {"thing": thing}

    answers = await unauthenticated_answers(app)
    assert answers[("GET", "/api/forgotten")].startswith("GET /api/forgotten: 200")
    assert answers[("POST", "/forgotten/{thing}")].startswith("POST /forgotten/pi-1: 200")
    assert [k for k, problem in answers.items() if problem] == [("GET", "/api/forgotten"),
                                                                 ("POST", "/forgotten/{thing}")]
