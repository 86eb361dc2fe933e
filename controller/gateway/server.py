"""The gateway process: a grpc.aio server with `Inference`, the standard health service, TLS, graceful shutdown.

Health services: "" (the process), "nanofleet.v1.Inference" and "nanofleet.gateway.Upstream"; the last two are
NOT_SERVING while the upstream cannot serve (e.g. no API key), and every Check answer carries the reason in trailing
metadata `nanofleet-detail` (shown by `nanofleet gateway health`) because the health proto has no message field.
The process's own entry ("") also reports the service's supervised tasks that died (their count and last error).
`stop()` goes through every step even when one fails, then raises what failed (an ExceptionGroup).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from nanofleet.config import FleetConfig
from nanofleet.config import Upstream as UpstreamConfig
from nanofleet.protos import inference_pb2_grpc
from nanofleet.store_url import StoreTarget
from nanofleet.tcp import is_loopback

from . import budgets
from .auth import Authenticator
from .db import DB_NAME, GatewayDb, as_target, gateway_target, open_store
from .errors import GatewayError
from .idempotency import Idempotency
from .metrics import GatewayMetrics, MetricsApp
from .service import InferenceService
from .upstreams.base import UnavailableUpstream, Upstream
from .upstreams.retrying import RetryingUpstream
from .usage import UsageLedger

log = logging.getLogger("nanofleet.gateway")
INFERENCE_SERVICE = "nanofleet.v1.Inference"
UPSTREAM_SERVICE = "nanofleet.gateway.Upstream"
DETAIL_KEY = "nanofleet-detail"
__all__ = ["DB_NAME", "Gateway", "ListenError", "build_upstream"]


class ListenError(GatewayError):
    """The gateway cannot listen as asked (port taken, plaintext on a non-loopback address, bad TLS files)."""


def build_upstream(cfg: UpstreamConfig, env: Mapping[str, str] | None = None) -> Upstream:
    """The configured upstream, or an `UnavailableUpstream` saying why not (the gateway still starts)."""
    env = os.environ if env is None else env
    key = env.get(cfg.api_key_env, "")
    if cfg.kind == "gemini":
        if not key:
            return UnavailableUpstream(f"upstream unavailable: {cfg.api_key_env} not set")
        from .upstreams.gemini import GeminiUpstream

        # the HTTP timeout sits past the call deadline (also cfg.timeout) so the deadline, not a retryable read
        # timeout, ends a call that takes too long
        return GeminiUpstream(key, base_url=cfg.base_url, timeout=cfg.timeout + 1)
    from .upstreams.openai_compat import OpenAICompatUpstream

    if cfg.kind == "openai" and not cfg.base_url:
        return UnavailableUpstream("upstream unavailable: gateway.upstream.base_url not set for kind openai")
    return OpenAICompatUpstream(cfg.base_url or "http://127.0.0.1:8080/v1", api_key=key or None,
                                timeout=cfg.timeout + 1, llamacpp=cfg.kind == "llamacpp")


class _DetailedHealth(HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.details: dict[str, str] = {}
        self.process_detail: Callable[[], str] | None = None  # live detail of the process entry ("")

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        detail = self.details.get(request.service)
        if request.service == "" and self.process_detail is not None:
            detail = self.process_detail() or detail
        if detail:
            context.set_trailing_metadata(((DETAIL_KEY, detail),))
        return await super().Check(request, context)


class Gateway:
    """One gateway: `async with Gateway(config, data_dir) as gw:` serves on `gw.address` until the block ends.

    Its state lives in `store` (a URL or StoreTarget; `--store`), else in fleet.yaml's `store.url` when that is
    PostgreSQL (shared with the controller and the other gateways), else in DATA_DIR/gateway.db. A `sqlite:///`
    store.url in fleet.yaml names the controller's file, so it is not the gateway's (one writer per SQLite file)."""

    def __init__(self, config: FleetConfig, data_dir: str | Path, *, listen: str | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 upstream: Upstream | None = None, env: Mapping[str, str] | None = None, grace: float = 10.0,
                 retry_base_delay: float = 0.25, auth_cache_ttl: float = 2.0,
                 metrics_listen: str | None = None, store: str | Path | StoreTarget | None = None) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        shared = config.store.url if config.store.url and not config.store.url.startswith("sqlite:") else None
        self.store = as_target(store) if store is not None else gateway_target(shared, self.data_dir)
        self.gateway_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.listen = listen or config.gateway.listen
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        if bool(tls_cert) != bool(tls_key):
            raise ListenError("--tls-cert and --tls-key go together")
        host = self.listen.rsplit(":", 1)[0]
        if self.tls is None and not is_loopback(host):
            raise ListenError(f"refusing to serve device tokens in plaintext on {self.listen}: "
                              "give --tls-cert/--tls-key or listen on a loopback address")
        self.metrics_listen = metrics_listen or config.gateway.metrics_listen
        token_env = config.gateway.metrics_token_env
        self._metrics_token = (os.environ if env is None else env).get(token_env) or None
        if self.metrics_listen and self._metrics_token is None and not is_loopback(
                self.metrics_listen.rsplit(":", 1)[0]):
            raise ListenError(f"refusing to serve /metrics on {self.metrics_listen} without a token: set "
                              f"{token_env} (gateway.metrics_token_env) or listen on a loopback address")
        self.metrics = GatewayMetrics()
        self.metrics_port = 0
        self._metrics_server: tuple[Any, asyncio.Task[Any]] | None = None
        self.grace = grace
        cfg = config.gateway.upstream
        inner = upstream if upstream is not None else build_upstream(cfg, env)
        self.upstream = RetryingUpstream(inner, max_retries=cfg.max_retries, base_delay=retry_base_delay)
        self._auth_ttl = auth_cache_ttl
        self.port = 0
        self.db: GatewayDb | None = None
        self.service: InferenceService | None = None
        self.health = _DetailedHealth()
        self._server: grpc.aio.Server | None = None

    @property
    def db_path(self) -> Path:
        """The SQLite file (the store's path; DATA_DIR/gateway.db when the store is PostgreSQL, unused then)."""
        return self.store.path if self.store.path is not None else self.data_dir / DB_NAME

    @property
    def address(self) -> str:
        return f"{self.listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def upstream_detail(self) -> str:
        return self.upstream.unavailable or f"upstream {self.upstream.name} configured"

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        gw = self.config.gateway
        self.db = db = await asyncio.to_thread(open_store, self.store, budgets.housekeeping(gw.idempotency_window),
                                               1.0)
        hold_s = gw.upstream.timeout + budgets.HOLD_MARGIN_S  # no call of ours outlives its upstream timeout
        ledger = UsageLedger(db, gw.prices_per_million, budgets.Budgets(db, self.gateway_id, hold_s))
        metrics = self.metrics
        ledger.on_record = lambda row: metrics.charged(row.model, row.input_tokens, row.output_tokens, row.cost_usd)
        idem = Idempotency(db, gw.idempotency_window, gateway_id=self.gateway_id, hold_s=hold_s)
        self.service = InferenceService(self.config, self.upstream, Authenticator(db, self.config.fleet,
                                        self._auth_ttl), ledger, idem, metrics=self.metrics)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 << 20)])
        self.health.process_detail = self.service.health_detail
        inference_pb2_grpc.add_InferenceServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        serving = health_pb2.HealthCheckResponse.SERVING
        state = serving if not self.upstream.unavailable else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in (INFERENCE_SERVICE, UPSTREAM_SERVICE):
            await self.health.set(name, state)
            self.health.details[name] = self.upstream_detail
        try:
            if self.tls:
                creds = grpc.ssl_server_credentials([(self.tls[1].read_bytes(), self.tls[0].read_bytes())])
                self.port = server.add_secure_port(self.listen, creds)
            else:
                self.port = server.add_insecure_port(self.listen)
        except (OSError, RuntimeError) as exc:
            await self._close_storage()
            raise ListenError(f"cannot listen on {self.listen}: {exc}") from exc
        await self.upstream.open()  # its connection pool, before the first call's deadline runs
        await server.start()
        self._server = server
        if self.metrics_listen:
            try:
                await self._start_metrics(self.metrics_listen)
            except BaseException:
                await self.stop(0)
                raise
        if self.upstream.unavailable:
            log.warning("gateway NOT_SERVING inference: %s", self.upstream.unavailable)
        log.info("gateway for fleet %s listening on %s (%s), upstream: %s", self.config.fleet, self.address,
                 "TLS" if self.tls else "plaintext, loopback", self.upstream_detail)

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let calls in flight finish within `grace` seconds, then cancel the rest; every step
        runs even when one fails, and what failed is raised at the end."""
        if self._server is None:
            return
        server, self._server = self._server, None
        errors: list[BaseException] = []
        if self._metrics_server is not None:
            (metrics_server, task), self._metrics_server = self._metrics_server, None
            metrics_server.should_exit = True
            await asyncio.wait([task], timeout=5)  # a failure there is the supervisor's to log
        await self.health.enter_graceful_shutdown()
        await server.stop(self.grace if grace is None else grace)
        if self.service is not None:
            errors += await self.service.drain()
        for step in (self.upstream.close, self._close_storage):
            try:
                await step()
            except Exception as exc:  # collected: the next step still runs; raised below
                log.exception("gateway: %s failed while stopping", step.__name__)
                errors.append(exc)
        if errors:
            raise BaseExceptionGroup("gateway: errors while stopping", errors)

    async def _start_metrics(self, listen: str) -> None:
        """uvicorn in this loop, under the service's task supervisor (a crash is logged and shown by health)."""
        import uvicorn

        assert self.service is not None

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the gateway's process handles signals itself
                yield

        host, port = listen.rsplit(":", 1)
        server = _Server(uvicorn.Config(MetricsApp(self.metrics, self._metrics_token), host=host, port=int(port),
                                        log_level="warning", access_log=False, lifespan="off"))
        task = self.service.tasks.spawn(server.serve, "metrics", on_death="log", forever=False)
        while not server.started:
            if task.done():
                raise ListenError(f"cannot serve /metrics on {listen}: the listener did not start (see the log)")
            await asyncio.sleep(0.01)
        self._metrics_server = (server, task)
        self.metrics_port = server.servers[0].sockets[0].getsockname()[1] if server.servers else int(port)
        log.info("gateway metrics on http://%s:%d/metrics (%s)", host, self.metrics_port,
                 "bearer token" if self._metrics_token else "loopback, no token")

    async def _close_storage(self) -> None:
        if self.db is not None:
            await asyncio.to_thread(self.db.close)
            self.db = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
