"""Daily rollups of the request records (`usage_daily`): what the console's charts and figures read.

meterline_record counts every request record into its UTC day's row (day, account, key, model, modality) in the
settlement's own transaction, so the rollups always equal the request records, and their cost the ledger's charges:
a test proves it to the micro over a randomized history. `rebuild` recomputes days from the records (after a bulk
import, or to check), safely while the gateway runs.

Periods are [start, end) in whole UTC days.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from billing.db import Executor
from billing.errors import InvalidAmount

METRICS = {"cost": "cost_micros", "requests": "requests", "tokens": "prompt_tokens + completion_tokens",
           "errors": "errors"}
GROUPS = {"day": "day::text", "model": "model", "key": "key_id", "account": "account_id", "modality": "modality"}
MAX_DAYS = 3_660


def check_period(start: date, end: date) -> None:
    if end <= start:
        raise InvalidAmount("the period's end must be after its start")
    if (end - start).days > MAX_DAYS:
        raise InvalidAmount(f"a period is at most {MAX_DAYS} days")


async def daily(conn: Executor, *, start: date, end: date, account_id: str | None = None) -> list[dict[str, Any]]:
    """Every day of the period (days without calls included, as zeros) with its requests, errors, tokens and cost,
    and the top-ups credited that day (from the ledger: top-ups are few)."""
    check_period(start, end)
    rows = await conn.fetch(
        """WITH days AS (SELECT d::date AS day FROM generate_series($1::date, $2::date - 1, interval '1 day') d),
                used AS (SELECT day, sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
                                sum(prompt_tokens + completion_tokens)::bigint AS tokens,
                                sum(cost_micros)::bigint AS cost_micros
                           FROM usage_daily
                          WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR account_id = $3)
                          GROUP BY day),
                topups AS (SELECT (created_at AT TIME ZONE 'UTC')::date AS day, sum(amount_micros)::bigint AS micros
                             FROM transfers
                            WHERE kind = 'topup' AND created_at >= ($1::timestamp AT TIME ZONE 'UTC')
                              AND created_at < ($2::timestamp AT TIME ZONE 'UTC')
                              AND ($3::text IS NULL OR account_id = $3)
                            GROUP BY 1)
           SELECT days.day, COALESCE(u.requests, 0) AS requests, COALESCE(u.errors, 0) AS errors,
                  COALESCE(u.tokens, 0) AS tokens, COALESCE(u.cost_micros, 0) AS cost_micros,
                  COALESCE(t.micros, 0) AS topup_micros
             FROM days LEFT JOIN used u USING (day) LEFT JOIN topups t USING (day)
            ORDER BY days.day""",
        start, end, account_id)
    return [dict(r) for r in rows]


def _grouped_sql(metric: str, group_by: str) -> str:
    """Rows (day, grp, value) of the period; only names from METRICS and GROUPS are interpolated."""
    if metric not in METRICS:
        raise InvalidAmount(f"metric must be one of {', '.join(METRICS)}")
    if group_by not in GROUPS:
        raise InvalidAmount(f"group_by must be one of {', '.join(GROUPS)}")
    return f"""SELECT day, {GROUPS[group_by]} AS grp, sum({METRICS[metric]})::bigint AS value
                 FROM usage_daily
                WHERE day >= $1 AND day < $2 AND ($3::text IS NULL OR account_id = $3)
                GROUP BY day, grp"""


@dataclass(frozen=True, slots=True)
class Explored:
    """A metric over a period by group: every group's total, largest first, and per day the `top` largest groups
    (the rest summed under `grp` None)."""

    totals: list[tuple[str, int]]
    series: list[dict[str, Any]]  # day, grp (None: the other groups), value


async def explore(conn: Executor, *, metric: str, group_by: str, start: date, end: date,
                  account_id: str | None = None, top: int = 6) -> Explored:
    """`metric` over the period grouped by `group_by`, ranked and cut to the `top` groups per day in PostgreSQL
    (every group's total, each day's total, and per day only the top groups: "other" is the day's total less
    theirs), so a long period over many accounts costs three aggregates, never one row per day and group."""
    check_period(start, end)
    _grouped_sql(metric, group_by)  # checks both names
    value, grp = METRICS[metric], GROUPS[group_by]
    where = "day >= $1 AND day < $2 AND ($3::text IS NULL OR account_id = $3)"
    rows = await conn.fetch(
        f"""WITH ranked AS (SELECT grp, total, row_number() OVER (ORDER BY total DESC, grp) AS rank
                              FROM (SELECT {grp} AS grp, sum({value})::bigint AS total FROM usage_daily
                                     WHERE {where} GROUP BY 1) t),
                 days AS (SELECT day, sum({value})::bigint AS total FROM usage_daily WHERE {where} GROUP BY day),
                 tops AS (SELECT day, {grp} AS grp, sum({value})::bigint AS value FROM usage_daily
                           WHERE {where} AND {grp} IN (SELECT grp FROM ranked WHERE rank <= $4) GROUP BY 1, 2)
            SELECT 'total' AS part, NULL::date AS day, grp, total AS value, rank FROM ranked
            UNION ALL
            SELECT 'series', t.day, t.grp, t.value, r.rank FROM tops t JOIN ranked r USING (grp)
            UNION ALL
            SELECT 'series', d.day, NULL, d.total - COALESCE(sum(t.value), 0)::bigint, $4 + 1
              FROM days d LEFT JOIN tops t USING (day)
             GROUP BY d.day, d.total HAVING d.total <> COALESCE(sum(t.value), 0)
            ORDER BY 1 DESC, 5, 2""",
        start, end, account_id, top)
    totals = [(r["grp"], r["value"]) for r in rows if r["part"] == "total"]
    series = [{"day": r["day"], "grp": r["grp"], "value": r["value"]} for r in rows if r["part"] == "series"]
    return Explored(totals, series)


async def explore_rows(conn: Executor, *, metric: str, group_by: str, start: date, end: date,
                       account_id: str | None = None) -> list[dict[str, Any]]:
    """Every (day, grp, value) of the period, by day then group (for a CSV)."""
    check_period(start, end)
    rows = await conn.fetch(f"{_grouped_sql(metric, group_by)} ORDER BY day, grp", start, end, account_id)
    return [dict(r) for r in rows]


async def rebuild(conn: Executor, *, start: date, end: date) -> int:
    """Recompute the rollups of the period from the request records; returns the rows written."""
    check_period(start, end)
    return int(await conn.fetchval("SELECT meterline_rollup_rebuild($1, $2)", start, end))
