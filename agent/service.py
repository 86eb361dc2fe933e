"""The agent process: model runtime + router + socket API, and the MQTT device session when a broker is set.

`AgentService` is also the `AgentHooks` the device session calls (model state, metrics, policy, commands).
Start order: the last applied policy comes back from disk first (device_policy.py), then the socket serves, then the
broker is dialled, so the fleet's limits hold from the first request even when the broker is down. Its own tasks run
under a TaskSupervisor: the device sampler restarts when it dies; the socket server's death is fatal — `run()`
raises AgentFatal and the process exits non-zero for its supervisor to restart it, rather than run on without a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import uvicorn
from pydantic import ValidationError

from nanofleet import thermal
from nanofleet.agent import device_policy
from nanofleet.agent.api import Dispatcher, create_app
from nanofleet.agent.api.fastpath import choose_http_protocol
from nanofleet.agent.device_session.hooks import AgentMetrics
from nanofleet.agent.errors import AgentFatal
from nanofleet.agent.queue.drain import Drainer
from nanofleet.agent.queue.store import Limits, QueueStore
from nanofleet.agent.router import DeviceState, Policy
from nanofleet.agent.runtime.base import Backend, BackendError
from nanofleet.agent.runtime.grpc_backend import GrpcBackend
from nanofleet.agent.runtime.lifecycle import BackendFactory, BridgeModel, LocalModel, ModelManager, free_ram_bytes
from nanofleet.agent.runtime.model_update import ModelUpdater, disk_free_bytes
from nanofleet.agent.sessions import SessionStore
from nanofleet.agent.settings import AgentSettings
from nanofleet.agent.telemetry import sysfs
from nanofleet.agent.unix_socket import bind_tcp, bind_unix, remove_socket
from nanofleet.config import ModelSpec
from nanofleet.mqtt import MqttError
from nanofleet.protos import fleet_pb2
from nanofleet.tasks import TaskSupervisor

log = logging.getLogger("nanofleet.agent")

_AVAILABILITY = {
    "unavailable": fleet_pb2.MODEL_AVAILABILITY_UNAVAILABLE,
    "downloadable": fleet_pb2.MODEL_AVAILABILITY_DOWNLOADABLE,
    "downloading": fleet_pb2.MODEL_AVAILABILITY_DOWNLOADING,
    "available": fleet_pb2.MODEL_AVAILABILITY_AVAILABLE,
}


DEVICE_SAMPLE_S = 2.0


def sample_device(root: Path) -> DeviceState:
    """What the router needs from the hardware: thermal level, free RAM, battery (blocking: sysfs reads)."""
    zones = sysfs.thermal_zones(root) + sysfs.hwmon_sensors(root)
    freq = sysfs.cpufreq(root)
    throttled = bool((freq and freq.capped) or sysfs.cooling_active(root))
    level = thermal.classify_device(((z.temp_c, z.trips) for z in zones), throttled=throttled)
    bat = sysfs.battery(root)
    return DeviceState(thermal_level=level, ram_available_mb=int(psutil.virtual_memory().available >> 20),
                       battery_pct=bat.percent if bat else None, charging=bat.charging if bat else None)


def artifact_auth(token: str | None, url: str, sha256: str | None) -> dict[str, str] | None:
    """The device token goes with a download only to a controller artifact URL naming the expected sha256
    (`…/artifacts/<sha256>`), never to an arbitrary model host."""
    if token and sha256 and urlparse(url).path.endswith(f"/artifacts/{sha256}"):
        return {"Authorization": f"Bearer {token}"}
    return None


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AgentService:
    def __init__(
        self, settings: AgentSettings, *, free_ram: Callable[[], int] = free_ram_bytes,
        backend_factory: BackendFactory | None = None, cloud: Backend | None = None, max_waiting: int = 8,
        warmup: bool = True, disk_free: Callable[[Path], int] = disk_free_bytes,
    ) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(settings.data_dir, 0o700)
        self.models = self._local_model(settings, free_ram, backend_factory, warmup)
        self.updater = ModelUpdater(self.models, disk_free=disk_free) if isinstance(self.models, ModelManager) else None
        self._update_task: asyncio.Task[None] | None = None
        self._update_spec: ModelSpec | None = None
        if cloud is None and settings.gateways:
            cloud = GrpcBackend(settings.gateways, token=settings.gateway_token, ca=settings.gateway_ca,
                                tls_name=settings.gateway_tls_name)
        self._device = sample_device(settings.sysfs_root)
        self.queue = QueueStore(settings.data_dir / "queue.db", Limits(
            settings.queue_max_items, settings.queue_max_bytes, settings.queue_ttl_s, settings.queue_keep_s),
            max_file_bytes=settings.queue_max_file_bytes)
        self.dispatcher = Dispatcher(self.models, cloud, max_waiting=max_waiting,
                                     device_state=lambda: self._device, queue=self.queue)
        self.tasks = TaskSupervisor("agent", on_fatal=self._fatal)
        self.drainer = Drainer(self.queue, self.dispatcher, self.tasks,
                               concurrency=self.models.spec.n_parallel + (1 if cloud is not None else 0))
        self._drain_triggers(cloud)
        self.fatal: BaseException | None = None
        self._stopping = False
        self.sample_errors = 0
        self._sample_ok = True
        self._stop_requested = asyncio.Event()
        self.policy: fleet_pb2.RoutingPolicy | None = None  # the applied RoutingPolicy (None: built-in defaults)
        self.policy_file = device_policy.PolicyFile(settings.data_dir)
        self.policy_error = ""      # why the stored or last policy could not be used ("" when fine)
        self.policy_source = "defaults"  # defaults | stored (restored from disk at start) | controller
        self.policy_counts: Counter[str] = Counter()
        self.sessions = SessionStore()
        self.app = create_app(self.dispatcher, self.sessions, max_body_bytes=settings.max_body_bytes,
                              status_extra=self._bridge_status if settings.local_bridge else None)
        self.app.state.status_providers += [self._policy_status, self._mqtt_status, self._tasks_status,
                                            self._update_status]
        self.device_session: Any = None
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._inode: int | None = None
        self.started_at = time.time()

    def _drain_triggers(self, cloud: Backend | None) -> None:
        """Routes that open tell the drainer at once (the periodic tick is only the safety net): the gateway
        serving again or its breaker's cooldown over, the local model loaded, a local bridge back."""
        kick = self.drainer.kick
        if isinstance(cloud, GrpcBackend):
            cloud.on_open = kick
        if isinstance(self.models, ModelManager):
            self.models.on_ready = kick
        elif isinstance(self.models, BridgeModel):
            self.models.backend.on_open = kick

    @staticmethod
    def _local_model(settings: AgentSettings, free_ram: Callable[[], int], backend_factory: BackendFactory | None,
                     warmup: bool) -> LocalModel:
        """The local route's source: a local Inference bridge when one is set, else a GGUF in llama.cpp."""
        bridge = settings.local_bridge
        if bridge is None:
            return ModelManager(settings.model, settings.cache_dir, settings.data_dir / "private",
                                free_ram=free_ram, backend_factory=backend_factory, warmup=warmup,
                                download_headers=lambda url, sha: artifact_auth(settings.gateway_token, url, sha))
        backend = GrpcBackend(bridge.address, token=bridge.token, ca=bridge.ca, timeout=bridge.timeout,
                              name="local bridge", model=bridge.model or "", cooldown=bridge.cooldown, role="bridge")
        return BridgeModel(backend, settings.model, name=bridge.model or "")

    def _bridge_status(self) -> dict[str, Any]:
        """`local_bridge` in /v1/status: where the local route goes and whether it may be called now."""
        models = self.models
        assert isinstance(models, BridgeModel)
        b = models.backend
        return {"local_bridge": {"address": b.address, "tls": self.settings.local_bridge is not None
                                 and self.settings.local_bridge.ca is not None,
                                 "state": b.state, "why": b.why or None,
                                 "reachable": b.reachable, "circuit_open": b.breaker.open_until is not None,
                                 "retry_in": round(b.retry_in, 1), "last_error": b.last_error,
                                 "model": b.served_model or b.model}}

    def _policy_status(self) -> dict[str, Any]:
        """`policy` in /v1/status: the effective policy's content, where it came from, what went wrong."""
        session = self.device_session
        error = self.policy_error or (session.policy_error if session is not None else "")
        counts = dict(self.policy_counts) | (dict(session.counts) if session is not None else {})
        return {"policy": {"version": self.dispatcher.policy.version, "source": self.policy_source,
                           "content": device_policy.content(self.policy), "file": str(self.policy_file.path),
                           "error": error or None, "counts": counts}}

    def _update_status(self) -> dict[str, Any]:
        """`model_update` in /v1/status: the last model update policy asked for, and the serving model's figures."""
        up = self.updater
        if up is None or not isinstance(self.models, ModelManager):
            return {"model_update": None}
        stats = self.models.stats
        return {"model_update": {"state": up.state or None, "sha256": up.sha256 or None, "reason": up.reason or None,
                                 "progress": round(up.progress, 3), "previous_sha256": up.previous_sha256 or None,
                                 "serving_sha256": self.models.spec.sha256, "requests": stats.requests,
                                 "errors": stats.errors, "p95_latency_ms": round(stats.p95_latency_ms, 1)}}

    def _mqtt_status(self) -> dict[str, Any]:
        if self.device_session is None:
            return {"mqtt": {"broker": None, "connected": False, "since": None,
                             "last_error": "no broker_url set: the agent runs without a controller"}}
        return {"mqtt": self.device_session.status()}

    def _tasks_status(self) -> dict[str, Any]:
        return {"tasks": {**self.tasks.status(), "device_sample_errors": self.sample_errors}}

    # -- process ---------------------------------------------------------------------------------------------
    async def _sample_forever(self) -> None:
        """Refresh the device state off the request path, so routing never waits on sysfs. A change that may
        open a route for queued entries (cooler, more RAM) kicks the drainer."""
        while True:
            await asyncio.sleep(DEVICE_SAMPLE_S)
            before = self._device
            try:
                self._device = await asyncio.to_thread(sample_device, self.settings.sysfs_root)
            except OSError as exc:  # a sensor gone for a moment: keep the last state, say so (first of a run)
                if not self.sample_errors or self._sample_ok:
                    log.warning("agent: device sampling failed, routing on the last state: %r", exc)
                self.sample_errors += 1
                self._sample_ok = False
            else:
                self._sample_ok = True
                if (self._device.thermal_level < before.thermal_level
                        or self._device.ram_available_mb > before.ram_available_mb + 64):
                    self.drainer.kick()  # cooler or more RAM may open a route for queued entries

    def _fatal(self, name: str, exc: BaseException) -> None:
        """A task the agent cannot run without died: stop the process (its supervisor restarts it)."""
        log.critical("agent: %s died (%s: %s); stopping so that the service manager restarts the agent",
                     name, type(exc).__name__, exc)
        self.fatal = exc
        self._stop_requested.set()

    async def _restore_policy(self) -> None:
        """Enforce the last applied policy before serving (and before any broker connection)."""
        try:
            stored = await asyncio.to_thread(self.policy_file.load, self.settings.fleet, self.settings.device_id)
        except device_policy.PolicyFileError as exc:
            self.policy_counts["policy_file_unusable"] += 1
            self.policy_error = f"{exc.message}; running on the built-in defaults until the controller sends one"
            log.error("agent: %s", self.policy_error)
            return
        if stored is None:
            log.info("agent: no stored policy yet; running on the built-in defaults")
            return
        await self.apply_policy(stored, persist=False)
        log.info("agent: restored policy v%d from %s", stored.version, self.policy_file.path)

    async def start(self) -> None:
        await self._restore_policy()
        self.tasks.spawn(self._sample_forever, "device-sampler")
        self.drainer.start()
        if self.queue.recovered:
            log.info("offline queue: %d entries cut mid-run by the last stop go back to the queue",
                     self.queue.recovered)
        sockets = [bind_unix(self.settings.socket_path)]
        self._inode = self.settings.socket_path.stat().st_ino
        if self.settings.tcp_listen:
            sockets.append(bind_tcp(self.settings.tcp_listen))
        http = choose_http_protocol(self.settings.http_fast_path)
        config = uvicorn.Config(self.app, http=http, log_level="warning", access_log=False,
                                lifespan="off",
                                timeout_graceful_shutdown=3, server_header=False, date_header=False,
                                proxy_headers=False)  # a local socket: no proxy in front, one layer less
        server = self._server = _Server(config)
        self._serve_task = self.tasks.spawn(lambda: self._serve(server, sockets), "socket-server",
                                            on_death="fatal", forever=False)
        while not server.started:
            if self._serve_task.done():
                if not self._serve_task.cancelled() and self._serve_task.exception() is not None:
                    raise AgentFatal("the socket server failed to start") from self._serve_task.exception()
                raise AgentFatal("the socket server stopped during startup")
            await asyncio.sleep(0.01)
        if self.settings.preload:
            self.tasks.spawn(self._load_now, "preload", on_death="log", forever=False)
        if self.settings.broker_url:
            from nanofleet.agent.device_session import DeviceSession

            self.device_session = DeviceSession(self.settings, self, policy=self.policy)
            await self.device_session.start()

    async def _serve(self, server: uvicorn.Server, sockets: list[Any]) -> None:
        await server.serve(sockets=sockets)
        if not self._stopping:
            raise AgentFatal("the socket server stopped on its own: apps can no longer reach the agent")

    async def _load_now(self) -> None:
        """`preload`: have the model resident before the first request (then keep_alive applies as usual)."""
        try:
            async with self.models.use():
                pass
            log.info("model %s preloaded", self.models.status().name)
        except BackendError as exc:  # a refusal (e.g. too little RAM) is in /v1/status; the agent serves on
            log.warning("preloading the model failed: %s", exc)

    async def stop(self) -> None:
        """Stop in the reverse order of start; each step's failure is logged and the next step still runs."""
        self._stopping = True
        log.info("agent %s: shutting down%s", self.settings.device_id,
                 f" after a fatal error ({self.fatal})" if self.fatal else "")
        if self.device_session is not None:
            try:
                await self.device_session.stop()
            except (OSError, MqttError) as exc:
                log.error("agent: stopping the device session failed: %r", exc)
        if self._server is not None:
            self._server.should_exit = True
            serving = self._serve_task
            if serving is not None and not serving.done():
                await asyncio.wait({serving}, timeout=10)  # uvicorn's own graceful shutdown (3 s for requests)
        if self.updater is not None:
            self.updater.cancel()  # a download runs in a worker thread: cancelling its task alone would not end it
        await self.tasks.stop()
        remove_socket(self.settings.socket_path, self._inode)
        await asyncio.to_thread(self.queue.close)
        await self.models.close()
        if self.dispatcher.cloud is not None:
            await self.dispatcher.cloud.close()

    async def run(self, ready: Callable[[str], None] | None = None) -> None:
        """Start, announce the socket, serve until SIGINT/SIGTERM, stop cleanly."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            line = f"nanofleet agent {self.settings.device_id} serving on unix:{self.settings.socket_path}"
            if self.settings.tcp_listen:
                line += f" and http://{self.settings.tcp_listen}"
            (ready or (lambda s: print(s, file=sys.stdout, flush=True)))(line)
            done = asyncio.ensure_future(stop.wait())
            fatal = asyncio.ensure_future(self._stop_requested.wait())
            await asyncio.wait({done, fatal}, return_when=asyncio.FIRST_COMPLETED)
            for waiter in (done, fatal):
                waiter.cancel()
            if not self.fatal:
                log.info("agent %s: stop requested by a signal", self.settings.device_id)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
        if self.fatal is not None:
            raise AgentFatal(f"the agent stopped because a part it cannot run without died: {self.fatal}") \
                from self.fatal

    # -- AgentHooks ------------------------------------------------------------------------------------------
    def model_state(self) -> fleet_pb2.ModelState:
        st = self.models.status()
        state = fleet_pb2.ModelState(
            name=st.name, sha256=self.models.spec.sha256 or "", availability=_AVAILABILITY[st.availability],
            download_progress=st.progress, loaded=st.loaded, reason=st.reason, tokens_per_s=st.tokens_per_s)
        up = self.updater
        if up is not None and isinstance(self.models, ModelManager):
            stats = self.models.stats
            state.update_state, state.update_sha256, state.update_reason = up.state, up.sha256, up.reason
            state.previous_sha256 = up.previous_sha256
            state.requests, state.errors, state.p95_latency_ms = stats.requests, stats.errors, stats.p95_latency_ms
            if up.state == "downloading":
                state.download_progress = up.progress  # the update's download (the serving model is whole)
        return state

    def agent_metrics(self) -> AgentMetrics:
        counts = self.dispatcher.counts
        conn = self.dispatcher.connectivity()
        q = self.queue.counts
        return AgentMetrics(
            route_counts={"local": counts["local"], "cloud": counts["cloud"], "queued": counts["queued"],
                          "rejected": counts["rejected"] + counts["queue_unavailable"]},
            queue_depth=self.queue.depth,
            slots_waiting=self.dispatcher.admission.waiting,
            queue_oldest_age_s=self.queue.oldest_age_s() if self.queue.depth else 0.0,
            queue_counters={"enqueued": q["enqueued"], "drained_local": q["drained_local"],
                            "drained_cloud": q["drained_cloud"], "expired": q["expired"], "failed": q["failed"],
                            "cancelled": q["cancelled"]},
            policy_version=self.dispatcher.policy.version,
            gateway_reachable=conn.gateway_configured and conn.gateway_reachable and not conn.circuit_open,
        )

    async def apply_policy(self, policy: fleet_pb2.RoutingPolicy, *, persist: bool = True) -> None:
        """Install `policy` in the router and keep it on disk (`persist`), logging what changed. Raises
        PolicyRefused for one addressed elsewhere (the device session refuses those before they get here)."""
        device_policy.check_addressed(policy, self.settings.fleet, self.settings.device_id)
        old, self.policy = self.policy, policy
        self.policy_source = "controller" if persist else "stored"
        self.dispatcher.policy = Policy.from_proto(policy)
        self.policy_counts["applied"] += 1
        log.info("agent: applied policy v%d (%s)", policy.version, device_policy.changes(old, policy))
        if persist:
            try:
                await asyncio.to_thread(self.policy_file.save, policy)
                self.policy_error = ""
            except device_policy.PolicyFileError as exc:  # applied in memory; lost on a restart: say so
                self.policy_counts["policy_file_unusable"] += 1
                self.policy_error = exc.message
                log.error("agent: policy v%d applied but not stored: %s", policy.version, exc.message)
        lim = self.queue.limits
        self.queue.set_limits(Limits(policy.queue_max_items or lim.max_items, policy.queue_max_bytes or lim.max_bytes,
                                     float(policy.queue_ttl_s or lim.ttl_s), lim.keep_s))
        self.drainer.kick()  # a new policy may open a route for queued entries
        if policy.model_source:
            current = self.models.spec
            try:
                spec = ModelSpec.model_validate({**current.model_dump(), "source": policy.model_source,
                                                 "sha256": policy.model_sha256 or None})
            except ValidationError as exc:
                log.warning("policy v%s: model %r ignored: %s", policy.version, policy.model_source,
                            exc.errors()[0]["msg"])
                return
            if self.updater is None:
                if await self.models.switch(spec):
                    log.info("policy v%s: now serving model %s", policy.version, spec.source)
                return
            self._start_update(spec, policy.version)

    def _start_update(self, spec: ModelSpec, version: int) -> None:
        """Fetch, load beside and switch to `spec` in the background (a download may take long; policy handling
        must not wait). A newer model replaces an update in progress; the same one already running is left be."""
        running = self._update_task is not None and not self._update_task.done()
        if running and self._update_spec is not None and \
                (self._update_spec.source, self._update_spec.sha256) == (spec.source, spec.sha256):
            return
        updater = self.updater
        assert updater is not None
        if running:
            assert self._update_task is not None
            updater.cancel()
            self._update_task.cancel()
        self._update_spec = spec

        async def update() -> None:
            outcome = await updater.apply(spec)
            if outcome != "unchanged":
                log.info("policy v%s: model update to %s %s", version, spec.source,
                         outcome if outcome == "applied" else f"failed: {updater.reason}")

        self._update_task = self.tasks.spawn(update, "model-update", on_death="log", forever=False)

    async def handle_command(self, command: fleet_pb2.Command) -> fleet_pb2.CommandResult:
        def result(status: str, message: str, **data: str) -> fleet_pb2.CommandResult:
            return fleet_pb2.CommandResult(id=command.id, device_id=self.settings.device_id, status=status,
                                           message=message, data=data, ts_ms=int(time.time() * 1000))

        try:
            if command.kind == "unload-model":
                was = await self.models.unload()
                return result("ok", "model unloaded" if was else "model was not loaded", loaded="false")
            if command.kind == "reload-model":
                await self.models.reload()
                return result("ok", f"model {self.models.status().name} reloaded", loaded="true")
        except BackendError as exc:
            return result("error", f"{command.kind} failed: {exc.message}")
        if command.kind == "drain-queue":
            self.drainer.kick()
            return result("ok", f"draining: {self.queue.depth} entries in the offline queue",
                          queue_depth=str(self.queue.depth))
        return result("error", f"unknown command {command.kind!r}")
