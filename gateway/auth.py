"""Authentication: customer API keys for consumer routes, the admin token for /admin."""

from __future__ import annotations

import functools
import hmac

from aiohttp import web

from billing.keys import ApiKey
from gateway.errors import Handler, unauthenticated
from gateway.keys import API_KEY, KEY_STORE, SETTINGS


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
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
    request[API_KEY] = key
    return key


def requires_key(handler: Handler) -> Handler:
    """Consumer handlers: authenticate the customer key first; the handler reads it from request[API_KEY]."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        await authenticate(request)
        return await handler(request)

    return wrapper


@web.middleware
async def admin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /admin route: `Authorization: Bearer $METERLINE_ADMIN_TOKEN`, compared in constant time."""
    configured = request.config_dict[SETTINGS].admin_token
    token = bearer(request)
    if configured is None or not configured.get_secret_value():
        raise unauthenticated("The admin API is disabled: no admin token is configured")
    if token is None or not hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        raise unauthenticated("Invalid admin token")
    return await handler(request)
