"""The admin API under /admin: accounts, keys, top-ups, adjustments and ledger history."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StrictBool, StrictInt

from billing import accounts, keys, ledger, limits
from billing.money import MAX_MICROS
from gateway import auto_topup_api, conversations_api, grants_api, payments_api, webhooks_api, wire
from gateway.admin_common import IDEMPOTENCY_KEY, Amount, Name, StrictBody, Text, idempotency_key, page
from gateway.auth import admin_middleware
from gateway.bodies import read_model
from gateway.contract import IDEMPOTENCY_CONFLICT, INSUFFICIENT_BALANCE, NOT_FOUND, Answer, Body, operation
from gateway.errors import invalid
from gateway.finance import routes as finance_routes
from gateway.keys import KEY_STORE, POOL
from gateway.metrics import METRICS
from gateway.params import CURSOR, TextParam, limit
from gateway.render import json_response

routes = web.RouteTableDef()
# A ledger page's cursor is a transfer id: ASCII digits within bigint (str.isdigit would pass "²").
_LEDGER_CURSOR = re.compile(r"[0-9]{1,18}")
_ACCOUNTS_LIMIT = limit(20, 100)
_LEDGER_LIMIT = limit(50, 500)
_LEDGER_PAGE = TextParam("cursor", "next_cursor of the previous page (a transfer id)",
                         pattern=f"^{_LEDGER_CURSOR.pattern}$")
_POSTED = Answer(wire.Posting, status=201, headers={"Idempotent-Replayed": "true when this answers an earlier "
                                                                          "request with the same key"})



class CreateAccount(StrictBody):
    name: Name


class AccountSettings(StrictBody):
    low_balance_threshold_micros: Annotated[StrictInt, Field(ge=0, le=MAX_MICROS)] | None


class KeyLimits(StrictBody):
    """Per-key limits (issue 5); a field left out is unchanged, null clears it."""

    limit_micros: Annotated[StrictInt, Field(ge=0, le=MAX_MICROS)] | None = None
    limit_reset: Literal["daily", "weekly", "monthly"] | None = None
    rpm_limit: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    rpd_limit: Annotated[StrictInt, Field(ge=1, le=10_000)] | None = None

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set if name in limits.LIMIT_FIELDS}


class KeySettings(KeyLimits):
    """PATCH /admin/keys/{id}: limits, and Detailed Logging (stored conversations and memory)."""

    detailed_logging: StrictBool | None = None


class CreateKey(KeyLimits):
    name: Name | None = None
    detailed_logging: StrictBool = False




class Topup(Amount):
    description: Annotated[Text, Field(max_length=1000)] | None = None


class Adjustment(Amount):
    reason: Annotated[Text, Field(min_length=1, max_length=1000)]


def render_account(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "account",
        "name": row["name"],
        "balance_micros": row["balance_micros"],
        "held_micros": row["held_micros"],
        "available_micros": row["available_micros"],
        "low_balance_threshold_micros": row["low_balance_micros"],
        "created_at": row["created_at"],
    }


def render_key(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "api_key",
        "account_id": row["account_id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "created_at": row["created_at"],
        "revoked_at": row["revoked_at"],
        **{name: row.get(name) for name in limits.LIMIT_FIELDS},
        "detailed_logging": row["detailed_logging"],
    }




@operation("Create an account", body=CreateAccount, answer=Answer(wire.Account, status=201))
@routes.post("/accounts")
async def create_account(request: web.Request) -> web.Response:
    body = await read_model(request, CreateAccount)
    row = await accounts.create_account(request.config_dict[POOL], name=body.name)
    return json_response(render_account(row), status=201)


@operation("List accounts, oldest first", query=(_ACCOUNTS_LIMIT, CURSOR), answer=wire.AccountList)
@routes.get("/accounts")
async def list_accounts(request: web.Request) -> web.Response:
    limit = _ACCOUNTS_LIMIT.read(request)
    rows = await accounts.list_accounts(
        request.config_dict[POOL], limit=limit + 1, after=CURSOR.read(request)
    )
    data = [render_account(r) for r in rows]
    return json_response(page(data, limit=limit, cursor=data[limit - 1]["id"] if len(data) > limit else None))


@operation("One account", answer=wire.Account, errors=(NOT_FOUND,))
@routes.get("/accounts/{account_id}")
async def get_account(request: web.Request) -> web.Response:
    row = await accounts.get_account(request.config_dict[POOL], request.match_info["account_id"])
    return json_response(render_account(row))


@operation("Change an account's settings", body=AccountSettings, answer=wire.Account, errors=(NOT_FOUND,))
@routes.patch("/accounts/{account_id}")
async def update_account(request: web.Request) -> web.Response:
    """`{"low_balance_threshold_micros": n | null}`: a charge that takes the available balance below it sends a
    `balance.low` webhook, once until a credit lifts the balance back over it."""
    body = await read_model(request, AccountSettings)
    row = await accounts.set_low_balance(request.config_dict[POOL], request.match_info["account_id"],
                                         body.low_balance_threshold_micros)
    return json_response(render_account(row))


@operation("Create a key for an account (its secret is shown this once)",
           body=Body(CreateKey, required=False), answer=Answer(wire.NewApiKey, status=201), errors=(NOT_FOUND,))
@routes.post("/accounts/{account_id}/keys")
async def create_key(request: web.Request) -> web.Response:
    body = await read_model(request, CreateKey) if request.can_read_body else CreateKey()
    row, secret = await limits.create_key(request.config_dict[POOL], account_id=request.match_info["account_id"],
                                          name=body.name, detailed_logging=body.detailed_logging,
                                          changes=body.changes())
    return json_response({**render_key(row), "key": secret}, status=201)


@operation("Change a key's limits and Detailed Logging", body=KeySettings, answer=wire.ApiKey, errors=(NOT_FOUND,))
@routes.patch("/keys/{key_id}")
async def update_key(request: web.Request) -> web.Response:
    body = await read_model(request, KeySettings)
    key_id = request.match_info["key_id"]
    row = await limits.update_key(request.config_dict[POOL], key_id, body.changes(),
                                  detailed_logging=body.detailed_logging)
    request.config_dict[KEY_STORE].forget()
    return json_response(render_key(row))


@operation("An account's keys", answer=wire.ApiKeyList, errors=(NOT_FOUND,))
@routes.get("/accounts/{account_id}/keys")
async def list_keys(request: web.Request) -> web.Response:
    rows = await keys.list_keys(request.config_dict[POOL], request.match_info["account_id"])
    return json_response({"object": "list", "data": [render_key(r) for r in rows], "has_more": False})


@operation("Revoke a key (at once, in every process)", answer=wire.ApiKey, errors=(NOT_FOUND,))
@routes.delete("/keys/{key_id}")
async def revoke_key(request: web.Request) -> web.Response:
    row = await keys.revoke_key(request.config_dict[POOL], request.match_info["key_id"])
    request.config_dict[KEY_STORE].forget()
    return json_response(render_key(row))




async def _post(request: web.Request, *, kind: str, amount: int, description: str | None) -> web.Response:
    account_id = request.match_info["account_id"]
    idem = idempotency_key(request)
    result, replayed = await ledger.post_once(
        request.config_dict[POOL],
        idempotency_key=idem,
        fingerprint=ledger.request_fingerprint(kind, account_id, amount, description),
        account_id=account_id,
        kind=kind,
        amount_micros=amount,
        description=description,
    )
    if kind == "topup" and not replayed:
        request.config_dict[METRICS].topped_up(amount)
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return json_response({"object": kind, **result}, status=201, headers=headers)


@operation("Top up an account", body=Topup, headers=(IDEMPOTENCY_KEY,), answer=_POSTED,
           errors=(NOT_FOUND, IDEMPOTENCY_CONFLICT))
@routes.post("/accounts/{account_id}/topups")
async def topup(request: web.Request) -> web.Response:
    body = await read_model(request, Topup)
    amount = body.micros()
    if amount <= 0:
        raise invalid("A top-up must be a positive amount", "amount_micros")
    return await _post(request, kind="topup", amount=amount, description=body.description)


@operation("Correct an account's balance, up or down, with a reason", body=Adjustment, headers=(IDEMPOTENCY_KEY,),
           answer=_POSTED, errors=(NOT_FOUND, INSUFFICIENT_BALANCE, IDEMPOTENCY_CONFLICT))
@routes.post("/accounts/{account_id}/adjustments")
async def adjustment(request: web.Request) -> web.Response:
    body = await read_model(request, Adjustment)
    amount = body.micros()
    if amount == 0:
        raise invalid("An adjustment must not be zero", "amount_micros")
    return await _post(request, kind="adjustment", amount=amount, description=body.reason)


@operation("An account's ledger, newest first", query=(_LEDGER_LIMIT, _LEDGER_PAGE), answer=wire.LedgerPage,
           errors=(NOT_FOUND,))
@routes.get("/accounts/{account_id}/ledger")
async def account_ledger(request: web.Request) -> web.Response:
    limit = _LEDGER_LIMIT.read(request)
    cursor = _LEDGER_PAGE.read(request)
    if cursor is not None and not _LEDGER_CURSOR.fullmatch(cursor):
        raise invalid("cursor must be a next_cursor value from a previous page", "cursor")
    rows = await accounts.ledger_entries(
        request.config_dict[POOL], request.match_info["account_id"],
        limit=limit + 1, before_id=int(cursor) if cursor else None,
    )
    data = [{"object": "ledger_entry", **r} for r in rows]
    return json_response(page(data, limit=limit, cursor=str(data[limit - 1]["id"]) if len(data) > limit else None))


def admin_app() -> web.Application:
    app = web.Application(middlewares=[admin_middleware])
    app.add_routes(routes)
    app.add_routes(finance_routes)
    app.add_routes(conversations_api.admin_routes)
    app.add_routes(webhooks_api.admin_routes)
    app.add_routes(payments_api.admin_routes)
    app.add_routes(auto_topup_api.admin_routes)
    app.add_routes(grants_api.admin_routes)
    return app
