"""A throwaway PostgreSQL server in a folder (`initdb` + `pg_ctl`), for the tests and benchmarks of the PostgreSQL
store: the distribution's server binaries, a private socket folder, loopback TCP on a free port, trust auth for
the one local user. Never for production (it trusts every local connection and runs with fsync off when asked).

`initdb` refuses to run as root: as root the server runs as the distribution's `postgres` user (Debian's package
creates it), its folder handed to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql (Debian), then run again"


class PgServerError(RuntimeError):
    """The throwaway server could not be set up or started; the message says why and what to install."""


def bindir() -> Path:
    """The folder of `initdb` and `pg_ctl`: Debian keeps them off PATH, in /usr/lib/postgresql/<major>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise PgServerError(f"PostgreSQL's server programs (initdb, pg_ctl) are not installed: {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """`start()` makes and starts a server; `url(db)` names a database on it; `create_database()` makes a fresh one;
    `stop()` stops it and removes the folder."""

    def __init__(self, root: str | Path | None = None, *, fsync: bool = False, max_connections: int = 200) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="nanofleet-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.fsync = fsync
        self.max_connections = max_connections
        self.user = "postgres"
        self._as: list[str] = []
        self._n = 0
        self.started = False

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*self._as, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout
            raise PgServerError(f"{Path(args[0]).name} failed ({proc.returncode}): {detail}")

    def start(self) -> PgServer:
        bins = bindir()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PgServerError(f"running as root needs the 'postgres' user: {INSTALL_HINT}") from exc
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run(str(bins / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8",
                  "--no-instructions", "--locale=C", *(() if self.fsync else ("--no-sync",)))  # a throwaway
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections={self.max_connections}"
                f" -c fsync={'on' if self.fsync else 'off'} -c full_page_writes={'on' if self.fsync else 'off'}"
                " -c shared_buffers=128MB")
        self._run(str(bins / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w",
                  "-t", "60", "start")
        self.started = True
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its URL."""
        import psycopg

        self._n += 1
        name = name or f"t{os.getpid()}_{self._n}_{int(time.time() * 1000) % 100_000}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(PgServerError):  # already gone (a test killed it): the folder goes anyway
                self._run(str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
