"""The admin console's request log and video jobs: every account's requests filtered by the URL's query, with the
count and cost of all that match; one request's full record with its hold and charge; the video jobs. Pages read
only, each through billing/.

Filters live in the query string, so a filtered view is a link and its next page keeps them. A value that cannot
be a filter (a bad date, an overlong text, a cursor no page gave) is a 400 naming its parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, timedelta
from typing import cast
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDictProxy

from billing import requests_log, videos
from gateway.console.common import render, text_field
from gateway.errors import invalid, not_found
from gateway.keys import POOL
from gateway.params import parse_time

PAGE = 50
MAX_FILTER = 200
# Long enough for any cursor a page gives (a timestamp and an id of at most 128 characters, in base64).
MAX_CURSOR = 400
_PERIOD_HELP = "a date (2026-03-01) or an ISO-8601 timestamp (2026-03-01T12:00:00Z; without a zone, UTC)"
_FLAG_HELP = {
    "estimated": "estimated must be 1 (only charges made from an estimate) or 0 (only exact ones)",
    "overrun": "overrun must be 1 (only charges above their hold) or 0 (only charges within it)",
}


def _query(request: web.Request) -> MultiDictProxy[str]:
    """The query string, for common.text_field (it is a MultiDictProxy, which aiohttp types as its interface)."""
    return cast("MultiDictProxy[str]", request.query)


def _period_bound(query: MultiDictProxy[str], name: str, *, end: bool) -> datetime | None:
    """A bound of the period in UTC. A timestamp is the bound itself (`from` inclusive, `to` exclusive); a date as
    `from` is the start of that day and as `to` the end of it, so from=2026-03-01&to=2026-03-31 is all of March."""
    text = text_field(query, name, max_length=40)
    if text is None:
        return None
    moment = parse_time(text, name)
    try:
        date.fromisoformat(text)
    except ValueError:
        return moment  # a timestamp: the bound itself
    try:
        return moment + timedelta(days=1) if end else moment
    except OverflowError:
        raise invalid(f"{name} must be {_PERIOD_HELP}", name) from None


def _flag(query: MultiDictProxy[str], name: str) -> bool | None:
    text = text_field(query, name, max_length=MAX_FILTER)
    if text is None:
        return None
    if text not in ("1", "0"):
        raise invalid(_FLAG_HELP[name], name)
    return text == "1"


def _request_filter(query: MultiDictProxy[str]) -> tuple[requests_log.RequestFilter, dict[str, str]]:
    """The filter the query asks for, and the query's filter values as given (for the form and the next page)."""
    created_after = _period_bound(query, "from", end=False)
    created_before = _period_bound(query, "to", end=True)
    if created_after is not None and created_before is not None and created_before <= created_after:
        raise invalid("to must be after from", "to")
    texts = {name: text_field(query, name, max_length=MAX_FILTER)
             for name in ("account", "key", "model", "modality", "status")}
    if texts["modality"] is not None and texts["modality"] not in requests_log.MODALITIES:
        raise invalid(f"modality must be one of {', '.join(requests_log.MODALITIES)}", "modality")
    where = requests_log.RequestFilter(
        account_id=texts["account"], created_after=created_after, created_before=created_before,
        model=texts["model"], key_id=texts["key"], status=texts["status"], modality=texts["modality"],
        estimated=_flag(query, "estimated"), overrun=_flag(query, "overrun"))
    given = {name: query.get(name, "").strip() for name in ("from", "to", *texts, "estimated", "overrun")}
    return where, {name: value for name, value in given.items() if value}


def _cursor(query: MultiDictProxy[str]) -> str | None:
    return text_field(query, "cursor", max_length=MAX_CURSOR)


def _next_href(path: str, filters: Mapping[str, str], cursor: str | None) -> str | None:
    return f"{path}?{urlencode({**filters, 'cursor': cursor})}" if cursor is not None else None


async def request_log(request: web.Request) -> web.Response:
    query = _query(request)
    where, filters = _request_filter(query)
    cursor = _cursor(query)
    pool = request.config_dict[POOL]
    try:
        page = await requests_log.list_requests(pool, where, limit=PAGE, cursor=cursor)
    except requests_log.InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    return render(request, "requests.html", {
        "requests": page.records, "totals": await requests_log.summarize(pool, where), "filters": filters,
        "modalities": requests_log.MODALITIES, "paged": cursor is not None,
        "next_href": _next_href("/console/requests", filters, page.next_cursor),
    })


async def request_page(request: web.Request) -> web.Response:
    detail = await requests_log.request_detail(request.config_dict[POOL], request.match_info["request_id"])
    if detail is None:
        raise not_found("There is no request with that id")
    return render(request, "request.html", {"record": detail.record, "hold": detail.hold,
                                            "transfer": detail.transfer, "key": detail.key})


async def video_list(request: web.Request) -> web.Response:
    query = _query(request)
    status = text_field(query, "status", max_length=MAX_FILTER)
    if status is not None and status not in videos.STATUSES:
        raise invalid(f"status must be one of {', '.join(videos.STATUSES)}", "status")
    account_id = text_field(query, "account", max_length=MAX_FILTER)
    cursor = _cursor(query)
    try:
        page = await videos.list_jobs(request.config_dict[POOL], account_id=account_id, status=status, limit=PAGE,
                                      cursor=cursor)
    except requests_log.InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    filters = {name: value for name, value in (("status", status), ("account", account_id)) if value}
    return render(request, "videos.html", {
        "videos": page.records, "filters": filters, "statuses": videos.STATUSES, "unfinished": videos.UNFINISHED,
        "paged": cursor is not None, "next_href": _next_href("/console/videos", filters, page.next_cursor),
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/requests", request_log)
    app.router.add_get("/requests/{request_id}", request_page)
    app.router.add_get("/videos", video_list)
