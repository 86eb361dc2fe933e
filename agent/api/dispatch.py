"""Runs one request on the route the router picks: admission to local slots, fallback before the first token,
the offline queue, route counts. It raises domain errors (nanofleet.agent.errors); the HTTP layer (`app.py`) only
parses, calls this, and formats.

When every route tried failed and one of them was the local model refusing for a full slot line, the answer is
that `Busy` (429, its short Retry-After): the local route frees within a second, an unreachable cloud does not. Such
a request is not queued either — the queue is for routes that are closed, a full slot line is not one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import secrets
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import psutil

from nanofleet.agent.errors import NoRoute, QueueUnavailable
from nanofleet.agent.queue.drain import Outcome
from nanofleet.agent.queue.store import PEER_UNKNOWN, Accepted, QueueStore
from nanofleet.agent.router import Connectivity, Decision, DeviceState, Policy, Route, RouteRequest, decide, next_route
from nanofleet.agent.runtime.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Busy,
    ChatRequest,
    Chunk,
    Completion,
    Refused,
)
from nanofleet.agent.runtime.lifecycle import LocalModel

# Errors after which the next route is tried (before the first token): the route is down, slow, full, or the
# gateway refused by policy (a cloud-denied device whose app said prefer_cloud is still served locally).
_FALLBACK_ON = (BackendUnavailable, BackendTimeout, Busy, Refused)
_CLOUD_DOWN = ("gateway_unreachable", "circuit_open", "cloud_not_serving")
QUEUE_RETRY_AFTER = 5.0


class Admission:
    """`slots` requests run at once; up to `max_waiting` more wait in FIFO order; past that: Busy (→ 429)."""

    def __init__(self, slots: int, max_waiting: int) -> None:
        self.slots = slots
        self.max_waiting = max_waiting
        self.active = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if (self.active >= self.slots or self.waiting) and self.waiting >= self.max_waiting:
            raise Busy(f"the local model is busy: {self.active} running, {self.waiting} waiting; retry later",
                       retry_after=1)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._sem.release()


def default_device_state() -> DeviceState:
    return DeviceState(ram_available_mb=int(psutil.virtual_memory().available >> 20))


class Dispatcher:
    def __init__(
        self, models: LocalModel, cloud: Backend | None = None, *, max_waiting: int = 8,
        device_state: Callable[[], DeviceState] = default_device_state, queue: QueueStore | None = None,
    ) -> None:
        self.models = models
        self.cloud = cloud
        self.queue = queue
        self.policy = Policy()
        self.admission = Admission(models.spec.n_parallel, max_waiting)
        self.counts: Counter[str] = Counter()
        self.device_state = device_state
        self._device: tuple[float, DeviceState] | None = None
        self._cloud_day = ""
        self.cloud_tokens_today = 0

    # -- inputs of the router --------------------------------------------------------------------------------
    def device(self) -> DeviceState:
        now = time.monotonic()
        if self._device is None or now - self._device[0] > 1.0:  # psutil reads /proc: at most once a second
            self._device = (now, self.device_state())
        dev = self._device[1]
        st = self.models
        return DeviceState(dev.thermal_level, dev.ram_available_mb, dev.battery_pct, dev.charging, dev.metered,
                           st.availability, st.recently_refused())

    def connectivity(self) -> Connectivity:
        cloud: Any = self.cloud
        if cloud is None:
            return Connectivity()
        today = dt.datetime.now(dt.UTC).date().isoformat()  # the gateway's budget day is the UTC day too
        if today != self._cloud_day:
            self._cloud_day, self.cloud_tokens_today = today, 0
        admits = bool(getattr(cloud, "reachable", True))  # the breaker lets a call through now
        state = "serving" if admits else str(getattr(cloud, "state", "unreachable"))
        return Connectivity(True, gateway_reachable=state != "unreachable", circuit_open=not admits,
                            cloud_tokens_used_today=self.cloud_tokens_today,
                            gateway_serving=state != "not_serving", gateway_refused=state == "refused")

    def route(self, req: RouteRequest) -> Decision:
        """The router's decision, without side effects (the drainer asks it for every queued entry)."""
        return decide(req, self.policy, self.device(), self.connectivity())

    def decide(self, req: RouteRequest) -> Decision:
        """The router's decision (`queue` only when this agent has a queue), or `NoRoute` when no route serves now.
        The rule for the status: 4xx when no retry can help (`permanent`), 503 + Retry-After when waiting can."""
        decision = self.route(req)
        if decision.route in ("local", "cloud") or (decision.route == "queue" and self.queue is not None):
            return decision
        self.counts["rejected" if decision.route == "reject" else "queue_unavailable"] += 1
        if decision.permanent:
            raise NoRoute(f"no route may ever serve this request under the current policy: {decision.reason}",
                          status=403, code="route_forbidden", route="reject", reason=decision.reason)
        wait = float(getattr(self.cloud, "retry_in", 0.0) or 0.0)
        if decision.reason in _CLOUD_DOWN:  # the same answer as a call that just failed (GatewayUnreachable)
            raise NoRoute(f"the cloud route is unavailable ({decision.reason}) and no other route may serve "
                          f"this request; next try of the gateway in {wait:.0f}s", status=503,
                          code="cloud_unavailable", route=decision.route,
                          reason="gateway_unreachable" if decision.reason == "circuit_open" else decision.reason,
                          retry_after=max(wait, 1.0))
        if decision.reason == "cloud_refused":  # the gateway refused this device (e.g. a revoked token)
            why = str(getattr(self.cloud, "last_error", "") or "see /v1/status")
            raise NoRoute(f"the gateway refuses this device ({why}) and no other route may serve this request",
                          status=403, code="cloud_refused", route="reject", reason="cloud_refused",
                          retry_after=max(wait, 1.0))
        # when the local model said how long it rests (a busy bridge's delay, a refused load), that is the wait
        wait = self.models.retry_in if decision.reason == "model_unavailable" else 0.0
        retry_after = max(wait, 1.0) if wait > 0 else QUEUE_RETRY_AFTER
        if decision.route == "queue":
            raise QueueUnavailable(f"no route can serve this request now ({decision.reason}) and this agent has "
                                   "no offline queue; retry later", retry_after=retry_after, reason=decision.reason)
        raise NoRoute(f"no route can serve this request now ({decision.reason}) and queueing was denied; "
                      "retry later", status=503, code="no_route", route="reject", reason=decision.reason,
                      retry_after=retry_after)

    def queue_after_failure(self, req: RouteRequest) -> str | None:
        """After the routes tried failed before answering: the queue's reason if the router would now queue this
        request (the failed route's breaker is open, so it is decided without it), else None."""
        decision = self.route(req)
        if decision.route != "queue" or self.queue is None:
            return None
        self.counts["queued_after_failure"] += 1
        return decision.reason

    def _live(self, req: RouteRequest) -> Decision:
        """The decision for a caller that cannot be queued (Prompt-API sessions hold state in this process)."""
        decision = self.decide(req)
        if decision.route == "queue":
            self.counts["queue_unavailable"] += 1
            raise NoRoute(f"no route can serve this request now ({decision.reason}); session prompts are not "
                          "queued: retry later", status=503, code="no_route", route="queue", reason=decision.reason,
                          retry_after=QUEUE_RETRY_AFTER)
        return decision

    async def enqueue(self, chat: ChatRequest, req: RouteRequest, reason: str, *, uid: int,
                      idem_key: str | None, stream: bool = False, model: str | None = None) -> Accepted:
        """Commit the request to the offline queue (202 only after this returns)."""
        if self.queue is None:
            raise QueueUnavailable("this agent has no offline queue", retry_after=QUEUE_RETRY_AFTER)
        if uid == PEER_UNKNOWN:  # fail closed: an entry with no known owner would be visible to every local user
            self.queue.counts["peer_unknown"] += 1
            raise QueueUnavailable("the offline queue needs the caller's uid (SO_PEERCRED) and this connection's "
                                   "could not be read: not queued", reason="peer_unknown")
        fields = _shallow(chat)
        fields["request_id"] = ""  # the entry's id becomes the request_id (same body → same hash)
        request = {"chat": fields, "route": _shallow(req), "stream": stream, "model": model}
        accepted = await self.queue.enqueue(request, uid=uid, app=req.app_id, reason=reason, idem_key=idem_key)
        if accepted.new:
            self.counts["queued"] += 1
        return accepted

    # -- the drainer's runner (agent/queue/drain.py Runner) ---------------------------------------------------
    def ready(self, request: dict[str, Any]) -> bool:
        return self.route(RouteRequest(**request["route"])).route in ("local", "cloud")

    async def run(self, rid: str, request: dict[str, Any]) -> Outcome:
        """One queued entry, on the route picked now; its id is the request_id (a re-run is not charged twice)."""
        chat = ChatRequest(**request["chat"])
        chat.request_id = rid
        req = RouteRequest(**request["route"])
        decision = self.route(req)
        if decision.route == "queue" or (decision.route == "reject" and not decision.permanent):
            return Outcome("defer", reason=decision.reason)
        if decision.route == "reject":
            return Outcome("fail", "reject", decision.reason, error=f"no route may serve it: {decision.reason}")
        try:
            completion, route, reason = await self.generate(chat, req, decision)
        except Busy as exc:
            return Outcome("defer", "local", "busy", retry_after=exc.retry_after)
        except BackendUnavailable as exc:  # the route closed again: wait for it, without using an attempt
            return Outcome("defer", reason=getattr(exc, "reason", "") or exc.code, retry_after=exc.retry_after)
        except BackendTimeout as exc:
            return Outcome("retry", reason=exc.code, retry_after=exc.retry_after, error=exc.message)
        except BackendError as exc:
            return Outcome("fail", reason=getattr(exc, "reason", "") or exc.code, error=exc.message)
        return Outcome("done", route, reason, completion_body(completion, request.get("model")))

    def _count(self, route: str, completion_tokens: int = 0, prompt_tokens: int = 0) -> None:
        self.counts[route] += 1
        if route == "cloud":
            self.cloud_tokens_today += completion_tokens + prompt_tokens

    async def count_tokens(self, messages: list[dict[str, str]]) -> int:
        """Exact with the local model; a byte estimate when it cannot load."""
        try:
            async with self.models.use() as backend:
                return await backend.count_tokens(messages)
        except BackendError:
            return sum(len(m["content"].encode()) // 3 + 4 for m in messages)

    # -- running ---------------------------------------------------------------------------------------------
    async def generate(self, chat: ChatRequest, req: RouteRequest,
                       decision: Decision | None = None) -> tuple[Completion, Route, str]:
        decision = decision or self._live(req)
        route, reason = decision.route, decision.reason
        tried: tuple[Route, ...] = ()
        busy: Busy | None = None
        while True:
            try:
                completion = await self._generate_on(route, chat)
            except _FALLBACK_ON as exc:
                exc.route = route
                busy = exc if isinstance(exc, Busy) and route == "local" else busy
                tried += (route,)
                nxt = next_route(decision, tried, 0)
                if nxt is None:
                    raise (busy or exc) from None
                route, reason = nxt, f"fallback_{exc.code}"
                continue
            except BackendError as exc:
                exc.route = route
                raise
            self._count(route, completion.usage.completion_tokens, completion.usage.prompt_tokens)
            return completion, route, reason

    async def _generate_on(self, route: Route, chat: ChatRequest) -> Completion:
        if route == "cloud":
            assert self.cloud is not None
            return await self.cloud.generate(chat)
        async with self.admission.slot(), self.models.use() as backend:
            completion = await backend.generate(chat)
        self.models.record_speed(completion.tokens_per_s)
        return completion

    async def open_stream(self, chat: ChatRequest, req: RouteRequest,
                          decision: Decision | None = None) -> tuple[Route, str, AsyncIterator[Chunk]]:
        """Start streaming; falls back only until the first chunk arrives, so the route is known for the headers."""
        decision = decision or self._live(req)
        route, reason = decision.route, decision.reason
        tried: tuple[Route, ...] = ()
        busy: Busy | None = None
        while True:
            gen = self._stream_on(route, chat)
            try:
                first = await anext(gen)
            except StopAsyncIteration:
                first = None
            except _FALLBACK_ON as exc:
                await gen.aclose()
                exc.route = route
                busy = exc if isinstance(exc, Busy) and route == "local" else busy
                tried += (route,)
                nxt = next_route(decision, tried, 0)
                if nxt is None:
                    raise (busy or exc) from None
                route, reason = nxt, f"fallback_{exc.code}"
                continue
            except BackendError as exc:
                await gen.aclose()
                exc.route = route
                raise
            self.counts[route] += 1
            return route, reason, self._chain(first, gen)

    async def _stream_on(self, route: Route, chat: ChatRequest) -> AsyncGenerator[Chunk, None]:
        if route == "cloud":
            assert self.cloud is not None
            async with contextlib.aclosing(_closable(self.cloud.stream(chat))) as chunks:
                async for chunk in chunks:
                    if chunk.usage:
                        self.cloud_tokens_today += chunk.usage.total_tokens
                    yield chunk
            return
        async with self.admission.slot(), self.models.use() as backend, contextlib.aclosing(
                _closable(backend.stream(chat))) as chunks:
            async for chunk in chunks:
                if chunk.tokens_per_s:
                    self.models.record_speed(chunk.tokens_per_s)
                yield chunk

    @staticmethod
    async def _chain(first: Chunk | None, gen: AsyncGenerator[Chunk, None]) -> AsyncIterator[Chunk]:
        async with contextlib.aclosing(gen):
            if first is not None:
                yield first
            async for chunk in gen:
                yield chunk


def completion_body(completion: Completion, model: str | None = None, cid: str | None = None,
                    created: int | None = None) -> dict[str, Any]:
    """The OpenAI chat.completion body (the synchronous answer, and a queued entry's result)."""
    return {
        "id": cid or "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
        "created": created or int(time.time()), "model": completion.model or model or "",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                     "finish_reason": completion.finish_reason}],
        "usage": completion.usage.as_openai(),
    }


def _closable(stream: AsyncIterator[Chunk]) -> AsyncGenerator[Chunk, None]:
    """Every backend's `stream` is an async generator (closing it stops generation: Backend's contract), though
    Backend types it as an AsyncIterator; the right fix, typing Backend.stream as AsyncGenerator, needs every backend
    (agent/runtime/grpc_backend.py too) annotated the same way at once."""
    return cast(AsyncGenerator[Chunk, None], stream)


def _shallow(obj: Any) -> dict[str, Any]:
    """A dataclass of JSON values as a dict, one level deep: the queue encodes it at once, so the nested lists and
    dicts need no copy (`dataclasses.asdict`'s recursive deep copy was ~15 % of the enqueue path's CPU)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
