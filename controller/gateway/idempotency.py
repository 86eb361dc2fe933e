"""Idempotent requests: the same (device, request_id) within the window gets the same answer and causes exactly one
upstream call — also when duplicates arrive while the first is still in flight (they wait for it).

Completed answers are committed with the usage row (same transaction) and kept in a small LRU; after a restart the
keys still inside the window are known, so only a real duplicate costs a SQLite read. Failures are not remembered:
a retry after an error calls the upstream again, which is what a retrying device wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable

from nanofleet.protos import inference_pb2

from .db import Database

Key = tuple[str, str]  # (device_id, request_id)


class Idempotency:
    def __init__(self, db: Database, window: float, lru_size: int = 4096) -> None:
        self._db = db
        self.window = window
        self._lru_size = lru_size
        self._inflight: dict[Key, asyncio.Future[inference_pb2.GenerateResponse]] = {}
        self._recent: OrderedDict[Key, tuple[float, inference_pb2.GenerateResponse]] = OrderedDict()
        self._known: dict[Key, float] = {}  # key -> created (unix s), for keys committed within the window

    def load(self, now: float) -> None:
        """Learn the keys committed within the window (at start) and drop older rows."""
        cutoff_ms = int((now - self.window) * 1000)
        rows = self._db.read(lambda conn: conn.execute(
            "SELECT device_id, request_id, created_ms FROM idempotency WHERE created_ms >= ?", (cutoff_ms,)).fetchall())
        self._known = {(d, r): created / 1000 for d, r, created in rows}
        self._db.submit(lambda conn: conn.execute("DELETE FROM idempotency WHERE created_ms < ?", (cutoff_ms,)))

    def _fresh(self, created: float, now: float) -> bool:
        return now - created < self.window

    def peek(self, key: Key, now: float) -> inference_pb2.GenerateResponse | asyncio.Future[
            inference_pb2.GenerateResponse] | None:
        """An in-flight future or a remembered answer for `key`, without I/O."""
        future = self._inflight.get(key)
        if future is not None:
            return future
        hit = self._recent.get(key)
        if hit is not None and self._fresh(hit[0], now):
            self._recent.move_to_end(key)
            return hit[1]
        return None

    async def lookup(self, key: Key, now: float) -> inference_pb2.GenerateResponse | asyncio.Future[
            inference_pb2.GenerateResponse] | None:
        """Like `peek`, reading SQLite only for a key known to be committed within the window."""
        found = self.peek(key, now)
        if found is not None:
            return found
        created = self._known.get(key)
        if created is None or not self._fresh(created, now):
            return None
        row = await self._db.aread(lambda conn: conn.execute(
            "SELECT response FROM idempotency WHERE device_id = ? AND request_id = ?", key).fetchone())
        found = self.peek(key, now)  # re-check: the await let others run
        if found is not None or row is None:
            return found
        response = inference_pb2.GenerateResponse.FromString(row[0])
        self._remember(key, created, response)
        return response

    def start(self, key: Key) -> asyncio.Future[inference_pb2.GenerateResponse]:
        """Mark `key` in flight (the caller is the one that calls the upstream); call only after `lookup` missed."""
        assert key not in self._inflight, "start() after a lookup that found nothing"
        future: asyncio.Future[inference_pb2.GenerateResponse] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        return future

    def committer(self, key: Key, response: inference_pb2.GenerateResponse,
                  now: float) -> Callable[[sqlite3.Connection], None]:
        """The write (run in the usage row's transaction) that makes `response` the answer for `key`."""
        data = response.SerializeToString()

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)", (*key, int(now * 1000), data))

        return write

    def finish(self, key: Key, response: inference_pb2.GenerateResponse, now: float) -> None:
        self._remember(key, now, response)
        self._known[key] = now
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(response)

    def fail(self, key: Key, exc: BaseException) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(exc)
            with contextlib.suppress(BaseException):
                future.exception()  # mark retrieved: no waiter is required to exist

    def _remember(self, key: Key, created: float, response: inference_pb2.GenerateResponse) -> None:
        self._recent[key] = (created, response)
        self._recent.move_to_end(key)
        while len(self._recent) > self._lru_size:
            self._recent.popitem(last=False)

    def prune(self, now: float | None = None) -> None:
        """Forget keys older than the window (memory and table)."""
        now = time.time() if now is None else now
        self._known = {k: c for k, c in self._known.items() if self._fresh(c, now)}
        cutoff_ms = int((now - self.window) * 1000)
        self._db.submit(lambda conn: conn.execute("DELETE FROM idempotency WHERE created_ms < ?", (cutoff_ms,)))
