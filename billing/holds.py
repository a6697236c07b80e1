"""The one hold lifecycle every billed call goes through (chat, images, videos): reserve → (the edge forwards) →
settle or void, exactly once.

    hold = holds.open(request_id, account_id=..., key_id=..., record=RequestRecord(...))
    await hold.reserve(amount_micros, min_micros=...)      # committed when it returns; refusals raise
    ...the edge forwards the call...
    await hold.settle(actual_micros, outcome=Outcome(...))  # or: await hold.void(reason, Outcome(...))

What it guarantees, whatever happens to the handler:
- every step runs in a task the TaskOwner drains, awaited through a shield: a cancelled handler cannot skip it,
  and shutdown waits for it;
- settle and void are retried until the database answers, for as long as the process lives (`durably`); both
  are exactly-once in SQL, so a retry can never charge twice;
- a reservation that was interrupted (cancelled, or failed after it may have committed) is voided once it exists;
- a Hold resolves at most once; `hand_off` passes the resolution to a task that will make it (a stream drained
  for its usage).

How a modality's SQL runs is its `Steps`: chat group-commits with concurrent requests (`Batched`, billing.batcher);
images store their Idempotency-Key's answer in the settlement's own transaction (`Claimed`); videos create their
job with the hold and finish it with the settlement (billing.videos.VideoSteps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import asyncpg

from billing import idempotency, ledger
from billing.batcher import LedgerBatcher, QuotaCharge
from billing.errors import BillingError, DatabaseUnavailable, DuplicateRequest, InsufficientBalance, UnknownHold
from billing.ledger import Reservation, Resolution
from billing.quotas import Admission, QuotaBook
from billing.records import Outcome, RequestRecord
from billing.tasks import TaskOwner

log = logging.getLogger("meterline.holds")
# Jitter from a generator of our own: the global `random` state belongs to whoever else shares the process.
_JITTER = random.Random()

T = TypeVar("T")

# A quota call's reservation has no expiry of its own: its quota's beat keeps it alive while the call runs.
_NO_EXPIRY = datetime.max.replace(tzinfo=UTC)

_FIRST_RETRY_SECONDS = 0.05
_MAX_RETRY_SECONDS = 2.0


async def durably(call: Callable[[], Awaitable[T]]) -> T:
    """Run a ledger call until the database answers, for as long as the process lives: there is no give-up timer.
    Only DatabaseUnavailable is retried; any other answer (UnknownHold, ...) is final and raised at once. Retries
    back off to about every 2 s, jittered, so the settlements an outage piled up do not all return at once; they log
    nothing (billing.db logs the outage, once)."""
    delay = _FIRST_RETRY_SECONDS
    while True:
        try:
            return await call()
        except DatabaseUnavailable:
            await asyncio.sleep(delay * _JITTER.uniform(0.5, 1.0))
            delay = min(delay * 2, _MAX_RETRY_SECONDS)


class HoldEvents(Protocol):
    """Told of what the ledger answered for each hold, as it answers (the gateway counts these for its metrics).
    Called with committed outcomes only; a replayed resolution (nothing written now) is not passed on."""

    def reserved(self, reservation: Reservation) -> None: ...

    def resolved(self, resolution: Resolution) -> None: ...


class NoEvents:
    """HoldEvents that record nothing (billing used on its own: the CLI, tests of the ledger)."""

    def reserved(self, reservation: Reservation) -> None:
        pass

    def resolved(self, resolution: Resolution) -> None:
        pass


class Steps(Protocol):
    """The SQL of one modality's hold. `response` is what the upstream delivered, kept with the settlement where
    the modality needs it (an image's answer under its Idempotency-Key, a video's output). `void_without_hold`:
    a void must run even when no hold was made (it frees something else the call claimed)."""

    void_without_hold: bool

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation: ...

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> Resolution | None: ...

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> Resolution | None: ...


class Batched:
    """Chat: holds and settlements group-committed with those of concurrent requests."""

    void_without_hold = False

    def __init__(self, pool: asyncpg.Pool, batcher: LedgerBatcher, ttl_seconds: float) -> None:
        self.pool = pool
        self.batcher = batcher
        self.ttl_seconds = ttl_seconds

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation:
        return await self.batcher.reserve(request_id=hold.request_id, account_id=hold.account_id,
                                          amount_micros=high, min_micros=low, ttl_seconds=self.ttl_seconds,
                                          key_id=hold.key_id)

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> Resolution:
        return await self.batcher.settle(request_id=hold.request_id, account_id=hold.account_id,
                                         actual_micros=actual_micros, estimated=estimated, record=record)

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> Resolution:
        return await ledger.void(self.pool, request_id=hold.request_id, reason=reason, record=record)


class Quoted:
    """Chat on an account without a per-key spend limit: admitted in memory against this process's quota on the
    account when it fits (billing.quotas), else a per-call hold as `Batched`. A quota call's charge or void is one
    group-committed statement (meterline_quota_settle) that writes its hold row already resolved."""

    void_without_hold = False

    def __init__(self, batched: Batched, book: QuotaBook) -> None:
        self.batched = batched
        self.book = book

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation:
        admission = self.book.admit(hold.account_id, hold.request_id, high)
        if admission is not None:
            hold.admission = admission
            return Reservation(hold.request_id, high, admission.quota.room, _NO_EXPIRY)
        try:
            return await self.batched.reserve(hold, low, high)
        except InsufficientBalance:
            # Quotas on the account (this process's, other processes') may hold what the call needs: their room
            # is given back and the hold asked again, so that a call is refused only when the balance truly
            # cannot cover it.
            mine = await self.book.give_back(hold.account_id)
            theirs = await self.book.recall(hold.account_id)
            if not (mine or theirs):
                raise
            return await self.batched.reserve(hold, low, high)

    async def _quota(self, hold: Hold, actual: int | None, estimated: bool, record: dict[str, Any],
                     reason: str | None) -> Resolution:
        admission = hold.admission
        assert admission is not None
        resolution, released = await self.batched.batcher.quota_settle(QuotaCharge(
            admission.quota.id, hold.account_id, hold.request_id, hold.key_id, admission.worst, actual, estimated,
            record, admission.age_ms, reason))
        self.book.release(admission, released)
        return resolution

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> Resolution:
        if hold.admission is None:
            return await self.batched.settle(hold, actual_micros, estimated, record, response)
        return await self._quota(hold, actual_micros, estimated, record, None)

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> Resolution:
        if hold.admission is None:
            return await self.batched.void(hold, reason, record)
        return await self._quota(hold, None, False, record, reason)


class Claimed:
    """Images: one transaction per step, which also stores (on settle) or frees (on void) the call's claim on an
    Idempotency-Key, so a replay finds exactly the answer that was charged."""

    def __init__(self, pool: asyncpg.Pool, ttl_seconds: float, claim: idempotency.Claim | None) -> None:
        self.pool = pool
        self.ttl_seconds = ttl_seconds
        self.claim = claim
        self.void_without_hold = claim is not None  # a refused call still frees its claim

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation:
        return await ledger.reserve(self.pool, request_id=hold.request_id, account_id=hold.account_id,
                                    amount_micros=high, min_micros=low, ttl_seconds=self.ttl_seconds,
                                    key_id=hold.key_id)

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> Resolution:
        async with self.pool.acquire() as conn, conn.transaction():
            resolution = await ledger.settle(conn, request_id=hold.request_id, actual_micros=actual_micros,
                                             estimated=estimated, record=record)
            if self.claim is not None and response is not None:
                await idempotency.store(conn, self.claim, status_code=200, response=response)
            return resolution

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> Resolution | None:
        async with self.pool.acquire() as conn, conn.transaction():
            resolution = None
            with contextlib.suppress(UnknownHold):  # refused, or never reached the database: no hold to release
                resolution = await ledger.void(conn, request_id=hold.request_id, reason=reason, record=record)
            if self.claim is not None:
                await idempotency.release(conn, self.claim)
            return resolution


class Holds:
    """The app's hold service: opens a Hold per billed call, with the steps its modality needs. With a QuotaBook,
    chat calls of keys without a spend limit are admitted against this process's quotas where they fit."""

    def __init__(self, pool: asyncpg.Pool, batcher: LedgerBatcher, tasks: TaskOwner, *, ttl_seconds: float,
                 void_wait_seconds: float, events: HoldEvents | None = None,
                 quotas: QuotaBook | None = None) -> None:
        self.pool = pool
        self.tasks = tasks
        self.events = events or NoEvents()
        self.ttl_seconds = ttl_seconds
        self.void_wait_seconds = void_wait_seconds
        self.batched = Batched(pool, batcher, ttl_seconds)
        self.quoted = None if quotas is None else Quoted(self.batched, quotas)

    def claimed(self, claim: idempotency.Claim | None) -> Claimed:
        return Claimed(self.pool, self.ttl_seconds, claim)

    def open(self, request_id: str, *, account_id: str, key_id: str | None, record: RequestRecord,
             steps: Steps | None = None, spend_limited: bool = True) -> Hold:
        """`spend_limited`: the key has a spend limit (its calls always take per-call holds, which the limit
        bounds)."""
        if steps is None:
            steps = self.batched if spend_limited or self.quoted is None else self.quoted
        return Hold(self.tasks, steps, request_id=request_id, account_id=account_id,
                    key_id=key_id, record=record, void_wait_seconds=self.void_wait_seconds, events=self.events)


class Hold:
    """The money side of one call: its hold, and the single settlement or void that ends it."""

    def __init__(self, tasks: TaskOwner, steps: Steps, *, request_id: str, account_id: str, key_id: str | None,
                 record: RequestRecord, void_wait_seconds: float, events: HoldEvents | None = None) -> None:
        self.tasks = tasks
        self.events = events or NoEvents()
        self.void_wait_seconds = void_wait_seconds
        self.steps = steps
        self.request_id = request_id
        self.account_id = account_id
        self.key_id = key_id
        self.record = record
        self.reservation: Reservation | None = None
        self.resolution: Resolution | None = None
        self.admission: Admission | None = None  # admitted under this process's quota (billing.quotas)
        self._opened = time.monotonic()
        self._resolving = False
        self._handed_off = False

    @property
    def resolved(self) -> bool:
        """True once a settlement or void has started, or the hold was handed to a task that will end it."""
        return self._resolving or self._handed_off

    def hand_off(self) -> None:
        """A task the app owns takes over resolving this hold (a stream being drained and settled)."""
        self._handed_off = True

    def nothing_to_resolve(self) -> None:
        """The call made no hold of its own (an idempotent replay of an earlier call): nothing may be voided."""
        self._handed_off = True

    async def reserve(self, amount_micros: int, *, min_micros: int | None = None) -> Reservation:
        """Hold between `min_micros` and `amount_micros` (as much as is available); the hold is committed when
        this returns. A refusal (InsufficientBalance, KeyLimitExceeded) made no hold. If the caller is cancelled
        while the hold is being taken, or the database fails after it may have committed it, it is voided as
        soon as it exists."""
        low = amount_micros if min_micros is None else min_micros
        task = self.tasks.drained(self.steps.reserve(self, low, amount_micros), f"reserve {self.request_id}")
        try:
            self.reservation = await asyncio.shield(task)
        except DatabaseUnavailable as exc:
            # The statement may have committed before its answer was lost (and a claim may need freeing): that is
            # settled once the database answers, in the background, so that the caller gets its 503 now.
            if exc.before_query and not self.steps.void_without_hold:
                self._resolving = True  # it never reached the database: there is nothing to end
            else:
                self._void_after(task, "the database failed while the hold was taken")
            raise
        except BillingError as exc:
            if isinstance(exc, DuplicateRequest):  # only a retry after a lost answer meets its own hold
                self._void_after(task, "duplicate reservation")
            raise  # otherwise a refusal: no hold was made
        except BaseException:
            self._void_after(task, "cancelled")
            raise
        if not self.reservation.replayed:
            self.events.reserved(self.reservation)
        return self.reservation

    def _void_after(self, task: asyncio.Task[Reservation], reason: str) -> None:
        self._resolving = True

        async def void() -> None:
            await asyncio.wait([task])  # whatever the reservation's own outcome: a hold may exist
            await self._void(reason, Outcome(status="cancelled", error_code="CANCELLED"))

        self.tasks.drained(void(), f"void {self.request_id}")

    def _json(self, outcome: Outcome) -> dict[str, Any]:
        # The duration, unless the outcome states one, runs from the call's arrival to its outcome.
        return self.record.as_json(outcome, duration_ms=int((time.monotonic() - self._opened) * 1000))

    async def settle(self, actual_micros: int, *, estimated: bool = False, outcome: Outcome,
                     response: dict[str, Any] | None = None) -> Resolution | None:
        """Post the charge and release the rest of the hold, once, durably: committed when this returns."""
        if self._resolving:
            return self.resolution
        ledger.check_charge(actual_micros)
        self._resolving = True
        self.resolution = await self.tasks.shielded(self._settle(actual_micros, estimated, outcome, response),
                                                    f"settle {self.request_id}")
        return self.resolution

    async def _settle(self, actual_micros: int, estimated: bool, outcome: Outcome,
                      response: dict[str, Any] | None) -> Resolution | None:
        return await self._recorded(
            outcome, lambda record: self.steps.settle(self, actual_micros, estimated, record, response))

    async def _recorded(self, outcome: Outcome,
                        step: Callable[[dict[str, Any]], Awaitable[Resolution | None]]) -> Resolution | None:
        """Run a settle or void step durably with the call's record. Should PostgreSQL refuse something in the
        record (a bug, not an outage), the money still moves, with the record reduced to its validated fields."""
        record = self._json(outcome)  # once: a retry through an outage does not lengthen the call's duration
        try:
            resolution = await durably(lambda: step(record))
        except asyncpg.PostgresError:
            log.exception("resolving %s failed on its request record; resolving it with a minimal record",
                          self.request_id)
            minimal = RequestRecord(model=self.record.model, modality=self.record.modality,
                                    endpoint=self.record.endpoint, upstream=self.record.upstream,
                                    client_request_id=self.record.client_request_id,
                                    status=outcome.status).as_json()
            resolution = await durably(lambda: step(minimal))
        if resolution is not None and not resolution.replayed:
            self.events.resolved(resolution)
        return resolution

    async def void(self, reason: str, outcome: Outcome) -> Resolution | None:
        """Release the whole hold without charging, once, durably. A call whose reservation was refused (or never
        made) voids nothing, but its steps still run (an Idempotency-Key claim is freed). Waits for the commit at
        most `void_wait_seconds` (an answer that charges nothing need not wait out a database outage); the void
        goes on retrying after that, and returns None."""
        if self._resolving:
            return self.resolution
        self._resolving = True
        if self.reservation is None and not self.steps.void_without_hold:
            return None  # refused, or never reserved (an interrupted reservation is voided by `reserve` itself)
        task = self.tasks.drained(self._void(reason, outcome), f"void {self.request_id}")
        done, _ = await asyncio.wait({task}, timeout=self.void_wait_seconds)
        if done:
            self.resolution = task.result()
        return self.resolution

    async def _void(self, reason: str, outcome: Outcome) -> Resolution | None:
        try:
            return await self._recorded(outcome, lambda record: self.steps.void(self, reason, record))
        except UnknownHold:
            return None  # the reservation was refused or never reached the database

    def void_soon(self, reason: str, outcome: Outcome) -> None:
        """Void from a path that must not wait (the handler is being cancelled)."""
        if self.resolved:
            return
        self._resolving = True
        self.tasks.drained(self._void(reason, outcome), f"void {self.request_id}")
