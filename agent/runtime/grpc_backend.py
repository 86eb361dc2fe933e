"""A client of our `Inference` gRPC service as a backend: the local bridge (an Android companion exposing AICore's
Gemini Nano, a llama.cpp server on a Jetson) and the cloud route to the fleet gateway are both this class.

Every call has a deadline; the device token goes in `authorization: Bearer …` metadata; TLS when a CA is given.
A circuit breaker (`breaker.py`) opens on a transport failure, so the router stops choosing a dead route, and lets
one probe call through after its cooldown (doubling, capped, while probes keep failing), so the route comes back.

gRPC status → our errors (`runtime/base.py` tree; the cloud-specific leaves are defined here)::

    UNAVAILABLE, no answer to health   GatewayUnreachable (BackendUnavailable, 503 cloud_unavailable)
    UNAVAILABLE, the server answers    CloudNotServing (BackendUnavailable, 503, reason cloud_not_serving): the
      its health check                 gateway is up but says its upstream cannot serve (its UpstreamError tree)
    DEADLINE_EXCEEDED                  BackendTimeout (504)
    FAILED_PRECONDITION                CloudRefused (Refused, 403 cloud_refused): the gateway's policy said no
    PERMISSION_DENIED, UNAUTHENTICATED GatewayRefused (Refused, 403, reason cloud_refused): token unknown, revoked
    RESOURCE_EXHAUSTED                 RateLimited (Busy, 429 rate_limited) with the gateway's retry-after
    INVALID_ARGUMENT, OUT_OF_RANGE     BadRequest (400)

As a local bridge (`role="bridge"`) the model is on this device, so "busy" or "refused for now" means "the local
model is unavailable for now" (ML Kit's BUSY, BACKGROUND_USE_BLOCKED, battery quota...): UNAVAILABLE (breaker open),
RESOURCE_EXHAUSTED and FAILED_PRECONDITION all become `BridgeUnavailable` (503, reason `model_unavailable`) with the
bridge's `retry-after` trailer, and the route is paused that long — before the first token the router falls back.

Several gateways (`address` a list, role "gateway"): one channel, gRPC's `round_robin` with client-side health
checking (`grpc_target.py`), so a dead or NOT_SERVING gateway leaves the rotation and comes back when it serves. A
call cut by a gateway that dies under it (UNAVAILABLE) is sent once more, within its deadline, when a health check
still finds a gateway answering — to the live one; a stream only before its first chunk (never a duplicate token).
Repeating is safe: the request_id is the gateway's idempotency key. Only when no gateway answers does the breaker
open. One address (also one DNS name with several A records) goes through the same channel setup.

The route's `state` (for /v1/status and the router's Connectivity) keeps these apart: `unknown` (no call yet),
`serving`, `unreachable` (transport), `not_serving` (reachable, the server says it cannot serve: the gateway's health
check answers — grpc.health.v1, called by hand so the device needs no extra package), `refused` (the device's
credentials); `why` carries the server's own words. The three failures open the breaker, so the router stops choosing
the route and one probe goes through after the cooldown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc

from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    BadRequest,
    Busy,
    ChatRequest,
    Chunk,
    Completion,
    Refused,
    Usage,
)
from nanofleet.agent.runtime.breaker import CircuitBreaker
from nanofleet.agent.runtime.grpc_target import PROBE_SERVICE_CONFIG, SERVICE_CONFIG, channel_target
from nanofleet.protos import inference_pb2, inference_pb2_grpc

log = logging.getLogger("nanofleet.agent.runtime")

_TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CloudRefused(Refused):
    """The gateway refused by policy (FAILED_PRECONDITION: cloud denied for the device or app, sensitive data).
    `reason` is a routing-reason slug for X-Nanofleet-Reason; the message carries the gateway's own words."""

    code = "cloud_refused"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class RateLimited(Busy):
    """The gateway or its upstream said 429 / RESOURCE_EXHAUSTED (rate limit, spent budget); `retry_after` is its
    delay. (`Busy` with code `busy` stays for the local slots being full.)"""

    code = "rate_limited"


class GatewayUnreachable(BackendUnavailable):
    """Transport failure, or the circuit breaker is open: `retry_after` is the time left until the next probe."""

    code = "cloud_unavailable"
    reason = "gateway_unreachable"


class CloudNotServing(BackendUnavailable):
    """The gateway answered but cannot serve (its upstream is down or unconfigured): `retry_after` until the probe."""

    code = "cloud_unavailable"
    reason = "cloud_not_serving"


class GatewayRefused(Refused):
    """The gateway refused this device's credentials (UNAUTHENTICATED / PERMISSION_DENIED: unknown or revoked)."""

    code = "cloud_refused"
    reason = "cloud_refused"


RouteState = Literal["unknown", "serving", "unreachable", "not_serving", "refused"]
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_HEALTH_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


class BridgeUnavailable(BackendUnavailable):
    """The local bridge cannot serve now (unreachable, busy, blocked): `retry_after` is when to try it again."""

    reason = "model_unavailable"


_BRIDGE_PAUSE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


def _retry_after(exc: grpc.aio.AioRpcError, default: float) -> float:
    """The server's `retry-after` trailer in seconds (bounded to a day), or `default` if absent or malformed."""
    value = dict(exc.trailing_metadata() or ()).get("retry-after")
    try:
        seconds = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return min(max(seconds, 0.0), 86_400.0) if seconds == seconds else default


def _refusal_reason(detail: str) -> str:
    """A slug for the gateway's policy refusal, from its message (the gateway sends words, not a code)."""
    text = detail.lower()
    if "cloud denied" in text:
        return "cloud_denied"
    if "sensitive" in text:
        return "sensitive"
    return "cloud_refused"


class GrpcBackend(Backend):
    def __init__(
        self, address: str | Sequence[str], *, token: str | None = None, ca: Path | None = None,
        timeout: float = 30.0, name: str = "cloud", model: str = "", failure_threshold: int = 1,
        cooldown: float = 5.0, max_cooldown: float = 60.0, clock: Callable[[], float] = time.monotonic,
        role: Literal["gateway", "bridge"] = "gateway", tls_name: str | None = None,
    ) -> None:
        self.addresses = (address,) if isinstance(address, str) else tuple(address)
        self.target = channel_target(self.addresses)
        self.address = ",".join(self.addresses)
        self.tls_name = tls_name
        self.failovers = 0         # calls sent again after the gateway they were on failed (several gateways)
        self._probe_channel: grpc.aio.Channel | None = None
        self.role = role
        self.name = name
        self.model = model
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._ca = ca.read_bytes() if ca else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._closing: set[asyncio.Task[None]] = set()
        self.breaker = CircuitBreaker(cooldown, max_cooldown, failure_threshold)
        self._clock = clock
        self._paused_until = 0.0   # a bridge said "busy, retry in N s" (RESOURCE_EXHAUSTED...): no call until then
        self.last_error = ""       # what made it unreachable or paused, for /v1/status
        self.state: RouteState = "unknown"
        self.why = ""              # the server's (or the transport's) words for `state`
        self.served_model = ""     # the model named in the last answer
        # called when the route may have opened (back to serving; the breaker's cooldown over, a probe may go):
        # the offline queue's drainer looks at its entries then, not at its next tick
        self.on_open: Callable[[], None] | None = None
        self.on_open_errors = 0
        self._half_open: asyncio.TimerHandle | None = None

    @property
    def reachable(self) -> bool:
        """The breaker admits a call now (closed, or half-open with its probe slot free), and no pause holds."""
        now = self._clock()
        return now >= self._paused_until and self.breaker.available(now)

    @property
    def circuit_open(self) -> bool:
        """Calls paused: the breaker is open (or its half-open probe is in flight)."""
        return not self.reachable

    @property
    def retry_in(self) -> float:
        """Seconds until the breaker (and any pause) lets a call through (0 if one may go now)."""
        now = self._clock()
        return max(self.breaker.retry_in(now), self._paused_until - now, 0.0)

    @property
    def several(self) -> bool:
        """Several gateways listed: a failed call may be sent again to another one."""
        return self.role == "gateway" and len(self.addresses) > 1

    def _new_channel(self, service_config: str | None) -> grpc.aio.Channel:
        # A channel of its own subchannels: with gRPC's global pool a fresh channel (the probe) could reuse the
        # old channel's subchannel still in its connect backoff and fail at once although the server is back.
        # Reconnect backoff capped at 10 s: a gateway that restarts is back in the rotation within seconds.
        options: list[tuple[str, Any]] = [
            ("grpc.keepalive_time_ms", 300_000), ("grpc.max_receive_message_length", 16 << 20),
            ("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 10_000)]
        if service_config is not None:
            options.append(("grpc.service_config", service_config))
        if self.tls_name:
            options.append(("grpc.default_authority", self.tls_name))
        if self._ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._ca)
            return grpc.aio.secure_channel(self.target, creds, options=options)
        return grpc.aio.insecure_channel(self.target, options=options)

    def _stub_now(self) -> Any:
        if self._stub is None:  # channels bind to the running event loop: create on first use
            self._channel = self._new_channel(SERVICE_CONFIG if self.role == "gateway" else None)
            self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        return self._stub

    def _health_channel(self) -> grpc.aio.Channel:
        """The channel health checks go on. For the gateways, one without client-side health checking: the calls'
        channel has no route to a NOT_SERVING gateway, yet that gateway's own words are what `state` shows."""
        if self.role != "gateway":
            self._stub_now()
            assert self._channel is not None
            return self._channel
        if self._probe_channel is None:
            self._probe_channel = self._new_channel(PROBE_SERVICE_CONFIG)
        return self._probe_channel

    def _drop_channel(self) -> None:
        """After a transport failure the next call (the probe) gets a fresh channel: an old one may sit in gRPC's
        own reconnect backoff and fail the probe at once although the gateway is back. Calls still running on the
        old one may finish within their deadline."""
        channel, self._channel, self._stub = self._channel, None, None
        probe, self._probe_channel = self._probe_channel, None
        for old in (channel, probe):
            if old is not None:
                task = asyncio.ensure_future(old.close(grace=self.timeout))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _admit(self) -> bool:
        """Ask the breaker; True if this call is the half-open probe. Raises while the breaker is open."""
        now = self._clock()
        if now < self._paused_until:
            raise BridgeUnavailable(f"{self.name} ({self.address}) {self.last_error}; next try in "
                                    f"{self.retry_in:.0f}s", retry_after=max(self.retry_in, 1.0))
        probe = self.breaker.acquire(now)
        if probe is None:
            wait = self.retry_in
            if self.role == "gateway" and self.state == "not_serving":
                raise CloudNotServing(f"{self.name} ({self.address}) is not serving: {self.why}; next try in "
                                      f"{wait:.0f}s", retry_after=max(wait, 1.0))
            if self.role == "gateway" and self.state == "refused":
                raise GatewayRefused(f"{self.name} ({self.address}) refused this device: {self.why}; next try in "
                                     f"{wait:.0f}s", retry_after=max(wait, 1.0))
            if self.role == "bridge":
                raise BridgeUnavailable(f"{self.name} ({self.address}) {self.last_error}; next try in {wait:.0f}s",
                                        retry_after=max(wait, 1.0))
            raise GatewayUnreachable(
                f"{self.name} ({self.address}) unreachable: calls paused after a failure; next try in {wait:.0f}s",
                retry_after=max(wait, 1.0))
        return probe

    async def _health(self) -> tuple[str, str] | None:
        """The server's own health of the Inference service and its `nanofleet-detail`, or None when it does not
        answer at all (so the failure was the transport's). A server without the health service still answered."""
        service = b"nanofleet.v1.Inference"
        check = self._health_channel().unary_unary(_HEALTH_CHECK, request_serializer=None, response_deserializer=None)
        call = check(b"\n" + bytes([len(service)]) + service, timeout=min(2.0, self.timeout))
        try:
            raw: bytes = await call
            trailing = await call.trailing_metadata()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSPORT:
                return None
            return exc.code().name, exc.details() or ""
        status = raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0
        return _HEALTH_NAMES.get(status, "UNKNOWN"), dict(trailing or ()).get("nanofleet-detail", "")

    async def _failure(self, exc: grpc.aio.AioRpcError, probe: bool) -> BackendError:
        """`_error`, after telling an UNAVAILABLE the server sent (not serving) from one of the transport."""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            health = await self._health()
            if health is not None:
                return self._not_serving(exc, health, probe)
        return self._error(exc, probe)

    def _set_state(self, state: RouteState, why: str = "") -> None:
        was, self.state, self.why = self.state, state, why
        if state == "serving" and was != "serving":
            self._opened()

    def _breaker_failure(self, probe: bool) -> None:
        """The breaker's verdict; when it (re)opens, `on_open` is called again as its cooldown ends."""
        self.breaker.failure(self._clock(), probe)
        if self.breaker.open_until is None or self.on_open is None:
            return
        if self._half_open is not None:
            self._half_open.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a sync caller): the drainer's tick still looks later
            return
        self._half_open = loop.call_later(self.breaker.retry_in(self._clock()) + 0.01, self._opened)

    def _opened(self) -> None:
        self._half_open = None
        if self.on_open is None:
            return
        try:
            self.on_open()
        except Exception:  # a hook's bug must not break the call that reported the route open: logged, counted
            self.on_open_errors += 1
            log.exception("%s (%s): the on_open hook failed", self.name, self.address)

    def _not_serving(self, exc: grpc.aio.AioRpcError, health: tuple[str, str], probe: bool) -> BackendError:
        detail, (status, health_detail) = exc.details() or "", health
        self._breaker_failure(probe)
        why = detail if not health_detail or health_detail in detail else f"{detail} ({health_detail})"
        self._set_state("not_serving", f"{why} [health: {status}]")
        self.last_error = f"not serving: {self.why}"
        wait = max(self.retry_in, 1.0)
        where = f"{self.name} ({self.address})"
        if self.role == "bridge":
            self._pause(_retry_after(exc, 1.0))  # a bridge's own "come back in N s" (ML Kit BUSY)
            return BridgeUnavailable(f"{where} {self.last_error}", retry_after=max(self.retry_in, 1.0))
        return CloudNotServing(f"{where} is reachable but not serving: {why}", retry_after=wait)

    def _error(self, exc: grpc.aio.AioRpcError, probe: bool) -> BackendError:
        code, detail = exc.code(), exc.details() or ""
        where = f"{self.name} ({self.address})"
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            self._breaker_failure(probe)  # a revoked token stays refused: probe after the cooldown
            self._set_state("refused", f"{code.name}: {detail}")
            self.last_error = f"refused: {self.why}"
            return GatewayRefused(f"{where} refused: {detail}", retry_after=max(self.retry_in, 1.0))
        if code in _TRANSPORT:
            self._set_state("unreachable", f"{code.name}: {detail}")
            self._breaker_failure(probe)
            if self.breaker.open_until is not None:
                self._drop_channel()
            self.last_error = f"unreachable: {code.name}: {detail}"
            if code == grpc.StatusCode.UNAVAILABLE and self.role == "bridge":
                self._pause(_retry_after(exc, 0.0))  # a bridge's own "come back in N s" (ML Kit BUSY)
            wait = max(self.retry_in, 1.0)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return BackendTimeout(f"{where}: deadline of {self.timeout}s exceeded")
            if self.role == "bridge":
                return BridgeUnavailable(f"{where} {self.last_error}", retry_after=wait)
            return GatewayUnreachable(f"{where} unavailable: {detail}", retry_after=wait)
        self.breaker.success()  # it answered, so it is reachable
        self._set_state("serving")
        if self.role == "bridge" and code in _BRIDGE_PAUSE:
            self.last_error = f"busy: {code.name}: {detail}"
            self._pause(_retry_after(exc, 1.0))
            return BridgeUnavailable(f"{where} {self.last_error}", retry_after=max(self.retry_in, 1.0))
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return CloudRefused(f"{where} refused: {detail}", reason=_refusal_reason(detail))
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
            return BadRequest(f"{where}: {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry = dict(exc.trailing_metadata() or ()).get("retry-after")
            return RateLimited(f"{where}: {detail}", retry_after=float(retry) if retry else 1.0)
        return BackendUnavailable(f"{where}: {code.name}: {detail}")

    def _pause(self, seconds: float) -> None:
        if seconds > 0:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def _request(self, req: ChatRequest) -> inference_pb2.GenerateRequest:
        system = "\n".join(m["content"] for m in req.messages if m["role"] == "system")
        config = inference_pb2.GenerationConfig(stop=req.stop)
        if req.temperature is not None:
            config.temperature = req.temperature
        if req.top_k is not None:
            config.top_k = req.top_k
        if req.top_p is not None:
            config.top_p = req.top_p
        if req.max_tokens is not None:
            config.max_output_tokens = req.max_tokens
        return inference_pb2.GenerateRequest(
            request_id=req.request_id, app_id=req.app_id, model=self.model, system_instruction=system,
            messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"])
                      for m in req.messages if m["role"] != "system"],
            config=config, sensitive=req.sensitive,
        )

    async def generate(self, request: ChatRequest) -> Completion:
        msg = self._request(request)
        resp = await self._call(lambda stub, timeout: stub.Generate(msg, timeout=timeout, metadata=self._metadata))
        self.served_model = resp.model or self.served_model
        return Completion(resp.text, resp.finish_reason or "stop", _usage(resp.usage), resp.model or self.name)

    async def _failover(self, exc: grpc.aio.AioRpcError, deadline: float) -> bool:
        """With several gateways: may a call that failed UNAVAILABLE go once more? Yes when time is left and a
        gateway still answers SERVING (the failed one died under the call, or its upstream failed: the next pick
        is another gateway). No gateway answering, or all saying NOT_SERVING, is the route's failure."""
        if not self.several or exc.code() != grpc.StatusCode.UNAVAILABLE or deadline - time.monotonic() < 0.05:
            return False
        health = await self._health()
        if health is None or health[0] != "SERVING":
            return False
        self.failovers += 1
        log.info("%s (%s): a call failed (%s: %s); sent again to another gateway", self.name, self.address,
                 exc.code().name, exc.details())
        return True

    async def _call(self, send: Callable[[Any, float], Awaitable[Any]]) -> Any:
        """One unary call through the breaker: its outcome is the breaker's verdict on the route."""
        probe = self._admit()
        verdict = False
        deadline = time.monotonic() + self.timeout
        retried = False
        try:
            while True:
                try:
                    resp = await send(self._stub_now(), max(deadline - time.monotonic(), 0.001))
                    break
                except grpc.aio.AioRpcError as exc:
                    if retried or not await self._failover(exc, deadline):
                        raise
                    retried = True
            verdict = True
            self.breaker.success()
            self._set_state("serving")
            return resp
        except grpc.aio.AioRpcError as exc:
            verdict = True
            raise await self._failure(exc, probe) from exc
        finally:
            if not verdict:
                self.breaker.release(probe)

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        probe = self._admit()
        verdict = False
        msg = self._request(request)
        deadline = time.monotonic() + self.timeout
        retried = False
        call = self._stub_now().GenerateStream(msg, timeout=self.timeout, metadata=self._metadata)
        try:
            while True:
                try:
                    async for chunk in call:
                        if not verdict:
                            verdict = True
                            self.breaker.success()
                            self._set_state("serving")
                        self.served_model = chunk.model or self.served_model
                        yield Chunk(chunk.text, chunk.finish_reason or None,
                                    _usage(chunk.usage) if chunk.HasField("usage") else None,
                                    chunk.model or self.name)
                    break
                except grpc.aio.AioRpcError as exc:
                    # before the first chunk only: after it, sending again would repeat tokens the caller has
                    if verdict or retried or not await self._failover(exc, deadline):
                        raise
                    retried = True
                    call = self._stub_now().GenerateStream(msg, timeout=max(deadline - time.monotonic(), 0.001),
                                                          metadata=self._metadata)
            if not verdict:
                verdict = True
                self.breaker.success()
                self._set_state("serving")
        except grpc.aio.AioRpcError as exc:
            verdict = True
            raise await self._failure(exc, probe) from exc
        finally:
            call.cancel()  # a consumer that stops early stops the remote generation too
            if not verdict:
                self.breaker.release(probe)

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        msg = inference_pb2.CountTokensRequest(model=self.model, system_instruction=system, messages=[
            inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages if m["role"] != "system"])
        resp = await self._call(lambda stub, timeout: stub.CountTokens(msg, timeout=timeout, metadata=self._metadata))
        return int(resp.total_tokens)

    async def close(self) -> None:
        if self._half_open is not None:
            self._half_open.cancel()
            self._half_open = None
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None
        if self._probe_channel is not None:
            await self._probe_channel.close()
            self._probe_channel = None
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)


def _usage(u: inference_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=u.input_tokens, completion_tokens=u.output_tokens)
