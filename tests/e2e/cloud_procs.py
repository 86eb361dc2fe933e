"""Real processes for the cloud-route end-to-end test: `nanofleet gateway serve` and `nanofleet agent`, each with
its own log file, started from files the test writes (fleet.yaml, agent.yaml), stopped by their own pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.conftest import wait_for

# Environment variables that would change what the processes under test do; the test sets what it needs itself.
_SCRUB = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "XDG_RUNTIME_DIR")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("NANOFLEET_")}
    env.update(extra)
    return env


@dataclass
class Proc:
    """One `python -m nanofleet …` child. `ready` is a line fragment its log prints once it serves."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready: str
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> Proc:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "nanofleet", *self.argv], stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _this_run(self) -> str:
        return self.output().rpartition(f"--- start {self.starts}\n")[2]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> Proc:
        wait_for(lambda: self.ready in self._this_run() or not self.alive(), timeout=timeout,
                 what=f"{self.name} to print {self.ready!r}")
        assert self.alive(), f"{self.name} exited ({self.proc and self.proc.returncode}):\n{self.output()}"
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL past `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def write_fleet(path: Path, fake_base_url: str, listen: str) -> Path:
    """A fleet where group `clinic-tablets` may not use the cloud; the gateway's upstream is the fake Gemini."""
    fleet: dict[str, Any] = {
        "fleet": "e2e",
        "gateway": {
            "listen": listen,
            "upstream": {"kind": "gemini", "model": "gemini-2.5-flash", "base_url": fake_base_url,
                         "api_key_env": "GEMINI_API_KEY", "thinking_budget": 0, "timeout": "5s", "max_retries": 0},
            "prices_per_million": {"gemini-2.5-flash": {"input": 0.30, "output": 2.50}},
        },
        "defaults": {"routing": {"cloud": "allowed", "cloud_budget": {"tokens_per_day": 1_000_000}}},
        "groups": {"clinic-tablets": {"routing": {"cloud": "denied"}}},
        "devices": {"phone-1": {}},
    }
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    return path


def gateway_proc(folder: Path, fleet: Path, data_dir: Path, port: int, api_key: str) -> Proc:
    argv = ["gateway", "serve", "--config", str(fleet), "--data-dir", str(data_dir),
            "--listen", f"127.0.0.1:{port}", "--grace", "1"]
    return Proc("gateway", argv, clean_env(GEMINI_API_KEY=api_key), folder / "gateway.log", "gateway listening on")


@dataclass
class Agent:
    device_id: str
    socket: Path
    proc: Proc
    settings: Mapping[str, Any] = field(default_factory=dict)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent",
                            timeout=timeout)


def agent_proc(folder: Path, device_id: str, gateway_address: str, token: str, model_file: Path) -> Agent:
    """`nanofleet agent` without MQTT (broker_url null: its policy stays the default) and an empty sysfs tree, so
    the device looks cool, plugged in and unmetered whatever machine runs the test."""
    home = folder / device_id
    (home / "sysfs").mkdir(parents=True, exist_ok=True)
    sock = folder / "run" / f"{device_id}.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "fleet": "e2e", "device_id": device_id, "data_dir": str(home / "data"), "socket_path": str(sock),
        "broker_url": None, "gateway_address": gateway_address, "gateway_token": token,
        "model": {"source": f"file:{model_file}", "keep_alive": -1, "n_ctx": 512},
        "sysfs_root": str(home / "sysfs"),
    }
    config = home / "agent.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    proc = Proc(f"agent {device_id}", ["agent", "--config", str(config)], clean_env(), home / "agent.log",
                "serving on unix:")
    return Agent(device_id, sock, proc, settings)
