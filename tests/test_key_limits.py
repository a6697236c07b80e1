"""Per-key spend limits: enforced in the same atomic reservation as the balance, with UTC windows that reset.

The window clock is pinned per connection with `SET meterline.now`, so boundaries are tested exactly.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import keys, ledger, limits
from billing.errors import InsufficientBalance, KeyLimitExceeded
from billing.verify import verify
from gateway.errors import from_billing
from tests.conftest import admin_headers
from tests.factories import billed_request, make_account, request_id


async def _limited_key(pool: asyncpg.Pool, account: str, limit: int, reset: str | None = None) -> str:
    row, _ = await keys.create_key(pool, account_id=account, name="limited")
    await limits.set_key_limits(pool, row["id"], {"limit_micros": limit, "limit_reset": reset})
    return str(row["id"])


async def _try_reserve(pool: asyncpg.Pool, account: str, key_id: str, amount: int) -> str:
    try:
        await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=amount,
                             ttl_seconds=60, key_id=key_id)
    except KeyLimitExceeded:
        return "key"
    except InsufficientBalance:
        return "balance"
    return "granted"


async def test_fifty_concurrent_holds_never_exceed_the_key_limit(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000_000)
    key_id = await _limited_key(pool, account, 10_000, "daily")
    outcomes = await asyncio.gather(*[_try_reserve(pool, account, key_id, 1_000) for _ in range(50)])
    assert sorted(outcomes).count("granted") == 10
    assert outcomes.count("key") == 40
    assert await pool.fetchval("SELECT held_micros FROM api_keys WHERE id = $1", key_id) == 10_000
    assert await ledger.available_micros(pool, account) == 990_000
    assert await verify(pool) == []


async def test_fifty_concurrent_calls_charge_at_most_the_limit(pool: asyncpg.Pool) -> None:
    """Holds and settlements interleave: whatever order they land in, charges never pass the limit."""
    account = await make_account(pool, balance_micros=1_000_000)
    key_id = await _limited_key(pool, account, 7_000, "monthly")

    async def call() -> int:
        rid = request_id()
        try:
            await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=1_000,
                                 ttl_seconds=60, key_id=key_id)
        except KeyLimitExceeded:
            return 0
        await ledger.settle(pool, request_id=rid, actual_micros=900)
        return 900

    charged = await asyncio.gather(*[call() for _ in range(50)])
    total = await pool.fetchval("SELECT COALESCE(sum(amount_micros), 0) FROM transfers WHERE kind = 'charge'")
    assert total == sum(charged)
    assert 7 * 900 <= total <= 7_000  # at least 7 fit whatever the order; no order lets more than the limit in
    key = await pool.fetchrow("SELECT held_micros, window_spent_micros FROM api_keys WHERE id = $1", key_id)
    assert (key["held_micros"], key["window_spent_micros"]) == (0, total)
    assert await verify(pool) == []


async def test_the_tighter_of_balance_and_key_decides_and_partial_holds_take_the_rest(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=50_000)
    key_id = await _limited_key(pool, account, 3_000)
    got = await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=5_000,
                               min_micros=1_000, ttl_seconds=60, key_id=key_id)
    assert got.granted_micros == 3_000
    with pytest.raises(KeyLimitExceeded) as refused:
        await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=1,
                             ttl_seconds=60, key_id=key_id)
    assert (refused.value.limit_micros, refused.value.remaining_micros) == (3_000, 0)
    assert (refused.value.limit_reset, refused.value.resets_at) == (None, None)
    # The balance, not the key, refuses when it is the tighter one.
    poor = await make_account(pool, balance_micros=500)
    poor_key = await _limited_key(pool, poor, 10_000)
    assert await _try_reserve(pool, poor, poor_key, 600) == "balance"


async def test_void_and_expiry_give_the_key_its_hold_back(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=100_000)
    key_id = await _limited_key(pool, account, 2_000)
    voided, expiring = request_id(), request_id()
    await ledger.reserve(pool, request_id=voided, account_id=account, amount_micros=1_000, ttl_seconds=60,
                         key_id=key_id)
    await ledger.reserve(pool, request_id=expiring, account_id=account, amount_micros=1_000, ttl_seconds=0.05,
                         key_id=key_id)
    assert await _try_reserve(pool, account, key_id, 1) == "key"
    await ledger.void(pool, request_id=voided, reason="upstream failed")
    await asyncio.sleep(0.1)
    assert await ledger.sweep(pool) == 1
    key = await pool.fetchrow("SELECT held_micros, window_spent_micros FROM api_keys WHERE id = $1", key_id)
    assert (key["held_micros"], key["window_spent_micros"]) == (0, 0)
    # A late charge for the expired hold still counts against the key.
    await ledger.settle(pool, request_id=expiring, actual_micros=1_500)
    assert await pool.fetchval("SELECT window_spent_micros FROM api_keys WHERE id = $1", key_id) == 1_500
    assert await _try_reserve(pool, account, key_id, 501) == "key"
    assert await _try_reserve(pool, account, key_id, 500) == "granted"
    assert await verify(pool) == []


async def test_a_key_without_a_limit_keeps_no_key_state(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    row, _ = await keys.create_key(pool, account_id=account, name="free")
    await billed_request(pool, account, key_id=row["id"], hold_micros=2_000, cost_micros=1_500)
    key = await pool.fetchrow("SELECT held_micros, window_spent_micros FROM api_keys WHERE id = $1", row["id"])
    assert (key["held_micros"], key["window_spent_micros"]) == (0, 0)
    assert await pool.fetchval("SELECT key_limited FROM holds") is False


# (reset, when the limit is spent, a later moment still in that window, the window's end)
WINDOWS = [
    ("daily", "2026-03-15T23:59:59Z", "2026-03-15T23:59:59.999999Z", "2026-03-16T00:00:00Z"),
    ("weekly", "2026-03-11T10:00:00Z", "2026-03-15T23:59:59Z", "2026-03-16T00:00:00Z"),  # Wed; ends Monday
    ("monthly", "2026-02-01T00:00:00Z", "2026-02-28T23:59:59Z", "2026-03-01T00:00:00Z"),
]


@pytest.mark.parametrize(("reset", "spent_at", "still_at", "ends_at"), WINDOWS, ids=[w[0] for w in WINDOWS])
async def test_the_limit_resets_exactly_at_the_window_boundary(
    pool: asyncpg.Pool, reset: str, spent_at: str, still_at: str, ends_at: str
) -> None:
    account = await make_account(pool, balance_micros=100_000)
    key_id = await _limited_key(pool, account, 1_000, reset)
    async with pool.acquire() as conn:
        await conn.execute(f"SET meterline.now = '{spent_at}'")
        await billed_request(conn, account, key_id=key_id, hold_micros=1_000, cost_micros=1_000)
        await conn.execute(f"SET meterline.now = '{still_at}'")
        with pytest.raises(KeyLimitExceeded) as refused:
            await ledger.reserve(conn, request_id=request_id(), account_id=account, amount_micros=1,
                                 ttl_seconds=60, key_id=key_id)
        assert refused.value.resets_at == datetime.fromisoformat(ends_at)
        assert refused.value.limit_reset == reset
        await conn.execute(f"SET meterline.now = '{ends_at}'")
        got = await ledger.reserve(conn, request_id=request_id(), account_id=account, amount_micros=1_000,
                                   ttl_seconds=60, key_id=key_id)
        assert got.granted_micros == 1_000


def test_key_limit_refusal_renders_as_402_naming_the_limit_and_its_reset() -> None:
    exc = KeyLimitExceeded("spend limit reached", key_id="key_1", limit_micros=5_000_000, remaining_micros=-3,
                           limit_reset="daily", resets_at=datetime(2026, 3, 16, tzinfo=UTC))
    error = from_billing(exc)
    assert error.status == 402
    assert error.body()["error"] == {
        "message": "spend limit reached", "type": "billing_error", "code": "KEY_LIMIT_EXCEEDED", "param": None,
        "limit_micros": 5_000_000, "limit_remaining_micros": 0, "limit_reset": "daily",
        "resets_at": "2026-03-16T00:00:00Z",
    }


async def test_refusal_message_names_limit_and_reset_time(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=100_000)
    key_id = await _limited_key(pool, account, 100, "daily")
    async with pool.acquire() as conn:
        await conn.execute("SET meterline.now = '2026-03-15T12:00:00Z'")
        with pytest.raises(KeyLimitExceeded) as refused:
            await ledger.reserve(conn, request_id=request_id(), account_id=account, amount_micros=101,
                                 ttl_seconds=60, key_id=key_id)
    assert str(refused.value) == (
        "This API key's spend limit of 100 micros (daily) is reached: 100 micros remain and the limit resets at"
        " 2026-03-16T00:00:00+00:00"
    )


async def test_patch_sets_limits_and_counts_what_the_key_already_spent(
    client: TestClient, pool: asyncpg.Pool
) -> None:
    account = await make_account(pool, balance_micros=100_000)
    row, secret = await keys.create_key(pool, account_id=account, name="k")
    await billed_request(pool, account, key_id=row["id"], hold_micros=5_000, cost_micros=3_000)
    resp = await client.patch(f"/admin/keys/{row['id']}", headers=admin_headers(),
                              json={"limit_micros": 5_000, "limit_reset": "monthly", "rpm_limit": 60})
    assert resp.status == 200
    body = await resp.json()
    assert (body["limit_micros"], body["limit_reset"], body["rpm_limit"], body["rpd_limit"]) == (
        5_000, "monthly", 60, None)
    resp = await client.get("/v1/key", headers={"Authorization": f"Bearer {secret}"})
    data = (await resp.json())["data"]
    assert (data["limit_micros"], data["limit_remaining_micros"], data["limit_reset"]) == (5_000, 2_000, "monthly")
    assert (data["usage_micros"], data["usage_monthly_micros"], data["usage_daily_micros"]) == (3_000, 3_000, 3_000)
    assert (data["usage"], data["limit_remaining"]) == ("0.003000", "0.002000")
    # A field left out stays; null clears it.
    resp = await client.patch(f"/admin/keys/{row['id']}", headers=admin_headers(), json={"limit_micros": None})
    body = await resp.json()
    assert (body["limit_micros"], body["limit_reset"], body["rpm_limit"]) == (None, "monthly", 60)


async def test_limits_can_be_set_at_key_creation(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    resp = await client.post(f"/admin/accounts/{account}/keys", headers=admin_headers(),
                             json={"name": "ci", "limit_micros": 1_000, "limit_reset": "weekly",
                                   "rpd_limit": 10_000})
    assert resp.status == 201
    body = await resp.json()
    assert (body["limit_micros"], body["limit_reset"], body["rpm_limit"], body["rpd_limit"]) == (
        1_000, "weekly", None, 10_000)
    assert await pool.fetchval("SELECT limit_micros FROM api_keys WHERE id = $1", body["id"]) == 1_000


BAD_PATCHES = [
    ({"rpm_limit": 0}, "rpm_limit"),
    ({"rpm_limit": 1001}, "rpm_limit"),
    ({"rpd_limit": 10_001}, "rpd_limit"),
    ({"limit_micros": -1}, "limit_micros"),
    ({"limit_micros": "5"}, "limit_micros"),
    ({"limit_reset": "yearly"}, "limit_reset"),
    ({"surprise": 1}, "surprise"),
]


@pytest.mark.parametrize(("body", "param"), BAD_PATCHES, ids=[p for _, p in BAD_PATCHES])
async def test_patch_refuses_bad_limits(client: TestClient, pool: asyncpg.Pool, body: dict, param: str) -> None:
    account = await make_account(pool)
    row, _ = await keys.create_key(pool, account_id=account, name="k")
    resp = await client.patch(f"/admin/keys/{row['id']}", headers=admin_headers(), json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


async def test_patch_of_an_unknown_key_is_404(client: TestClient) -> None:
    resp = await client.patch("/admin/keys/key_nope", headers=admin_headers(), json={"limit_micros": 1})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_a_limit_set_while_a_charge_is_committing_counts_that_charge(pool: asyncpg.Pool) -> None:
    """The limit's recount of the window's spend must see a settlement that commits while it runs: it waits
    for the key's account, then counts with a fresh snapshot."""
    account = await make_account(pool, balance_micros=100_000)
    key_id = await _limited_key(pool, account, 10_000, "daily")
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=1_000, ttl_seconds=60,
                         key_id=key_id)
    async with pool.acquire() as settling:
        transaction = settling.transaction()
        await transaction.start()
        await ledger.settle(settling, request_id=rid, actual_micros=500)
        change = asyncio.ensure_future(limits.set_key_limits(pool, key_id, {"limit_micros": 800}))
        await asyncio.sleep(0.2)  # the change is now waiting for the account the settlement holds
        assert not change.done()
        await transaction.commit()
        await asyncio.wait_for(change, timeout=10)
    spent = await pool.fetchval("SELECT window_spent_micros FROM api_keys WHERE id = $1", key_id)
    assert spent == 500
    status = await limits.key_status(pool, key_id)
    assert status["limit_remaining_micros"] == 300
    assert await verify(pool) == []


async def test_verify_names_a_key_whose_cached_holds_drifted(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    key_id = await _limited_key(pool, account, 5_000, "daily")
    await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=700, ttl_seconds=60,
                         key_id=key_id)
    assert await verify(pool) == []
    await pool.execute("UPDATE api_keys SET held_micros = 100 WHERE id = $1", key_id)
    assert await verify(pool) == [
        f"key-holds: key {key_id} caches 100 micros held but its pending limited holds sum to 700"]
