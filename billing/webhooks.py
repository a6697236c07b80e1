"""Webhooks: endpoints, per-account signing secrets, and the outbox they are delivered from.

An event is written by `meterline_webhook_emit` in the same transaction as the change that causes it (a top-up in
`meterline_post`, a video's settlement or void in billing.videos), with one delivery per subscribed endpoint: no
event without its cause, no cause without its event, across crashes. Delivery workers (gateway.webhook_worker, one
in every process) take due deliveries under a lease with FOR UPDATE SKIP LOCKED, so one attempt runs at a time
across processes and a lease left by a killed process runs out and is taken again. Every attempt is recorded.

The outcome of an attempt is decided here, in one transaction with its record:
- a 2xx delivers;
- a 410 disables its endpoint at once (and its pending deliveries are cancelled);
- anything else (3xx included: redirects are not followed), or no answer, is retried on `schedule` (seconds after
  each failure, Standard Webhooks' by default), later if the answer's Retry-After (429, 503) asks for it; after
  the last it is exhausted;
- an endpoint failing without a success for longer than `disable_after_seconds` is disabled, and a
  `webhook_endpoint.disabled` event is recorded.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from billing.accounts import get_account, new_id
from billing.db import Executor
from billing.errors import BillingError

EVENT_TYPES = ("video.completed", "video.failed", "video.cancelled", "balance.low", "key.limit_threshold",
               "topup.posted", "webhook_endpoint.disabled", "auto_topup.failed", "auto_topup.disabled",
               "credit.granted", "credit.expired")
MAX_ENDPOINTS = 20
# Jitter from a generator of our own: the global `random` state belongs to whoever else shares the process.
_JITTER = random.Random()


class EndpointNotFound(BillingError):
    """No webhook endpoint with this id belongs to the account."""


class EventNotFound(BillingError):
    """No webhook event with this id."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


async def current_secret(conn: Executor, account_id: str) -> dict[str, Any]:
    """The account's signing secret, made on first use (one statement: concurrent first uses make one)."""
    await get_account(conn, account_id)
    row = await conn.fetchrow(
        """WITH made AS (INSERT INTO webhook_secrets (account_id, secret) VALUES ($1, $2)
                         ON CONFLICT (account_id) WHERE retired_at IS NULL DO NOTHING RETURNING secret, created_at)
           SELECT secret, created_at FROM made
           UNION ALL
           SELECT secret, created_at FROM webhook_secrets WHERE account_id = $1 AND retired_at IS NULL
           LIMIT 1""",
        account_id, new_secret())
    if row is None:
        # Another first use made it while this statement ran (its snapshot could not see it): read it now.
        row = await conn.fetchrow("SELECT secret, created_at FROM webhook_secrets"
                                  " WHERE account_id = $1 AND retired_at IS NULL", account_id)
    assert row is not None
    return dict(row)


async def rotate_secret(pool: asyncpg.Pool, account_id: str, *, grace_seconds: float) -> dict[str, Any]:
    """A new current secret; the old one keeps signing beside it for `grace_seconds`."""
    async with pool.acquire() as conn, conn.transaction():
        await get_account(conn, account_id)
        await conn.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id)
        await conn.execute(
            "UPDATE webhook_secrets SET retired_at = now() + $2 * interval '1 second'"
            " WHERE account_id = $1 AND retired_at IS NULL", account_id, grace_seconds)
        row = await conn.fetchrow("INSERT INTO webhook_secrets (account_id, secret) VALUES ($1, $2)"
                                  " RETURNING secret, created_at", account_id, new_secret())
        assert row is not None
        return dict(row)


async def create_endpoint(conn: Executor, *, account_id: str, url: str, events: list[str],
                          description: str | None) -> dict[str, Any]:
    await get_account(conn, account_id)
    row = await conn.fetchrow(
        """INSERT INTO webhook_endpoints (id, account_id, url, events, description)
           SELECT $1, $2, $3, $4, $5
            WHERE (SELECT count(*) FROM webhook_endpoints WHERE account_id = $2 AND disabled_at IS NULL) < $6
           RETURNING *""",
        new_id("whep"), account_id, url, events, description, MAX_ENDPOINTS)
    if row is None:
        raise BillingError(f"an account may have at most {MAX_ENDPOINTS} enabled webhook endpoints")
    return dict(row)


async def list_endpoints(conn: Executor, *, account_id: str | None) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM webhook_endpoints WHERE $1::text IS NULL OR account_id = $1"
                            " ORDER BY created_at, id", account_id)
    return [dict(r) for r in rows]


async def delete_endpoint(conn: Executor, endpoint_id: str, *, account_id: str | None) -> None:
    """Delete an endpoint (of this account, when named): its pending deliveries go with it."""
    deleted = await conn.fetchval(
        "DELETE FROM webhook_endpoints WHERE id = $1 AND ($2::text IS NULL OR account_id = $2) RETURNING id",
        endpoint_id, account_id)
    if deleted is None:
        raise EndpointNotFound(endpoint_id)


async def attempts(conn: Executor, endpoint_id: str, *, account_id: str | None, limit: int) -> list[dict[str, Any]]:
    """An endpoint's delivery attempts, newest first (EndpointNotFound if it is not the account's)."""
    owner = await conn.fetchval("SELECT account_id FROM webhook_endpoints WHERE id = $1", endpoint_id)
    if owner is None or (account_id is not None and owner != account_id):
        raise EndpointNotFound(endpoint_id)
    rows = await conn.fetch(
        """SELECT a.id, a.attempted_at, a.status, a.duration_ms, a.error, d.event_id, e.type, d.state, d.attempts
             FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
             JOIN webhook_events e ON e.id = d.event_id
            WHERE d.endpoint_id = $1 ORDER BY a.id DESC LIMIT $2""",
        endpoint_id, limit)
    return [dict(r) for r in rows]


async def replay(conn: Executor, event_id: str) -> int:
    """Deliver an event again: a new delivery to each target it had (enabled endpoints only); returns how many."""
    if await conn.fetchval("SELECT true FROM webhook_events WHERE id = $1", event_id) is None:
        raise EventNotFound(event_id)
    return int(await conn.fetchval(
        """WITH again AS (
               INSERT INTO webhook_deliveries (event_id, endpoint_id, url)
               SELECT DISTINCT d.event_id, d.endpoint_id, COALESCE(e.url, d.url)
                 FROM webhook_deliveries d LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id
                WHERE d.event_id = $1 AND (d.endpoint_id IS NULL OR e.disabled_at IS NULL)
               RETURNING 1)
           SELECT count(*) FROM again""", event_id))


@dataclass(frozen=True, slots=True)
class Due:
    """A delivery taken under a lease, with what its attempt needs."""

    id: int
    event_id: str
    account_id: str
    type: str
    data: Any
    created_at: datetime
    url: str
    endpoint_id: str | None
    attempts: int  # made before this one
    secrets: list[str]  # every secret that signs now (the current one, and rotated ones in their grace)


async def claim_due(conn: Executor, *, owner: str, lease_seconds: float, limit: int) -> list[Due]:
    rows = await conn.fetch(
        """WITH taken AS (
               UPDATE webhook_deliveries d SET lease_owner = $1, lease_until = now() + $2 * interval '1 second'
                WHERE d.id IN (SELECT id FROM webhook_deliveries
                                WHERE state = 'pending' AND next_attempt_at <= now()
                                  AND (lease_until IS NULL OR lease_until < now())
                                ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)
               RETURNING d.*)
           SELECT t.id, t.event_id, e.account_id, e.type, e.data, e.created_at, t.url, t.endpoint_id, t.attempts,
                  ARRAY(SELECT s.secret FROM webhook_secrets s
                         WHERE s.account_id = e.account_id AND (s.retired_at IS NULL OR s.retired_at > now())
                         ORDER BY s.id DESC) AS secrets
             FROM taken t JOIN webhook_events e ON e.id = t.event_id""",
        owner, lease_seconds, limit)
    return [Due(r["id"], r["event_id"], r["account_id"], r["type"], r["data"], r["created_at"], r["url"],
                r["endpoint_id"], r["attempts"], list(r["secrets"])) for r in rows]


def with_secrets(due: Due, secrets: list[str]) -> Due:
    return dataclasses.replace(due, secrets=secrets)


def retry_delay(schedule: list[float], attempts: int, retry_after: float | None) -> float | None:
    """Seconds until the next attempt after `attempts` failed ones (None: the schedule is spent), jittered by up
    to 10% so retries spread out; never sooner than the answer's Retry-After."""
    if attempts >= len(schedule):
        return None
    delay = schedule[attempts] * _JITTER.uniform(0.9, 1.1)
    return max(delay, retry_after or 0.0)


async def attempted(pool: asyncpg.Pool, due: Due, *, owner: str, status: int | None, duration_ms: int,
                    error: str | None, schedule: list[float], retry_after: float | None,
                    disable_after_seconds: float) -> str:
    """Record an attempt and decide what follows, in one transaction; returns the delivery's new state
    (delivered, pending, exhausted, cancelled: its endpoint was disabled). An attempt whose lease was lost (taken
    by another process since) is recorded but decides nothing."""
    ok = status is not None and 200 <= status < 300
    gone = status == 410
    delay = None if ok or gone else retry_delay(schedule, due.attempts + 1, retry_after)
    async with pool.acquire() as conn, conn.transaction():
        # (A delivery whose endpoint was deleted meanwhile went with it: its attempt has nothing to be recorded on.)
        await conn.execute("INSERT INTO webhook_attempts (delivery_id, status, duration_ms, error)"
                           " SELECT id, $2, $3, $4 FROM webhook_deliveries WHERE id = $1", due.id, status, duration_ms,
                           error)
        state = "delivered" if ok else "cancelled" if gone else "pending" if delay is not None else "exhausted"
        updated = await conn.fetchval(
            """UPDATE webhook_deliveries
                  SET attempts = attempts + 1, state = $3, lease_owner = NULL, lease_until = NULL,
                      next_attempt_at = CASE WHEN $4::float8 IS NULL THEN next_attempt_at
                                             ELSE now() + $4 * interval '1 second' END,
                      finished_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END, last_error = $5
                WHERE id = $1 AND lease_owner = $2 AND state = 'pending' RETURNING id""",
            due.id, owner, state, delay, error)
        if updated is None or due.endpoint_id is None:
            return state
        if ok:
            await conn.execute("UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1", due.endpoint_id)
            return state
        reason = ("the endpoint answered 410 Gone" if gone else
                  f"failing without a success for more than {disable_after_seconds:g} seconds")
        disabled = await conn.fetchrow(
            """UPDATE webhook_endpoints
                  SET failing_since = COALESCE(failing_since, now()),
                      disabled_at = CASE WHEN $2 OR COALESCE(failing_since, now())
                                              <= now() - $3 * interval '1 second' THEN now() END,
                      disabled_reason = CASE WHEN $2 OR COALESCE(failing_since, now())
                                                  <= now() - $3 * interval '1 second' THEN $4 END
                WHERE id = $1 AND disabled_at IS NULL
                RETURNING id, account_id, url, disabled_at""",
            due.endpoint_id, gone, disable_after_seconds, reason)
        if disabled is not None and disabled["disabled_at"] is not None:
            await conn.execute("UPDATE webhook_deliveries SET state = 'cancelled', finished_at = now(),"
                               " last_error = $2 WHERE endpoint_id = $1 AND state = 'pending'",
                               due.endpoint_id, reason)
            await conn.execute(
                "SELECT meterline_webhook_emit($1, 'webhook_endpoint.disabled', $2, $3, NULL)",
                disabled["account_id"], {"endpoint_id": due.endpoint_id, "url": disabled["url"], "reason": reason},
                f"webhook_endpoint.disabled:{due.endpoint_id}:{disabled['disabled_at'].isoformat()}")
            return "cancelled"
        return state
