"""Background work owned by the app: named tasks in one set, cancelled and awaited at cleanup."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from billing import ledger
from billing.errors import DatabaseUnavailable
from gateway.keys import POOL, SETTINGS, TASKS

log = logging.getLogger("meterline.tasks")


def spawn(app: web.Application, name: str, coro: Awaitable[None]) -> asyncio.Task[None]:
    async def run() -> None:
        await coro

    task = asyncio.create_task(run(), name=name)
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s stopped", task.get_name(), exc_info=exc)


async def every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step` every `seconds` (with jitter, so processes spread out) until cancelled; a failed step is
    logged and retried on the next tick, a database outage must not end the loop."""
    while True:
        await asyncio.sleep(seconds * random.uniform(0.8, 1.2))
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
    if expired:
        log.info("expired %d holds past their expiry", expired)


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    owned: set[asyncio.Task[None]] = set()
    app[TASKS] = owned
    settings = app[SETTINGS]
    spawn(app, "hold-sweeper",
          every(settings.sweep_interval_seconds, lambda: sweep_expired_holds(app), "hold sweep"))
    yield
    tasks = list(owned)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
