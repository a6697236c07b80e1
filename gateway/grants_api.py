"""Credit grants over HTTP (issue 16): admins grant paid or promotional credit (`POST /admin/accounts/{id}/grants`,
under an Idempotency-Key) and list an account's grants; a customer key lists its own at `/v1/billing/grants`. What a
grant is, and the order grants are spent in, is billing.grants'.
"""

from __future__ import annotations

from typing import Annotated, Literal

from aiohttp import web
from pydantic import AwareDatetime, ConfigDict, Field, StrictInt, StrictStr

from billing import grants
from billing.errors import InvalidRule
from billing.money import MAX_MICROS
from gateway import wire
from gateway.admin_common import IDEMPOTENCY_KEY, ONE_AMOUNT, Amount, Text, idempotency_key, page
from gateway.auth import requires_key
from gateway.bodies import read_model
from gateway.contract import IDEMPOTENCY_CONFLICT, INVALID, NOT_FOUND, Answer, operation
from gateway.errors import invalid
from gateway.keys import API_KEY, POOL
from gateway.params import CURSOR, limit
from gateway.render import json_response

admin_routes = web.RouteTableDef()
_LIMIT = limit(20, 100)
_GRANTED = Answer(wire.CreditGrant, status=201, headers={"Idempotent-Replayed": "true when this answers an earlier "
                                                                                 "request with the same key"})


class NewGrant(Amount):
    model_config = ConfigDict(json_schema_extra={
        **ONE_AMOUNT, "examples": [{"amount_usd": "5.00", "category": "promotional", "priority": 10,
                                    "expires_at": "2100-01-01T00:00:00Z", "description": "Welcome credit"}]})

    amount_micros: Annotated[StrictInt, Field(ge=1, le=MAX_MICROS)] | None = None
    amount_usd: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"^[0-9]{1,12}(\.[0-9]{1,6})?$",
                                                              "examples": ["5.00"]})] | None = None
    category: Literal["paid", "promotional"]
    priority: Annotated[StrictInt, Field(ge=0, le=100)] = grants.DEFAULT_PRIORITY
    # ISO-8601 with a UTC offset; effective_at omitted (or past): now. expires_at omitted: never.
    effective_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    description: Annotated[Text, Field(max_length=1000)] | None = None


@operation("Grant credit to an account: paid or promotional, with a priority, an effective time and an expiry",
           body=NewGrant, headers=(IDEMPOTENCY_KEY,), answer=_GRANTED,
           errors=(INVALID, NOT_FOUND, IDEMPOTENCY_CONFLICT))
@admin_routes.post("/accounts/{account_id}/grants")
async def create_grant(request: web.Request) -> web.Response:
    account_id = request.match_info["account_id"]
    idem = idempotency_key(request)
    body = await read_model(request, NewGrant)
    amount = body.micros()
    try:
        result, replayed = await grants.grant_once(
            request.config_dict[POOL], idempotency_key=idem, account_id=account_id, category=body.category,
            amount_micros=amount, priority=body.priority, effective_at=body.effective_at,
            expires_at=body.expires_at, description=body.description)
    except InvalidRule as exc:
        given_usd = exc.field == "amount_micros" and body.amount_usd is not None
        raise invalid(str(exc), "amount_usd" if given_usd else exc.field) from None
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return json_response(result, status=201, headers=headers)


async def _list(request: web.Request, account_id: str) -> web.Response:
    size = _LIMIT.read(request)
    rows = await grants.list_grants(request.config_dict[POOL], account_id, limit=size + 1,
                                    after=CURSOR.read(request))
    return json_response(page(rows, limit=size, cursor=rows[size - 1]["id"] if len(rows) > size else None))


@operation("An account's credit grants, newest first", query=(_LIMIT, CURSOR), answer=wire.CreditGrantList,
           errors=(NOT_FOUND,))
@admin_routes.get("/accounts/{account_id}/grants")
async def admin_grants(request: web.Request) -> web.Response:
    return await _list(request, request.match_info["account_id"])


@operation("This account's credit grants, newest first", query=(_LIMIT, CURSOR), answer=wire.CreditGrantList)
@requires_key
async def list_grants(request: web.Request) -> web.Response:
    return await _list(request, request[API_KEY].account_id)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/billing/grants", list_grants)
