"""The console's pages over HTTP: every page renders with no rows, one and many; no query value makes one answer
500; sign-in attempts are limited; no secret appears where it must not."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.factories import billed_request, make_account, make_customer, make_key


async def signed_in(client: TestClient, secret: str = ADMIN_TOKEN) -> str:
    """Sign `client` in; returns the session's CSRF token (read from a page, as a browser would)."""
    page = await client.get("/console/login")
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', await page.text())
    assert login_csrf is not None
    resp = await client.post("/console/login", data={"login_csrf": login_csrf[1], "token": secret},
                             allow_redirects=False)
    assert resp.status == 303, await resp.text()
    home = await client.get(resp.headers["Location"])
    csrf = re.search(r'name="csrf" value="([^"]+)"', await home.text())
    assert csrf is not None
    return csrf[1]


def rows(html: str, table: str) -> int:
    """How many body rows the table with this id has."""
    match = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', html, re.S)
    return 0 if match is None else match[1].count("<tr")


async def test_every_admin_page_renders_with_no_rows_one_row_and_many(client: TestClient,
                                                                     pool: asyncpg.Pool) -> None:
    await signed_in(client)
    empty = await client.get("/console/accounts")
    assert empty.status == 200 and "No accounts yet." in await empty.text()
    overview = await client.get("/console")
    assert overview.status == 200 and "No account is overdrawn or running low." in await overview.text()

    account_id = await make_account(pool, balance_micros=500_000, name="Solo")
    await make_key(pool, account_id)
    await billed_request(pool, account_id, cost_micros=700)
    one = await (await client.get(f"/console/accounts/{account_id}")).text()
    assert (one.count('<tr id="key-'), rows(one, "ledger")) == (1, 2)
    assert "$0.499300" in one  # 0.5 USD less 700 micros, to the micro
    listed = await (await client.get("/console/accounts")).text()
    assert rows(listed, "accounts") == 1
    assert "Solo" in await (await client.get("/console")).text()  # below $1 available: running low

    many = [await make_account(pool, balance_micros=2_000_000, name=f"Many {i:02}") for i in range(30)]
    for _ in range(60):
        await billed_request(pool, many[0], cost_micros=1)
    first = await (await client.get("/console/accounts")).text()
    assert rows(first, "accounts") == 25 and "Next page" in first
    after = re.search(r'after=([^"&]+)', first)
    assert after is not None
    second = await (await client.get(f"/console/accounts?after={after[1]}")).text()
    assert rows(second, "accounts") == 6 and "Next page" not in second
    busy = await (await client.get(f"/console/accounts/{many[0]}")).text()
    assert rows(busy, "ledger") == 50 and "Older entries" in busy
    searched = await (await client.get("/console/accounts?q=many%2007")).text()
    assert rows(searched, "accounts") == 1 and "Many 07" in searched


async def test_the_customer_page_renders_with_no_requests_and_with_many(client: TestClient,
                                                                       pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, balance_micros=1_000_000)
    await signed_in(client, secret)
    page = await (await client.get("/console/me")).text()
    assert "No requests yet." in page and "$1.000000" in page
    for _ in range(60):
        await billed_request(pool, account_id, cost_micros=3)
    page = await (await client.get("/console/me")).text()
    assert page.count("<code>req_") == 50 and "$0.999820" in page


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(max_size=40), field=st.sampled_from(["q", "after", "before", "posted", "replayed", "from", "to",
                                                           "metric", "group_by", "account", "format"]))
async def test_no_console_page_answers_500_whatever_its_query(client: TestClient, pool: asyncpg.Pool,
                                                              value: str, field: str) -> None:
    if not client.session.cookie_jar.filter_cookies(client.make_url("/console")).get("meterline_console"):
        await signed_in(client)
    for path in ("/console", "/console/accounts", "/console/accounts/acct_nope", "/console/usage", "/console/nope"):
        resp = await client.get(path, params={field: value})
        assert resp.status in (200, 400, 404), (path, field, value, resp.status)
        assert "Traceback" not in await resp.text()


async def test_failed_sign_ins_are_limited_and_a_success_clears_the_count(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool) -> None:
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(update={"console_signin_limit": 3})))

    async def attempt(secret: str) -> int:
        page = await client.get("/console/login")
        match = re.search(r'name="login_csrf" value="([^"]+)"', await page.text())
        assert match is not None
        resp = await client.post("/console/login", data={"login_csrf": match[1], "token": secret},
                                 allow_redirects=False)
        return resp.status

    assert [await attempt("wrong") for _ in range(2)] == [401, 401]
    assert await attempt(ADMIN_TOKEN) == 303  # clears the count
    assert [await attempt("wrong") for _ in range(3)] == [401, 401, 401]
    assert await attempt(ADMIN_TOKEN) == 429  # the right token too, until the window turns


async def test_no_secret_reaches_a_page_and_a_forged_session_is_nothing(client: TestClient,
                                                                        pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool)
    csrf = await signed_in(client)
    pages = [await (await client.get(path)).text()
             for path in ("/console", "/console/accounts", f"/console/accounts/{account_id}")]
    assert not any(ADMIN_TOKEN in page or secret in page for page in pages)
    created = await client.post(f"/console/accounts/{account_id}/keys", data={"csrf": csrf, "name": "new"})
    shown = re.search(r'id="new-key-secret">([^<]+)<', await created.text())
    assert created.status == 201 and shown is not None and shown[1].startswith("ml-")
    again = await (await client.get(f"/console/accounts/{account_id}")).text()
    assert shown[1] not in again
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"meterline_console": "forged"})
    assert (await client.get("/console", allow_redirects=False)).headers["Location"] == "/console/login"


@pytest.mark.parametrize("path", ["/console/static/htmx-2.0.11.min.js", "/console/static/uPlot-1.6.32.iife.min.js",
                                  "/console/static/htmx-LICENSE.txt", "/console/static/uPlot-LICENSE.txt"])
async def test_the_vendored_scripts_are_served_with_their_licences(client: TestClient, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200 and len(await resp.read()) > 500


async def test_the_usage_explorer_renders_with_no_usage_one_group_and_many_and_refuses_bad_choices(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    empty = await (await client.get("/console/usage")).text()
    assert "No usage in this period." in empty
    account_id = await make_account(pool, balance_micros=1_000_000)
    await billed_request(pool, account_id, cost_micros=1_500, record={"model": "only/one"})
    one = await (await client.get("/console/usage?metric=cost&group_by=model")).text()
    assert rows(one, "usage") == 1 and "$0.001500" in one
    for i in range(9):
        await billed_request(pool, account_id, cost_micros=10 + i, record={"model": f"many/{i}"})
    many = await (await client.get("/console/usage?metric=requests&group_by=model")).text()
    assert rows(many, "usage") == 10
    series = re.search(r'<script type="application/json" id="usage-data">(.*?)</script>', many, re.S)
    assert series is not None and [s["label"] for s in json.loads(series[1])["series"]][-1] == "other"
    by_account = await (await client.get(f"/console/usage?metric=cost&group_by=account&account={account_id}")).text()
    assert f'href="/console/accounts/{account_id}"' in by_account and "$0.001626" in by_account
    for query, param in (("metric=bogus", "metric"), ("group_by=bogus", "group_by"), ("from=2026-13-01", "from"),
                         ("from=2026-03-02&to=2026-03-01", "to"), ("from=1990-01-01&to=2026-01-01", "from")):
        resp = await client.get(f"/console/usage?{query}")
        assert resp.status == 400 and param in await resp.text(), query


async def test_an_admin_edits_a_keys_limits_and_a_blank_limit_clears_it(client: TestClient,
                                                                       pool: asyncpg.Pool) -> None:
    account_id = await make_account(pool)
    await make_key(pool, account_id)
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)
    csrf = await signed_in(client)
    form = {"csrf": csrf, "limit_usd": "2.50", "limit_reset": "weekly", "rpm_limit": "60", "rpd_limit": "",
            "detailed_logging": "on"}
    resp = await client.post(f"/console/keys/{key_id}/settings", data=form, allow_redirects=False)
    assert resp.status == 303
    row = await pool.fetchrow("SELECT limit_micros, limit_reset, rpm_limit, rpd_limit, detailed_logging"
                              " FROM api_keys WHERE id = $1", key_id)
    assert tuple(row) == (2_500_000, "weekly", 60, None, True)
    page = await (await client.get(resp.headers["Location"])).text()
    assert "Saved the key" in page and 'value="2.500000"' in page
    cleared = {"csrf": csrf, "limit_usd": "", "limit_reset": "", "rpm_limit": "", "rpd_limit": ""}
    await client.post(f"/console/keys/{key_id}/settings", data=cleared, allow_redirects=False)
    row = await pool.fetchrow("SELECT limit_micros, limit_reset, rpm_limit, rpd_limit, detailed_logging"
                              " FROM api_keys WHERE id = $1", key_id)
    assert tuple(row) == (None, None, None, None, False)
    for bad, field in (({"rpm_limit": "5000"}, "rpm_limit"), ({"limit_usd": "1.0000001"}, "amount"),
                       ({"limit_reset": "hourly"}, "limit_reset")):
        resp = await client.post(f"/console/keys/{key_id}/settings", data={"csrf": csrf, **bad})
        assert resp.status == 400 and field in await resp.text()


async def _conversation(pool: asyncpg.Pool, account_id: str, key_id: str, text: str) -> str:
    """A stored conversation with one exchange, learned as a memory, as meterline_converse stores one."""
    conversation = str(uuid.uuid4())
    turns = [{"role": "user", "message": {"role": "user", "content": text}, "tokens": 9},
             {"role": "assistant", "message": {"role": "assistant", "content": "noted"}, "tokens": 4}]
    memory = {"id": str(uuid.uuid4()), "content": f"User: {text}\nAssistant: noted", "tokens": 12}
    await pool.execute("SELECT meterline_converse($1::uuid, $2, $3, true, 'm', $4, $5, $6, 'english')",
                       conversation, account_id, key_id, f"req_{conversation[:8]}", turns, memory)
    return conversation


async def test_a_customer_reads_and_deletes_only_its_own_keys_conversations_and_memories(
        client: TestClient, pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, detailed_logging=True)
    await make_key(pool, account_id, detailed_logging=True)  # a sibling key of the same account
    mine_key, theirs_key = [r["id"] for r in await pool.fetch(
        "SELECT id FROM api_keys WHERE account_id = $1 ORDER BY created_at", account_id)]
    mine = await _conversation(pool, account_id, mine_key, "my cat is Pepper")
    theirs = await _conversation(pool, account_id, theirs_key, "the sibling key's secret plan")
    csrf = await signed_in(client, secret)
    listing = await (await client.get("/console/me/conversations")).text()
    assert rows(listing, "conversations") == 1 and mine in listing and theirs not in listing
    assert rows(listing, "memories") == 1 and "Pepper" in listing and "secret plan" not in listing
    shown = await (await client.get(f"/console/me/conversations/{mine}")).text()
    assert "my cat is Pepper" in shown and "noted" in shown
    assert (await client.get(f"/console/me/conversations/{theirs}")).status == 404
    assert (await client.post(f"/console/me/conversations/{theirs}/delete", data={"csrf": csrf})).status == 404
    memory_id = await pool.fetchval("SELECT id FROM memories WHERE conversation_id = $1::uuid", mine)
    resp = await client.post(f"/console/me/conversations/memories/{memory_id}/delete", data={"csrf": csrf},
                             allow_redirects=False)
    assert resp.status == 303 and await pool.fetchval("SELECT count(*) FROM memories WHERE id = $1", memory_id) == 0
    resp = await client.post(f"/console/me/conversations/{mine}/delete", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert await pool.fetchval("SELECT count(*) FROM conversations WHERE id = $1::uuid", mine) == 0
    await _conversation(pool, account_id, mine_key, "another")
    await client.post("/console/me/conversations/memories/delete", data={"csrf": csrf})
    assert await pool.fetchval("SELECT count(*) FROM memories WHERE key_id = $1", mine_key) == 0
    assert await pool.fetchval("SELECT count(*) FROM memories WHERE key_id = $1", theirs_key) == 1


async def test_an_admin_reads_and_deletes_any_keys_conversations_narrowed_by_account_and_key(
        client: TestClient, pool: asyncpg.Pool) -> None:
    first, _ = await make_customer(pool, detailed_logging=True)
    second, _ = await make_customer(pool, detailed_logging=True)
    first_key = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", first)
    second_key = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", second)
    one = await _conversation(pool, first, first_key, "first account's words")
    two = await _conversation(pool, second, second_key, "second account's words")
    csrf = await signed_in(client)
    everything = await (await client.get("/console/conversations")).text()
    assert rows(everything, "conversations") == 2 and "Delete every memory" not in everything
    narrowed = await (await client.get(f"/console/conversations?account={first}&key={first_key}")).text()
    assert rows(narrowed, "conversations") == 1 and one in narrowed and two not in narrowed
    assert "Delete every memory" in narrowed
    shown = await (await client.get(f"/console/conversations/{two}")).text()
    assert "second account&#39;s words" in shown
    query = f"?account={first}&key={first_key}"
    assert (await client.get(f"/console/conversations/{two}{query}")).status == 404  # outside the filter
    resp = await client.post(f"/console/conversations/memories/delete{query}", data={"csrf": csrf},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == f"/console/conversations{query}&deleted=memories"
    assert [r["key_id"] for r in await pool.fetch("SELECT key_id FROM memories")] == [second_key]
    resp = await client.post(f"/console/conversations/{two}/delete", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 303
    assert [str(r["id"]) for r in await pool.fetch("SELECT id FROM conversations")] == [one]
    assert (await client.post("/console/conversations/memories/delete", data={"csrf": csrf})).status == 400


async def test_the_grant_form_refuses_bad_input_naming_the_field_and_grants_nothing(client: TestClient,
                                                                                    pool: asyncpg.Pool) -> None:
    account_id = await make_account(pool)
    csrf = await signed_in(client)
    good = {"csrf": csrf, "amount_usd": "5", "category": "promotional", "priority": "10",
            "expires_at": "2100-01-01T00:00", "description": ""}
    for bad, field in (({"expires_at": "2001-01-01T00:00"}, "expires_at"), ({"expires_at": "soon"}, "expires_at"),
                       ({"category": "gift"}, "category"), ({"priority": "101"}, "priority"),
                       ({"amount_usd": "-1"}, "amount_usd"), ({"amount_usd": "five"}, "amount"),
                       ({"effective_at": "2200-01-01T00:00"}, "expires_at")):
        resp = await client.post(f"/console/accounts/{account_id}/grants",
                                 data={**good, **bad, "idempotency_key": str(uuid.uuid4())})
        assert resp.status == 400 and field in await resp.text(), (bad, resp.status)
    assert await pool.fetchval("SELECT count(*) FROM credit_grants") == 0
    resp = await client.post(f"/console/accounts/{account_id}/grants", data={**good, "idempotency_key": "g-1"},
                             allow_redirects=False)
    assert resp.status == 303
    page = await (await client.get(resp.headers["Location"])).text()
    assert rows(page, "grants") == 1 and "2100-01-01 00:00:00 UTC" in page
