"""The admin console: the overview, accounts (search, create), and an account (balance, ledger, top-ups and
adjustments, credit grants, keys, recent requests). Every change goes through billing/, as the admin API's do.

Top-ups and adjustments carry an Idempotency-Key generated when the form is rendered, so submitting the same form
twice (a double click, a reload) credits once: the second answer is the first one's replay.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp import web

from billing import accounts, grants, keys, ledger, limits, overview, reports, requests_log, rollups
from billing.errors import InvalidRule
from billing.money import MAX_MICROS, usd_to_micros
from gateway.console.charts import by_day, chart, period
from gateway.console.common import int_field, render, see_other, text_field
from gateway.errors import invalid
from gateway.keys import CATALOG, KEY_STORE, POOL

PAGE = 25
LEDGER_PAGE = 50
GRANTS_PAGE = 50
LOW_BALANCE_MICROS = 1_000_000  # an account with less than $1 available is listed as running low


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


async def home(request: web.Request) -> web.Response:
    """The operator's overview for a period (default the last 30 days): revenue, top-ups, requests and errors per
    day from the rollups, pending holds, accounts overdrawn or running low, flags to reconcile, the catalog."""
    pool = request.config_dict[POOL]
    start, end = period(request)
    figures = await overview.overview(pool, low_balance_micros=LOW_BALANCE_MICROS)
    days = await rollups.daily(pool, start=start, end=end)
    flag_counts, _ = await reports.flags(pool, start=_midnight(start), end=_midnight(end), limit=0)
    dates = [d["day"] for d in days]
    return render(request, "overview.html", {
        "figures": figures, "catalog": request.config_dict[CATALOG].status(),
        "low_balance_micros": LOW_BALANCE_MICROS, "start": start, "last": end - timedelta(days=1),
        "totals": {name: sum(d[name] for d in days) for name in ("cost_micros", "topup_micros", "requests", "errors")},
        "flags": sum(flag_counts.values()),
        "money_chart": chart(dates, {"Revenue": [d["cost_micros"] for d in days],
                                     "Top-ups": [d["topup_micros"] for d in days]}, unit="micros"),
        "count_chart": chart(dates, {"Requests": [d["requests"] for d in days],
                                     "Errors": [d["errors"] for d in days]}, unit="count"),
    })


async def usage_explorer(request: web.Request) -> web.StreamResponse:
    """A metric over time grouped by model, key, account, modality or day: a chart of the largest groups, a table
    of every group's total, and the same as CSV (`format=csv`)."""
    metric = request.query.get("metric") or "cost"
    group_by = request.query.get("group_by") or "model"
    if metric not in rollups.METRICS:
        raise invalid(f"metric must be one of {', '.join(rollups.METRICS)}", "metric")
    if group_by not in rollups.GROUPS:
        raise invalid(f"group_by must be one of {', '.join(rollups.GROUPS)}", "group_by")
    account = (request.query.get("account") or "").strip()[:200] or None
    start, end = period(request)
    pool = request.config_dict[POOL]
    if request.query.get("format") == "csv":
        rows = await rollups.explore_rows(pool, metric=metric, group_by=group_by, start=start, end=end,
                                          account_id=account)
        return _csv(f"usage-{metric}-by-{group_by}-{start}-{end - timedelta(days=1)}.csv",
                    ["day", group_by, metric + ("_micros" if metric == "cost" else "")],
                    ([str(r["day"]), r["grp"], r["value"]] for r in rows))
    explored = await rollups.explore(pool, metric=metric, group_by=group_by, start=start, end=end,
                                     account_id=account)
    dates = [start + timedelta(days=i) for i in range((end - start).days)]
    series = by_day(explored.series, dates)
    totals = explored.totals
    return render(request, "usage.html", {
        "metric": metric, "group_by": group_by, "account": account or "", "start": start,
        "last": end - timedelta(days=1), "totals": totals, "grand_total": sum(value for _, value in totals),
        "metrics": list(rollups.METRICS), "groups": list(rollups.GROUPS),
        "usage_chart": chart(dates, series, unit="micros" if metric == "cost" else "count"),
    })


def _csv(filename: str, header: list[str], rows: Iterable[list[Any]]) -> web.Response:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return web.Response(text=out.getvalue(), content_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


async def account_list(request: web.Request) -> web.Response:
    query = (request.query.get("q") or "").strip()[:200]
    after = request.query.get("after") or None
    pool = request.config_dict[POOL]
    if query:
        rows = await accounts.search_accounts(pool, query, limit=PAGE + 1, after=after)
    else:
        rows = await accounts.list_accounts(pool, limit=PAGE + 1, after=after)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    return render(request, "accounts.html", {"accounts": rows, "q": query,
                                             "next_after": rows[-1]["id"] if more and rows else None})


async def account_create(request: web.Request) -> web.Response:
    form = await request.post()
    name = text_field(form, "name", required=True, max_length=200)
    assert name is not None
    row = await accounts.create_account(request.config_dict[POOL], name=name)
    return see_other(f"/console/accounts/{row['id']}")


async def _account_context(request: web.Request, account_id: str) -> dict[str, Any]:
    pool = request.config_dict[POOL]
    account = await accounts.get_account(pool, account_id)
    before = request.query.get("before")
    before_id = int(before) if before and before.isascii() and before.isdigit() and len(before) < 19 else None
    entries = await accounts.ledger_entries(pool, account_id, limit=LEDGER_PAGE + 1, before_id=before_id)
    page = await requests_log.list_requests(pool, requests_log.RequestFilter(account_id=account_id), limit=20)
    return {
        "account": account, "entries": entries[:LEDGER_PAGE],
        "older": entries[LEDGER_PAGE - 1]["id"] if len(entries) > LEDGER_PAGE else None,
        "keys": await overview.account_keys(pool, account_id), "requests": page.records,
        "parts": await grants.balance_parts(pool, account_id),
        "grants": await grants.list_grants(pool, account_id, limit=GRANTS_PAGE),
        # A fresh Idempotency-Key per rendered form: the same form posted twice moves money once.
        "topup_key": f"console-{uuid.uuid4()}", "adjustment_key": f"console-{uuid.uuid4()}",
        "grant_key": f"console-{uuid.uuid4()}", "granted": request.query.get("granted"),
        "posted": request.query.get("posted"), "replayed": request.query.get("replayed") == "1",
        "updated": request.query.get("updated"),
        "new_key": None,
    }


async def account_page(request: web.Request) -> web.Response:
    return render(request, "account.html", await _account_context(request, request.match_info["account_id"]))


def _amount(form: Any, *, positive: bool) -> int:
    text = text_field(form, "amount_usd", required=True, max_length=32)
    assert text is not None
    micros = usd_to_micros(text)
    if positive and micros <= 0:
        raise invalid("A top-up must be a positive amount", "amount_usd")
    if micros == 0:
        raise invalid("An adjustment must not be zero", "amount_usd")
    return micros


async def _post(request: web.Request, *, kind: str) -> web.Response:
    account_id = request.match_info["account_id"]
    form = await request.post()
    idem = text_field(form, "idempotency_key", required=True, max_length=255)
    amount = _amount(form, positive=kind == "topup")
    description = text_field(form, "description" if kind == "topup" else "reason", required=kind == "adjustment")
    result, replayed = await ledger.post_once(
        request.config_dict[POOL], idempotency_key=idem or "", account_id=account_id, kind=kind,
        amount_micros=amount, description=description,
        fingerprint=ledger.request_fingerprint(kind, account_id, amount, description))
    return see_other(f"/console/accounts/{account_id}?posted={result['transfer_id']}"
                     f"&replayed={1 if replayed else 0}")


async def topup(request: web.Request) -> web.Response:
    return await _post(request, kind="topup")


async def adjustment(request: web.Request) -> web.Response:
    return await _post(request, kind="adjustment")


def _utc_field(form: Any, name: str) -> datetime | None:
    """A date and time field (a browser's datetime-local, or ISO-8601): UTC unless it gives its own offset."""
    text = text_field(form, name, max_length=40)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(f"{name} must be a date and time, such as 2026-12-31T23:59", name) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def grant(request: web.Request) -> web.Response:
    """Grant paid or promotional credit, as POST /admin/accounts/{id}/grants does (under the form's key)."""
    account_id = request.match_info["account_id"]
    form = await request.post()
    idem = text_field(form, "idempotency_key", required=True, max_length=255)
    category = text_field(form, "category", required=True, max_length=20)
    priority = int_field(form, "priority", low=0, high=100)
    text = text_field(form, "amount_usd", required=True, max_length=32)
    assert text is not None and category is not None
    try:
        result, replayed = await grants.grant_once(
            request.config_dict[POOL], idempotency_key=idem or "", account_id=account_id, category=category,
            amount_micros=usd_to_micros(text),
            priority=grants.DEFAULT_PRIORITY if priority is None else priority,
            effective_at=_utc_field(form, "effective_at"), expires_at=_utc_field(form, "expires_at"),
            description=text_field(form, "description", max_length=1000))
    except InvalidRule as exc:
        raise invalid(str(exc), "amount_usd" if exc.field == "amount_micros" else exc.field) from None
    return see_other(f"/console/accounts/{account_id}?granted={result['id']}&replayed={1 if replayed else 0}")


def _limit_changes(form: Any, *, blank_clears: bool) -> dict[str, Any]:
    """The limit fields of a key form. Creating, a blank field sets nothing; editing, it clears that limit."""
    changes: dict[str, Any] = {}
    limit_usd = text_field(form, "limit_usd", max_length=32)
    if limit_usd is not None:
        changes["limit_micros"] = usd_to_micros(limit_usd)
        if not 0 <= changes["limit_micros"] <= MAX_MICROS:
            raise invalid("limit_usd must be zero or more", "limit_usd")
    elif blank_clears:
        changes["limit_micros"] = None
    reset = text_field(form, "limit_reset", max_length=16)
    if reset is not None:
        if reset not in limits.RESETS:
            raise invalid("limit_reset must be daily, weekly or monthly", "limit_reset")
        changes["limit_reset"] = reset
    elif blank_clears:
        changes["limit_reset"] = None
    for name, (low, high) in (("rpm_limit", limits.RPM_RANGE), ("rpd_limit", limits.RPD_RANGE)):
        value = int_field(form, name, low=low, high=high)
        if value is not None or blank_clears:
            changes[name] = value
    return changes


async def key_update(request: web.Request) -> web.Response:
    """A key's limits and Detailed Logging, as PATCH /admin/keys/{id} sets them (a blank limit is no limit)."""
    form = await request.post()
    row = await limits.update_key(request.config_dict[POOL], request.match_info["key_id"],
                                  _limit_changes(form, blank_clears=True),
                                  detailed_logging=form.get("detailed_logging") == "on")
    request.config_dict[KEY_STORE].forget()
    return see_other(f"/console/accounts/{row['account_id']}?updated={row['id']}")


async def key_create(request: web.Request) -> web.Response:
    """Mint a key; its secret is shown on this answer only (a reload does not show it again: the answer is not
    cached, and posting the form again makes another key)."""
    account_id = request.match_info["account_id"]
    form = await request.post()
    changes = _limit_changes(form, blank_clears=False)
    row, secret = await limits.create_key(request.config_dict[POOL], account_id=account_id,
                                          name=text_field(form, "name", max_length=200),
                                          detailed_logging=form.get("detailed_logging") == "on", changes=changes)
    context = await _account_context(request, account_id)
    context["new_key"] = {"id": row["id"], "secret": secret}
    return render(request, "account.html", context, status=201)


async def key_revoke(request: web.Request) -> web.Response:
    row = await keys.revoke_key(request.config_dict[POOL], request.match_info["key_id"])
    request.config_dict[KEY_STORE].forget()
    return see_other(f"/console/accounts/{row['account_id']}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("", home)
    app.router.add_get("/", home)
    app.router.add_get("/usage", usage_explorer)
    app.router.add_get("/accounts", account_list)
    app.router.add_post("/accounts", account_create)
    app.router.add_get("/accounts/{account_id}", account_page)
    app.router.add_post("/accounts/{account_id}/topups", topup)
    app.router.add_post("/accounts/{account_id}/adjustments", adjustment)
    app.router.add_post("/accounts/{account_id}/grants", grant)
    app.router.add_post("/accounts/{account_id}/keys", key_create)
    app.router.add_post("/keys/{key_id}/revoke", key_revoke)
    app.router.add_post("/keys/{key_id}/settings", key_update)
