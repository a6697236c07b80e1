"""Key-change notifications: a long-lived key cache that still stops accepting a revoked key within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from billing import db, keys
from tests.factories import make_account


async def _until(condition: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def other_process(database_url: str) -> AsyncIterator[tuple[keys.KeyStore, asyncpg.Pool, list[int]]]:
    """A KeyStore as another gateway process has it: its own pool, a 300 s notified cache, a listener."""
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    store = keys.KeyStore(pool, ttl_seconds=0.2, notified_ttl_seconds=300)
    backends: list[int] = []

    async def connect() -> asyncpg.Connection:
        conn = await db.connect(database_url)
        backends.append(conn.get_server_pid())
        return conn

    listener = asyncio.create_task(keys.follow_key_changes(connect, store))
    await _until(lambda: store.listening)
    yield store, pool, backends
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    pool.terminate()  # not close(): a test may have terminated it already


async def test_a_cached_key_is_served_without_the_database_while_listening(
    pool: asyncpg.Pool, other_process: tuple[keys.KeyStore, asyncpg.Pool, list[int]], database_url: str
) -> None:
    store, other_pool, _ = other_process
    heard: list[str] = []
    probe = await db.connect(database_url)
    try:
        await probe.add_listener(keys.KEY_CHANNEL, lambda _c, _p, _ch, payload: heard.append(payload))
        _, secret = await keys.create_key(pool, account_id=await make_account(pool), name=None)
        # The new key's own announcement evicts it (harmlessly) when it arrives: let it arrive before caching.
        await _until(lambda: heard)
        await asyncio.sleep(0.2)  # the store's listener got the same notification; give it time to act on it
    finally:
        await probe.close()
    assert await store.authenticate(secret) is not None
    await asyncio.sleep(0.3)  # past the short TTL
    other_pool.terminate()  # any read now would fail: the answer must come from the cache
    assert await store.authenticate(secret) is not None


async def test_revocation_evicts_the_cached_key_in_another_process_within_a_second(
    pool: asyncpg.Pool, other_process: tuple[keys.KeyStore, asyncpg.Pool, list[int]]
) -> None:
    store, _, _ = other_process
    row, secret = await keys.create_key(pool, account_id=await make_account(pool), name=None)
    assert await store.authenticate(secret) is not None
    await asyncio.sleep(0.3)
    await keys.revoke_key(pool, row["id"])
    revoked = time.monotonic()
    while await store.authenticate(secret) is not None:
        assert time.monotonic() - revoked < 1.0, "the revocation did not land within a second"
        await asyncio.sleep(0.01)


async def test_a_lost_listener_falls_back_to_the_short_ttl(
    pool: asyncpg.Pool, other_process: tuple[keys.KeyStore, asyncpg.Pool, list[int]]
) -> None:
    store, _, backends = other_process
    row, secret = await keys.create_key(pool, account_id=await make_account(pool), name=None)
    assert await store.authenticate(secret) is not None
    await pool.execute("SELECT pg_terminate_backend($1)", backends[-1])
    await _until(lambda: not store.listening)
    await keys.revoke_key(pool, row["id"])  # announced while nobody listens: this notification is lost
    await asyncio.sleep(0.25)  # past the short TTL
    assert await store.authenticate(secret) is None


async def test_only_changes_to_cached_fields_are_announced(pool: asyncpg.Pool, database_url: str) -> None:
    row, _ = await keys.create_key(pool, account_id=await make_account(pool), name=None)
    heard: list[str] = []
    conn = await db.connect(database_url)
    try:
        await conn.add_listener(keys.KEY_CHANNEL, lambda _c, _p, _ch, payload: heard.append(payload))
        await pool.execute("UPDATE api_keys SET held_micros = held_micros, window_spent_micros = 0"
                           " WHERE id = $1", row["id"])
        await asyncio.sleep(0.2)
        assert heard == []
        await keys.revoke_key(pool, row["id"])
        await _until(lambda: heard)
        digest = await pool.fetchval("SELECT encode(digest, 'hex') FROM api_keys WHERE id = $1", row["id"])
        assert heard == [digest]
    finally:
        await conn.close()
