"""Webhooks (issue 13): signed by the Standard Webhooks scheme and verified here with `standardwebhooks` as a
receiver would; delivered from the outbox with retries, exhaustion and endpoint disabling; never to a private
address unless the setting allows it. Receivers are real aiohttp apps on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks import Webhook, WebhookVerificationError

from billing import ledger
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import admin_headers
from tests.factories import billed_request, make_account, make_customer
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.metrics_support import of_app, value


@pytest.fixture
def receiver() -> WebhookReceiver:
    return WebhookReceiver()


@pytest.fixture
async def receiver_server(aiohttp_server: Any, receiver: WebhookReceiver) -> TestServer:
    server: TestServer = await aiohttp_server(receiver.app())
    return server


def hook_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"webhook_allow_private_targets": True, "webhook_poll_seconds": 0.05,
                                       "webhook_retry_schedule_seconds": [0.0, 0.1, 0.1], **changes})


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (bounded) for an outcome the worker reaches in the background; the assertion is the outcome."""
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def register(client: TestClient, secret: str, url: str, events: list[str]) -> dict[str, Any]:
    resp = await client.post("/v1/webhooks", headers={"Authorization": f"Bearer {secret}"},
                             json={"url": url, "events": events, "description": "test"})
    assert resp.status == 201, await resp.text()
    return dict(await resp.json())


async def signing_secret(client: TestClient, secret: str) -> str:
    resp = await client.get("/v1/webhooks/secret", headers={"Authorization": f"Bearer {secret}"})
    return str((await resp.json())["secret"])


async def top_up(client: TestClient, account_id: str, usd: str, key: str) -> None:
    resp = await client.post(f"/admin/accounts/{account_id}/topups", json={"amount_usd": usd},
                             headers=admin_headers(**{"Idempotency-Key": key}))
    assert resp.status == 201


async def states(pool: asyncpg.Pool) -> list[tuple[str, int]]:
    return [tuple(r) for r in await pool.fetch("SELECT state, attempts FROM webhook_deliveries ORDER BY id")]


async def test_a_top_up_is_delivered_once_signed_so_that_standardwebhooks_verifies_it(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "12.50", "t-1")
    await until(lambda: _delivered(pool), "the delivery")
    assert len(receiver.received) == 1
    got = receiver.received[0]
    event = Webhook(await signing_secret(client, secret)).verify(got.body, got.headers)
    assert event["type"] == "topup.posted"
    assert (event["data"]["account_id"], event["data"]["amount_micros"], event["data"]["balance_micros"]) == (
        account_id, 12_500_000, 12_500_000)
    assert got.headers["webhook-id"] == await pool.fetchval("SELECT id FROM webhook_events")
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 32).verify(got.body, got.headers)
    assert await states(pool) == [("delivered", 1)]


async def _delivered(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = 1 FROM webhook_deliveries WHERE state = 'delivered'"))


async def test_a_receiver_that_fails_twice_gets_three_attempts_of_one_event_and_it_is_delivered_once(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    receiver.answers = [500, 503]
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    endpoint = await register(client, secret, str(receiver_server.make_url("/hook")), ["*"])
    await top_up(client, account_id, "1", "t-2")
    await until(lambda: _delivered(pool), "the third attempt")
    assert [r.headers["webhook-id"] for r in receiver.received] == [receiver.received[0].headers["webhook-id"]] * 3
    assert len({r.body for r in receiver.received}) == 1
    resp = await client.get(f"/v1/webhooks/{endpoint['id']}/attempts", headers={"Authorization": f"Bearer {secret}"})
    assert [a["status"] for a in (await resp.json())["data"]] == [200, 503, 500]
    assert await states(pool) == [("delivered", 3)]

    async def counted() -> bool:  # the worker counts an attempt once its outcome has committed
        return value(of_app(client.app), "meterline_webhook_deliveries_total", outcome="delivered") == 1

    await until(counted, "the delivery counted")
    assert value(of_app(client.app), "meterline_webhook_deliveries_total", outcome="pending") == 2


async def test_a_receiver_that_always_fails_is_exhausted_and_its_endpoint_disabled_after_the_period(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    receiver.answers = [500] * 10
    client: TestClient = await aiohttp_client(create_app(hook_settings(
        settings, webhook_retry_schedule_seconds=[0.0, 0.05], webhook_disable_after_seconds=0.3)))
    account_id, secret = await make_customer(pool)
    endpoint = await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "1", "t-3")
    await until(lambda: _state(pool, "exhausted"), "exhaustion")
    assert await states(pool) == [("exhausted", 2)]  # one attempt per entry of the schedule: at once, then 0.05 s
    await asyncio.sleep(0.35)  # failing for longer than the period: the next failure disables the endpoint
    await top_up(client, account_id, "1", "t-4")
    await until(lambda: _disabled(pool, endpoint["id"]), "the endpoint disabled")
    assert (await states(pool))[-1] == ("cancelled", 1)
    disabled = await pool.fetchrow("SELECT data FROM webhook_events WHERE type = 'webhook_endpoint.disabled'")
    assert disabled is not None and disabled["data"]["endpoint_id"] == endpoint["id"]
    listed = await (await client.get("/v1/webhooks", headers={"Authorization": f"Bearer {secret}"})).json()
    assert listed["data"][0]["status"] == "disabled" and "failing" in listed["data"][0]["disabled_reason"]


async def _state(pool: asyncpg.Pool, state: str) -> bool:
    return bool(await pool.fetchval("SELECT count(*) > 0 FROM webhook_deliveries WHERE state = $1", state))


async def _disabled(pool: asyncpg.Pool, endpoint_id: str) -> bool:
    return bool(await pool.fetchval("SELECT disabled_at IS NOT NULL FROM webhook_endpoints WHERE id = $1",
                                    endpoint_id))


async def test_a_410_disables_the_endpoint_at_once(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    receiver.answers = [410]
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    endpoint = await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "1", "t-5")
    await until(lambda: _disabled(pool, endpoint["id"]), "the endpoint disabled")
    assert await states(pool) == [("cancelled", 1)] and len(receiver.received) == 1
    await top_up(client, account_id, "1", "t-6")  # a disabled endpoint gets nothing more
    await asyncio.sleep(0.2)
    assert len(receiver.received) == 1 and await states(pool) == [("cancelled", 1)]


async def test_a_rotated_secret_and_the_previous_one_both_sign_during_the_grace(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    old = await signing_secret(client, secret)
    resp = await client.post("/v1/webhooks/secret/rotate", headers={"Authorization": f"Bearer {secret}"})
    new = (await resp.json())["secret"]
    assert new != old and new.startswith("whsec_") and await signing_secret(client, secret) == new
    await top_up(client, account_id, "2", "t-7")
    await until(lambda: _delivered(pool), "the delivery")
    got = receiver.received[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    for key in (old, new):
        assert Webhook(key).verify(got.body, got.headers)["type"] == "topup.posted"


async def test_the_outbox_is_the_transaction_a_rolled_back_top_up_leaves_no_event(pool: asyncpg.Pool) -> None:
    account_id, _ = await make_customer(pool)
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await ledger.post(conn, account_id=account_id, kind="topup", amount_micros=5, description="x")
                assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 1
                raise RuntimeError("roll back")
    assert await pool.fetchval("SELECT count(*) FROM webhook_events") == 0
    await ledger.post(pool, account_id=account_id, kind="adjustment", amount_micros=5, description="not a top-up")
    assert await pool.fetchval("SELECT count(*) FROM webhook_events") == 0


@pytest.mark.parametrize(("url", "says"), [
    ("http://example.com/hook", "https"),
    ("https://127.0.0.1/hook", "public address"),
    ("https://10.1.2.3/hook", "public address"),
    ("https://169.254.169.254/latest/meta-data", "public address"),
    ("https://[::1]/hook", "public address"),
    ("ftp://example.com/hook", "http(s)"),
])
async def test_private_and_plain_http_targets_are_refused_when_the_setting_is_off(
        client: TestClient, pool: asyncpg.Pool, url: str, says: str) -> None:
    _, secret = await make_customer(pool)
    resp = await client.post("/v1/webhooks", headers={"Authorization": f"Bearer {secret}"},
                             json={"url": url, "events": ["topup.posted"]})
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "url" and says in body["error"]["message"]


async def test_a_hostname_that_resolves_to_loopback_is_refused_at_connect_time(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    # The setting is off; the endpoint names `localhost` over https, which registration cannot judge by itself.
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(update={
        "webhook_poll_seconds": 0.05, "webhook_retry_schedule_seconds": [0.0]})))
    account_id, secret = await make_customer(pool)
    await register(client, secret, f"https://localhost:{receiver_server.port}/hook", ["topup.posted"])
    await top_up(client, account_id, "1", "t-8")
    await until(lambda: _state(pool, "exhausted"), "the refused attempt")
    error = await pool.fetchval("SELECT error FROM webhook_attempts")
    assert "no public address" in error and receiver.received == []


async def test_admins_list_endpoints_read_attempts_and_replay_an_event(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    endpoint = await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "3", "t-9")
    await until(lambda: _delivered(pool), "the delivery")
    listed = await (await client.get(f"/admin/webhooks?account_id={account_id}", headers=admin_headers())).json()
    assert [e["id"] for e in listed["data"]] == [endpoint["id"]]
    event_id = await pool.fetchval("SELECT id FROM webhook_events")
    resp = await client.post(f"/admin/webhook_events/{event_id}/replay", headers=admin_headers())
    assert resp.status == 202 and (await resp.json())["deliveries"] == 1
    await until(lambda: _count(pool, 2), "the replay")
    assert [json.loads(r.body)["type"] for r in receiver.received] == ["topup.posted"] * 2
    assert {r.headers["webhook-id"] for r in receiver.received} == {event_id}
    attempts = await (await client.get(f"/admin/webhooks/{endpoint['id']}/attempts", headers=admin_headers())).json()
    assert [a["status"] for a in attempts["data"]] == [200, 200]
    assert (await client.post("/admin/webhook_events/msg_nope/replay", headers=admin_headers())).status == 404
    resp = await client.delete(f"/v1/webhooks/{endpoint['id']}", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200 and await pool.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def _count(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = $1 FROM webhook_deliveries WHERE state = 'delivered'", n))


async def _events(pool: asyncpg.Pool, kind: str) -> list[Any]:
    # Events of one transaction share its created_at: within it, thresholds in their order.
    return [r["data"] for r in await pool.fetch(
        "SELECT data FROM webhook_events WHERE type = $1"
        " ORDER BY created_at, (data->>'threshold_percent')::int NULLS FIRST, id", kind)]


async def test_a_key_crossing_80_90_and_100_percent_of_its_limit_fires_each_once_per_window(
        pool: asyncpg.Pool) -> None:
    from billing import keys, limits

    account_id = await make_account(pool, balance_micros=10_000_000)
    key, _ = await keys.create_key(pool, account_id=account_id, name="limited")
    await limits.set_key_limits(pool, key["id"], {"limit_micros": 1_000, "limit_reset": "monthly"})
    async with pool.acquire() as conn:
        await conn.execute("SET meterline.now = '2026-12-07T10:00:00Z'")
        for cost in (500, 310, 100, 50, 40, 0):  # 50%, 81%, 91%, 96%, 100%, and a free call at 100%
            await billed_request(conn, account_id, key_id=key["id"], hold_micros=cost, cost_micros=cost)
        assert [e["threshold_percent"] for e in await _events(pool, "key.limit_threshold")] == [80, 90, 100]
        await conn.execute("SET meterline.now = '2027-01-03T10:00:00Z'")  # a new month, a new window
        await billed_request(conn, account_id, key_id=key["id"], hold_micros=950, cost_micros=950)
    fired = await _events(pool, "key.limit_threshold")
    assert [(e["threshold_percent"], e["window_spent_micros"]) for e in fired] == [
        (80, 810), (90, 910), (100, 1_000), (80, 950), (90, 950)]
    assert {e["key_id"] for e in fired} == {key["id"]}


async def test_balance_low_fires_once_per_crossing_and_again_after_a_top_up_lifts_it(
        client: TestClient, pool: asyncpg.Pool) -> None:
    account_id = await make_account(pool, balance_micros=1_500_000)
    resp = await client.patch(f"/admin/accounts/{account_id}", json={"low_balance_threshold_micros": 1_000_000},
                              headers=admin_headers())
    assert (await resp.json())["low_balance_threshold_micros"] == 1_000_000
    for cost in (400_000, 200_000, 100_000):  # 1.1, then 0.9 (crossed), then 0.8 (still below)
        await billed_request(pool, account_id, hold_micros=cost, cost_micros=cost)
    assert [e["available_micros"] for e in await _events(pool, "balance.low")] == [900_000]
    await ledger.post(pool, account_id=account_id, kind="topup", amount_micros=1_000_000, description="lift")
    await billed_request(pool, account_id, hold_micros=500_000, cost_micros=500_000)  # 1.3: above, nothing
    await billed_request(pool, account_id, hold_micros=400_000, cost_micros=400_000)  # 0.9: crossed again
    assert [e["available_micros"] for e in await _events(pool, "balance.low")] == [900_000, 900_000]
    assert [e["threshold_micros"] for e in await _events(pool, "balance.low")] == [1_000_000, 1_000_000]


async def test_a_429_with_retry_after_waits_as_long_as_it_asks(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    receiver.answers = [429]
    receiver.answer_headers = {"Retry-After": "1"}
    client: TestClient = await aiohttp_client(create_app(hook_settings(
        settings, webhook_retry_schedule_seconds=[0.0, 0.05])))
    account_id, secret = await make_customer(pool)
    await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "1", "t-10")
    await until(lambda: _delivered(pool), "the delivery")
    first, second = [r["attempted_at"] for r in await pool.fetch("SELECT attempted_at FROM webhook_attempts"
                                                                  " ORDER BY id")]
    assert (second - first).total_seconds() >= 1.0  # the schedule alone would have retried after 0.05 s


async def test_an_endpoint_deleted_during_an_attempt_takes_its_delivery_and_nothing_fails(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, receiver: WebhookReceiver,
        receiver_server: TestServer, caplog: pytest.LogCaptureFixture) -> None:
    receiver.hold_first = True
    client: TestClient = await aiohttp_client(create_app(hook_settings(settings)))
    account_id, secret = await make_customer(pool)
    endpoint = await register(client, secret, str(receiver_server.make_url("/hook")), ["topup.posted"])
    await top_up(client, account_id, "1", "t-11")
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    resp = await client.delete(f"/v1/webhooks/{endpoint['id']}", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200
    receiver.release.set()
    await asyncio.sleep(0.3)  # the attempt's answer arrives and is recorded against nothing
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
    assert await pool.fetchval("SELECT count(*) FROM webhook_attempts") == 0
    assert "failed unexpectedly" not in caplog.text
