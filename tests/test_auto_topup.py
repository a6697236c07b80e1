"""Auto top-up (issue 16): a charge that takes the available balance below an enabled rule's threshold records one
trigger in its own transaction (one in flight per account, however many charges cross at once), a worker creates
one off-session PaymentIntent per trigger at a fake Stripe on loopback (under an idempotency key derived from the
trigger, so a second run after a crash charges nothing more), its success credits once, a credit over the
threshold re-arms the rule, and three failures in a row disable it, saying why, with one webhook event."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import auto_topup, ledger, payments
from billing.verify import verify
from gateway.app import create_app
from gateway.auto_topup_worker import charge_triggers
from gateway.settings import Settings
from tests.conftest import admin_headers
from tests.factories import billed_request, make_customer
from tests.fakes.stripe import KEY_ENV, FakeStripe, stripe_on, with_stripe
from tests.test_cli import meterline

DOLLARS_10 = 10_000_000
THRESHOLD = 5_000_000
CARD = "pm_card_visa"


async def with_rule(pool: asyncpg.Pool, *, balance_micros: int = 6_000_000, amount_micros: int = DOLLARS_10,
                    threshold_micros: int = THRESHOLD) -> tuple[str, str]:
    account_id, secret = await make_customer(pool, balance_micros=balance_micros)
    await auto_topup.set_rule(pool, account_id, enabled=True, threshold_micros=threshold_micros,
                              amount_micros=amount_micros, payment_method=CARD)
    return account_id, secret


async def triggers(pool: asyncpg.Pool, account_id: str) -> list[tuple[str, int]]:
    rows = await pool.fetch("SELECT status, amount_micros FROM payments WHERE account_id = $1 AND kind = 'auto_topup'"
                            " ORDER BY created_at, id", account_id)
    return [(r["status"], r["amount_micros"]) for r in rows]


def intent_event(kind: str, account_id: str, payment_id: str, *, cents: int = 1000,
                 intent: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": intent or f"pi_{secrets.token_hex(8)}", "object": "payment_intent", "amount": cents,
        "amount_received": cents if kind == "payment_intent.succeeded" else 0, "currency": "usd",
        "status": "succeeded" if kind == "payment_intent.succeeded" else "requires_payment_method",
        "metadata": {"meterline_account_id": account_id, auto_topup.PAYMENT_METADATA: payment_id},
        "last_payment_error": None if kind == "payment_intent.succeeded" else {
            "type": "card_error", "code": "card_declined", "message": "Your card was declined."}}
    return {"id": f"evt_{secrets.token_hex(8)}", "object": "event", "type": kind, "data": {"object": obj}}


async def open_trigger(pool: asyncpg.Pool, account_id: str) -> str:
    payment_id: str = await pool.fetchval(
        "SELECT id FROM payments WHERE account_id = $1 AND kind = 'auto_topup' AND status = 'open'", account_id)
    return payment_id


async def test_twenty_concurrent_charges_crossing_the_threshold_record_one_trigger(pool: asyncpg.Pool) -> None:
    account_id, _ = await with_rule(pool)
    # 6.00 available; twenty charges of 0.10 take it to 4.00, the first below 5.00 is the eleventh.
    await asyncio.gather(*(billed_request(pool, account_id, hold_micros=100_000, cost_micros=100_000)
                           for _ in range(20)))
    assert await ledger.available_micros(pool, account_id) == 4_000_000
    assert await triggers(pool, account_id) == [("open", DOLLARS_10)]
    # Fired: further charges below the threshold record nothing more.
    await billed_request(pool, account_id, hold_micros=100_000, cost_micros=100_000)
    assert await triggers(pool, account_id) == [("open", DOLLARS_10)]
    assert await verify(pool) == []


async def test_an_account_without_a_rule_or_above_the_threshold_records_nothing(pool: asyncpg.Pool) -> None:
    plain, _ = await make_customer(pool, balance_micros=1_000_000)
    await billed_request(pool, plain, hold_micros=900_000, cost_micros=900_000)
    ruled, _ = await with_rule(pool)
    await billed_request(pool, ruled, hold_micros=1_000_000, cost_micros=1_000_000)  # to exactly 5.00: not below
    assert await triggers(pool, plain) == [] and await triggers(pool, ruled) == []
    assert await ledger.available_micros(pool, ruled) == THRESHOLD
    assert await verify(pool) == []


async def test_success_delivered_twice_credits_once_and_a_lifted_balance_re_arms_the_rule(pool: asyncpg.Pool) -> None:
    account_id, _ = await with_rule(pool)
    await billed_request(pool, account_id, hold_micros=2_000_000, cost_micros=2_000_000)
    payment_id = await open_trigger(pool, account_id)
    event = intent_event("payment_intent.succeeded", account_id, payment_id)
    first, second = await asyncio.gather(auto_topup.apply_event(pool, event), auto_topup.apply_event(pool, event))
    assert sorted([first.action, second.action]) == ["credited", "ignored"]
    assert await ledger.available_micros(pool, account_id) == 4_000_000 + DOLLARS_10
    assert await triggers(pool, account_id) == [("paid", DOLLARS_10)]
    # 14.00 is over the threshold: re-armed, so the next crossing fires again.
    await billed_request(pool, account_id, hold_micros=9_500_000, cost_micros=9_500_000)
    assert await ledger.available_micros(pool, account_id) == 4_500_000
    assert await triggers(pool, account_id) == [("paid", DOLLARS_10), ("open", DOLLARS_10)]
    assert await verify(pool) == []


async def test_three_failures_in_a_row_disable_the_rule_with_one_event(pool: asyncpg.Pool) -> None:
    account_id, _ = await with_rule(pool, balance_micros=5_500_000)
    for attempt in range(1, 4):
        await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
        payment_id = await open_trigger(pool, account_id)
        event = intent_event("payment_intent.payment_failed", account_id, payment_id)
        assert (await auto_topup.apply_event(pool, event)).action == "failed"
        assert (await auto_topup.apply_event(pool, event)).action == "ignored"  # delivered again: once
        rule = await auto_topup.get_rule(pool, account_id)
        assert rule is not None and (rule["failures"], rule["enabled"]) == (attempt, attempt < 3)
    assert rule["disabled_reason"] == "3 auto top-ups in a row failed; the last: card_declined"
    assert rule["disabled_at"] is not None
    # Disabled: a further charge records no trigger.
    await billed_request(pool, account_id, hold_micros=500_000, cost_micros=500_000)
    assert await triggers(pool, account_id) == [("failed", DOLLARS_10)] * 3
    assert await ledger.available_micros(pool, account_id) == 2_000_000
    counts = await pool.fetch("SELECT type, count(*) AS n FROM webhook_events WHERE account_id = $1"
                              " AND type LIKE 'auto_topup.%' GROUP BY type ORDER BY type", account_id)
    assert [(r["type"], r["n"]) for r in counts] == [("auto_topup.disabled", 1), ("auto_topup.failed", 3)]
    assert await verify(pool) == []


async def test_a_success_resets_the_failures_in_a_row(pool: asyncpg.Pool) -> None:
    account_id, _ = await with_rule(pool, balance_micros=5_200_000)
    for _ in range(2):
        await billed_request(pool, account_id, hold_micros=500_000, cost_micros=500_000)
        payment_id = await open_trigger(pool, account_id)
        event = intent_event("payment_intent.payment_failed", account_id, payment_id)
        assert (await auto_topup.apply_event(pool, event)).action == "failed"
    assert (await auto_topup.get_rule(pool, account_id) or {}).get("failures") == 2
    await billed_request(pool, account_id, hold_micros=500_000, cost_micros=500_000)
    payment_id = await open_trigger(pool, account_id)
    assert (await auto_topup.apply_event(
        pool, intent_event("payment_intent.succeeded", account_id, payment_id))).amount_micros == DOLLARS_10
    rule = await auto_topup.get_rule(pool, account_id)
    assert rule is not None and (rule["failures"], rule["enabled"]) == (0, True)
    assert await ledger.available_micros(pool, account_id) == 3_700_000 + DOLLARS_10
    assert await verify(pool) == []


# The gateway's own loop is slowed to once an hour: the tests run the worker's tick themselves.
@pytest.fixture
def stripe_settings(settings: Settings, stripe_server: TestServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    stripe_on(monkeypatch)
    return with_stripe(settings, stripe_server, auto_topup_poll_seconds=3600)


@pytest.fixture
async def gateway(aiohttp_client: Any, stripe_settings: Settings, pool: asyncpg.Pool) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(stripe_settings))
    return client


async def customer_with_rule(pool: asyncpg.Pool, **rule: Any) -> tuple[str, str]:
    account_id, secret = await with_rule(pool, **rule)
    await payments.link_customer(pool, account_id, "cus_autotopup")
    return account_id, secret


async def deliver(gateway: TestClient, fake_stripe: FakeStripe, event: dict[str, Any]) -> dict[str, Any]:
    signed = fake_stripe.sign(event)
    response = await gateway.post("/webhooks/stripe", data=signed.payload,
                                  headers={"Content-Type": "application/json", "Stripe-Signature": signed.header})
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_the_worker_creates_one_off_session_intent_for_twenty_crossing_charges_and_it_credits_once(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, _ = await customer_with_rule(pool)
    await asyncio.gather(*(billed_request(pool, account_id, hold_micros=100_000, cost_micros=100_000)
                           for _ in range(20)))
    assert await asyncio.gather(charge_triggers(gateway.app), charge_triggers(gateway.app)) in ([1, 0], [0, 1])
    assert await charge_triggers(gateway.app) == 0  # nothing left to charge
    (intent,) = fake_stripe.intents.values()
    payment_id = await open_trigger(pool, account_id)
    assert (intent["amount"], intent["currency"], intent["customer"], intent["payment_method"]) == (
        1000, "usd", "cus_autotopup", CARD)
    assert (intent["off_session"], intent["confirm"]) == ("true", "true")
    assert intent["metadata"] == {"meterline_account_id": account_id, "meterline_payment_id": payment_id}
    assert fake_stripe.intent_requests[0]["idempotency_key"] == f"meterline-auto-topup-{payment_id}"
    assert await pool.fetchval("SELECT payment_intent FROM payments WHERE id = $1", payment_id) == intent["id"]
    event = fake_stripe.intent_event(intent["id"])
    answers = await asyncio.gather(deliver(gateway, fake_stripe, event), deliver(gateway, fake_stripe, event))
    assert sorted((a["action"], a["amount_micros"]) for a in answers) == [("credited", DOLLARS_10), ("ignored", 0)]
    assert await ledger.available_micros(pool, account_id) == 4_000_000 + DOLLARS_10
    assert await triggers(pool, account_id) == [("paid", DOLLARS_10)]
    assert await verify(pool) == []


async def test_a_second_worker_run_after_stripe_accepted_the_intent_charges_nothing_more(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, _ = await customer_with_rule(pool)
    await billed_request(pool, account_id, hold_micros=2_000_000, cost_micros=2_000_000)
    assert await charge_triggers(gateway.app) == 1
    # The crash: Stripe accepted the intent, but its id never reached the database.
    await pool.execute("UPDATE payments SET payment_intent = NULL WHERE account_id = $1", account_id)
    assert await charge_triggers(gateway.app) == 1
    assert len(fake_stripe.intent_requests) == 2 and len(fake_stripe.intents) == 1
    assert fake_stripe.intent_requests[0]["idempotency_key"] == fake_stripe.intent_requests[1]["idempotency_key"]
    (intent,) = fake_stripe.intents.values()
    payment_id = await open_trigger(pool, account_id)
    assert await pool.fetchval("SELECT payment_intent FROM payments WHERE id = $1", payment_id) == intent["id"]
    assert (await deliver(gateway, fake_stripe, fake_stripe.intent_event(intent["id"])))["action"] == "credited"
    assert await ledger.available_micros(pool, account_id) == 4_000_000 + DOLLARS_10
    assert await verify(pool) == []


async def test_card_errors_and_an_asynchronous_failure_count_three_in_a_row_and_disable_the_rule(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, _ = await customer_with_rule(pool, balance_micros=5_500_000)
    fake_stripe.intent_outcome = "card_error"
    for _ in range(2):
        await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
        assert await charge_triggers(gateway.app) == 1
    fake_stripe.intent_outcome = "async_fail"
    await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
    assert await charge_triggers(gateway.app) == 1
    (processing,) = [i for i in fake_stripe.intents.values() if i["status"] == "processing"]
    answer = await deliver(gateway, fake_stripe, fake_stripe.intent_event(processing["id"]))
    assert (answer["action"], answer["reason"]) == ("failed", "card_declined")
    rule = await auto_topup.get_rule(pool, account_id)
    assert rule is not None and (rule["enabled"], rule["failures"]) == (False, 3)
    assert rule["disabled_reason"] == "3 auto top-ups in a row failed; the last: card_declined"
    assert await pool.fetchval("SELECT count(*) FROM webhook_events WHERE type = 'auto_topup.disabled'") == 1
    assert await triggers(pool, account_id) == [("failed", DOLLARS_10)] * 3
    assert await ledger.available_micros(pool, account_id) == 2_500_000
    assert await verify(pool) == []


async def test_the_worker_charges_nothing_while_stripe_is_off(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, _ = await customer_with_rule(pool)
    await billed_request(pool, account_id, hold_micros=2_000_000, cost_micros=2_000_000)
    monkeypatch.delenv(KEY_ENV)
    assert await charge_triggers(gateway.app) == 0
    assert fake_stripe.intent_requests == [] and await triggers(pool, account_id) == [("open", DOLLARS_10)]
    assert await verify(pool) == []


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_the_admin_sets_the_rule_and_its_card_and_the_customer_sees_it_disabled_after_three_failures(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=5_500_000)
    await payments.link_customer(pool, account_id, "cus_autotopup")
    rule = {"enabled": True, "threshold_micros": THRESHOLD, "amount_micros": DOLLARS_10, "payment_method": CARD}
    response = await gateway.put(f"/admin/accounts/{account_id}/auto-topup", json=rule, headers=admin_headers())
    assert response.status == 200, await response.text()
    assert {k: (await response.json())[k] for k in rule} == rule
    # The customer changes the threshold; the saved card is kept.
    response = await gateway.put("/v1/billing/auto-topup", headers=bearer(secret),
                                 json={"enabled": True, "threshold_micros": 5_010_000, "amount_micros": DOLLARS_10})
    assert response.status == 200, await response.text()
    assert (await response.json())["payment_method"] == CARD
    fake_stripe.intent_outcome = "card_error"
    for _ in range(3):
        await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
        assert await charge_triggers(gateway.app) == 1
    shown = await (await gateway.get("/v1/billing/auto-topup", headers=bearer(secret))).json()
    assert (shown["enabled"], shown["failures"]) == (False, 3)
    assert shown["disabled_reason"] == "3 auto top-ups in a row failed; the last: card_declined"
    admin = await (await gateway.get(f"/admin/accounts/{account_id}/auto-topup", headers=admin_headers())).json()
    assert admin == shown and admin["disabled_at"] is not None
    listed = (await (await gateway.get("/v1/billing/payments", headers=bearer(secret))).json())["data"]
    assert [(p["kind"], p["status"], p["failure"]) for p in listed] == [("auto_topup", "failed", "card_declined")] * 3
    assert await ledger.available_micros(pool, account_id) == 2_500_000
    assert await verify(pool) == []


@pytest.mark.parametrize(("change", "param"), [
    ({"threshold_micros": -1}, "threshold_micros"),
    ({"threshold_micros": 5_000_001}, "threshold_micros"),
    ({"amount_micros": 10_000_001}, "amount_micros"),
    ({"amount_micros": 9_990_000}, "amount_micros"),
    ({"amount_micros": 10_000_010_000}, "amount_micros"),
    ({"enabled": "yes"}, "enabled"),
    ({"payment_method": "card 4242"}, "payment_method"),
], ids=["negative-threshold", "threshold-not-whole-cents", "amount-not-whole-cents", "amount-below-minimum",
        "amount-above-maximum", "enabled-not-boolean", "payment-method-not-an-id"])
async def test_a_bad_rule_is_refused_naming_the_field(
    gateway: TestClient, pool: asyncpg.Pool, change: dict[str, Any], param: str
) -> None:
    account_id, secret = await make_customer(pool)
    body = {"enabled": True, "threshold_micros": THRESHOLD, "amount_micros": DOLLARS_10, "payment_method": CARD}
    response = await gateway.put("/v1/billing/auto-topup", json=body | change, headers=bearer(secret))
    assert response.status == 400
    error = (await response.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert await auto_topup.get_rule(pool, account_id) is None


async def test_enabling_a_rule_without_a_card_is_refused_naming_the_payment_method(
    gateway: TestClient, pool: asyncpg.Pool
) -> None:
    account_id, secret = await make_customer(pool)
    response = await gateway.put("/v1/billing/auto-topup", headers=bearer(secret),
                                 json={"enabled": True, "threshold_micros": THRESHOLD, "amount_micros": DOLLARS_10})
    assert response.status == 400 and (await response.json())["error"]["param"] == "payment_method"
    assert await auto_topup.get_rule(pool, account_id) is None
    assert await pool.fetchval("SELECT auto_topup_micros FROM accounts WHERE id = $1", account_id) is None


async def test_the_rule_routes_answer_503_while_stripe_is_off(
    gateway: TestClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    account_id, secret = await make_customer(pool)
    monkeypatch.delenv(KEY_ENV)
    rule = {"enabled": True, "threshold_micros": THRESHOLD, "amount_micros": DOLLARS_10, "payment_method": CARD}
    answers = [await gateway.get("/v1/billing/auto-topup", headers=bearer(secret)),
               await gateway.put("/v1/billing/auto-topup", json=rule, headers=bearer(secret)),
               await gateway.put(f"/admin/accounts/{account_id}/auto-topup", json=rule, headers=admin_headers())]
    assert [r.status for r in answers] == [503, 503, 503]
    assert {(await r.json())["error"]["code"] for r in answers} == {"PAYMENTS_NOT_CONFIGURED"}
    assert await auto_topup.get_rule(pool, account_id) is None


async def test_the_cli_sets_and_shows_a_rule_and_refuses_a_bad_amount(pool: asyncpg.Pool, database_url: str) -> None:
    account_id, _ = await make_customer(pool)
    written = json.loads(meterline("auto-topup", "--account", account_id, "--enabled", "on", "--threshold-micros",
                                   str(THRESHOLD), "--amount-micros", str(DOLLARS_10), "--payment-method", CARD,
                                   database_url=database_url).stdout)
    assert (written["enabled"], written["threshold_micros"], written["amount_micros"], written["payment_method"]) == (
        True, THRESHOLD, DOLLARS_10, CARD)
    shown = json.loads(meterline("auto-topup", "--account", account_id, database_url=database_url).stdout)
    assert shown == written
    bad = meterline("auto-topup", "--account", account_id, "--enabled", "on", "--threshold-micros", "1",
                    "--amount-micros", str(DOLLARS_10), database_url=database_url, check=False)
    assert bad.returncode == 1 and "threshold_micros 1 is not a whole number of cents" in bad.stderr
    assert await pool.fetchval("SELECT auto_topup_micros FROM accounts WHERE id = $1", account_id) == THRESHOLD
    assert await verify(pool) == []


async def test_disabling_the_rule_drops_a_trigger_not_yet_sent_to_stripe(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, _ = await customer_with_rule(pool)
    await billed_request(pool, account_id, hold_micros=2_000_000, cost_micros=2_000_000)
    await auto_topup.set_rule(pool, account_id, enabled=False, threshold_micros=THRESHOLD, amount_micros=DOLLARS_10,
                              payment_method=None)
    assert await charge_triggers(gateway.app) == 0
    assert fake_stripe.intent_requests == [] and await triggers(pool, account_id) == [("failed", DOLLARS_10)]
    assert await pool.fetchval("SELECT auto_topup_micros FROM accounts WHERE id = $1", account_id) is None
    await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
    assert await triggers(pool, account_id) == [("failed", DOLLARS_10)]
    assert await ledger.available_micros(pool, account_id) == 3_000_000
    assert await verify(pool) == []


async def test_the_card_of_a_paid_checkout_is_saved_and_a_rule_without_one_charges_it(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=5_500_000)
    response = await gateway.post("/v1/billing/checkout", json={"amount_usd": "25.00"}, headers=bearer(secret))
    session = fake_stripe.sessions[(await response.json())["id"]]
    assert session["payment_intent_data_sent"] == {"metadata": {"meterline_account_id": account_id},
                                                   "setup_future_usage": "off_session"}
    rule = {"enabled": True, "threshold_micros": THRESHOLD, "amount_micros": DOLLARS_10}
    refused = await gateway.put("/v1/billing/auto-topup", json=rule, headers=bearer(secret))
    assert (refused.status, (await refused.json())["error"]["param"]) == (400, "payment_method")  # no card yet
    intent = {"id": "pi_checkout", "object": "payment_intent", "status": "succeeded", "amount_received": 2500,
              "currency": "usd", "customer": session["customer"], "payment_method": "pm_from_checkout",
              "metadata": {"meterline_account_id": account_id}}
    # Another customer's intent naming this account saves nothing.
    stranger = await deliver(gateway, fake_stripe, fake_stripe.event(
        "payment_intent.succeeded", {**intent, "customer": "cus_someone_else", "payment_method": "pm_stranger"}))
    assert stranger["action"] == "ignored"
    saved = await deliver(gateway, fake_stripe, fake_stripe.event("payment_intent.succeeded", intent))
    assert (saved["action"], saved["amount_micros"]) == ("saved", 0)  # its money came with the session
    response = await gateway.put("/v1/billing/auto-topup", json=rule, headers=bearer(secret))
    assert response.status == 200, await response.text()
    assert (await response.json())["payment_method"] == "pm_from_checkout"
    await billed_request(pool, account_id, hold_micros=1_000_000, cost_micros=1_000_000)
    assert await charge_triggers(gateway.app) == 1
    assert fake_stripe.intent_requests[-1]["payment_method"] == "pm_from_checkout"
    assert await ledger.available_micros(pool, account_id) == 4_500_000  # nothing moves before Stripe says so
    assert await verify(pool) == []
