"""Idempotency-Key claims in the `idempotency_keys` table, one scope per kind of request (ledger postings,
images, videos).

A key is claimed by inserting it before any hold or upstream call; a duplicate request then waits for the
claim's commit and either replays the stored result, is told the first is still running (409), or, when its
body differs, is refused (422). A claim whose request failed is released, so that the client may retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.db import Executor
from billing.errors import DuplicateRequest, IdempotencyConflict


def scope(kind: str, account_id: str) -> str:
    """Keys are per account and per kind of request: another customer's key never collides with yours."""
    return f"{kind}:{account_id}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A request's hold on an Idempotency-Key, from `claim` until its result is stored or the claim released."""

    scope: str
    key: str


@dataclass(frozen=True, slots=True)
class Stored:
    status_code: int
    response: dict[str, Any]


async def claim(conn: Executor, claim: Claim, *, fingerprint: bytes, response: dict[str, Any] | None = None,
                status_code: int | None = None, stale_after_seconds: float | None = None) -> Stored | None:
    """Claim the key for a request with this fingerprint: None when claimed now, the stored result on a replay.

    `response` may be stored with the claim when the result is known up front (a video job's id).
    `stale_after_seconds`: an unfinished claim older than this is taken over (by one caller: the takeover is a
    conditional UPDATE). The caller passes a span its first request cannot outlive, so that a claim orphaned
    by a process killed mid-request does not block the key forever."""
    claimed = await conn.fetchval(
        "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, response)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING true",
        claim.scope, claim.key, fingerprint, status_code, response,
    )
    if claimed:
        return None
    if stale_after_seconds is not None:
        taken = await conn.fetchval(
            "UPDATE idempotency_keys SET created_at = now()"
            " WHERE scope = $1 AND key = $2 AND request_hash = $3 AND response IS NULL"
            "   AND created_at < now() - make_interval(secs => $4) RETURNING true",
            claim.scope, claim.key, fingerprint, stale_after_seconds,
        )
        if taken:
            return None
    stored = await conn.fetchrow(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE scope = $1 AND key = $2",
        claim.scope, claim.key,
    )
    if stored is None:  # released between our insert and read: the first request failed
        raise DuplicateRequest("A request with this Idempotency-Key just failed; retry it")
    if bytes(stored["request_hash"]) != fingerprint:
        raise IdempotencyConflict(
            "This Idempotency-Key was already used with a different request; use a new key"
        )
    if stored["response"] is None:
        raise DuplicateRequest("A request with this Idempotency-Key is still in progress; retry later")
    return Stored(stored["status_code"], stored["response"])


async def store(conn: Executor, claim: Claim, *, status_code: int, response: dict[str, Any]) -> None:
    await conn.execute(
        "UPDATE idempotency_keys SET status_code = $3, response = $4 WHERE scope = $1 AND key = $2",
        claim.scope, claim.key, status_code, response,
    )


async def release(conn: Executor, claim: Claim) -> None:
    """Forget a claim whose request failed (only one without a stored result)."""
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND response IS NULL", claim.scope, claim.key
    )
