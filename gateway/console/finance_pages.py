"""The admin console's finance pages: an account's statement for a period (its tie-out, its lines and a CSV to
check them by), the margin report and the reconciliation flags, and the ledger and request exports as downloads.

A period is half-open, [from, to), in UTC: `from` and `to` are dates or ISO-8601 timestamps (one without a zone is
UTC), read as the admin API reads them. Without either the period is the current calendar month; a missing bound
completes the calendar month of the other one. Every figure comes from billing/ (statements, reports, exports);
downloads stream from a database cursor in constant memory, as the admin API's exports do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from billing import accounts, exports, reports, statements
from gateway.console.common import render
from gateway.errors import invalid
from gateway.keys import POOL
from gateway.params import query_time
from gateway.render import iso

LINES_PAGE = 100
FLAGS_SHOWN = 50
MARGIN_TOTALS = ("requests", "with_upstream_cost", "revenue_micros", "upstream_cost_micros", "margin_micros")
# A streamed answer has sent its headers before the console's middleware sees it, so a download sets the ones
# that matter for it itself: financial data is never cached, and the browser must not guess another type.
_DOWNLOAD_HEADERS = {"Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _month_start(moment: datetime) -> datetime:
    return datetime.combine(moment.date().replace(day=1), time(), tzinfo=UTC)


def _next_month(moment: datetime) -> datetime:
    start = _month_start(moment)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def _period(request: web.Request) -> tuple[datetime, datetime]:
    start = query_time(request, "from")
    end = query_time(request, "to")
    if start is None:
        try:
            # The month `to` closes: a `to` on the first of a month means the whole month before it.
            start = _month_start(end - timedelta(microseconds=1) if end else datetime.now(UTC))
        except OverflowError:
            raise invalid("to must be after 0001-01-01T00:00:00Z", "to") from None
    if end is None:
        try:
            end = _next_month(start)
        except ValueError:  # the month after December 9999
            raise invalid("from must be before 9999-12-01 when to is not given", "from") from None
    if end <= start:
        raise invalid("to must be after from (the period is [from, to))", "to")
    return start, end


def _shown(moment: datetime) -> str:
    """A period bound as the form shows it: a date when it is a midnight, else a timestamp."""
    return moment.date().isoformat() if moment.time() == time() else iso(moment)


def _period_context(start: datetime, end: datetime) -> dict[str, Any]:
    """The period for a page: its bounds, as the form shows them, and as the query of its download links."""
    return {"start": start, "end": end, "from_text": _shown(start), "to_text": _shown(end),
            "period_query": urlencode({"from": _shown(start), "to": _shown(end)})}


def _after(request: web.Request) -> int | None:
    raw = request.query.get("after", "")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) < 19):
        raise invalid("after must be a ledger entry id (a whole number)", "after")
    return int(raw)


async def statement_page(request: web.Request) -> web.Response:
    pool = request.config_dict[POOL]
    account_id = request.match_info["account_id"]
    start, end = _period(request)
    after = _after(request)
    account = await accounts.get_account(pool, account_id)
    stmt = await statements.statement(pool, account_id=account_id, start=start, end=end)
    lines = await statements.statement_lines(pool, account_id=account_id, start=start, end=end,
                                             limit=LINES_PAGE + 1, after_id=after)
    expected = stmt["opening_balance_micros"] + stmt["credits_micros"] - stmt["debits_micros"]
    return render(request, "statement.html", {
        **_period_context(start, end), "account": account, "stmt": stmt, "lines": lines[:LINES_PAGE],
        "later": lines[LINES_PAGE - 1]["id"] if len(lines) > LINES_PAGE else None, "after": after,
        "ties_out": expected == stmt["closing_balance_micros"],
        "difference": stmt["closing_balance_micros"] - expected,
    })


async def _download(request: web.Request, name: str, chunks: AsyncGenerator[str, None]) -> web.StreamResponse:
    """Stream `chunks` as a CSV attachment. The first chunk is awaited before the answer starts, so what fails
    before any data (a bad period, an unknown account) is still an error page; the client leaving ends it."""
    async with aclosing(chunks):
        first = await anext(chunks)
        response = web.StreamResponse(headers={**_DOWNLOAD_HEADERS,
                                               "Content-Disposition": f'attachment; filename="{name}"'})
        await response.prepare(request)
        try:
            await response.write(first.encode())
            async for text in chunks:
                await response.write(text.encode())
        except ConnectionError:
            return response  # the client left mid-download; closing the chunks ends the transaction
    await response.write_eof()
    return response


async def statement_csv(request: web.Request) -> web.StreamResponse:
    account_id = request.match_info["account_id"]
    start, end = _period(request)
    async with request.config_dict[POOL].acquire() as conn:
        chunks = statements.statement_csv_chunks(conn, account_id=account_id, start=start, end=end)
        return await _download(request, f"statement-{account_id}-{start.date()}-{end.date()}.csv", chunks)


async def _texts(chunks: AsyncGenerator[tuple[str, int], None]) -> AsyncGenerator[str, None]:
    async with aclosing(chunks):
        async for text, _rows in chunks:
            yield text


async def export(request: web.Request) -> web.StreamResponse:
    kind = request.match_info["kind"]
    if kind not in exports.KINDS:
        raise invalid(f"export must be one of {', '.join(exports.KINDS)}", "kind")
    start, end = _period(request)
    async with request.config_dict[POOL].acquire() as conn:
        chunks = exports.export_chunks(conn, kind, fmt="csv", start=start, end=end)
        return await _download(request, f"{kind}-{start.date()}-{end.date()}.csv", _texts(chunks))


def _totals(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {name: sum(r[name] for r in rows) for name in MARGIN_TOTALS}


async def finance(request: web.Request) -> web.Response:
    pool = request.config_dict[POOL]
    start, end = _period(request)
    group_by = request.query.get("group_by") or "model"
    if group_by not in reports.GROUPS:
        raise invalid(f"group_by must be one of {', '.join(reports.GROUPS)}", "group_by")
    rows = await reports.margin(pool, start=start, end=end, group_by=group_by)
    counts, flags = await reports.flags(pool, start=start, end=end, limit=FLAGS_SHOWN)
    return render(request, "finance.html", {
        **_period_context(start, end), "group_by": group_by, "groups": list(reports.GROUPS),
        "rows": rows, "totals": _totals(rows), "counts": counts, "flags": flags,
        "flagged": sum(counts.values()), "kinds": reports.FLAG_KINDS, "exports": exports.KINDS,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/accounts/{account_id}/statement", statement_page)
    app.router.add_get("/accounts/{account_id}/statement.csv", statement_csv)
    app.router.add_get("/finance", finance)
    app.router.add_get("/exports/{kind}.csv", export)
