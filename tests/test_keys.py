"""Customer keys: stored only as digests, never logged, each reading only its own account."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import db, keys, ledger
from tests.conftest import admin_headers
from tests.factories import make_account, make_customer, request_id


async def test_the_raw_key_is_never_stored(client: TestClient, pool: asyncpg.Pool) -> None:
    resp = await client.post("/admin/accounts", json={"name": "acme"}, headers=admin_headers())
    account = (await resp.json())["id"]
    resp = await client.post(f"/admin/accounts/{account}/keys", json={}, headers=admin_headers())
    secret = (await resp.json())["key"]
    assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})).status == 200
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    for table in tables:
        dump = await pool.fetchval(f'SELECT string_agg(t::text, chr(10)) FROM "{table["tablename"]}" t')
        assert secret not in (dump or ""), f"the raw key appears in {table['tablename']}"
        assert secret[len(keys.KEY_PREFIX):] not in (dump or "")
    stored = await pool.fetchval("SELECT digest FROM api_keys")
    assert bytes(stored) == keys.digest(secret)


async def test_keys_never_reach_the_logs(
    client: TestClient, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account, secret = await make_customer(pool, balance_micros=1_000)
    live = {"Authorization": f"Bearer {secret}"}
    assert (await client.get("/v1/balance", headers=live)).status == 200
    await client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}x"})
    await client.get("/admin/accounts", headers=live)
    await client.post(f"/admin/accounts/{account}/topups", data=b"{bad", headers=admin_headers())
    key_id = await pool.fetchval("SELECT id FROM api_keys")
    await client.delete(f"/admin/keys/{key_id}", headers=admin_headers())
    assert (await client.get("/v1/balance", headers=live)).status == 401
    logged = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert caplog.records, "expected the requests to be logged at all"
    assert secret not in logged
    assert admin_headers()["Authorization"].split()[1] not in logged


async def test_balance_has_lumenfalls_shape_and_exact_micros(client: TestClient, pool: asyncpg.Pool) -> None:
    account, secret = await make_customer(pool, balance_micros=12_500_000)
    await ledger.reserve(pool, request_id=request_id(), account_id=account, amount_micros=250_000,
                         ttl_seconds=60)
    for prefix in ("/v1", "/openai/v1"):
        resp = await client.get(f"{prefix}/balance", headers={"Authorization": f"Bearer {secret}"})
        assert resp.status == 200
        assert await resp.json() == {
            "object": "balance",
            "billing_type": "prepaid",
            "available": {"amount": 12.25, "currency": "usd"},
            "available_micros": 12_250_000,
            "balance_micros": 12_500_000,
            "held_micros": 250_000,
            "paid_micros": 12_500_000,
            "promotional_micros": 0,
            "next_expiry": None,
        }
        assert '"amount":12.25,' in await resp.text()


async def test_a_key_reads_only_its_own_balance(client: TestClient, pool: asyncpg.Pool) -> None:
    _, rich = await make_customer(pool, balance_micros=9_000_000)
    _, poor = await make_customer(pool, balance_micros=1)
    rich_view = await (await client.get("/v1/balance", headers={"Authorization": f"Bearer {rich}"})).json()
    poor_view = await (await client.get("/v1/balance", headers={"Authorization": f"Bearer {poor}"})).json()
    assert (rich_view["balance_micros"], poor_view["balance_micros"]) == (9_000_000, 1)


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Token abc", "Bearer ml-short", "Bearer " + "ml-" + "A" * 43,
     "Bearer sk-" + "x" * 48],
    ids=["missing", "empty", "no-token", "blank-token", "wrong-scheme", "malformed", "unknown", "foreign"],
)
async def test_bad_keys_are_401(client: TestClient, pool: asyncpg.Pool, authorization: str | None) -> None:
    await make_account(pool)
    headers = {} if authorization is None else {"Authorization": authorization}
    resp = await client.get("/v1/balance", headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "AUTHENTICATION_FAILED"
    assert body["error"]["type"] == "authentication_error"


async def test_revocation_reaches_another_process_within_the_cache_lifetime(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Two KeyStores on two pools stand for two processes: the other one stops accepting the key once its
    cached answer (at most key_cache_seconds old) runs out."""
    account = await make_account(pool)
    row, secret = await keys.create_key(pool, account_id=account, name=None)
    other_pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        other = keys.KeyStore(other_pool, ttl_seconds=0.2)
        assert await other.authenticate(secret) is not None
        await keys.revoke_key(pool, row["id"])
        await asyncio.sleep(0.25)
        assert await other.authenticate(secret) is None
    finally:
        await other_pool.close()
