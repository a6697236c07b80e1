"""The one owner of every task a gateway process starts, with two named policies for shutdown.

    drained    money rides on it (a hold being taken, a settlement, a void, a stream being read for its usage):
               awaited at shutdown, up to a grace period, and never cancelled by a handler's cancellation
    background a loop (the sweeper, the video poller, the catalog refresh): cancelled at shutdown

A task's failure is logged here, once, unless it is an answer its awaiting caller renders (a billing refusal, or
the database being unavailable, which billing.db logs once per outage).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from billing.errors import BillingError, DatabaseUnavailable

log = logging.getLogger("meterline.tasks")

T = TypeVar("T")


class TaskOwner:
    def __init__(self) -> None:
        self._drained: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()

    def drained(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run `coro` to its end whatever happens to whoever started it; shutdown waits for it."""
        return self._start(coro, name, self._drained)

    def background(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run a loop until shutdown cancels it."""
        return self._start(coro, name, self._background)

    async def shielded(self, coro: Coroutine[Any, Any, T], name: str) -> T:
        """Await `coro` in a drained task: cancelling the caller does not cancel the work."""
        return await asyncio.shield(self.drained(coro, name))

    def _start(self, coro: Coroutine[Any, Any, T], name: str, into: set[asyncio.Task[Any]]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        into.add(task)
        task.add_done_callback(_finished)
        task.add_done_callback(into.discard)
        return task

    async def close(self, *, grace_seconds: float) -> None:
        """Wait up to `grace_seconds` for drained tasks (new ones started meanwhile included), then cancel what is
        left of them and every background task."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self._drained and (left := deadline - loop.time()) > 0:
            log.info("waiting up to %.0fs for %d settlements in flight", left, len(self._drained))
            await asyncio.wait(list(self._drained), timeout=left)
        late = list(self._drained)
        if late:
            log.error("%d settlements did not finish within the %.0fs shutdown grace; their holds will expire and "
                      "the reconciliation report names them (expired_unsettled)", len(late), grace_seconds)
        for task in [*late, *self._background]:
            task.cancel()
        await asyncio.gather(*late, *self._background, return_exceptions=True)


def _finished(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None or isinstance(exc, BillingError | DatabaseUnavailable):
        return
    log.error("%s failed", task.get_name(), exc_info=exc)
