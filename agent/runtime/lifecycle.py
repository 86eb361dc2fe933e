"""The local model as a scarce resource: availability, lazy load, warm-up, idle unload, reload, RAM guard.

Availability follows the Prompt API: `unavailable | downloadable | downloading | available` (+ progress). The model
is loaded on first use, warmed up with a one-token generation, and unloaded after `keep_alive` seconds idle
(0: as soon as the last request ends; -1: never). A load that would not fit in free RAM is refused with a reason
that `/v1/status` shows, instead of letting the OOM killer end the agent.

Two sources serve the local route behind one face (`LocalModel`, what the dispatcher, the socket API and the device
session use): `ModelManager` (a GGUF file in llama.cpp in-process: the above) and `BridgeModel` (a local `Inference`
bridge: no file, no RAM check, no download; available while the bridge's breaker admits calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from nanofleet.agent.models.download import ModelFileError, pull
from nanofleet.agent.models.files import ModelFile, resolve
from nanofleet.agent.models.memory import RamGuard, estimate_bytes
from nanofleet.agent.models.stats import ModelStats
from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    ChatRequest,
    InsufficientMemory,
    WarmupFailed,
)
from nanofleet.agent.runtime.grpc_backend import GrpcBackend
from nanofleet.agent.runtime.llama import LlamaBackend
from nanofleet.config import ModelSpec

BackendFactory = Callable[[ModelFile, ModelSpec], Backend]
log = logging.getLogger("nanofleet.agent.model")
REFUSED_REST_S = 5.0  # after a load refused for RAM, the local route rests this long before trying again


def free_ram_bytes() -> int:
    return int(psutil.virtual_memory().available)


@dataclass(slots=True)
class ModelStatus:
    name: str
    availability: str  # unavailable | downloadable | downloading | available
    progress: float    # 0..1 while downloading
    loaded: bool
    reason: str        # why unavailable / not loaded ("" when fine)
    tokens_per_s: float
    context_window: int
    n_parallel: int


class LocalModel(Protocol):
    """What the rest of the agent needs from the local route's model, whichever source serves it."""

    spec: ModelSpec

    @property
    def availability(self) -> str: ...
    def recently_refused(self, within: float = REFUSED_REST_S) -> bool: ...
    @property
    def retry_in(self) -> float: ...  # seconds until the source may serve again, when it said (0: unknown)
    def status(self) -> ModelStatus: ...
    def record_speed(self, tokens_per_s: float) -> None: ...
    def use(self) -> contextlib.AbstractAsyncContextManager[Backend]: ...
    async def unload(self) -> bool: ...
    async def reload(self, spec: ModelSpec | None = None) -> None: ...
    async def switch(self, spec: ModelSpec) -> bool: ...
    async def close(self) -> None: ...


class _Loaded:
    """A loaded backend and how many requests hold it; closed when unloaded and the last user lets go."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.users = 0
        self.retired = False


class ModelManager:
    def __init__(
        self, spec: ModelSpec, cache_dir: Path, private_dir: Path, *, free_ram: Callable[[], int] = free_ram_bytes,
        backend_factory: BackendFactory | None = None, warmup: bool = True,
        download_headers: Callable[[str, str | None], dict[str, str] | None] | None = None,
    ) -> None:
        self.spec = spec
        self.stats = ModelStats(spec.sha256 or "")  # the gate's figures of the model serving now
        self.download_headers = download_headers or (lambda url, sha: None)  # (url, sha256) -> auth for it
        self.cache_dir = cache_dir
        self.private_dir = private_dir
        self.free_ram = free_ram
        self.ram_guard = RamGuard()
        self.warmup = warmup
        self._factory = backend_factory or self._llama
        self._loaded: _Loaded | None = None
        self._lock = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._progress: float | None = None
        self.reason = ""
        self.refused_at = 0.0  # monotonic time of the last refusal to load (insufficient RAM)
        self.tokens_per_s = 0.0
        self.loads = 0
        self.file = resolve(spec, cache_dir)
        self._file_seen = (-2.0, False)  # (monotonic time looked, exists): _file_exists
        self.on_ready: Callable[[], None] | None = None  # a load finished: the offline queue may drain locally
        self.on_ready_errors = 0

    def _llama(self, file: ModelFile, spec: ModelSpec) -> Backend:
        return LlamaBackend(file.path, model_name=file.name, private_dir=self.private_dir, n_ctx=spec.n_ctx,
                            n_parallel=spec.n_parallel, threads=spec.threads)

    # -- what /v1/status, /v1/models and telemetry show ------------------------------------------------------
    @property
    def availability(self) -> str:
        if self._loaded is not None:
            return "available"
        if self._progress is not None:
            return "downloading"
        if self._file_exists():
            return "available"
        if self.file.url or self.file.builtin:
            return "downloadable"
        return "unavailable"

    def _file_exists(self) -> bool:
        """The model file's presence, looked at most once a second: the router asks on every request (a stat per
        request was ~5 % of the offline queue's enqueue CPU) and a file appears or goes on a human time scale."""
        now = time.monotonic()
        if now - self._file_seen[0] > 1.0:
            self._file_seen = (now, self.file.path.exists())
        return self._file_seen[1]

    def recently_refused(self, within: float = REFUSED_REST_S) -> bool:
        """A load was refused for lack of RAM moments ago: routes elsewhere until it is worth another try."""
        return bool(self.refused_at) and time.monotonic() - self.refused_at < within

    @property
    def retry_in(self) -> float:
        return max(0.0, REFUSED_REST_S - (time.monotonic() - self.refused_at)) if self.refused_at else 0.0

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def status(self) -> ModelStatus:
        avail = self.availability
        reason = self.reason or ("" if avail != "unavailable" else f"model file not found: {self.file.path}")
        return ModelStatus(self.file.name, avail, self._progress or (1.0 if avail == "available" else 0.0),
                           self.loaded, reason, self.tokens_per_s, self.spec.n_ctx, self.spec.n_parallel)

    def record_speed(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self.tokens_per_s = tokens_per_s if not self.tokens_per_s else 0.8 * self.tokens_per_s + 0.2 * tokens_per_s

    # -- use -------------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Backend]:
        """Hold the loaded backend for one request (loading it first if needed)."""
        loaded = self._loaded if self._loaded is not None and not self._loaded.retired else await self._load()
        loaded.users += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        stats, t0 = self.stats, time.monotonic()  # a request that began on the old model counts for the old one
        try:
            yield loaded.backend
        except BackendError:
            stats.record(time.monotonic() - t0, ok=False)
            raise
        else:
            stats.record(time.monotonic() - t0, ok=True)
        finally:
            loaded.users -= 1
            self._released(loaded)

    async def _load(self) -> _Loaded:
        async with self._lock:
            if self._loaded is not None:
                return self._loaded
            path = await self._ensure_file()
            before = self.ram_guard.errors
            need = await asyncio.to_thread(estimate_bytes, path, self.spec.n_ctx, self.spec.n_parallel, self.ram_guard)
            free = self.ram_guard.free_bytes(self.free_ram)
            if self.ram_guard.errors == before:
                self.ram_guard.ok()
            if free is not None and free < need:
                self.reason = (f"insufficient_ram: model needs about {need >> 20} MB, "
                               f"{free >> 20} MB free; not loaded")
                self.refused_at = time.monotonic()
                raise InsufficientMemory(self.reason)
            backend = await asyncio.to_thread(self._factory, self.file, self.spec)
            if self.warmup:
                await self._warm_up(backend)
            self.reason = ""
            self.refused_at = 0.0  # loaded: the rest after an earlier refusal is over (the router may send again)
            self.loads += 1
            self._loaded = _Loaded(backend)
            self._ready()
            return self._loaded

    def _ready(self) -> None:
        if self.on_ready is None:
            return
        try:
            self.on_ready()
        except Exception:  # a hook's bug must not fail the load that just succeeded: logged, counted
            self.on_ready_errors += 1
            log.exception("model %s: the on_ready hook failed", self.spec.source)

    async def _warm_up(self, backend: Backend) -> None:
        """One token, so the first request does not pay llama.cpp's first-call costs. A model that cannot produce
        it is not served: closed again, the reason in status, the local route rests as after a refused load."""
        try:
            await backend.generate(ChatRequest([{"role": "user", "content": "hi"}], max_tokens=1))
        except BackendError as exc:
            await backend.close()
            self.reason = f"warmup_failed: {exc.message}; not loaded"
            self.refused_at = time.monotonic()
            log.error("model %s: %s", self.spec.source, self.reason)
            raise WarmupFailed(self.reason) from exc
        except BaseException:
            await backend.close()
            raise

    async def _ensure_file(self) -> Path:
        file = self.file
        if file.path.exists():
            return file.path
        if file.builtin:
            from nanofleet.agent.tiny_model import make_tiny_gguf

            return await asyncio.to_thread(make_tiny_gguf, file.path)
        if not file.url or not file.sha256:
            self.reason = f"model file not found: {file.path}"
            raise BackendUnavailable(self.reason)
        self._progress = 0.0
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int | None) -> None:
            if total:
                loop.call_soon_threadsafe(setattr, self, "_progress", min(done / total, 0.999))

        try:
            return await asyncio.to_thread(pull, file.url, file.path, file.sha256, progress=progress,
                                           headers=self.download_headers(file.url, file.sha256))
        except ModelFileError as exc:
            self.reason = f"download failed: {exc}"
            raise BackendUnavailable(self.reason) from exc
        finally:
            self._progress = None
            self._file_seen = (-2.0, False)  # downloaded or not: look again at the next question

    def _released(self, loaded: _Loaded) -> None:
        if loaded.users:
            return
        if loaded.retired:
            self._retire(loaded)
            return
        keep = self.spec.keep_alive
        if keep == -1 or loaded is not self._loaded:
            return
        if keep == 0:
            self._start_unload("idle")
        else:
            self._idle = asyncio.get_running_loop().call_later(keep, self._start_unload, "idle")

    def _start_unload(self, why: str) -> None:
        loaded = self._loaded
        if loaded is None or loaded.users:
            return
        self._loaded = None
        loaded.retired = True
        self._retire(loaded)

    def _retire(self, loaded: _Loaded) -> None:
        task = asyncio.get_running_loop().create_task(loaded.backend.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- commands --------------------------------------------------------------------------------------------
    async def unload(self) -> bool:
        """Unload now; requests in flight finish first (their backend closes when they end). False if not loaded."""
        async with self._lock:
            loaded, self._loaded = self._loaded, None
        if loaded is None:
            return False
        loaded.retired = True
        if not loaded.users:
            self._retire(loaded)
        await self.settle()
        return True

    async def reload(self, spec: ModelSpec | None = None) -> None:
        """Switch to `spec` (or reload the same model) and load it now."""
        await self.unload()
        if spec is not None:
            self.spec = spec
            self.file = resolve(spec, self.cache_dir)
            self._file_seen = (-2.0, False)
        self.reason = ""
        await self._load()

    async def switch(self, spec: ModelSpec) -> bool:
        """Serve `spec` from now on (a new model pushed by policy): unload the old one, load the new lazily.
        False when it is the model already in use."""
        if (spec.source, spec.sha256) == (self.spec.source, self.spec.sha256):
            return False
        await self.unload()
        self.spec, self.file, self.reason, self.refused_at = spec, resolve(spec, self.cache_dir), "", 0.0
        return True

    async def install(self, spec: ModelSpec, path: Path) -> bool:
        """Serve `spec` (its file at `path`, verified) from now on: load and warm it beside the current model, then
        switch in one step; requests in flight finish on the old model, whose backend closes when the last ends.
        When RAM holds only one of the two, the old one is unloaded first (a gap of one load, no overlap). Returns
        whether it loaded beside. InsufficientMemory (the reason says how much) or WarmupFailed: nothing changed."""
        async with self._lock:  # a request that needs a load waits for the switch instead of loading the old model
            need = await asyncio.to_thread(estimate_bytes, path, spec.n_ctx, spec.n_parallel, self.ram_guard)
            free = self.ram_guard.free_bytes(self.free_ram)
            old = self._loaded
            beside = free is None or free >= need
            if not beside:
                old_need = (await asyncio.to_thread(estimate_bytes, self.file.path, self.spec.n_ctx,
                                                    self.spec.n_parallel, self.ram_guard)) if old else 0
                assert free is not None
                if free + old_need < need:
                    raise InsufficientMemory(f"insufficient_ram: model needs about {need >> 20} MB, {free >> 20} MB "
                                             f"free{f' (+{old_need >> 20} MB of the current model)' if old else ''}")
                log.warning("model %s: RAM holds one model, not two: unloading %s before loading it (no overlap)",
                            spec.source, self.spec.source)
                self._drop(old)
            file = resolve(spec, self.cache_dir)
            backend = await asyncio.to_thread(self._factory, file, spec)
            if self.warmup:
                try:
                    await backend.generate(ChatRequest([{"role": "user", "content": "hi"}], max_tokens=1))
                except BaseException as exc:
                    await backend.close()
                    if isinstance(exc, BackendError):
                        raise WarmupFailed(f"warmup_failed: {exc.message}") from exc
                    raise
            new = _Loaded(backend)
            self._loaded, self.spec, self.file = new, spec, file
            self.stats = ModelStats(spec.sha256 or "")
            self.reason, self.refused_at, self._file_seen = "", 0.0, (-2.0, False)
            self.loads += 1
            if beside:
                self._drop(old)
        self._ready()
        self._released(new)  # keep_alive counts from now
        return beside

    def _drop(self, loaded: _Loaded | None) -> None:
        """Retire `loaded`: no new request gets it; closed now if idle, else when its last request ends."""
        if loaded is None:
            return
        if self._loaded is loaded:
            self._loaded = None
        loaded.retired = True
        if not loaded.users:
            self._retire(loaded)

    async def settle(self) -> None:
        """Wait until backends being unloaded are closed."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring), return_exceptions=True)

    async def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        await self.unload()
        await self.settle()


class BridgeModel:
    """The local model served by a local `Inference` bridge. Nothing to load or unload here; `spec` still bounds
    requests (`n_ctx`) and concurrency (`n_parallel`). Availability is the bridge's breaker (and any "busy, retry in
    N s" it answered): `available` while it admits calls, else `unavailable` with the bridge's last error."""

    def __init__(self, backend: GrpcBackend, spec: ModelSpec, *, name: str = "") -> None:
        self.backend = backend
        self.spec = spec
        self.name = name
        self.tokens_per_s = 0.0

    @property
    def availability(self) -> str:
        return "available" if self.backend.reachable else "unavailable"

    @property
    def retry_in(self) -> float:
        return self.backend.retry_in

    @property
    def loaded(self) -> bool:
        return True

    def recently_refused(self, within: float = REFUSED_REST_S) -> bool:
        return False

    def status(self) -> ModelStatus:
        avail = self.availability
        reason = "" if avail == "available" else (
            f"local bridge {self.backend.last_error}; next try in {self.backend.retry_in:.0f}s")
        name = self.name or self.backend.served_model or "local-bridge"
        return ModelStatus(name, avail, 1.0 if avail == "available" else 0.0, True, reason, self.tokens_per_s,
                           self.spec.n_ctx, self.spec.n_parallel)

    def record_speed(self, tokens_per_s: float) -> None:
        if tokens_per_s > 0:
            self.tokens_per_s = tokens_per_s if not self.tokens_per_s else 0.8 * self.tokens_per_s + 0.2 * tokens_per_s

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Backend]:
        yield self.backend

    async def unload(self) -> bool:
        return False  # the bridge owns its model's memory

    async def reload(self, spec: ModelSpec | None = None) -> None:
        if spec is not None:
            self.spec = spec

    async def switch(self, spec: ModelSpec) -> bool:
        return False  # the bridge serves its own model: a policy's GGUF does not apply

    async def close(self) -> None:
        await self.backend.close()
