"""PostgreSQL stopped and started under a running gateway: every route that needs it answers 503 with Retry-After
(never a 500), nothing is forwarded without a committed hold, the log says so once, and service resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.conftest import admin_headers
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream
from tests.outage import StoppablePostgres

CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 50}


async def _gateway(aiohttp_client: Any, settings: Settings, upstream: TestServer, url: str,
                   monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    app = create_app(point_at(settings, upstream, database_url=url))
    client: TestClient = await aiohttp_client(app)
    return client


async def test_a_stopped_database_is_a_503_with_retry_after_and_service_resumes_by_itself(
        aiohttp_client: Any, settings: Settings, openrouter: FakeUpstream, openrouter_server: TestServer,
        stoppable_postgres: StoppablePostgres, outage_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client = await _gateway(aiohttp_client, settings, openrouter_server, stoppable_postgres.url, monkeypatch)
    _, secret = await make_customer(outage_pool, balance_micros=1_000_000)
    auth = {"Authorization": f"Bearer {secret}"}
    first = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert first.status == 200

    await stoppable_postgres.stopped()
    answers = [
        await client.post("/v1/chat/completions", json=CHAT, headers=auth),
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth),
        await client.get("/v1/balance", headers=auth),
        await client.get("/v1/requests", headers=auth),
        await client.get("/admin/accounts", headers=admin_headers()),
        await client.post("/admin/accounts", json={"name": "Zed"}, headers=admin_headers()),
    ]
    for answer in answers:
        body = await answer.json()
        assert (answer.status, answer.headers["Retry-After"], body["error"]["code"], body["error"]["type"]) == (
            503, "2", "SERVICE_UNAVAILABLE", "server_error"), (answer.url, body)
        assert answer.headers["X-Request-Id"].startswith("req_")
    ready = await client.get("/readyz")
    assert (ready.status, (await ready.json())["checks"]) == (503, {"database": "unavailable"})
    assert openrouter.calls["chat"] == 1  # nothing was forwarded without a committed hold

    await stoppable_postgres.started()
    for _ in range(200):  # a bound on waiting for the pool to reconnect, not a timing assertion
        resumed = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
        if resumed.status == 200:
            break
        assert resumed.status == 503
        await asyncio.sleep(0.05)
    assert resumed.status == 200
    assert (await client.get("/readyz")).status == 200

    holds = await outage_pool.fetch("SELECT state FROM holds ORDER BY created_at")
    assert [h["state"] for h in holds] == ["settled", "settled"]
    assert openrouter.calls["chat"] == 2
    assert await verify(outage_pool) == []
    said = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records if r.name == "meterline.database"]
    assert said == [("WARNING", "database unavailable"), ("INFO", "database available again after")] or (
        said[0] == ("WARNING", "database unavailable") and said[-1][1].startswith("database available again"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
