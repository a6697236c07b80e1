"""The database cut off in the middle of a money call: the settlement is retried to its one and only charge.

Like asyncpg's own adversity tests, the cut is real: the settlement's backend is terminated by PostgreSQL while
it waits on a row lock, before it could commit.
"""

from __future__ import annotations

import asyncio

import asyncpg

from billing import ledger
from billing.holds import durably
from billing.verify import verify
from tests.factories import make_account, request_id
from tests.outage import backend_waiting_on


async def test_a_settlement_whose_connection_dies_mid_call_is_retried_to_one_charge(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=2_000, ttl_seconds=60)
    async with pool.acquire() as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account)
        settling = asyncio.ensure_future(durably(lambda: ledger.settle(pool, request_id=rid, actual_micros=1_234)))
        victim = await backend_waiting_on(pool, "meterline_settle")
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", victim) is True
        for _ in range(1_000):  # the first attempt is gone, uncommitted, before the lock is released
            if not await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", victim):
                break
            await asyncio.sleep(0.01)
        await transaction.rollback()
    outcome = await asyncio.wait_for(settling, timeout=30)
    assert (outcome.state, outcome.actual_micros, outcome.replayed) == ("settled", 1_234, False)
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE request_id = $1", rid) == 1
    assert await ledger.available_micros(pool, account) == 10_000 - 1_234
    assert await verify(pool) == []
