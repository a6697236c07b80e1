"""The admin console's request log, request record and video jobs over HTTP: each renders with no rows, one and
many and pages through every row once; URL filters narrow exactly and survive paging; the totals are the shown
costs' sum to the micro; a value that cannot be a filter is a 400 naming it, and no value at all answers 500."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.money import format_usd
from tests.console_support import money
from tests.factories import billed_request, make_account, make_customer, make_key, make_video
from tests.test_console_pages import rows, signed_in

REQUEST_FILTERS = ("from", "to", "account", "key", "model", "modality", "status", "estimated", "overrun", "cursor")
VIDEO_FILTERS = ("status", "account", "cursor")


@dataclass(frozen=True, slots=True)
class Listing:
    """One page of a console table: its rows' ids (in page order), their costs, the totals, the next page."""

    ids: list[str]
    costs: list[int]
    total_count: int | None
    total_cost: int | None
    next_href: str | None


def listing(page: str, table: str) -> Listing:
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', page, re.S)
    ids = re.findall(rf'<tr id="{table[:-1]}-([^"]+)"', body[1]) if body else []
    costs = [money(c) for c in re.findall(r'<td class="num cost">([^<]+)</td>', body[1])] if body else []
    count = re.search(r'id="total-count">([^<]+)<', page)
    cost = re.search(r'id="total-cost">([^<]+)<', page)
    following = re.search(r'<a href="([^"]+)" id="next-page">', page)
    return Listing(ids, costs, int(count[1].replace(",", "")) if count else None,
                   money(cost[1]) if cost else None, html.unescape(following[1]) if following else None)


async def walk(client: TestClient, path: str, table: str) -> list[Listing]:
    """Every page from `path` on, following "Next page" links as a reader would."""
    pages: list[Listing] = []
    href: str | None = path
    while href is not None:
        resp = await client.get(href)
        assert resp.status == 200, await resp.text()
        pages.append(listing(await resp.text(), table))
        href = pages[-1].next_href
        assert len(pages) < 50, "paging does not end"
    return pages


async def key_id(pool: asyncpg.Pool, account_id: str) -> str:
    await make_key(pool, account_id)
    return str(await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id))


async def newest_first(pool: asyncpg.Pool, table: str, account_id: str | None = None) -> list[str]:
    return [r["id"] for r in await pool.fetch(
        f"SELECT id FROM {table} WHERE $1::text IS NULL OR account_id = $1 ORDER BY created_at DESC, id DESC",
        account_id)]


async def test_the_request_log_renders_with_no_rows_one_row_and_many_visiting_every_record_once(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    empty = await (await client.get("/console/requests")).text()
    assert "No requests yet." in empty and listing(empty, "requests") == Listing([], [], 0, 0, None)

    solo = await make_account(pool, balance_micros=10_000_000, name="Solo")
    only = await billed_request(pool, solo, cost_micros=700)
    one = await (await client.get("/console/requests")).text()
    assert listing(one, "requests") == Listing([only], [700], 1, 700, None)
    assert rows(one, "requests") == 1  # the row ids the listing reads are every row there is
    assert f'href="/console/requests/{only}"' in one and f'href="/console/accounts/{solo}"' in one

    busy = await make_account(pool, balance_micros=10_000_000, name="Busy")
    for i in range(119):
        await billed_request(pool, busy if i % 3 else solo, cost_micros=1)
    pages = await walk(client, "/console/requests", "requests")
    assert [len(p.ids) for p in pages] == [50, 50, 20]
    seen = [rid for p in pages for rid in p.ids]
    assert seen == await newest_first(pool, "requests")  # newest first, each record once
    assert {(p.total_count, p.total_cost) for p in pages} == {(120, 700 + 119)}


async def test_the_next_page_keeps_the_filters(client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    mine, theirs = [await make_account(pool, balance_micros=1_000_000) for _ in range(2)]
    for i in range(130):
        await billed_request(pool, mine if i % 2 else theirs, cost_micros=2,
                             record={"model": "gpt-a" if i % 4 == 1 else "gpt-b"})
    pages = await walk(client, f"/console/requests?account={mine}&model=gpt-b&status=completed", "requests")
    assert [len(p.ids) for p in pages] == [32]  # 65 of mine, every other one gpt-b: one page, no link
    pages = await walk(client, f"/console/requests?account={mine}&status=completed", "requests")
    assert [len(p.ids) for p in pages] == [50, 15]
    assert pages[0].next_href is not None
    assert f"account={mine}" in pages[0].next_href and "status=completed" in pages[0].next_href
    assert [rid for p in pages for rid in p.ids] == await newest_first(pool, "requests", mine)


@dataclass(frozen=True, slots=True)
class Seeded:
    accounts: list[str]
    grid: dict[tuple[int, int], str]  # (account, model) -> the request of that account for that model
    image: str  # account 1, an image
    cancelled: str  # account 1, gpt-0, voided
    estimated: str  # account 2, gpt-0, charged from an estimate
    overrun: str  # account 0, gpt-2, charged above its hold
    keyed: str  # account 0, gpt-1, made with `key`
    key: str


async def seed(pool: asyncpg.Pool) -> Seeded:
    """Three accounts by three models, and one request each that stands out in one way."""
    accounts = [await make_account(pool, balance_micros=100_000_000, name=f"Grid {a}") for a in range(3)]
    grid = {(a, m): await billed_request(pool, accounts[a], cost_micros=100 * (a + 1) + m,
                                         record={"model": f"gpt-{m}"})
            for a in range(3) for m in range(3)}
    key = await key_id(pool, accounts[0])
    return Seeded(
        accounts, grid,
        image=await billed_request(pool, accounts[1], hold_micros=50_000, cost_micros=40_000,
                                   record={"model": "img-1", "modality": "image", "quantity": 2}),
        cancelled=await billed_request(pool, accounts[1], cost_micros=None, record={"model": "gpt-0"}),
        estimated=await billed_request(pool, accounts[2], cost_micros=900, estimated=True,
                                       record={"model": "gpt-0"}),
        overrun=await billed_request(pool, accounts[0], hold_micros=1_000, cost_micros=1_500,
                                     record={"model": "gpt-2"}),
        keyed=await billed_request(pool, accounts[0], key_id=key, cost_micros=5, record={"model": "gpt-1"}),
        key=key,
    )


FILTER_CASES: list[tuple[str, Any, Any]] = [
    ("account", lambda s: {"account": s.accounts[1]},
     lambda s: {s.grid[1, 0], s.grid[1, 1], s.grid[1, 2], s.image, s.cancelled}),
    ("model", lambda s: {"model": "gpt-2"}, lambda s: {s.grid[0, 2], s.grid[1, 2], s.grid[2, 2], s.overrun}),
    ("account and model", lambda s: {"account": s.accounts[2], "model": "gpt-1"}, lambda s: {s.grid[2, 1]}),
    ("account and model, two match", lambda s: {"account": s.accounts[1], "model": "gpt-0"},
     lambda s: {s.grid[1, 0], s.cancelled}),
    ("modality", lambda s: {"modality": "image"}, lambda s: {s.image}),
    ("status", lambda s: {"status": "cancelled"}, lambda s: {s.cancelled}),
    ("key", lambda s: {"key": s.key}, lambda s: {s.keyed}),
    ("estimated", lambda s: {"estimated": "1"}, lambda s: {s.estimated}),
    ("overrun", lambda s: {"overrun": "1"}, lambda s: {s.overrun}),
    ("not estimated, account 2", lambda s: {"estimated": "0", "account": s.accounts[2]},
     lambda s: {s.grid[2, 0], s.grid[2, 1], s.grid[2, 2]}),
    ("overrun of another account", lambda s: {"overrun": "1", "account": s.accounts[1]}, lambda s: set()),
    ("an unknown model", lambda s: {"model": "gpt-9"}, lambda s: set()),
]


@pytest.mark.parametrize(("query", "expected"), [case[1:] for case in FILTER_CASES],
                         ids=[case[0] for case in FILTER_CASES])
async def test_url_filters_narrow_the_log_to_exactly_the_matching_requests(
        client: TestClient, pool: asyncpg.Pool, query: Any, expected: Any) -> None:
    seeded = await seed(pool)
    await signed_in(client)
    resp = await client.get("/console/requests", params=query(seeded))
    page = await resp.text()
    assert resp.status == 200
    shown = listing(page, "requests")
    want = expected(seeded)
    assert set(shown.ids) == want and len(shown.ids) == len(want)
    costs = {r["id"]: r["cost_micros"] for r in await pool.fetch("SELECT id, cost_micros FROM requests")}
    assert (shown.total_count, shown.total_cost) == (len(want), sum(costs[rid] for rid in want))
    if not want:
        assert "No request matches these filters." in page


PERIOD_CASES = [
    ("dates are whole days", {"from": "2026-03-01", "to": "2026-03-31"}, {"first", "last"}),
    ("timestamps: from inclusive, to exclusive", {"from": "2026-03-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"},
     {"first", "last"}),
    ("a date as to includes that day", {"to": "2026-03-01"}, {"before", "first"}),
    ("an offset is converted to UTC", {"from": "2026-03-01T01:00:00+01:00"}, {"first", "last", "after"}),
    ("a timestamp without a zone is UTC", {"from": "2026-03-31T23:59:59.999999"}, {"last", "after"}),
    ("a microsecond past the first, up to the last", {"from": "2026-03-01T00:00:00.000001Z",
                                                     "to": "2026-03-31T23:59:59.999999Z"}, set()),
]


@pytest.mark.parametrize(("query", "expected"), [case[1:] for case in PERIOD_CASES],
                         ids=[case[0] for case in PERIOD_CASES])
async def test_the_period_filter_takes_dates_and_timestamps_in_utc(
        client: TestClient, pool: asyncpg.Pool, query: dict[str, str], expected: set[str]) -> None:
    account = await make_account(pool, balance_micros=1_000_000)
    at = {"before": datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=UTC),
          "first": datetime(2026, 3, 1, tzinfo=UTC),
          "last": datetime(2026, 3, 31, 23, 59, 59, 999_999, tzinfo=UTC),
          "after": datetime(2026, 4, 1, tzinfo=UTC)}
    named = {}
    for name, when in at.items():
        rid = await billed_request(pool, account, cost_micros=1)
        await pool.execute("UPDATE requests SET created_at = $2 WHERE id = $1", rid, when)
        named[rid] = name
    await signed_in(client)
    resp = await client.get("/console/requests", params=query)
    assert resp.status == 200
    assert {named[rid] for rid in listing(await resp.text(), "requests").ids} == expected


async def test_the_totals_are_the_sum_of_every_shown_cost_to_the_micro(client: TestClient,
                                                                      pool: asyncpg.Pool) -> None:
    accounts = [await make_account(pool, balance_micros=100_000_000) for _ in range(2)]
    charged: dict[str, int] = {}
    for i in range(140):
        # Costs that do not round: primes' multiples, some above their hold, some voided (a zero charge).
        cost = None if i % 13 == 0 else (i * 7_919) % 104_729 + 1
        rid = await billed_request(pool, accounts[i % 2], hold_micros=50_000, cost_micros=cost)
        charged[rid] = cost or 0
    await signed_in(client)
    for path, wanted in (("/console/requests", set(charged)),
                         (f"/console/requests?account={accounts[1]}", set(await newest_first(
                             pool, "requests", accounts[1]))),
                         ("/console/requests?overrun=1", {rid for rid, c in charged.items() if c > 50_000})):
        pages = await walk(client, path, "requests")
        shown = [rid for p in pages for rid in p.ids]
        assert len(shown) == len(set(shown)) and set(shown) == wanted
        exact = sum(charged[rid] for rid in wanted)
        assert sum(c for p in pages for c in p.costs) == exact
        assert {(p.total_count, p.total_cost) for p in pages} == {(len(wanted), exact)}
    assert 0 < len({rid for rid, c in charged.items() if c > 50_000}) < 140


async def test_a_request_page_shows_its_whole_record_its_hold_and_its_charge(client: TestClient,
                                                                            pool: asyncpg.Pool) -> None:
    account, secret = await make_customer(pool, balance_micros=5_000_000)
    key = str(await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account))
    record = {"model": "gpt-a", "upstream": "openrouter", "user": "end-user-7", "prompt_tokens": 1_234,
              "completion_tokens": 56, "cached_tokens": 7, "reasoning_tokens": 8, "duration_ms": 4_321,
              "upstream_cost_micros": 2_222, "usage": {"prompt_tokens": 1_234, "total_tokens": 1_290}}
    charged = await billed_request(pool, account, key_id=key, hold_micros=3_000, cost_micros=3_456,
                                   estimated=True, record=record)
    voided = await billed_request(pool, account, cost_micros=None,
                                  record={"error_code": "upstream_down", "user": "<script>x</script>"})
    await signed_in(client)

    page = await (await client.get(f"/console/requests/{charged}")).text()
    hold = await pool.fetchrow("SELECT created_at, expires_at FROM holds WHERE request_id = $1", charged)
    transfer = await pool.fetchrow("SELECT id, balance_after_micros FROM transfers WHERE request_id = $1", charged)
    for shown in (f'<a href="/console/accounts/{account}" id="account-link">', f"<code>{key}</code>",
                  "<dd>gpt-a</dd>", "<dd>text</dd>", "<code>/v1/chat/completions</code>", "<dd>openrouter</dd>",
                  "<dd>end-user-7</dd>", "<dd>completed</dd>",
                  "1,234", "<dd>56</dd>", "<dd>7</dd>", "<dd>8</dd>", "4,321 ms", '<dd id="record-cost">$0.003456</dd>',
                  "<dd>$0.002222</dd>", "<dt>Estimated</dt><dd>yes</dd>", '"total_tokens": 1290',
                  f"<dd>#{transfer['id']} (charge)</dd>", f"<dd>${format_usd(transfer['balance_after_micros'])}</dd>",
                  "<dt>Amount</dt><dd>$0.003000</dd>", "<dd>settled</dd>", "<dt>Overrun</dt><dd>$0.000456</dd>",
                  f"<dd>{hold['expires_at'].strftime('%Y-%m-%d %H:%M:%S UTC')}</dd>",
                  f"<dd>{hold['created_at'].strftime('%Y-%m-%d %H:%M:%S UTC')}</dd>"):
        assert shown in page, shown
    prefix = await pool.fetchval("SELECT prefix FROM api_keys WHERE id = $1", key)
    assert secret not in page and f"<code>{prefix}…</code>" in page  # the key's prefix, never the key

    page = await (await client.get(f"/console/requests/{voided}")).text()
    for shown in ("<dd>cancelled</dd>", "<dd>voided</dd>", "<dd>upstream_down</dd>",
                  "<dd>&lt;script&gt;x&lt;/script&gt;</dd>", "<dt>Error message</dt><dd>test void</dd>",
                  "<dt>Reason</dt><dd>test void</dd>",
                  "No charge was posted", '<dd id="record-cost">$0.000000</dd>'):
        assert shown in page, shown
    assert "<script>x" not in page

    # Percent-encoded: a snowman, a lone surrogate and a byte that is no UTF-8 at all, and an injection attempt.
    for unknown in ("req_nope", "x" * 3_000, "%E2%98%83", "%ED%A0%80", "%FF", "req_%27%20OR%201=1"):
        resp = await client.get(f"/console/requests/{unknown}")
        assert resp.status == 404 and "There is no request with that id" in await resp.text(), unknown


async def test_the_video_jobs_render_with_no_rows_one_row_and_many_filtered_by_status_and_account(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    assert "No video jobs yet." in await (await client.get("/console/videos")).text()

    first = await make_account(pool, balance_micros=500_000_000)
    done = await make_video(pool, first, price_micros=1_600_000, seconds=16, status="completed")
    page = await (await client.get("/console/videos")).text()
    assert listing(page, "videos").ids == [done] and rows(page, "videos") == 1
    job = await pool.fetchrow("SELECT request_id FROM videos WHERE id = $1", done)
    for shown in ("completed", f'href="/console/accounts/{first}"', "test-video", "1280x720", '<td class="num">16</td>',
                  '<td class="num">$1.600000</td><td class="num">$1.600000</td>',
                  f'<a href="/console/requests/{job["request_id"]}">'):
        assert shown in page, shown
    assert "Next page" not in page

    second = await make_account(pool, balance_micros=500_000_000)
    made: dict[str, tuple[str, str]] = {done: (first, "completed")}
    statuses = ("queued", "in_progress", "completed", "failed")
    for i in range(63):
        account, status = (first, second)[i % 2], statuses[i % 4]
        made[await make_video(pool, account, price_micros=100_000 + i, status=status)] = (account, status)
    pages = await walk(client, "/console/videos", "videos")
    assert [len(p.ids) for p in pages] == [50, 14]
    assert [vid for p in pages for vid in p.ids] == await newest_first(pool, "videos")

    for query, want in (({"status": "failed"}, {v for v, (_, s) in made.items() if s == "failed"}),
                        ({"account": second}, {v for v, (a, _) in made.items() if a == second}),
                        ({"account": first, "status": "completed"},
                         {v for v, (a, s) in made.items() if (a, s) == (first, "completed")}),
                        ({"account": second, "status": "queued"}, set())):
        path = "/console/videos?" + "&".join(f"{k}={v}" for k, v in query.items())
        pages = await walk(client, path, "videos")
        shown = [vid for p in pages for vid in p.ids]
        assert len(shown) == len(want) and set(shown) == want, query
    failed = await (await client.get("/console/videos?status=failed")).text()
    assert failed.count('<span class="flag">upstream_failed</span>') == len(
        [v for v, (_, s) in made.items() if s == "failed"])
    running = await (await client.get("/console/videos?status=in_progress")).text()
    assert "in_progress 40%" in running and 'href="/console/requests/' not in running  # no record yet


async def test_the_next_video_page_keeps_the_filters(client: TestClient, pool: asyncpg.Pool) -> None:
    account, other = [await make_account(pool, balance_micros=500_000_000) for _ in range(2)]
    for i in range(120):
        await make_video(pool, other if i % 3 == 0 else account, price_micros=1_000,
                         status="completed" if i % 2 else "queued")
    await signed_in(client)
    pages = await walk(client, f"/console/videos?status=completed&account={account}", "videos")
    assert [len(p.ids) for p in pages] == [40]
    pages = await walk(client, f"/console/videos?account={account}", "videos")
    assert [len(p.ids) for p in pages] == [50, 30]
    assert pages[0].next_href is not None and f"account={account}" in pages[0].next_href
    assert [vid for p in pages for vid in p.ids] == await newest_first(pool, "videos", account)


BAD_QUERIES = [
    ("/console/requests", "from", "2026-13-01"),
    ("/console/requests", "from", "yesterday"),
    ("/console/requests", "to", "2026-02-30"),
    ("/console/requests", "to", "9999-12-31"),  # its end is past the last representable day
    ("/console/requests", "from", "0001-01-01T00:00:00+01:00"),  # before year 1 in UTC
    ("/console/requests", "account", "a" * 201),
    ("/console/requests", "key", "k" * 201),
    ("/console/requests", "model", "m" * 201),
    ("/console/requests", "status", "s" * 201),
    ("/console/requests", "modality", "audio"),
    ("/console/requests", "estimated", "yes"),
    ("/console/requests", "overrun", "2"),
    ("/console/requests", "cursor", "not-a-cursor"),
    ("/console/requests", "cursor", "MjAyNi0wMy0wMVQwMDowMDowMCswMDowMHw"),  # a timestamp and an empty id
    ("/console/requests", "cursor", "c" * 401),
    ("/console/videos", "status", "done"),
    ("/console/videos", "account", "a" * 201),
    ("/console/videos", "cursor", "@@@"),
]


@pytest.mark.parametrize(("path", "name", "value"), BAD_QUERIES,
                         ids=[f"{p.rsplit('/', 1)[1]}-{n}-{v[:16]}" for p, n, v in BAD_QUERIES])
async def test_a_value_that_cannot_be_a_filter_is_a_400_page_naming_it(
        client: TestClient, pool: asyncpg.Pool, path: str, name: str, value: str) -> None:
    await signed_in(client)
    resp = await client.get(path, params={name: value})
    # The page names the parameter (`<code>name</code>: `) and the message says what is wrong with it.
    message = re.search(r'<p class="error" role="alert"><code>([^<]+)</code>: ([^<]+)</p>', await resp.text())
    assert message is not None and message[1] == name, message
    message = re.search(r'<p class="error" role="alert"><code>[^<]+</code>: ([^<]+)</p>', await resp.text())
    assert resp.status == 400 and message is not None and message[1].startswith(f"{name} "), message


async def test_a_period_that_ends_before_it_starts_is_a_400(client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    resp = await client.get("/console/requests", params={"from": "2026-03-02", "to": "2026-03-01T12:00:00Z"})
    assert resp.status == 400 and "to must be after from" in await resp.text()


async def test_customers_cannot_reach_the_request_log_a_record_or_the_videos(client: TestClient,
                                                                           pool: asyncpg.Pool) -> None:
    account, secret = await make_customer(pool, balance_micros=1_000_000)
    own = await billed_request(pool, account)
    await signed_in(client, secret)
    for path in ("/console/requests", f"/console/requests/{own}", f"/console/requests?account={account}",
                 "/console/videos"):
        resp = await client.get(path, allow_redirects=False)
        assert (resp.status, resp.headers.get("Location")) == (303, "/console/me"), path
    home = await (await client.get("/console/me")).text()
    assert 'href="/console/requests"' not in home and 'href="/console/videos"' not in home


async def test_the_admin_navigation_links_the_request_log_and_the_videos(client: TestClient,
                                                                        pool: asyncpg.Pool) -> None:
    await signed_in(client)
    page = await (await client.get("/console/requests")).text()
    assert '<a href="/console/requests" aria-current="page">Requests</a>' in page
    assert '<a href="/console/videos">Videos</a>' in page


_SOME_VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["2026-03-01", "2026-03-01T00:00:00Z", "9999-12-31", "0001-01-01", "1", "0", "image",
                     "completed", "+01:00", "2026-03-01T25:00", "%00", "../", "%E2%82%AC"]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(st.sampled_from(REQUEST_FILTERS), _SOME_VALUES, max_size=4),
       record_id=_SOME_VALUES)
async def test_no_filter_value_makes_a_page_answer_500(client: TestClient, pool: asyncpg.Pool,
                                                       query: dict[str, str], record_id: str) -> None:
    if not client.session.cookie_jar.filter_cookies(client.make_url("/console")).get("meterline_console"):
        await signed_in(client)
    videos = {k: v for k, v in query.items() if k in VIDEO_FILTERS}
    for path, params in (("/console/requests", query), ("/console/videos", videos)):
        resp = await client.get(path, params=params)
        assert resp.status in (200, 400), (path, params, resp.status)
        assert "Traceback" not in await resp.text()
    if record_id not in (".", ".."):  # dot segments: the URL would name another page, not a record
        resp = await client.get("/console/requests/" + quote(record_id, safe=""))
        assert resp.status in (400, 404), (record_id, resp.status)
