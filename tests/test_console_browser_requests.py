"""The request log in a real browser (Playwright driving Debian's Chromium; tests/console_support.py): an admin
filters it by URL and by its form, sees exactly the matching rows, and opens one request's record."""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.conftest import ADMIN_TOKEN
from tests.console_support import money, screenshot, sign_in
from tests.factories import billed_request, make_account


async def test_an_admin_filters_the_request_log_by_url_and_opens_a_record(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    accounts = [await make_account(pool, balance_micros=10_000_000, name=f"Tenant {a}") for a in range(3)]
    # Two requests of each account for each model, their costs telling them all apart.
    made = {(a, model): [await billed_request(pool, accounts[a], hold_micros=5_000,
                                              cost_micros=1_000 * (a + 1) + 100 * m + n, record={"model": model})
                         for n in range(2)]
            for a in range(3) for m, model in enumerate(("gpt-a", "gpt-b"))}
    await sign_in(page, console_base, ADMIN_TOKEN)

    await page.goto(f"{console_base}/console/requests?account={accounts[1]}&model=gpt-b")
    shown = [await row.get_attribute("id") for row in await page.locator("#requests tbody tr").all()]
    expected = made[1, "gpt-b"]
    assert sorted(shown) == sorted(f"request-{rid}" for rid in expected)
    assert await page.inner_text("#total-count") == "2"
    assert money(await page.inner_text("#total-cost")) == 2_100 + 2_101
    assert await page.input_value("input[name=account]") == accounts[1]  # the form shows the filter it applied
    await screenshot(page, "requests")

    # The form narrows further, keeping what the URL set.
    await page.select_option("select[name=modality]", "text")
    await page.fill("input[name=model]", "gpt-a")
    await page.click("#request-filters button[type=submit]")
    await page.wait_for_url("**/console/requests?*model=gpt-a*")
    shown = [await row.get_attribute("id") for row in await page.locator("#requests tbody tr").all()]
    assert sorted(shown) == sorted(f"request-{rid}" for rid in made[1, "gpt-a"])
    assert money(await page.inner_text("#total-cost")) == 2_000 + 2_001

    await page.click(f"#request-{made[1, 'gpt-a'][0]} a[href^='/console/requests/']")
    await page.wait_for_url(f"{console_base}/console/requests/{made[1, 'gpt-a'][0]}")
    assert money(await page.inner_text("#record-cost")) == 2_000
    assert "settled" in await page.inner_text("#hold")
    await screenshot(page, "request")
    await page.click("#account-link")
    await page.wait_for_url(f"{console_base}/console/accounts/{accounts[1]}")
