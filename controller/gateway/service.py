"""The `Inference` servicer: auth → request check → policy → idempotency → budget → upstream → usage.

Every call runs under a deadline: the caller's, capped by the upstream timeout (a call without one gets the cap).
A unary call with a request_id runs in its own task, so an answer the device gave up on still completes once,
is charged once and is returned to the device's retry for free. Such detached work (and the usage of a stream the
device left) runs under nanofleet.tasks.TaskSupervisor: an error it was not built to answer is logged and recorded in
`tasks.deaths`, which the health service shows. A bug (not a GatewayError) inside a call with a request_id is logged
here with its traceback and handed to every caller waiting on that request_id as InternalError (INTERNAL, counted);
the request_id is forgotten, so a retry after the fix runs afresh.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from nanofleet.config import FleetConfig, Profile
from nanofleet.protos import inference_pb2, inference_pb2_grpc
from nanofleet.tasks import TaskSupervisor

from . import rules
from .auth import Authenticator, DeviceIdentity
from .budgets import BudgetRefused, Reservation, input_bound
from .errors import DeadlineExceeded, GatewayError, InternalError, PolicyRefused, UpstreamError
from .idempotency import Idempotency
from .metrics import GatewayMetrics
from .requests import count_request, pick_model, to_upstream
from .upstreams.base import UpstreamChunk, UpstreamRequest, UpstreamResult
from .upstreams.retrying import RetryingUpstream
from .usage import UsageLedger

log = logging.getLogger("nanofleet.gateway")
T = TypeVar("T")


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, config: FleetConfig, upstream: RetryingUpstream, auth: Authenticator, ledger: UsageLedger,
                 idempotency: Idempotency, clock: Callable[[], float] = time.time,
                 metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.upstream = upstream
        self.auth = auth
        self.ledger = ledger
        self.idem = idempotency
        self.clock = clock
        self.refusals: collections.Counter[str] = collections.Counter()  # status code name -> count
        self.upstream_calls = 0
        self.bugs = 0  # exceptions outside the GatewayError tree, counted where they happen (a caller may be gone)
        self.last_bug = ""  # its type only: the health detail reaches devices, the traceback is in the log
        self._profiles: dict[tuple[str, str | None], Profile] = {}
        self.tasks = TaskSupervisor("gateway")
        self._detached: set[asyncio.Task[Any]] = set()
        gw = config.gateway
        self._timeout = gw.upstream.timeout
        self._offered = frozenset(gw.prices_per_million)
        self.metrics = metrics or GatewayMetrics()
        self.metrics.watch(lambda: self.upstream.retries, lambda: self.bugs)
        self.idem.spawn = self._spawn

    # -- helpers -------------------------------------------------------------------------------------------------

    def profile_of(self, identity: DeviceIdentity) -> Profile:
        """fleet.yaml's profile for the device; an unlisted device gets its token's group (else the defaults)."""
        key = (identity.device_id, identity.group)
        profile = self._profiles.get(key)
        if profile is None:
            cfg = self.config
            if identity.device_id not in cfg.devices and identity.group in cfg.groups:
                data = cfg.model_dump()
                data["devices"] = {identity.device_id: {"group": identity.group}}
                cfg = FleetConfig.model_validate(data)
            profile = cfg.profile_for(identity.device_id)
            self._profiles[key] = profile
        return profile

    def _budget_left(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else max(0.0, min(timeout, self._timeout))

    async def _within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(seconds):
                return await awaitable
        except TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded after {seconds:.3f}s waiting for the upstream") from None

    async def _abort(self, context: grpc.aio.ServicerContext, exc: GatewayError, method: str) -> None:
        self.refusals[exc.code.name] += 1
        self.metrics.calls.labels(method, exc.code.name).inc()
        message = str(exc)
        trailing: tuple[tuple[str, str], ...] = ()
        if exc.retry_after is not None:
            seconds = max(1, math.ceil(exc.retry_after))
            trailing = (("retry-after", str(seconds)),)
            if "retry in" not in message.lower():
                message = f"{message}; retry in {seconds}s"
        log.info("refused %s: %s", exc.code.name, message)
        await context.abort(exc.code, message, trailing_metadata=trailing)

    async def _internal(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        await self._abort(context, self._bug(exc), method)

    def _bug(self, exc: Exception) -> InternalError:
        """Log a bug with its traceback, count it, and return the INTERNAL answer that shows only its type."""
        log.error("internal gateway error", exc_info=exc)
        self.bugs += 1
        self.last_bug = type(exc).__name__
        return InternalError.about(exc)

    def _fail_key(self, key: tuple[str, str], exc: BaseException, what: str) -> BaseException:
        """Answer every caller waiting on `key` with what went wrong; returns the error to raise in its place.

        A bug is logged here (no caller may be left to log it: the device may have given up) and becomes
        InternalError, not a retryable UNAVAILABLE that would send the device back into the same bug."""
        if isinstance(exc, GatewayError):
            self.idem.fail(key, exc)
            return exc
        if isinstance(exc, Exception):
            internal = self._bug(exc)
            self.idem.fail(key, internal)
            return internal
        self.idem.fail(key, UpstreamError(f"the original {what} with this request_id was interrupted"))
        return exc

    async def _admit(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                     ) -> tuple[DeviceIdentity, UpstreamRequest]:
        identity = await self.auth.authenticate(context.invocation_metadata())
        up = self.config.gateway.upstream
        model = pick_model(request.model, up.model, self._offered)
        upstream_request = to_upstream(request, model, up.thinking_budget)
        reason = rules.check_policy(self.profile_of(identity), identity.device_id, request.app_id, request.sensitive)
        if reason is not None:
            raise PolicyRefused(reason)
        if self.upstream.unavailable:
            raise UpstreamError(self.upstream.unavailable)
        return identity, upstream_request

    async def _reserve(self, identity: DeviceIdentity, app_id: str, up_req: UpstreamRequest,
                       ) -> tuple[Reservation, UpstreamRequest]:
        """Hold the call's worst case on its budgets (shared by every gateway: nanofleet.controller.gateway.budgets);
        the upstream gets the output cap that fits."""
        budgets = self.config.gateway.budgets
        limits = rules.limits_for(self.profile_of(identity), app_id, budgets.app_tokens_per_day,
                                  budgets.fleet_tokens_per_day)
        try:
            held = await self.ledger.budgets.reserve(identity.device_id, app_id, limits, input_bound(up_req),
                                                     up_req.max_output_tokens, self.clock())
        except BudgetRefused as refusal:
            self.metrics.budget_refusals.labels(refusal.scope).inc()
            raise
        if held.max_output != up_req.max_output_tokens:
            up_req = dataclasses.replace(up_req, max_output_tokens=held.max_output)
        return held, up_req

    @contextlib.contextmanager
    def _timed(self, method: str) -> Iterator[None]:
        """The upstream latency histogram: `ok`, or `error` when the block raised (a timeout included)."""
        started, outcome = time.monotonic(), "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.metrics.upstream_latency.labels(method, outcome).observe(time.monotonic() - started)

    def _spawn(self, coro: Awaitable[T], name: str) -> asyncio.Task[T | None]:
        """Detached one-shot work under the supervisor; `drain()` gives it time to finish."""

        async def run() -> T | None:
            try:
                return await coro
            except GatewayError:  # already the caller's answer (through the idempotency record): not a death
                return None

        task = self.tasks.spawn(run, name, on_death="log", forever=False)
        self._detached.add(task)
        task.add_done_callback(self._detached.discard)
        return task

    # -- Generate ------------------------------------------------------------------------------------------------

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        seconds = self._budget_left(context.time_remaining())
        try:
            identity, up_req = await self._admit(request, context)
            if not request.request_id:
                answer = await self._within(seconds, self._generate(identity, request, up_req, seconds, None))
                self.metrics.calls.labels("Generate", "OK").inc()
                return answer
            key = (identity.device_id, request.request_id)
            found = await self.idem.lookup(key, self.clock())
            if isinstance(found, inference_pb2.GenerateResponse):
                self.metrics.calls.labels("Generate", "OK").inc()
                return found
            if found is None:  # this call owns the request_id now
                found = self.idem.peek(key, self.clock())
                # the upstream call gets the gateway's cap, not this caller's deadline: if the device gives up,
                # the answer still lands once and its retry (same request_id) gets it without a second charge
                self._spawn(self._generate(identity, request, up_req, self._timeout, key), "generate")
            assert isinstance(found, asyncio.Future)
            answer = await self._within(seconds, asyncio.shield(found))
            self.metrics.calls.labels("Generate", "OK").inc()
            return answer
        except GatewayError as exc:
            await self._abort(context, exc, "Generate")
            raise AssertionError("unreachable") from exc
        except Exception as exc:
            await self._internal(context, exc, "Generate")
            raise AssertionError("unreachable") from exc

    async def _generate(self, identity: DeviceIdentity, request: inference_pb2.GenerateRequest,
                        up_req: UpstreamRequest, seconds: float, key: tuple[str, str] | None,
                        ) -> inference_pb2.GenerateResponse:
        held: Reservation | None = None
        try:
            held, up_req = await self._reserve(identity, request.app_id, up_req)
            self.upstream_calls += 1
            deadline = time.monotonic() + seconds
            with self._timed("Generate"):
                result = await self._within(seconds, self.upstream.generate(up_req, deadline=deadline))
            response = _response(request.request_id, result)
            await self._account(identity, request.app_id, result, response, key, held)
            held = None
            return response
        except BaseException as exc:
            if held is not None:
                self.ledger.budgets.release(held)
            error = exc if key is None else self._fail_key(key, exc, "call")
            if error is exc:
                raise
            raise error from exc

    async def _account(self, identity: DeviceIdentity, app_id: str, result: UpstreamResult,
                       response: inference_pb2.GenerateResponse | None, key: tuple[str, str] | None,
                       held: Reservation) -> None:
        now = self.clock()
        also = self.idem.committer(key, response, now) if key is not None and response is not None else None
        await self.ledger.record(identity.device_id, app_id, result.model, result.input_tokens, result.output_tokens,
                                 now, also, held)
        if key is not None and response is not None:
            self.idem.finish(key, response, now)

    # -- GenerateStream ------------------------------------------------------------------------------------------

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateChunk]:
        seconds = self._budget_left(context.time_remaining())
        deadline = time.monotonic() + seconds
        try:
            identity, up_req = await self._admit(request, context)
            key = (identity.device_id, request.request_id) if request.request_id else None
            if key is not None:
                found = await self.idem.lookup(key, self.clock())
                if isinstance(found, asyncio.Future):
                    found = await self._within(seconds, asyncio.shield(found))
                if found is not None:
                    yield _replay(found)
                    self.metrics.calls.labels("GenerateStream", "OK").inc()
                    return
            async for chunk in self._stream(identity, request, up_req, deadline, key):
                yield chunk
            self.metrics.calls.labels("GenerateStream", "OK").inc()
        except GatewayError as exc:
            await self._abort(context, exc, "GenerateStream")
        except Exception as exc:  # noqa: BLE001 - logged, counted, answered INTERNAL by _internal
            await self._internal(context, exc, "GenerateStream")

    async def _stream(self, identity: DeviceIdentity, request: inference_pb2.GenerateRequest,
                      up_req: UpstreamRequest, deadline: float, key: tuple[str, str] | None,
                      ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        seen: list[UpstreamChunk] = []
        finished = False
        held: Reservation | None = None
        try:
            held, up_req = await self._reserve(identity, request.app_id, up_req)
            self.upstream_calls += 1
            chunks = self.upstream.stream(up_req, deadline=deadline)
            try:
                while True:
                    left = deadline - time.monotonic()
                    try:  # the latency histogram holds a stream's time to its first chunk
                        with self._timed("GenerateStream") if not seen else contextlib.nullcontext():
                            chunk = await self._within(max(left, 0.0), anext(chunks))
                    except StopAsyncIteration:
                        break
                    seen.append(chunk)
                    yield inference_pb2.GenerateChunk(request_id=request.request_id, text=chunk.text,
                                                      model=chunk.model or up_req.model)
            finally:
                await chunks.aclose()
            result = _fold(seen, up_req.model)
            response = _response(request.request_id, result)
            yield inference_pb2.GenerateChunk(request_id=request.request_id, finish_reason=result.finish_reason,
                                              usage=response.usage, model=result.model)
            finished = True
            await self._account(identity, request.app_id, result, response, key, held)
        except BaseException as exc:
            error = exc if key is None else self._fail_key(key, exc, "stream")
            if not finished and seen and held is not None:  # charged upstream even if the device went away
                partial = _fold(seen, up_req.model)
                self._spawn(self.ledger.record(identity.device_id, request.app_id, partial.model,
                                               partial.input_tokens, partial.output_tokens, self.clock(),
                                               reservation=held), "record-partial-usage")
            elif held is not None and not finished:
                self.ledger.budgets.release(held)
            if error is exc:
                raise
            raise error from exc

    # -- CountTokens ---------------------------------------------------------------------------------------------

    async def CountTokens(self, request: inference_pb2.CountTokensRequest,
                          context: grpc.aio.ServicerContext) -> inference_pb2.CountTokensResponse:
        seconds = self._budget_left(context.time_remaining())
        try:
            await self.auth.authenticate(context.invocation_metadata())
            up = self.config.gateway.upstream
            up_req = count_request(request, pick_model(request.model, up.model, self._offered))
            if self.upstream.unavailable:
                raise UpstreamError(self.upstream.unavailable)
            deadline = time.monotonic() + seconds
            with self._timed("CountTokens"):
                total = await self._within(seconds, self.upstream.count_tokens(up_req, deadline=deadline))
            self.metrics.calls.labels("CountTokens", "OK").inc()
            return inference_pb2.CountTokensResponse(total_tokens=total)
        except GatewayError as exc:
            await self._abort(context, exc, "CountTokens")
            raise AssertionError("unreachable") from exc
        except Exception as exc:
            await self._internal(context, exc, "CountTokens")
            raise AssertionError("unreachable") from exc

    async def drain(self, within: float = 1.0) -> list[BaseException]:
        """Give detached work (idempotent unary calls, partial-usage writes) `within` seconds, then cancel it;
        returns the errors raised while it was cancelled (deaths before that are in `tasks.deaths`)."""
        if self._detached:
            await asyncio.wait(list(self._detached), timeout=within)
        return await self.tasks.stop()

    def health_detail(self) -> str:
        """One line for the health service: the detached work that died and the bugs answered INTERNAL, if any."""
        parts = []
        if self.tasks.deaths:
            parts.append("tasks died: " + "; ".join(f"{d.name} x{d.count} (last: {d.error})"
                                                    for d in self.tasks.deaths.values()))
        if self.bugs:
            parts.append(f"internal errors: {self.bugs} (last: {self.last_bug}, see the log)")
        unreleased = self.ledger.budgets.release_errors + self.idem.claim_errors
        if unreleased:
            parts.append(f"budget reservations / request_id claims not released: {unreleased} (they expire; see the "
                         "log)")
        if self.ledger.budgets.db.housekeeping_errors:
            parts.append(f"database housekeeping failed {self.ledger.budgets.db.housekeeping_errors}x (expired "
                         "reservations are not being released; see the log)")
        return "; ".join(parts)


def _fold(chunks: list[UpstreamChunk], model: str) -> UpstreamResult:
    from .upstreams.base import collect

    return collect(chunks, model)


def _response(request_id: str, result: UpstreamResult) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(
        request_id=request_id, text=result.text, finish_reason=result.finish_reason, model=result.model,
        usage=inference_pb2.Usage(input_tokens=result.input_tokens, output_tokens=result.output_tokens,
                                  total_tokens=result.input_tokens + result.output_tokens))


def _replay(response: inference_pb2.GenerateResponse) -> inference_pb2.GenerateChunk:
    return inference_pb2.GenerateChunk(request_id=response.request_id, text=response.text,
                                       finish_reason=response.finish_reason, usage=response.usage,
                                       model=response.model)
