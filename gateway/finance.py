"""Admin finance routes: statements, streamed ledger/request exports, margin and reconciliation reports.

Registered on the /admin sub-app (admin token required). Period parameters `from` and `to` are ISO-8601
timestamps (UTC unless a zone is given) and the period is half-open, [from, to).
"""

from __future__ import annotations

from contextlib import aclosing
from datetime import datetime

from aiohttp import web

from billing import accounts, exports, reports, statements
from billing.money import format_usd
from gateway import wire
from gateway.contract import NOT_FOUND, Answer, operation
from gateway.errors import invalid
from gateway.keys import POOL
from gateway.params import ChoiceParam, Param, TextParam, TimeParam, limit
from gateway.render import iso, json_response

routes = web.RouteTableDef()

_CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
_FROM = TimeParam("from", "Start of the period (inclusive), ISO-8601; no zone means UTC", required=True)
_TO = TimeParam("to", "End of the period (exclusive), after `from`", required=True)
_PERIOD: tuple[Param, ...] = (_FROM, _TO)
_STATEMENT_FORMAT = ChoiceParam("format", "json or csv", choices=("json", "csv"), default="json")
_EXPORT_FORMAT = ChoiceParam("format", "csv or jsonl", choices=exports.FORMATS, default="csv")
_EXPORT_ACCOUNT = TextParam("account", "Only this account's rows")
_GROUP_BY = ChoiceParam("group_by", "What the margin is grouped by", choices=tuple(reports.GROUPS), default="model")
_FLAGS_LIMIT = limit(100, 1000)
_EXPORT_KIND = ChoiceParam("kind", "What is exported", choices=exports.KINDS, default="ledger", required=True,
                           where="path")


def _period(request: web.Request) -> tuple[datetime, datetime]:
    start, end = _FROM.read_required(request), _TO.read_required(request)
    if end <= start:
        raise invalid("to must be after from", "to")
    return start, end


@operation("An account's statement for a period: opening and closing balance, credits, debits, holds",
           query=(*_PERIOD, _STATEMENT_FORMAT), answer=Answer(wire.Statement, media=("application/json", "text/csv")),
           errors=(NOT_FOUND,))
@routes.get("/accounts/{account_id}/statement")
async def statement(request: web.Request) -> web.StreamResponse:
    start, end = _period(request)
    fmt = _STATEMENT_FORMAT.read(request)
    stmt = await statements.statement(
        request.config_dict[POOL], account_id=request.match_info["account_id"], start=start, end=end
    )
    if fmt == "csv":
        name = f"statement-{stmt['account_id']}-{start.date()}-{end.date()}.csv"
        return web.Response(
            text=statements.statement_csv(stmt), content_type="text/csv", charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return json_response(statements.render_usd(stmt))


@operation("Export the ledger or the request records of a period, streamed",
           query=(*_PERIOD, _EXPORT_FORMAT, _EXPORT_ACCOUNT),
           path=(_EXPORT_KIND,), answer=Answer(media=("text/csv", "application/x-ndjson"),
                                               description="The rows, as CSV or JSON lines"),
           errors=(NOT_FOUND,))
@routes.get("/exports/{kind}")
async def export(request: web.Request) -> web.StreamResponse:
    """Streams the export batch by batch: memory stays at one batch whatever the period's size."""
    kind = _EXPORT_KIND.read_path(request)
    start, end = _period(request)
    fmt = _EXPORT_FORMAT.read(request)
    account_id = _EXPORT_ACCOUNT.read(request)
    pool = request.config_dict[POOL]
    if account_id is not None:
        await accounts.get_account(pool, account_id)  # an unknown account is a 404, not an empty file
    response = web.StreamResponse(headers={
        "Content-Type": _CONTENT_TYPES[fmt],
        "Content-Disposition": f'attachment; filename="{kind}-{start.date()}-{end.date()}.{fmt}"',
    })
    async with pool.acquire() as conn:
        chunks = exports.export_chunks(conn, kind, fmt=fmt, start=start, end=end, account_id=account_id)
        async with aclosing(chunks):
            await response.prepare(request)
            try:
                async for text, _rows in chunks:
                    await response.write(text.encode())
            except ConnectionError:
                return response  # the client left mid-export; the cursor is closed with the transaction
    await response.write_eof()
    return response


@operation("Revenue, upstream cost and margin of a period", query=(*_PERIOD, _GROUP_BY), answer=wire.MarginReport)
@routes.get("/reports/margin")
async def margin(request: web.Request) -> web.Response:
    start, end = _period(request)
    group_by = _GROUP_BY.read(request)
    rows = await reports.margin(request.config_dict[POOL], start=start, end=end, group_by=group_by)
    data = [
        {
            "group": r["key"],
            "requests": r["requests"],
            "requests_with_upstream_cost": r["with_upstream_cost"],
            **{name: r[name] for name in ("revenue_micros", "upstream_cost_micros", "margin_micros")},
            **{name.replace("_micros", "_usd"): format_usd(r[name])
               for name in ("revenue_micros", "upstream_cost_micros", "margin_micros")},
        }
        for r in rows
    ]
    totals = {name: sum(r[name] for r in rows) for name in ("revenue_micros", "upstream_cost_micros",
                                                             "margin_micros", "requests")}
    return json_response({"object": "margin_report", "from": iso(start), "to": iso(end), "group_by": group_by,
                          "data": data, "totals": totals})


@operation("Flagged charges of a period: estimated, overrun, settled after expiry",
           query=(*_PERIOD, _FLAGS_LIMIT), answer=wire.FlagsReport)
@routes.get("/reports/flags")
async def flags(request: web.Request) -> web.Response:
    start, end = _period(request)
    limit = _FLAGS_LIMIT.read(request)
    counts, rows = await reports.flags(request.config_dict[POOL], start=start, end=end, limit=limit)
    return json_response({
        "object": "flags_report", "from": iso(start), "to": iso(end), "counts": counts,
        "data": [{**r, "amount_usd": format_usd(r["amount_micros"])} for r in rows],
        "has_more": sum(counts.values()) > len(rows),
    })
