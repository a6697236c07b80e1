"""Video webhooks (issue 13): a finished job sends `video.completed`, `video.failed` or `video.cancelled` once, to
the account's subscribed endpoints and to the job's own `webhook_url`, with the video object as `GET videos/{id}`
shows it, signed so that `standardwebhooks` verifies it."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from standardwebhooks import Webhook

from gateway.app import create_app
from gateway.settings import Settings
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY, MediaUpstream, media_settings
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.test_webhooks import register, signing_secret, until

PUBLIC = "https://gateway.example"


@pytest.fixture
def receiver() -> WebhookReceiver:
    return WebhookReceiver()


@pytest.fixture
async def receiver_server(aiohttp_server: Any, receiver: WebhookReceiver) -> TestServer:
    server: TestServer = await aiohttp_server(receiver.app())
    return server


@pytest.fixture
async def api(aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
              monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    client: TestClient = await aiohttp_client(create_app(media_settings(
        settings, server, video_poll_seconds=3600, webhook_allow_private_targets=True, webhook_poll_seconds=0.05,
        webhook_retry_schedule_seconds=[0.0], public_url=PUBLIC)))
    return client


async def _finish(api: TestClient, secret: str, **fields: Any) -> dict[str, Any]:
    """Create a video, then read it until it is finished (each read polls the fake once)."""
    headers = {"Authorization": f"Bearer {secret}"}
    resp = await api.post("/v1/videos", headers=headers, json={"model": "sora-2", "prompt": "a capybara",
                                                               "seconds": "4", **fields})
    assert resp.status == 202, await resp.text()
    video = await resp.json()
    for _ in range(5):
        video = await (await api.get(f"/v1/videos/{video['id']}", headers=headers)).json()
        if video["status"] in ("completed", "failed"):
            return dict(video)
    raise AssertionError(f"never finished: {video}")


async def _received(pool: asyncpg.Pool, n: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) = $1 FROM webhook_deliveries WHERE state = 'delivered'", n))


@pytest.mark.parametrize(("progression", "event_type"), [
    (["in_progress", "completed"], "video.completed"),
    (["in_progress", "failed"], "video.failed"),
    (["cancelled"], "video.cancelled"),
])
async def test_a_finished_video_is_sent_once_as_the_video_object_signed(
        api: TestClient, pool: asyncpg.Pool, fake: MediaUpstream, receiver: WebhookReceiver,
        receiver_server: TestServer, progression: list[str], event_type: str) -> None:
    fake.progression = progression
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    await register(api, secret, str(receiver_server.make_url("/hook")), [event_type])
    video = await _finish(api, secret)
    await until(lambda: _received(pool, 1), "the delivery")
    # More reads of the finished job send nothing more.
    await api.get(f"/v1/videos/{video['id']}", headers={"Authorization": f"Bearer {secret}"})
    assert len(receiver.received) == 1
    got = receiver.received[0]
    event = Webhook(await signing_secret(api, secret)).verify(got.body, got.headers)
    assert event["type"] == event_type
    data = event["data"]
    output = data.pop("output", None)
    shown = {k: v for k, v in video.items() if k != "output"}
    assert data == shown
    if event_type == "video.completed":
        assert output == {"url": f"{PUBLIC}/v1/videos/{video['id']}/content", "content_type": "video/mp4"}
        assert data["metadata"]["cost_micros"] == video["metadata"]["cost_micros"] > 0
    else:
        assert output is None and data["metadata"]["cost_micros"] == 0


async def test_a_jobs_own_webhook_url_gets_its_event_without_any_endpoint(
        api: TestClient, pool: asyncpg.Pool, fake: MediaUpstream, receiver: WebhookReceiver,
        receiver_server: TestServer) -> None:
    fake.progression = ["completed"]
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    video = await _finish(api, secret, webhook_url=str(receiver_server.make_url("/hook")))
    await until(lambda: _received(pool, 1), "the delivery")
    event = Webhook(await signing_secret(api, secret)).verify(receiver.received[0].body, receiver.received[0].headers)
    assert (event["type"], event["data"]["id"]) == ("video.completed", video["id"])


async def test_a_private_webhook_url_is_refused_when_the_setting_is_off(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    client: TestClient = await aiohttp_client(create_app(media_settings(settings, server)))
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    resp = await client.post("/v1/videos", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": "sora-2", "prompt": "x", "webhook_url": "https://10.0.0.7/hook"})
    body = await resp.json()
    assert (resp.status, body["error"]["param"]) == (400, "webhook_url")
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
