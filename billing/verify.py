"""Ledger invariants, checked from the database alone (`meterline verify` and the tests call `verify`)."""

from __future__ import annotations

from billing.db import Executor

# Each check is a query returning one row per violation, with a human sentence in `problem`.
_CHECKS: dict[str, str] = {
    "zero-sum": """
        SELECT format('the accounts do not sum to zero: their balances total %s micros', total) AS problem
          FROM (SELECT sum(bal) AS total FROM (
                  SELECT credit_account_id AS acct, amount_micros AS bal FROM transfers
                  UNION ALL
                  SELECT debit_account_id, -amount_micros FROM transfers) x) s
         WHERE total <> 0
    """,
    "cached-balance": """
        SELECT format('account %s caches credits %s / debits %s but its transfers sum to %s / %s',
                      a.id, a.credits_posted, a.debits_posted, COALESCE(c.total, 0), COALESCE(d.total, 0)) AS problem
          FROM accounts a
          LEFT JOIN (SELECT credit_account_id AS id, sum(amount_micros) AS total
                       FROM transfers GROUP BY 1) c ON c.id = a.id
          LEFT JOIN (SELECT debit_account_id AS id, sum(amount_micros) AS total
                       FROM transfers GROUP BY 1) d ON d.id = a.id
         WHERE a.kind = 'customer'
           AND (a.credits_posted <> COALESCE(c.total, 0) OR a.debits_posted <> COALESCE(d.total, 0))
    """,
    "cached-holds": """
        SELECT format('account %s caches %s micros held but its pending holds and quotas sum to %s',
                      a.id, a.held_micros, COALESCE(h.total, 0) + COALESCE(q.total, 0)) AS problem
          FROM accounts a
          LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM holds
                      WHERE state = 'pending' GROUP BY 1) h ON h.account_id = a.id
          LEFT JOIN (SELECT account_id, sum(amount_micros) AS total FROM quotas
                      WHERE state = 'pending' GROUP BY 1) q ON q.account_id = a.id
         WHERE a.kind = 'customer' AND a.held_micros <> COALESCE(h.total, 0) + COALESCE(q.total, 0)
    """,
    "quotas": """
        SELECT format('quota %s says its calls drew %s micros from it but their charges drew %s',
                      q.id, q.drawn_micros, COALESCE(c.total, 0)) AS problem
          FROM quotas q
          LEFT JOIN (SELECT quota_id, sum(LEAST(amount_micros, actual_micros)) AS total FROM holds
                      WHERE quota_id IS NOT NULL AND state = 'settled' AND NOT expired_first GROUP BY 1) c
                 ON c.quota_id = q.id
         WHERE q.drawn_micros <> COALESCE(c.total, 0)
        UNION ALL
        SELECT format('quota %s expired at %s but is still pending at %s', id, expires_at, now())
          FROM quotas
         WHERE state = 'pending' AND expires_at < now() - make_interval(secs => $1)
    """,
    "key-holds": """
        SELECT format('key %s caches %s micros held but its pending limited holds sum to %s',
                      k.id, k.held_micros, COALESCE(h.total, 0)) AS problem
          FROM api_keys k
          LEFT JOIN (SELECT key_id, sum(amount_micros) AS total FROM holds
                      WHERE state = 'pending' AND key_limited GROUP BY 1) h ON h.key_id = k.id
         WHERE k.held_micros <> COALESCE(h.total, 0)
    """,
    "stale-holds": """
        SELECT format('hold %s expired at %s but is still pending at %s (%s later)', request_id, expires_at, now(),
                      date_trunc('second', now() - expires_at)) AS problem
          FROM holds
         WHERE state = 'pending' AND expires_at < now() - make_interval(secs => $1)
    """,
    "charges": """
        SELECT format('settled hold %s charged %s micros but its charge transfer says %s',
                      h.request_id, h.actual_micros, COALESCE(t.amount_micros || ' micros', 'nothing (there is none)'))
               AS problem
          FROM holds h LEFT JOIN transfers t ON t.request_id = h.request_id
         WHERE h.state = 'settled' AND t.amount_micros IS DISTINCT FROM h.actual_micros
        UNION ALL
        SELECT format('charge transfer %s of %s micros for request %s has no settled hold: the hold is %s',
                      t.id, t.amount_micros, t.request_id, COALESCE(h.state, 'missing'))
          FROM transfers t LEFT JOIN holds h ON h.request_id = t.request_id
         WHERE t.kind = 'charge' AND h.state IS DISTINCT FROM 'settled'
    """,
    "overdraft": """
        SELECT format('account %s is %s micros below zero available, more than its overruns of %s',
                      a.id, -(a.credits_posted - a.debits_posted - a.held_micros), COALESCE(o.total, 0)) AS problem
          FROM accounts a
          LEFT JOIN (SELECT account_id, sum(overrun_micros) AS total FROM transfers GROUP BY 1) o
                 ON o.account_id = a.id
         WHERE a.kind = 'customer'
           AND a.credits_posted - a.debits_posted - a.held_micros < -COALESCE(o.total, 0)
    """,
    "grants": """
        SELECT format('account %s has %s micros left in its credit grants but a balance of %s',
                      a.id, COALESCE(g.total, 0), a.credits_posted - a.debits_posted) AS problem
          FROM accounts a
          LEFT JOIN (SELECT account_id, sum(remaining_micros) AS total FROM credit_grants GROUP BY 1) g
                 ON g.account_id = a.id
         WHERE a.kind = 'customer' AND COALESCE(g.total, 0) <> GREATEST(0, a.credits_posted - a.debits_posted)
    """,
    "grant-transfers": """
        SELECT format('grant %s of %s micros was credited by transfer %s of %s', g.id, g.amount_micros,
                      g.transfer_id, COALESCE(t.amount_micros || ' micros', 'nothing (there is none)')) AS problem
          FROM credit_grants g LEFT JOIN transfers t ON t.id = g.transfer_id AND t.grant_id = g.id
         WHERE g.transfer_id IS NOT NULL AND t.amount_micros IS DISTINCT FROM g.amount_micros
        UNION ALL
        SELECT format('grant %s says %s micros expired but its expiry transfers sum to %s', g.id, g.expired_micros,
                      COALESCE(e.total, 0))
          FROM credit_grants g
          LEFT JOIN (SELECT grant_id, sum(amount_micros) AS total FROM transfers WHERE kind = 'expiry' GROUP BY 1) e
                 ON e.grant_id = g.id
         WHERE g.expired_micros <> COALESCE(e.total, 0)
    """,
}


async def verify(conn: Executor, *, stale_after_seconds: float = 60.0) -> list[str]:
    """Every violated invariant as a sentence naming it; an empty list means the ledger is sound.

    `stale_after_seconds` is how long past its expiry a pending hold may wait for the sweeper.
    """
    problems: list[str] = []
    for name, query in _CHECKS.items():
        args = (stale_after_seconds,) if "$1" in query else ()
        for row in await conn.fetch(query, *args):
            problems.append(f"{name}: {row['problem']}")
    return problems
