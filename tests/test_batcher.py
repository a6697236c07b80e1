"""Group commit (billing.batcher): batched holds and settlements keep every ledger rule, and fail one by one."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from billing import keys, ledger, limits
from billing.batcher import LedgerBatcher, _Queue
from billing.errors import DuplicateRequest, InsufficientBalance, KeyLimitExceeded, UnknownHold
from billing.verify import verify
from tests.factories import make_account, request_id

HOLD = 1_000


async def _reserve(batcher: LedgerBatcher, account: str, rid: str | None = None) -> ledger.Reservation | None:
    try:
        return await batcher.reserve(request_id=rid or request_id(), account_id=account, amount_micros=HOLD,
                                     ttl_seconds=60)
    except InsufficientBalance:
        return None


@pytest.mark.parametrize("k", [0, 1, 10, 37], ids=lambda k: f"covers-{k}")
async def test_exactly_k_of_100_concurrent_batched_reserves_succeed(pool: asyncpg.Pool, k: int) -> None:
    account = await make_account(pool, balance_micros=k * HOLD + HOLD - 1)
    batcher = LedgerBatcher(pool)
    results = await asyncio.gather(*[_reserve(batcher, account) for _ in range(100)])
    assert sum(r is not None for r in results) == k
    assert await pool.fetchval("SELECT held_micros FROM accounts WHERE id = $1", account) == k * HOLD
    assert batcher.stats()["reserve_batches"] < 100  # the calls were grouped
    assert await verify(pool) == []


async def test_batched_holds_over_many_accounts_each_see_their_own_balance(pool: asyncpg.Pool) -> None:
    accounts = [await make_account(pool, balance_micros=(i % 3) * HOLD) for i in range(30)]
    batcher = LedgerBatcher(pool)
    results = await asyncio.gather(*[_reserve(batcher, a) for a in accounts for _ in range(3)])
    granted = [r is not None for r in results]
    # Account i covers i % 3 holds, and each of its three requests is decided on its own row in turn.
    assert sum(granted) == sum(i % 3 for i in range(30))
    assert await verify(pool) == []


async def test_settles_post_each_charge_once_and_replay_the_outcome(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=50 * HOLD)
    batcher = LedgerBatcher(pool)
    held = await asyncio.gather(*[_reserve(batcher, account) for _ in range(20)])
    ids = [h.request_id for h in held if h is not None]
    assert len(ids) == 20
    settle = [batcher.settle(request_id=rid, account_id=account, actual_micros=300 + i,
                             record={"model": "m", "status": "completed"}) for i, rid in enumerate(ids)]
    first = await asyncio.gather(*settle)
    again = await asyncio.gather(*[batcher.settle(request_id=rid, account_id=account, actual_micros=999)
                                   for rid in ids])
    assert [r.actual_micros for r in first] == [300 + i for i in range(20)]
    assert not any(r.replayed for r in first)
    assert all(r.replayed for r in again) and [r.actual_micros for r in again] == [300 + i for i in range(20)]
    charged = sum(300 + i for i in range(20))
    row = await pool.fetchrow("SELECT debits_posted, held_micros FROM accounts WHERE id = $1", account)
    assert (row["debits_posted"], row["held_micros"]) == (charged, 0)
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE account_id = $1", account) == 20
    assert await verify(pool) == []


async def test_a_bad_item_fails_alone_and_its_batch_neighbours_succeed(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=100 * HOLD)
    batcher = LedgerBatcher(pool)
    taken = request_id()
    assert await _reserve(batcher, account, taken) is not None
    # A duplicate request id aborts the whole batched statement; the batch is retried item by item.
    outcomes = await asyncio.gather(*[_reserve(batcher, account, rid) for rid in
                                      [request_id(), taken, request_id(), request_id()]],
                                    return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["Reservation", "DuplicateRequest", "Reservation",
                                                    "Reservation"]
    assert isinstance(outcomes[1], DuplicateRequest)
    settled = await asyncio.gather(
        batcher.settle(request_id=taken, account_id=account, actual_micros=10),
        batcher.settle(request_id="req_never_held", account_id=account, actual_micros=10),
        return_exceptions=True)
    assert isinstance(settled[0], ledger.Resolution) and settled[0].actual_micros == 10
    assert isinstance(settled[1], UnknownHold)
    assert await pool.fetchval("SELECT held_micros FROM accounts WHERE id = $1", account) == 3 * HOLD
    assert await verify(pool) == []


async def test_a_caller_that_gives_up_still_gets_its_hold_written(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10 * HOLD)
    batcher = LedgerBatcher(pool)
    rid = request_id()
    task = asyncio.create_task(_reserve(batcher, account, rid))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await batcher.close()
    assert await pool.fetchval("SELECT state FROM holds WHERE request_id = $1", rid) == "pending"
    assert await verify(pool) == []


async def test_a_batch_that_fails_unexpectedly_fails_its_callers_instead_of_leaving_them_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An error the batcher does not expect (a bug, not a database answer) must still resolve every caller's
    future, and the queue must go on serving the next batch."""
    calls: list[list[int]] = []

    async def run_batch(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        if 0 in items:
            raise ZeroDivisionError("a bug")
        return [item * 10 for item in items]

    async def run_one(item: int) -> int:
        return (await run_batch([item]))[0]  # type: ignore[return-value]

    queue: _Queue[int, int] = _Queue("test", run_batch, run_one, max_batch=10, max_inflight=1)
    blocked = queue.submit(7)  # occupies the one slot, so the next three go as one batch
    failing = [queue.submit(n) for n in (1, 0, 2)]
    assert await asyncio.wait_for(blocked, 5) == 70
    outcomes = await asyncio.wait_for(asyncio.gather(*failing, return_exceptions=True), 5)
    assert [type(o).__name__ for o in outcomes] == ["ZeroDivisionError"] * 3
    assert await asyncio.wait_for(queue.submit(3), 5) == 30
    assert calls == [[7], [1, 0, 2], [3]]
    await queue.close()
    assert [r.getMessage() for r in caplog.records if r.name == "meterline.batcher"] == [
        "a test batch failed unexpectedly"]


async def test_key_limit_refusals_in_a_batch_are_worded_for_their_callers(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """A key's spend limit refuses inside the batched statement; the refusal's wording (the limit, what is left)
    needs one more read, made for each refused caller after the batch, not inside it."""
    account = await make_account(pool, balance_micros=100 * HOLD)
    row, _ = await keys.create_key(pool, account_id=account, name="limited")
    await limits.set_key_limits(pool, row["id"], {"limit_micros": 3 * HOLD, "limit_reset": "daily"})
    batcher = LedgerBatcher(pool)

    async def hold() -> ledger.Reservation | KeyLimitExceeded:
        try:
            return await batcher.reserve(request_id=request_id(), account_id=account, amount_micros=HOLD,
                                         ttl_seconds=60, key_id=row["id"])
        except KeyLimitExceeded as exc:
            return exc

    first = asyncio.ensure_future(hold())  # occupies the slot: the next five go as one batch
    await asyncio.sleep(0)
    rest = asyncio.gather(*[hold() for _ in range(5)])
    outcomes = [await first, *await rest]
    refused = [o for o in outcomes if isinstance(o, KeyLimitExceeded)]
    assert sum(isinstance(o, ledger.Reservation) for o in outcomes) == 3
    assert [(e.limit_micros, e.remaining_micros, e.limit_reset) for e in refused] == [(3 * HOLD, 0, "daily")] * 3
    assert batcher.stats()["reserve_batches"] == 2
    assert not [r for r in caplog.records if r.name == "meterline.batcher"]
    assert await verify(pool) == []
