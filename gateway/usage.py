"""Consumer usage routes under /v1 and /openai/v1: the request log (`/requests`) and the calling key (`/key`).

A key sees only its own account's records; another account's record id answers 404, as an unknown id does.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing import limits, requests_log
from billing.money import format_usd
from gateway import wire
from gateway.auth import requires_key
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import NOT_FOUND, operation
from gateway.errors import invalid, not_found
from gateway.keys import API_KEY, POOL
from gateway.params import CURSOR, BoolParam, Param, TextParam, TimeParam, limit
from gateway.render import json_response

_FILTER = 200
_CREATED_AFTER = TimeParam("created_after", "Only records created at or after this time (ISO-8601)")
_CREATED_BEFORE = TimeParam("created_before", "Only records created before this time (ISO-8601)")
_MODEL = TextParam("model", "Only this model's", max_length=_FILTER)
_KEY_ID = TextParam("key_id", "Only this key's", max_length=_FILTER)
_STATUS = TextParam("status", "Only records of this status (success, upstream_failure, cancelled, ...)",
                    max_length=_FILTER)
_CLIENT_REQUEST_ID = TextParam("client_request_id", "Only the call sent with this X-Request-Id of the client's own",
                               max_length=_FILTER)
_GENERATION_ID = TextParam("generation_id", "Only the call the upstream knows by this id (OpenRouter's gen-..., a "
                           "video job's id)", max_length=_FILTER)
_PROVIDER = TextParam("provider", "Only calls this provider served (a model with several providers)",
                      max_length=_FILTER)
_LIMIT = limit(50, 500)
_SUMMARY = BoolParam("summary", "true: add the count and total cost of every record the filters match")
_REQUESTS_QUERY: tuple[Param, ...] = (_CREATED_AFTER, _CREATED_BEFORE, _MODEL, _KEY_ID, _STATUS, _CLIENT_REQUEST_ID,
                                      _GENERATION_ID, _PROVIDER, _LIMIT, CURSOR, _SUMMARY)


def render_record(row: dict[str, Any]) -> dict[str, Any]:
    """Lumenfall's request record, with the exact cost as integer micros and as a USD decimal string."""
    return {
        "id": row["id"],
        "object": "request",
        "created_at": row["created_at"],
        "model": row["model"],
        "modality": row["modality"],
        "endpoint": row["endpoint"],
        "status": row["status"],
        "duration_ms": row["duration_ms"],
        "key_id": row["key_id"],
        "client_request_id": row["client_request_id"],
        "provider": row["provider"],
        "provider_model": row["provider_model"],
        "generation_id": row["generation_id"],
        "attempts": row["attempts"],
        "error_code": row["error_code"],
        "error_message": row["error_message"],
        "user": row["user"],
        "cost_micros": row["cost_micros"],
        "cost": format_usd(row["cost_micros"]),
        "currency": "usd",
        "estimated": row["estimated"],
        "billing_status": row["billing_status"],
        "usage": {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cached_tokens": row["cached_tokens"],
            "reasoning_tokens": row["reasoning_tokens"],
            "quantity": row["quantity"],
        },
    }


@operation("This account's request records, newest first", query=_REQUESTS_QUERY, answer=wire.RequestList)
@requires_key
async def list_requests(request: web.Request) -> web.Response:
    key = request[API_KEY]
    where = requests_log.RequestFilter(
        account_id=key.account_id,
        created_after=_CREATED_AFTER.read(request),
        created_before=_CREATED_BEFORE.read(request),
        model=_MODEL.read(request),
        key_id=_KEY_ID.read(request),
        status=_STATUS.read(request),
        client_request_id=_CLIENT_REQUEST_ID.read(request),
        generation_id=_GENERATION_ID.read(request),
        provider=_PROVIDER.read(request),
    )
    limit = _LIMIT.read(request)
    cursor = CURSOR.read(request)
    pool = request.app[POOL]
    try:
        page = await requests_log.list_requests(pool, where, limit=limit, cursor=cursor)
    except requests_log.InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    body: dict[str, Any] = {
        "object": "list",
        "data": [render_record(r) for r in page.records],
        "has_more": page.next_cursor is not None,
        "next_cursor": page.next_cursor,
    }
    if _SUMMARY.read(request):
        summary = await requests_log.summarize(pool, where)
        body["summary"] = {
            "count": summary["count"],
            "total_cost_micros": summary["cost_micros"],
            "total_cost": format_usd(summary["cost_micros"]),
            "currency": "usd",
        }
    return json_response(body)


@operation("One request record", answer=wire.RequestRecord, errors=(NOT_FOUND,))
@requires_key
async def get_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    row = await requests_log.get_request(
        request.app[POOL], account_id=request[API_KEY].account_id, request_id=request_id
    )
    if row is None:
        raise not_found(f"No request with id {request_id!r}")
    return json_response(render_record(row))


@operation("The calling key: its spend limit, what is left of it, and its usage", answer=wire.KeyStatus)
@requires_key
async def current_key(request: web.Request) -> web.Response:
    """OpenRouter's /key: the key's spend limit, what is left of it, and its usage, all in micros."""
    row = await limits.key_status(request.app[POOL], request[API_KEY].id)
    limit = row["limit_micros"]
    remaining = None if limit is None else max(row["limit_remaining_micros"], 0)
    usage = {
        name: row[f"{name}_micros"] for name in ("usage", "usage_daily", "usage_weekly", "usage_monthly")
    }
    return json_response({"data": {
        "id": row["id"],
        "object": "api_key",
        "label": row["prefix"],
        "name": row["name"],
        "limit_micros": limit,
        "limit_remaining_micros": remaining,
        "limit_reset": row["limit_reset"],
        "limit_resets_at": row["limit_resets_at"],
        "held_micros": row["held_micros"],
        "rpm_limit": row["rpm_limit"],
        "rpd_limit": row["rpd_limit"],
        **{f"{name}_micros": value for name, value in usage.items()},
        **{name: format_usd(value) for name, value in usage.items()},
        "limit": None if limit is None else format_usd(limit),
        "limit_remaining": None if remaining is None else format_usd(remaining),
    }})


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_get(f"{prefix}/requests", list_requests)
        app.router.add_get(f"{prefix}/requests/{{request_id}}", get_request)
        app.router.add_get(f"{prefix}/key", current_key)
