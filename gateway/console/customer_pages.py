"""The customer's console: a read-only view of the signed-in key's own account (its balance, the key's limits and
when they reset, its spend per day, the account's recent requests). Everything is read through the session's
account and key, never from the URL, so no other account can be reached from here. Its conversations and memories
are gateway.console.conversation_pages'."""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from billing import accounts, grants, limits, requests_log, rollups
from gateway.console.charts import chart, period
from gateway.console.common import SESSION, render
from gateway.keys import POOL


async def me(request: web.Request) -> web.Response:
    session = request[SESSION]
    assert session.account_id is not None and session.key_id is not None
    pool = request.config_dict[POOL]
    page = await requests_log.list_requests(pool, requests_log.RequestFilter(account_id=session.account_id),
                                            limit=50)
    start, end = period(request)
    days = await rollups.daily(pool, start=start, end=end, account_id=session.account_id)
    return render(request, "me.html", {
        "start": start, "last": end - timedelta(days=1),
        "spend_chart": chart([d["day"] for d in days], {"Spend": [d["cost_micros"] for d in days]}, unit="micros"),
        "account": await accounts.get_account(pool, session.account_id),
        "parts": await grants.balance_parts(pool, session.account_id),
        "key": await limits.key_status(pool, session.key_id),
        "requests": page.records,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/me", me)
