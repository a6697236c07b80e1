"""Video jobs in PostgreSQL: creating a job with its hold, leasing unfinished jobs to a poller, recording
progress, and finishing a job together with its settlement or void.

A job is created in the same transaction as its hold (and its Idempotency-Key, when one is given), leased to
the creating process while the upstream call is made. Pollers lease due jobs with FOR UPDATE SKIP LOCKED, so
a job is polled by one process at a time; a lease left by a crashed process expires and another process takes
the job up. `complete` and `fail` move a job out of its unfinished states once, in the same transaction as the
ledger's settle or void (which are exactly-once on their own as well).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg

from billing import idempotency as idem
from billing import ledger
from billing.accounts import new_id
from billing.db import Executor
from billing.ledger import Reservation, Resolution
from billing.records import RequestRecord
from billing.requests_log import Page, decode_cursor, encode_cursor

if TYPE_CHECKING:
    from billing.holds import Hold, HoldEvents

UNFINISHED = ("queued", "in_progress")
STATUSES = (*UNFINISHED, "completed", "failed")  # what the videos table's CHECK allows


@dataclass(frozen=True, slots=True)
class NewVideo:
    request_id: str  # the hold's id (and the creating request's)
    account_id: str
    key_id: str | None
    model: str
    upstream: str
    endpoint: str
    prompt: str | None
    size: str
    seconds: int
    price_micros: int
    webhook_url: str | None = None  # the job's own webhook URL, besides the account's endpoints
    client_request_id: str | None = None  # the creating call's X-Request-Id, for the record written at the end


# Builds the data of a video's webhook event (the video object, as GET /videos/{id} shows it) from its finished row.
EventData = Callable[[dict[str, Any]], dict[str, Any]]


def _row(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None


async def create(
    conn: asyncpg.Connection,
    job: NewVideo,
    *,
    video_id: str,
    hold_ttl_seconds: float,
    max_job_seconds: float,
    lease_owner: str,
    lease_seconds: float,
) -> tuple[dict[str, Any], Reservation]:
    """Hold the job's price and store the job, leased to `lease_owner`, in the caller's transaction.

    Raises InsufficientBalance (nothing is stored) like ledger.reserve."""
    request_id = job.request_id
    reservation = await ledger.reserve(conn, request_id=request_id, account_id=job.account_id,
                         amount_micros=job.price_micros, ttl_seconds=hold_ttl_seconds, key_id=job.key_id)
    row = await conn.fetchrow(
        """INSERT INTO videos (id, account_id, key_id, request_id, model, upstream, endpoint, prompt, size,
                               seconds, price_micros, deadline_at, lease_owner, lease_until, webhook_url,
                               client_request_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                   now() + make_interval(secs => $12), $13, now() + make_interval(secs => $14), $15, $16)
           RETURNING *""",
        video_id, job.account_id, job.key_id, request_id, job.model, job.upstream, job.endpoint, job.prompt,
        job.size, job.seconds, job.price_micros, max_job_seconds, lease_owner, lease_seconds, job.webhook_url,
        job.client_request_id,
    )
    assert row is not None
    return dict(row), reservation


async def create_once(
    pool: asyncpg.Pool,
    job: NewVideo,
    *,
    idempotency: tuple[str, str, bytes] | None,
    hold_ttl_seconds: float,
    max_job_seconds: float,
    lease_owner: str,
    lease_seconds: float,
) -> tuple[dict[str, Any], Reservation | None]:
    """`create` under an optional Idempotency-Key (scope, key, fingerprint): returns the job and its new hold
    (None when the key replays an earlier job).

    The key is stored with the new job's id in the job's own transaction, so a duplicate waits for that commit
    and then gets the same job: one job, one hold."""
    async with pool.acquire() as conn, conn.transaction():
        if idempotency is not None:
            scope, key, fingerprint = idempotency
            video_id = new_id("video")
            stored = await idem.claim(conn, idem.Claim(scope, key), fingerprint=fingerprint,
                                      response={"video_id": video_id}, status_code=202)
            if stored is not None:
                existing = await get(conn, str(stored.response["video_id"]), account_id=job.account_id)
                assert existing is not None
                return existing, None
        else:
            video_id = new_id("video")
        return await create(conn, job, video_id=video_id, hold_ttl_seconds=hold_ttl_seconds,
                            max_job_seconds=max_job_seconds, lease_owner=lease_owner, lease_seconds=lease_seconds)


def record(job: dict[str, Any], status: str, *, error_code: str | None = None) -> dict[str, Any]:
    """The request record of a job's settlement or void, made by the poller (the job row knows the call)."""
    duration = datetime.now(UTC) - job["created_at"]
    return RequestRecord(model=job["model"], modality="video", endpoint=job["endpoint"], upstream=job["upstream"],
                         quantity=job["seconds"], status=status, error_code=error_code,
                         client_request_id=job["client_request_id"], provider=job["provider"],
                         provider_model=job["provider_model"], attempts=job["attempts"],
                         upstream_cost_micros=job["upstream_cost_micros"], generation_id=job["upstream_id"],
                         duration_ms=max(0, int(duration.total_seconds() * 1000))).as_json()


async def get(conn: Executor, video_id: str, *, account_id: str) -> dict[str, Any] | None:
    """The job, if it belongs to the account (another account's job is indistinguishable from none)."""
    return _row(await conn.fetchrow("SELECT * FROM videos WHERE id = $1 AND account_id = $2",
                                    video_id, account_id))


# What the admin console lists of a job: never its prompt or output, which are the customer's.
_LISTED = """id, account_id, request_id, model, size, seconds, price_micros, cost_micros, status, progress,
             error->>'code' AS error_code, created_at, completed_at"""


async def list_jobs(conn: Executor, *, account_id: str | None, status: str | None, limit: int,
                    cursor: str | None = None) -> Page:
    """Up to `limit` jobs of any account (or of `account_id`), in `status` if given, newest first by
    (created_at, id), after `cursor` (billing.requests_log's cursors: every job is listed once while paging).
    Raises InvalidCursor for a cursor no page gave."""
    clauses: list[str] = []
    args: list[Any] = []
    if account_id is not None:
        args.append(account_id)
        clauses.append(f"account_id = ${len(args)}")
    if status is not None:
        args.append(status)
        clauses.append(f"status = ${len(args)}")
    if cursor is not None:
        args.extend(decode_cursor(cursor))
        clauses.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
    # Only fixed text is interpolated (the columns and conditions); every value is a parameter.
    rows = await conn.fetch(
        f"SELECT {_LISTED} FROM videos WHERE {' AND '.join(clauses) or 'TRUE'}"
        f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) + 1}",
        *args, limit + 1,
    )
    jobs = [dict(r) for r in rows[:limit]]
    last = jobs[-1] if len(rows) > limit else None
    return Page(jobs, encode_cursor(last["created_at"], last["id"]) if last else None)


@dataclass(frozen=True, slots=True)
class Provider:
    """The provider that accepted a job: polls, content and the settlement's record go by it."""

    name: str
    upstream: str
    model: str
    upstream_cost_micros: int | None  # its configured cost of the job (None: none configured)
    attempts: list[dict[str, Any]] | None = None  # every provider tried (gateway.failover)


async def started(conn: Executor, video_id: str, *, upstream_id: str, status: str, progress: int,
                  output: Any, owner: str, poll_seconds: float, provider: Provider) -> dict[str, Any] | None:
    """The upstream accepted the job: remember its id and provider, and release the creator's lease."""
    return _row(await conn.fetchrow(
        """UPDATE videos SET upstream_id = $2, status = $3, progress = $4, output = $5,
                  next_poll_at = now() + make_interval(secs => $7), lease_owner = NULL, lease_until = NULL,
                  upstream = $8, provider = $9, provider_model = $10, upstream_cost_micros = $11, attempts = $12
            WHERE id = $1 AND status IN ('queued', 'in_progress') AND lease_owner = $6
           RETURNING *""",
        video_id, upstream_id, status, progress, output, owner, poll_seconds, provider.upstream, provider.name,
        provider.model, provider.upstream_cost_micros, provider.attempts,
    ))


async def claim_due(conn: Executor, *, owner: str, lease_seconds: float, limit: int) -> list[dict[str, Any]]:
    """Lease up to `limit` unfinished jobs that are due for a poll and not leased by a live process."""
    rows = await conn.fetch(
        """UPDATE videos v SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
            WHERE v.id IN (SELECT id FROM videos
                            WHERE status IN ('queued', 'in_progress') AND next_poll_at <= now()
                              AND (lease_until IS NULL OR lease_until < now())
                            ORDER BY next_poll_at LIMIT $3 FOR UPDATE SKIP LOCKED)
           RETURNING v.*, v.deadline_at <= now() AS overdue""",
        owner, lease_seconds, limit,
    )
    return [dict(r) for r in rows]


async def claim_one(conn: Executor, video_id: str, *, account_id: str, owner: str,
                    lease_seconds: float) -> dict[str, Any] | None:
    """Lease one unfinished job now (a client is asking for it), unless another process holds its lease."""
    return _row(await conn.fetchrow(
        """UPDATE videos v SET lease_owner = $3, lease_until = now() + make_interval(secs => $4)
            WHERE v.id = (SELECT id FROM videos
                           WHERE id = $1 AND account_id = $2 AND status IN ('queued', 'in_progress')
                             AND (lease_until IS NULL OR lease_until < now())
                           FOR UPDATE SKIP LOCKED)
           RETURNING v.*, v.deadline_at <= now() AS overdue""",
        video_id, account_id, owner, lease_seconds,
    ))


async def progressed(conn: Executor, video_id: str, *, status: str, progress: int, output: Any, owner: str,
                     poll_seconds: float) -> dict[str, Any] | None:
    """Record an unfinished status and release the lease until the next poll is due."""
    return _row(await conn.fetchrow(
        """UPDATE videos SET status = $2, progress = $3, output = COALESCE($4, output),
                  next_poll_at = now() + make_interval(secs => $6), lease_owner = NULL, lease_until = NULL
            WHERE id = $1 AND status IN ('queued', 'in_progress') AND lease_owner = $5
           RETURNING *""",
        video_id, status, progress, output, owner, poll_seconds,
    ))


async def release(conn: Executor, video_id: str, *, owner: str, retry_seconds: float) -> None:
    """Give a lease back without news (the poll failed): the job is retried after `retry_seconds`."""
    await conn.execute(
        """UPDATE videos SET lease_owner = NULL, lease_until = NULL,
                  next_poll_at = now() + make_interval(secs => $3)
            WHERE id = $1 AND lease_owner = $2""",
        video_id, owner, retry_seconds,
    )


class VideoCreation:
    """The hold of a new video job (billing.holds.Steps): taken with the job's row (and its Idempotency-Key) in one
    transaction; voided with the job marked failed (its key freed) when the upstream never starts it; settled with
    the job completed. A replayed key makes no hold: `job` is the earlier job and `replayed` is true."""

    void_without_hold = False

    def __init__(self, pool: asyncpg.Pool, new: NewVideo, *, idempotency: tuple[str, str, bytes] | None,
                 hold_ttl_seconds: float, max_job_seconds: float, lease_owner: str, lease_seconds: float,
                 event_data: EventData | None = None) -> None:
        self.pool = pool
        self.event_data = event_data
        self.new = new
        self.idempotency = idempotency
        self.hold_ttl_seconds = hold_ttl_seconds
        self.max_job_seconds = max_job_seconds
        self.lease_owner = lease_owner
        self.lease_seconds = lease_seconds
        self.job: dict[str, Any] | None = None
        self.replayed = False

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation:
        job, reservation = await create_once(
            self.pool, self.new, idempotency=self.idempotency, hold_ttl_seconds=self.hold_ttl_seconds,
            max_job_seconds=self.max_job_seconds, lease_owner=self.lease_owner, lease_seconds=self.lease_seconds)
        self.job, self.replayed = job, reservation is None
        return reservation or Reservation(hold.request_id, 0, 0, job["created_at"], replayed=True)

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> None:
        assert self.job is not None
        self.job = await complete(self.pool, self.job["id"], output=response, record=record,
                                  event_data=self.event_data, events=hold.events)

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> None:
        if self.job is None or self.replayed:
            return  # the job was never stored (so neither was its hold), or it is an earlier call's
        error = {"code": record.get("error_code") or "creation_failed", "message": reason}
        self.job = await fail(self.pool, self.job["id"], reason=reason, error=error, record=record,
                              idempotency_scope=self.idempotency[0] if self.idempotency else None,
                              event_data=self.event_data, events=hold.events)


async def _emit(conn: Executor, job: dict[str, Any], event_type: str, event_data: EventData | None) -> None:
    """The job's webhook event, in its settlement's or void's transaction (the outbox): once per job."""
    if event_data is not None:
        await conn.execute("SELECT meterline_webhook_emit($1, $2, $3, $4, $5)", job["account_id"], event_type,
                           event_data(job), f"video:{job['id']}", job["webhook_url"])


def _committed(events: HoldEvents | None, resolution: Resolution) -> None:
    if events is not None and not resolution.replayed:
        events.resolved(resolution)


async def complete(pool: asyncpg.Pool, video_id: str, *, output: Any, record: dict[str, Any],
                   event_data: EventData | None = None, events: HoldEvents | None = None) -> dict[str, Any]:
    """Mark the job completed and charge its price, once, with its `video.completed` event (and tell `events` of
    the settlement once committed). A job already finished is returned as it is."""
    async with pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow("SELECT * FROM videos WHERE id = $1 FOR UPDATE", video_id)
        assert job is not None
        if job["status"] not in UNFINISHED:
            return dict(job)
        resolution = await ledger.settle(conn, request_id=job["request_id"],
                                         actual_micros=job["price_micros"], record=record)
        row = await conn.fetchrow(
            """UPDATE videos SET status = 'completed', progress = 100, cost_micros = $2, completed_at = now(),
                      output = COALESCE($3, output), lease_owner = NULL, lease_until = NULL
                WHERE id = $1 RETURNING *""",
            video_id, resolution.actual_micros, output,
        )
        assert row is not None
        await _emit(conn, dict(row), "video.completed", event_data)
    _committed(events, resolution)
    return dict(row)


async def fail(pool: asyncpg.Pool, video_id: str, *, reason: str, error: dict[str, Any],
               record: dict[str, Any], idempotency_scope: str | None = None, event_data: EventData | None = None,
               event_type: str = "video.failed", events: HoldEvents | None = None) -> dict[str, Any]:
    """Mark the job failed and release its hold without charge, once, with its event (`video.failed`, or
    `video.cancelled` when the upstream cancelled it). With `idempotency_scope`, the Idempotency-Key that created
    the job is freed as well, so that a retry can create a new job."""
    async with pool.acquire() as conn, conn.transaction():
        job = await conn.fetchrow("SELECT * FROM videos WHERE id = $1 FOR UPDATE", video_id)
        assert job is not None
        if job["status"] not in UNFINISHED:
            return dict(job)
        resolution = await ledger.void(conn, request_id=job["request_id"], reason=reason, record=record)
        row = await conn.fetchrow(
            """UPDATE videos SET status = 'failed', error = $2, completed_at = now(),
                      lease_owner = NULL, lease_until = NULL
                WHERE id = $1 RETURNING *""",
            video_id, error,
        )
        if idempotency_scope is not None:
            await conn.execute(
                "DELETE FROM idempotency_keys WHERE scope = $1 AND response->>'video_id' = $2",
                idempotency_scope, video_id,
            )
        assert row is not None
        await _emit(conn, dict(row), event_type, event_data)
    _committed(events, resolution)
    return dict(row)

