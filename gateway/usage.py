"""Consumer usage routes under /v1 and /openai/v1: the request log (`/requests`) and the calling key (`/key`).

A key sees only its own account's records; another account's record id answers 404, as an unknown id does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from billing import limits, requests_log
from billing.money import format_usd
from gateway.auth import requires_key
from gateway.bodies import query_int
from gateway.consumer import CONSUMER_PREFIXES
from gateway.errors import invalid, not_found
from gateway.keys import API_KEY, POOL
from gateway.render import json_response

_MAX_FILTER = 200


def query_time(request: web.Request, name: str, *, required: bool = False) -> datetime | None:
    """An ISO-8601 timestamp query parameter ("2026-03-15T14:32:10Z"); one without a zone is taken as UTC."""
    raw = request.query.get(name, "").strip()
    if not raw:
        if required:
            raise invalid(f"{name} is required (an ISO-8601 timestamp such as 2026-03-01T00:00:00Z)", name)
        return None
    return parse_time(raw, name)


def parse_time(raw: str, name: str) -> datetime:
    """An ISO-8601 timestamp or date as an aware UTC datetime (no zone: UTC); a 400 naming `name` otherwise."""
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        # Normalised to UTC here, so an offset that pushes it past year 1..9999 is a 400, not a driver error.
        return value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise invalid(f"{name} must be an ISO-8601 timestamp such as 2026-03-01T00:00:00Z", name) from None


def _query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name) or None
    if value is not None and len(value) > _MAX_FILTER:
        raise invalid(f"{name} is longer than {_MAX_FILTER} characters", name)
    return value


def _query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise invalid(f"{name} must be true or false", name)
    return raw in ("true", "1")


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


@requires_key
async def list_requests(request: web.Request) -> web.Response:
    key = request[API_KEY]
    where = requests_log.RequestFilter(
        account_id=key.account_id,
        created_after=query_time(request, "created_after"),
        created_before=query_time(request, "created_before"),
        model=_query_text(request, "model"),
        key_id=_query_text(request, "key_id"),
        status=_query_text(request, "status"),
        client_request_id=_query_text(request, "client_request_id"),
        generation_id=_query_text(request, "generation_id"),
        provider=_query_text(request, "provider"),
    )
    limit = query_int(request, "limit", default=50, low=1, high=500)
    cursor = request.query.get("cursor") or None
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
    if _query_bool(request, "summary"):
        summary = await requests_log.summarize(pool, where)
        body["summary"] = {
            "count": summary["count"],
            "total_cost_micros": summary["cost_micros"],
            "total_cost": format_usd(summary["cost_micros"]),
            "currency": "usd",
        }
    return json_response(body)


@requires_key
async def get_request(request: web.Request) -> web.Response:
    request_id = request.match_info["request_id"]
    row = await requests_log.get_request(
        request.app[POOL], account_id=request[API_KEY].account_id, request_id=request_id
    )
    if row is None:
        raise not_found(f"No request with id {request_id!r}")
    return json_response(render_record(row))


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
