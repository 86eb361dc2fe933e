"""MQTT ingest: status, telemetry and command results of a fleet into the store, in batches.

The subscription is read by the controller's own MQTT 3.1.1 reader (controller/mqtt_reader.py, the default:
`transport="builtin"`, fleet.yaml `controller.ingest_reader`) or by paho (`"paho"`), which costs ~3x as much a
message (docs/operations.md, "The ingest reader: why"; bench/bench_ingest.py measures both, and gmqtt, side by
side); either appends (topic, payload) pairs to a deque; one ingest thread takes up to `max_batch` messages or
`batch_ms` worth, decodes and validates them (controller.decode), and hands the batch to the store's writer thread
as one transaction — decoding the next batch overlaps the commit of the previous one.
A malformed payload is counted per device and reason in the store, logged once, and skipped.
A batch the store fails to write (disk full, I/O error, a locked file, PostgreSQL restarting) is retried
`write_attempts` times with the project's backoff (nanofleet.backoff); if it still fails, its messages are counted
in `stats.dropped_by_reason` (reason: SQLite's error name, e.g. `sqlite_full`, or psycopg's error class, e.g.
`pg_admin_shutdown`) and logged — the broker has already handed them over, so nothing else can keep them, but
nothing is lost without a count. A retried batch is judged again on what is stored (the store reloads its device
state after a rollback; on PostgreSQL every batch re-reads its devices' rows); a later batch may have committed
meanwhile, and rows a failed commit may have stored after all are not stored twice (ON CONFLICT DO NOTHING).
Telemetry stamped more than a day ahead of its arrival is refused by the store and counted (`ts_in_future`).
With `share_group`, the subscriptions go through `$share/<group>/...` so several controllers split the load.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nanofleet.backoff import Backoff
from nanofleet.controller.decode import PayloadError, decode_result, decode_status, decode_telemetry
from nanofleet.controller.devstate import FUTURE
from nanofleet.controller.errors import StoreClosed, StoreError
from nanofleet.controller.mqtt_reader import AsyncPublisher, MqttReader
from nanofleet.controller.store import Batch, BatchOutcome, Store
from nanofleet.mqtt import MqttClient
from nanofleet.pg_db import DB_ERRORS
from nanofleet.protos import fleet_pb2, topics

log = logging.getLogger(__name__)
_PREFIX = topics.ROOT + "/"


@dataclass(slots=True)
class _Inflight:
    batch: Batch
    messages: int
    future: Future[BatchOutcome]
    through: int = 0  # the messages taken from the inbox so far, this batch's included (for commit_through)


@dataclass
class IngestStats:
    received: int = 0
    telemetry: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    gaps: int = 0
    rejected_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    write_retries: int = 0  # store writes tried again after a failure
    dropped: int = 0  # messages lost because their batch could not be written, even after retries
    dropped_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    hook_errors: int = 0  # the changed-devices listener raised (logged)
    lag_ms_mean: float | None = None  # the latest batch's ingest lag over its live rows: mean and max
    lag_ms_max: float | None = None

    def as_dict(self) -> dict[str, object]:
        """For the controller's status, the dashboard and /metrics."""
        return {"received": self.received, "telemetry": self.telemetry, "stored": self.stored,
                "duplicates": self.duplicates, "rejected": self.rejected, "batches": self.batches, "gaps": self.gaps,
                "rejected_by_reason": dict(self.rejected_by_reason), "write_retries": self.write_retries,
                "dropped": self.dropped, "dropped_by_reason": dict(self.dropped_by_reason),
                "hook_errors": self.hook_errors, "lag_ms_mean": self.lag_ms_mean, "lag_ms_max": self.lag_ms_max}


def durable_client_id(fleet: str, data_dir: Path) -> str:
    """The controller's MQTT client id: the same across restarts of one controller (its persistent session, with
    what the broker holds for it, is found again), different for each controller (host and data folder)."""
    where = f"{socket.gethostname()}:{data_dir.resolve()}"
    return f"nanofleet-ctl-{fleet}-{hashlib.sha256(where.encode()).hexdigest()[:10]}"


def failure_reason(exc: BaseException) -> str:
    """A short, stable name for a failed write: SQLite's error name (`sqlite_full`, `sqlite_busy`, `sqlite_ioerr_…`),
    psycopg's error class as `pg_<name>` (`pg_admin_shutdown`, `pg_disk_full`, `pg_operational_error` for a lost
    connection), or the exception's class."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", None)
        if isinstance(name, str) and name:
            return name.lower()
    if isinstance(exc, DB_ERRORS):
        return "pg_" + re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return type(exc).__name__


class Ingest:
    def __init__(
        self,
        store: Store,
        fleet: str,
        broker_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str = "",
        share_group: str | None = None,
        telemetry_qos: int = 1,
        batch_ms: float = 100.0,
        max_batch: int = 5000,
        on_outcome: Callable[[BatchOutcome], None] | None = None,
        on_changes: Callable[[dict[str, dict[str, Any]]], None] | None = None,
        on_result: Callable[[fleet_pb2.CommandResult], None] | None = None,
        on_connection: Callable[[bool], None] | None = None,
        transport: Literal["builtin", "paho"] = "builtin",
        max_backlog: int = 200_000,
        write_attempts: int = 5,
        write_retry_s: tuple[float, float] = (0.2, 5.0),
        on_thread_death: Callable[[BaseException], None] | None = None,
        ca: str | Path | None = None,
        durable: bool = False,
    ) -> None:
        self.store, self.fleet = store, topics.check_id(fleet, "fleet")
        # durable (the builtin reader): a persistent session under `client_id` and each QoS 1 message acknowledged
        # to the broker only after its batch is stored (or counted as dropped), so a controller killed mid-batch
        # loses nothing: the broker delivers the unacknowledged messages again when it reconnects
        if durable and (transport != "builtin" or not client_id):
            raise ValueError("durable ingest needs the builtin reader and a fixed client_id")
        self.durable = durable
        self._taken = 0
        self.stats = IngestStats()
        self._batch_s, self._max_batch = batch_ms / 1000, max_batch
        self._write_attempts, self._write_retry_s = max(1, write_attempts), write_retry_s
        self._inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self._on_outcome, self._on_result, self._on_connection = on_outcome, on_result, on_connection
        self._on_changes = on_changes  # called on the ingest thread after a commit (FleetEvents.publish_devices)
        self._on_thread_death = on_thread_death
        self.thread_error: BaseException | None = None  # why the ingest thread died, if it did
        self._logged: set[tuple[str | None, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed = asyncio.Event()
        prefix = f"$share/{topics.check_id(share_group, 'share group')}/" if share_group else ""
        # command results are not shared: the controller that sent a command waits for its result, so every
        # controller hears every result (few and small; storing one twice is an idempotent upsert)
        self.filters = [(prefix + topics.fleet_filter(fleet, "status"), 1),
                        (prefix + topics.fleet_filter(fleet, "telemetry"), telemetry_qos),
                        (topics.fleet_filter(fleet, "cmd/result"), 1)]
        self.transport = transport
        self.subscriber: MqttReader | None = None
        self.client: MqttClient | AsyncPublisher
        if transport == "builtin":
            # one connection both ways: publishes after a resubscription are ordered after the SUBSCRIBE
            self.subscriber = MqttReader(broker_url, self.filters, self._inbox.extend, client_id=client_id,
                                         clean_session=not durable, ack_after_commit=durable,
                                         username=username, password=password,
                                         on_connection=self._threaded_connection,
                                         busy=lambda: len(self._inbox) > max_backlog, ca=ca)
            self.client = AsyncPublisher(self.subscriber)
        else:
            inbox = self._inbox
            self.client = MqttClient(broker_url, client_id=client_id, username=username, password=password,
                                     sink=lambda m: inbox.append((m.topic, bytes(m.payload))),
                                     on_connect=self._connected, on_disconnect=self._disconnected,
                                     max_queued=100_000, ca=ca)

    def _threaded_connection(self, up: bool) -> None:
        self._call_soon(self._connected if up else self._disconnected, *((False,) if up else ()))

    def transport_status(self) -> dict[str, object]:
        """The MQTT reader's state, for health and the dashboard: up or not, connects, its last error and its
        failures by kind (protocol, refused, connection, internal; sink, hook, publish with paho)."""
        t = self.subscriber if self.subscriber is not None else self.client
        assert not isinstance(t, AsyncPublisher)
        return {"reader": self.transport, "connected": self.connected, "connects": t.connects,
                "last_error": t.last_error, "failures": dict(t.failures)}

    @property
    def connected(self) -> bool:
        """The subscription is up (what "the controller can see the fleet" means)."""
        return self.subscriber.connected if self.subscriber is not None else self.client.connected

    async def start(self) -> Ingest:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._guarded, name=f"ingest:{self.fleet}", daemon=True)
        self._thread.start()
        if isinstance(self.client, MqttClient):
            self.client.subscribe(self.filters)
        await self.client.start()
        return self

    async def stop(self) -> None:
        await self.client.stop()
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._loop = None

    async def wait_subscribed(self, within: float | None = None) -> None:
        """Until the subscription is in place (SUBACK with the fast reader)."""
        await asyncio.wait_for(self._subscribed.wait(), within)

    def _connected(self, session_present: bool) -> None:
        self._subscribed.set()
        if self._on_connection:
            self._on_connection(True)

    def _disconnected(self) -> None:
        self._subscribed.clear()
        if self._on_connection:
            self._on_connection(False)

    @property
    def backlog(self) -> int:
        return len(self._inbox)

    # -- the ingest thread --------------------------------------------------------------------------------------
    def _guarded(self) -> None:
        """The thread's body: a bug that kills it is logged and reported (the controller stops), never silent."""
        try:
            self._run()
        except Exception as exc:  # reported, not re-raised: the excepthook would only print it a second time
            self.thread_error = exc
            log.critical("ingest: the ingest thread died; nothing more is stored", exc_info=exc)
            if self._on_thread_death is not None:
                self._call_soon(self._on_thread_death, exc)

    def _run(self) -> None:
        inflight: collections.deque[_Inflight] = collections.deque()
        inbox = self._inbox
        while True:
            if not inbox:
                if self._stop.is_set():
                    break
                self._reap(inflight, block=False)
                time.sleep(0.002)
                continue
            deadline = time.monotonic() + self._batch_s
            items: list[tuple[str, bytes]] = []
            while len(items) < self._max_batch:
                if inbox:
                    items.append(inbox.popleft())
                elif time.monotonic() >= deadline or self._stop.is_set():
                    break
                else:
                    time.sleep(0.001)
            batch = self.decode(items)
            while len(inflight) >= 2:  # bound the work queued at the writer: backpressure into the inbox
                self._reap(inflight, block=True)
            self._taken += len(items)
            inflight.append(_Inflight(batch, len(items), self._submit(batch), self._taken))
            self._reap(inflight, block=False)
        while inflight:
            self._reap(inflight, block=True)

    def _submit(self, batch: Batch) -> Future[BatchOutcome]:
        try:
            return self.store.submit_batch(batch)
        except StoreError as exc:  # closed: the future carries the error to _settle, which counts it
            failed: Future[BatchOutcome] = Future()
            failed.set_exception(exc)
            return failed

    def _reap(self, inflight: collections.deque[_Inflight], block: bool) -> None:
        while inflight and (block or inflight[0].future.done()):
            item = inflight.popleft()
            block = False
            outcome = self._settle(item)
            if self.durable and self.subscriber is not None:
                self.subscriber.commit_through(item.through)  # stored, or dropped and counted: the broker may forget
            if outcome is None:
                continue
            self.stats.stored += outcome.inserted
            self.stats.duplicates += outcome.duplicates
            self.stats.gaps += outcome.gaps
            if outcome.revoked_rejected:  # messages of revoked devices: refused by the store, counted here too
                self.stats.rejected += outcome.revoked_rejected
                self.stats.rejected_by_reason["revoked"] += outcome.revoked_rejected
            if outcome.future_rejected:  # telemetry stamped too far ahead of its arrival (controller.devstate)
                self.stats.rejected += outcome.future_rejected
                self.stats.rejected_by_reason[FUTURE] += outcome.future_rejected
            self.stats.batches += 1
            self._lag(item.batch)
            if outcome.changed and self._on_changes is not None:
                try:
                    self._on_changes(outcome.changed)
                except Exception:  # a listener's bug must not end ingest: logged and counted
                    self.stats.hook_errors += 1
                    log.exception("ingest: the changed-devices listener failed")
            if self._on_outcome and (outcome.rebirth or outcome.new_devices or outcome.events or outcome.births):
                self._call_soon(self._on_outcome, outcome)

    def _lag(self, batch: Batch) -> None:
        """The batch's ingest lag (received minus the device's timestamp) of its live rows (replays are old news)."""
        at = batch.received_ms
        lags = [at - r.ts_ms for r in batch.telemetry if not r.replayed]
        if lags:
            self.stats.lag_ms_mean = sum(lags) / len(lags)
            self.stats.lag_ms_max = max(lags)

    def _settle(self, item: _Inflight) -> BatchOutcome | None:
        """The batch's outcome, after up to `write_attempts` tries; None (counted, logged) when it is lost."""
        backoff = Backoff(*self._write_retry_s)
        future, attempt = item.future, 1
        while True:
            try:
                return future.result()
            except Exception as exc:  # noqa: BLE001 - any failed write is retried, then counted: never lost silently
                error = exc
            if attempt >= self._write_attempts or isinstance(error, StoreClosed):
                break
            delay = backoff.next()
            log.warning("ingest: store write of %d messages failed (%s), retry %d/%d in %.2fs", item.messages,
                        failure_reason(error), attempt, self._write_attempts - 1, delay)
            self._stop.wait(delay)  # stopping: retry at once rather than wait
            self.stats.write_retries += 1
            future, attempt = self._submit(item.batch), attempt + 1
        reason = failure_reason(error)
        self.stats.dropped += item.messages
        self.stats.dropped_by_reason[reason] += item.messages
        log.error("ingest: dropped %d messages after %d failed store writes (%s): %r", item.messages, attempt, reason,
                  error)
        return None

    def _call_soon(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call: shutting down
                loop.call_soon_threadsafe(fn, *args)

    def decode(self, items: list[tuple[str, bytes]]) -> Batch:
        """Validate raw (topic, payload) pairs into one store batch, rejections included."""
        batch = Batch(self.fleet, int(time.time() * 1000))
        telemetry, reject = batch.telemetry, batch.rejections
        fleet_prefix = f"{_PREFIX}{self.fleet}/"
        n = len(fleet_prefix)
        for topic, payload in items:
            device: str | None = None
            try:
                # fast split for the common shape; topics.parse for anything unusual
                if topic.startswith(fleet_prefix) and topic.endswith("/telemetry") and topic.count("/") == 4:
                    device = topic[n:-10]
                    telemetry.append(decode_telemetry(payload, topics.check_id(device, "device")))
                    continue
                t = topics.parse(topic)
                device = t.device
                if t.fleet != self.fleet:
                    raise PayloadError("topic of another fleet")
                if t.kind == "status":
                    if payload:  # an empty retained message clears the topic: nothing to ingest
                        batch.statuses.append(decode_status(payload, t.fleet, t.device))
                        batch.status_pos.append(len(telemetry))
                elif t.kind == "telemetry":
                    telemetry.append(decode_telemetry(payload, t.device))
                elif t.kind == "cmd/result":
                    result = decode_result(payload, t.device)
                    batch.command_results.append(result)
                    if self._on_result:
                        self._call_soon(self._on_result, result)
                else:
                    raise PayloadError(f"unexpected topic kind {t.kind}")
            except PayloadError as exc:
                self._reject(reject, device, topic, exc.reason)
            except topics.TopicError as exc:
                self._reject(reject, device, topic, "bad topic: " + str(exc).split(":")[0][:80])
        self.stats.received += len(items)
        self.stats.telemetry += len(telemetry)
        return batch

    def _reject(self, out: list[tuple[str | None, str, str]], device: str | None, topic: str, reason: str) -> None:
        out.append((device, topic if device else topic[:200], reason))
        self.stats.rejected += 1
        self.stats.rejected_by_reason[reason] += 1
        key = (device, reason)
        if key not in self._logged and len(self._logged) < 10_000:
            self._logged.add(key)
            log.warning("ingest: rejected a payload from %s on %s: %s", device or "?", topic[:200], reason)
