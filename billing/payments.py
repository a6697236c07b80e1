"""Payments: money customers pay through Stripe, and what each of Stripe's events does to the ledger.

A Checkout Session is recorded as an open payment when it is created. Its fulfilment (a `checkout.session.completed`
that is paid, or a `checkout.session.async_payment_succeeded`) turns the row paid with a conditional UPDATE and
posts the top-up of the amount paid in the same transaction: however often, and however concurrently, Stripe
delivers the event (to however many gateway processes), one UPDATE finds the row open and one top-up is posted.

A refund (`charge.refunded`) or a lost dispute (`charge.dispute.closed`, status lost) posts a `refund` debit
(drawn from paid credit first) that may overdraw the account (the ledger records the uncovered part as overrun, so
no new hold is granted until it is paid). A charge's `amount_refunded` is cumulative: each delivery posts only what
it adds to the refunded amount already recorded, so duplicated and out-of-order deliveries post each refunded micro
once.

Stripe's amounts are integer cents of USD; one cent is 10,000 micros. The events arrive verified (gateway side) as
plain dicts in Stripe's shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from billing import ledger
from billing.accounts import new_id
from billing.db import Executor
from billing.errors import AccountNotFound, InvalidAmount

MICROS_PER_CENT = 10_000
CURRENCY = "usd"
# The metadata key naming the account a session pays for (set at creation, checked on fulfilment).
ACCOUNT_METADATA = "meterline_account_id"

_PAYMENT_COLUMNS = """
    id, account_id, kind, status, session_id, payment_intent, amount_micros, paid_micros, transfer_id,
    refunded_micros, disputed_micros, created_at, completed_at, failure
"""


def micros_of_cents(cents: int) -> int:
    return cents * MICROS_PER_CENT


def checkout_cents(amount_usd: str | int, *, min_usd: Decimal, max_usd: Decimal) -> int:
    """A checkout amount in whole cents, between the configured minimum and maximum (both inclusive)."""
    try:
        value = Decimal(str(amount_usd).strip())
    except InvalidOperation:
        raise InvalidAmount(f"amount_usd {amount_usd!r} is not a decimal number") from None
    if not value.is_finite():
        raise InvalidAmount(f"amount_usd {amount_usd!r} is not a finite number")
    if value < min_usd or value > max_usd:
        raise InvalidAmount(f"amount_usd must be between {min_usd} and {max_usd} USD, got {amount_usd}")
    cents = value * 100
    if cents != cents.to_integral_value():
        raise InvalidAmount(f"amount_usd {amount_usd!r} is finer than one cent")
    return int(cents)


async def stripe_customer(conn: Executor, account_id: str) -> str | None:
    """The Stripe customer the account pays as, or None before its first checkout (AccountNotFound: no account)."""
    row = await conn.fetchrow(
        "SELECT stripe_customer_id FROM accounts WHERE id = $1 AND kind = 'customer'", account_id)
    if row is None:
        raise AccountNotFound(account_id)
    customer: str | None = row["stripe_customer_id"]
    return customer


async def link_customer(conn: Executor, account_id: str, customer_id: str) -> str:
    """Link the account to `customer_id` unless it is linked already; returns the customer it is linked to (the
    first link wins, so two concurrent first checkouts end up paying as one customer)."""
    linked: str | None = await conn.fetchval(
        "UPDATE accounts SET stripe_customer_id = COALESCE(stripe_customer_id, $2)"
        " WHERE id = $1 AND kind = 'customer' RETURNING stripe_customer_id", account_id, customer_id)
    if linked is None:
        raise AccountNotFound(account_id)
    return linked


async def record_checkout(conn: Executor, *, account_id: str, session_id: str, amount_micros: int) -> dict[str, Any]:
    """Record a created Checkout Session as an open payment."""
    row = await conn.fetchrow(
        f"INSERT INTO payments (id, account_id, kind, session_id, amount_micros) VALUES ($1, $2, 'checkout', $3, $4)"
        f" RETURNING {_PAYMENT_COLUMNS}", new_id("pay"), account_id, session_id, amount_micros)
    assert row is not None
    return dict(row)


async def list_payments(conn: Executor, account_id: str, *, limit: int) -> list[dict[str, Any]]:
    """The account's payments, newest first (AccountNotFound: no such account)."""
    if await conn.fetchval("SELECT true FROM accounts WHERE id = $1 AND kind = 'customer'", account_id) is None:
        raise AccountNotFound(account_id)
    rows = await conn.fetch(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE account_id = $1 ORDER BY created_at DESC, id DESC LIMIT $2",
        account_id, limit)
    return [dict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an event did: `action` is credited, reversed, failed, expired, saved (a card) or ignored;
    `amount_micros` is signed, what was posted now (0 when nothing was); `reason` says why nothing moved."""

    action: str
    amount_micros: int = 0
    payment_id: str | None = None
    reason: str | None = None


def _ignored(reason: str) -> Outcome:
    return Outcome("ignored", reason=reason)


async def apply_event(pool: asyncpg.Pool, event: dict[str, Any]) -> Outcome:
    """Apply one verified Stripe event to the ledger, exactly once however often it is delivered."""
    kind = event.get("type")
    obj = (event.get("data") or {}).get("object") or {}
    if not isinstance(obj, dict):
        return _ignored("the event carries no object")
    if kind == "checkout.session.completed" or kind == "checkout.session.async_payment_succeeded":
        if obj.get("payment_status") != "paid":
            return _ignored(f"the session's payment_status is {obj.get('payment_status')!r}, not paid")
        return await _fulfil(pool, obj)
    if kind == "checkout.session.expired":
        return await _expire(pool, obj)
    if kind == "charge.refunded":
        return await _refund(pool, obj)
    if kind == "charge.dispute.closed":
        if obj.get("status") != "lost":
            return _ignored(f"the dispute closed as {obj.get('status')!r}, not lost")
        return await _dispute(pool, obj)
    return _ignored(f"event type {kind!r} is not one Meterline acts on")


def _cents(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


async def _fulfil(pool: asyncpg.Pool, session: dict[str, Any]) -> Outcome:
    session_id, cents = session.get("id"), _cents(session.get("amount_total"))
    account_id = (session.get("metadata") or {}).get(ACCOUNT_METADATA)
    if not isinstance(session_id, str) or cents is None or not cents:
        return _ignored("the session has no id or no amount_total")
    if session.get("currency") != CURRENCY:
        return _ignored(f"the session's currency is {session.get('currency')!r}, not {CURRENCY}")
    if account_id is None or session.get("client_reference_id") != account_id:
        return _ignored("the session does not name one Meterline account in its metadata and client_reference_id")
    intent = session.get("payment_intent")
    paid = micros_of_cents(cents)
    async with pool.acquire() as conn, conn.transaction():
        # A session Stripe created but whose row was never written (the database failed between the two, and the
        # customer paid anyway) is recorded now, for the account the signed event names: money paid is never lost.
        await conn.execute(
            "INSERT INTO payments (id, account_id, kind, session_id, amount_micros)"
            " SELECT $1, $2, 'checkout', $3, $4 WHERE EXISTS (SELECT FROM accounts WHERE id = $2 AND kind = 'customer')"
            " ON CONFLICT (session_id) DO NOTHING", new_id("pay"), account_id, session_id, paid)
        # The gate: only the delivery that finds the row unpaid turns it paid (a concurrent one waits on the row
        # lock, then finds it paid and updates nothing). An expired session that Stripe says was paid after all is
        # still credited: money paid is never left behind.
        payment_id = await conn.fetchval(
            "UPDATE payments SET status = 'paid', paid_micros = $3, completed_at = now(),"
            " payment_intent = COALESCE($4, payment_intent)"
            " WHERE session_id = $1 AND account_id = $2 AND status IN ('open', 'expired') RETURNING id",
            session_id, account_id, paid, intent if isinstance(intent, str) else None)
        if payment_id is None:
            return _ignored("the session is already paid, or is not a payment of that account")
        posting = await ledger.post(conn, account_id=account_id, kind="topup", amount_micros=paid,
                                    description=f"Stripe payment {payment_id} (checkout session {session_id})")
        await conn.execute("UPDATE payments SET transfer_id = $2 WHERE id = $1", payment_id, posting.transfer_id)
    return Outcome("credited", paid, payment_id)


async def _expire(pool: asyncpg.Pool, session: dict[str, Any]) -> Outcome:
    """A session that expired unpaid: its open payment says so (`expired`), and nothing moves."""
    session_id = session.get("id")
    if not isinstance(session_id, str) or session.get("payment_status") == "paid":
        return _ignored("the session has no id, or was paid")
    payment_id = await pool.fetchval("UPDATE payments SET status = 'expired' WHERE session_id = $1 AND status = 'open'"
                                     " RETURNING id", session_id)
    if payment_id is None:
        return _ignored("no open payment has that session")
    return Outcome("expired", 0, payment_id)


async def _reverse(conn: Executor, payment: asyncpg.Record, amount_micros: int, description: str) -> None:
    await ledger.post(conn, account_id=payment["account_id"], kind="refund", amount_micros=-amount_micros,
                      description=description, overdraw=True)


async def _refund(pool: asyncpg.Pool, charge: dict[str, Any]) -> Outcome:
    intent, cents = charge.get("payment_intent"), _cents(charge.get("amount_refunded"))
    if not isinstance(intent, str) or cents is None:
        return _ignored("the charge has no payment_intent or amount_refunded")
    async with pool.acquire() as conn, conn.transaction():
        # Cumulative: the row is locked, then raised to the charge's refunded total (never beyond what was paid
        # less what a dispute took); what it adds is what is posted. A stale or repeated delivery adds nothing.
        row = await conn.fetchrow(
            "WITH locked AS (SELECT id, refunded_micros AS before FROM payments"
            "                 WHERE payment_intent = $1 AND status = 'paid' FOR UPDATE)"
            " UPDATE payments p SET refunded_micros = LEAST($2, p.paid_micros - p.disputed_micros)"
            "   FROM locked WHERE p.id = locked.id AND LEAST($2, p.paid_micros - p.disputed_micros) > locked.before"
            " RETURNING p.id, p.account_id, p.refunded_micros - locked.before AS added",
            intent, micros_of_cents(cents))
        if row is None:
            return _ignored("no paid payment has that payment_intent, or its refund is already posted")
        await _reverse(conn, row, row["added"], f"Stripe refund of payment {row['id']} (charge {charge.get('id')})")
    return Outcome("reversed", -row["added"], row["id"])


async def _dispute(pool: asyncpg.Pool, dispute: dict[str, Any]) -> Outcome:
    intent, cents, dispute_id = dispute.get("payment_intent"), _cents(dispute.get("amount")), dispute.get("id")
    if not isinstance(intent, str) or not isinstance(dispute_id, str) or not cents:
        return _ignored("the dispute has no id, payment_intent or amount")
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE payments SET dispute_id = $2,"
            " disputed_micros = LEAST($3, paid_micros - refunded_micros)"
            " WHERE payment_intent = $1 AND status = 'paid' AND dispute_id IS NULL"
            "   AND paid_micros - refunded_micros > 0"
            " RETURNING id, account_id, disputed_micros AS added",
            intent, dispute_id, micros_of_cents(cents))
        if row is None:
            return _ignored("no paid payment has that payment_intent, or its dispute is already posted")
        await _reverse(conn, row, row["added"], f"Stripe dispute {dispute_id} lost on payment {row['id']}")
    return Outcome("reversed", -row["added"], row["id"])
