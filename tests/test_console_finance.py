"""The console's finance pages over HTTP: a statement and its CSV tie out to the ledger to the micro (the CSV from
one snapshot, whatever is posted while it streams), the finance page's margin totals and flag counts are billing's
own, the exports stream exactly the period's rows, customers reach none of it, and no query value answers 500."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from contextlib import aclosing
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import ledger, reports, statements
from gateway.console.finance_pages import FLAGS_SHOWN, LINES_PAGE
from tests.conftest import admin_headers
from tests.console_support import money
from tests.factories import billed_request, make_account, make_customer, request_id
from tests.test_console_pages import rows, signed_in

SIGNED = "CASE WHEN credit_account_id = account_id THEN amount_micros ELSE -amount_micros END"


async def clock(pool: asyncpg.Pool) -> datetime:
    """A database time between two postings (each posting's created_at is its transaction's start)."""
    moment: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return moment


def period(start: datetime, end: datetime) -> dict[str, str]:
    return {"from": start.isoformat(), "to": end.isoformat()}


async def balance_at(pool: asyncpg.Pool, account: str, moment: datetime) -> int:
    """The account's balance just before `moment`, summed straight from `transfers`."""
    total: int = await pool.fetchval(
        f"SELECT COALESCE(sum({SIGNED}), 0)::bigint FROM transfers WHERE account_id = $1 AND created_at < $2",
        account, moment)
    return total


async def transfer_ids(pool: asyncpg.Pool, start: datetime, end: datetime, account: str | None = None) -> list[str]:
    found = await pool.fetch(
        "SELECT id FROM transfers WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR account_id = $3)"
        " ORDER BY created_at, id", start, end, account)
    return [str(r["id"]) for r in found]


def shown(html: str, element_id: str) -> int:
    """The amount shown in the element with this id, in micros."""
    match = re.search(rf'id="{element_id}"[^>]*>([^<]+)<', html)
    assert match is not None, element_id
    return money(match[1])


def tie_out(text: str) -> dict[str, Any]:
    """Check a statement CSV the way a reader would: opening + credits - debits = closing, opening + the lines =
    closing, each line's balance after = the one before plus its amount, USD strings equal to the micros."""
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == statements.LINES_CSV_COLUMNS
    found = list(reader)
    sections = [r["section"] for r in found]
    assert sections[0] == "opening_balance"
    assert sections[-4:] == ["credits_total", "debits_total", "closing_balance", "held_at_close"]
    assert set(sections[1:-4]) <= {"line"}
    for r in found:
        assert Decimal(r["amount_usd"]) * 1_000_000 == int(r["amount_micros"])
    figure = {r["section"]: int(r["amount_micros"]) for r in found if r["section"] != "line"}
    lines = [r for r in found if r["section"] == "line"]
    running = int(found[0]["balance_after_micros"])
    assert running == figure["opening_balance"]
    for line in lines:
        running += int(line["amount_micros"])
        assert int(line["balance_after_micros"]) == running, line
    assert running == figure["closing_balance"] == int(found[-2]["balance_after_micros"])
    assert figure["opening_balance"] + figure["credits_total"] - figure["debits_total"] == figure["closing_balance"]
    assert figure["credits_total"] == sum(int(r["amount_micros"]) for r in lines if int(r["amount_micros"]) > 0)
    return {**figure, "lines": [r["transfer_id"] for r in lines]}


async def test_a_statement_and_its_csv_tie_out_to_the_ledger_with_no_lines_one_and_many(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    account = await make_account(pool, balance_micros=2_000_000, name="Tied")
    await billed_request(pool, account, cost_micros=300)  # before every period below: part of each opening
    t0 = await clock(pool)
    t1 = await clock(pool)  # nothing is posted in [t0, t1)
    await ledger.post(pool, account_id=account, kind="topup", amount_micros=1_500_000, description="one")
    t2 = await clock(pool)
    await pool.execute("SELECT meterline_post($1, 'topup', 7, 'bulk') FROM generate_series(1, $2::int)",
                       account, LINES_PAGE)
    for cost in (1, 250, 99_999):
        await billed_request(pool, account, hold_micros=100_000, cost_micros=cost)
    await ledger.post(pool, account_id=account, kind="adjustment", amount_micros=12_345, description="goodwill")
    await ledger.post(pool, account_id=account, kind="adjustment", amount_micros=-2_000,
                      description='refund, "reversed"\nsecond line')
    await billed_request(pool, account, cost_micros=None)  # voided: no ledger line
    t3 = await clock(pool)
    await ledger.post(pool, account_id=account, kind="topup", amount_micros=5, description="after the period")

    page = await (await client.get(f"/console/accounts/{account}")).text()
    assert f'href="/console/accounts/{account}/statement"' in page

    cases = [  # (start, end, lines, credits, debits)
        (t0, t1, 0, 0, 0),
        (t1, t2, 1, 1_500_000, 0),
        (t2, t3, LINES_PAGE + 5, 7 * LINES_PAGE + 12_345, 1 + 250 + 99_999 + 2_000),
    ]
    for start, end, count, credits, debits in cases:
        resp = await client.get(f"/console/accounts/{account}/statement", params=period(start, end))
        assert resp.status == 200
        html = await resp.text()
        opening, closing = await balance_at(pool, account, start), await balance_at(pool, account, end)
        assert {name: shown(html, name) for name in ("opening", "credits", "debits", "closing")} == {
            "opening": opening, "credits": credits, "debits": debits, "closing": closing}
        assert opening + credits - debits == closing
        assert 'id="tie-out" role="status">Ties out' in html
        assert rows(html, "lines") == min(count, LINES_PAGE)
        assert ("No ledger lines in this period." in html) == (count == 0)

        download = await client.get(f"/console/accounts/{account}/statement.csv", params=period(start, end))
        assert download.status == 200
        assert download.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert download.headers["Cache-Control"] == "no-store"
        assert download.headers["Content-Disposition"] == \
            f'attachment; filename="statement-{account}-{start.date()}-{end.date()}.csv"'
        figures = tie_out(await download.text())
        assert (figures["opening_balance"], figures["credits_total"], figures["debits_total"],
                figures["closing_balance"]) == (opening, credits, debits, closing)
        assert figures["lines"] == await transfer_ids(pool, start, end, account)

    # The busy period's second page holds the rest of its lines, and the closing of the whole history is the
    # balance the account caches.
    later = re.search(r'href="([^"]+)" id="later-lines"', html)
    assert later is not None
    rest = await (await client.get(later[1].replace("&amp;", "&"))).text()
    assert rows(rest, "lines") == 5 and 'id="later-lines"' not in rest
    assert shown(html, "closing") == await balance_at(pool, account, t3) == await pool.fetchval(
        "SELECT credits_posted - debits_posted - 5 FROM accounts WHERE id = $1", account)


async def test_a_statement_csv_is_one_snapshot_whatever_is_posted_while_it_streams(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000_000)
    start = await clock(pool)
    await pool.execute("SELECT meterline_post($1, 'topup', 1, 'bulk') FROM generate_series(1, 25)", account)
    end = datetime(9999, 1, 1, tzinfo=UTC)  # a period still open: a posting now falls inside it
    async with pool.acquire() as conn:
        chunks = statements.statement_csv_chunks(conn, account_id=account, start=start, end=end, batch_size=10)
        async with aclosing(chunks):
            text = await anext(chunks)  # the figures are read; the lines are not, yet
            await ledger.post(pool, account_id=account, kind="topup", amount_micros=777, description="meanwhile")
            text += "".join([chunk async for chunk in chunks])
    figures = tie_out(text)
    assert (figures["opening_balance"], figures["closing_balance"], len(figures["lines"])) == (1_000_000, 1_000_025,
                                                                                                25)
    async with pool.acquire() as conn:
        after = "".join([chunk async for chunk in statements.statement_csv_chunks(
            conn, account_id=account, start=start, end=end)])
    assert tie_out(after)["closing_balance"] == 1_000_025 + 777


async def test_a_statement_defaults_to_the_current_month_and_completes_a_half_given_period(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    account = await make_account(pool, balance_micros=4_200_000)
    await billed_request(pool, account, cost_micros=1_000)
    month = datetime.now(UTC).date().replace(day=1)
    html = await (await client.get(f"/console/accounts/{account}/statement")).text()
    assert f'name="from" value="{month.isoformat()}"' in html
    assert (shown(html, "opening"), shown(html, "credits"), shown(html, "debits"), shown(html, "closing")) == \
        (0, 4_200_000, 1_000, 4_199_000)
    csv_link = re.search(r'href="([^"]+)" id="statement-csv"', html)
    assert csv_link is not None
    assert tie_out(await (await client.get(csv_link[1].replace("&amp;", "&"))).text())["closing_balance"] \
        == 4_199_000
    for query, shown_from, shown_to in [({"from": "2026-01-15"}, "2026-01-15", "2026-02-01"),
                                        ({"from": "2025-12-01T06:00:00+02:00"}, "2025-12-01T04:00:00Z",
                                         "2026-01-01"),
                                        ({"to": "2026-03-01"}, "2026-02-01", "2026-03-01"),
                                        ({"to": "2026-03-10T12:00:00Z"}, "2026-03-01", "2026-03-10T12:00:00Z")]:
        html = await (await client.get(f"/console/accounts/{account}/statement", params=query)).text()
        assert (f'name="from" value="{shown_from}"' in html, f'name="to" value="{shown_to}"' in html) == \
            (True, True), query


@pytest.mark.parametrize(("path", "query", "message"), [
    ("statement", {"from": "soon"}, "from must be an ISO-8601 timestamp"),
    ("statement", {"from": "2026-02-01", "to": "2026-01-01"}, "to must be after from"),
    ("statement", {"from": "2026-02-01", "to": "2026-02-01"}, "to must be after from"),
    ("statement", {"to": "0001-01-01"}, "to must be after 0001-01-01"),
    ("statement", {"from": "9999-12-05"}, "from must be before 9999-12-01"),
    ("statement", {"after": "x"}, "after must be a ledger entry id"),
    ("statement.csv", {"to": "yesterday"}, "to must be an ISO-8601 timestamp"),
    ("finance", {"group_by": "week"}, "group_by must be one of model, day, account"),
    ("finance", {"from": "2026-13-01"}, "from must be an ISO-8601 timestamp"),
    ("exports/ledger.csv", {"from": "2026-02-01", "to": "2026-01-01"}, "to must be after from"),
    ("exports/invoices.csv", {}, "export must be one of ledger, requests"),
], ids=["bad-from", "backwards", "empty", "to-at-year-1", "from-at-year-9999", "bad-after", "csv-bad-to",
        "bad-group", "bad-month", "export-backwards", "unknown-export"])
async def test_bad_finance_queries_are_a_400_page_naming_the_problem(
        client: TestClient, pool: asyncpg.Pool, path: str, query: dict[str, str], message: str) -> None:
    await signed_in(client)
    account = await make_account(pool)
    url = f"/console/accounts/{account}/{path}" if path.startswith("statement") else f"/console/{path}"
    resp = await client.get(url, params=query)
    assert resp.status == 400
    assert resp.headers["Content-Type"].startswith("text/html")
    assert message in await resp.text()


async def test_an_unknown_account_has_no_statement(client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    for path in ("/console/accounts/acct_nope/statement", "/console/accounts/acct_nope/statement.csv"):
        resp = await client.get(path)
        assert resp.status == 404 and "acct_nope" in await resp.text()


def margin_cells(html: str) -> tuple[list[list[str]], list[str]]:
    """The margin table's body rows and its totals row, as the text of their cells."""
    table = re.search(r'<table id="margin">.*?<tbody>(.*?)</tbody>.*?<tfoot>(.*?)</tfoot>', html, re.S)
    assert table is not None

    def cells(row: str) -> list[str]:
        return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]

    body = [cells(row) for row in re.findall(r"<tr>(.*?)</tr>", table[1], re.S)]
    return body, cells(table[2])


def flag_counts(html: str) -> dict[str, int]:
    return {kind: int(n.replace(",", "")) for kind, n in
            re.findall(r'<tr id="flag-count-([a-z_]+)"><td>[^<]*</td><td class="num">([\d,]+)</td>', html)}


async def test_the_finance_page_with_no_data_one_row_and_many(client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    start = await clock(pool)
    empty = await (await client.get("/console/finance", params=period(start, await clock(pool)))).text()
    assert rows(empty, "margin") == 0 and "No requests in this period." in empty
    assert flag_counts(empty) == {kind: 0 for kind in reports.FLAG_KINDS}
    assert "No flags in this period." in empty

    a = await make_account(pool, balance_micros=10_000_000, name="a")
    await billed_request(pool, a, cost_micros=1_200, record={"model": "gpt", "upstream_cost_micros": 1_000})
    one = await (await client.get("/console/finance", params=period(start, await clock(pool)))).text()
    body, totals = margin_cells(one)
    assert body == [["gpt", "1", "1", "$0.001200", "$0.001000", "$0.000200"]]
    assert totals == ["Total", "1", "1", "$0.001200", "$0.001000", "$0.000200"]

    b = await make_account(pool, balance_micros=10_000_000, name="b")
    await billed_request(pool, a, cost_micros=600, record={"model": "gpt", "upstream_cost_micros": 450})
    await billed_request(pool, b, cost_micros=900, record={"model": "flux"})  # no upstream cost reported
    await billed_request(pool, b, cost_micros=None, record={"model": "flux", "upstream_cost_micros": 70})
    await billed_request(pool, b, cost_micros=50, record={"model": "cheap", "upstream_cost_micros": 80})
    # Flags past what the page lists: estimated charges, an overrun, a late and a lost expired hold.
    for _ in range(FLAGS_SHOWN):
        rid = request_id()
        await ledger.reserve(pool, request_id=rid, account_id=a, amount_micros=500, ttl_seconds=60)
        await ledger.settle(pool, request_id=rid, actual_micros=400, estimated=True)
    over, late, lost = request_id(), request_id(), request_id()
    await ledger.reserve(pool, request_id=over, account_id=b, amount_micros=500, ttl_seconds=60)
    await ledger.settle(pool, request_id=over, actual_micros=650)
    for rid in (late, lost):
        await ledger.reserve(pool, request_id=rid, account_id=b, amount_micros=300, ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    await ledger.sweep(pool)  # the app's own sweeper may have been first: either way both have expired
    assert await pool.fetchval("SELECT count(*) FROM holds WHERE request_id = ANY($1) AND state = 'expired'",
                               [late, lost]) == 2
    await ledger.settle(pool, request_id=late, actual_micros=200)
    end = await clock(pool)

    for group_by in reports.GROUPS:
        html = await (await client.get("/console/finance", params={**period(start, end), "group_by": group_by})).text()
        expected = await reports.margin(pool, start=start, end=end, group_by=group_by)
        body, totals = margin_cells(html)
        assert [r[0] for r in body] == [r["key"] or "(none)" for r in expected]
        assert [[money(c) for c in r[3:]] for r in body] == \
            [[r["revenue_micros"], r["upstream_cost_micros"], r["margin_micros"]] for r in expected]
        assert [money(c) for c in totals[3:]] == [sum(money(r[i]) for r in body) for i in (3, 4, 5)]
        assert [int(c) for c in totals[1:3]] == [sum(int(r[i]) for r in body) for i in (1, 2)]
    # Only requests with a record count (the flagged settles above wrote none): 1,200 + 600 + 900 + 50 charged.
    assert totals == ["Total", "5", "4", "$0.002750", "$0.001600", "$0.001150"]
    by_account = await (await client.get("/console/finance",
                                         params={**period(start, end), "group_by": "account"})).text()
    assert f'<a href="/console/accounts/{a}">' in by_account and f'<a href="/console/accounts/{b}">' in by_account

    counts, listed = await reports.flags(pool, start=start, end=end, limit=FLAGS_SHOWN)
    # Three overruns: `over`, `late` (its expired hold released everything) and gpt's 1,200 on a 1,000 hold.
    assert counts == {"estimated": FLAGS_SHOWN, "overrun": 3, "expired_then_settled": 1, "expired_unsettled": 1,
                      "in_flight_unsettled": 0}
    assert flag_counts(html) == counts
    assert rows(html, "flags") == FLAGS_SHOWN
    table = re.search(r'<table id="flags">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert table is not None
    linked = re.findall(r'<a href="/console/requests/([^"]+)">.*?<a href="/console/accounts/([^"]+)">', table[1],
                        re.S)
    assert linked == [(f["request_id"], f["account_id"]) for f in listed]
    assert f"Showing the first {FLAGS_SHOWN} of {FLAGS_SHOWN + 5} flags" in html


async def test_export_downloads_are_the_periods_rows_as_the_admin_api_serves_them(
        client: TestClient, pool: asyncpg.Pool) -> None:
    await signed_in(client)
    before = await make_account(pool, balance_micros=1_000, name="before")
    await billed_request(pool, before, cost_micros=10)
    start = await clock(pool)
    a = await make_account(pool, balance_micros=3_000_000, name="in")
    for cost in (5, None, 70_000):
        await billed_request(pool, a, cost_micros=cost, record={"model": "m,1", "upstream_cost_micros": 3})
    await ledger.post(pool, account_id=a, kind="adjustment", amount_micros=-1_234, description="fix")
    end = await clock(pool)
    await billed_request(pool, a, cost_micros=1)  # after the period

    ledger_csv = await client.get("/console/exports/ledger.csv", params=period(start, end))
    assert ledger_csv.status == 200
    assert ledger_csv.headers["Content-Disposition"] == \
        f'attachment; filename="ledger-{start.date()}-{end.date()}.csv"'
    assert ledger_csv.headers["Cache-Control"] == "no-store"
    text = await ledger_csv.text()
    found = list(csv.DictReader(io.StringIO(text)))
    assert [r["transfer_id"] for r in found] == await transfer_ids(pool, start, end)
    assert [(r["kind"], int(r["amount_micros"])) for r in found] == \
        [("topup", 3_000_000), ("charge", -5), ("charge", -70_000), ("adjustment", -1_234)]
    admin = await client.get("/admin/exports/ledger", params=period(start, end), headers=admin_headers())
    assert text == await admin.text()

    requests_csv = await client.get("/console/exports/requests.csv", params=period(start, end))
    found = list(csv.DictReader(io.StringIO(await requests_csv.text())))
    expected = await pool.fetch("SELECT id, cost_micros FROM requests WHERE created_at >= $1 AND created_at < $2"
                                " ORDER BY created_at, id", start, end)
    assert [(r["id"], int(r["cost_micros"])) for r in found] == [(r["id"], r["cost_micros"]) for r in expected]
    assert [int(r["cost_micros"]) for r in found] == [5, 0, 70_000]
    admin = await client.get("/admin/exports/requests", params=period(start, end), headers=admin_headers())
    assert await requests_csv.text() == await admin.text()

    finance = await (await client.get("/console/finance", params=period(start, end))).text()
    for kind in ("ledger", "requests"):
        link = re.search(rf'href="([^"]+)" id="export-{kind}"', finance)
        assert link is not None
        assert (await client.get(link[1].replace("&amp;", "&"))).status == 200


async def test_customers_reach_no_finance_page_and_see_no_finance_link(client: TestClient,
                                                                       pool: asyncpg.Pool) -> None:
    account, secret = await make_customer(pool, balance_micros=1_000_000)
    await signed_in(client, secret)
    me = await (await client.get("/console/me")).text()
    assert "/console/finance" not in me and "statement" not in me
    for path in ("/console/finance", f"/console/accounts/{account}/statement",
                 f"/console/accounts/{account}/statement.csv", "/console/exports/ledger.csv",
                 "/console/exports/requests.csv"):
        resp = await client.get(path, allow_redirects=False)
        assert (resp.status, resp.headers["Location"]) == (303, "/console/me"), path


queries = st.one_of(
    st.text(max_size=40),
    st.dates().map(str),
    st.datetimes(timezones=st.sampled_from([UTC, None])).map(datetime.isoformat),
    st.sampled_from(["0001-01-01", "9999-12-31T23:59:59.999999", "9999-12-05", "2026-02-30", "model", "account",
                     "day", "-1", "99999999999999999999", ""]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(["from", "to", "group_by", "after"]), queries, min_size=1))
async def test_no_finance_page_answers_500_whatever_its_query(client: TestClient, pool: asyncpg.Pool,
                                                              values: dict[str, str]) -> None:
    if not client.session.cookie_jar.filter_cookies(client.make_url("/console")).get("meterline_console"):
        await signed_in(client)
    account = await pool.fetchval("SELECT id FROM accounts WHERE kind = 'customer'") or \
        await make_account(pool, balance_micros=1_000)
    for path in ("/console/finance", f"/console/accounts/{account}/statement",
                 f"/console/accounts/{account}/statement.csv", "/console/exports/ledger.csv",
                 "/console/exports/requests.csv"):
        resp = await client.get(path, params=values)
        assert resp.status in (200, 400), (path, values, resp.status)
        assert "Traceback" not in await resp.text()
