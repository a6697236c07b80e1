"""The daily rollups tie out to the ledger to the micro (issue 12): over a randomized history of holds settled,
voided and failed, across accounts, keys, models and modalities, `usage_daily` equals what the calls were, the
request records and the ledger's charges, and a rebuild from the records writes exactly the same rows."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import keys, ledger, rollups
from tests.conftest import reset
from tests.factories import make_account, request_id

calls = st.lists(st.tuples(
    st.integers(0, 2),  # account
    st.integers(0, 2),  # key (2: none)
    st.sampled_from(["m/a", "m/b", "img"]),
    st.sampled_from(["completed", "upstream_failure", "cancelled", "void"]),
    st.integers(0, 50_000),  # cost
    st.integers(0, 900), st.integers(0, 900),  # prompt and completion tokens
), max_size=40)


async def _history(pool: asyncpg.Pool, history: list[tuple[int, int, str, str, int, int, int]]) -> Counter[tuple]:
    """Run the calls as the gateway does (reserve, then settle or void with a record); returns what the rollups
    must say, computed from the calls themselves: (account, key, model, modality) -> counters."""
    accounts = [await make_account(pool, balance_micros=10_000_000, name=f"acct {i}") for i in range(3)]
    key_ids = [[(await keys.create_key(pool, account_id=a, name=f"k{j}"))[0]["id"] for j in range(2)]
               for a in accounts]
    expected: Counter[tuple] = Counter()
    for account, key, model, status, cost, prompt, completion in history:
        account_id = accounts[account]
        key_id = key_ids[account][key] if key < 2 else None
        modality = "image" if model == "img" else "text"
        rid = request_id()
        await ledger.reserve(pool, request_id=rid, account_id=account_id, amount_micros=50_000, ttl_seconds=60,
                             key_id=key_id)
        record = {"model": model, "modality": modality, "status": "cancelled" if status == "void" else status,
                  "prompt_tokens": prompt, "completion_tokens": completion}
        where = (account_id, key_id or "", model, modality)
        if status == "void":
            await ledger.void(pool, request_id=rid, reason="test", record=record)
            cost = 0
        else:
            await ledger.settle(pool, request_id=rid, actual_micros=cost, record=record)
        expected[(*where, "requests")] += 1
        expected[(*where, "errors")] += status == "upstream_failure"
        expected[(*where, "prompt_tokens")] += prompt
        expected[(*where, "completion_tokens")] += completion
        expected[(*where, "cost_micros")] += cost
    return expected


async def _rollups(pool: asyncpg.Pool) -> list[tuple]:
    rows = await pool.fetch("SELECT * FROM usage_daily ORDER BY day, account_id, key_id, model, modality")
    return [tuple(r) for r in rows]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=calls)
async def test_the_rollups_equal_the_calls_the_records_and_the_ledger_and_a_rebuild_changes_nothing(
        pool: asyncpg.Pool, history: list[tuple[int, int, str, str, int, int, int]]) -> None:
    async with pool.acquire() as conn:
        await reset(conn)
    expected = await _history(pool, history)
    today = datetime.now(UTC).date()
    got: Counter[tuple] = Counter()
    for row in await pool.fetch("SELECT * FROM usage_daily"):
        assert row["day"] == today
        where = (row["account_id"], row["key_id"], row["model"], row["modality"])
        for name in ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_micros"):
            got[(*where, name)] += row[name]
    assert +got == +expected
    # To the micro against the ledger: per account, the rollups' cost is the sum of its charge transfers.
    ledger_by_account = dict(await pool.fetch(
        "SELECT account_id, sum(amount_micros)::bigint FROM transfers WHERE kind = 'charge' GROUP BY 1"))
    rolled_by_account = dict(await pool.fetch(
        "SELECT account_id, sum(cost_micros)::bigint FROM usage_daily GROUP BY 1 HAVING sum(cost_micros) > 0"))
    assert rolled_by_account == {a: c for a, c in ledger_by_account.items() if c > 0}
    before = await _rollups(pool)
    await rollups.rebuild(pool, start=today - timedelta(days=1), end=today + timedelta(days=1))
    assert await _rollups(pool) == before


async def test_the_daily_series_fills_empty_days_and_counts_top_ups(pool: asyncpg.Pool) -> None:
    account_id = await make_account(pool, balance_micros=2_500_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account_id, amount_micros=9_000, ttl_seconds=60)
    await ledger.settle(pool, request_id=rid, actual_micros=8_765, record={"model": "m", "modality": "text",
                                                                          "prompt_tokens": 10, "completion_tokens": 3})
    today = datetime.now(UTC).date()
    series = await rollups.daily(pool, start=today - timedelta(days=6), end=today + timedelta(days=1))
    assert [row["day"] for row in series] == [today - timedelta(days=6 - i) for i in range(7)]
    assert [(r["requests"], r["tokens"], r["cost_micros"], r["topup_micros"]) for r in series] == [
        (0, 0, 0, 0)] * 6 + [(1, 13, 8_765, 2_500_000)]
    assert await rollups.daily(pool, start=today, end=today + timedelta(days=1), account_id="acct_other") == [
        {"day": today, "requests": 0, "errors": 0, "tokens": 0, "cost_micros": 0, "topup_micros": 0}]
