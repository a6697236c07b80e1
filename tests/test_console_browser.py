"""The console in a real browser (Playwright driving Debian's Chromium; tests/console_support.py): what an admin
does, what a customer sees, and what a browser without a session or a CSRF token cannot do."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from tests.conftest import ADMIN_TOKEN
from tests.console_support import money, screenshot, sign_in
from tests.factories import billed_request, make_customer


async def test_an_admin_creates_an_account_tops_it_up_once_on_a_double_submit_and_makes_and_revokes_a_key(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    await sign_in(page, console_base, ADMIN_TOKEN)
    assert page.url == f"{console_base}/console"
    await screenshot(page, "overview")
    await page.click("text=Accounts")
    await page.fill("input[name=name]", "Globex")
    await page.click("text=Create account")
    await page.wait_for_url(f"{console_base}/console/accounts/acct_*")
    account_id = page.url.rsplit("/", 1)[1]
    assert await pool.fetchval("SELECT name FROM accounts WHERE id = $1", account_id) == "Globex"

    # Top up, with the same rendered form submitted twice: one credit.
    form = page.locator("#topup-form")
    await form.locator("input[name=amount_usd]").fill("12.50")
    await form.locator("input[name=description]").fill("first funds")
    fields = {name: await form.locator(f"input[name={name}]").input_value()
              for name in ("csrf", "idempotency_key", "amount_usd", "description")}
    action = f"{console_base}/console/accounts/{account_id}/topups"
    twice = await asyncio.gather(*(page.request.post(action, form=fields, max_redirects=0) for _ in range(2)))
    assert [r.status for r in twice] == [303, 303]
    await form.locator("button").click()  # and once more from the page itself
    await page.wait_for_selector("p.notice")
    assert "already submitted" in await page.inner_text("p.notice")
    assert money(await page.inner_text("#balance")) == 12_500_000
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE account_id = $1", account_id) == 1
    assert await page.locator("#ledger tbody tr").count() == 1

    # A key: its secret shown once, on the answer to its creation only.
    await page.click("text=Create a key")
    await page.fill("#key-form input[name=name]", "backend")
    await page.fill("#key-form input[name=limit_usd]", "5")
    await page.select_option("#key-form select[name=limit_reset]", "monthly")
    await page.click("#key-form button")
    secret = (await page.inner_text("#new-key-secret")).strip()
    assert secret.startswith("ml-") and len(secret) == 46
    row = await pool.fetchrow("SELECT id, limit_micros, limit_reset FROM api_keys WHERE account_id = $1", account_id)
    assert (row["limit_micros"], row["limit_reset"]) == (5_000_000, "monthly")
    await screenshot(page, "account")
    await page.goto(f"{console_base}/console/accounts/{account_id}")
    assert secret not in await page.content()
    assert await page.locator("#new-key-secret").count() == 0

    await page.click(f"#key-{row['id']} button.danger")
    await page.wait_for_selector(f"#key-{row['id']}.revoked")
    assert await pool.fetchval("SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1", row["id"]) is True


async def test_a_customer_signs_in_with_its_key_and_sees_only_its_own_account(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    mine, secret = await make_customer(pool, balance_micros=3_000_000)
    theirs, _ = await make_customer(pool, balance_micros=9_000_000)
    own = await billed_request(pool, mine, cost_micros=1_234)
    other = await billed_request(pool, theirs, cost_micros=4_321)
    await sign_in(page, console_base, secret)
    assert page.url == f"{console_base}/console/me"
    assert money(await page.inner_text("#available")) == 3_000_000 - 1_234
    content = await page.content()
    assert own in content and other not in content and theirs not in content
    await screenshot(page, "customer")
    for path in ("/console", f"/console/accounts/{theirs}", "/console/accounts"):
        await page.goto(f"{console_base}{path}")
        assert page.url == f"{console_base}/console/me"
    refused = await page.request.post(f"{console_base}/console/accounts", form={"name": "x"}, max_redirects=0)
    assert refused.status == 403


async def test_a_post_without_its_csrf_token_is_refused_and_signing_out_ends_access(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    account_id, _ = await make_customer(pool)
    await sign_in(page, console_base, ADMIN_TOKEN)
    action = f"{console_base}/console/accounts/{account_id}/topups"
    form = {"idempotency_key": "k-1", "amount_usd": "1.00"}
    for csrf in (None, "forged"):
        refused = await page.request.post(action, form={**form, **({"csrf": csrf} if csrf else {})},
                                          max_redirects=0)
        assert refused.status == 403 and "CSRF" in await refused.text()
    assert await pool.fetchval("SELECT count(*) FROM transfers") == 0
    await page.click("text=Sign out")
    await page.wait_for_url(f"{console_base}/console/login")
    await page.goto(f"{console_base}/console/accounts/{account_id}")
    assert page.url == f"{console_base}/console/login"
    assert await pool.fetchval("SELECT count(*) FROM console_sessions") == 0


async def test_the_usage_chart_draws_the_days_and_the_table_and_csv_tie_out(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    account_id, _ = await make_customer(pool, balance_micros=5_000_000)
    costs = {"acme/small": [1_001, 2_002], "acme/large": [30_003]}
    for model, charges in costs.items():
        for charge in charges:
            await billed_request(pool, account_id, cost_micros=charge, hold_micros=50_000,
                                 record={"model": model, "prompt_tokens": 10, "completion_tokens": 5})
    await sign_in(page, console_base, ADMIN_TOKEN)
    await page.wait_for_selector("#money-chart[data-drawn=true]")
    assert money(await page.inner_text("#revenue")) == 33_006
    assert money(await page.inner_text("#topups")) == 5_000_000
    await screenshot(page, "overview")
    await page.goto(f"{console_base}/console/usage?metric=cost&group_by=model")
    chart = page.locator("#usage-chart")
    await page.wait_for_selector("#usage-chart[data-drawn=true]")
    assert await chart.get_attribute("data-points") == "30"  # the last 30 days, today included
    assert await chart.locator("canvas").count() == 1
    data = json.loads(await page.locator("#usage-data").text_content() or "")
    assert {s["label"]: s["values"][-1] for s in data["series"]} == {"acme/large": 30_003, "acme/small": 3_003}
    assert all(value == 0 for s in data["series"] for value in s["values"][:-1])
    assert money(await page.inner_text("#usage-total")) == 33_006
    await screenshot(page, "usage")
    async with page.expect_download() as info:
        await page.click("#usage-csv")
    download = await info.value
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == ["day", "model", "cost_micros"]
    assert sum(int(row[2]) for row in lines[1:]) == 33_006 and len(lines) == 3

    # The form swaps the page's content in place (htmx) and keeps its choices in the URL.
    await page.evaluate("window.stayed = true")
    await page.select_option("#usage-form select[name=metric]", "requests")
    await page.click("#usage-form button")
    await page.wait_for_url("**metric=requests**")
    await page.wait_for_selector("#usage-chart[data-drawn=true]")
    assert await page.evaluate("window.stayed") is True  # no new page was loaded
    assert await page.inner_text("#usage-total") == "3"


async def test_a_customer_deletes_a_memory_and_a_conversation_with_their_buttons(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, detailed_logging=True)
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)
    conversation = str(uuid.uuid4())
    turns = [{"role": "user", "message": {"role": "user", "content": "my dog is Biscuit"}, "tokens": 9},
             {"role": "assistant", "message": {"role": "assistant", "content": "noted"}, "tokens": 4}]
    memory = {"id": str(uuid.uuid4()), "content": "User: my dog is Biscuit\nAssistant: noted", "tokens": 12}
    await pool.execute("SELECT meterline_converse($1::uuid, $2, $3, true, 'm', 'req_b1', $4, $5, 'english')",
                       conversation, account_id, key_id, turns, memory)
    await sign_in(page, console_base, secret)
    await page.click("text=Conversations")
    await page.click(f"#memory-{memory['id']} button")
    await page.wait_for_selector("p.notice")
    assert await page.locator("#memories").count() == 0
    assert await pool.fetchval("SELECT count(*) FROM memories") == 0
    await page.click(f"#conversation-{conversation} button")
    await page.wait_for_selector("p.notice")
    assert await page.locator("#conversations").count() == 0
    assert await pool.fetchval("SELECT count(*) FROM conversation_turns") == 0


async def test_an_admin_grants_promotional_credit_once_and_the_customer_sees_it_with_its_expiry(
        page: Any, console_base: str, pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, balance_micros=2_000_000)
    await sign_in(page, console_base, ADMIN_TOKEN)
    await page.goto(f"{console_base}/console/accounts/{account_id}")
    await page.click("text=Grant credit")
    form = page.locator("#grant-form")
    await form.locator("input[name=amount_usd]").fill("5")
    await form.locator("select[name=category]").select_option("promotional")
    await form.locator("input[name=priority]").fill("10")
    await form.locator("input[name=expires_at]").fill("2100-01-31T12:00")
    await form.locator("input[name=description]").fill("welcome credit")
    # The same rendered form (its Idempotency-Key) submitted twice at once, then from the page: one grant.
    fields = {name: await form.locator(f"[name={name}]").input_value()
              for name in ("csrf", "idempotency_key", "amount_usd", "category", "priority", "expires_at",
                           "description")}
    action = f"{console_base}/console/accounts/{account_id}/grants"
    twice = await asyncio.gather(*(page.request.post(action, form=fields, max_redirects=0) for _ in range(2)))
    assert [r.status for r in twice] == [303, 303]
    await form.locator("button").click()
    await page.wait_for_selector("p.notice")
    assert "already submitted" in await page.inner_text("p.notice")
    assert await pool.fetchval("SELECT count(*) FROM credit_grants WHERE category = 'promotional'") == 1
    row = await pool.fetchrow("SELECT id, priority, expires_at, amount_micros FROM credit_grants"
                              " WHERE category = 'promotional'")
    assert (row["priority"], row["expires_at"].isoformat(), row["amount_micros"]) == (
        10, "2100-01-31T12:00:00+00:00", 5_000_000)
    assert money(await page.inner_text("#promotional")) == 5_000_000
    assert money(await page.inner_text("#paid")) == 2_000_000
    assert await page.inner_text(f"#grant-{row['id']} td:nth-child(4)") == "active"
    await screenshot(page, "grants")

    customer = await page.context.browser.new_context()
    try:
        mine = await customer.new_page()
        await sign_in(mine, console_base, secret)
        assert money(await mine.inner_text("#balance")) == 7_000_000
        assert money(await mine.inner_text("#promotional")) == 5_000_000
        assert "2100-01-31 12:00:00 UTC" in await mine.inner_text("#next-expiry")
    finally:
        await customer.close()
