"""Finance reports: margin (what we charged against what the upstream charged us) and reconciliation flags.

Revenue is the settled cost of request records; upstream cost is what the upstream reported per call
(OpenRouter's `usage.cost`, stored as `requests.upstream_cost_micros`); calls with no reported cost count as 0
upstream cost and are counted separately so finance can see how complete the figure is.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.db import Executor
from billing.errors import InvalidAmount

GROUPS = {
    "model": "COALESCE(model, '')",
    "day": "to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "account": "account_id",
    # The provider that served the call; records from before providers (or of single-upstream models) by upstream.
    "provider": "COALESCE(provider, upstream, '')",
}

FLAG_KINDS = ("estimated", "overrun", "expired_then_settled", "expired_unsettled", "in_flight_unsettled")


def _period(start: datetime, end: datetime) -> None:
    if end <= start:
        raise InvalidAmount("the report period must end after it starts (to > from)")


async def margin(conn: Executor, *, start: datetime, end: datetime, group_by: str) -> list[dict[str, Any]]:
    """Per group: request count, revenue, upstream cost and margin in micros, for records created in
    [start, end)."""
    _period(start, end)
    key = GROUPS.get(group_by)
    if key is None:
        raise InvalidAmount(f"group_by must be one of {', '.join(GROUPS)}")
    rows = await conn.fetch(
        f"""
        SELECT {key} AS key, count(*) AS requests,
               count(*) FILTER (WHERE upstream_cost_micros IS NOT NULL) AS with_upstream_cost,
               COALESCE(sum(cost_micros) FILTER (WHERE billing_status = 'settled'), 0)::bigint
                   AS revenue_micros,
               COALESCE(sum(upstream_cost_micros), 0)::bigint AS upstream_cost_micros
          FROM requests
         WHERE created_at >= $1 AND created_at < $2
         GROUP BY 1 ORDER BY 1
        """,
        start, end,
    )
    return [{**dict(r), "margin_micros": r["revenue_micros"] - r["upstream_cost_micros"]} for r in rows]


_FLAGS_SQL = """
    SELECT * FROM (
        SELECT 'estimated' AS kind, t.request_id, t.account_id, t.created_at, t.amount_micros,
               h.amount_micros AS hold_micros, t.overrun_micros
          FROM transfers t LEFT JOIN holds h ON h.request_id = t.request_id
         WHERE t.kind = 'charge' AND t.estimated AND t.created_at >= $1 AND t.created_at < $2
        UNION ALL
        SELECT 'overrun', t.request_id, t.account_id, t.created_at, t.amount_micros, h.amount_micros,
               t.overrun_micros
          FROM transfers t LEFT JOIN holds h ON h.request_id = t.request_id
         WHERE t.kind = 'charge' AND t.overrun_micros > 0 AND t.created_at >= $1 AND t.created_at < $2
        UNION ALL
        SELECT CASE WHEN h.state = 'settled' THEN 'expired_then_settled' ELSE 'expired_unsettled' END,
               h.request_id, h.account_id, h.created_at, COALESCE(h.actual_micros, 0), h.amount_micros,
               h.overrun_micros
          FROM holds h
         WHERE (h.expired_first OR h.state = 'expired') AND h.created_at >= $1 AND h.created_at < $2
        UNION ALL
        -- Calls a process admitted under its quota and never charged: it died with them in flight. Its last intent
        -- record names them (billing.quotas); its quota expired when it stopped renewing it.
        SELECT 'in_flight_unsettled', f.id, q.account_id, f.at, 0::bigint, f.micros, 0::bigint
          FROM quotas q
         CROSS JOIN LATERAL jsonb_to_recordset(q.in_flight) AS f(id text, micros bigint, at timestamptz)
         WHERE q.state = 'expired' AND f.at >= $1 AND f.at < $2
           AND NOT EXISTS (SELECT 1 FROM holds h WHERE h.request_id = f.id)
    ) f
"""


async def flags(
    conn: Executor, *, start: datetime, end: datetime, limit: int
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Charges finance should look at in [start, end): (counts per kind, the first `limit` flags by time).

    A charge can carry two flags (estimated and an overrun); a hold that expired is flagged whether or not its
    late charge arrived; a call in flight under a quota whose process died is `in_flight_unsettled`.
    """
    _period(start, end)
    counts = {kind: 0 for kind in FLAG_KINDS}
    by_kind = f"SELECT kind, count(*) AS n FROM ({_FLAGS_SQL}) x GROUP BY kind"
    for row in await conn.fetch(by_kind, start, end):
        counts[row["kind"]] = row["n"]
    rows = await conn.fetch(
        f"{_FLAGS_SQL} ORDER BY created_at, request_id, kind LIMIT $3", start, end, limit
    )
    return counts, [dict(r) for r in rows]


async def hold_backlog(conn: Executor) -> tuple[int, int]:
    """What the alerts watch, as PostgreSQL counts it now: holds still pending past their expiry (the sweeper is
    not keeping up, or not running), and holds that expired with no charge ever arriving (`expired_unsettled`
    in `flags`, over all time). One statement; both counts use partial indexes on holds."""
    row = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM holds WHERE state = 'pending' AND expires_at < now()) AS past_expiry,"
        " (SELECT count(*) FROM holds WHERE state = 'expired') AS expired_unsettled")
    assert row is not None
    return int(row["past_expiry"]), int(row["expired_unsettled"])
