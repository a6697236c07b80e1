"""Video jobs are settled even if nobody asks about them: a background poller in every gateway process leases due
jobs (billing.videos.claim_due), asks the upstream for each one's status and records it, settling on
`completed` and voiding on `failed`/`cancelled` or past the maximum job time.

`refresh` is also what GET videos/{id} runs for a job it managed to lease, so a client's poll and the
background poll are one code path. Leases make each poll happen in one process; a process that dies holding a
lease loses it when it expires, and the job is picked up again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from billing import idempotency, videos
from billing.errors import DatabaseUnavailable
from billing.holds import durably
from gateway.keys import POOL, SETTINGS, TASKS
from gateway.metrics import METRICS
from gateway.tasks import every
from gateway.upstream import UpstreamError, upstream_named
from gateway.upstream import request as upstream_request
from gateway.video_object import event_data

log = logging.getLogger("meterline.videos")

# Who holds a lease: one id per running app, so two apps in one process are two pollers.
POLLER_ID = web.AppKey("media_poller_id", str)

_CLAIM_BATCH = 20
_FAILED = frozenset({"failed", "cancelled", "expired"})
# A poll is one small GET. Should one outlast its lease, a second process may poll the same job too: harmless,
# since finishing a job is guarded by its status and the hold's own state (settle and void happen once).
LEASE_SECONDS = 150.0


def progress_of(answer: dict[str, Any], default: int) -> int:
    value = answer.get("progress")
    if isinstance(value, int) and not isinstance(value, bool):
        return max(0, min(100, value))
    return default


async def fail(app: web.Application, job: dict[str, Any], reason: str, error: dict[str, Any], *,
               event_type: str = "video.failed") -> dict[str, Any]:
    """Void the job's hold and mark it failed (with its webhook event), retried until the database answers; its
    Idempotency-Key is freed so that a retry makes a new job."""
    code = error.get("code")
    return await durably(lambda: videos.fail(
        app[POOL], job["id"], reason=reason, error=error,
        record=videos.record(job, "upstream_failure", error_code=code if isinstance(code, str) else None),
        idempotency_scope=idempotency.scope("videos", job["account_id"]), event_data=event_data(app),
        event_type=event_type, events=app[METRICS]))


async def refresh(app: web.Application, job: dict[str, Any]) -> dict[str, Any]:
    """Poll one leased job's upstream status and record it (settling or voiding a finished job)."""
    settings = app[SETTINGS]
    owner = app[POLLER_ID]
    if job.get("overdue"):
        return await fail(app, job, "the job outlived the maximum job time",
                          {"code": "timeout", "message": "The video job did not finish within the maximum time"})
    if job["upstream_id"] is None:
        # The process creating the job died before the upstream answered: there is no job to follow.
        return await fail(app, job, "the upstream never confirmed the job",
                          {"code": "creation_failed", "message": "The video job was never started upstream"})
    try:
        upstream = upstream_named(app, job["upstream"])
        async with upstream_request(app, upstream, "GET", f"videos/{job['upstream_id']}") as resp:
            answer = await resp.json()
    except UpstreamError as exc:
        if exc.upstream_status == 404:
            return await fail(app, job, "the upstream no longer knows the job",
                              {"code": "not_found", "message": "The upstream lost the video job"})
        log.warning("polling video %s failed: %s", job["id"], exc.message)
        await videos.release(app[POOL], job["id"], owner=owner, retry_seconds=settings.video_poll_seconds)
        return job
    if not isinstance(answer, dict):
        answer = {}
    status = answer.get("status")
    if not isinstance(status, str):
        status = None  # an upstream's malformed status counts as no news
    if status == "completed":
        return await durably(lambda: videos.complete(app[POOL], job["id"], output=answer,
                                                     record=videos.record(job, "completed"),
                                                     event_data=event_data(app), events=app[METRICS]))
    if status in _FAILED:
        error = answer.get("error") if isinstance(answer.get("error"), dict) else None
        return await fail(app, job, f"the upstream reported the job {status}",
                          error or {"code": str(status), "message": f"The video job {status} upstream"},
                          event_type="video.cancelled" if status == "cancelled" else "video.failed")
    current = status if status in videos.UNFINISHED else job["status"]
    updated = await videos.progressed(app[POOL], job["id"], status=current,
                                      progress=progress_of(answer, job["progress"]), output=answer, owner=owner,
                                      poll_seconds=settings.video_poll_seconds)
    return updated or job


async def poll_due(app: web.Application) -> int:
    """One round of the background poller: lease due jobs and refresh each; returns how many were polled."""
    jobs = await videos.claim_due(app[POOL], owner=app[POLLER_ID], lease_seconds=LEASE_SECONDS,
                                  limit=_CLAIM_BATCH)
    for job in jobs:
        try:
            await refresh(app, job)
        except DatabaseUnavailable:
            # The job keeps its lease until it expires, then any poller retries it; the others go on.
            log.debug("recording video %s waits for the database", job["id"])
    return len(jobs)


async def media_poller_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the video poller (its task is owned by the app's task set and cancelled with it)."""
    app[POLLER_ID] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    app[TASKS].background(every(app[SETTINGS].video_poll_seconds, lambda: poll_due(app), "video poll"),
                          "video-poller")
    yield
