"""Credit grants (issue 16): every credit a customer account holds, and the order it is spent in.

A grant is credit with a `category` (`paid`: top-ups, Stripe payments and positive adjustments; `promotional`: granted
by an admin), a `priority` (0-100, lower spent first; 50 unless given), an `effective_at` (before it, the grant is not
in the balance) and an optional `expires_at`. Every decision is made in PostgreSQL under the account's row lock (the
`meterline_grant*` functions in schema.sql):

    spending order   promotional before paid, then lower priority, then earliest expiry (none last), then earliest
                     effective, then oldest. A charge is drawn in that order inside meterline_settle; a refund
                     or a negative adjustment takes back paid credit first.
    holds            are taken against the whole available balance, as before grants.
    effective_at     a future grant is posted (its credit transfer written) when its time comes.
    expires_at       the unspent remainder is transferred to the operator account op_expired. A hold pending at
                     that moment keeps the expired credit it needs: only what the unexpired credit and the pending
                     holds leave uncovered expires at once, the rest is drawn last by those holds' charges (the
                     available balance stays zero meanwhile, so nothing new can spend it) and expires as soon as
                     they are resolved. A charge settling after its credit expired is therefore paid from it in
                     full, never turned into debt, and no expiry takes the available balance below zero.
    on time          every money step on the account (a hold, a charge, a void, a posting) first brings its grants
                     to the clock, and a sweeper (`sweep`, safe in any number of processes) does it for accounts
                     nobody touches, so an expiry's transfer is written within one sweep interval of expires_at.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing import idempotency, ledger
from billing.db import Executor
from billing.errors import AccountNotFound, InvalidAmount, InvalidRule
from billing.exports import iso_utc
from billing.money import check_range

CATEGORIES = ("paid", "promotional")
DEFAULT_PRIORITY = 50
_GRANT_COLUMNS = """
    id, account_id, category, priority, amount_micros, remaining_micros, spent_micros, expired_micros,
    effective_at, expires_at, description, transfer_id, posted_at, created_at
"""


def status(row: dict[str, Any], now: datetime) -> str:
    """scheduled (not effective yet), active, spent (nothing left) or expired (its expiry has passed)."""
    if row["posted_at"] is None:
        return "scheduled"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    return "active" if row["remaining_micros"] > 0 else "spent"


def check_grant(*, category: str, amount_micros: int, priority: int, effective_at: datetime | None,
                expires_at: datetime | None, now: datetime) -> None:
    """The checks meterline_grant makes, worded for a person (it refuses the same grants with SQLSTATE 22023)."""
    check_range(amount_micros)
    if category not in CATEGORIES:
        raise InvalidRule(f"category must be one of {', '.join(CATEGORIES)}", "category")
    if amount_micros <= 0:
        raise InvalidRule("a grant must be a positive amount", "amount_micros")
    if not 0 <= priority <= 100:
        raise InvalidRule("priority must be between 0 and 100", "priority")
    if expires_at is not None:
        if expires_at <= now:
            raise InvalidRule("expires_at must be in the future", "expires_at")
        if effective_at is not None and expires_at <= effective_at:
            raise InvalidRule("expires_at must be after effective_at", "expires_at")


async def create_grant(conn: Executor, *, account_id: str, category: str, amount_micros: int,
                       priority: int = DEFAULT_PRIORITY, effective_at: datetime | None = None,
                       expires_at: datetime | None = None, description: str | None = None) -> dict[str, Any]:
    """Grant credit to the account (posted now unless `effective_at` is later). Raises InvalidAmount or
    AccountNotFound."""
    now = await conn.fetchval("SELECT meterline_now()")
    check_grant(category=category, amount_micros=amount_micros, priority=priority, effective_at=effective_at,
                expires_at=expires_at, now=now)
    try:
        row = await conn.fetchrow(f"SELECT {_GRANT_COLUMNS} FROM meterline_grant($1, $2, $3, $4, $5, $6, $7)",
                                  account_id, category, amount_micros, priority, effective_at, expires_at,
                                  description)
    except asyncpg.PostgresError as exc:
        code = getattr(exc, "sqlstate", None)
        if code == "ML003":
            raise AccountNotFound(account_id) from None
        if code == "22023":  # the clock moved between the check and the grant
            raise InvalidRule("the grant's expiry must be in the future and after its effective time",
                              "expires_at") from None
        if isinstance(exc, asyncpg.NumericValueOutOfRangeError):
            raise InvalidAmount("this grant would take the balance past the range of a 64-bit integer") from None
        raise
    assert row is not None
    return render(dict(row), now)


async def grant_once(pool: asyncpg.Pool, *, idempotency_key: str, **grant: Any) -> tuple[dict[str, Any], bool]:
    """`create_grant` under an idempotency key, as ledger.post_once: returns (grant, replayed). The same key with
    another grant raises IdempotencyConflict (the API and the CLI share keys)."""
    fingerprint = ledger.request_fingerprint(
        "grant", grant["account_id"], grant["amount_micros"], grant["category"],
        grant.get("priority", DEFAULT_PRIORITY),
        *(None if grant.get(name) is None else grant[name].astimezone(UTC).isoformat()  # one instant, one spelling
          for name in ("effective_at", "expires_at")),
        grant.get("description"))
    async with pool.acquire() as conn, conn.transaction():
        claim = idempotency.Claim("grant", idempotency_key)
        stored = await idempotency.claim(conn, claim, fingerprint=fingerprint)
        if stored is not None:
            return stored.response, True
        result = await create_grant(conn, **grant)
        await idempotency.store(conn, claim, status_code=201, response=result)
        return result, False


def render(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else iso_utc(value)

    return {
        "id": row["id"], "object": "credit_grant", "account_id": row["account_id"], "category": row["category"],
        "priority": row["priority"], "status": status(row, now), "amount_micros": row["amount_micros"],
        "remaining_micros": row["remaining_micros"], "spent_micros": row["spent_micros"],
        "expired_micros": row["expired_micros"], "effective_at": iso(row["effective_at"]),
        "expires_at": iso(row["expires_at"]), "description": row["description"],
        "transfer_id": row["transfer_id"], "created_at": iso(row["created_at"]),
    }


async def list_grants(conn: Executor, account_id: str, *, limit: int,
                      after: str | None = None) -> list[dict[str, Any]]:
    """The account's grants, newest first, `limit` at a time after the grant `after`. Raises AccountNotFound."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await list_grants(own, account_id, limit=limit, after=after)
    account = await conn.fetchrow("SELECT COALESCE(grants_due_at <= meterline_now(), false) AS due,"
                                  " meterline_now() AS now FROM accounts WHERE id = $1 AND kind = 'customer'",
                                  account_id)
    if account is None:
        raise AccountNotFound(account_id)
    if account["due"]:
        await ledger.bring_forward(conn, account_id)
    now = account["now"]
    rows = await conn.fetch(
        f"""SELECT {_GRANT_COLUMNS} FROM credit_grants
             WHERE account_id = $1
               AND ($2::text IS NULL OR (created_at, id) < (SELECT created_at, id FROM credit_grants
                                                            WHERE id = $2 AND account_id = $1))
             ORDER BY created_at DESC, id DESC LIMIT $3""",
        account_id, after, limit)
    return [render(dict(r), now) for r in rows]


_PARTS_SQL = """
    SELECT a.grants_due_at <= meterline_now() AS due,
           a.credits_posted - a.debits_posted AS balance_micros, a.held_micros,
           a.credits_posted - a.debits_posted - a.held_micros AS available_micros,
           COALESCE(p.paid, 0)::bigint AS paid_micros, COALESCE(p.promotional, 0)::bigint AS promotional_micros,
           n.at AS next_expiry_at, COALESCE(n.micros, 0)::bigint AS next_expiry_micros
      FROM accounts a
      LEFT JOIN LATERAL (
          SELECT sum(g.remaining_micros) FILTER (WHERE g.category = 'paid') AS paid,
                 sum(g.remaining_micros) FILTER (WHERE g.category = 'promotional') AS promotional
            FROM credit_grants g WHERE g.account_id = a.id AND g.remaining_micros > 0) p ON true
      LEFT JOIN LATERAL (
          SELECT g.expires_at AS at, sum(g.remaining_micros) AS micros
            FROM credit_grants g
           WHERE g.account_id = a.id AND g.remaining_micros > 0 AND g.expires_at > meterline_now()
           GROUP BY g.expires_at ORDER BY g.expires_at LIMIT 1) n ON true
     WHERE a.id = $1 AND a.kind = 'customer'
"""


async def balance_parts(conn: Executor, account_id: str) -> dict[str, Any]:
    """The account's balance figures with its credit split by category and its next expiry (when, and how much
    of the credit left expires then), with the grants brought to the clock first. Raises AccountNotFound."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await balance_parts(own, account_id)
    row = await conn.fetchrow(_PARTS_SQL, account_id)
    if row is not None and row["due"]:
        await ledger.bring_forward(conn, account_id)
        row = await conn.fetchrow(_PARTS_SQL, account_id)
    if row is None:
        raise AccountNotFound(account_id)
    return dict(row)


async def sweep(conn: Executor, *, limit: int = 500) -> int:
    """Bring up to `limit` accounts whose grants are due (an effective time or an expiry has come) to the clock;
    returns how many. Safe to run in any number of processes at once."""
    count: int = await conn.fetchval("SELECT meterline_grants_sweep($1)", limit)
    return count
