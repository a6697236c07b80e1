"""PostgreSQL stopped and started under a running gateway: every route that needs it answers 503 with Retry-After
(never a 500), nothing is forwarded without a committed hold, the log says so once, and service resumes by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import db
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, cost, point_at
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
    said = [(r.levelname, re.sub(r" \(.*| after [0-9.]+s$", "", r.getMessage()))
            for r in caplog.records if r.name == "meterline.database"]
    assert said == [("WARNING", "database unavailable"), ("INFO", "database available again")], [
        r.getMessage() for r in caplog.records if r.name == "meterline.database"]  # once each
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_30_second_outage_loses_no_answered_call_and_doubles_none(
        aiohttp_client: Any, settings: Settings, openrouter: FakeUpstream, openrouter_server: TestServer,
        stoppable_postgres: StoppablePostgres, outage_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls and streams in flight when PostgreSQL stops are answered while it is down (streams after waiting
    `stream_settle_wait_seconds` for their commit, non-streaming answers once it returns); once it is back after
    30 s, every call whose answer completed is charged exactly once. Settlement retries have no give-up timer (the
    retries that stopped after ~8 s lost 29 calls in issue 10's soak)."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    app = create_app(point_at(settings, openrouter_server, database_url=stoppable_postgres.url,
                              stream_settle_wait_seconds=1.0))
    client: TestClient = await aiohttp_client(app)
    account, secret = await make_customer(outage_pool, balance_micros=10_000_000)
    auth = {"Authorization": f"Bearer {secret}"}
    openrouter.hold_answers, openrouter.hold_after = True, 2
    plain = [asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT, headers=auth)) for _ in range(4)]
    streams = [asyncio.ensure_future(client.post(
        "/v1/chat/completions", headers=auth,
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})) for _ in range(4)]
    for _ in range(500):  # until all eight hold and are in the upstream's hands
        if openrouter.calls["chat"] == 8:
            break
        await asyncio.sleep(0.02)
    assert openrouter.calls["chat"] == 8

    await stoppable_postgres.stopped()
    stopped_at = asyncio.get_running_loop().time()
    openrouter.release.set()  # every upstream answer now completes while the database is down
    bodies = [await (await stream).read() for stream in streams]
    assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
    assert not any(call.done() for call in plain)  # a non-streaming answer waits for its charge to commit
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert (refused.status, refused.headers["Retry-After"]) == (503, "2")
    await asyncio.sleep(max(0.0, 30 - (asyncio.get_running_loop().time() - stopped_at)))

    await stoppable_postgres.started()
    answers = await asyncio.wait_for(asyncio.gather(*plain), timeout=60)
    assert [a.status for a in answers] == [200] * 4
    charge = cost(12, 5)
    for _ in range(400):  # the streams' settlements retry in the background: wait for them, bounded
        charges = await outage_pool.fetch("SELECT request_id, amount_micros FROM transfers WHERE kind = 'charge'")
        if len(charges) >= 8:
            break
        await asyncio.sleep(0.05)
    answered = {a.headers["X-Request-Id"] for a in answers} | {(await s).headers["X-Request-Id"] for s in streams}
    assert sorted(c["request_id"] for c in charges) == sorted(answered)  # each exactly once
    assert all(c["amount_micros"] == charge for c in charges)
    balance = await outage_pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1",
                                         account)
    assert balance == 10_000_000 - 8 * charge
    assert await verify(outage_pool) == []


def test_a_failure_right_after_recovery_is_not_a_new_outage_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """A connection that died with the server may fail its last query just after another query found the database
    back: that is the same outage, not a new one (one line each way, however the recovery flickers)."""
    caplog.set_level(logging.INFO)
    health = db.Health()
    health.failed(OSError("refused"))
    health.answered()
    health.failed(OSError("a connection that died with the server"))  # within the settling time
    assert not health.available
    health.answered()
    assert health.available
    health._recovered_at -= db.Health.RECOVERY_SETTLING_SECONDS + 1  # a later outage, past the settling time
    health.failed(OSError("refused again"))
    health.answered()
    assert [r.getMessage().split(" (")[0].split(" after")[0] for r in caplog.records] == [
        "database unavailable", "database available again", "database unavailable", "database available again"]
