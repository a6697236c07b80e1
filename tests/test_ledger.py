"""The ledger's money rules under real concurrency, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from billing import db, ledger
from billing.errors import AccountNotFound, InsufficientBalance, UnknownHold
from billing.verify import verify
from tests.factories import make_account, request_id

HOLD = 1_000


async def _reserve_or_none(conn: ledger.Executor, account_id: str, amount: int) -> ledger.Reservation | None:
    try:
        return await ledger.reserve(
            conn, request_id=request_id(), account_id=account_id, amount_micros=amount, ttl_seconds=60
        )
    except InsufficientBalance:
        return None


@pytest.mark.parametrize("k", [0, 1, 10, 37], ids=lambda k: f"covers-{k}")
async def test_exactly_k_of_100_concurrent_reserves_succeed(pool: asyncpg.Pool, k: int) -> None:
    account = await make_account(pool, balance_micros=k * HOLD + HOLD - 1)
    results = await asyncio.gather(*[_reserve_or_none(pool, account, HOLD) for _ in range(100)])
    granted = [r for r in results if r is not None]
    assert len(granted) == k
    assert all(r.granted_micros == HOLD for r in granted)
    assert min((r.available_micros for r in granted), default=HOLD - 1) == HOLD - 1
    row = await pool.fetchrow("SELECT held_micros, credits_posted - debits_posted - held_micros AS avail"
                              " FROM accounts WHERE id = $1", account)
    assert (row["held_micros"], row["avail"]) == (k * HOLD, HOLD - 1)
    assert await verify(pool) == []


async def test_k_of_n_across_two_separate_pools(pool: asyncpg.Pool, database_url: str) -> None:
    """Two pools stand for two gateway processes: the decision must be made in PostgreSQL, not in a pool."""
    account = await make_account(pool, balance_micros=25 * HOLD)
    other = await db.create_pool(database_url, min_size=1, max_size=20)
    try:
        results = await asyncio.gather(
            *[_reserve_or_none(pool if i % 2 else other, account, HOLD) for i in range(100)]
        )
    finally:
        await other.close()
    assert sum(r is not None for r in results) == 25
    assert await ledger.available_micros(pool, account) == 0
    assert await verify(pool) == []


async def test_ten_concurrent_settles_post_once(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=5_000, ttl_seconds=60)
    outcomes = await asyncio.gather(
        *[ledger.settle(pool, request_id=rid, actual_micros=1_234) for _ in range(10)]
    )
    assert sorted(o.replayed for o in outcomes) == [False] + [True] * 9
    assert {(o.state, o.actual_micros) for o in outcomes} == {("settled", 1_234)}
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE request_id = $1", rid) == 1
    assert await ledger.available_micros(pool, account) == 10_000 - 1_234
    assert await verify(pool) == []


async def test_void_after_settle_returns_the_stored_outcome(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=4_000, ttl_seconds=60)
    await ledger.settle(pool, request_id=rid, actual_micros=3_000)
    again = await ledger.void(pool, request_id=rid, reason="client went away")
    assert (again.state, again.actual_micros, again.replayed) == ("settled", 3_000, True)
    assert await ledger.available_micros(pool, account) == 7_000
    assert await verify(pool) == []


async def test_settle_after_void_charges_nothing(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=4_000, ttl_seconds=60)
    first = await ledger.void(pool, request_id=rid, reason="upstream 500")
    again = await ledger.settle(pool, request_id=rid, actual_micros=3_000)
    assert (first.state, first.replayed) == ("voided", False)
    assert (again.state, again.actual_micros, again.replayed) == ("voided", 0, True)
    assert await ledger.available_micros(pool, account) == 10_000
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'") == 0


async def test_overrun_posts_the_full_charge_and_blocks_the_next_reserve(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=1_000, ttl_seconds=60)
    outcome = await ledger.settle(pool, request_id=rid, actual_micros=1_300)
    assert (outcome.actual_micros, outcome.overrun_micros) == (1_300, 300)
    charge = await pool.fetchrow("SELECT amount_micros, overrun_micros FROM transfers WHERE request_id = $1", rid)
    assert (charge["amount_micros"], charge["overrun_micros"]) == (1_300, 300)
    assert await ledger.available_micros(pool, account) == -300
    with pytest.raises(InsufficientBalance) as refused:
        await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=0, ttl_seconds=60)
    assert refused.value.available_micros == -300
    assert await verify(pool) == []


async def test_partial_reserve_takes_what_is_available_down_to_the_minimum(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=700)
    got = await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=1_000,
                               min_micros=500, ttl_seconds=60)
    assert (got.granted_micros, got.available_micros) == (700, 0)
    with pytest.raises(InsufficientBalance) as refused:
        await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=1_000,
                             min_micros=1, ttl_seconds=60)
    assert (refused.value.required_micros, refused.value.available_micros) == (1, 0)


async def test_two_racing_sweepers_expire_a_hold_exactly_once(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rids = [request_id() for _ in range(20)]
    for rid in rids:
        await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=100, ttl_seconds=0.05)
    await asyncio.sleep(0.2)
    counts = await asyncio.gather(*[ledger.sweep(pool) for _ in range(2)])
    assert sum(counts) == 20
    assert await ledger.sweep(pool) == 0
    assert await pool.fetchval("SELECT count(*) FROM holds WHERE state = 'expired'") == 20
    assert await ledger.available_micros(pool, account) == 10_000
    assert await verify(pool) == []


async def test_a_charge_after_expiry_is_still_posted_in_full(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=2_000, ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    assert await ledger.sweep(pool) == 1
    expired_at = await pool.fetchval("SELECT resolved_at FROM holds WHERE request_id = $1", rid)
    late = await ledger.settle(pool, request_id=rid, actual_micros=1_500)
    assert (late.state, late.actual_micros, late.overrun_micros) == ("settled", 1_500, 1_500)
    row = await pool.fetchrow("SELECT expired_first, resolved_at FROM holds WHERE request_id = $1", rid)
    # It stopped being held when it expired (statements read "held at close" from this); the charge is dated
    # by its transfer.
    assert (row["expired_first"], row["resolved_at"]) == (True, expired_at)
    assert await ledger.available_micros(pool, account) == 8_500
    assert await verify(pool) == []


async def test_the_sweeper_never_waits_for_an_account_a_settlement_holds(pool: asyncpg.Pool) -> None:
    """A batched settlement locks an account, then wants a hold the sweeper has locked: if the sweeper waited
    for the account, the two would deadlock. It skips the account and expires the hold on a later sweep."""
    account = await make_account(pool, balance_micros=10_000)
    await ledger.reserve(pool, request_id="req_live", account_id=account, amount_micros=100, ttl_seconds=60)
    await ledger.reserve(pool, request_id="req_old", account_id=account, amount_micros=200, ttl_seconds=0.01)
    await asyncio.sleep(0.05)
    async with pool.acquire() as settling, settling.transaction():
        await ledger.settle(settling, request_id="req_live", actual_micros=50)  # holds the account's row lock
        assert await asyncio.wait_for(ledger.sweep(pool), timeout=10) == 0
    assert await ledger.sweep(pool) == 1
    assert await pool.fetchval("SELECT state FROM holds WHERE request_id = 'req_old'") == "expired"
    assert await ledger.available_micros(pool, account) == 9_950
    assert await verify(pool) == []


async def test_unknown_account_and_hold_are_named(pool: asyncpg.Pool) -> None:
    with pytest.raises(AccountNotFound):
        await ledger.reserve(pool, request_id=request_id(), account_id="acct_nope", amount_micros=1,
                             ttl_seconds=60)
    with pytest.raises(UnknownHold):
        await ledger.settle(pool, request_id="req_never", actual_micros=1)


async def test_transfers_are_append_only(pool: asyncpg.Pool) -> None:
    await make_account(pool, balance_micros=1_000)
    for statement in ("UPDATE transfers SET amount_micros = 1", "DELETE FROM transfers"):
        with pytest.raises(asyncpg.PostgresError, match="append-only") as refused:
            await pool.execute(statement)
        assert refused.value.sqlstate == "ML002"
    assert await pool.fetchval("SELECT sum(amount_micros) FROM transfers") == 1_000


async def test_verify_names_a_tampered_cached_balance(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000)
    await pool.execute("UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = $1", account)
    problems = await verify(pool)
    # The cached balance no longer matches its transfers, nor what the account's credit grants hold.
    assert problems == [f"cached-balance: account {account} caches credits 1001 / debits 0 but its transfers sum to"
                        " 1000 / 0", f"grants: account {account} has 1000 micros left in its credit grants but a"
                        " balance of 1001"]


async def test_verify_names_both_sides_of_a_charge_that_does_not_match_its_hold(pool: asyncpg.Pool) -> None:
    """A charge without its settled hold, and a settled hold without its charge (written around the functions,
    as a bug or a hand-made fix would), are each named with what each side says."""
    account = await make_account(pool, balance_micros=1_000)
    transfer = await pool.fetchval(
        "INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,"
        " balance_after_micros) VALUES ($1, $1, 'op_revenue', 40, 'charge', 'req_orphan', 960) RETURNING id", account)
    await pool.execute("UPDATE accounts SET debits_posted = 40 WHERE id = $1", account)
    await pool.execute("UPDATE credit_grants SET remaining_micros = 960, spent_micros = 40 WHERE account_id = $1",
                       account)
    await pool.execute(
        "INSERT INTO holds (request_id, account_id, amount_micros, state, expires_at, resolved_at, actual_micros)"
        " VALUES ('req_unpaid', $1, 50, 'settled', now(), now(), 30)", account)
    assert sorted(await verify(pool)) == [
        f"charges: charge transfer {transfer} of 40 micros for request req_orphan has no settled hold: the hold is"
        " missing",
        "charges: settled hold req_unpaid charged 30 micros but its charge transfer says nothing (there is none)",
    ]


async def test_verify_names_a_stale_pending_hold(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000)
    await ledger.reserve(pool, request_id="req_stale", account_id=account, amount_micros=10, ttl_seconds=0.01)
    await asyncio.sleep(0.05)
    problems = await verify(pool, stale_after_seconds=0)
    assert len(problems) == 1
    assert re.fullmatch(r"stale-holds: hold req_stale expired at \S+ \S+ but is still pending at \S+ \S+"
                        r" \(\d\d:\d\d:\d\d later\)", problems[0]), problems[0]
    assert await verify(pool, stale_after_seconds=3600) == []
