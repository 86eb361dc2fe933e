"""Download a model file: resumable (HTTP Range), verified (sha256), atomic (never a half file under the final name).

Errors::

    ModelFileError             root
    └── DownloadError          HTTP error, gave up after retries, bad server answer
        ├── ChecksumMismatch   the bytes are not the ones the sha256 names; the partial file is deleted
        └── DownloadCancelled  asked to stop (the partial file stays)
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import httpx

from nanofleet.agent.errors import AgentError
from nanofleet.agent.models.files import human_size, part_path
from nanofleet.backoff import Backoff

_BACKOFF_CAP_S = 30.0

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)
Notice = Callable[[int, bool], None]  # (bytes already on disk, resumed: False when the server sent it all again)


class ModelFileError(AgentError):
    code = "model_file_error"


class DownloadError(ModelFileError):
    pass


class ChecksumMismatch(DownloadError):
    pass


class DownloadCancelled(DownloadError):
    """`cancel` was set: a newer update replaced this one (the partial file stays for a later resume)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def pull(
    url: str, dest: Path, sha256: str, *, progress: Progress | None = None, retries: int = 5,
    timeout: float = 30.0, backoff: float = 0.2, notice: Notice | None = None,
    headers: dict[str, str] | None = None, on_size: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Fetch `url` into `dest` unless it is already there. A cut connection resumes from the partial file, and so
    does a new call after the process died mid-download (the `.part` file stays); `notice` hears whether an
    attempt with bytes on disk resumed or the server ignored the Range. `headers`: e.g. the device token for the
    controller's artifact store. `on_size(bytes still to fetch)` is called once the server said the size, before any
    byte is written (it may raise, e.g. when the disk is too small); `cancel` stops between blocks."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    failures = 0
    delays = Backoff(backoff, _BACKOFF_CAP_S)  # the project's one rule (nanofleet.backoff): capped, with jitter
    with httpx.Client(timeout=timeout, follow_redirects=True, headers=headers) as client:
        while True:
            try:
                if _fetch(client, url, part, progress, notice, on_size, cancel):
                    break
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                failures += 1
                if failures > retries:
                    raise DownloadError(f"{url}: gave up after {failures} failed attempts: {exc}") from exc
                time.sleep(delays.next())
    got = sha256_file(part)
    if got != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {got}; download deleted")
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _fetch(client: httpx.Client, url: str, part: Path, progress: Progress | None, notice: Notice | None = None,
           on_size: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> bool:
    """One attempt; True when the server has sent everything. Raises transport errors for the retry loop."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as r:
        if r.status_code == 416 and offset:  # nothing left to send: the partial file is whole (the hash decides)
            return True
        if r.status_code == 200:
            if offset and notice:
                notice(offset, False)  # the server ignored the Range: said, not silently started over
            offset = 0
        elif r.status_code == 206:
            start = r.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                raise DownloadError(f"{url}: server resumed at {start!r}, expected byte {offset}")
            if notice:
                notice(offset, True)
        else:
            detail = r.read()[:300].decode("utf-8", "replace").strip()
            raise DownloadError(f"{url}: HTTP {r.status_code}" + (f": {detail}" if detail else ""))
        length = r.headers.get("content-length")
        total = offset + int(length) if length and length.isdigit() else None
        done = offset
        if on_size is not None and total is not None:
            on_size(total - offset)
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            for block in r.iter_bytes():
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"{url}: cancelled after {done} bytes; the partial file stays")
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total is not None and done < total:
            raise httpx.RemoteProtocolError(f"connection closed after {done} of {total} bytes")
    return True


class ProgressPrinter:
    """A bar with size, speed and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, out: TextIO | None = None, tty: bool | None = None, every_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.every_s = every_s
        self.clock = clock
        self.start = clock()
        self.base = 0  # bytes on disk before this download's bytes (not counted in its speed)
        self.last = 0.0

    def notice(self, offset: int, resumed: bool) -> None:
        """Say what happened to the bytes on disk; the speed counts only what arrives from now on."""
        self.start, self.base = self.clock(), offset if resumed else 0
        if resumed:
            self.out.write(f"resuming from {human_size(offset)}\n")
        else:
            self.out.write(f"server cannot resume (it ignored the Range request): starting again from 0 "
                           f"({human_size(offset)} on disk discarded)\n")
        self.out.flush()

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        final = total is not None and done >= total
        if not final and now - self.last < (0.1 if self.tty else self.every_s):
            return
        self.last = now
        speed = (done - self.base) / max(now - self.start, 1e-6)
        if total:
            eta = (total - done) / speed if speed > 0 else 0
            frac = done / total
            text = f"{frac:6.1%} {human_size(done)} / {human_size(total)} {human_size(speed)}/s ETA {eta:.0f}s"
        else:
            text = f"{human_size(done)} {human_size(speed)}/s"
        if self.tty:
            bar = "#" * int(30 * done / total) if total else ""
            self.out.write(f"\r[{bar:<30}] {text}" + ("\n" if final else ""))
        else:
            self.out.write(f"downloaded {text}\n")
        self.out.flush()
