"""Stripe top-ups (issue 16) against a fake Stripe on loopback: a Checkout Session is created for the account with
the amount asked, its payment credits exactly once however Stripe delivers the event (repeated, concurrent, to two
gateway apps on one database), unverifiable events move nothing, and refunds and lost disputes post one `refund`
debit each that may overdraw the account, which then gets no new hold."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import ledger, payments, statements
from billing.errors import InsufficientBalance
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings, SettingsError, load_settings
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.conftest import ROOT, admin_headers
from tests.factories import make_customer, request_id
from tests.fakes.stripe import KEY_ENV, SECRET_KEY, WEBHOOK_ENV, WEBHOOK_SECRET, FakeStripe, stripe_on, with_stripe
from tests.fakes.upstream import FakeUpstream
from tests.metrics_support import value
from tests.serving import meterline_serve
from tests.test_cli import meterline
from tests.test_metrics import scrape

DOLLARS_25 = 25_000_000


@pytest.fixture
def stripe_settings(settings: Settings, stripe_server: TestServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    stripe_on(monkeypatch)
    return with_stripe(settings, stripe_server)


@pytest.fixture
async def gateway(aiohttp_client: Any, stripe_settings: Settings, pool: asyncpg.Pool) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(stripe_settings))
    return client


async def checkout(gateway: TestClient, secret: str, amount_usd: str | int = "25.00") -> dict[str, Any]:
    response = await gateway.post("/v1/billing/checkout", json={"amount_usd": amount_usd},
                                  headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def deliver(gateway: TestClient, payload: str, header: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Stripe-Signature": header} if header else {})
    response = await gateway.post("/webhooks/stripe", data=payload, headers=headers)
    return response.status, await response.json()


async def available(pool: asyncpg.Pool, account_id: str) -> int:
    return await ledger.available_micros(pool, account_id)


async def kinds(pool: asyncpg.Pool, account_id: str) -> list[tuple[str, int]]:
    """The account's transfers, oldest first, signed from the customer's side."""
    rows = await pool.fetch(
        "SELECT kind, CASE WHEN credit_account_id = account_id THEN amount_micros ELSE -amount_micros END AS amount"
        " FROM transfers WHERE account_id = $1 ORDER BY id", account_id)
    return [(r["kind"], r["amount"]) for r in rows]


async def test_a_checkout_creates_one_session_for_the_amount_with_the_account_in_its_metadata(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool)
    # Two first checkouts at once: one Stripe customer, linked once.
    first, second = await asyncio.gather(checkout(gateway, secret, "25.00"), checkout(gateway, secret, 10))
    assert len(fake_stripe.customers) == 1
    (customer_id,) = fake_stripe.customers
    assert await payments.stripe_customer(pool, account_id) == customer_id
    session = fake_stripe.sessions[first["id"]]
    assert session["mode"] == "payment"
    assert session["amount_total"] == 2500 and session["currency"] == "usd"
    assert session["line_items_sent"][0]["price_data"]["unit_amount"] == "2500"
    assert session["metadata"] == {"meterline_account_id": account_id}
    assert session["client_reference_id"] == account_id and session["customer"] == customer_id
    assert first["url"] == session["url"] and first["amount_micros"] == DOLLARS_25
    assert fake_stripe.sessions[second["id"]]["amount_total"] == 1000
    listed = await gateway.get("/v1/billing/payments", headers={"Authorization": f"Bearer {secret}"})
    assert listed.status == 200
    data = (await listed.json())["data"]
    assert sorted((p["session_id"], p["status"], p["amount_micros"], p["paid_micros"]) for p in data) == sorted(
        [(first["id"], "open", DOLLARS_25, None), (second["id"], "open", 10_000_000, None)])
    assert await available(pool, account_id) == 0  # nothing is credited before Stripe says it is paid
    assert await verify(pool) == []


async def test_a_completed_session_delivered_repeatedly_and_concurrently_to_two_apps_credits_once(
    gateway: TestClient, aiohttp_client: Any, stripe_settings: Settings, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    other: TestClient = await aiohttp_client(create_app(stripe_settings))  # a second gateway on the same database
    account_id, secret = await make_customer(pool, balance_micros=1_000)
    session = await checkout(gateway, secret)
    signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"])))
    status, body = await deliver(gateway, signed.payload, signed.header)
    assert (status, body["action"], body["amount_micros"]) == (200, "credited", DOLLARS_25)
    again = await asyncio.gather(*(deliver(app, signed.payload, signed.header) for app in (gateway, other) * 3))
    assert [(s, b["action"]) for s, b in again] == [(200, "ignored")] * 6
    assert await available(pool, account_id) == 1_000 + DOLLARS_25
    assert await kinds(pool, account_id) == [("topup", 1_000), ("topup", DOLLARS_25)]
    row = await pool.fetchrow("SELECT status, paid_micros, transfer_id, completed_at FROM payments")
    assert (row["status"], row["paid_micros"]) == ("paid", DOLLARS_25) and row["completed_at"] is not None
    assert row["transfer_id"] == await pool.fetchval("SELECT max(id) FROM transfers WHERE kind = 'topup'")
    # The top-up went through the ledger's posting: its webhook event was written with it.
    assert await pool.fetchval("SELECT count(*) FROM webhook_events WHERE type = 'topup.posted'") == 2
    assert await verify(pool) == []


async def test_the_first_deliveries_racing_each_other_across_two_apps_credit_once(
    gateway: TestClient, aiohttp_client: Any, stripe_settings: Settings, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    other: TestClient = await aiohttp_client(create_app(stripe_settings))
    account_id, secret = await make_customer(pool)
    session = await checkout(gateway, secret)
    signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"])))
    results = await asyncio.gather(*(deliver(app, signed.payload, signed.header) for app in (gateway, other) * 5))
    assert sorted(b["action"] for _, b in results) == ["credited"] + ["ignored"] * 9
    assert {s for s, _ in results} == {200}
    credited = [value((await scrape(app))[1], "meterline_topped_up_micros_total") for app in (gateway, other)]
    assert sum(credited) == DOLLARS_25  # the metric counts the credit once, in the app that posted it
    assert await available(pool, account_id) == DOLLARS_25
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25)]
    assert await verify(pool) == []


@pytest.mark.parametrize("fault", ["unsigned", "wrong secret", "changed body", "stale timestamp"])
async def test_an_unverifiable_event_is_400_and_moves_nothing(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe, fault: str
) -> None:
    account_id, secret = await make_customer(pool)
    session = await checkout(gateway, secret)
    event = fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"]))
    signed = fake_stripe.sign(event, secret="whsec_someone_else" if fault == "wrong secret" else None,
                              timestamp=int(time.time()) - 301 if fault == "stale timestamp" else None)
    payload = signed.payload.replace("2500", "250000") if fault == "changed body" else signed.payload
    status, body = await deliver(gateway, payload, None if fault == "unsigned" else signed.header)
    assert status == 400
    assert body["error"]["code"] == "INVALID_REQUEST" and body["error"]["param"] == "Stripe-Signature"
    assert WEBHOOK_SECRET not in str(body)
    assert await available(pool, account_id) == 0
    assert await pool.fetchval("SELECT status FROM payments") == "open"
    assert await verify(pool) == []


async def test_an_unpaid_completion_credits_nothing_and_its_async_success_credits_once(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool)
    session = await checkout(gateway, secret)
    unpaid = fake_stripe.sign(fake_stripe.event("checkout.session.completed",
                                                fake_stripe.session_paid(session["id"], payment_status="unpaid")))
    status, body = await deliver(gateway, unpaid.payload, unpaid.header)
    assert (status, body["action"], body["amount_micros"]) == (200, "ignored", 0)
    assert await available(pool, account_id) == 0
    succeeded = fake_stripe.sign(fake_stripe.event("checkout.session.async_payment_succeeded",
                                                   fake_stripe.session_paid(session["id"])))
    results = await asyncio.gather(*(deliver(gateway, succeeded.payload, succeeded.header) for _ in range(3)))
    assert sorted(b["action"] for _, b in results) == ["credited", "ignored", "ignored"]
    status, _ = await deliver(gateway, unpaid.payload, unpaid.header)  # the old unpaid event, late: still nothing
    assert status == 200
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25)]
    assert await verify(pool) == []


async def test_an_unknown_event_type_is_acknowledged_and_ignored(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, _ = await make_customer(pool, balance_micros=5)
    signed = fake_stripe.sign(fake_stripe.event("customer.created", {"id": "cus_x", "object": "customer"}))
    status, body = await deliver(gateway, signed.payload, signed.header)
    assert (status, body["action"], body["amount_micros"]) == (200, "ignored", 0)
    assert await kinds(pool, account_id) == [("topup", 5)]
    assert await verify(pool) == []


async def paid_session(gateway: TestClient, fake_stripe: FakeStripe, secret: str) -> str:
    session = await checkout(gateway, secret)
    signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"])))
    status, body = await deliver(gateway, signed.payload, signed.header)
    assert (status, body["action"]) == (200, "credited")
    return str(session["id"])


async def test_a_refund_of_spent_credit_overdraws_once_and_the_next_hold_is_refused_with_402(
    aiohttp_client: Any, stripe_settings: Settings, pool: asyncpg.Pool, fake_stripe: FakeStripe,
    aiohttp_server: Any, openrouter: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    upstream = await aiohttp_server(openrouter.app())
    gateway: TestClient = await aiohttp_client(create_app(point_at(stripe_settings, upstream)))
    account_id, secret = await make_customer(pool)
    session_id = await paid_session(gateway, fake_stripe, secret)
    # $20 of the $25 is spent before the refund.
    hold = request_id()
    await ledger.reserve(pool, request_id=hold, account_id=account_id, amount_micros=20_000_000, ttl_seconds=60)
    await ledger.settle(pool, request_id=hold, actual_micros=20_000_000)
    partial = fake_stripe.sign(fake_stripe.event("charge.refunded", fake_stripe.charge(session_id,
                                                                                       amount_refunded=1000)))
    full = fake_stripe.sign(fake_stripe.event("charge.refunded", fake_stripe.charge(session_id, amount_refunded=2500)))
    results = [await deliver(gateway, partial.payload, partial.header)]
    results += await asyncio.gather(*(deliver(gateway, s.payload, s.header) for s in (full, full, partial)))
    assert [(b["action"], b["amount_micros"]) for _, b in results] == [
        ("reversed", -10_000_000), ("reversed", -15_000_000), ("ignored", 0), ("ignored", 0)]
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25), ("charge", -20_000_000),
                                              ("refund", -10_000_000), ("refund", -15_000_000)]
    assert await available(pool, account_id) == -20_000_000
    # The part of the refunds that was already spent is recorded as overrun: the ledger stays sound.
    assert await pool.fetchval("SELECT sum(overrun_micros) FROM transfers WHERE kind = 'refund'") == 20_000_000
    with pytest.raises(InsufficientBalance):
        await ledger.reserve(pool, request_id=request_id(), account_id=account_id, amount_micros=0, ttl_seconds=60)
    answer = await gateway.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                                headers={"Authorization": f"Bearer {secret}"})
    assert answer.status == 402
    assert (await answer.json())["error"]["available_micros"] == -20_000_000
    assert openrouter.calls["chat"] == 0
    row = await pool.fetchrow("SELECT paid_micros, refunded_micros FROM payments")
    assert tuple(row) == (DOLLARS_25, DOLLARS_25)
    # The statement ties out across the overdraft: 0 + 25 credited - (20 charged + 25 refunded) = -20.
    stmt = await statements.statement(pool, account_id=account_id, start=datetime(2000, 1, 1, tzinfo=UTC),
                                      end=datetime.now(UTC) + timedelta(minutes=1))
    assert (stmt["opening_balance_micros"], stmt["credits_micros"], stmt["debits_micros"],
            stmt["closing_balance_micros"]) == (0, DOLLARS_25, 45_000_000, -20_000_000)
    assert await verify(pool) == []


async def test_a_lost_dispute_posts_one_refund_debit_and_a_won_one_none(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool)
    won_session = await paid_session(gateway, fake_stripe, secret)
    lost_session = await paid_session(gateway, fake_stripe, secret)
    won = fake_stripe.sign(fake_stripe.event("charge.dispute.closed", fake_stripe.dispute(won_session, status="won")))
    lost = fake_stripe.sign(fake_stripe.event("charge.dispute.closed",
                                              fake_stripe.dispute(lost_session, status="lost")))
    results = await asyncio.gather(*(deliver(gateway, s.payload, s.header) for s in (won, lost, lost, lost)))
    assert sorted((b["action"], b["amount_micros"]) for _, b in results) == [
        ("ignored", 0), ("ignored", 0), ("ignored", 0), ("reversed", -DOLLARS_25)]
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25), ("topup", DOLLARS_25),
                                              ("refund", -DOLLARS_25)]
    assert await available(pool, account_id) == DOLLARS_25
    admin = await gateway.get(f"/admin/accounts/{account_id}/payments", headers=admin_headers())
    assert admin.status == 200
    assert sorted((p["status"], p["disputed_micros"]) for p in (await admin.json())["data"]) == [
        ("paid", 0), ("paid", DOLLARS_25)]
    assert await verify(pool) == []


@pytest.mark.parametrize(("amount", "words"), [
    ("9.99", "between 10 and 10000 USD"),
    ("10000.01", "between 10 and 10000 USD"),
    ("12.345", "finer than one cent"),
    ("ten", "not a decimal number"),
], ids=["below the minimum", "above the maximum", "a fraction of a cent", "not a number"])
async def test_an_amount_outside_the_settings_is_400_naming_it_and_creates_nothing(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe, amount: str, words: str
) -> None:
    _, secret = await make_customer(pool)
    response = await gateway.post("/v1/billing/checkout", json={"amount_usd": amount},
                                  headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "amount_usd" and words in error["message"]
    assert fake_stripe.sessions == {} and fake_stripe.customers == {}
    assert await pool.fetchval("SELECT count(*) FROM payments") == 0
    assert await verify(pool) == []


async def test_stripe_off_answers_503_naming_the_variable_and_moves_nothing(
    aiohttp_client: Any, settings: Settings, stripe_server: TestServer, pool: asyncpg.Pool,
    fake_stripe: FakeStripe, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(WEBHOOK_ENV, raising=False)
    gateway: TestClient = await aiohttp_client(create_app(with_stripe(settings, stripe_server)))
    account_id, secret = await make_customer(pool)
    response = await gateway.post("/v1/billing/checkout", json={"amount_usd": "25.00"},
                                  headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "PAYMENTS_NOT_CONFIGURED" and KEY_ENV in error["message"]
    hook = await gateway.post("/webhooks/stripe", data="{}", headers={"Stripe-Signature": "t=1,v1=00"})
    assert hook.status == 503 and WEBHOOK_ENV in (await hook.json())["error"]["message"]
    assert fake_stripe.sessions == {} and await available(pool, account_id) == 0
    assert await verify(pool) == []


async def test_a_stripe_failure_is_502_without_the_secret_and_records_nothing(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    fake_stripe.secret_key = "sk_test_another_account"  # Stripe refuses our key
    _, secret = await make_customer(pool)
    response = await gateway.post("/v1/billing/checkout", json={"amount_usd": "25.00"},
                                  headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 502
    text = await response.text()
    assert "UPSTREAM_ERROR" in text and "HTTP 401" in text and SECRET_KEY not in text
    assert await pool.fetchval("SELECT count(*) FROM payments") == 0
    assert await verify(pool) == []


async def test_the_cli_lists_an_accounts_payments(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe, database_url: str
) -> None:
    account_id, secret = await make_customer(pool)
    paid = await paid_session(gateway, fake_stripe, secret)
    listed = json.loads(meterline("payments", "--account", account_id, database_url=database_url).stdout)
    assert [(p["session_id"], p["status"], p["paid_micros"]) for p in listed["data"]] == [(paid, "paid", DOLLARS_25)]
    missing = meterline("payments", "--account", "acct_nope", database_url=database_url, check=False)
    assert missing.returncode == 1 and "acct_nope" in missing.stderr
    assert await verify(pool) == []


async def test_a_paid_session_whose_record_was_lost_is_recorded_and_credited_once(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    """The database failed after Stripe created the session and before its row was written; the customer paid."""
    account_id, secret = await make_customer(pool)
    session = await checkout(gateway, secret)
    await pool.execute("DELETE FROM payments")
    signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"])))
    results = await asyncio.gather(*(deliver(gateway, signed.payload, signed.header) for _ in range(3)))
    assert sorted(b["action"] for _, b in results) == ["credited", "ignored", "ignored"]
    row = await pool.fetchrow("SELECT account_id, session_id, status, amount_micros, paid_micros FROM payments")
    assert tuple(row) == (account_id, session["id"], "paid", DOLLARS_25, DOLLARS_25)
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25)]
    assert await verify(pool) == []


async def test_a_session_naming_another_account_than_its_record_credits_nothing(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool)
    other_id, _ = await make_customer(pool)
    session = await checkout(gateway, secret)
    paid = fake_stripe.session_paid(session["id"])
    paid.update(metadata={"meterline_account_id": other_id}, client_reference_id=other_id)
    signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed", paid))
    status, body = await deliver(gateway, signed.payload, signed.header)
    assert (status, body["action"], body["amount_micros"]) == (200, "ignored", 0)
    assert await kinds(pool, account_id) == [] and await kinds(pool, other_id) == []
    assert await pool.fetchval("SELECT status FROM payments") == "open"
    assert await verify(pool) == []


async def test_deliveries_racing_across_two_serve_processes_credit_once(
    pool: asyncpg.Pool, database_url: str, stripe_server: TestServer, fake_stripe: FakeStripe
) -> None:
    env = {"METERLINE_DATABASE_URL": database_url, "METERLINE_REMOTE_CATALOG": "false",
           "METERLINE_STRIPE__API_BASE": str(stripe_server.make_url("")),
           "METERLINE_STRIPE__SECRET_KEY_ENV": KEY_ENV, "METERLINE_STRIPE__WEBHOOK_SECRET_ENV": WEBHOOK_ENV,
           KEY_ENV: SECRET_KEY, WEBHOOK_ENV: WEBHOOK_SECRET}
    account_id, secret = await make_customer(pool)
    async with meterline_serve(env) as (first, _), meterline_serve(env) as (second, _), aiohttp.ClientSession() as http:
        async with http.post(f"{first}/v1/billing/checkout", json={"amount_usd": "25.00"},
                             headers={"Authorization": f"Bearer {secret}"}) as response:
            assert response.status == 201, await response.text()
            session = await response.json()
        signed = fake_stripe.sign(fake_stripe.event("checkout.session.completed",
                                                    fake_stripe.session_paid(session["id"])))

        async def deliver_to(base: str) -> str:
            async with http.post(f"{base}/webhooks/stripe", data=signed.payload,
                                 headers={"Stripe-Signature": signed.header}) as answer:
                assert answer.status == 200
                action: str = (await answer.json())["action"]
                return action

        actions = await asyncio.gather(*(deliver_to(base) for base in (first, second) * 4))
    assert sorted(actions) == ["credited"] + ["ignored"] * 7
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25)]
    assert await verify(pool) == []


@pytest.mark.parametrize(("overrides", "named"), [
    ({"min_amount_usd": "50", "max_amount_usd": "10"}, "min_amount_usd (50) exceeds max_amount_usd (10)"),
    ({"api_base": "stripe.example"}, "stripe.api_base"),
    ({"webhook_tolerance_seconds": 0}, "stripe.webhook_tolerance_seconds"),
], ids=["min above max", "not a URL", "no tolerance"])
def test_a_bad_stripe_setting_stops_the_start_naming_it(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(named)):
        load_settings(config=ROOT / "config" / "meterline.toml", stripe=overrides)


async def test_a_session_that_expires_unpaid_turns_its_payment_expired_and_a_late_payment_still_credits(
    gateway: TestClient, pool: asyncpg.Pool, fake_stripe: FakeStripe
) -> None:
    account_id, secret = await make_customer(pool)
    session = await checkout(gateway, secret)
    expired = fake_stripe.sign(fake_stripe.event("checkout.session.expired", {
        **fake_stripe.session_paid(session["id"], payment_status="unpaid"), "status": "expired"}))
    results = await asyncio.gather(*(deliver(gateway, expired.payload, expired.header) for _ in range(2)))
    assert sorted((s, b["action"], b["amount_micros"]) for s, b in results) == [(200, "expired", 0),
                                                                                   (200, "ignored", 0)]
    row = await pool.fetchrow("SELECT status, paid_micros, completed_at FROM payments WHERE session_id = $1",
                              session["id"])
    assert tuple(row) == ("expired", None, None)
    assert await available(pool, account_id) == 0
    listed = await (await gateway.get("/v1/billing/payments", headers={"Authorization": f"Bearer {secret}"})).json()
    assert [p["status"] for p in listed["data"]] == ["expired"]
    # Stripe never pays an expired session; were it to say so, the money paid is credited once all the same.
    paid = fake_stripe.sign(fake_stripe.event("checkout.session.completed", fake_stripe.session_paid(session["id"])))
    status, body = await deliver(gateway, paid.payload, paid.header)
    assert (status, body["action"], body["amount_micros"]) == (200, "credited", DOLLARS_25)
    assert await kinds(pool, account_id) == [("topup", DOLLARS_25)]
    assert await verify(pool) == []
