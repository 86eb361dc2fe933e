"""Child processes for `nanofleet up`: started in order, each waited on until ready, stopped in reverse order.

Every child is restarted when it dies, after a growing delay (`nanofleet.backoff`), like systemd's
Restart=on-failure with StartLimitBurst: only Ctrl-C/SIGTERM, or a child crashing `max_crashes` times within
`crash_window_s`, stops them all. A controller killed with -9 must not take the device agent down with it.
Children get PR_SET_PDEATHSIG so they die with the supervisor even after a `kill -9` of it: no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nanofleet.backoff import Backoff

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: best effort
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class StartError(RuntimeError):
    """A child failed to start or to become ready; the message names it and quotes its log."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 60.0
    stop_timeout: float = 10.0
    restart_delay: float = 1.0  # first delay before a restart; it grows with each crash (nanofleet.backoff), max 60 s
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent deaths
    pid_file: Path | None = None  # kept up to date across restarts (the broker's: `nanofleet enroll` SIGHUPs it)

    log_start: int = 0  # where this run's output begins in the (appended) log

    def spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.log_start = out.tell()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True, preexec_fn=_die_with_parent,
            )
        if self.pid_file is not None:
            self.pid_file.write_text(str(self.proc.pid))

    def start(self) -> None:
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with code {self.proc.returncode} while starting:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} was not ready after {self.ready_timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after `stop_timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        """What the current run has written to the log (earlier runs' lines are left out)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_start)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        text = self.output().splitlines()
        return "\n".join(f"  | {line}" for line in text[-lines:]) or "  (no output)"


def tcp_open(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def http_ok(url_path: str, *, host: str = "", port: int = 0, uds: str | None = None) -> Callable[[], bool]:
    """GET url_path over TCP or a unix socket answers 2xx."""

    def check() -> bool:
        try:
            if uds:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(1)
                s.connect(uds)
            else:
                s = socket.create_connection((host, port), timeout=1)
            with s:
                s.sendall(f"GET {url_path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                status = s.recv(64).split(b" ", 2)
            return len(status) > 1 and status[1].startswith(b"2")
        except OSError:
            return False

    return check


class Supervisor:
    def __init__(self, *, max_crashes: int = 5, crash_window_s: float = 60.0) -> None:
        self.children: list[Child] = []
        self.max_crashes, self.crash_window_s = max_crashes, crash_window_s
        self._stop_signal: int | None = None

    def start(self, child: Child) -> None:
        self.children.append(child)
        child.start()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop_signal = signum

    def install_signals(self) -> None:
        """Take SIGINT/SIGTERM/SIGHUP from now on (before the children start: a signal during start-up is kept and
        `wait()` returns at once, instead of killing this process with its children left behind)."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def request_stop(self) -> None:
        """Make `wait()` return None, as Ctrl-C does (for a caller on another thread)."""
        self._stop_signal = signal.SIGTERM

    def wait(self, report: Callable[[str], None] = print, *, install_signals: bool = True) -> Child | None:
        """Block until SIGINT/SIGTERM (returns None) or until a child crashed `max_crashes` times within
        `crash_window_s` (returns it). Every other death is reported and followed by a restart after a growing
        delay; a child that then stays up for a whole window starts its count (and its delay) afresh."""
        if install_signals:
            self.install_signals()
        restart_at: dict[str, float] = {}
        backoffs = {c.name: Backoff(c.restart_delay, 60.0) for c in self.children}
        while self._stop_signal is None:
            now = time.monotonic()
            for child in self.children:
                if child.alive():
                    if child.crashes and now - child.crashes[-1] > self.crash_window_s:
                        child.crashes.clear()
                        backoffs[child.name].reset()
                    continue
                if child.name not in restart_at:
                    child.crashes = [t for t in child.crashes if now - t <= self.crash_window_s] + [now]
                    code = child.proc.returncode if child.proc else None
                    if len(child.crashes) >= self.max_crashes:
                        report(f"{child.name} exited (code {code}): {len(child.crashes)} crashes within "
                               f"{self.crash_window_s:.0f}s, giving up")
                        return child
                    delay = backoffs[child.name].next()
                    restart_at[child.name] = now + delay
                    report(f"{child.name} exited (code {code}); restarting in {delay:.1f}s "
                           f"(crash {len(child.crashes)} of {self.max_crashes} within {self.crash_window_s:.0f}s "
                           "stops everything)")
                elif now >= restart_at[child.name]:
                    del restart_at[child.name]
                    child.restarts += 1
                    child.spawn()
                    report(f"{child.name} restarted (pid {child.proc.pid if child.proc else '?'})")
            time.sleep(0.1)
        return None

    def stop_all(self) -> dict[str, int | None]:
        """Stop children in reverse start order (agents first, so they publish their shutdown status)."""
        return {child.name: child.stop() for child in reversed(self.children)}
