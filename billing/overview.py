"""What the console's pages show at a glance, each read one statement: the operator's overview, and an account's
keys with where each stands against its limits."""

from __future__ import annotations

from typing import Any

from billing.db import Executor


async def overview(conn: Executor, *, low_balance_micros: int, limit: int = 20) -> dict[str, Any]:
    """Accounts, money held and pending, and the accounts that are overdrawn or running low (available balance
    below `low_balance_micros`), lowest first."""
    totals = await conn.fetchrow(
        """SELECT count(*) AS accounts,
                  COALESCE(sum(credits_posted - debits_posted), 0)::bigint AS balance_micros,
                  COALESCE(sum(held_micros), 0)::bigint AS held_micros,
                  count(*) FILTER (WHERE credits_posted - debits_posted - held_micros < 0) AS negative
             FROM accounts WHERE kind = 'customer'""")
    pending = await conn.fetchrow(
        "SELECT count(*) AS holds, COALESCE(sum(amount_micros), 0)::bigint AS micros FROM holds"
        " WHERE state = 'pending'")
    low = await conn.fetch(
        """SELECT id, name, credits_posted - debits_posted AS balance_micros, held_micros,
                  credits_posted - debits_posted - held_micros AS available_micros
             FROM accounts WHERE kind = 'customer' AND credits_posted - debits_posted - held_micros < $1
            ORDER BY available_micros, id LIMIT $2""",
        low_balance_micros, limit)
    assert totals is not None and pending is not None
    return {**dict(totals), "pending_holds": pending["holds"], "pending_micros": pending["micros"],
            "low": [dict(r) for r in low]}


async def account_keys(conn: Executor, account_id: str) -> list[dict[str, Any]]:
    """The account's keys (never a secret or digest) with their limits, what each spent in its current window and
    when that window resets."""
    rows = await conn.fetch(
        """SELECT k.id, k.name, k.prefix, k.created_at, k.revoked_at, k.limit_micros, k.limit_reset, k.rpm_limit,
                  k.rpd_limit, k.detailed_logging, k.held_micros,
                  CASE WHEN k.window_start IS NOT DISTINCT FROM meterline_window_start(k.limit_reset, meterline_now())
                       THEN k.window_spent_micros ELSE 0 END AS window_spent_micros,
                  CASE WHEN k.limit_reset IS NULL THEN NULL
                       ELSE meterline_window_end(k.limit_reset, meterline_now()) END AS limit_resets_at
             FROM api_keys k WHERE k.account_id = $1 ORDER BY k.created_at, k.id""",
        account_id)
    return [dict(r) for r in rows]
