"""The ledger: every SQL statement that moves money, as one call each.

Each function takes the connection (or pool) to run on and performs one atomic step in PostgreSQL (the
`meterline_*` functions in schema.sql). Nothing here reads a balance and then decides in Python.

    reserve  hold an amount against a customer's available balance (two-phase, with an expiry)
    settle   post the actual charge for a held request and release the rest (once)
    void     release a hold without charging (once)
    sweep    expire holds past their expiry (safe to run in several processes)
    post     a top-up, an adjustment or a refund, optionally under an idempotency key
    bring_forward  bring an account's credit grants to the clock (billing.grants), for the reads that answer what a
                   money step would decide
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing import idempotency
from billing.db import Executor, clean_text
from billing.errors import (
    AccountNotFound,
    DuplicateRequest,
    InsufficientBalance,
    InvalidAmount,
    KeyLimitExceeded,
    UnknownHold,
)
from billing.money import check_range


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    granted_micros: int
    available_micros: int  # what remains available after this hold
    expires_at: datetime
    replayed: bool = False  # no hold was made now: the call replays an earlier one's (a video's Idempotency-Key)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of a hold. `replayed` is true when it was already resolved and nothing was written now."""

    state: str  # settled | voided | expired
    hold_micros: int
    actual_micros: int  # 0 unless settled
    overrun_micros: int
    replayed: bool


async def reserve(
    conn: Executor,
    *,
    request_id: str,
    account_id: str,
    amount_micros: int,
    min_micros: int | None = None,
    ttl_seconds: float,
    key_id: str | None = None,
) -> Reservation:
    """Hold `amount_micros`, or, when `min_micros` is given, as much of it as is available but at least that.

    Raises InsufficientBalance (carrying what was required and what was available), KeyLimitExceeded (the key's
    spend limit, checked in the same statement) or AccountNotFound.
    """
    try:
        return await reserve_unworded(conn, request_id=request_id, account_id=account_id,
                                      amount_micros=amount_micros, min_micros=min_micros, ttl_seconds=ttl_seconds,
                                      key_id=key_id)
    except KeyRefusal as refused:
        raise await key_limit_refusal(conn, key_id or "", refused.remaining, refused.resets_at) from None


async def reserve_unworded(conn: Executor, *, request_id: str, account_id: str, amount_micros: int,
                           min_micros: int | None, ttl_seconds: float, key_id: str | None) -> Reservation:
    """`reserve`, but a key-limit refusal raises KeyRefusal, to be worded by the caller (one more read)."""
    low = hold_minimum(amount_micros, min_micros)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM meterline_reserve($1, $2, $3, $4, $5, $6)",
            request_id, account_id, low, amount_micros, ttl_ms(ttl_seconds), key_id,
        )
    except asyncpg.UniqueViolationError:
        raise DuplicateRequest(f"request {request_id!r} already has a hold") from None
    return decided(row, request_id=request_id, account_id=account_id, low=low)


def hold_minimum(amount_micros: int, min_micros: int | None) -> int:
    """The least a hold may grant (`amount_micros` unless `min_micros` is given), checked."""
    low = amount_micros if min_micros is None else min_micros
    check_range(amount_micros)
    if low < 0 or low > amount_micros:
        raise InvalidAmount(f"a hold needs 0 <= min <= amount, got min {low} and amount {amount_micros}")
    return low


def ttl_ms(ttl_seconds: float) -> int:
    return max(1, int(ttl_seconds * 1000))


class KeyRefusal(Exception):
    """A meterline_reserve row refused by the key's spend limit, before its error is worded (which needs a read:
    billing.batcher words it after the batch, so that refusals never hold up the holds queued behind them)."""

    def __init__(self, remaining: int, resets_at: datetime) -> None:
        super().__init__("refused by the key's spend limit")
        self.remaining = remaining
        self.resets_at = resets_at


def decided(row: asyncpg.Record | None, *, request_id: str, account_id: str, low: int) -> Reservation:
    """The outcome of one meterline_reserve row, but for a key-limit refusal's wording: raises KeyRefusal."""
    assert row is not None
    if row["available"] is None:
        raise AccountNotFound(account_id)
    if row["granted"] is None and row["expires_at"] is not None:
        raise KeyRefusal(row["available"], row["expires_at"])
    if row["granted"] is None:
        available = row["available"]
        raise InsufficientBalance(
            f"Insufficient balance: this request needs {low} micros and {max(available, 0)} are available",
            required_micros=low,
            available_micros=available,
        )
    return Reservation(request_id, row["granted"], row["available"], row["expires_at"])


async def key_limit_refusal(conn: Executor, key_id: str, remaining: int, resets_at: datetime) -> KeyLimitExceeded:
    """The error for a row of meterline_reserve refused by the key's spend limit (granted NULL with expires_at set
    to when the key's window resets; available = what the key has left). The limit is read only to word it."""
    row = await conn.fetchrow("SELECT limit_micros, limit_reset FROM api_keys WHERE id = $1", key_id)
    limit = int(row["limit_micros"] or 0) if row else 0
    reset = row["limit_reset"] if row else None
    when = "never resets" if reset is None else f"resets at {resets_at.astimezone(UTC).isoformat()}"
    return KeyLimitExceeded(
        f"This API key's spend limit of {limit} micros ({reset or 'total'}) is reached: {max(remaining, 0)} micros"
        f" remain and the limit {when}",
        key_id=key_id, limit_micros=limit, remaining_micros=remaining, limit_reset=reset,
        resets_at=None if reset is None else resets_at,
    )


def check_charge(actual_micros: int) -> None:
    check_range(actual_micros)
    if actual_micros < 0:
        raise InvalidAmount("a charge cannot be negative")


def resolution(row: asyncpg.Record | None, request_id: str) -> Resolution:
    """The outcome of one meterline_settle / meterline_void row (None: no such hold)."""
    if row is None:
        raise UnknownHold(request_id)
    return Resolution(
        state=row["state"],
        hold_micros=row["hold_micros"],
        actual_micros=row["actual_micros"] or 0,
        overrun_micros=row["overrun_micros"],
        replayed=row["replayed"],
    )


async def settle(
    conn: Executor,
    *,
    request_id: str,
    actual_micros: int,
    estimated: bool = False,
    record: dict[str, Any] | None = None,
) -> Resolution:
    """Post `actual_micros` for the held request and release the rest of its hold, exactly once.

    `record` (a request-log row: model, usage, status, timings...) is written in the same transaction; its money
    fields are filled from the ledger. A hold that had already expired is still charged in full (all of it
    counts as overrun), so a charge is never lost.
    """
    check_charge(actual_micros)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM meterline_settle($1, $2, $3, $4)", request_id, actual_micros, estimated, record
        )
    except asyncpg.NumericValueOutOfRangeError:
        raise InvalidAmount("this charge would take the account past the range of a 64-bit integer") from None
    return resolution(row, request_id)


async def void(
    conn: Executor, *, request_id: str, reason: str, record: dict[str, Any] | None = None
) -> Resolution:
    """Release the held request's whole hold without charging, exactly once."""
    # The reason is often an upstream's error text: it must not be able to abort the void.
    row = await conn.fetchrow("SELECT * FROM meterline_void($1, $2, $3)", request_id, clean_text(reason), record)
    return resolution(row, request_id)


async def sweep(conn: Executor, *, limit: int = 500) -> int:
    """Expire up to `limit` holds whose expiry (database clock) has passed; returns how many."""
    count: int = await conn.fetchval("SELECT meterline_sweep($1)", limit)
    return count


@dataclass(frozen=True, slots=True)
class Posting:
    transfer_id: int
    account_id: str
    kind: str
    amount_micros: int  # signed, from the customer's side
    description: str | None
    balance_after_micros: int
    held_micros: int
    created_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "transfer_id": self.transfer_id,
            "account_id": self.account_id,
            "kind": self.kind,
            "amount_micros": self.amount_micros,
            "description": self.description,
            "balance_micros": self.balance_after_micros,
            "held_micros": self.held_micros,
            "available_micros": self.balance_after_micros - self.held_micros,
            "created_at": self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),  # as every response
        }


async def post(
    conn: Executor, *, account_id: str, kind: str, amount_micros: int, description: str | None,
    overdraw: bool = False,
) -> Posting:
    """A top-up (positive) or adjustment (signed) between the customer and the matching operator account.

    `overdraw`: a negative adjustment is posted even past the available balance, the uncovered part recorded as
    overrun (a reversal of money the customer paid, billing.payments); otherwise it raises InsufficientBalance."""
    check_range(amount_micros)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM meterline_post($1, $2, $3, $4, $5)", account_id, kind, amount_micros, description, overdraw
        )
    except asyncpg.PostgresError as exc:
        code = getattr(exc, "sqlstate", None)
        if code == "ML003":
            raise AccountNotFound(account_id) from None
        if code == "ML001":
            raise InsufficientBalance(
                f"Insufficient balance: the available balance does not cover a debit of {-amount_micros} micros",
                required_micros=-amount_micros,
                available_micros=int(exc.detail or 0),  # meterline_post reports it: the transaction is dead
            ) from None
        if isinstance(exc, asyncpg.NumericValueOutOfRangeError):
            raise InvalidAmount("this amount would take the balance past the range of a 64-bit integer") from None
        raise
    assert row is not None
    return Posting(
        transfer_id=row["transfer_id"],
        account_id=account_id,
        kind=kind,
        amount_micros=amount_micros,
        description=description,
        balance_after_micros=row["balance_after"],
        held_micros=row["held"],
        created_at=row["created_at"],
    )


def request_fingerprint(*parts: object) -> bytes:
    """A stable digest of a request, to tell a replay from a different request under the same key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).digest()


async def post_once(
    pool: asyncpg.Pool,
    *,
    idempotency_key: str,
    fingerprint: bytes,
    account_id: str,
    kind: str,
    amount_micros: int,
    description: str | None,
) -> tuple[dict[str, Any], bool]:
    """`post` under an idempotency key: returns (result, replayed).

    The key is claimed by inserting it in the same transaction as the posting, so concurrent duplicates wait on
    the first one's commit and then replay its stored result; a key reused for a different request raises
    IdempotencyConflict.
    """
    async with pool.acquire() as conn, conn.transaction():
        claim = idempotency.Claim("ledger", idempotency_key)
        stored = await idempotency.claim(conn, claim, fingerprint=fingerprint)
        if stored is not None:
            return stored.response, True
        posting = await post(
            conn, account_id=account_id, kind=kind, amount_micros=amount_micros, description=description
        )
        result = posting.as_dict()
        await idempotency.store(conn, claim, status_code=201, response=result)
        return result, False


async def bring_forward(conn: Executor, account_id: str) -> None:
    """Bring the account's credit grants to the clock (post those whose time came, expire those past their expiry),
    as every money step on it does first; for the reads that answer what a step would decide."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await bring_forward(own, account_id)
    async with conn.transaction():
        due = await conn.fetchval("SELECT true FROM accounts WHERE id = $1 AND grants_due_at <= meterline_now()"
                                  " FOR UPDATE", account_id)
        if due:
            await conn.execute("SELECT meterline_grants_due($1)", account_id)


_COVERABLE = """
    SELECT a.credits_posted - a.debits_posted - a.held_micros AS available,
           (SELECT meterline_key_left(k) FROM api_keys k WHERE k.id = $2 AND k.limit_micros IS NOT NULL) AS key_left,
           COALESCE(a.grants_due_at <= meterline_now(), false) AS due
      FROM accounts a WHERE a.id = $1
"""


async def coverable_micros(conn: Executor, account_id: str, key_id: str | None) -> tuple[int, int | None]:
    """The account's available balance, and what the key's spend limit leaves for new holds (None: no limit),
    as meterline_reserve would read them now (its credit grants brought to the clock first, as it does)."""
    row = await conn.fetchrow(_COVERABLE, account_id, key_id)
    if row is not None and row["due"]:
        await bring_forward(conn, account_id)
        row = await conn.fetchrow(_COVERABLE, account_id, key_id)
    if row is None:
        return 0, None
    return int(row["available"]), row["key_left"]


async def available_micros(conn: Executor, account_id: str) -> int:
    """The account's available balance, as meterline_reserve would read it now."""
    available, _ = await coverable_micros(conn, account_id, None)
    return available
