"""Per-key limits: spend limits with daily/weekly/monthly windows, usage totals, and request-rate counters.

The spend limit itself is enforced by meterline_reserve (schema.sql) under the same locks as the balance;
this module sets limits, reports a key's standing, and counts requests against its rpm/rpd limits, each
decision one statement in PostgreSQL. Windows start at 00:00 UTC and weeks on Monday; the clock is
`meterline_now()`, which a connection may pin with `SET meterline.now = '...'`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from billing import keys
from billing.db import Executor
from billing.errors import InvalidAmount, KeyNotFound
from billing.keys import KEY_COLUMNS, set_detailed_logging

RESETS = ("daily", "weekly", "monthly")
RPM_RANGE = (1, 1000)
RPD_RANGE = (1, 10_000)
LIMIT_FIELDS = ("limit_micros", "limit_reset", "rpm_limit", "rpd_limit")

def check_limits(changes: dict[str, Any]) -> None:
    """Refuse values the database would refuse too, with a sentence naming the field."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise InvalidAmount(f"unknown limit fields: {', '.join(sorted(unknown))}")
    limit = changes.get("limit_micros")
    if limit is not None and limit < 0:
        raise InvalidAmount("limit_micros must be zero or more")
    reset = changes.get("limit_reset")
    if reset is not None and reset not in RESETS:
        raise InvalidAmount("limit_reset must be daily, weekly, monthly or null")
    for name, (low, high) in (("rpm_limit", RPM_RANGE), ("rpd_limit", RPD_RANGE)):
        value = changes.get(name)
        if value is not None and not low <= value <= high:
            raise InvalidAmount(f"{name} must be between {low} and {high}")


async def set_key_limits(conn: Executor, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply the given limit fields (a missing field is left as it is, None clears it); returns the key row.

    When the spend limit or its reset changes, the key's spend in the new current window is recomputed from
    the ledger in the same statement, so a limit set mid-month counts what the key already spent this month.
    """
    check_limits(changes)
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as connection:
            return await set_key_limits(connection, key_id, changes)
    spend_changed = "limit_micros" in changes or "limit_reset" in changes
    async with conn.transaction():
        if spend_changed:
            # Lock the key's account first, the order every money path takes: settlements in flight on it
            # commit before the recount, which (a new statement, so a fresh snapshot) then counts their charges;
            # later ones wait for this limit and add to it.
            await conn.execute("SELECT 1 FROM accounts a JOIN api_keys k ON k.account_id = a.id"
                               " WHERE k.id = $1 FOR UPDATE OF a", key_id)
        return await _apply_limits(conn, key_id, changes, spend_changed)


async def create_key(pool: asyncpg.Pool, *, account_id: str, name: str | None, detailed_logging: bool,
                     changes: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Mint a key with its limits and settings in one transaction; returns (the row, the secret, shown once)."""
    async with pool.acquire() as conn, conn.transaction():
        row, secret = await keys.create_key(conn, account_id=account_id, name=name, detailed_logging=detailed_logging)
        if changes:
            row = await set_key_limits(conn, row["id"], changes)
        return row, secret


async def update_key(pool: asyncpg.Pool, key_id: str, changes: dict[str, Any], *,
                     detailed_logging: bool | None = None) -> dict[str, Any]:
    """Limits (as `set_key_limits`) and, when given, Detailed Logging, in one transaction; returns the key row."""
    async with pool.acquire() as conn, conn.transaction():
        row = await set_key_limits(conn, key_id, changes)
        if detailed_logging is not None:
            row = await set_detailed_logging(conn, key_id, detailed_logging)
        return row


async def _apply_limits(conn: Executor, key_id: str, changes: dict[str, Any], spend_changed: bool) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"""
        WITH new AS (
            SELECT CASE WHEN $2 THEN $3::bigint ELSE k.limit_micros END AS limit_micros,
                   CASE WHEN $4 THEN $5::text ELSE k.limit_reset END AS limit_reset,
                   CASE WHEN $6 THEN $7::integer ELSE k.rpm_limit END AS rpm_limit,
                   CASE WHEN $8 THEN $9::integer ELSE k.rpd_limit END AS rpd_limit
              FROM api_keys k WHERE k.id = $1
        )
        UPDATE api_keys k
           SET limit_micros = new.limit_micros, limit_reset = new.limit_reset,
               rpm_limit = new.rpm_limit, rpd_limit = new.rpd_limit,
               window_start = CASE WHEN $10 THEN meterline_window_start(new.limit_reset, meterline_now())
                              ELSE k.window_start END,
               window_spent_micros = CASE WHEN $10 THEN (
                   SELECT COALESCE(sum(t.amount_micros), 0)::bigint
                     FROM holds h JOIN transfers t ON t.request_id = h.request_id
                    WHERE h.key_id = k.id
                      AND t.created_at >= meterline_window_start(new.limit_reset, meterline_now()))
                   ELSE k.window_spent_micros END
          FROM new
         WHERE k.id = $1
        RETURNING {", ".join("k." + c.strip() for c in KEY_COLUMNS.split(","))}
        """,
        key_id,
        "limit_micros" in changes, changes.get("limit_micros"),
        "limit_reset" in changes, changes.get("limit_reset"),
        "rpm_limit" in changes, changes.get("rpm_limit"),
        "rpd_limit" in changes, changes.get("rpd_limit"),
        spend_changed,
    )
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


async def key_status(conn: Executor, key_id: str) -> dict[str, Any]:
    """The key's limits, what is left of its spend limit, and its charges all-time, today, this week and this
    month (UTC windows), summed from the ledger's charge transfers."""
    row = await conn.fetchrow(
        """
        WITH k AS (
            SELECT k.*, meterline_now() AS at,
                   CASE WHEN k.window_start IS NOT DISTINCT FROM
                             meterline_window_start(k.limit_reset, meterline_now())
                        THEN k.window_spent_micros ELSE 0 END AS spent
              FROM api_keys k WHERE k.id = $1
        )
        SELECT k.id, k.name, k.prefix, k.limit_micros, k.limit_reset, k.rpm_limit, k.rpd_limit,
               k.held_micros, k.spent AS window_spent_micros,
               k.limit_micros - k.spent - k.held_micros AS limit_remaining_micros,
               CASE WHEN k.limit_reset IS NULL THEN NULL
                    ELSE meterline_window_end(k.limit_reset, k.at) END AS limit_resets_at,
               COALESCE(u.total, 0)::bigint AS usage_micros,
               COALESCE(u.daily, 0)::bigint AS usage_daily_micros,
               COALESCE(u.weekly, 0)::bigint AS usage_weekly_micros,
               COALESCE(u.monthly, 0)::bigint AS usage_monthly_micros
          FROM k
          LEFT JOIN LATERAL (
              SELECT sum(t.amount_micros) AS total,
                     sum(t.amount_micros)
                         FILTER (WHERE t.created_at >= meterline_window_start('daily', k.at)) AS daily,
                     sum(t.amount_micros)
                         FILTER (WHERE t.created_at >= meterline_window_start('weekly', k.at)) AS weekly,
                     sum(t.amount_micros)
                         FILTER (WHERE t.created_at >= meterline_window_start('monthly', k.at)) AS monthly
                FROM holds h JOIN transfers t ON t.request_id = h.request_id
               WHERE h.key_id = k.id AND t.created_at <= k.at
          ) u ON true
        """,
        key_id,
    )
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of counting one request. A count is None for a window the key has no limit for."""

    allowed: bool
    minute_count: int | None
    minute_reset: datetime
    day_count: int | None
    day_reset: datetime
    at: datetime  # the database clock the windows were computed from, for Retry-After


async def count_request(
    conn: Executor, key_id: str, *, rpm_limit: int | None, rpd_limit: int | None
) -> RateDecision:
    """Count one request against the key's per-minute and per-day limits, atomically in PostgreSQL (so every
    process sharing the database shares the limits). A refused request is counted in neither window."""
    row = await conn.fetchrow("SELECT * FROM meterline_rate_hit($1, $2, $3)", key_id, rpm_limit, rpd_limit)
    assert row is not None
    return RateDecision(
        allowed=row["allowed"],
        minute_count=row["minute_count"] if rpm_limit is not None else None,
        minute_reset=row["minute_reset"],
        day_count=row["day_count"] if rpd_limit is not None else None,
        day_reset=row["day_reset"],
        at=row["at"],
    )
