"""The fleet's live events, from whoever changes the fleet to whoever watches it (the dashboard's `/events` stream).

`FleetEvents.publish(kind, data)` may be called from any thread — the ingest thread after a batch commits, the
stale sweep, the alert engine — and never blocks: it records the event under a lock and, once per coalescing window
(`coalesce_s`, ~250 ms), asks the event loop to flush. A flush turns every device that changed in the window into
ONE `device` event (`{"ids": [...], "more": n}`: at 10,000 devices a browser gets a few events a second, not a
thousand), and passes `alert` and `audit` events on in order. Kinds and their data:

    device   {"device_id", "state", "thermal_level", ...}   published per device; sent coalesced as {"ids", "more"}
    alert    {"id", "kind", "device_id", "state", ...}      raised / acknowledged / cleared
    audit    {"action", "actor", ...}                       an audit-log entry
    resync   {"reason"}                                     sent by the hub: state was missed, re-read everything

Every sent event has an id `<epoch>-<seq>` (epoch: this hub's lifetime). The hub keeps the last `history` events, so
a client that reconnects with `Last-Event-ID` gets what it missed, or one `resync` when the gap is gone (an older
epoch: the controller restarted). Each subscriber has a bounded queue: a slow browser never blocks the flush nor
grows memory — its queue is dropped (counted in `stats.dropped`) and it gets a `resync` instead.
`close()` ends every subscription (the web server's graceful shutdown must not wait on open streams).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

__all__ = ["KINDS", "Event", "EventStats", "FleetEvents", "Subscription"]

log = logging.getLogger(__name__)
KINDS = frozenset({"device", "alert", "audit"})


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    id: str
    kind: str
    data: Mapping[str, Any]

    def sse(self) -> str:
        """The event in the text/event-stream format."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {json.dumps(self.data, separators=(',', ':'))}\n\n"


@dataclasses.dataclass
class EventStats:
    published: int = 0  # publish() calls accepted
    sent: int = 0  # events a flush produced (each to every subscriber)
    dropped: int = 0  # events dropped from a slow subscriber's full queue (it got a resync instead)
    resyncs: int = 0  # resync events handed out (overflow or a Last-Event-ID too old)
    rejected: int = 0  # publish() calls refused (unknown kind, a device event without device_id)
    subscribers: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Subscription:
    """One listener's bounded queue. Iterate it (async) for events; a `None` item means "nothing for
    `heartbeat_s`" so the stream can send a keep-alive comment. Iteration ends when the hub closes."""

    def __init__(self, hub: FleetEvents, maxsize: int, heartbeat_s: float) -> None:
        self._hub, self._max, self._heartbeat_s = hub, maxsize, heartbeat_s
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        self._lost = False  # events were dropped: the next item is a resync
        self.closed = False

    def _put(self, event: Event) -> None:
        """On the loop thread only."""
        if self._lost:
            self._hub.stats.dropped += 1
            return
        if len(self._queue) >= self._max:
            self._hub.stats.dropped += len(self._queue) + 1
            self._queue.clear()
            self._lost = True
        else:
            self._queue.append(event)
        self._wake.set()

    def _close(self) -> None:
        self.closed = True
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | None:
        while True:
            if self._lost:
                self._lost = False
                return self._hub.resync_event("overflow")
            if self._queue:
                return self._queue.popleft()
            if self.closed:
                raise StopAsyncIteration
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._heartbeat_s)
            except TimeoutError:
                return None


class FleetEvents:
    def __init__(self, *, coalesce_s: float = 0.25, queue_size: int = 256, history: int = 512,
                 max_ids: int = 200, heartbeat_s: float = 15.0) -> None:
        self.coalesce_s, self.queue_size, self.max_ids, self.heartbeat_s = coalesce_s, queue_size, max_ids, heartbeat_s
        self.epoch = secrets.token_hex(4)
        self.stats = EventStats()
        self._seq = itertools.count(1)
        self._history: collections.deque[tuple[int, Event]] = collections.deque(maxlen=history)
        self._lock = threading.Lock()
        self._devices: dict[str, Mapping[str, Any]] = {}
        self._others: list[tuple[str, Mapping[str, Any]]] = []
        self._armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: set[Subscription] = set()
        self.closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that flushes and where subscribers live (bound by the first subscriber when not before)."""
        self._loop = loop

    # -- publishing (any thread) ----------------------------------------------------------------------------------
    def publish(self, kind: str, data: Mapping[str, Any]) -> None:
        """Record an event; never blocks, never raises for bad input (refused and counted, logged)."""
        if kind not in KINDS or (kind == "device" and not isinstance(data.get("device_id"), str)):
            self.stats.rejected += 1
            log.warning("events: refused a %r event (kinds: %s; a device event needs a device_id)", kind,
                        ", ".join(sorted(KINDS)))
            return
        with self._lock:
            self.stats.published += 1
            if self._loop is None or self.closed:
                return  # nobody has listened yet (no event id was handed out) or nobody will any more
            if kind == "device":
                self._devices[data["device_id"]] = data
            else:
                self._others.append((kind, data))
            if self._armed:
                return
            self._armed = True
            loop = self._loop
        try:
            loop.call_soon_threadsafe(loop.call_later, self.coalesce_s, self._flush)
        except RuntimeError:  # the loop closed: shutting down, nobody is listening any more
            with self._lock:
                self._armed = False

    def publish_devices(self, devices: Mapping[str, Mapping[str, Any]]) -> None:
        """Many device changes at once (one ingest batch): `{device_id: data}`."""
        for device_id, data in devices.items():
            self.publish("device", {"device_id": device_id, **data})

    def _flush(self) -> None:
        with self._lock:
            devices, self._devices = self._devices, {}
            others, self._others = self._others, []
            self._armed = False
        events: list[Event] = []
        if devices:
            ids = sorted(devices)
            events.append(self._event("device", {"ids": ids[:self.max_ids], "more": max(0, len(ids) - self.max_ids)}))
        events += [self._event(kind, data) for kind, data in others]
        for event in events:
            for sub in self._subs:
                sub._put(event)

    def _event(self, kind: str, data: Mapping[str, Any]) -> Event:
        seq = next(self._seq)
        event = Event(f"{self.epoch}-{seq}", kind, data)
        self._history.append((seq, event))
        self.stats.sent += 1
        return event

    def resync_event(self, reason: str) -> Event:
        """Not kept in the history: it stands for what was lost. Its id is the latest sent, so a reconnect after it
        resumes from there."""
        self.stats.resyncs += 1
        last = self._history[-1][0] if self._history else 0
        return Event(f"{self.epoch}-{last}", "resync", {"reason": reason})

    # -- subscribing (the loop's thread) --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def subscribe(self, last_event_id: str | None = None) -> AsyncIterator[Subscription]:
        """A subscription for the block's duration; with `last_event_id`, first what was missed (or a resync)."""
        if self._loop is None:
            self.bind(asyncio.get_running_loop())
        sub = Subscription(self, self.queue_size, self.heartbeat_s)
        if self.closed:
            sub._close()
        for event in self._missed(last_event_id):
            sub._put(event)
        self._subs.add(sub)
        self.stats.subscribers = len(self._subs)
        try:
            yield sub
        finally:
            self._subs.discard(sub)
            self.stats.subscribers = len(self._subs)

    def _missed(self, last_event_id: str | None) -> list[Event]:
        if not last_event_id:
            return []
        epoch, _, seq_text = last_event_id.partition("-")
        if epoch != self.epoch or not seq_text.isdigit():
            return [self.resync_event("restarted" if epoch != self.epoch else "bad_id")]
        seq = int(seq_text)
        oldest = self._history[0][0] if self._history else None
        latest = self._history[-1][0] if self._history else 0
        if seq > latest or (oldest is not None and seq < oldest - 1):
            return [self.resync_event("gap")]
        return [event for s, event in self._history if s > seq]

    def close(self) -> None:
        """End every subscription (their streams finish cleanly); later subscribers end at once."""
        self.closed = True
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._close_all()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: its subscribers are gone with it
                loop.call_soon_threadsafe(self._close_all)

    def _close_all(self) -> None:
        for sub in list(self._subs):
            sub._close()
