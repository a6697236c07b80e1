"""Statements tie out: opening + credits - debits = closing, to the micro, for any history and any period."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import ledger, statements
from billing.errors import InsufficientBalance
from tests.conftest import admin_headers
from tests.factories import billed_request, make_account, request_id

amounts = st.integers(min_value=1, max_value=2_000_000)
operations = st.one_of(
    st.tuples(st.just("topup"), amounts),
    st.tuples(st.just("adjustment"), st.integers(min_value=-500_000, max_value=500_000).filter(bool)),
    st.tuples(st.just("settle"), amounts, st.integers(min_value=0, max_value=2_500_000)),
    st.tuples(st.just("void"), amounts),
    st.tuples(st.just("pending"), amounts),
    st.tuples(st.just("cut")),
)


async def _apply(pool: asyncpg.Pool, account: str, op: tuple) -> tuple[int, int]:
    """Run one operation; returns (change of balance, change of pending holds) as the model expects them."""
    kind = op[0]
    if kind in ("topup", "adjustment"):
        try:
            await ledger.post(pool, account_id=account, kind=kind, amount_micros=op[1], description="hypothesis")
        except InsufficientBalance:
            return 0, 0
        return op[1], 0
    rid = request_id()
    try:
        got = await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=op[1],
                                   min_micros=0, ttl_seconds=3600)
    except InsufficientBalance:
        return 0, 0
    if kind == "settle":
        await ledger.settle(pool, request_id=rid, actual_micros=op[2], record={"model": f"m{op[2] % 3}"})
        return -op[2], 0
    if kind == "void":
        await ledger.void(pool, request_id=rid, reason="hypothesis")
        return 0, 0
    return 0, got.granted_micros


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(operations, min_size=1, max_size=25), picks=st.tuples(st.integers(), st.integers()))
async def test_statements_tie_out_over_random_histories(
    pool: asyncpg.Pool, history: list[tuple], picks: tuple[int, int]
) -> None:
    account = await make_account(pool)
    # The model: balance and pending holds at each cut (cuts are database times between operations).
    cuts: list[tuple[datetime, int, int]] = [(await pool.fetchval("SELECT clock_timestamp()"), 0, 0)]
    balance = held = 0
    for op in [*history, ("cut",)]:
        if op[0] == "cut":
            cuts.append((await pool.fetchval("SELECT clock_timestamp()"), balance, held))
            continue
        d_balance, d_held = await _apply(pool, account, op)
        balance, held = balance + d_balance, held + d_held
    i, j = sorted((picks[0] % len(cuts), picks[1] % len(cuts)))
    start, opening, _ = cuts[i]
    end, closing, held_at_close = cuts[j]
    if end <= start:
        end = start + timedelta(microseconds=1)
    stmt = await statements.statement(pool, account_id=account, start=start, end=end)
    assert stmt["opening_balance_micros"] + stmt["credits_micros"] - stmt["debits_micros"] \
        == stmt["closing_balance_micros"]
    assert (stmt["opening_balance_micros"], stmt["closing_balance_micros"]) == (opening, closing)
    assert stmt["held_at_close_micros"] == held_at_close
    # The breakdown adds up to the totals it explains.
    assert sum(r["amount_micros"] for r in stmt["credits"]) == stmt["credits_micros"]
    assert sum(r["amount_micros"] for r in stmt["debits"]["charges"] + stmt["debits"]["adjustments"]) \
        == stmt["debits_micros"]
    # A period reaching past now closes at the account's current balance.
    everything = await statements.statement(pool, account_id=account, start=cuts[0][0],
                                            end=cuts[-1][0] + timedelta(days=1))
    current = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account)
    assert (everything["opening_balance_micros"], everything["closing_balance_micros"]) == (0, current)


async def _history(pool: asyncpg.Pool) -> tuple[str, datetime, datetime]:
    account = await make_account(pool)
    start = await pool.fetchval("SELECT clock_timestamp()")
    await ledger.post(pool, account_id=account, kind="topup", amount_micros=10_000_000, description="card")
    await ledger.post(pool, account_id=account, kind="adjustment", amount_micros=250_000, description="goodwill")
    await ledger.post(pool, account_id=account, kind="adjustment", amount_micros=-50_000, description="fix")
    await billed_request(pool, account, hold_micros=90_000, cost_micros=45_000,
                         record={"model": "flux-pro", "modality": "image"})
    await billed_request(pool, account, hold_micros=90_000, cost_micros=45_000,
                         record={"model": "flux-pro", "modality": "image"})
    await billed_request(pool, account, hold_micros=5_000, cost_micros=1_234, record={"model": "gpt-x"})
    await billed_request(pool, account, hold_micros=5_000, cost_micros=None)
    await ledger.reserve(pool, request_id="req_open", account_id=account, amount_micros=7_000, ttl_seconds=600)
    end = await pool.fetchval("SELECT clock_timestamp()")
    return account, start, end


async def test_statement_json_groups_debits_by_model_and_modality(client: TestClient, pool: asyncpg.Pool) -> None:
    account, start, end = await _history(pool)
    resp = await client.get(f"/admin/accounts/{account}/statement",
                            params={"from": start.isoformat(), "to": end.isoformat()}, headers=admin_headers())
    assert resp.status == 200
    body = await resp.json()
    assert (body["opening_balance_micros"], body["credits_micros"], body["debits_micros"],
            body["closing_balance_micros"]) == (0, 10_250_000, 141_234, 10_108_766)
    assert body["closing_balance_usd"] == "10.108766"
    assert body["credits"] == [{"kind": "adjustment", "count": 1, "amount_micros": 250_000},
                               {"kind": "topup", "count": 1, "amount_micros": 10_000_000}]
    assert body["debits"] == {
        "charges": [{"model": "flux-pro", "modality": "image", "count": 2, "amount_micros": 90_000},
                    {"model": "gpt-x", "modality": "text", "count": 1, "amount_micros": 1_234}],
        "adjustments": [{"kind": "adjustment", "count": 1, "amount_micros": 50_000}],
    }
    assert (body["held_at_close_micros"], body["holds_at_close"]) == (7_000, 1)


async def test_statement_csv_parses_back_to_the_same_micros(client: TestClient, pool: asyncpg.Pool) -> None:
    account, start, end = await _history(pool)
    resp = await client.get(f"/admin/accounts/{account}/statement", headers=admin_headers(),
                            params={"from": start.isoformat(), "to": end.isoformat(), "format": "csv"})
    assert resp.status == 200
    assert resp.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    totals = {r["section"]: int(r["amount_micros"]) for r in rows if r["kind"] == ""}
    assert totals == {"opening_balance": 0, "credits_total": 10_250_000, "debits_total": 141_234,
                      "closing_balance": 10_108_766, "held_at_close": 7_000}
    debit_lines = [(r["kind"], r["model"], int(r["amount_micros"]), r["amount_usd"])
                   for r in rows if r["section"] == "debit"]
    assert debit_lines == [("charge", "flux-pro", 90_000, "0.090000"), ("charge", "gpt-x", 1_234, "0.001234"),
                           ("adjustment", "", 50_000, "0.050000")]


@pytest.mark.parametrize(
    ("params", "status", "param"),
    [({"to": "2026-03-01T00:00:00Z"}, 400, "from"),
     ({"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}, 400, "to"),
     ({"from": "2026-03-01", "to": "2026-04-01", "format": "xml"}, 400, "format")],
    ids=["missing-from", "backwards", "format"],
)
async def test_statement_refuses_bad_periods(
    client: TestClient, pool: asyncpg.Pool, params: dict, status: int, param: str
) -> None:
    account = await make_account(pool)
    resp = await client.get(f"/admin/accounts/{account}/statement", params=params, headers=admin_headers())
    assert resp.status == status
    assert (await resp.json())["error"]["param"] == param


async def test_statement_of_an_unknown_account_is_404(client: TestClient) -> None:
    resp = await client.get("/admin/accounts/acct_nope/statement", headers=admin_headers(),
                            params={"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"})
    assert resp.status == 404
