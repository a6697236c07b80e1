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
from gateway.bodies import query_int
from gateway.errors import invalid
from gateway.keys import POOL
from gateway.render import iso, json_response
from gateway.usage import query_time

routes = web.RouteTableDef()

_CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}


def _period(request: web.Request) -> tuple[datetime, datetime]:
    start = query_time(request, "from", required=True)
    end = query_time(request, "to", required=True)
    assert start is not None and end is not None
    if end <= start:
        raise invalid("to must be after from", "to")
    return start, end


def _format(request: web.Request, allowed: tuple[str, ...], default: str) -> str:
    fmt = request.query.get("format", default)
    if fmt not in allowed:
        raise invalid(f"format must be one of {', '.join(allowed)}", "format")
    return fmt


@routes.get("/accounts/{account_id}/statement")
async def statement(request: web.Request) -> web.StreamResponse:
    start, end = _period(request)
    fmt = _format(request, ("json", "csv"), "json")
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


@routes.get("/exports/{kind}")
async def export(request: web.Request) -> web.StreamResponse:
    """Streams the export batch by batch: memory stays at one batch whatever the period's size."""
    kind = request.match_info["kind"]
    if kind not in exports.KINDS:
        raise invalid(f"export must be one of {', '.join(exports.KINDS)}", "kind")
    start, end = _period(request)
    fmt = _format(request, exports.FORMATS, "csv")
    account_id = request.query.get("account") or None
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


@routes.get("/reports/margin")
async def margin(request: web.Request) -> web.Response:
    start, end = _period(request)
    group_by = request.query.get("group_by", "model")
    if group_by not in reports.GROUPS:
        raise invalid(f"group_by must be one of {', '.join(reports.GROUPS)}", "group_by")
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


@routes.get("/reports/flags")
async def flags(request: web.Request) -> web.Response:
    start, end = _period(request)
    limit = query_int(request, "limit", default=100, low=1, high=1000)
    counts, rows = await reports.flags(request.config_dict[POOL], start=start, end=end, limit=limit)
    return json_response({
        "object": "flags_report", "from": iso(start), "to": iso(end), "counts": counts,
        "data": [{**r, "amount_usd": format_usd(r["amount_micros"])} for r in rows],
        "has_more": sum(counts.values()) > len(rows),
    })
