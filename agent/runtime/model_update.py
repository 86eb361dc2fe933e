"""A model update asked for by policy (a rollout step, or its rollback): fetch, verify, load beside, switch, report.

    downloading → loading → applied            the new model serves; the previous file stays for a rollback
                          ↘ failed (reason)     the old model keeps serving; the reason goes to the controller

The download resumes (HTTP Range) from the `.part` a cut connection or a killed agent left, and is verified against
the policy's sha256 before it gets its real name (agent/models/download.py). Before a byte is written the disk is
checked (the size the server announced, plus `disk_reserve`); before loading, the RAM (ModelManager.install: beside
the old model when both fit, else one after the other). A refusal is `failed` with `insufficient_disk: …` or
`insufficient_ram: …`: the controller counts it against the step, not the fleet. Files of models neither serving nor
previous are deleted from the cache after a switch, so a device holds at most two models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from nanofleet.agent.models.download import ModelFileError, pull
from nanofleet.agent.models.files import ModelFile, human_size, resolve
from nanofleet.agent.runtime.base import BackendError
from nanofleet.agent.runtime.lifecycle import ModelManager
from nanofleet.config import ModelSpec

log = logging.getLogger("nanofleet.agent.model")
_DOWNLOADED = re.compile(r"^[0-9a-f]{12}-.+\.gguf$")  # files.cache_name(): what the agent downloaded itself


class InsufficientDisk(ModelFileError):
    code = "insufficient_disk"


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class ModelUpdater:
    """Runs one update at a time for a ModelManager and remembers how the last one went."""

    def __init__(self, manager: ModelManager, *, disk_free: Callable[[Path], int] = disk_free_bytes,
                 disk_reserve: int = 64 << 20) -> None:
        self.manager = manager
        self.disk_free, self.disk_reserve = disk_free, disk_reserve
        self.state = ""           # "" | downloading | loading | applied | failed
        self.sha256 = ""          # the model the last update was for
        self.reason = ""
        self.progress = 0.0       # 0..1 while downloading
        self.previous: ModelSpec | None = None
        self.counts: Counter[str] = Counter()
        self._cancel = threading.Event()

    @property
    def previous_sha256(self) -> str:
        return (self.previous.sha256 or "") if self.previous else ""

    def cancel(self) -> None:
        """Stop a download in progress (a newer policy replaced this update); its partial file stays."""
        self._cancel.set()

    async def apply(self, spec: ModelSpec) -> str:
        """`unchanged`, `applied` or `failed` (the reason in `self.reason`)."""
        m = self.manager
        if (spec.source, spec.sha256) == (m.spec.source, m.spec.sha256):
            return "unchanged"
        self._cancel = threading.Event()
        self.state, self.sha256, self.reason, self.progress = "downloading", spec.sha256 or "", "", 0.0
        old = m.spec
        try:
            file = resolve(spec, m.cache_dir)
            path = await self._fetch(file)
            self.state = "loading"
            beside = await m.install(spec, path)
        except (ModelFileError, BackendError, ValueError, OSError) as exc:
            self.state, self.reason = "failed", _reason(exc)
            self.counts["failed"] += 1
            log.error("model update to %s failed: %s; %s keeps serving", spec.source, self.reason, old.source)
            return "failed"
        self.state, self.previous = "applied", old
        self.counts["applied"] += 1
        log.info("model update: now serving %s (loaded %s the previous one; %s kept for a rollback)", spec.source,
                 "beside" if beside else "after unloading", old.source)
        await asyncio.to_thread(self._prune)
        return "applied"

    async def _fetch(self, file: ModelFile) -> Path:
        if file.path.exists():
            return file.path  # already here (e.g. a rollback to the previous model): nothing to fetch
        if file.builtin:
            from nanofleet.agent.tiny_model import make_tiny_gguf

            return await asyncio.to_thread(make_tiny_gguf, file.path)
        if not file.url or not file.sha256:
            raise ModelFileError(f"model file not found: {file.path}")
        loop = asyncio.get_running_loop()
        cache = self.manager.cache_dir
        cache.mkdir(parents=True, exist_ok=True)

        def progress(done: int, total: int | None) -> None:
            if total:
                loop.call_soon_threadsafe(setattr, self, "progress", min(done / total, 0.999))

        def room_for(remaining: int) -> None:
            free = self.disk_free(cache)
            if free - remaining < self.disk_reserve:
                raise InsufficientDisk(f"insufficient_disk: the model needs {human_size(remaining)} more, "
                                       f"{human_size(free)} free in {cache} (keeping {human_size(self.disk_reserve)})")

        started = time.monotonic()
        path = await asyncio.to_thread(pull, file.url, file.path, file.sha256, progress=progress,
                                       headers=self.manager.download_headers(file.url, file.sha256),
                                       on_size=room_for, cancel=self._cancel)
        self.progress = 1.0
        log.info("model %s downloaded and verified in %.1f s", file.name, time.monotonic() - started)
        return path

    def _prune(self) -> None:
        """Delete downloaded models that are neither serving nor the previous one."""
        m = self.manager
        keep = {m.file.path.name}
        if self.previous is not None:
            with contextlib.suppress(ValueError):  # a source this agent cannot name any more: nothing to keep
                keep.add(resolve(self.previous, m.cache_dir).path.name)
        for p in m.cache_dir.glob("*.gguf"):
            if _DOWNLOADED.match(p.name) and p.name not in keep:
                try:
                    p.unlink()
                    log.info("model cache: removed %s (neither serving nor previous)", p.name)
                except OSError as exc:
                    self.counts["prune_failed"] += 1
                    log.warning("model cache: cannot remove %s: %s", p, exc)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, InsufficientDisk) or text.startswith(("insufficient_", "warmup_failed")):
        return text
    if isinstance(exc, ModelFileError):
        return f"download: {text}"
    return f"{type(exc).__name__}: {text}"
