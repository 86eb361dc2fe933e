"""The gateway's database on both backends (`store_url`: SQLite, then a fresh PostgreSQL database): tokens, usage,
budget reservations and idempotency claims, through the same writer jobs the gateway runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nanofleet.config import DEFAULT_PRICES
from nanofleet.controller.gateway import budgets
from nanofleet.controller.gateway.auth import issue_token, list_tokens, revoke_token, token_is_active
from nanofleet.controller.gateway.budgets import BudgetRefused, Budgets
from nanofleet.controller.gateway.db import GatewayDb, as_target, connection, open_store
from nanofleet.controller.gateway.errors import UpstreamError
from nanofleet.controller.gateway.idempotency import Idempotency
from nanofleet.controller.gateway.rules import BUSY_RETRY_S, Limits
from nanofleet.controller.gateway.usage import UsageLedger, UsageStore
from nanofleet.protos import inference_pb2

NOW = time.time()


@pytest.fixture
async def db(store_url: str) -> AsyncIterator[GatewayDb]:
    opened = await asyncio.to_thread(open_store, store_url)
    yield opened
    await asyncio.to_thread(opened.close)


def _counts(db: GatewayDb) -> dict[tuple[str, str, str], tuple[int, int]]:
    rows = db.read(lambda c: c.execute("SELECT scope, device_id, app_id, used, reserved FROM budget_counts").fetchall())
    return {(s, d, a): (int(u), int(r)) for s, d, a, u, r in rows}


def test_tokens_on_either_backend(store_url: str) -> None:
    first = issue_token(store_url, "dev-1", "demo", "kiosks")
    second = issue_token(store_url, "dev-1", "demo")  # revokes the first
    assert not token_is_active(store_url, first) and token_is_active(store_url, second)
    assert [(t.device_id, t.group, t.active) for t in list_tokens(store_url)] == [("dev-1", None, True),
                                                                                  ("dev-1", "kiosks", False)]
    assert revoke_token(store_url, "dev-1") == 1 and revoke_token(store_url, "dev-1") == 0
    assert not token_is_active(store_url, second)
    assert not token_is_active(as_target("sqlite:////nonexistent/gateway.db"), second)  # never created by a check


async def test_usage_rows_add_up_and_read_back(db: GatewayDb, store_url: str) -> None:
    ledger = UsageLedger(db, DEFAULT_PRICES)
    await ledger.record("d1", "app", "gemini-2.5-flash-lite", 1000, 100, NOW)
    await ledger.record("d1", "app", "gemini-2.5-flash-lite", 1000, 100, NOW)
    await ledger.record("d2", "", "gemini-2.5-flash", 10, 10, NOW - 86_400)
    store = UsageStore(store_url)
    try:
        today = [r for r in store.summary(budgets.utc_day(NOW))]
        assert [(r.device_id, r.requests, r.input_tokens, r.output_tokens) for r in today] == [("d1", 2, 2000, 200)]
        assert today[0].cost_usd == pytest.approx(2 * (1000 * 0.10 + 100 * 0.40) / 1e6)
        assert [r.day for r in store.summary()] == [budgets.utc_day(NOW), budgets.utc_day(NOW - 86_400)]
    finally:
        store.close()
    assert ledger.budgets.used("d1", "app", NOW) == budgets.Used(device=2200, app=2200, fleet=2200)


async def test_a_reservation_holds_the_worst_case_and_settles_to_the_real_count(db: GatewayDb) -> None:
    b = Budgets(db, "gw-a", hold_s=60)
    ledger = UsageLedger(db, DEFAULT_PRICES, b)
    limits = Limits(device=100, app=None, fleet=1000)
    held = await b.reserve("d1", "app", limits, prompt=10, max_output=30, now=NOW)
    assert (held.tokens, held.max_output, held.scopes) == (40, 30, "df")
    assert _counts(db) == {("device", "d1", ""): (0, 40), ("fleet", "", ""): (0, 40)}
    await ledger.record("d1", "app", "m", 8, 12, NOW, reservation=held)
    assert _counts(db) == {("device", "d1", ""): (20, 0), ("fleet", "", ""): (20, 0)}
    assert db.read(lambda c: c.execute("SELECT count(*) FROM reservations").fetchone()[0]) == 0


async def test_refusals_say_whether_to_wait_for_calls_in_flight_or_for_midnight(db: GatewayDb) -> None:
    b = Budgets(db, "gw-a", hold_s=60)
    limits = Limits(device=50, app=20, fleet=None)
    held = await b.reserve("d1", "chat", limits, prompt=5, max_output=None, now=NOW)
    assert held.max_output == 15  # the app's 20 minus the prompt: the output cap that fits
    with pytest.raises(BudgetRefused) as busy:
        await b.reserve("d1", "chat", limits, prompt=5, max_output=None, now=NOW)
    assert busy.value.scope == "app" and busy.value.retry_after == BUSY_RETRY_S
    assert "held by calls in flight" in str(busy.value)
    other = await b.reserve("d1", "mail", limits, prompt=5, max_output=3, now=NOW)  # another app: its own budget
    b.release(held)
    await asyncio.to_thread(db.call, lambda c: None)  # the release was queued before this job: it is committed
    await UsageLedger(db, DEFAULT_PRICES, b).record("d1", "mail", "m", 5, 3, NOW, reservation=other)
    assert _counts(db)[("app", "d1", "chat")] == (0, 0) and _counts(db)[("device", "d1", "")] == (8, 0)
    with pytest.raises(BudgetRefused) as spent:
        await b.reserve("d1", "x", Limits(device=12, app=None, fleet=None), prompt=5, max_output=None, now=NOW)
    assert spent.value.scope == "device" and spent.value.retry_after > 60
    assert "device cloud budget exhausted: 8 of 12 tokens used today (UTC)" in str(spent.value)


async def test_a_dead_gateways_reservation_expires_and_is_released_once(db: GatewayDb) -> None:
    dead = Budgets(db, "gw-dead", hold_s=1)
    limits = Limits(device=30, app=None, fleet=None)
    await dead.reserve("d1", "", limits, prompt=5, max_output=None, now=NOW)  # holds all 30
    with pytest.raises(BudgetRefused):
        await Budgets(db, "gw-live", hold_s=1).reserve("d1", "", limits, prompt=5, max_output=None, now=NOW)
    assert db.call(lambda c: budgets.release_expired(c, int(NOW * 1000))) == 0  # not yet
    assert db.call(lambda c: budgets.release_expired(c, int((NOW + 2) * 1000))) == 1
    assert db.call(lambda c: budgets.release_expired(c, int((NOW + 2) * 1000))) == 0  # once only
    assert _counts(db)[("device", "d1", "")] == (0, 0)
    live = await Budgets(db, "gw-live", hold_s=1).reserve("d1", "", limits, prompt=5, max_output=None, now=NOW + 2)
    assert live.tokens == 30


async def test_a_settle_after_expiry_counts_the_tokens_without_giving_back_twice(db: GatewayDb) -> None:
    b = Budgets(db, "gw-a", hold_s=1)
    held = await b.reserve("d1", "", Limits(100, None, None), prompt=5, max_output=10, now=NOW)
    db.call(lambda c: budgets.release_expired(c, int((NOW + 5) * 1000)))
    await UsageLedger(db, DEFAULT_PRICES, b).record("d1", "", "m", 5, 4, NOW, reservation=held)
    assert _counts(db)[("device", "d1", "")] == (9, 0)


async def test_housekeeping_releases_claims_reservations_and_old_rows(db: GatewayDb, store_url: str) -> None:
    b = Budgets(db, "gw-a", hold_s=1)
    await b.reserve("d1", "", Limits(100, None, None), prompt=5, max_output=10, now=NOW - 4 * 86_400)
    await b.reserve("d1", "", Limits(100, None, None), prompt=5, max_output=10, now=NOW)
    await db.write(lambda c: c.execute("INSERT INTO idempotency_claims VALUES ('d1', 'r', 'gw-a', 1)"))
    with connection(store_url) as conn:  # what the writer runs every second, on its own connection
        budgets.housekeeping(window_s=60, clock=lambda: NOW + 10)(conn)
    assert db.read(lambda c: c.execute("SELECT count(*) FROM reservations").fetchone()[0]) == 0
    assert db.read(lambda c: c.execute("SELECT count(*) FROM idempotency_claims").fetchone()[0]) == 0
    assert _counts(db) == {("device", "d1", ""): (0, 0)}  # released; the row of 4 days ago is dropped


def _answer(text: str) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(request_id="r-1", text=text)


async def test_a_request_id_is_answered_once_across_two_gateways(db: GatewayDb) -> None:
    now = time.time()  # the waiter compares claim expiries with the wall clock
    a = Idempotency(db, window=3600, gateway_id="gw-a", hold_s=30, poll_s=0.01)
    b = Idempotency(db, window=3600, gateway_id="gw-b", hold_s=30, poll_s=0.01)
    key = ("d1", "r-1")
    assert await a.lookup(key, now) is None  # a owns it
    waiting = await b.lookup(key, now)  # b sees a's claim: it waits for a's answer
    assert isinstance(waiting, asyncio.Future)
    await db.write(a.committer(key, _answer("once"), now))
    a.finish(key, _answer("once"), now)
    assert (await asyncio.wait_for(waiting, 5)).text == "once"
    again = Idempotency(db, window=3600, gateway_id="gw-c", hold_s=30)
    found = await again.lookup(key, now + 1)  # a third gateway: the stored answer, no upstream call
    assert isinstance(found, inference_pb2.GenerateResponse) and found.text == "once"
    assert await again.lookup(key, now + 7200) is None  # past the window: a new call


async def test_a_failed_or_dead_owner_lets_a_retry_run_afresh(db: GatewayDb) -> None:
    now = time.time()  # the waiter compares claim expiries with the wall clock
    a = Idempotency(db, window=3600, gateway_id="gw-a", hold_s=30, poll_s=0.01)
    b = Idempotency(db, window=3600, gateway_id="gw-b", hold_s=30, poll_s=0.01)
    key = ("d1", "r-2")
    assert await a.lookup(key, now) is None
    waiting = await b.lookup(key, now)
    assert isinstance(waiting, asyncio.Future)
    a.fail(key, UpstreamError("boom"))  # releases the claim
    with pytest.raises(UpstreamError, match="ended without an answer"):
        await asyncio.wait_for(waiting, 5)
    assert await b.lookup(key, now) is None  # the retry owns it now
    dead_claim = ("d1", "r-3")
    assert await a.lookup(dead_claim, now) is None  # a "dies" holding the claim: it expires after hold_s
    assert isinstance(await b.lookup(dead_claim, now + 1), asyncio.Future)
    c = Idempotency(db, window=3600, gateway_id="gw-c", hold_s=30)
    assert await c.lookup(dead_claim, now + 31) is None  # expired: taken over


def test_two_gateways_batches_locking_rows_in_opposite_orders_do_not_deadlock(pg_url: str) -> None:
    """Group commit puts several calls' jobs in one transaction, each locking its device's rows: gateway A's batch
    (d1 then d2) and B's (d2 then d1) deadlocked PostgreSQL, and retrying the job cannot help while the batch's earlier
    job keeps its lock. Every gateway batch now starts by taking one shared advisory lock."""
    import concurrent.futures
    import threading

    from nanofleet.controller.gateway.db import PgDatabase

    writers = [PgDatabase(pg_url), PgDatabase(pg_url)]
    try:
        writers[0].call(lambda c: c.execute(
            "INSERT INTO budget_counts VALUES ('d', 'device', 'd1', '', 0, 0), ('d', 'device', 'd2', '', 0, 0)"))
        locked = [threading.Event(), threading.Event()]
        gates = [threading.Event(), threading.Event()]

        def bump(me: int, device: str, first: bool) -> Any:
            def job(conn: Any) -> None:
                conn.execute("UPDATE budget_counts SET used = used + 1 WHERE device_id = ?", (device,))
                if first:  # both batches hold their first row before either asks for its second
                    locked[me].set()
                    locked[1 - me].wait(2)
            return job

        futures: list[concurrent.futures.Future[Any]] = []
        for me, order in ((0, ("d1", "d2")), (1, ("d2", "d1"))):
            writers[me].submit(lambda c, g=gates[me]: g.wait(5))  # holds the writer thread: the next two batch up
            futures += [writers[me].submit(bump(me, order[0], True)), writers[me].submit(bump(me, order[1], False))]
        for gate in gates:
            gate.set()
        for future in futures:
            future.result(timeout=30)  # raised DeadlockDetected before
        assert writers[0].read(lambda c: c.execute("SELECT sum(used) FROM budget_counts").fetchone()[0]) == 4
    finally:
        for w in writers:
            w.close()


async def test_a_release_that_cannot_be_written_is_counted_and_expires(store_url: str) -> None:
    db = await asyncio.to_thread(open_store, store_url)
    b = Budgets(db, "gw-a", hold_s=1)
    held = await b.reserve("d1", "", Limits(100, None, None), prompt=5, max_output=10, now=NOW)
    await asyncio.to_thread(db.close)
    b.release(held)  # the writer is closed (shutdown): counted, logged; the reservation expires on its own
    assert b.release_errors == 1
    with connection(store_url) as conn:
        assert budgets.release_expired(conn, int((NOW + 2) * 1000)) == 1
