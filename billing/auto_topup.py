"""Auto top-up: below a threshold, charge the account's saved card for an amount (issue 16).

A rule per account (`auto_topup_rules`) is copied, while enabled, onto the account's row as `auto_topup_micros`, so
that a settlement (meterline_settle) decides on the row it locks anyway: the charge that takes the available balance
below the threshold records the trigger, an open `auto_topup` payment, in its own transaction, and marks the rule
fired; a unique partial index keeps one in flight per account. A credit that lifts the balance back to the
threshold re-arms it (meterline_post). A worker (gateway side) claims each open trigger with FOR UPDATE SKIP LOCKED
and creates its off-session PaymentIntent under an idempotency key derived from the payment, so a retry after a
crash is answered by Stripe with the same intent. `payment_intent.succeeded` turns the payment paid and posts the
top-up once (the conditional UPDATE on status is the gate, as for checkout); a failure is recorded by
meterline_auto_topup_failed, which disables the rule at the third in a row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from billing import ledger
from billing.db import Executor
from billing.errors import AccountNotFound, InvalidRule
from billing.payments import ACCOUNT_METADATA, CURRENCY, MICROS_PER_CENT, Outcome, micros_of_cents

# The PaymentIntent's metadata key naming the payment (the trigger) it pays.
PAYMENT_METADATA = "meterline_payment_id"
# The failures in a row that disable a rule (also in meterline_auto_topup_failed).
FAILURES_TO_DISABLE = 3
EVENTS = ("payment_intent.succeeded", "payment_intent.payment_failed")

_RULE_COLUMNS = """
    account_id, enabled, threshold_micros, amount_micros, payment_method, failures, disabled_reason, disabled_at,
    updated_at
"""


def check_rule(*, threshold_micros: int, amount_micros: int, min_usd: Decimal, max_usd: Decimal) -> None:
    """A rule's amounts: whole cents, a threshold of zero or more, an amount within the checkout bounds."""
    if threshold_micros < 0:
        raise InvalidRule(f"threshold_micros must be zero or more, got {threshold_micros}", "threshold_micros")
    if threshold_micros % MICROS_PER_CENT:
        raise InvalidRule(f"threshold_micros {threshold_micros} is not a whole number of cents "
                          f"({MICROS_PER_CENT} micros)", "threshold_micros")
    if amount_micros % MICROS_PER_CENT:
        raise InvalidRule(f"amount_micros {amount_micros} is not a whole number of cents "
                          f"({MICROS_PER_CENT} micros)", "amount_micros")
    usd = Decimal(amount_micros) / 1_000_000
    if usd < min_usd or usd > max_usd:
        raise InvalidRule(f"amount_micros must be between {min_usd} and {max_usd} USD, got {usd} USD",
                          "amount_micros")


async def get_rule(conn: Executor, account_id: str) -> dict[str, Any] | None:
    """The account's rule, None if it never had one (AccountNotFound: no such account)."""
    if await conn.fetchval("SELECT true FROM accounts WHERE id = $1 AND kind = 'customer'", account_id) is None:
        raise AccountNotFound(account_id)
    row = await conn.fetchrow(f"SELECT {_RULE_COLUMNS} FROM auto_topup_rules WHERE account_id = $1", account_id)
    return None if row is None else dict(row)


async def set_rule(pool: asyncpg.Pool, account_id: str, *, enabled: bool, threshold_micros: int, amount_micros: int,
                   payment_method: str | None) -> dict[str, Any]:
    """Write the account's rule (a None payment_method keeps the rule's, or takes the card the account last paid a
    checkout with). Writing it clears its failures and the reason it was disabled, and arms it; disabling it drops
    a trigger not yet sent to Stripe. An enabled rule needs a payment method (InvalidRule)."""
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT true FROM accounts WHERE id = $1 AND kind = 'customer' FOR UPDATE",
                               account_id) is None:
            raise AccountNotFound(account_id)
        try:
            row = await conn.fetchrow(
                "INSERT INTO auto_topup_rules AS r (account_id, enabled, threshold_micros, amount_micros,"
                " payment_method) VALUES ($1, $2, $3, $4,"
                # the saved method, in the proposed row too: its CHECK is tested before the conflict is found
                "  COALESCE($5, (SELECT payment_method FROM auto_topup_rules WHERE account_id = $1),"
                "           (SELECT stripe_payment_method FROM accounts WHERE id = $1)))"
                " ON CONFLICT (account_id) DO UPDATE SET enabled = $2, threshold_micros = $3, amount_micros = $4,"
                "   payment_method = COALESCE($5, r.payment_method, EXCLUDED.payment_method), failures = 0,"
                "   disabled_reason = NULL,"
                "   disabled_at = NULL, updated_at = now()"
                f" RETURNING {_RULE_COLUMNS}", account_id, enabled, threshold_micros, amount_micros, payment_method)
        except asyncpg.CheckViolationError:
            raise InvalidRule("an enabled auto top-up needs a payment_method (a Stripe payment method id)",
                              "payment_method") from None
        assert row is not None
        if not enabled:
            # A trigger not yet sent to Stripe is dropped with the rule (one the worker is sending holds its row
            # lock: this waits, then finds its intent recorded and leaves it to its webhook).
            await conn.execute(
                "UPDATE payments SET status = 'failed', failure = 'cancelled: the auto top-up was disabled'"
                " WHERE account_id = $1 AND kind = 'auto_topup' AND status = 'open' AND payment_intent IS NULL",
                account_id)
        await conn.execute(
            "UPDATE accounts SET auto_topup_micros = CASE WHEN $2 THEN $3::bigint END, auto_topup_fired_at = NULL"
            " WHERE id = $1", account_id, enabled, threshold_micros)
    return dict(row)


@dataclass(frozen=True, slots=True)
class Trigger:
    """An open auto top-up awaiting its PaymentIntent."""

    payment_id: str
    account_id: str
    amount_micros: int
    payment_method: str | None
    customer: str | None

    @property
    def cents(self) -> int:
        return self.amount_micros // MICROS_PER_CENT

    @property
    def idempotency_key(self) -> str:
        """Derived from the trigger: every attempt for it is one PaymentIntent at Stripe."""
        return f"meterline-auto-topup-{self.payment_id}"


async def claim(conn: Executor, *, limit: int) -> list[Trigger]:
    """Lock up to `limit` triggers that have no PaymentIntent yet (inside the caller's transaction; rows another
    process holds are skipped)."""
    rows = await conn.fetch(
        "SELECT p.id, p.account_id, p.amount_micros, p.payment_method, a.stripe_customer_id"
        "  FROM payments p JOIN accounts a ON a.id = p.account_id"
        " WHERE p.kind = 'auto_topup' AND p.status = 'open' AND p.payment_intent IS NULL"
        " ORDER BY p.created_at LIMIT $1 FOR UPDATE OF p SKIP LOCKED", limit)
    return [Trigger(r["id"], r["account_id"], r["amount_micros"], r["payment_method"], r["stripe_customer_id"])
            for r in rows]


async def record_intent(conn: Executor, payment_id: str, intent_id: str) -> None:
    await conn.execute("UPDATE payments SET payment_intent = $2 WHERE id = $1 AND payment_intent IS NULL",
                       payment_id, intent_id)


@dataclass(frozen=True, slots=True)
class Charge:
    """A trigger ready to charge: the account has a Stripe customer and a saved payment method."""

    trigger: Trigger
    customer: str
    payment_method: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What Stripe answered a trigger's PaymentIntent: the intent's id, or the card's refusal (a card error)."""

    intent_id: str | None = None
    refused: str | None = None


async def charge_open(pool: asyncpg.Pool, create: Callable[[Charge], Awaitable[Answer | None]], *,
                      limit: int) -> int:
    """One worker tick: lock up to `limit` open triggers and `create` each one's PaymentIntent (None: Stripe did not
    answer; the trigger stays open for the next tick), recording the intent or the refusal. The rows stay locked
    while Stripe is called, so another process skips them rather than charging them too; the idempotency key makes
    a rerun after a crash the same intent. Returns how many triggers got an answer."""
    answered = 0
    async with pool.acquire() as conn, conn.transaction():
        for trigger in await claim(conn, limit=limit):
            if trigger.customer is None or trigger.payment_method is None:
                await record_failure(conn, trigger.payment_id,
                                     "the account has no Stripe customer or no saved payment method")
                answered += 1
                continue
            answer = await create(Charge(trigger, trigger.customer, trigger.payment_method))
            if answer is None:
                continue
            if answer.intent_id is not None:
                await record_intent(conn, trigger.payment_id, answer.intent_id)
            else:
                await record_failure(conn, trigger.payment_id, answer.refused or "card_error")
            answered += 1
    return answered


@dataclass(frozen=True, slots=True)
class Failure:
    account_id: str
    failures: int
    disabled: bool


async def record_failure(conn: Executor, payment_id: str, reason: str) -> Failure | None:
    """Record that the trigger's payment failed (None: it is not an open auto top-up, nothing was recorded)."""
    row = await conn.fetchrow("SELECT * FROM meterline_auto_topup_failed($1, $2)", payment_id, reason[:500])
    return None if row is None else Failure(row["account_id"], row["failures"], row["disabled"])


async def _save_card(pool: asyncpg.Pool, event: dict[str, Any], intent: Any) -> Outcome:
    """A checkout's own PaymentIntent succeeded: its card (saved off-session to the account's Stripe customer)
    becomes the account's saved payment method, which auto top-up charges unless its rule names another."""
    metadata = intent.get("metadata") if isinstance(intent, dict) else None
    account_id = metadata.get(ACCOUNT_METADATA) if isinstance(metadata, dict) else None
    method, customer = (intent.get("payment_method"), intent.get("customer")) if isinstance(intent, dict) else (
        None, None)
    if event.get("type") != "payment_intent.succeeded" or not all(
            isinstance(v, str) for v in (account_id, method, customer)):
        return Outcome("ignored", reason="the payment intent is not an auto top-up's, nor a checkout's paid card")
    saved = await pool.fetchval(
        "UPDATE accounts SET stripe_payment_method = $3 WHERE id = $1 AND stripe_customer_id = $2 RETURNING id",
        account_id, customer, method)
    if saved is None:
        return Outcome("ignored", reason="the intent's customer is not that account's")
    return Outcome("saved", reason="the checkout's card is saved for auto top-up")


async def apply_event(pool: asyncpg.Pool, event: dict[str, Any]) -> Outcome:
    """Apply a verified payment_intent.* event: a success credits its auto top-up once, a failure is recorded once.
    Intents that are not Meterline's auto top-ups (a checkout's own) are ignored."""
    obj = (event.get("data") or {}).get("object") or {}
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    payment_id = metadata.get(PAYMENT_METADATA) if isinstance(metadata, dict) else None
    if not isinstance(payment_id, str):
        return await _save_card(pool, event, obj)
    if event.get("type") == "payment_intent.payment_failed":
        error = obj.get("last_payment_error") or {}
        reason = (error.get("code") or error.get("message") or "payment failed") if isinstance(error, dict) else (
            "payment failed")
        async with pool.acquire() as conn, conn.transaction():
            failed = await record_failure(conn, payment_id, str(reason))
        if failed is None:
            return Outcome("ignored", payment_id=payment_id, reason="the auto top-up is not open")
        return Outcome("failed", payment_id=payment_id, reason=str(reason))
    cents = obj.get("amount_received")
    if not isinstance(cents, int) or isinstance(cents, bool) or cents <= 0 or obj.get("currency") != CURRENCY:
        return Outcome("ignored", payment_id=payment_id, reason="the intent received no amount in usd")
    paid = micros_of_cents(cents)
    account_id = metadata.get(ACCOUNT_METADATA) if isinstance(metadata, dict) else None
    intent = obj.get("id")
    async with pool.acquire() as conn, conn.transaction():
        # The gate, as for checkout: one delivery finds the payment open.
        found = await conn.fetchval(
            "UPDATE payments SET status = 'paid', paid_micros = $3, completed_at = now(),"
            " payment_intent = COALESCE(payment_intent, $4)"
            " WHERE id = $1 AND account_id = $2 AND kind = 'auto_topup' AND status = 'open' RETURNING id",
            payment_id, account_id, paid, intent if isinstance(intent, str) else None)
        if found is None:
            return Outcome("ignored", payment_id=payment_id, reason="the auto top-up is already paid, or not open")
        assert isinstance(account_id, str)
        posting = await ledger.post(conn, account_id=account_id, kind="topup", amount_micros=paid,
                                    description=f"Stripe auto top-up {payment_id} (payment intent {intent})")
        await conn.execute("UPDATE payments SET transfer_id = $2 WHERE id = $1", payment_id, posting.transfer_id)
        await conn.execute("UPDATE auto_topup_rules SET failures = 0 WHERE account_id = $1", account_id)
    return Outcome("credited", paid, payment_id)
