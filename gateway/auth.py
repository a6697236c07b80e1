"""Authentication: customer API keys for consumer routes, the admin token for /admin."""

from __future__ import annotations

import functools
import hmac
import math

from aiohttp import web

from billing import limits
from billing.keys import ApiKey
from gateway import logs
from gateway.bodies import header
from gateway.errors import REQUEST_ID, REQUEST_ID_HEADER, ApiError, Handler, unauthenticated
from gateway.keys import API_KEY, KEY_STORE, POOL, SETTINGS

RATE_HEADERS = web.RequestKey("rate_headers", dict[str, str])


def bearer(request: web.Request) -> str | None:
    scheme, _, token = (header(request, "Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: web.Request) -> ApiKey:
    token = bearer(request)
    if token is None:
        raise unauthenticated("Missing API key: send it as 'Authorization: Bearer <key>'")
    key = await request.app[KEY_STORE].authenticate(token)
    if key is None:
        raise unauthenticated("Invalid API key: it is malformed, unknown or revoked")
    if key.rpm_limit is not None or key.rpd_limit is not None:
        decision = await limits.count_request(
            request.app[POOL], key.id, rpm_limit=key.rpm_limit, rpd_limit=key.rpd_limit
        )
        if not decision.allowed:
            raise rate_limited(key, decision)
        request[RATE_HEADERS] = rate_headers(key, decision)[0]
    request[API_KEY] = key
    logs.bind(account_id=key.account_id, key_id=key.id)
    return key


def rate_headers(key: ApiKey, decision: limits.RateDecision) -> tuple[dict[str, str], list[float]]:
    """lumyx's X-RateLimit-*-Minute/-Day headers for the key's limits, and the seconds until each exhausted
    window resets."""
    headers: dict[str, str] = {}
    waits: list[float] = []
    for suffix, limit, count, reset in (
        ("Minute", key.rpm_limit, decision.minute_count, decision.minute_reset),
        ("Day", key.rpd_limit, decision.day_count, decision.day_reset),
    ):
        if limit is None:
            continue
        used = count or 0
        headers[f"X-RateLimit-Limit-{suffix}"] = str(limit)
        headers[f"X-RateLimit-Remaining-{suffix}"] = str(max(limit - used, 0))
        headers[f"X-RateLimit-Reset-{suffix}"] = str(int(reset.timestamp()))
        if used >= limit:
            waits.append((reset - decision.at).total_seconds())
    return headers, waits


def rate_limited(key: ApiKey, decision: limits.RateDecision) -> ApiError:
    """429 with the rate headers; Retry-After is when the refusing window resets."""
    headers, waits = rate_headers(key, decision)
    retry_after = max(1, math.ceil(max(waits, default=1.0)))
    headers["Retry-After"] = str(retry_after)
    return ApiError(
        429, "RATE_LIMITED",
        f"Rate limit reached for this API key; retry after {retry_after} seconds",
        type="rate_limit_error", headers=headers,
    )


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare, so streamed responses get them too (headers go out when a response is prepared):
    every response carries its request's X-Request-Id, and an admitted request of a rate-limited key tells the
    client where it stands."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id
    headers = request.get(RATE_HEADERS)
    if headers:
        response.headers.update(headers)


_KEYED: set[Handler] = set()


def requires_key(handler: Handler) -> Handler:
    """Consumer handlers: authenticate the customer key first; the handler reads it from request[API_KEY]."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        await authenticate(request)
        return await handler(request)

    _KEYED.add(wrapper)
    return wrapper


def needs_key(handler: object) -> bool:
    """Whether `handler` authenticates a customer key (`requires_key`): the OpenAPI document's security."""
    return handler in _KEYED


def check_admin(request: web.Request) -> None:
    """`Authorization: Bearer $METERLINE_ADMIN_TOKEN`, compared in constant time, or a 401 (every /admin route,
    and /metrics on the API's port)."""
    configured = request.config_dict[SETTINGS].admin_token
    token = bearer(request)
    if configured is None or not configured.get_secret_value():
        raise unauthenticated("The admin API is disabled: no admin token is configured")
    if token is None or not hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        raise unauthenticated("Invalid admin token")


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /admin route: the admin token."""
    check_admin(request)
    return await handler(request)
