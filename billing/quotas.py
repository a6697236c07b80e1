"""Quota grants: a gateway process spends a durable quota on an account in memory, call by call (issue 17).

As in Diameter Credit-Control (RFC 4006), the database grants each process a quota on an account it is serving:
a hold of its own (`meterline_quota_take`), decided under the account's row lock like every hold, so holds and
quotas together never exceed the available balance. A call whose worst case fits the room left in its process's
quota is admitted here, with no round trip before it is forwarded; its charge (or void) is still committed before
its answer is sent, group-committed with others (`meterline_quota_settle`, billing.batcher), and draws on the quota.

    admission = book.admit(account_id, request_id, worst_micros)   # None: take a per-call hold instead
    ...forward...
    released = <the call's quota settlement>                          # one statement, one commit
    book.release(admission, released)

The quota's lifecycle, run by one background loop per process (`run`):
- taken in the background after a per-call hold shows an account busy and rich enough: at least
  `min_calls` worst cases, and at most `share_ppm` of the available balance (the database applies the bound);
- every `beat_seconds` while it is used: its expiry extended, its amount grown toward `horizon_seconds` of the
  account's recent worst-case demand (never past the share), and the list of its calls in flight written onto it
  (the intent record). A beat never shrinks a quota: shrinking freezes admission first (`give_back`);
- given back when idle for `idle_seconds`, when the account's available balance falls low enough that per-call
  holds should decide the last calls exactly, and before a per-call hold on its account is refused for want of
  balance (the room is returned and the hold retried, so K-of-N admission stays exact within the process);
- expired by the database's sweep (`meterline_quota_sweep`) when its holder stops beating (a killed process).

A call is admitted only while the quota is known to live at least `call_ttl_seconds` (the per-call hold's TTL)
longer, so a call never outlives the quota it draws on. What a crash can lose is written in README ("Quota
grants"): the calls in flight at the moment of the kill, never an answered one; the report names every one of them
admitted more than one beat before the kill, from the intent record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from billing import db
from billing.errors import DatabaseUnavailable

log = logging.getLogger("meterline.quotas")

# A beat's floor that asks for no shrinking: the quota keeps at least what it has.
_NO_SHRINK = 2**62


@dataclass(frozen=True, slots=True)
class QuotaRules:
    share_ppm: int = 250_000  # at most this share of the available balance, per process and account
    min_calls: int = 8  # a quota covers at least this many worst cases of the account's recent calls
    beat_seconds: float = 0.1  # intent record, expiry and growth
    horizon_seconds: float = 2.0  # a quota is sized to this long of the account's worst-case demand
    idle_seconds: float = 10.0  # unused this long: given back
    call_ttl_seconds: float = 900.0  # how long a call may run (the per-call hold's TTL)
    # How long past call_ttl_seconds a beat extends the quota's life. A holder that stops beating (dead, or cut off
    # from the database) admits nothing under it a lease after its last beat, and it expires a call TTL later.
    lease_seconds: float = 10.0

    @property
    def recall_wait_seconds(self) -> float:
        """How long a refused call waits for other processes to give their quotas' room back."""
        return max(1.0, 10 * self.beat_seconds)

    @property
    def ttl_ms(self) -> int:
        return int((self.call_ttl_seconds + self.lease_seconds) * 1000)


@dataclass(slots=True, eq=False)
class LocalQuota:
    """This process's copy of one pending quota: its amount follows the database's by every change the database
    reports (a take, a beat's growth, a call's draw, a give-back), so admitting within `room` never overspends."""

    id: str
    account_id: str
    amount: int
    deadline: float  # monotonic time before which the database cannot have expired it
    reserved: int = 0  # the worst cases of the calls in flight
    in_flight: dict[str, tuple[int, float]] = field(default_factory=dict)  # request id -> (worst, admitted at)
    frozen: bool = False  # a give-back is running: admit nothing
    closing: bool = False  # given back: admits nothing, grows no more, returned once nothing is in flight
    gone: bool = False  # returned or expired
    changed: bool = True  # in flight changed since the last beat
    last_used: float = 0.0
    demand: int = 0  # worst-case micros admitted (here or by per-call holds) since the last beat
    largest: int = 0  # the largest worst case seen recently
    rate: int = 0  # worst-case micros per second, smoothed
    rated_at: float = field(default_factory=time.monotonic)  # when `demand` started accumulating
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one database step at a time

    @property
    def room(self) -> int:
        return self.amount - self.reserved


@dataclass(frozen=True, slots=True)
class Admission:
    quota: LocalQuota
    request_id: str
    worst: int
    admitted: float  # monotonic

    @property
    def age_ms(self) -> int:
        return int((time.monotonic() - self.admitted) * 1000)


class QuotaEvents(Protocol):
    """Told of quota changes (the gateway counts them); billing keeps no metrics."""

    def quota(self, event: str, micros: int) -> None: ...


class _Unobserved:
    def quota(self, event: str, micros: int) -> None:
        pass


class QuotaBook:
    def __init__(self, pool: asyncpg.Pool, rules: QuotaRules, *, events: QuotaEvents | None = None) -> None:
        self.pool = pool
        self.rules = rules
        self.events: QuotaEvents = events or _Unobserved()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.quotas: dict[str, LocalQuota] = {}
        self._wanted: dict[str, tuple[int, int]] = {}  # account -> (largest worst case, demand) seen by holds
        self._cooling: dict[str, float] = {}  # account -> monotonic time before which no quota is taken
        self._wake = asyncio.Event()
        # The loop's statements (takes, beats, give-backs) share the request path's pool: a few at a time.
        self._steps = asyncio.Semaphore(4)

    # -- the hot path --------------------------------------------------------------------------------------------

    def admit(self, account_id: str, request_id: str, worst: int) -> Admission | None:
        """Admit a call against this process's quota on the account, or None (the caller takes a per-call hold)."""
        quota = self.quotas.get(account_id)
        now = time.monotonic()
        if quota is None or quota.frozen or quota.closing or quota.room < worst \
                or now + self.rules.call_ttl_seconds >= quota.deadline:
            self.wanted(account_id, worst)
            return None
        quota.reserved += worst
        quota.in_flight[request_id] = (worst, now)
        quota.changed = True
        quota.last_used = now
        quota.demand += worst
        quota.largest = max(quota.largest, worst)
        if quota.room < self._target(quota) // 2:
            self._wake.set()
        return Admission(quota, request_id, worst, now)

    def release(self, admission: Admission, released: int) -> None:
        """The call's settlement or void committed; the quota gave up `released` to its charge."""
        quota = admission.quota
        if quota.in_flight.pop(admission.request_id, None) is None:
            return
        quota.reserved -= admission.worst
        quota.amount -= released
        quota.changed = True

    def wanted(self, account_id: str, worst: int) -> None:
        """A call on the account went to a per-call hold: note its demand, so the loop may take a quota."""
        largest, demand = self._wanted.get(account_id, (0, 0))
        self._wanted[account_id] = (max(largest, worst), demand + worst)
        quota = self.quotas.get(account_id)
        if quota is not None:
            quota.demand += worst
            self._wake.set()  # it may need to grow
        elif self._cooling.get(account_id, 0.0) <= time.monotonic():
            self._wake.set()  # one may be taken

    # -- giving back -----------------------------------------------------------------------------------------------

    async def give_back(self, account_id: str) -> bool:
        """Return the room of this process's quota on the account (all of it once nothing is in flight), and take
        none for `idle_seconds`. True if this process had a quota there: whatever room it had is back in the
        available balance when this returns (given back now, or by an earlier give-back this one waited for)."""
        quota = self.quotas.get(account_id)
        self._cooling[account_id] = time.monotonic() + self.rules.idle_seconds
        if quota is None or quota.gone:
            return False
        quota.closing = True
        await self._shrink(quota)
        return True

    async def _shrink(self, quota: LocalQuota) -> bool:
        quota.frozen = True  # from here until the database answers, nothing is admitted under it
        try:
            async with quota.lock:
                if quota.gone:
                    return False
                if not quota.in_flight:
                    released = await self.pool.fetchval("SELECT meterline_quota_return($1)", quota.id)
                    self._gone(quota)
                    self.events.quota("returned", released)
                    return bool(released)
                row = await self.pool.fetchrow(
                    "SELECT * FROM meterline_quota_beat($1, $2, $3, $4, $5, $6)", quota.id, 0, quota.reserved,
                    self.rules.share_ppm, self.rules.ttl_ms, self._intent(quota))
                assert row is not None
                self._beaten(quota, row)
                self.events.quota("shrunk", -row["delta"])
                return bool(row["delta"])
        finally:
            quota.frozen = False

    async def recall(self, account_id: str) -> bool:
        """Ask every other process holding a live quota on the account for its room back, and wait (at most a
        second, or ten beats) until each has given it back: their next tick hears it. True if any was asked (the
        caller asks for its hold again). A dead process's quota answers never: its room stays held until it
        expires."""
        # A holder beats an unchanged quota every half lease: one silent for a lease is taken for dead.
        alive_ms = int(self.rules.lease_seconds * 1000)
        asked = await self.pool.fetchval("SELECT meterline_quota_recall($1, $2, $3)", account_id, self.holder,
                                         alive_ms)
        if not asked:
            return False
        deadline = time.monotonic() + self.rules.recall_wait_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.rules.beat_seconds / 5)
            waiting = await self.pool.fetchval(
                "SELECT count(*) FROM quotas WHERE account_id = $1 AND state = 'pending' AND holder <> $2"
                " AND recalled_at IS NOT NULL"
                " AND COALESCE(in_flight_at, created_at) > now() - $3 * interval '1 millisecond'",
                account_id, self.holder, alive_ms)
            if not waiting:
                break
        return True

    def _gone(self, quota: LocalQuota) -> None:
        quota.gone = True
        if self.quotas.get(quota.account_id) is quota:
            del self.quotas[quota.account_id]

    # -- the loop ---------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Take, beat and give back quotas until cancelled (then give back what is idle)."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.rules.beat_seconds)
                self._wake.clear()
                await self._guarded(self.tick(), limited=False)
                await asyncio.sleep(self.rules.beat_seconds / 5)  # woken early at most five times a beat
        finally:
            await asyncio.shield(self.close())

    async def tick(self) -> None:
        now = time.monotonic()
        for account_id in [a for a, until in self._cooling.items() if until <= now]:
            del self._cooling[account_id]
        steps: list[Awaitable[None]] = []
        if self.quotas:
            steps.append(self._guarded(self._hear_recalls(), limited=False))  # its give-backs are limited
        for account_id, (largest, demand) in list(self._wanted.items()):
            if largest > 0 and account_id not in self.quotas and self._cooling.get(account_id, 0.0) <= now:
                steps.append(self._guarded(self._take(account_id, largest, demand)))
        self._wanted.clear()
        for quota in list(self.quotas.values()):
            steps.append(self._guarded(self._beat(quota, now)))
        if steps:
            await asyncio.gather(*steps)

    async def _hear_recalls(self) -> None:
        """One read a tick, however many quotas: has another process recalled any of ours?"""
        recalled = await self.pool.fetch(
            "SELECT account_id FROM quotas WHERE recalled_at IS NOT NULL AND state = 'pending' AND holder = $1",
            self.holder)
        await asyncio.gather(*(self._guarded(self.give_back(row["account_id"])) for row in recalled))

    async def _guarded(self, step: Awaitable[object], *, limited: bool = True) -> None:
        """Run a step of the loop, logging its failure; `limited` steps run a few at a time (each is one or two
        statements, and none of them needs a second slot)."""
        try:
            if limited:
                async with self._steps:
                    await step
            else:
                await step
        except DatabaseUnavailable:
            pass  # billing.db logs the outage once; a quota not beaten stops admitting at its deadline
        except Exception:
            log.exception("a quota step failed")

    def _target(self, quota: LocalQuota) -> int:
        return max(self.rules.min_calls * quota.largest, int(quota.rate * self.rules.horizon_seconds))

    async def _take(self, account_id: str, largest: int, demand: int) -> None:
        rate = int(demand / self.rules.beat_seconds)
        quota_id = "quota_" + secrets.token_hex(10)
        low = self.rules.min_calls * largest
        high = max(low, int(rate * self.rules.horizon_seconds))
        sent = time.monotonic()
        row = await self.pool.fetchrow("SELECT * FROM meterline_quota_take($1, $2, $3, $4, $5, $6, $7)", quota_id,
                                       account_id, self.holder, low, high, self.rules.share_ppm, self.rules.ttl_ms)
        assert row is not None
        if row["granted"] is None:  # not rich enough: per-call holds, and no new try for a while
            self._cooling[account_id] = time.monotonic() + self.rules.idle_seconds
            return
        quota = LocalQuota(quota_id, account_id, row["granted"], sent + self.rules.ttl_ms / 1000,
                           last_used=time.monotonic(), largest=largest, rate=rate)
        self.quotas[account_id] = quota
        self.events.quota("taken", row["granted"])

    async def _beat(self, quota: LocalQuota, now: float) -> None:
        if quota.gone or quota.frozen:
            return
        elapsed = now - quota.rated_at
        if elapsed >= self.rules.beat_seconds:  # a tick woken early leaves the demand to accumulate
            quota.rate = (7 * quota.rate + 3 * int(quota.demand / elapsed)) // 10
            quota.demand = 0
            quota.rated_at = now
        if not quota.in_flight and (quota.closing or now - quota.last_used >= self.rules.idle_seconds):
            await self._shrink(quota)  # idle, or given back with calls in flight that have now ended
            return
        target = 0 if quota.closing else self._target(quota)
        renew = quota.deadline - now < self.rules.call_ttl_seconds + self.rules.lease_seconds / 2
        if not (quota.changed or renew or quota.room < target // 2):
            return
        async with quota.lock:
            if quota.gone:
                return
            quota.changed = False
            sent = time.monotonic()
            row = await self.pool.fetchrow(
                "SELECT * FROM meterline_quota_beat($1, $2, $3, $4, $5, $6)", quota.id, target, _NO_SHRINK,
                self.rules.share_ppm, self.rules.ttl_ms, self._intent(quota))
            assert row is not None
            if row["state"] == "pending":
                quota.deadline = max(quota.deadline, sent + self.rules.ttl_ms / 1000)
            self._beaten(quota, row)
            if row["delta"]:
                self.events.quota("grown", row["delta"])
        available = row["available"]
        floor = self.rules.min_calls * quota.largest * 1_000_000 // self.rules.share_ppm
        if not quota.closing and available is not None and available < floor:
            # Too little left for quotas: the last calls are decided one by one, exactly, by per-call holds.
            await self.give_back(quota.account_id)

    def _beaten(self, quota: LocalQuota, row: asyncpg.Record) -> None:
        if row["state"] != "pending":
            log.warning("quota %s on account %s is %s: its holder stopped using it", quota.id, quota.account_id,
                        row["state"])
            self._gone(quota)
            return
        quota.amount += row["delta"]

    def _intent(self, quota: LocalQuota) -> list[list[Any]]:
        now = time.monotonic()
        return [[request_id, worst, int((now - at) * 1000)] for request_id, (worst, at) in quota.in_flight.items()]

    async def close(self) -> None:
        """Give back every quota with nothing in flight (at shutdown, once settlements have drained)."""
        for quota in list(self.quotas.values()):
            if not quota.in_flight:
                with contextlib.suppress(Exception):  # best effort: an unreturned quota expires on its own
                    await self._shrink(quota)

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"id": q.id, "account_id": q.account_id, "amount_micros": q.amount, "reserved_micros": q.reserved,
                 "in_flight": len(q.in_flight)} for q in self.quotas.values()]


async def sweep(conn: db.Executor, *, limit: int = 500) -> int:
    """Expire quotas past their expiry (their holder died or lost the database); safe in any number of
    processes."""
    count: int = await conn.fetchval("SELECT meterline_quota_sweep($1)", limit)
    return count


