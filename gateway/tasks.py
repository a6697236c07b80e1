"""Background loops the app runs (the sweeper of holds and credit grants, and `every` for the others), owned by
the app's TaskOwner."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from aiohttp import web

from billing import console, conversation_store, grants, ledger, quotas
from billing.errors import DatabaseUnavailable
from gateway.keys import POOL, SETTINGS, TASKS
from gateway.metrics import METRICS

log = logging.getLogger("meterline.tasks")
# Jitter from a generator of our own: the global `random` state belongs to whoever else shares the process.
_JITTER = random.Random()


async def every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step` every `seconds` (with jitter, so processes spread out) until cancelled; a failed step is
    retried on the next tick: a database outage (logged once by billing.db) must not end the loop."""
    while True:
        await asyncio.sleep(seconds * _JITTER.uniform(0.8, 1.2))
        try:
            await step()
        except DatabaseUnavailable:
            log.debug("%s: the database is unavailable; retrying in about %.1fs", what, seconds)
        except Exception:
            # A supervisor loop: the sweeper and the video poller are what settle and expire holds nobody else
            # will, so a bug met on one tick (an upstream's odd answer) must be logged, not end the loop.
            # CancelledError is a BaseException and still stops it.
            log.exception("%s failed unexpectedly; retrying in about %.1fs", what, seconds)


async def sweep_expired_holds(app: web.Application) -> None:
    expired = await ledger.sweep(app[POOL])
    app[METRICS].expired(expired)
    if expired:
        log.info("expired %d holds past their expiry", expired)
    # Credit grants whose effective time or expiry has come, on accounts no money step has touched since.
    await grants.sweep(app[POOL])
    # Quota grants whose holder stopped beating (a killed process): what they hold is released.
    lapsed = await quotas.sweep(app[POOL])
    if lapsed:
        log.warning("expired %d quota grants whose process stopped renewing them; the reconciliation report "
                    "names their calls in flight that were never charged (in_flight_unsettled)", lapsed)


def start_sweeper(app: web.Application) -> None:
    app[TASKS].background(every(app[SETTINGS].sweep_interval_seconds, lambda: sweep_expired_holds(app),
                                "hold sweep"), "hold-sweeper")


async def housekeeping(app: web.Application) -> None:
    """Delete what has outlived its time: conversations idle past their retention, and expired console sessions."""
    pool = app[POOL]
    days = app[SETTINGS].conversation_retention_days
    if days > 0:
        purged = await conversation_store.purge(pool, retention_days=days)
        if purged:
            log.info("deleted %d conversations idle for more than %d days", purged, days)
    await console.purge_sessions(pool)


def start_housekeeping(app: web.Application) -> None:
    """In every process (SKIP LOCKED and plain deletes share the work), every `conversation_purge_seconds`."""
    app[TASKS].background(every(app[SETTINGS].conversation_purge_seconds, lambda: housekeeping(app),
                                "housekeeping"), "housekeeping")
