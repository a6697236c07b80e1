"""Consumer routes that concern the account itself (its balance), under /v1 and /openai/v1."""

from __future__ import annotations

from aiohttp import web

from billing import grants
from gateway import wire
from gateway.auth import requires_key
from gateway.contract import operation
from gateway.keys import API_KEY, POOL
from gateway.render import json_response, usd_number

CONSUMER_PREFIXES = ("/v1", "/openai/v1")


@operation("The account's balance: available (balance less holds), balance and held, its paid and promotional "
           "credit and when credit next expires", answer=wire.Balance)
@requires_key
async def balance(request: web.Request) -> web.Response:
    row = await grants.balance_parts(request.app[POOL], request[API_KEY].account_id)
    expiry = row["next_expiry_at"]
    return json_response({
        "object": "balance",
        "billing_type": "prepaid",
        "available": {"amount": usd_number(row["available_micros"]), "currency": "usd"},
        "available_micros": row["available_micros"],
        "balance_micros": row["balance_micros"],
        "held_micros": row["held_micros"],
        "paid_micros": row["paid_micros"],
        "promotional_micros": row["promotional_micros"],
        "next_expiry": None if expiry is None else {"at": expiry, "amount_micros": row["next_expiry_micros"]},
    })


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_get(f"{prefix}/balance", balance)
