"""API keys: minted with 256 random bits, shown once, stored only as a SHA-256 digest.

Authentication hashes the presented key, looks the digest up by its unique index and compares digests in constant
time. `KeyStore` caches lookups for at most `ttl_seconds`, so a revocation reaches every process within that.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from billing.accounts import get_account, new_id
from billing.errors import KeyNotFound
from billing.ledger import Executor

KEY_PREFIX = "ml-"
_SECRET_LENGTH = 43  # token_urlsafe(32): 256 bits in 43 URL-safe characters
_DISPLAY_CHARS = 8
_LIMITS = "limit_micros, limit_reset, rpm_limit, rpd_limit"  # per-key limits (billing.limits)


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


async def create_key(conn: Executor, *, account_id: str, name: str | None) -> tuple[dict[str, Any], str]:
    """Mint a key for the account; returns (the stored row, the secret). The secret is never stored."""
    await get_account(conn, account_id)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, account_id, name, prefix, digest) VALUES ($1, $2, $3, $4, $5)"
        " RETURNING id, account_id, name, prefix, created_at, revoked_at, " + _LIMITS,
        new_id("key"), account_id, name, secret[: len(KEY_PREFIX) + _DISPLAY_CHARS], digest(secret),
    )
    assert row is not None
    return dict(row), secret


async def list_keys(conn: Executor, account_id: str) -> list[dict[str, Any]]:
    await get_account(conn, account_id)
    rows = await conn.fetch(
        "SELECT id, account_id, name, prefix, created_at, revoked_at, " + _LIMITS + " FROM api_keys"
        " WHERE account_id = $1 ORDER BY created_at, id",
        account_id,
    )
    return [dict(r) for r in rows]


async def revoke_key(conn: Executor, key_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1"
        " RETURNING id, account_id, name, prefix, created_at, revoked_at, " + _LIMITS,
        key_id,
    )
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


class KeyStore:
    """Resolves presented secrets to live keys, caching each answer (found or not) for `ttl_seconds`."""

    def __init__(self, conn: Executor, *, ttl_seconds: float = 1.0, max_entries: int = 100_000) -> None:
        self._conn = conn
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cache: dict[bytes, tuple[float, ApiKey | None]] = {}

    async def authenticate(self, secret: str) -> ApiKey | None:
        if not looks_like_key(secret):
            return None
        wanted = digest(secret)
        now = time.monotonic()
        cached = self._cache.get(wanted)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self._conn.fetchrow(
            "SELECT id, account_id, name, prefix, digest, rpm_limit, rpd_limit FROM api_keys"
            " WHERE digest = $1 AND revoked_at IS NULL",
            wanted,
        )
        key = None
        if row is not None and hmac.compare_digest(bytes(row["digest"]), wanted):
            key = ApiKey(row["id"], row["account_id"], row["name"], row["prefix"],
                         row["rpm_limit"], row["rpd_limit"])
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[wanted] = (now + self._ttl, key)
        return key

    def forget(self) -> None:
        self._cache.clear()
