"""Webhook delivery across real `meterline serve` processes (issue 13): two processes deliver every event once,
and an event whose delivering process is killed with SIGKILL mid-attempt is delivered by another."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from billing import ledger, webhooks
from billing.errors import DatabaseUnavailable
from tests.factories import make_account
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.serving import meterline_serve
from tests.test_webhooks import until


@pytest.fixture
def receiver() -> WebhookReceiver:
    return WebhookReceiver()


@pytest.fixture
async def receiver_server(aiohttp_server: Any, receiver: WebhookReceiver) -> TestServer:
    server: TestServer = await aiohttp_server(receiver.app())
    return server


def _env(database_url: str) -> dict[str, str]:
    return {"METERLINE_DATABASE_URL": database_url, "METERLINE_REMOTE_CATALOG": "false",
            "METERLINE_WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", "METERLINE_WEBHOOK_POLL_SECONDS": "0.05",
            "METERLINE_WEBHOOK_TIMEOUT_SECONDS": "1", "METERLINE_WEBHOOK_LEASE_SECONDS": "2",
            "METERLINE_WEBHOOK_RETRY_SCHEDULE_SECONDS": json.dumps([0, 0.2, 0.2, 0.2])}


async def _subscribed(pool: asyncpg.Pool, url: str) -> str:
    account_id = await make_account(pool)
    await webhooks.create_endpoint(pool, account_id=account_id, url=url, events=["topup.posted"], description=None)
    return account_id


async def test_two_processes_deliver_every_event_exactly_once(
        pool: asyncpg.Pool, database_url: str, receiver: WebhookReceiver, receiver_server: TestServer) -> None:
    account_id = await _subscribed(pool, str(receiver_server.make_url("/hook")))
    async with meterline_serve(_env(database_url)), meterline_serve(_env(database_url)):
        for n in range(30):
            await ledger.post(pool, account_id=account_id, kind="topup", amount_micros=1 + n, description=None)

        async def all_delivered() -> bool:
            return bool(await pool.fetchval("SELECT count(*) = 30 FROM webhook_deliveries WHERE state = 'delivered'"))

        await until(all_delivered, "every delivery")
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(ids) == 30 and len(set(ids)) == 30
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 30


async def test_an_event_whose_process_is_killed_mid_delivery_is_delivered_by_another(
        pool: asyncpg.Pool, database_url: str, receiver: WebhookReceiver, receiver_server: TestServer) -> None:
    receiver.hold_first = True  # the first attempt reaches the receiver and waits there
    account_id = await _subscribed(pool, str(receiver_server.make_url("/hook")))
    async with meterline_serve(_env(database_url)) as (_, first):
        await ledger.post(pool, account_id=account_id, kind="topup", amount_micros=7, description=None)
        await asyncio.wait_for(receiver.arrived.wait(), 30)
        first.kill()  # SIGKILL, mid-attempt: its answer is never read, its lease is never released
        await first.wait()
    receiver.release.set()
    assert await pool.fetchval("SELECT state FROM webhook_deliveries") == "pending"
    async with meterline_serve(_env(database_url)):
        async def delivered() -> bool:
            return bool(await pool.fetchval("SELECT state = 'delivered' FROM webhook_deliveries"))

        await until(delivered, "the delivery by the other process")
    event_id = await pool.fetchval("SELECT id FROM webhook_events")
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 1  # the killed attempt left no record


async def test_a_postgresql_restart_loses_no_pending_event(
        aiohttp_client: Any, settings: Any, stoppable_postgres: Any, outage_pool: asyncpg.Pool,
        receiver: WebhookReceiver, receiver_server: TestServer) -> None:
    from gateway.app import create_app

    receiver.answers = [500]  # the first attempt fails: the event is pending when the database goes
    await aiohttp_client(create_app(settings.model_copy(update={
        "database_url": stoppable_postgres.url, "webhook_allow_private_targets": True, "webhook_poll_seconds": 0.05,
        "webhook_retry_schedule_seconds": [0.0, 1.0, 1.0]})))
    account_id = await _subscribed(outage_pool, str(receiver_server.make_url("/hook")))
    await ledger.post(outage_pool, account_id=account_id, kind="topup", amount_micros=9, description=None)
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    await stoppable_postgres.stopped()
    await asyncio.sleep(1.5)  # the retry falls due while the database is down
    await stoppable_postgres.started()

    async def delivered() -> bool:
        try:
            return bool(await outage_pool.fetchval("SELECT state = 'delivered' FROM webhook_deliveries"))
        except DatabaseUnavailable:  # the pool's connections died with the server; the next try reconnects
            return False

    await until(delivered, "the delivery after the restart")
    event_id = await outage_pool.fetchval("SELECT id FROM webhook_events")
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]
    assert [r["status"] for r in await outage_pool.fetch("SELECT status FROM webhook_attempts ORDER BY id")] == [
        500, 200]
