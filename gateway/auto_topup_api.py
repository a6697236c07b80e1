"""Auto top-up rules over HTTP (issue 16): a customer key reads and writes its account's rule at
`/v1/billing/auto-topup`, an admin any account's at `/admin/accounts/{id}/auto-topup`. What a rule does, and when it
fires, is billing.auto_topup's; this module parses, checks the amounts against the [stripe] bounds and renders.
Stripe off: the customer's routes and the admin's PUT answer 503 (a rule could only fire into nothing).
"""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from billing import auto_topup
from billing.errors import InvalidRule
from gateway import wire
from gateway.auth import requires_key
from gateway.bodies import read_model
from gateway.contract import INVALID, NOT_FOUND, operation
from gateway.errors import invalid
from gateway.keys import API_KEY, POOL, SETTINGS
from gateway.payments_api import STRIPE_OFF, secret_key
from gateway.render import json_response

admin_routes = web.RouteTableDef()


class RuleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool
    # Whole cents (10,000 micros); the amount within [stripe] min_amount_usd and max_amount_usd.
    threshold_micros: Annotated[StrictInt, Field(ge=0, le=10**15)]
    amount_micros: Annotated[StrictInt, Field(gt=0, le=10**15)]
    # A Stripe PaymentMethod of the account's Stripe customer; omitted: the saved one is kept.
    payment_method: Annotated[StrictStr, Field(pattern=r"^pm_[A-Za-z0-9_]{1,200}$")] | None = None


def render_rule(account_id: str, row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"object": "auto_topup", "account_id": account_id, "enabled": False, "threshold_micros": None,
                "amount_micros": None, "payment_method": None, "failures": 0, "disabled_reason": None,
                "disabled_at": None}
    return {"object": "auto_topup", "account_id": account_id, "enabled": row["enabled"],
            "threshold_micros": row["threshold_micros"], "amount_micros": row["amount_micros"],
            "payment_method": row["payment_method"], "failures": row["failures"],
            "disabled_reason": row["disabled_reason"], "disabled_at": row["disabled_at"]}


async def _read(request: web.Request, account_id: str) -> web.Response:
    row = await auto_topup.get_rule(request.config_dict[POOL], account_id)
    return json_response(render_rule(account_id, row))


async def _write(request: web.Request, account_id: str) -> web.Response:
    config = request.config_dict[SETTINGS].stripe
    secret_key(config)
    body = await read_model(request, RuleBody)
    try:
        auto_topup.check_rule(threshold_micros=body.threshold_micros, amount_micros=body.amount_micros,
                              min_usd=config.min_amount_usd, max_usd=config.max_amount_usd)
        row = await auto_topup.set_rule(request.config_dict[POOL], account_id, enabled=body.enabled,
                                        threshold_micros=body.threshold_micros, amount_micros=body.amount_micros,
                                        payment_method=body.payment_method)
    except InvalidRule as exc:
        raise invalid(str(exc), exc.field) from None
    return json_response(render_rule(account_id, row))


@operation("This account's auto top-up rule", answer=wire.AutoTopup, errors=(STRIPE_OFF,))
@requires_key
async def get_rule(request: web.Request) -> web.Response:
    secret_key(request.app[SETTINGS].stripe)
    return await _read(request, request[API_KEY].account_id)


@operation("Set this account's auto top-up rule: below the threshold, charge the saved card for the amount",
           body=RuleBody, answer=wire.AutoTopup, errors=(INVALID, STRIPE_OFF))
@requires_key
async def put_rule(request: web.Request) -> web.Response:
    return await _write(request, request[API_KEY].account_id)


@operation("An account's auto top-up rule", answer=wire.AutoTopup, errors=(NOT_FOUND,))
@admin_routes.get("/accounts/{account_id}/auto-topup")
async def admin_get_rule(request: web.Request) -> web.Response:
    return await _read(request, request.match_info["account_id"])


@operation("Set an account's auto top-up rule (and its payment method)", body=RuleBody, answer=wire.AutoTopup,
           errors=(INVALID, NOT_FOUND, STRIPE_OFF))
@admin_routes.put("/accounts/{account_id}/auto-topup")
async def admin_put_rule(request: web.Request) -> web.Response:
    return await _write(request, request.match_info["account_id"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/billing/auto-topup", get_rule)
    app.router.add_put("/v1/billing/auto-topup", put_rule)
