"""A fake Stripe API on a real socket, for the `stripe` library pointed at it by `[stripe] api_base`: it creates
customers (honouring Idempotency-Key, as Stripe does) and Checkout Sessions, answering in Stripe's shapes, and
builds the events Stripe would send about them, signed with the library's own signing helper
(`stripe.WebhookSignature.generate_signature_header`), so the gateway verifies them as it would Stripe's."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.settings import Settings, StripeSettings

SECRET_KEY = "sk_test_fake_0123456789abcdef"
WEBHOOK_SECRET = "whsec_fake_0123456789abcdef"
KEY_ENV = "METERLINE_TEST_STRIPE_SECRET_KEY"
WEBHOOK_ENV = "METERLINE_TEST_STRIPE_WEBHOOK_SECRET"
_BRACKETS = re.compile(r"\[([^\]]*)\]")


def nested(form: dict[str, str]) -> dict[str, Any]:
    """Stripe's form encoding (`line_items[0][price_data][unit_amount]=2500`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for name, value in form.items():
        head = name.split("[", 1)[0]
        path = [head, *_BRACKETS.findall(name)]
        node: Any = root
        for part, following in itertools.pairwise(path):
            key: Any = int(part) if isinstance(node, list) else part
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:
                child = [] if following.isdigit() else {}
                node[key] = child
            node = child
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= int(last):
                node.append(None)
            node[int(last)] = value
        else:
            node[last] = value
    return root


@dataclass
class Signed:
    payload: str
    header: str


@dataclass
class FakeStripe:
    secret_key: str = SECRET_KEY
    webhook_secret: str = WEBHOOK_SECRET
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotent: dict[str, dict[str, Any]] = field(default_factory=dict)  # Idempotency-Key -> customer
    base: str = "http://127.0.0.1"
    # PaymentIntents (auto top-up): what a confirmed create does, `succeed`, `card_error` (declined at once, a 402)
    # or `async_fail` (accepted as processing; its payment_intent.payment_failed event comes later).
    intent_outcome: str = "succeed"
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    intent_requests: list[dict[str, Any]] = field(default_factory=list)  # every create, with its Idempotency-Key
    intent_answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # key -> replayed answer

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/customers", self.create_customer)
        app.router.add_post("/v1/checkout/sessions", self.create_session)
        app.router.add_post("/v1/payment_intents", self.create_intent)
        return app

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.secret_key}"

    @staticmethod
    def _refused() -> web.Response:
        return web.json_response({"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}},
                                 status=401)

    async def create_customer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        params = nested(dict(await request.post()))  # type: ignore[arg-type]
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self.idempotent:
            return web.json_response(self.idempotent[key])
        customer = {"id": f"cus_{secrets.token_hex(7)}", "object": "customer", "created": int(time.time()),
                    "metadata": params.get("metadata", {}), "livemode": False}
        self.customers[customer["id"]] = customer
        if key is not None:
            self.idempotent[key] = customer
        return web.json_response(customer)

    async def create_session(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        params = nested(dict(await request.post()))  # type: ignore[arg-type]
        items = params["line_items"]
        total = sum(int(item["price_data"]["unit_amount"]) * int(item["quantity"]) for item in items)
        session_id = f"cs_test_{secrets.token_hex(12)}"
        session = {
            "id": session_id, "object": "checkout.session", "mode": params["mode"], "status": "open",
            "payment_status": "unpaid", "amount_total": total, "amount_subtotal": total,
            "currency": items[0]["price_data"]["currency"], "customer": params.get("customer"),
            "client_reference_id": params.get("client_reference_id"), "metadata": params.get("metadata", {}),
            "payment_intent": None, "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "url": f"{self.base}/c/pay/{session_id}", "created": int(time.time()), "livemode": False,
            "line_items_sent": items,  # not Stripe's: what the test reads back
            "payment_intent_data_sent": params.get("payment_intent_data", {}),  # nor this
        }
        self.sessions[session_id] = session
        return web.json_response(session)

    async def create_intent(self, request: web.Request) -> web.Response:
        """A confirmed PaymentIntent, answered as `intent_outcome` says; a repeated Idempotency-Key gets the first
        answer again (Stripe replays it, errors included) and creates nothing."""
        if not self._authorized(request):
            return self._refused()
        params = nested(dict(await request.post()))  # type: ignore[arg-type]
        key = request.headers.get("Idempotency-Key")
        self.intent_requests.append({"idempotency_key": key, **params})
        if key is not None and key in self.intent_answers:
            status, answer = self.intent_answers[key]
            return web.json_response(answer, status=status)
        intent_id = f"pi_{secrets.token_hex(12)}"
        intent = {"id": intent_id, "object": "payment_intent", "amount": int(params["amount"]),
                  "amount_received": 0, "currency": params["currency"], "customer": params.get("customer"),
                  "payment_method": params.get("payment_method"), "metadata": params.get("metadata", {}),
                  "off_session": params.get("off_session"), "confirm": params.get("confirm"),
                  "status": "processing", "last_payment_error": None, "created": int(time.time()), "livemode": False}
        status, answer = 200, intent
        if self.intent_outcome == "card_error":
            intent["status"] = "requires_payment_method"
            error = {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds",
                     "message": "Your card has insufficient funds."}
            intent["last_payment_error"] = error
            status, answer = 402, {"error": {**error, "payment_intent": dict(intent)}}
        elif self.intent_outcome == "succeed":
            intent.update(status="succeeded", amount_received=intent["amount"])
        self.intents[intent_id] = intent
        if key is not None:
            self.intent_answers[key] = (status, answer)
        return web.json_response(answer, status=status)

    def intent_event(self, intent_id: str) -> dict[str, Any]:
        """The event Stripe sends about the intent: payment_intent.succeeded, or payment_failed for an intent
        that failed (asynchronously: it is marked failed now)."""
        intent = self.intents[intent_id]
        if intent["status"] == "processing":
            intent.update(status="requires_payment_method", last_payment_error={
                "type": "card_error", "code": "card_declined", "message": "Your card was declined."})
        kind = "payment_intent.succeeded" if intent["status"] == "succeeded" else "payment_intent.payment_failed"
        return self.event(kind, dict(intent))

    # Events, as Stripe would send them.

    def sign(self, event: dict[str, Any], *, timestamp: int | None = None, secret: str | None = None) -> Signed:
        payload = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload, secret or self.webhook_secret,
                                                                   timestamp=timestamp)
        return Signed(payload, header)

    @staticmethod
    def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"evt_{secrets.token_hex(12)}", "object": "event", "type": kind, "api_version": "2025-01-27",
                "created": int(time.time()), "livemode": False, "data": {"object": obj}}

    def session_paid(self, session_id: str, *, payment_status: str = "paid") -> dict[str, Any]:
        """The session as Stripe reports it once the customer completed checkout (`unpaid` for a delayed method)."""
        session = self.sessions[session_id]
        session.update(status="complete", payment_status=payment_status,
                       payment_intent=session["payment_intent"] or f"pi_{secrets.token_hex(12)}")
        return {k: v for k, v in session.items() if not k.endswith("_sent")}

    def charge(self, session_id: str, *, amount_refunded: int) -> dict[str, Any]:
        """The session's charge, with `amount_refunded` cents refunded so far (cumulative, as Stripe counts it)."""
        session = self.sessions[session_id]
        return {"id": f"ch_{session['payment_intent'][3:]}", "object": "charge", "amount": session["amount_total"],
                "amount_refunded": amount_refunded, "currency": session["currency"],
                "payment_intent": session["payment_intent"], "refunded": amount_refunded == session["amount_total"],
                "customer": session["customer"]}

    def dispute(self, session_id: str, *, status: str, amount: int | None = None) -> dict[str, Any]:
        session = self.sessions[session_id]
        return {"id": f"dp_{session['payment_intent'][3:]}", "object": "dispute",
                "amount": session["amount_total"] if amount is None else amount, "currency": session["currency"],
                "charge": f"ch_{session['payment_intent'][3:]}", "payment_intent": session["payment_intent"],
                "status": status, "reason": "fraudulent"}


@pytest.fixture
def fake_stripe() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
async def stripe_server(aiohttp_server: Any, fake_stripe: FakeStripe) -> TestServer:
    server: TestServer = await aiohttp_server(fake_stripe.app())
    fake_stripe.base = str(server.make_url("")).rstrip("/")
    return server


def with_stripe(settings: Settings, server: TestServer, **changes: Any) -> Settings:
    """`settings` with Stripe at the fake, its secrets read from test variables (set them to turn Stripe on)."""
    config = StripeSettings(api_base=str(server.make_url("")), secret_key_env=KEY_ENV, webhook_secret_env=WEBHOOK_ENV,
                            **changes)
    return settings.model_copy(update={"stripe": config})


def stripe_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET_KEY)
    monkeypatch.setenv(WEBHOOK_ENV, WEBHOOK_SECRET)
