"""The console's finance pages in a real browser (Playwright driving Debian's Chromium; tests/console_support.py):
an admin opens an account's statement from its page, downloads its CSV and ties it out, then reads the margin and
the flags on the finance page and downloads the period's ledger."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from billing import ledger
from tests.conftest import ADMIN_TOKEN
from tests.console_support import money, screenshot, sign_in
from tests.factories import billed_request, make_account


async def downloaded(page: Any, selector: str) -> tuple[str, str]:
    """Click the download link `selector`; returns (the file's suggested name, its text)."""
    async with page.expect_download() as info:
        await page.click(selector)
    download = await info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text, encoding="utf-8")
    return download.suggested_filename, text


async def test_an_admin_downloads_an_accounts_statement_that_ties_out_and_reads_the_finance_page(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=5_000_000, name="Initech")
    await ledger.post(pool, account_id=account, kind="topup", amount_micros=2_500_000, description="second funds")
    for cost in (1_234, 56_789):
        await billed_request(pool, account, hold_micros=100_000, cost_micros=cost,
                             record={"model": "gpt-x", "upstream_cost_micros": cost // 2})
    await ledger.post(pool, account_id=account, kind="adjustment", amount_micros=-100_000, description="credit note")
    overrun = await billed_request(pool, account, hold_micros=1_000, cost_micros=1_500, record={"model": "gpt-x"})
    expected_closing = 5_000_000 + 2_500_000 - 1_234 - 56_789 - 100_000 - 1_500

    await sign_in(page, console_base, ADMIN_TOKEN)
    await page.goto(f"{console_base}/console/accounts/{account}")
    await page.click("#statement-link")
    await page.wait_for_url(f"{console_base}/console/accounts/{account}/statement")
    assert money(await page.inner_text("#closing")) == expected_closing == await pool.fetchval(
        "SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account)
    assert "Ties out" in await page.inner_text("#tie-out")
    assert await page.locator("#lines tbody tr").count() == 6

    name, text = await downloaded(page, "#statement-csv")
    month = datetime.now(UTC).date().replace(day=1)
    assert name.startswith(f"statement-{account}-{month}-") and name.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    figure = {r["section"]: int(r["amount_micros"]) for r in rows if r["section"] != "line"}
    lines = [int(r["amount_micros"]) for r in rows if r["section"] == "line"]
    assert figure["opening_balance"] + figure["credits_total"] - figure["debits_total"] \
        == figure["closing_balance"] == expected_closing
    assert figure["opening_balance"] + sum(lines) == expected_closing and len(lines) == 6
    assert [int(r["balance_after_micros"]) for r in rows if r["section"] == "line"][-1] == expected_closing
    await screenshot(page, "statement")

    await page.click("header nav >> text=Finance")
    await page.wait_for_url(f"{console_base}/console/finance")
    assert await page.locator("#margin tbody tr").count() == 1
    cells = await page.locator("#margin-totals th").all_inner_texts()
    assert [money(c) for c in cells[3:]] == [1_234 + 56_789 + 1_500, 617 + 28_394, 1_234 + 56_789 + 1_500 - 29_011]
    assert await page.inner_text("#flag-count-overrun td.num") == "1"
    assert await page.locator(f'#flags a[href="/console/requests/{overrun}"]').count() == 1
    await screenshot(page, "finance")

    name, text = await downloaded(page, "#export-ledger")
    assert name.startswith(f"ledger-{month}-")
    exported = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["amount_micros"]) for r in exported) == expected_closing and len(exported) == 6
