"""Finance reports: margin per model/day/account, and the flags finance reconciles by hand."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import ledger
from tests.conftest import admin_headers
from tests.factories import billed_request, make_account, request_id


async def _period(pool: asyncpg.Pool, start: datetime) -> dict[str, str]:
    end = await pool.fetchval("SELECT clock_timestamp()")
    return {"from": start.isoformat(), "to": end.isoformat()}


async def test_margin_by_model_and_account(client: TestClient, pool: asyncpg.Pool) -> None:
    start = await pool.fetchval("SELECT clock_timestamp()")
    a = await make_account(pool, balance_micros=1_000_000)
    b = await make_account(pool, balance_micros=1_000_000)
    await billed_request(pool, a, cost_micros=1_200, record={"model": "gpt", "upstream_cost_micros": 1_000})
    await billed_request(pool, a, cost_micros=600, record={"model": "gpt", "upstream_cost_micros": 450})
    await billed_request(pool, b, cost_micros=900, record={"model": "flux"})  # upstream reported no cost
    await billed_request(pool, b, cost_micros=None, record={"model": "flux", "upstream_cost_micros": 70})
    params = await _period(pool, start)
    resp = await client.get("/admin/reports/margin", params={**params, "group_by": "model"},
                            headers=admin_headers())
    assert resp.status == 200
    body = await resp.json()
    assert body["data"] == [
        {"group": "flux", "requests": 2, "requests_with_upstream_cost": 1, "revenue_micros": 900,
         "upstream_cost_micros": 70, "margin_micros": 830, "revenue_usd": "0.000900",
         "upstream_cost_usd": "0.000070", "margin_usd": "0.000830"},
        {"group": "gpt", "requests": 2, "requests_with_upstream_cost": 2, "revenue_micros": 1_800,
         "upstream_cost_micros": 1_450, "margin_micros": 350, "revenue_usd": "0.001800",
         "upstream_cost_usd": "0.001450", "margin_usd": "0.000350"},
    ]
    assert body["totals"] == {"revenue_micros": 2_700, "upstream_cost_micros": 1_520, "margin_micros": 1_180,
                              "requests": 4}
    resp = await client.get("/admin/reports/margin", params={**params, "group_by": "account"},
                            headers=admin_headers())
    by_account = {r["group"]: r["margin_micros"] for r in (await resp.json())["data"]}
    assert by_account == {a: 350, b: 830}


async def test_margin_by_day_uses_utc_dates(client: TestClient, pool: asyncpg.Pool) -> None:
    start = await pool.fetchval("SELECT clock_timestamp()")
    account = await make_account(pool, balance_micros=10_000)
    rid = await billed_request(pool, account, cost_micros=10, record={"upstream_cost_micros": 4})
    created = await pool.fetchval("SELECT created_at FROM requests WHERE id = $1", rid)
    today = created.astimezone(UTC).date().isoformat()
    resp = await client.get("/admin/reports/margin", params={**await _period(pool, start), "group_by": "day"},
                            headers=admin_headers())
    data = (await resp.json())["data"]
    assert [(r["group"], r["margin_micros"]) for r in data] == [(today, 6)]


async def test_flags_name_estimates_overruns_and_expired_holds(client: TestClient, pool: asyncpg.Pool) -> None:
    start = await pool.fetchval("SELECT clock_timestamp()")
    account = await make_account(pool, balance_micros=1_000_000)
    await billed_request(pool, account, cost_micros=100)  # clean: never flagged
    estimated, overrun, late, lost = request_id(), request_id(), request_id(), request_id()
    await ledger.reserve(pool, request_id=estimated, account_id=account, amount_micros=500, ttl_seconds=60)
    await ledger.settle(pool, request_id=estimated, actual_micros=400, estimated=True)
    await ledger.reserve(pool, request_id=overrun, account_id=account, amount_micros=500, ttl_seconds=60)
    await ledger.settle(pool, request_id=overrun, actual_micros=650)
    for rid in (late, lost):
        await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=300, ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    assert await ledger.sweep(pool) == 2
    await ledger.settle(pool, request_id=late, actual_micros=200)
    resp = await client.get("/admin/reports/flags", params=await _period(pool, start), headers=admin_headers())
    assert resp.status == 200
    body = await resp.json()
    assert body["counts"] == {"estimated": 1, "overrun": 2, "expired_then_settled": 1, "expired_unsettled": 1,
                              "in_flight_unsettled": 0}
    flagged = {(f["kind"], f["request_id"]): (f["amount_micros"], f["hold_micros"], f["overrun_micros"])
               for f in body["data"]}
    assert flagged == {
        ("estimated", estimated): (400, 500, 0),
        ("overrun", overrun): (650, 500, 150),
        ("overrun", late): (200, 300, 200),  # an expired hold released its amount: the late charge is all overrun
        ("expired_then_settled", late): (200, 300, 200),
        ("expired_unsettled", lost): (0, 300, 0),
    }
    assert body["has_more"] is False
    resp = await client.get("/admin/reports/flags", params={**await _period(pool, start), "limit": "2"},
                            headers=admin_headers())
    body = await resp.json()
    assert (len(body["data"]), body["has_more"]) == (2, True)


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [("/admin/reports/margin", {"group_by": "week"}, "group_by"),
     ("/admin/reports/margin", {"from": "soon"}, "from"),
     ("/admin/reports/flags", {"limit": "0"}, "limit")],
    ids=["group", "timestamp", "limit"],
)
async def test_bad_report_queries_are_400(client: TestClient, path: str, params: dict, param: str) -> None:
    end = datetime.now(UTC)
    query = {"from": (end - timedelta(days=1)).isoformat(), "to": end.isoformat(), **params}
    resp = await client.get(path, params=query, headers=admin_headers())
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
