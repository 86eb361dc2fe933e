"""Shared fixtures: a real Mosquitto broker on a free loopback port, the tiny GGUF, waiting on conditions.

`make test` runs the suite under pytest-xdist (`-n 2 --dist loadfile`): two worker processes, each running whole
files, each with its own session fixtures (broker, tiny GGUF, PostgreSQL server). Rules every test follows so it
passes on any worker, beside any other test, and beside another engineer's run of the suite on the same machine:
- Ports: `free_port()` or port 0, never a fixed number; files: `tmp_path`/`tmp_path_factory`, never a fixed /tmp
  path or the repository folder; env vars and the working folder: `monkeypatch` only.
- Names on the session's shared broker or PostgreSQL server: unique per test (fleet ids, client ids, `pg_url`).
- Waiting: `until()`/`wait_for()` on a condition with a deadline, never a fixed sleep; no wall-clock bound on work
  the machine's load decides (two workers share two cores with the processes the tests start).
- A file's tests run on one worker, in order, so a module-scoped fixture is set up once; files that have one run
  first (`pytest_collection_modifyitems` below). Nothing needs marking.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import psutil
import pytest
from hypothesis import settings

from nanofleet.agent.tiny_model import make_tiny_gguf
from nanofleet.broker import mosquitto_binary as find_mosquitto
from nanofleet.pg_server import PgServer, PgServerError
from nanofleet.tcp import free_port

# No per-example deadline for the whole suite: on a loaded 2-core CI machine hypothesis's default 200 ms deadline
# fails examples for being slow, not wrong. Examples stay random (no derandomize).
settings.register_profile("nanofleet", deadline=None)
settings.load_profile("nanofleet")


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> object:
    """Poll `predicate` until it returns something truthy; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


async def until(predicate: Callable[[], object], within: float = 10.0, what: str = "") -> object:
    """`wait_for` for async tests: poll without blocking the event loop the code under test runs on."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on `port` (an open port alone may be another process's)."""
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections("tcp"))
    except psutil.Error:
        return False


def mosquitto_binary() -> str:
    path = find_mosquitto()
    if path is None:
        raise RuntimeError("mosquitto is not installed: run `make test` (installs it) or apt-get install -y mosquitto")
    return path


class _Startable(Protocol):
    def start(self) -> _Startable: ...
    def stop(self) -> None: ...


_Server = TypeVar("_Server", bound=_Startable)


@dataclass
class Broker:
    """A real mosquitto on 127.0.0.1:port. `extra_conf` lines are appended (auth, ACL, limits)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    extra_conf: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Broker:
        conf = self.workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr", "log_type error",
                 "max_queued_messages 100000", "max_inflight_messages 20000"]
        if not any(line.startswith(("allow_anonymous", "password_file")) for line in self.extra_conf):
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines + self.extra_conf) + "\n")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not _listens(self.proc.pid, self.port):  # its own listener: the port may be someone else's by now
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not open its port within 10 s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


def _started(make: Callable[[], _Server], error: type[Exception], tries: int = 3) -> _Server:
    """`make().start()`, again on a new free port when it fails: a port `free_port()` found free can be taken before
    the server binds it (the other xdist worker, another run of the suite on the machine). The last error is raised."""
    for attempt in range(1, tries + 1):
        server = make()
        try:
            server.start()
            return server
        except error:
            server.stop()
            if attempt == tries:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One anonymous loopback mosquitto shared by the session (use unique fleet/device ids per test)."""
    b = _started(lambda: Broker(tmp_path_factory.mktemp("mosquitto")), RuntimeError)
    yield b
    b.stop()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """A private mosquitto per test, for tests that restart it or need auth/ACL lines."""
    started: list[Broker] = []

    def make(extra_conf: list[str] | None = None) -> Broker:
        b = Broker(tmp_path / f"broker{len(started)}", extra_conf=extra_conf or [])
        b.workdir.mkdir()
        started.append(b.start())
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture(params=["builtin", "paho"])
def reader(request: pytest.FixtureRequest) -> str:
    """The controller's ingest MQTT reader: the builtin one (the default) and paho; tests using it run both."""
    return request.param


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's tiny random-weight GGUF, generated once per test session."""
    return make_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-test.gguf")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL server for the session (initdb + pg_ctl in a temporary folder; `make test` installs
    the distribution's server when missing). Tests take a fresh database each: `pg_url`."""
    server = _started(PgServer, PgServerError)
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return pg_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on each backend (`store: {url: …}`): tests taking it run once on SQLite, once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_server").create_database())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files whose tests share a module-, class- or package-scoped fixture (a stack of processes, an installed venv:
    the slowest files) run first. `make test` hands whole files to the xdist workers in collection order (`--dist
    loadfile --no-loadscope-reorder`): started last, one of them would be the run's tail. (xdist's `loadgroup` would
    group finer, but with pytest 9.2 it silently groups nothing: pytest-xdist issue #1386.)"""
    shared = ("module", "class", "package")

    def stacked(item: pytest.Item) -> bool:
        info = getattr(item, "_fixtureinfo", None)
        return info is not None and any(d.scope in shared for defs in info.name2fixturedefs.values() for d in defs)

    first = {item.nodeid.split("::")[0] for item in items if stacked(item)}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in first)  # stable: files stay whole and in order
