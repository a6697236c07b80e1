"""Shared fixtures: a real PostgreSQL for the whole session, a clean database per test, the app and its client.

Where the database comes from, in order: METERLINE_TEST_DATABASE_URL; a testcontainers PostgreSQL when a Docker
engine answers; else the embedded pgserver in a temporary directory. A fresh database is created for the session
on that server (when it allows CREATE DATABASE), so parallel runs and other data are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient

from billing import db, schema
from gateway.app import create_app
from gateway.settings import Settings, load_settings
from tests.factories import make_customer

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-0123456789"
# Fixtures of the chat tests (a fake OpenRouter and a gateway pointed at it), importable by name in any test.
pytest_plugins = ["tests.chat_support", "tests.console_support", "tests.fakes.media_upstream", "tests.outage",
                  "tests.log_support", "tests.fakes.stripe"]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The tests run on the event loop `meterline serve` runs on (gateway.app.serve): uvloop where it exists."""
    try:
        import uvloop
    except ImportError:  # no Windows build; serve falls back to asyncio's loop there too
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False  # no engine to ask (asking anyway leaves docker-py's failed socket to be reported at random)
    client = None
    try:
        import docker

        client = docker.from_env(timeout=2)
        client.ping()
        return True
    except Exception:  # any failure means "no usable engine"; the embedded server is the fallback
        return False
    finally:
        if client is not None:
            client.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("METERLINE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        tmp = tempfile.mkdtemp(prefix="meterline-pg-")
        server = pgserver.get_server(tmp, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    name = f"meterline_test_{os.getpid()}_{secrets.token_hex(3)}"

    async def create() -> str:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return _with_database(server_url, name)
        except asyncpg.InsufficientPrivilegeError:
            return server_url  # a database we may not multiply: use it as given
        finally:
            await conn.close()

    url = asyncio.run(create())

    async def migrate() -> None:
        conn = await db.connect(url)
        try:
            await schema.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    yield url
    if url != server_url:

        async def drop() -> None:
            conn = await asyncpg.connect(server_url)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()

        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(drop())


async def reset(conn: asyncpg.Connection) -> None:
    """Empty every table but the migration records, and restore the seed rows. The ledger refuses TRUNCATE, so its
    guards are switched off for this one transaction (which takes the table owner's privilege, as it should)."""
    tables = await conn.fetchval(
        "SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables"
        " WHERE schemaname = 'public' AND tablename <> 'meterline_migrations'")
    async with conn.transaction():
        await conn.execute("ALTER TABLE transfers DISABLE TRIGGER transfers_no_truncate;"
                           " ALTER TABLE holds DISABLE TRIGGER holds_no_truncate")
        await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE; SELECT meterline_seed();")
        await conn.execute("ALTER TABLE transfers ENABLE TRIGGER transfers_no_truncate;"
                           " ALTER TABLE holds ENABLE TRIGGER holds_no_truncate")


@pytest.fixture
async def fresh_database(server_url: str) -> AsyncIterator[Callable[[], Awaitable[asyncpg.Connection]]]:
    """Make empty databases on the test server (dropped afterwards); yields a maker of connections to new ones."""
    made: list[tuple[str, asyncpg.Connection]] = []

    async def make() -> asyncpg.Connection:
        name = f"meterline_schema_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.InsufficientPrivilegeError:
            pytest.skip("the test server does not allow CREATE DATABASE")
        finally:
            await admin.close()
        conn = await db.connect(_with_database(server_url, name))
        made.append((name, conn))
        return conn

    yield make
    for name, conn in made:
        await conn.close()
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database emptied for this test (seed rows restored)."""
    p = await db.create_pool(database_url, min_size=1, max_size=20)
    async with p.acquire() as conn:
        await reset(conn)
    yield p
    await p.close()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return load_settings(
        config=ROOT / "config" / "meterline.toml",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        sweep_interval_seconds=0.2,
        pool_min_size=1,
        remote_catalog=False,  # no test reaches the real OpenRouter; chat tests point it at a fake
        # The tests state per-call holds exactly (what is held and available after each call); quota grants, which
        # hold part of a rich account's balance for a process, have their own tests (tests/test_quotas.py).
        quotas=False,
    )


@pytest.fixture
async def client(aiohttp_client: object, settings: Settings, pool: asyncpg.Pool) -> TestClient:
    return await aiohttp_client(create_app(settings))  # type: ignore[operator,no-any-return]


def admin_headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}", **extra}


@pytest.fixture
async def customer(request: pytest.FixtureRequest, pool: asyncpg.Pool) -> tuple[str, str]:
    """An account funded with the test module's FUNDS and a key for it: (account_id, secret)."""
    return await make_customer(pool, balance_micros=request.module.FUNDS)


@pytest.fixture
async def sdk(api: TestClient, customer: tuple[str, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI SDK pointed at the module's `api` test client, as the customer."""
    client = openai.AsyncOpenAI(base_url=str(api.make_url("/v1")), api_key=customer[1], max_retries=0)
    yield client
    await client.close()
