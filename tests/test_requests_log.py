"""The consumer request log: records written by settle/void, read back page by page, filtered and summed.

Records are created exactly as the routes create them (reserve, then settle or void with a record), so these
tests need no upstream.
"""

from __future__ import annotations

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import keys, ledger
from tests.factories import billed_request, make_account, request_id


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _customer(pool: asyncpg.Pool, balance: int = 1_000_000) -> tuple[str, str, str]:
    account = await make_account(pool, balance_micros=balance)
    row, secret = await keys.create_key(pool, account_id=account, name="log")
    return account, str(row["id"]), secret


async def _all_pages(client: TestClient, secret: str, query: str) -> list[dict]:
    seen: list[dict] = []
    url = f"/v1/requests?{query}"
    while True:
        resp = await client.get(url, headers=_auth(secret))
        assert resp.status == 200
        body = await resp.json()
        seen += body["data"]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return seen
        url = f"/v1/requests?{query}&cursor={body['next_cursor']}"


async def test_pagination_visits_every_record_once_newest_first(client: TestClient, pool: asyncpg.Pool) -> None:
    account, key_id, secret = await _customer(pool)
    rids = [await billed_request(pool, account, key_id=key_id, cost_micros=100 + i) for i in range(23)]
    seen = await _all_pages(client, secret, "limit=5")
    assert [r["id"] for r in seen] == list(reversed(rids))
    assert len({r["id"] for r in seen}) == 23


async def test_pagination_visits_records_sharing_a_timestamp_once(client: TestClient, pool: asyncpg.Pool) -> None:
    """Group commit gives many records one created_at (their holds were taken in one transaction): the cursor
    must order and split them by id too, never skipping or repeating one at a page boundary."""
    account, key_id, secret = await _customer(pool)
    async with pool.acquire() as conn, conn.transaction():  # one transaction: one now() for every hold
        rids = [request_id() for _ in range(7)]
        for rid in rids:
            await ledger.reserve(conn, request_id=rid, account_id=account, amount_micros=100, ttl_seconds=60,
                                 key_id=key_id)
    for rid in rids:
        await ledger.settle(pool, request_id=rid, actual_micros=10, record={"model": "m", "modality": "text"})
    assert await pool.fetchval("SELECT count(DISTINCT created_at) FROM requests") == 1
    seen = await _all_pages(client, secret, "limit=2")
    assert [r["id"] for r in seen] == sorted(rids, reverse=True)


async def test_summary_cost_and_count_equal_the_ledger(client: TestClient, pool: asyncpg.Pool) -> None:
    account, key_id, secret = await _customer(pool)
    for i in range(12):
        await billed_request(pool, account, key_id=key_id, hold_micros=2_000, cost_micros=1_000 + 37 * i)
    await billed_request(pool, account, key_id=key_id, cost_micros=None)  # voided: a record that costs 0
    resp = await client.get("/v1/requests?limit=2&summary=true", headers=_auth(secret))
    body = await resp.json()
    charged = await pool.fetchval(
        "SELECT sum(amount_micros) FROM transfers WHERE kind = 'charge' AND account_id = $1", account
    )
    assert charged == 12 * 1_000 + 37 * sum(range(12))
    assert body["summary"] == {
        "count": 13, "total_cost_micros": charged, "total_cost": f"{charged / 1_000_000:.6f}", "currency": "usd",
    }
    assert len(body["data"]) == 2


async def test_a_record_has_the_lumenfall_shape_with_exact_cost(client: TestClient, pool: asyncpg.Pool) -> None:
    account, key_id, secret = await _customer(pool)
    rid = await billed_request(
        pool, account, key_id=key_id, hold_micros=90_000, cost_micros=45_001,
        record={"model": "flux-pro", "modality": "image", "endpoint": "/openai/v1/images/generations",
                "duration_ms": 2340, "user": "u-7", "quantity": 1, "client_request_id": "trace-1"},
    )
    resp = await client.get(f"/openai/v1/requests/{rid}", headers=_auth(secret))
    assert resp.status == 200
    body = await resp.json()
    assert body["created_at"].endswith("Z")
    del body["created_at"]
    assert body == {
        "id": rid, "object": "request", "model": "flux-pro", "modality": "image",
        "endpoint": "/openai/v1/images/generations", "status": "completed", "duration_ms": 2340,
        "key_id": key_id, "client_request_id": "trace-1", "provider": None, "provider_model": None,
        "generation_id": None, "attempts": None, "error_code": None, "error_message": None, "user": "u-7",
        "cost_micros": 45_001,
        "cost": "0.045001", "currency": "usd", "estimated": False, "billing_status": "settled",
        "usage": {"prompt_tokens": None, "completion_tokens": None, "cached_tokens": None,
                  "reasoning_tokens": None, "quantity": 1},
    }


async def test_filters_by_model_status_key_and_time(client: TestClient, pool: asyncpg.Pool) -> None:
    account, key_a, secret = await _customer(pool)
    row, _ = await keys.create_key(pool, account_id=account, name="second")
    key_b = str(row["id"])
    a1 = await billed_request(pool, account, key_id=key_a, record={"model": "m-1"})
    b1 = await billed_request(pool, account, key_id=key_b, record={"model": "m-2"})
    middle = await pool.fetchval("SELECT created_at FROM requests WHERE id = $1", b1)
    a2 = await billed_request(pool, account, key_id=key_a, cost_micros=None, record={"model": "m-2"})
    cases = {
        "model=m-2": [a2, b1],
        f"key_id={key_a}": [a2, a1],
        "status=cancelled": [a2],
        "status=completed&model=m-1": [a1],
        f"created_after={middle.isoformat()}": [a2, b1],
        f"created_before={middle.isoformat()}": [a1],
        "model=nope": [],
    }
    for query, expected in cases.items():
        query = query.replace("+", "%2B")
        got = [r["id"] for r in await _all_pages(client, secret, query)]
        assert got == expected, query
        resp = await client.get(f"/v1/requests?{query}&summary=true&limit=1", headers=_auth(secret))
        assert (await resp.json())["summary"]["count"] == len(expected), query


async def test_a_key_never_sees_another_accounts_records(client: TestClient, pool: asyncpg.Pool) -> None:
    mine, my_key, secret = await _customer(pool)
    theirs, their_key, _ = await _customer(pool)
    await billed_request(pool, mine, key_id=my_key)
    foreign = await billed_request(pool, theirs, key_id=their_key, cost_micros=999)
    resp = await client.get(f"/v1/requests/{foreign}", headers=_auth(secret))
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "NOT_FOUND"
    resp = await client.get(f"/v1/requests?key_id={their_key}&summary=true", headers=_auth(secret))
    body = await resp.json()
    assert (body["data"], body["summary"]["count"], body["summary"]["total_cost_micros"]) == ([], 0, 0)
    everything = await _all_pages(client, secret, "limit=100")
    assert [r["key_id"] for r in everything] == [my_key]


@pytest.mark.parametrize(
    ("query", "param"),
    [("cursor=not-a-cursor", "cursor"), ("created_after=yesterday", "created_after"), ("limit=0", "limit"),
     ("created_before=9999-12-31T23:59:59-05:00", "created_before"),
     ("summary=maybe", "summary"), (f"model={'x' * 201}", "model")],
    ids=["cursor", "timestamp", "limit", "past-year-9999", "summary", "long-filter"],
)
async def test_bad_query_parameters_are_400(client: TestClient, pool: asyncpg.Pool, query: str, param: str) -> None:
    _, _, secret = await _customer(pool)
    resp = await client.get(f"/v1/requests?{query}", headers=_auth(secret))
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


async def test_the_request_log_needs_a_key(client: TestClient) -> None:
    resp = await client.get("/v1/requests")
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "AUTHENTICATION_FAILED"
