"""Background work owned by the app: named tasks in one set, cancelled and awaited at cleanup."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web

from billing import ledger
from gateway.keys import POOL, SETTINGS, TASKS

log = logging.getLogger("meterline.tasks")


def spawn(app: web.Application, name: str, coro: Awaitable[None]) -> asyncio.Task[None]:
    async def run() -> None:
        await coro

    task = asyncio.create_task(run(), name=name)
    app[TASKS].add(task)
    task.add_done_callback(app[TASKS].discard)
    return task


async def every(seconds: float, step: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `step` every `seconds` (with jitter, so processes spread out) until cancelled; a failed step is
    logged and retried on the next tick, a database outage must not end the loop."""
    while True:
        await asyncio.sleep(seconds * random.uniform(0.8, 1.2))
        try:
            await step()
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            log.warning("%s failed; retrying in about %.1fs", what, seconds, exc_info=True)


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
