"""Webhook endpoints over HTTP: a customer key manages its account's (under /v1 and /openai/v1), admins every
account's (under /admin). The signing secret is shown to its account only, and rotated with a grace period during
which the old one still signs.
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from billing import webhooks
from billing.webhooks import EndpointNotFound, EventNotFound
from gateway import wire
from gateway.auth import requires_key
from gateway.bodies import read_model
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import NOT_FOUND, Answer, operation
from gateway.errors import ApiError, invalid
from gateway.keys import API_KEY, POOL, SETTINGS
from gateway.params import TextParam, limit
from gateway.render import json_response
from gateway.webhook_worker import check_target

admin_routes = web.RouteTableDef()
_ATTEMPTS_LIMIT = limit(50, 500)
_ACCOUNT = TextParam("account_id", "Only this account's")
_CREATED = Answer(wire.WebhookEndpoint, status=201)


class NewEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Checked by check_target (https, and a public address unless webhook_allow_private_targets); the schema shows
    # the plain form of a public https URL.
    url: Annotated[StrictStr, Field(min_length=1, max_length=2000,
                                    json_schema_extra={"pattern": r"^https://[a-z0-9-]+(\.[a-z0-9-]+)+(/[a-z0-9/-]*)?$",
                                                       "examples": ["https://hooks.example.com/meterline"]})]
    # Checked against the known types by _create (naming the unknown ones); the schema lists them.
    events: Annotated[list[StrictStr], Field(min_length=1, max_length=len(webhooks.EVENT_TYPES) + 1,
                                             json_schema_extra={"items": {"enum": [*webhooks.EVENT_TYPES, "*"]}})]
    description: Annotated[StrictStr, Field(max_length=500)] | None = None


def render_endpoint(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "webhook_endpoint", "account_id": row["account_id"], "url": row["url"],
            "events": row["events"], "description": row["description"], "created_at": row["created_at"],
            "status": "disabled" if row["disabled_at"] else "enabled", "disabled_at": row["disabled_at"],
            "disabled_reason": row["disabled_reason"]}


def endpoint_not_found(endpoint_id: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"No webhook endpoint with id {endpoint_id!r}")


async def _create(request: web.Request, account_id: str) -> web.Response:
    body = await read_model(request, NewEndpoint)
    unknown = sorted(set(body.events) - {*webhooks.EVENT_TYPES, "*"})
    if unknown:
        raise invalid(f"unknown event types: {', '.join(unknown)} (known: {', '.join(webhooks.EVENT_TYPES)}, or *)",
                      "events")
    refused = check_target(body.url, allow_private=request.config_dict[SETTINGS].webhook_allow_private_targets)
    if refused is not None:
        raise invalid(refused, "url")
    row = await webhooks.create_endpoint(request.config_dict[POOL], account_id=account_id, url=body.url,
                                         events=sorted(set(body.events)), description=body.description)
    return json_response(render_endpoint(row), status=201)


async def _attempts(request: web.Request, account_id: str | None) -> web.Response:
    endpoint_id = request.match_info["endpoint_id"]
    try:
        rows = await webhooks.attempts(request.config_dict[POOL], endpoint_id, account_id=account_id,
                                       limit=_ATTEMPTS_LIMIT.read(request))
    except EndpointNotFound:
        raise endpoint_not_found(endpoint_id) from None
    return json_response({"object": "list", "data": [{"object": "webhook_attempt", **r} for r in rows]})


async def _delete(request: web.Request, account_id: str | None) -> web.Response:
    endpoint_id = request.match_info["endpoint_id"]
    try:
        await webhooks.delete_endpoint(request.config_dict[POOL], endpoint_id, account_id=account_id)
    except EndpointNotFound:
        raise endpoint_not_found(endpoint_id) from None
    return json_response({"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True})


@operation("Register a webhook endpoint for this account", body=NewEndpoint, answer=_CREATED)
@requires_key
async def create_endpoint(request: web.Request) -> web.Response:
    return await _create(request, request[API_KEY].account_id)


@operation("This account's webhook endpoints", answer=wire.WebhookEndpointList)
@requires_key
async def list_endpoints(request: web.Request) -> web.Response:
    rows = await webhooks.list_endpoints(request.app[POOL], account_id=request[API_KEY].account_id)
    return json_response({"object": "list", "data": [render_endpoint(r) for r in rows]})


@operation("Delete a webhook endpoint", answer=wire.Deleted, errors=(NOT_FOUND,))
@requires_key
async def delete_endpoint(request: web.Request) -> web.Response:
    return await _delete(request, request[API_KEY].account_id)


@operation("An endpoint's delivery attempts, newest first", query=(_ATTEMPTS_LIMIT,),
           answer=wire.WebhookAttemptList, errors=(NOT_FOUND,))
@requires_key
async def endpoint_attempts(request: web.Request) -> web.Response:
    return await _attempts(request, request[API_KEY].account_id)


@operation("This account's webhook signing secret", answer=wire.WebhookSecret)
@requires_key
async def secret(request: web.Request) -> web.Response:
    row = await webhooks.current_secret(request.app[POOL], request[API_KEY].account_id)
    return json_response({"object": "webhook_secret", **row})


@operation("Rotate the signing secret (the previous one signs on for a grace period)", answer=wire.WebhookSecret)
@requires_key
async def rotate_secret(request: web.Request) -> web.Response:
    grace = request.app[SETTINGS].webhook_secret_grace_seconds
    row = await webhooks.rotate_secret(request.app[POOL], request[API_KEY].account_id, grace_seconds=grace)
    return json_response({"object": "webhook_secret", **row, "previous_signs_for_seconds": grace})


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_post(f"{prefix}/webhooks", create_endpoint)
        app.router.add_get(f"{prefix}/webhooks", list_endpoints)
        app.router.add_get(f"{prefix}/webhooks/secret", secret)
        app.router.add_post(f"{prefix}/webhooks/secret/rotate", rotate_secret)
        app.router.add_delete(f"{prefix}/webhooks/{{endpoint_id}}", delete_endpoint)
        app.router.add_get(f"{prefix}/webhooks/{{endpoint_id}}/attempts", endpoint_attempts)


@operation("Every account's webhook endpoints", query=(_ACCOUNT,), answer=wire.WebhookEndpointList)
@admin_routes.get("/webhooks")
async def admin_list(request: web.Request) -> web.Response:
    rows = await webhooks.list_endpoints(request.config_dict[POOL], account_id=_ACCOUNT.read(request))
    return json_response({"object": "list", "data": [render_endpoint(r) for r in rows]})


@operation("Register a webhook endpoint for an account", body=NewEndpoint, answer=_CREATED, errors=(NOT_FOUND,))
@admin_routes.post("/accounts/{account_id}/webhooks")
async def admin_create(request: web.Request) -> web.Response:
    return await _create(request, request.match_info["account_id"])


@operation("Delete a webhook endpoint", answer=wire.Deleted, errors=(NOT_FOUND,))
@admin_routes.delete("/webhooks/{endpoint_id}")
async def admin_delete(request: web.Request) -> web.Response:
    return await _delete(request, None)


@operation("An endpoint's delivery attempts, newest first", query=(_ATTEMPTS_LIMIT,),
           answer=wire.WebhookAttemptList, errors=(NOT_FOUND,))
@admin_routes.get("/webhooks/{endpoint_id}/attempts")
async def admin_attempts(request: web.Request) -> web.Response:
    return await _attempts(request, None)


@operation("Deliver an event again to its endpoints", answer=Answer(wire.Replay, status=202), errors=(NOT_FOUND,))
@admin_routes.post("/webhook_events/{event_id}/replay")
async def admin_replay(request: web.Request) -> web.Response:
    event_id = request.match_info["event_id"]
    try:
        count = await webhooks.replay(request.config_dict[POOL], event_id)
    except EventNotFound:
        raise ApiError(404, "NOT_FOUND", f"No webhook event with id {event_id!r}") from None
    return json_response({"object": "webhook_event.replay", "event_id": event_id, "deliveries": count}, status=202)
