"""API keys: minted with 256 random bits, shown once, stored only as a SHA-256 digest.

Authentication hashes the presented key, looks the digest up by its unique index and compares digests in constant
time. `KeyStore` caches lookups for at most `ttl_seconds`, so a revocation reaches every process within that.
While `follow_key_changes` listens for the database's key-change notifications (a trigger on api_keys), answers
may live for `notified_ttl_seconds` instead: a change evicts its key at once, and the listener's heartbeat vouches
for the link, so a lost link falls back to the short TTL within a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from billing.accounts import get_account, new_id
from billing.db import Executor
from billing.errors import DatabaseUnavailable, KeyNotFound

KEY_PREFIX = "ml-"
_SECRET_LENGTH = 43  # token_urlsafe(32): 256 bits in 43 URL-safe characters
_DISPLAY_CHARS = 8
# What every read of a key returns (never its digest); billing.limits returns the same row.
KEY_COLUMNS = ("id, account_id, name, prefix, created_at, revoked_at, limit_micros, limit_reset, rpm_limit, rpd_limit,"
               " detailed_logging")
# The channel schema.sql's api_keys trigger notifies, with the changed key's digest in hex.
KEY_CHANNEL = "meterline_keys"

log = logging.getLogger("meterline.keys")


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def looks_like_key(secret: str) -> bool:
    return secret.startswith(KEY_PREFIX) and len(secret) == len(KEY_PREFIX) + _SECRET_LENGTH


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    account_id: str
    name: str | None
    prefix: str
    # Request-rate limits (None = unlimited), cached with the key so an unlimited key needs no extra read.
    rpm_limit: int | None = None
    rpd_limit: int | None = None
    # lumyx's Detailed Logging: chats are stored as conversations and may use memory (billing.conversations).
    detailed_logging: bool = False
    # The key has a spend limit: its calls take per-call holds, which the limit bounds (billing.quotas).
    spend_limited: bool = False


async def create_key(conn: Executor, *, account_id: str, name: str | None,
                     detailed_logging: bool = False) -> tuple[dict[str, Any], str]:
    """Mint a key for the account; returns (the stored row, the secret). The secret is never stored."""
    await get_account(conn, account_id)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, account_id, name, prefix, digest, detailed_logging) VALUES ($1, $2, $3, $4, $5, $6)"
        " RETURNING " + KEY_COLUMNS,
        new_id("key"), account_id, name, secret[: len(KEY_PREFIX) + _DISPLAY_CHARS], digest(secret),
        detailed_logging,
    )
    assert row is not None
    return dict(row), secret


async def list_keys(conn: Executor, account_id: str) -> list[dict[str, Any]]:
    await get_account(conn, account_id)
    rows = await conn.fetch(
        "SELECT " + KEY_COLUMNS + " FROM api_keys"
        " WHERE account_id = $1 ORDER BY created_at, id",
        account_id,
    )
    return [dict(r) for r in rows]


async def set_detailed_logging(conn: Executor, key_id: str, on: bool) -> dict[str, Any]:
    """Turn a key's Detailed Logging on or off (turning it off stores nothing more; what is stored stays until
    deleted or purged). Every gateway hears of it through the key-change trigger."""
    row = await conn.fetchrow("UPDATE api_keys SET detailed_logging = $2 WHERE id = $1 RETURNING " + KEY_COLUMNS,
                              key_id, on)
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


async def revoke_key(conn: Executor, key_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1"
        " RETURNING " + KEY_COLUMNS,
        key_id,
    )
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


class KeyStore:
    """Resolves presented secrets to live keys, caching each answer (found or not) for `ttl_seconds`, or for
    `notified_ttl_seconds` while a key-change listener vouches for its link (see `follow_key_changes`)."""

    def __init__(self, conn: Executor, *, ttl_seconds: float = 1.0, max_entries: int = 100_000,
                 notified_ttl_seconds: float = 0.0) -> None:
        self._conn = conn
        self._ttl = ttl_seconds
        self._notified_ttl = max(notified_ttl_seconds, ttl_seconds)
        self._max = max_entries
        self._cache: dict[bytes, tuple[float, ApiKey | None]] = {}  # digest -> (fetched at, answer)
        self._heard_until = 0.0  # monotonic time until which every key change is known to have reached us
        self._listening_since = math.inf  # answers read before the listener was listening never live long
        self._epoch = 0  # bumped by every eviction: a lookup that raced one is not cached

    @property
    def listening(self) -> bool:
        return time.monotonic() < self._heard_until

    def listening_from(self, since: float) -> None:
        """The listener's LISTEN is in force from `since` (monotonic): answers read after it may live long."""
        self._listening_since = since

    def heard(self, until: float) -> None:
        """The listener saw its link working: every change committed before it asked is already evicted."""
        self._heard_until = until

    def evict(self, digest_hex: str | None = None) -> None:
        """A key changed (revoked, limits edited, created): forget it, or everything when unnamed."""
        self._epoch += 1
        if digest_hex is None:
            self._cache.clear()
            return
        try:
            self._cache.pop(bytes.fromhex(digest_hex), None)
        except ValueError:
            self._cache.clear()

    def deaf(self) -> None:
        """The listener lost its link: changes may have been missed, so cached answers are trusted for the short
        TTL only (as if there had never been a listener), and a new link starts afresh."""
        self._heard_until = 0.0
        self._listening_since = math.inf
        self._epoch += 1

    async def authenticate(self, secret: str) -> ApiKey | None:
        if not looks_like_key(secret):
            return None
        wanted = digest(secret)
        now = time.monotonic()
        cached = self._cache.get(wanted)
        if cached is not None:
            age = now - cached[0]
            if age < self._ttl or (age < self._notified_ttl and now < self._heard_until
                                   and cached[0] >= self._listening_since):
                return cached[1]
        epoch = self._epoch
        row = await self._conn.fetchrow(
            "SELECT id, account_id, name, prefix, digest, rpm_limit, rpd_limit, detailed_logging,"
            " limit_micros IS NOT NULL AS spend_limited FROM api_keys"
            " WHERE digest = $1 AND revoked_at IS NULL",
            wanted,
        )
        key = None
        if row is not None and hmac.compare_digest(bytes(row["digest"]), wanted):
            key = ApiKey(row["id"], row["account_id"], row["name"], row["prefix"],
                         row["rpm_limit"], row["rpd_limit"], row["detailed_logging"], row["spend_limited"])
        if epoch != self._epoch:
            return key  # a key changed while this was read: the answer may predate it, so it is not kept
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[wanted] = (now, key)
        return key

    def forget(self) -> None:
        self._cache.clear()


async def follow_key_changes(connect: Callable[[], Awaitable[asyncpg.Connection]], store: KeyStore, *,
                             beat_seconds: float = 0.25, trust_seconds: float = 0.75) -> None:
    """LISTEN for key changes on a connection of its own and evict them from `store`, until cancelled.

    Every `beat_seconds` a round trip proves the link: notifications arrive in order with query results, so all
    changes committed before the beat was sent have been seen, and the store may trust long-lived answers for
    `trust_seconds` after it. A lost link makes the store deaf (short TTL) until a new link is listening.
    """
    lost = False  # said once per lost link; the attempts that fail while the database is away say nothing
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await connect()
            await conn.add_listener(KEY_CHANNEL, lambda _c, _pid, _channel, payload: store.evict(payload))
            # Whatever changed before this link listened is unknown: older answers keep the short TTL.
            store.listening_from(time.monotonic())
            if lost:
                log.info("key-change listener linked again")
                lost = False
            while True:
                sent = time.monotonic()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that races
                # the reply, and this loop would then outlive its app.
                async with asyncio.timeout(trust_seconds):
                    await conn.fetchval("SELECT 1")
                store.heard(sent + trust_seconds)
                await asyncio.sleep(beat_seconds)
        except (DatabaseUnavailable, TimeoutError) as exc:
            if not lost:
                # An outage is the database's to report (billing.db logs it once); a link lost on its own is news.
                log.log(logging.INFO if isinstance(exc, DatabaseUnavailable) else logging.WARNING,
                        "key-change listener lost its link (%s); cached keys fall back to the short TTL", exc)
                lost = True
        finally:
            store.deaf()
            if conn is not None:
                conn.terminate()
        await asyncio.sleep(1.0)
