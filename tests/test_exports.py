"""Ledger and request exports: every row once, sums equal to the ledger, exact micros back out of CSV/JSONL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import exports, ledger
from tests.conftest import ROOT, admin_headers
from tests.factories import billed_request, make_account


async def _history(pool: asyncpg.Pool) -> tuple[str, str, datetime, datetime]:
    start = await pool.fetchval("SELECT clock_timestamp()")
    a = await make_account(pool, balance_micros=5_000_000, name="a")
    b = await make_account(pool, balance_micros=1_000_000, name="b")
    # Enough transfers for several cursor batches, in one statement.
    await pool.execute("SELECT meterline_post($1, 'topup', 3, 'bulk') FROM generate_series(1, 2500)", a)
    await ledger.post(pool, account_id=b, kind="adjustment", amount_micros=-123_457, description="refund, \"fix\"")
    for i in range(5):
        await billed_request(pool, a, hold_micros=50_000, cost_micros=10_001 * i, record={"model": "m,1"})
    await billed_request(pool, b, cost_micros=None)
    await billed_request(pool, b, hold_micros=2_000, cost_micros=3_000, record={"upstream_cost_micros": 2_500})
    end = await pool.fetchval("SELECT clock_timestamp()")
    return a, b, start, end


def _period(start: datetime, end: datetime, **extra: str) -> dict[str, str]:
    return {"from": start.isoformat(), "to": end.isoformat(), **extra}


async def test_ledger_csv_has_every_row_once_and_sums_to_the_balances(client: TestClient, pool: asyncpg.Pool) -> None:
    a, b, start, end = await _history(pool)
    resp = await client.get("/admin/exports/ledger", params=_period(start, end), headers=admin_headers())
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    reader = csv.DictReader(io.StringIO(await resp.text()))
    assert reader.fieldnames == list(exports.LEDGER_COLUMNS)
    rows = list(reader)
    assert len(rows) == await pool.fetchval("SELECT count(*) FROM transfers") == 2 + 2500 + 1 + 5 + 1
    assert len({r["transfer_id"] for r in rows}) == len(rows)
    for account in (a, b):
        exported = sum(int(r["amount_micros"]) for r in rows if r["account_id"] == account)
        balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account)
        assert exported == balance
    for r in rows:
        assert Decimal(r["amount_usd"]) * 1_000_000 == int(r["amount_micros"])
        assert r["created_at"].endswith("Z")
    refund = next(r for r in rows if r["kind"] == "adjustment")
    assert (refund["amount_micros"], refund["amount_usd"], refund["description"]) == (
        "-123457", "-0.123457", 'refund, "fix"')
    assert (refund["debit_account_id"], refund["credit_account_id"]) == (b, "op_adjustments")


async def test_ledger_jsonl_carries_integers_and_exact_strings(client: TestClient, pool: asyncpg.Pool) -> None:
    a, _, start, end = await _history(pool)
    resp = await client.get("/admin/exports/ledger", params=_period(start, end, format="jsonl", account=a),
                            headers=admin_headers())
    assert resp.status == 200
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert len(lines) == 1 + 2500 + 5
    assert {row["account_id"] for row in lines} == {a}
    assert all(isinstance(row["amount_micros"], int) and isinstance(row["amount_usd"], str) for row in lines)
    assert sum(row["amount_micros"] for row in lines) == 5_000_000 + 7_500 - 10_001 * 10
    charges = [row for row in lines if row["kind"] == "charge"]
    assert [row["amount_micros"] for row in charges] == [0, -10_001, -20_002, -30_003, -40_004]
    assert all(row["estimated"] is False and row["request_id"] for row in charges)


async def test_requests_export_matches_the_request_records(client: TestClient, pool: asyncpg.Pool) -> None:
    _, b, start, end = await _history(pool)
    resp = await client.get("/admin/exports/requests", params=_period(start, end), headers=admin_headers())
    assert resp.status == 200
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert len(rows) == 7
    assert sum(int(r["cost_micros"]) for r in rows) == await pool.fetchval(
        "SELECT sum(amount_micros) FROM transfers WHERE kind = 'charge'")
    upstream = [r for r in rows if r["upstream_cost_micros"]]
    assert [(r["account_id"], r["upstream_cost_micros"], r["upstream_cost_usd"], r["cost_usd"]) for r in upstream] \
        == [(b, "2500", "0.002500", "0.003000")]
    assert [r["model"] for r in rows].count("m,1") == 5


async def test_the_period_is_half_open(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    first = await ledger.post(pool, account_id=account, kind="topup", amount_micros=1, description=None)
    second = await ledger.post(pool, account_id=account, kind="topup", amount_micros=2, description=None)
    resp = await client.get("/admin/exports/ledger", headers=admin_headers(),
                            params=_period(first.created_at, second.created_at, format="jsonl"))
    assert [json.loads(line)["amount_micros"] for line in (await resp.text()).splitlines()] == [1]


@pytest.mark.parametrize(
    ("path", "params", "status", "param"),
    [("/admin/exports/invoices", {}, 400, "kind"),
     ("/admin/exports/ledger", {"format": "xlsx"}, 400, "format"),
     ("/admin/exports/ledger", {"to": "2020-01-01T00:00:00Z"}, 400, "to"),
     ("/admin/exports/ledger", {"account": "acct_nope"}, 404, None)],
    ids=["kind", "format", "backwards", "unknown-account"],
)
async def test_bad_export_requests_are_refused_before_streaming(
    client: TestClient, path: str, params: dict, status: int, param: str | None
) -> None:
    query = {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z", **params}
    resp = await client.get(path, params=query, headers=admin_headers())
    assert resp.status == status
    assert (await resp.json())["error"]["param"] == param


async def test_exports_need_the_admin_token(client: TestClient) -> None:
    resp = await client.get("/admin/exports/ledger", params={"from": "2026-03-01", "to": "2026-04-01"})
    assert resp.status == 401


async def _cli(database_url: str, tmp_path: Path, *args: str) -> tuple[int, str]:
    config = tmp_path / "cli.toml"
    config.write_text("")
    env = {**os.environ, "METERLINE_DATABASE_URL": database_url, "METERLINE_CONFIG": str(config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert b"rows" not in err  # the progress counter is only drawn on a terminal
    return proc.returncode or 0, out.decode()


async def test_cli_export_writes_the_same_rows(pool: asyncpg.Pool, database_url: str, tmp_path: Path) -> None:
    a, _, start, end = await _history(pool)
    target = tmp_path / "ledger.csv"
    code, out = await _cli(database_url, tmp_path, "export", "ledger", "--from", start.isoformat(),
                           "--to", (end + timedelta(seconds=1)).isoformat(), "--format", "csv", "-o", str(target))
    assert code == 0
    assert json.loads(out)["rows"] == 2509
    rows = list(csv.DictReader(io.StringIO(target.read_text(), newline="")))
    assert len(rows) == 2509
    assert sum(int(r["amount_micros"]) for r in rows) == await pool.fetchval(
        "SELECT sum(credits_posted - debits_posted) FROM accounts WHERE kind = 'customer'")
    code, out = await _cli(database_url, tmp_path, "statement", "--account", a, "--from", start.isoformat(),
                           "--to", (end + timedelta(seconds=1)).isoformat())
    assert code == 0
    stmt = json.loads(out)
    assert (stmt["opening_balance_micros"], stmt["credits_micros"], stmt["debits_micros"],
            stmt["closing_balance_micros"]) == (0, 5_007_500, 100_010, 4_907_490)
