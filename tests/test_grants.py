"""Credit grants (issue 16): the spending order, expiry on time (with the hold pending at an expiry), effective
times, debt, refunds, racing sweepers, and the admin API, customer routes and CLI over them.

The clock is pinned per connection (`SET meterline.now`), so expiries are tested at their exact instant; holds keep
the database's own clock, an hour long, so they never expire under the pinned one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import grants, ledger, statements
from billing.errors import InsufficientBalance
from billing.verify import verify
from tests.conftest import admin_headers
from tests.factories import make_account, make_customer, request_id
from tests.test_cli import meterline

T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
HOUR = timedelta(hours=1)


@asynccontextmanager
async def clock(pool: asyncpg.Pool, at: datetime) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose meterline_now() is `at` (move it with `pin`)."""
    async with pool.acquire() as conn:
        await pin(conn, at)
        try:
            yield conn
        finally:
            await conn.execute("RESET meterline.now")


async def pin(conn: asyncpg.Connection, at: datetime) -> None:
    await conn.execute(f"SET meterline.now = '{at.isoformat()}'")


async def remaining(conn: asyncpg.Connection, *grant_ids: str) -> list[int]:
    rows = {r["id"]: r["remaining_micros"] for r in await conn.fetch(
        "SELECT id, remaining_micros FROM credit_grants WHERE id = ANY($1)", list(grant_ids))}
    return [rows[g] for g in grant_ids]


async def charge(conn: asyncpg.Connection, account: str, amount: int, actual: int | None = None) -> str:
    rid = request_id()
    await ledger.reserve(conn, request_id=rid, account_id=account, amount_micros=amount, ttl_seconds=3600)
    if actual is not None:
        await ledger.settle(conn, request_id=rid, actual_micros=actual)
    return rid


async def grant(conn: asyncpg.Connection, account: str, amount: int, category: str = "promotional",
                **extra: Any) -> str:
    row = await grants.create_grant(conn, account_id=account, category=category, amount_micros=amount, **extra)
    return str(row["id"])


async def topup(conn: asyncpg.Connection, account: str, amount: int) -> str:
    posting = await ledger.post(conn, account_id=account, kind="topup", amount_micros=amount, description="card")
    return str(await conn.fetchval("SELECT id FROM credit_grants WHERE transfer_id = $1", posting.transfer_id))


async def expired_to_operator(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(
        "SELECT COALESCE(sum(amount_micros), 0) FROM transfers WHERE credit_account_id = 'op_expired'"))


async def test_charges_spend_promotional_first_then_lower_priority_then_earliest_expiry_then_oldest(
        pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        paid = await topup(conn, account, 1_000)
        late = await grant(conn, account, 1_000, expires_at=T0 + 10 * HOUR)
        soon = await grant(conn, account, 1_000, expires_at=T0 + 5 * HOUR)
        first = await grant(conn, account, 1_000, priority=10, expires_at=T0 + 20 * HOUR)
        older = await grant(conn, account, 1_000)
        newer = await grant(conn, account, 1_000)
        order = [first, soon, late, older, newer, paid]
        for spent in range(1, 7):
            await charge(conn, account, 1_000, actual=1_000)
            assert await remaining(conn, *order) == [0] * spent + [1_000] * (6 - spent)
        # One charge across grants: what the first lacks comes from the next.
        again = [await grant(conn, account, 300, priority=1), await topup(conn, account, 1_000)]
        await charge(conn, account, 500, actual=500)
        assert await remaining(conn, *again) == [0, 800]
        assert await verify(conn) == []


async def test_an_expiry_moves_the_unspent_remainder_to_op_expired_at_its_instant(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        promo = await grant(conn, account, 1_000, expires_at=T0 + HOUR, description="welcome credit")
        await topup(conn, account, 500)
        await charge(conn, account, 300, actual=300)
        await pin(conn, T0 + HOUR - timedelta(microseconds=1))
        assert await grants.sweep(conn) == 0
        assert (await grants.balance_parts(conn, account))["promotional_micros"] == 700
        await pin(conn, T0 + HOUR)
        assert await grants.sweep(conn) == 1
        row = await conn.fetchrow("SELECT * FROM credit_grants WHERE id = $1", promo)
        assert (row["remaining_micros"], row["spent_micros"], row["expired_micros"]) == (0, 300, 700)
        assert await expired_to_operator(conn) == 700
        parts = await grants.balance_parts(conn, account)
        assert (parts["balance_micros"], parts["paid_micros"], parts["promotional_micros"]) == (500, 500, 0)
        expiry = await conn.fetchrow("SELECT * FROM transfers WHERE kind = 'expiry'")
        assert (expiry["debit_account_id"], expiry["grant_id"], expiry["balance_after_micros"]) == (
            account, promo, 500)
        assert await grants.sweep(conn) == 0  # once
        listed = await grants.list_grants(conn, account, limit=10)
        assert {g["id"]: g["status"] for g in listed}[promo] == "expired"
        stmt = await statements.statement(conn, account_id=account, start=T0 - 2 * HOUR * 24,
                                          end=T0 + 2 * HOUR * 24)
        assert {r["kind"]: r["amount_micros"] for r in stmt["credits"]} == {"grant": 1_000, "topup": 500}
        assert {r["kind"]: r["amount_micros"] for r in stmt["debits"]["adjustments"]} == {"expiry": 700}
        assert stmt["closing_balance_micros"] == stmt["credits_micros"] - stmt["debits_micros"] == 500
        assert await verify(conn) == []


async def test_a_hold_pending_at_an_expiry_keeps_the_credit_it_needs_and_its_late_charge_is_paid_from_it(
        pool: asyncpg.Pool) -> None:
    """The expired credit a pending hold needs stays until the hold resolves: the charge settling after the expiry
    is paid from it in full (no debt, no overrun), nothing new can spend it meanwhile, and the rest expires with
    the charge."""
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        promo = await grant(conn, account, 1_000, expires_at=T0 + HOUR)
        rid = await charge(conn, account, 800)
        await pin(conn, T0 + HOUR)
        assert await grants.sweep(conn) == 1
        assert await expired_to_operator(conn) == 200  # only what the hold does not need
        assert await ledger.available_micros(conn, account) == 0
        with pytest.raises(InsufficientBalance):
            await charge(conn, account, 1)
        assert await grants.sweep(conn) == 1  # still due: the kept credit waits for the hold, and stays kept
        assert await expired_to_operator(conn) == 200
        outcome = await ledger.settle(conn, request_id=rid, actual_micros=600)
        assert (outcome.actual_micros, outcome.overrun_micros) == (600, 0)
        row = await conn.fetchrow("SELECT * FROM credit_grants WHERE id = $1", promo)
        assert (row["remaining_micros"], row["spent_micros"], row["expired_micros"]) == (0, 600, 400)
        assert await expired_to_operator(conn) == 400
        assert await conn.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account) == 0
        assert await conn.fetchval("SELECT grants_due_at FROM accounts WHERE id = $1", account) is None
        assert await verify(conn) == []


async def test_a_hold_that_unexpired_credit_covers_lets_the_expiring_grant_expire_whole(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        await grant(conn, account, 1_000, expires_at=T0 + HOUR)
        paid = await topup(conn, account, 1_000)
        rid = await charge(conn, account, 800)  # promotional first: the hold is against the whole available
        await pin(conn, T0 + HOUR)
        assert await grants.sweep(conn) == 1
        assert await expired_to_operator(conn) == 1_000
        await ledger.settle(conn, request_id=rid, actual_micros=800)
        assert await remaining(conn, paid) == [200]
        assert await verify(conn) == []


async def test_a_hold_voided_after_an_expiry_lets_the_kept_credit_expire(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        await grant(conn, account, 1_000, expires_at=T0 + HOUR)
        rid = await charge(conn, account, 600)
        await pin(conn, T0 + HOUR)
        await ledger.reserve(conn, request_id=request_id(), account_id=account, amount_micros=0, ttl_seconds=60)
        assert await expired_to_operator(conn) == 400  # brought to the clock by the hold itself, before deciding
        await ledger.void(conn, request_id=rid, reason="client went away")
        assert await expired_to_operator(conn) == 1_000
        assert await verify(conn) == []


async def test_a_grant_effective_later_is_outside_the_balance_until_its_time(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        later = await grant(conn, account, 1_000, effective_at=T0 + HOUR, expires_at=T0 + 3 * HOUR)
        assert [g["status"] for g in await grants.list_grants(conn, account, limit=5)] == ["scheduled"]
        with pytest.raises(InsufficientBalance):
            await charge(conn, account, 1)
        assert await conn.fetchval("SELECT count(*) FROM transfers WHERE account_id = $1", account) == 0
        await pin(conn, T0 + HOUR)
        await charge(conn, account, 500, actual=500)  # the hold posts the grant first
        assert await remaining(conn, later) == [500]
        transfer = await conn.fetchrow("SELECT * FROM transfers WHERE grant_id = $1 AND kind = 'grant'", later)
        assert (transfer["debit_account_id"], transfer["amount_micros"]) == ("op_promotions", 1_000)
        assert await verify(conn) == []


async def test_a_credit_pays_the_debt_an_overrun_left_first(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        first = await topup(conn, account, 1_000)
        await charge(conn, account, 1_000, actual=1_500)
        assert await remaining(conn, first) == [0]
        second = await topup(conn, account, 2_000)
        row = await conn.fetchrow("SELECT * FROM credit_grants WHERE id = $1", second)
        assert (row["remaining_micros"], row["spent_micros"]) == (1_500, 500)
        assert (await grants.balance_parts(conn, account))["balance_micros"] == 1_500
        assert await verify(conn) == []


async def test_a_refund_takes_back_paid_credit_before_promotional(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        promo = await grant(conn, account, 1_000)
        paid = await topup(conn, account, 1_000)
        await ledger.post(conn, account_id=account, kind="refund", amount_micros=-600, description="refund",
                          overdraw=True)
        assert await remaining(conn, promo, paid) == [1_000, 400]
        assert await verify(conn) == []


async def test_two_sweepers_racing_expire_each_grant_exactly_once(pool: asyncpg.Pool) -> None:
    accounts = [await make_account(pool) for _ in range(40)]
    async with clock(pool, T0) as conn:
        for account in accounts:
            await grant(conn, account, 1_000, expires_at=T0 + HOUR)
            await charge(conn, account, 250, actual=250)

    async def sweeper() -> int:
        async with clock(pool, T0 + HOUR) as conn:
            done = 0
            for _ in range(20):
                done += await grants.sweep(conn, limit=7)
            return done

    counts = await asyncio.gather(sweeper(), sweeper())
    assert sum(counts) == 40
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'expiry'") == 40
    assert await pool.fetchval("SELECT sum(amount_micros) FROM transfers WHERE kind = 'expiry'") == 40 * 750
    assert await verify(pool) == []


def _grant_body(**extra: Any) -> dict[str, Any]:
    return {"amount_usd": "5.00", "category": "promotional", "priority": 10,
            "expires_at": (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0).isoformat(), **extra}


async def test_admins_grant_under_an_idempotency_key_and_customers_see_their_grants_and_balance_parts(
        client: TestClient, pool: asyncpg.Pool) -> None:
    account, secret = await make_customer(pool, balance_micros=2_000_000)
    body = _grant_body(description="Welcome credit")
    path = f"/admin/accounts/{account}/grants"
    first = await client.post(path, json=body, headers=admin_headers(**{"Idempotency-Key": "welcome-1"}))
    made = await first.json()
    assert first.status == 201, made
    assert (made["object"], made["category"], made["priority"], made["status"], made["amount_micros"],
            made["remaining_micros"], made["description"]) == (
        "credit_grant", "promotional", 10, "active", 5_000_000, 5_000_000, "Welcome credit")
    again = await client.post(path, json=body, headers=admin_headers(**{"Idempotency-Key": "welcome-1"}))
    assert (again.status, again.headers.get("Idempotent-Replayed"), (await again.json())["id"]) == (
        201, "true", made["id"])
    # The same instant in another offset is the same grant.
    shifted = datetime.fromisoformat(body["expires_at"]).astimezone(timezone(timedelta(hours=2))).isoformat()
    same = await client.post(path, json={**body, "expires_at": shifted},
                             headers=admin_headers(**{"Idempotency-Key": "welcome-1"}))
    assert (same.status, same.headers.get("Idempotent-Replayed")) == (201, "true")
    conflict = await client.post(path, json={**body, "amount_usd": "6.00"},
                                 headers=admin_headers(**{"Idempotency-Key": "welcome-1"}))
    assert (conflict.status, (await conflict.json())["error"]["code"]) == (422, "IDEMPOTENCY_CONFLICT")
    assert await pool.fetchval("SELECT count(*) FROM credit_grants WHERE category = 'promotional'") == 1

    listed = await (await client.get(path, headers=admin_headers())).json()
    assert [g["category"] for g in listed["data"]] == ["promotional", "paid"]
    mine = await (await client.get("/v1/billing/grants", headers={"Authorization": f"Bearer {secret}"})).json()
    assert mine["data"] == listed["data"]
    balance = await (await client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})).json()
    assert (balance["balance_micros"], balance["paid_micros"], balance["promotional_micros"]) == (
        7_000_000, 2_000_000, 5_000_000)
    assert balance["next_expiry"] == {"at": body["expires_at"].replace("+00:00", "Z"), "amount_micros": 5_000_000}


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"expires_at": "2020-01-01T00:00:00Z"}, 400, "expires_at"),
    ({"effective_at": "2200-01-01T00:00:00Z"}, 400, "expires_at"),  # expires before it takes effect
    ({"category": "gift"}, 400, "category"),
    ({"amount_usd": "0"}, 400, "amount_usd"),
    ({"amount_usd": None, "amount_micros": 0}, 400, "amount_micros"),
    ({"amount_usd": "-5"}, 400, "amount_usd"),
    ({"priority": 101}, 400, "priority"),
    ({"expires_at": "2100-01-01T00:00:00"}, 400, "expires_at"),  # no UTC offset
])
async def test_a_bad_grant_is_refused_naming_the_field(client: TestClient, pool: asyncpg.Pool,
                                                       change: dict[str, Any], status: int, param: str) -> None:
    account = await make_account(pool)
    resp = await client.post(f"/admin/accounts/{account}/grants", json=_grant_body(**change),
                             headers=admin_headers(**{"Idempotency-Key": "k"}))
    error = (await resp.json())["error"]
    assert (resp.status, error["code"], error["param"]) == (status, "INVALID_REQUEST", param), error
    assert await pool.fetchval("SELECT count(*) FROM credit_grants") == 0


async def test_a_grant_needs_a_key_and_a_real_account(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    unkeyed = await client.post(f"/admin/accounts/{account}/grants", json=_grant_body(), headers=admin_headers())
    assert (unkeyed.status, (await unkeyed.json())["error"]["param"]) == (400, "Idempotency-Key")
    missing = await client.post("/admin/accounts/acct_none/grants", json=_grant_body(),
                                headers=admin_headers(**{"Idempotency-Key": "k"}))
    assert missing.status == 404


async def test_the_gateway_sweeper_expires_a_grant_on_time(client: TestClient, pool: asyncpg.Pool) -> None:
    """The app's sweeper (every 0.2 s in tests) writes the expiry of a grant nobody spends from."""
    account, secret = await make_customer(pool)
    expires = datetime.now(UTC) + timedelta(seconds=1)
    made = await client.post(f"/admin/accounts/{account}/grants", json=_grant_body(expires_at=expires.isoformat()),
                             headers=admin_headers(**{"Idempotency-Key": "soon"}))
    assert made.status == 201
    for _ in range(100):
        if await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'expiry'"):
            break
        await asyncio.sleep(0.1)
    expiry = await pool.fetchrow("SELECT amount_micros, created_at FROM transfers WHERE kind = 'expiry'")
    assert expiry["amount_micros"] == 5_000_000 and expiry["created_at"] >= expires
    balance = await (await client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})).json()
    assert (balance["balance_micros"], balance["promotional_micros"], balance["next_expiry"]) == (0, 0, None)


async def test_the_cli_grants_and_lists_with_the_apis_idempotency(pool: asyncpg.Pool, database_url: str) -> None:
    account = await make_account(pool)
    args = ("grants", "create", "--account", account, "--amount-usd", "2.50", "--category", "promotional",
            "--expires-at", (T0 + HOUR).isoformat(), "--idempotency-key", "cli-1")
    made = json.loads(meterline(*args, database_url=database_url).stdout)
    assert (made["amount_micros"], made["category"], made["replayed"]) == (2_500_000, "promotional", False)
    replay = json.loads(meterline(*args, database_url=database_url).stdout)
    assert (replay["id"], replay["replayed"]) == (made["id"], True)
    listed = json.loads(meterline("grants", "list", "--account", account, database_url=database_url).stdout)
    assert [g["id"] for g in listed["data"]] == [made["id"]]
    refused = meterline("grants", "create", "--account", account, "--amount-usd", "1", "--category", "promotional",
                        "--expires-at", "2020-01-01T00:00:00Z", "--idempotency-key", "cli-2",
                        database_url=database_url, check=False)
    assert refused.returncode != 0 and "expires_at must be in the future" in refused.stderr


async def test_what_a_dry_run_reads_is_what_the_hold_would_see_past_an_expiry(pool: asyncpg.Pool) -> None:
    """The reads behind a dryRun and the balance bring the grants to the clock first, as the hold itself does: past
    an expiry nobody has swept yet, they do not count the expired credit."""
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        await grant(conn, account, 1_000, expires_at=T0 + HOUR)
        await topup(conn, account, 500)
        await pin(conn, T0 + HOUR)
        assert await ledger.coverable_micros(conn, account, None) == (500, None)
        assert await expired_to_operator(conn) == 1_000
        assert await grants.sweep(conn) == 0  # already done by the read
        assert await ledger.available_micros(conn, account) == 500


async def test_a_promotional_grant_and_its_expiry_write_one_webhook_event_each(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    async with clock(pool, T0) as conn:
        promo = await grant(conn, account, 1_000, priority=5, expires_at=T0 + HOUR, description="launch week")
        await topup(conn, account, 500)
        await charge(conn, account, 300, actual=300)
        await pin(conn, T0 + HOUR)
        await grants.sweep(conn)
        await grants.sweep(conn)
        events = await conn.fetch("SELECT type, data FROM webhook_events WHERE account_id = $1 ORDER BY created_at,"
                                  " type", account)
    by_type = {e["type"]: e["data"] for e in events}
    assert sorted(e["type"] for e in events) == ["credit.expired", "credit.granted", "topup.posted"]
    granted, expired = by_type["credit.granted"], by_type["credit.expired"]
    assert (granted["grant_id"], granted["category"], granted["priority"], granted["amount_micros"],
            granted["description"]) == (promo, "promotional", 5, 1_000, "launch week")
    assert (expired["grant_id"], expired["expired_micros"], expired["remaining_micros"],
            expired["balance_micros"]) == (promo, 700, 0, 500)
