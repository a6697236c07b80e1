"""The auto top-up worker: in every gateway process, a loop claims the recorded triggers (billing.auto_topup) with
FOR UPDATE SKIP LOCKED and creates each one's off-session PaymentIntent for the rule's amount, confirmed at once,
charging the saved payment method of the account's Stripe customer. The idempotency key is derived from the
trigger: a process that dies after Stripe accepted the intent, before the intent's id was recorded, leaves the
trigger open, and the next run is answered by Stripe with the same intent, not a second charge.

Stripe's answer: the intent's id is recorded, and the money moves when `payment_intent.succeeded` arrives at the
webhook; a card error (Stripe's 402) is a failure, recorded at once; any other error (Stripe down, a timeout)
leaves the trigger open for the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import stripe
from aiohttp import web

from billing import auto_topup
from billing.payments import ACCOUNT_METADATA, CURRENCY
from gateway.keys import HTTP, POOL, SETTINGS, TASKS
from gateway.tasks import every

log = logging.getLogger("meterline.auto_topup")

# Triggers charged per tick by one process (each is one call to Stripe while its row is locked).
BATCH = 10


async def charge_triggers(app: web.Application) -> int:
    """One tick: create the PaymentIntent of each open trigger this process could lock (billing.auto_topup owns the
    transaction; this side only calls Stripe); returns how many triggers got an answer from Stripe (an intent or a
    card error). Does nothing while Stripe is off."""
    config = app[SETTINGS].stripe
    key = config.secret_key()
    if key is None:
        return 0
    http = stripe.AIOHTTPClient(session=app[HTTP], timeout=aiohttp.ClientTimeout(total=config.timeout_seconds))
    client = stripe.StripeClient(key, base_addresses={"api": config.api_base}, http_client=http,
                                 max_network_retries=0)

    async def create(charge: auto_topup.Charge) -> auto_topup.Answer | None:
        trigger = charge.trigger
        try:
            intent = await client.v1.payment_intents.create_async({
                "amount": trigger.cents, "currency": CURRENCY, "customer": charge.customer,
                "payment_method": charge.payment_method, "off_session": True, "confirm": True,
                "description": "Meterline auto top-up",
                "metadata": {ACCOUNT_METADATA: trigger.account_id, auto_topup.PAYMENT_METADATA: trigger.payment_id},
            }, {"idempotency_key": trigger.idempotency_key})
        except stripe.CardError as exc:
            return auto_topup.Answer(refused=exc.code or "card_error")
        except stripe.StripeError as exc:
            log.warning("auto top-up %s: Stripe did not answer (HTTP %s); retrying on the next tick",
                        trigger.payment_id, exc.http_status)
            return None
        return auto_topup.Answer(intent_id=intent.id)

    return await auto_topup.charge_open(app[POOL], create, limit=BATCH)


async def auto_topup_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """One auto top-up loop per process. Needs the task owner and the HTTP session, so it goes after `tasks_ctx`."""
    loop = app[TASKS].background(
        every(app[SETTINGS].stripe.auto_topup_poll_seconds, lambda: charge_triggers(app), "auto top-up"),
        "auto-topup-worker")
    try:
        yield
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
