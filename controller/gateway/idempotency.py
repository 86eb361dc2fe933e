"""Idempotent requests: the same (device, request_id) within the window gets the same answer and causes exactly one
upstream call — also when the duplicate arrives while the first is still in flight, on this gateway or another one
sharing the database.

`lookup` first asks this process (calls in flight, a small LRU of answers), then claims the key in the database in
one writer job: a committed answer is returned as is; otherwise a row in `idempotency_claims` makes this gateway the
one that calls the upstream. A duplicate that finds the claim held by another gateway waits for its answer (polling
the database every `poll_s`, within the call's deadline: the caller's, capped by the upstream timeout; past it the
caller gets DEADLINE_EXCEEDED and retries) — no "in progress" error to handle; if the claim
goes away without an answer (that call failed, or its gateway died and the claim expired after `hold_s`) the waiter
gets UNAVAILABLE and its retry runs afresh. Answers are committed with the usage row (same transaction), which also
drops the claim. Failures are not remembered: a retry after an error calls the upstream again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from nanofleet.protos import inference_pb2
from nanofleet.sqlite_db import DatabaseClosed

from .db import GatewayDb
from .errors import UpstreamError

Key = tuple[str, str]  # (device_id, request_id)
Answer = inference_pb2.GenerateResponse
log = logging.getLogger("nanofleet.gateway")


class Idempotency:
    def __init__(self, db: GatewayDb, window: float, lru_size: int = 4096, *, gateway_id: str = "gateway",
                 hold_s: float = 60.0, poll_s: float = 0.05) -> None:
        self._db = db
        self.window = window
        self._lru_size = lru_size
        self.gateway_id = gateway_id
        self.hold_s = hold_s
        self.poll_s = poll_s
        self._inflight: dict[Key, asyncio.Future[Answer]] = {}
        self._owned: set[Key] = set()  # keys whose claim row is ours
        self._recent: OrderedDict[Key, tuple[float, Answer]] = OrderedDict()
        # how a wait for another gateway's answer runs (the service sets its supervised spawner)
        self.spawn: Callable[[Awaitable[None], str], Any] = lambda coro, name: asyncio.ensure_future(coro)
        self.claim_errors = 0

    def _fresh(self, created: float, now: float) -> bool:
        return now - created < self.window

    def peek(self, key: Key, now: float) -> Answer | asyncio.Future[Answer] | None:
        """An in-flight future or a remembered answer for `key`, without I/O."""
        future = self._inflight.get(key)
        if future is not None:
            return future
        hit = self._recent.get(key)
        if hit is not None and self._fresh(hit[0], now):
            self._recent.move_to_end(key)
            return hit[1]
        return None

    async def lookup(self, key: Key, now: float) -> Answer | asyncio.Future[Answer] | None:
        """The answer, or a future of it (in flight here or on another gateway), or None: the caller owns `key` now
        (it is marked in flight) and must end with `finish` or `fail`."""
        found = self.peek(key, now)
        if found is not None:
            return found
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future  # local duplicates wait on it from here on
        try:
            outcome = await self._db.write(self._claim_job(key, now))
        except BaseException as exc:
            self.fail(key, exc if isinstance(exc, Exception) else UpstreamError("request_id lookup interrupted"))
            raise
        if isinstance(outcome, Answer):
            self._remember(key, now, outcome)
            self._resolve(key, outcome)
            return outcome
        if outcome == "ours":
            self._owned.add(key)
            return None
        self.spawn(self._follow(key), "idempotency-wait")  # held by another gateway: wait for its answer
        return future

    def _claim_job(self, key: Key, now: float) -> Callable[[Any], Answer | str]:
        cutoff_ms = int((now - self.window) * 1000)
        now_ms, expires_ms = int(now * 1000), int((now + self.hold_s) * 1000)

        def job(conn: Any) -> Answer | str:
            row = conn.execute("SELECT response FROM idempotency WHERE device_id = ? AND request_id = ? "
                               "AND created_ms >= ?", (*key, cutoff_ms)).fetchone()
            if row is not None:
                return Answer.FromString(bytes(row[0]))
            won = conn.execute(
                "INSERT INTO idempotency_claims VALUES (?, ?, ?, ?) ON CONFLICT (device_id, request_id) DO UPDATE "
                "SET gateway = excluded.gateway, expires_ms = excluded.expires_ms "
                "WHERE idempotency_claims.expires_ms < ? RETURNING gateway",
                (*key, self.gateway_id, expires_ms, now_ms)).fetchone()
            return "ours" if won is not None else "theirs"

        return job

    async def _follow(self, key: Key) -> None:
        """Poll for the answer of a key another gateway holds; resolve the local future with it (or an error)."""
        try:
            while key in self._inflight:
                row = await self._db.aread(lambda conn: conn.execute(
                    "SELECT i.response, c.expires_ms FROM (SELECT 1 AS one) AS x "
                    "LEFT JOIN idempotency AS i ON i.device_id = ? AND i.request_id = ? "
                    "LEFT JOIN idempotency_claims AS c ON c.device_id = ? AND c.request_id = ?",
                    (*key, *key)).fetchone())
                response, claim_expires = row
                if response is not None:
                    answer = Answer.FromString(bytes(response))
                    self._remember(key, time.time(), answer)
                    self._resolve(key, answer)
                    return
                if claim_expires is None or claim_expires < time.time() * 1000:
                    self.fail(key, UpstreamError("the original call with this request_id (on another gateway) ended "
                                                 "without an answer; retry"))
                    return
                await asyncio.sleep(self.poll_s)
        except Exception as exc:
            self.fail(key, exc)
            raise

    def committer(self, key: Key, response: Answer, now: float) -> Callable[[Any], None]:
        """The write (run in the usage row's transaction) that makes `response` the answer for `key`."""
        data = response.SerializeToString()

        def write(conn: Any) -> None:
            conn.execute("INSERT INTO idempotency VALUES (?, ?, ?, ?) ON CONFLICT (device_id, request_id) DO UPDATE "
                         "SET created_ms = excluded.created_ms, response = excluded.response",
                         (*key, int(now * 1000), data))
            conn.execute("DELETE FROM idempotency_claims WHERE device_id = ? AND request_id = ?", key)

        return write

    def finish(self, key: Key, response: Answer, now: float) -> None:
        self._remember(key, now, response)
        self._owned.discard(key)
        self._resolve(key, response)

    def _resolve(self, key: Key, response: Answer) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(response)

    def fail(self, key: Key, exc: BaseException) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(exc)
            with contextlib.suppress(BaseException):
                future.exception()  # mark retrieved: no waiter is required to exist
        if key in self._owned:  # give the claim up so a retry (here or elsewhere) runs afresh
            self._owned.discard(key)
            try:
                self._db.submit(lambda conn: conn.execute(
                    "DELETE FROM idempotency_claims WHERE device_id = ? AND request_id = ? AND gateway = ?",
                    (*key, self.gateway_id)))
            except DatabaseClosed:  # shutdown: the claim expires on its own
                self.claim_errors += 1
                log.warning("idempotency claim of %s not released (it expires within %.0fs)", key, self.hold_s)

    def _remember(self, key: Key, created: float, response: Answer) -> None:
        self._recent[key] = (created, response)
        self._recent.move_to_end(key)
        while len(self._recent) > self._lru_size:
            self._recent.popitem(last=False)
