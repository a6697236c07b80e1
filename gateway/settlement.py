"""Holds that are always resolved: reserve, settle and void run in tasks the app owns, awaited through a shield.

A handler can be cancelled (server shutdown, `handler_cancellation`) at any await. Running each ledger call in an
owned task means the call completes even then; tasks still running at shutdown are awaited, not cancelled
(`settling_ctx`), so no charge in flight is lost. A `Bill` resolves its hold at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from billing import ledger
from billing.errors import BillingError, DatabaseUnavailable, DuplicateRequest, UnknownHold
from billing.ledger import Reservation, Resolution
from gateway.keys import LEDGER, POOL, SETTINGS, SETTLING

log = logging.getLogger("meterline.settlement")

T = TypeVar("T")
# Past the drain window, a shutdown waits this much longer for settlements to reach the database.
_SHUTDOWN_GRACE_SECONDS = 10.0


def own(app: web.Application, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Run `coro` in a task kept in app[SETTLING] until it ends; its failure is logged, never lost."""
    task = asyncio.create_task(coro, name=name)
    tasks = app[SETTLING]
    tasks.add(task)
    task.add_done_callback(_finished)
    task.add_done_callback(tasks.discard)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    # A billing refusal (insufficient balance, a key limit) or an outage (logged once by billing.db) is an
    # answer the awaiting handler renders, not a fault; anything else is logged here because a cancelled
    # handler may no longer be awaiting the task.
    if (not task.cancelled() and (exc := task.exception()) is not None
            and not isinstance(exc, BillingError | DatabaseUnavailable)):
        log.error("%s failed", task.get_name(), exc_info=exc)


async def shielded(app: web.Application, coro: Coroutine[Any, Any, T], name: str) -> T:
    """Await `coro` in an owned task: cancelling the caller does not cancel the work."""
    return await asyncio.shield(own(app, coro, name))


_FIRST_RETRY_SECONDS = 0.05
_MAX_RETRY_SECONDS = 2.0


async def durably(call: Callable[[], Awaitable[T]]) -> T:
    """Run a settle or void until the database answers, for as long as the process lives: there is no give-up
    timer. Both are exactly-once in SQL (a repeat returns the stored outcome), so retrying after a lost connection
    or a deadlock can never charge twice, while giving up would leave the hold to expire uncharged. A billing
    answer (UnknownHold, ...) is final and raised at once. Retries back off to every ~2 s, jittered so that the
    settlements an outage piled up do not all return at once; they log nothing (billing.db logs the outage)."""
    delay = _FIRST_RETRY_SECONDS
    while True:
        try:
            return await call()
        except DatabaseUnavailable:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _MAX_RETRY_SECONDS)


class Bill:
    """The money side of one request: its hold, and the single settlement or void that ends it."""

    def __init__(self, app: web.Application, *, request_id: str, record: dict[str, Any]) -> None:
        self.app = app
        self.request_id = request_id
        self.record = record  # the request-record fields known up front (model, endpoint, user, ...)
        self.reservation: Reservation | None = None
        self.account_id: str | None = None
        self.resolution: Resolution | None = None
        self._resolving = False
        self._handed_off = False

    @property
    def resolved(self) -> bool:
        """True once a settlement or void has started, or the hold was handed to a task that will end it."""
        return self._resolving or self._handed_off

    def hand_off(self) -> None:
        """A task the app owns takes over resolving this hold (a stream being drained and settled)."""
        self._handed_off = True

    async def reserve(self, *, account_id: str, key_id: str, amount_micros: int, min_micros: int) -> Reservation:
        """Hold between `min_micros` and `amount_micros` (as much as available). If the caller is cancelled
        while the hold is being taken, the hold is voided as soon as it exists."""
        self.account_id = account_id
        task = own(self.app, self.app[LEDGER].reserve(
            request_id=self.request_id, account_id=account_id, amount_micros=amount_micros,
            min_micros=min_micros, ttl_seconds=self.app[SETTINGS].hold_ttl_seconds, key_id=key_id,
        ), f"reserve {self.request_id}")
        try:
            self.reservation = await asyncio.shield(task)
        except BillingError as exc:
            if not isinstance(exc, DuplicateRequest):
                raise  # a refusal: no hold was made
            # Only a retry after a commit whose answer was lost meets its own hold: end it.
            self._resolving = True
            own(self.app, self._void_after(task), f"void {self.request_id}")
            raise
        except BaseException:
            # Cancelled, or the database failed: the hold may exist (an error can follow the commit). End it.
            self._resolving = True
            own(self.app, self._void_after(task), f"void {self.request_id}")
            raise
        return self.reservation

    async def _void_after(self, task: asyncio.Task[Reservation]) -> None:
        # Whatever the reservation's outcome (its own failure is logged by `own`), a hold may exist: an error can
        # arrive after the commit. Void it if it does.
        await asyncio.wait([task])
        with contextlib.suppress(UnknownHold):  # the reservation never made a hold
            await durably(lambda: ledger.void(
                self.app[POOL], request_id=self.request_id, reason="cancelled",
                record={**self.record, "status": "cancelled", "error_code": "CANCELLED"}))

    async def settle(self, *, actual_micros: int, estimated: bool, record: dict[str, Any]) -> Resolution | None:
        if self._resolving:
            return self.resolution
        self._resolving = True
        # Group-committed with concurrent settlements; the account only orders the batch's row locks.
        self.resolution = await shielded(self.app, durably(lambda: self.app[LEDGER].settle(
            request_id=self.request_id, account_id=self.account_id or "", actual_micros=actual_micros,
            estimated=estimated, record={**self.record, **record},
        )), f"settle {self.request_id}")
        return self.resolution

    async def void(self, *, reason: str, record: dict[str, Any]) -> Resolution | None:
        if self._resolving:
            return self.resolution
        self._resolving = True
        self.resolution = await shielded(self.app, durably(lambda: ledger.void(
            self.app[POOL], request_id=self.request_id, reason=reason, record={**self.record, **record},
        )), f"void {self.request_id}")
        return self.resolution

    def void_soon(self, *, reason: str, record: dict[str, Any]) -> None:
        """Void from a path that must not wait (the handler is being cancelled)."""
        if self.resolved or self.reservation is None:
            return
        self._resolving = True
        own(self.app, durably(lambda: ledger.void(self.app[POOL], request_id=self.request_id, reason=reason,
                                                  record={**self.record, **record})), f"void {self.request_id}")


async def settling_ctx(app: web.Application) -> AsyncIterator[None]:
    tasks: set[asyncio.Task[Any]] = set()
    app[SETTLING] = tasks
    yield
    pending = list(tasks)
    if pending:
        timeout = app[SETTINGS].drain_seconds + _SHUTDOWN_GRACE_SECONDS
        log.info("waiting up to %.0fs for %d settlements", timeout, len(pending))
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            log.error("%d settlements did not finish before shutdown; their holds will expire", len(late))
            await asyncio.gather(*late, return_exceptions=True)
