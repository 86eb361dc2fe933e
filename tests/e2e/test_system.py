"""The whole system on one machine, as `make run` starts it: real mosquitto, controller, gateway, agent and model.

One `nanofleet up` for the module; the tests run in file order (request → dashboard → kill -9 → shutdown).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


@dataclass
class System:
    proc: subprocess.Popen[str]
    state: Path
    socket: Path
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines)

    def find(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.output())

    @property
    def dashboard(self) -> str:
        m = self.find(r"dashboard:\s+(http://127\.0\.0\.1:\d+)/")
        assert m, self.output()
        return m.group(1)

    @property
    def token(self) -> str:
        m = self.find(r"operator token: (\S+)")
        assert m, f"no operator token in:\n{self.output()}"
        return m.group(1)

    def api(self, path: str) -> httpx.Response:
        return httpx.get(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)

    def agent(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent", timeout=30)

    def agent_process(self) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "agent" in child.cmdline() and "--config" in child.cmdline():
                return child
        raise AssertionError("no agent process under nanofleet up")


@contextlib.contextmanager
def launch(tmp: Path, *args: str) -> Iterator[System]:
    """`nanofleet up` on free ports with a 1 s telemetry interval; yields once it printed its summary."""
    fleet = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    fleet["defaults"]["telemetry_interval_s"] = 1
    (tmp / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    env = {k: v for k, v in os.environ.items() if k != "GEMINI_API_KEY"}
    sock = tmp / "run" / "agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanofleet", "up", "--config", str(tmp / "fleet.yaml"), "--state-dir",
         str(tmp / "state"), "--free-ports", "--socket", str(sock), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp,
    )
    system = System(proc, tmp / "state", sock)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            system.lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        wait_for(lambda: "Ctrl-C stops everything." in system.output() or proc.poll() is not None, timeout=180,
                 what="nanofleet up to print its summary")
        assert proc.poll() is None, f"nanofleet up exited:\n{system.output()}"
        yield system
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with launch(tmp_path_factory.mktemp("up"), "--restart-delay", "3", "--simulate", "3") as system:
        yield system


def test_up_prints_where_everything_is(system: System) -> None:
    out = system.output()
    assert re.search(r"broker:\s+mosquitto \(", out), out
    assert "gateway:" in out and "dashboard: " in out and f"socket:     {system.socket}" in out
    assert system.socket.exists() and (system.socket.stat().st_mode & 0o777) == 0o660
    # the agent generated the tiny GGUF and loaded it at start (preload), before any request
    with system.agent() as agent:
        model = wait_for(lambda: (m := agent.get("/v1/status").json()["model"])["loaded"] and m, timeout=30,
                         what="the model loaded at start")
    assert model["availability"] == "available" and model["name"] == "tiny-test"
    assert "local" not in agent_routes(system)


def agent_routes(system: System) -> dict[str, int]:
    with system.agent() as agent:
        return {k: v for k, v in agent.get("/v1/status").json()["route_counts"].items() if v}


def test_a_prompt_through_the_socket_is_answered_by_the_local_model(system: System) -> None:
    with system.agent() as agent:
        r = agent.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello"}],
                                                     "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.headers["x-nanofleet-route"] == "local"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert 0 < body["usage"]["completion_tokens"] <= 16


def test_streaming_returns_sse_chunks_ending_in_done(system: System) -> None:
    with system.agent() as agent, agent.stream(
        "POST", "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-nanofleet-route"] == "local"
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_the_printed_curl_line_works_as_printed(system: System) -> None:
    line = next(ln.strip() for ln in system.lines if ln.strip().startswith("curl --unix-socket"))
    out = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["role"] == "assistant"


def test_the_controller_shows_the_device_online_with_telemetry(system: System) -> None:
    assert httpx.get(system.dashboard + "/api/devices", timeout=10).status_code == 401  # nothing open
    device = wait_for(lambda: next((d for d in system.api("/api/devices").json()["items"]
                                    if d["device_id"] == "dev-01" and d["state"] == "online"), None),
                      timeout=30, what="dev-01 online in the controller")
    assert device["ram_total_mb"] > 0
    points = wait_for(lambda: (p := system.api("/api/devices/dev-01/telemetry").json()["points"]) and len(p) >= 2
                      and p, timeout=30, what="two telemetry rows stored")
    assert all(p["ram_available_mb"] > 0 and p["cpu_percent"] is not None for p in points)
    page = httpx.get(system.dashboard + "/devices", headers={"Authorization": f"Bearer {system.token}"},
                     timeout=10)
    assert page.status_code == 200 and "dev-01" in page.text


def test_simulated_devices_join_with_their_own_broker_accounts(system: System) -> None:
    wanted = {"sim-0000", "sim-0001", "sim-0002"}
    wait_for(lambda: wanted <= {d["device_id"] for d in system.api("/api/devices").json()["items"]
                              if d["state"] == "online"},
             timeout=30, what="three simulated devices online")
    assert "and 3 simulated devices" in system.output()
    accounts = json.loads((system.state / "broker" / "accounts.json").read_text())
    assert len({accounts[d]["password"] for d in wanted}) == 3, "simulated devices share one broker password"


def test_kill_9_of_the_agent_shows_offline_then_the_supervisor_restarts_it(system: System) -> None:
    agent = system.agent_process()
    agent.send_signal(signal.SIGKILL)
    wait_for(lambda: system.api("/api/devices/dev-01").json()["state"] == "offline", timeout=10,
             what="dev-01 offline (last will) after kill -9")
    wait_for(lambda: system.api("/api/devices/dev-01").json()["state"] == "online", timeout=60,
             what="dev-01 back online after the supervisor restarted it")
    assert system.agent_process().pid != agent.pid


def test_kill_9_of_the_controller_restarts_it_while_the_agent_keeps_answering(system: System) -> None:
    """It used to stop everything ("stopping the rest"): the agent and the simulator went down with it."""
    def controller_process() -> psutil.Process | None:
        for child in psutil.Process(system.proc.pid).children(recursive=True):
            try:  # the killed one is a zombie (or gone) until `up` reaps it: no cmdline to read then
                cmd = child.cmdline()
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
            if "controller" in cmd and "--config" in cmd and child.status() != psutil.STATUS_ZOMBIE:
                return child
        return None

    before = controller_process()
    assert before is not None
    agent_pid = system.agent_process().pid
    before.send_signal(signal.SIGKILL)
    answers: list[int] = []
    with system.agent() as agent:
        def back() -> bool:
            answers.append(agent.get("/v1/status").status_code)
            now = controller_process()
            if now is None or now.pid == before.pid:
                return False
            try:
                return httpx.get(system.dashboard + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(back, timeout=60, interval=0.2, what="the controller restarted and healthy")
    assert set(answers) == {200}, "the agent's socket stopped answering while the controller was down"
    assert system.agent_process().pid == agent_pid and system.proc.poll() is None
    assert "controller exited (code -9); restarting in" in system.output()
    wait_for(lambda: system.api("/api/devices/dev-01").json()["state"] == "online", timeout=60,
             what="dev-01 online in the restarted controller")


def test_sigterm_stops_every_child_and_removes_the_socket(system: System) -> None:
    children = psutil.Process(system.proc.pid).children(recursive=True)
    assert len(children) >= 4
    system.proc.send_signal(signal.SIGTERM)
    assert system.proc.wait(60) == 0, system.output()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphans: {[p.cmdline() for p in alive]}"
    assert not system.socket.exists()
    assert "stopped:" in system.output()


def test_without_mosquitto_the_embedded_amqtt_broker_carries_the_same_closed_setup(tmp_path: Path) -> None:
    with launch(tmp_path, "--broker", "amqtt") as amqtt_system:
        assert re.search(r"broker:\s+embedded amqtt on 127\.0\.0\.1:\d+", amqtt_system.output())
        with amqtt_system.agent() as agent:
            r = agent.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4})
        assert r.status_code == 200 and r.headers["x-nanofleet-route"] == "local"
        wait_for(lambda: any(d["device_id"] == "dev-01" and d["state"] == "online"
                             for d in amqtt_system.api("/api/devices").json()["items"]),
                 timeout=30, what="dev-01 online through amqtt (device account + ACL)")
        wait_for(lambda: len(amqtt_system.api("/api/devices/dev-01/telemetry").json()["points"]) >= 1,
                 timeout=30, what="telemetry through amqtt")


def test_a_child_crashing_at_once_again_and_again_stops_up_with_a_clear_message(tmp_path: Path) -> None:
    """Here the simulator cannot write its run counter (a folder sits where the file goes): it exits at once, each
    time. `up` restarts it with growing delays, then gives up, says why and exits 1 — not a silent loop."""
    (tmp_path / "state" / "sim" / "sim_state.json").mkdir(parents=True)
    with launch(tmp_path, "--simulate", "1", "--restart-delay", "0.1") as system:
        assert system.proc.wait(120) == 1, system.output()
        out = system.output()
    assert out.count("simulator (1 devices) exited (code 1); restarting in") == 4, out
    assert "simulator (1 devices) crashed 5 times within 60s (last exit code 1); its log ends:" in out
    assert "cannot keep the run counter" in out and "Traceback" not in out
    assert "stopping everything." in out and "stopped: " in out


def test_up_on_a_postgresql_store_keeps_the_fleet_there(tmp_path: Path, pg_url: str) -> None:
    """`nanofleet up --store postgresql://…`: the controller's devices and telemetry (in a day partition), and the
    device's gateway token the gateway checks, all in that database; the controller leads (the one controller)."""
    from nanofleet.controller.gateway.auth import token_is_active
    from nanofleet.pg_db import connect
    from nanofleet.store_url import resolve

    with launch(tmp_path, "--store", pg_url, "--simulate", "2") as pg_system:
        assert "password" not in pg_system.output() and f"store:      {pg_url}" in pg_system.output()
        wait_for(lambda: pg_system.api("/healthz").json().get("leader") is True, timeout=30, what="the leader")
        conn = connect(pg_url)
        try:
            wait_for(lambda: conn.execute("SELECT count(*) FROM telemetry WHERE device_id = 'dev-01'").fetchone()[0]
                     >= 2, timeout=60, what="dev-01's telemetry in PostgreSQL")
            parts = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'telemetry_%'")]
            assert parts and all(re.fullmatch(r"telemetry_\d{8}", p) for p in parts)
            wait_for(lambda: conn.execute("SELECT count(*) FROM devices").fetchone()[0] >= 3, timeout=60,
                     what="dev-01 and the two simulated devices in PostgreSQL")
        finally:
            conn.close()
        agent_yaml = yaml.safe_load((tmp_path / "state" / "devices" / "dev-01" / "agent.yaml").read_text())
        assert token_is_active(resolve(pg_url, tmp_path, "gateway.db"), agent_yaml["gateway_token"])
        assert not (tmp_path / "state" / "controller" / "controller.db").exists()
