"""Per-key request-rate limits (rpm/rpd): counted atomically in PostgreSQL, so they hold across processes.

The limit clock is pinned through the database URL (`?meterline.now=...` becomes a session setting of every
connection), which makes window boundaries and Retry-After exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import keys, limits
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_account
from tests.serving import meterline_serve

NOW = "2026-03-15T12:00:30Z"


def _pinned(url: str, at: str = NOW) -> str:
    return f"{url}{'&' if '?' in url else '?'}meterline.now={at}"


def _epoch(text: str) -> str:
    return str(int(datetime.fromisoformat(text).timestamp()))


async def _limited_customer(pool: asyncpg.Pool, **limit: int) -> str:
    account = await make_account(pool, balance_micros=1_000)
    row, secret = await keys.create_key(pool, account_id=account, name="rated")
    await limits.set_key_limits(pool, row["id"], dict(limit))
    return secret


@pytest.fixture
async def pinned_client(aiohttp_client: object, settings: Settings, database_url: str) -> TestClient:
    app = create_app(settings.model_copy(update={"database_url": _pinned(database_url)}))
    return await aiohttp_client(app)  # type: ignore[operator,no-any-return]


async def test_the_minute_limit_refuses_with_lumyx_headers(pinned_client: TestClient, pool: asyncpg.Pool) -> None:
    secret = await _limited_customer(pool, rpm_limit=3)
    auth = {"Authorization": f"Bearer {secret}"}
    admitted = [await pinned_client.get("/v1/balance", headers=auth) for _ in range(3)]
    assert [r.status for r in admitted] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Remaining-Minute"] for r in admitted] == ["2", "1", "0"]
    assert {r.headers["X-RateLimit-Limit-Minute"] for r in admitted} == {"3"}
    assert "X-RateLimit-Limit-Day" not in admitted[0].headers  # no daily limit set
    resp = await pinned_client.get("/openai/v1/balance", headers=auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "RATE_LIMITED"
    assert {k: v for k, v in resp.headers.items() if k.startswith(("X-RateLimit", "Retry-After"))} == {
        "X-RateLimit-Limit-Minute": "3",
        "X-RateLimit-Remaining-Minute": "0",
        "X-RateLimit-Reset-Minute": _epoch("2026-03-15T12:01:00Z"),
        "Retry-After": "30",
    }


async def test_the_day_limit_refuses_until_midnight_utc(pinned_client: TestClient, pool: asyncpg.Pool) -> None:
    secret = await _limited_customer(pool, rpm_limit=10, rpd_limit=2)
    auth = {"Authorization": f"Bearer {secret}"}
    assert [(await pinned_client.get("/v1/key", headers=auth)).status for _ in range(2)] == [200, 200]
    resp = await pinned_client.get("/v1/key", headers=auth)
    assert resp.status == 429
    headers = resp.headers
    assert (headers["X-RateLimit-Limit-Day"], headers["X-RateLimit-Remaining-Day"]) == ("2", "0")
    assert headers["X-RateLimit-Reset-Day"] == _epoch("2026-03-16T00:00:00Z")
    assert headers["Retry-After"] == str(11 * 3600 + 59 * 60 + 30)
    # The request the day refused was not counted against the minute.
    assert headers["X-RateLimit-Remaining-Minute"] == "8"


async def test_a_new_minute_window_starts_from_zero(pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    row, _ = await keys.create_key(pool, account_id=account, name="k")
    async with pool.acquire() as conn:
        await conn.execute("SET meterline.now = '2026-03-15T12:00:59Z'")
        first = [await limits.count_request(conn, row["id"], rpm_limit=1, rpd_limit=None) for _ in range(2)]
        await conn.execute("SET meterline.now = '2026-03-15T12:01:00Z'")
        after = await limits.count_request(conn, row["id"], rpm_limit=1, rpd_limit=None)
    assert [d.allowed for d in first] == [True, False]
    assert (after.allowed, after.minute_count) == (True, 1)
    # The finished window's row is gone: counters do not accumulate forever.
    assert await pool.fetchval("SELECT count(*) FROM rate_windows") == 1


async def test_a_key_without_rate_limits_writes_no_counters(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool)
    _, secret = await keys.create_key(pool, account_id=account, name="free")
    for _ in range(5):
        assert (await client.get("/v1/balance", headers={"Authorization": f"Bearer {secret}"})).status == 200
    assert await pool.fetchval("SELECT count(*) FROM rate_windows") == 0


def _gateway(database_url: str, config: Path) -> contextlib.AbstractAsyncContextManager[tuple[str, object]]:
    """A real `meterline serve` process sharing the database. Its own minimal config: this test needs no
    upstreams or models."""
    config.write_text("sweep_interval_seconds = 1\n")
    return meterline_serve({"METERLINE_DATABASE_URL": database_url, "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
                            "METERLINE_CONFIG": str(config)})


async def test_the_limit_holds_across_two_gateway_processes(pool: asyncpg.Pool, database_url: str) -> None:
    secret = await _limited_customer(pool, rpm_limit=4, rpd_limit=1000)
    url = _pinned(database_url)
    auth = {"Authorization": f"Bearer {secret}"}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            _gateway(url, Path(tmp) / "a.toml") as (a, _),
            _gateway(url, Path(tmp) / "b.toml") as (b, _),
            aiohttp.ClientSession(headers=auth) as http,
        ):

            async def call(base: str) -> int:
                async with http.get(f"{base}/v1/balance") as resp:
                    return resp.status

            statuses = await asyncio.gather(*[call(a if i % 2 else b) for i in range(12)])
    assert sorted(statuses) == [200] * 4 + [429] * 8
    counts = await pool.fetch("SELECT kind, count FROM rate_windows ORDER BY kind")
    assert [(r["kind"], r["count"]) for r in counts] == [("day", 4), ("minute", 4)]
