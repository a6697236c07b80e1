"""Stripe top-ups over HTTP (issue 16): a customer key opens a Checkout Session (`POST /v1/billing/checkout`) and
lists its payments; Stripe reports payments, refunds and disputes at `POST /webhooks/stripe`, verified by their
`Stripe-Signature`; admins list any account's payments. What each event does to the ledger is billing.payments'.

Stripe is reached with the `stripe` library on the gateway's one ClientSession (its aiohttp client), at
`[stripe] api_base`. Its errors are translated here once, into a 502 that names no secret: Stripe's own messages
are not relayed. Stripe is off while no secret key is set, and the webhook while no endpoint secret is: a 503 says
which variable to set.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import aiohttp
import stripe
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from billing import auto_topup, payments
from billing.errors import InvalidAmount
from gateway import wire
from gateway.auth import requires_key
from gateway.bodies import read_model
from gateway.contract import INVALID, NOT_FOUND, UPSTREAM_ERROR, Answer, Failure, operation
from gateway.errors import ApiError, invalid
from gateway.keys import API_KEY, HTTP, POOL, SETTINGS
from gateway.metrics import METRICS
from gateway.params import HeaderParam, limit
from gateway.render import json_response
from gateway.settings import Settings, StripeSettings

T = TypeVar("T")
admin_routes = web.RouteTableDef()
_LIMIT = limit(20, 100)
STRIPE_OFF = Failure(503, "PAYMENTS_NOT_CONFIGURED", "Stripe is not configured on this gateway (no secret key, or "
                     "for the webhook no endpoint secret); nothing is created or credited")
SIGNATURE_HEADER = "Stripe-Signature"
_SIGNATURE = HeaderParam(SIGNATURE_HEADER, "Stripe's signature of the body (t=timestamp,v1=HMAC-SHA256 with the "
                         "endpoint secret); checked before anything is read", required=True, where="header",
                         max_length=4000)


class NewCheckout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Whole cents, within [stripe] min_amount_usd and max_amount_usd (checked by billing.payments.checkout_cents,
    # which names the bounds); a string keeps the amount exact, an integer is whole dollars.
    amount_usd: Annotated[StrictStr, Field(json_schema_extra={"pattern": r"^[0-9]{1,9}(\.[0-9]{1,2})?$",
                                                              "examples": ["25.00"]})] | StrictInt


def _off(what: str, variable: str) -> ApiError:
    return ApiError(503, "PAYMENTS_NOT_CONFIGURED", f"{what} is not configured on this gateway: set the {variable} "
                    "environment variable", type="server_error")


def secret_key(config: StripeSettings) -> str:
    key = config.secret_key()
    if key is None:
        raise _off("Stripe", config.secret_key_env)
    return key


def _client(request: web.Request, config: StripeSettings, key: str) -> stripe.StripeClient:
    http = stripe.AIOHTTPClient(session=request.app[HTTP], timeout=aiohttp.ClientTimeout(total=config.timeout_seconds))
    return stripe.StripeClient(key, base_addresses={"api": config.api_base}, http_client=http, max_network_retries=0)


async def _stripe(call: Awaitable[T], doing: str) -> T:
    """Await a Stripe call; its errors become one 502 naming what failed and Stripe's status, not its message (which
    may quote request details)."""
    try:
        return await call
    except stripe.StripeError as exc:
        status = f"HTTP {exc.http_status}" if exc.http_status else "no answer"
        raise ApiError(502, "UPSTREAM_ERROR", f"Stripe could not {doing} ({status}); nothing was charged",
                       type="upstream_error") from None


def _return_url(settings: Settings, configured: str | None, outcome: str) -> str:
    return configured or f"{settings.base_url()}/?checkout={outcome}"


@operation("Pay by card: a Stripe Checkout Session that tops up this account once paid", body=NewCheckout,
           answer=Answer(wire.CheckoutSession, status=201), errors=(INVALID, UPSTREAM_ERROR, STRIPE_OFF))
@requires_key
async def checkout(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    config = settings.stripe
    key = secret_key(config)
    body = await read_model(request, NewCheckout)
    try:
        cents = payments.checkout_cents(body.amount_usd, min_usd=config.min_amount_usd, max_usd=config.max_amount_usd)
    except InvalidAmount as exc:
        raise invalid(str(exc), "amount_usd") from None
    account_id = request[API_KEY].account_id
    pool = request.app[POOL]
    client = _client(request, config, key)
    customer = await payments.stripe_customer(pool, account_id)
    if customer is None:
        # The idempotency key makes Stripe answer a retried or concurrent first checkout with the same customer,
        # and link_customer keeps the first link: one account, one customer.
        created = await _stripe(client.v1.customers.create_async(
            {"metadata": {payments.ACCOUNT_METADATA: account_id}},
            {"idempotency_key": f"meterline-customer-{account_id}"}), "create the customer")
        customer = await payments.link_customer(pool, account_id, created.id)
    session = await _stripe(client.v1.checkout.sessions.create_async({
        "mode": "payment",
        "customer": customer,
        "client_reference_id": account_id,
        "metadata": {payments.ACCOUNT_METADATA: account_id},
        # The card is saved to the customer for off-session use: auto top-up charges it (billing.auto_topup).
        "payment_intent_data": {"metadata": {payments.ACCOUNT_METADATA: account_id},
                                "setup_future_usage": "off_session"},
        "line_items": [{"quantity": 1, "price_data": {
            "currency": payments.CURRENCY, "unit_amount": cents,
            "product_data": {"name": "Meterline credit"}}}],
        "success_url": _return_url(settings, config.success_url, "success"),
        "cancel_url": _return_url(settings, config.cancel_url, "cancel"),
    }), "create the checkout session")
    if not session.url:
        raise ApiError(502, "UPSTREAM_ERROR", "Stripe created a checkout session without a URL", type="upstream_error")
    row = await payments.record_checkout(pool, account_id=account_id, session_id=session.id,
                                         amount_micros=payments.micros_of_cents(cents))
    return json_response({"object": "checkout_session", "id": session.id, "url": session.url,
                          "payment_id": row["id"], "amount_micros": row["amount_micros"]}, status=201)


def render_payment(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "payment", "account_id": row["account_id"], "kind": row["kind"],
            "status": row["status"], "session_id": row["session_id"], "failure": row["failure"],
            "amount_micros": row["amount_micros"],
            "paid_micros": row["paid_micros"], "refunded_micros": row["refunded_micros"],
            "disputed_micros": row["disputed_micros"], "transfer_id": row["transfer_id"],
            "created_at": row["created_at"], "completed_at": row["completed_at"]}


async def _payments(request: web.Request, account_id: str) -> web.Response:
    rows = await payments.list_payments(request.config_dict[POOL], account_id, limit=_LIMIT.read(request))
    return json_response({"object": "list", "data": [render_payment(r) for r in rows]})


@operation("This account's payments, newest first", query=(_LIMIT,), answer=wire.PaymentList)
@requires_key
async def list_payments(request: web.Request) -> web.Response:
    return await _payments(request, request[API_KEY].account_id)


@operation("Stripe's events (payments, refunds, disputes), verified by their Stripe-Signature",
           headers=(_SIGNATURE,), answer=wire.StripeEventReceipt, errors=(INVALID, STRIPE_OFF))
async def stripe_webhook(request: web.Request) -> web.Response:
    config = request.app[SETTINGS].stripe
    secret = config.webhook_secret()
    if secret is None:
        raise _off("The Stripe webhook", config.webhook_secret_env)
    payload = await request.read()
    signature = request.headers.get(SIGNATURE_HEADER)
    if not signature:
        raise invalid(f"the {SIGNATURE_HEADER} header is missing", SIGNATURE_HEADER)
    try:
        stripe.Webhook.construct_event(payload, signature, secret, tolerance=config.webhook_tolerance_seconds)
    except stripe.SignatureVerificationError:
        raise invalid(f"the {SIGNATURE_HEADER} header does not verify (a wrong secret, a changed body or a timestamp "
                      f"older than {config.webhook_tolerance_seconds} seconds)", SIGNATURE_HEADER) from None
    except ValueError:  # signed, but not a JSON object (UnicodeDecodeError is a ValueError too)
        raise invalid("the event is not valid JSON") from None
    event = json.loads(payload)  # verified and parsed above; billing reads Stripe's shapes as plain dicts
    if not isinstance(event, dict):
        raise invalid("the event is not a JSON object")
    if event.get("type") in auto_topup.EVENTS:
        outcome = await auto_topup.apply_event(request.app[POOL], event)
    else:
        outcome = await payments.apply_event(request.app[POOL], event)
    if outcome.action == "credited":
        request.app[METRICS].topped_up(outcome.amount_micros)
    return json_response({"object": "stripe_event", "id": event.get("id"), "action": outcome.action,
                          "amount_micros": outcome.amount_micros, "payment_id": outcome.payment_id,
                          "reason": outcome.reason})


@operation("An account's payments, newest first", query=(_LIMIT,), answer=wire.PaymentList, errors=(NOT_FOUND,))
@admin_routes.get("/accounts/{account_id}/payments")
async def admin_payments(request: web.Request) -> web.Response:
    return await _payments(request, request.match_info["account_id"])


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/billing/checkout", checkout)
    app.router.add_get("/v1/billing/payments", list_payments)
    app.router.add_post("/webhooks/stripe", stripe_webhook)
