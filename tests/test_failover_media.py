"""Provider failover for images and videos (issue 15): two fake media upstreams on loopback. An image is served by
the second provider when the first fails, at the model's price; a video job the second provider accepted is polled,
fetched and settled there, and its object says who made it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import TypeAdapter

from billing.catalog_config import ModelConfig
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY, MediaUpstream

FUNDS = 20_000_000
IMAGE, VIDEO = "routed-image", "routed-video"
PER_IMAGE, PER_SECOND = 134_000, 100_000
COSTS = {"first": (90_000, 60_000), "second": (70_000, 40_000)}  # per image, per second


def _models() -> dict[str, Any]:
    adapter = TypeAdapter(ModelConfig)

    def providers(unit: str) -> list[dict[str, Any]]:
        index = 0 if unit == "per_image_cost_micros" else 1
        return [{"upstream": name, "model": f"{name}-model", "priority": priority, unit: COSTS[name][index]}
                for priority, name in enumerate(("first", "second"), start=1)]

    return {
        IMAGE: adapter.validate_python({"modality": "image", "per_image_micros": PER_IMAGE, "sizes": ["1024x1024"],
                                        "providers": providers("per_image_cost_micros")}),
        VIDEO: adapter.validate_python({"modality": "video", "per_second_micros": PER_SECOND, "sizes": ["720x1280"],
                                        "seconds": [4, 8], "providers": providers("per_second_cost_micros")}),
    }


@pytest.fixture
def first() -> MediaUpstream:
    return MediaUpstream()


@pytest.fixture
def second() -> MediaUpstream:
    return MediaUpstream()


@pytest.fixture
async def api(aiohttp_client: Any, aiohttp_server: Any, settings: Settings, pool: asyncpg.Pool,
              first: MediaUpstream, second: MediaUpstream, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    upstreams = dict(settings.upstreams)
    for name, fake in (("first", first), ("second", second)):
        server: TestServer = await aiohttp_server(fake.app())
        upstreams[name] = UpstreamSettings(base_url=str(server.make_url("/v1")), api_key_env="MEDIA_API_KEY",
                                           timeout_seconds=30)
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(update={
        "upstreams": upstreams, "models": {**settings.models, **_models()}, "video_poll_seconds": 3600.0})))
    return client


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_an_image_the_first_provider_fails_is_made_by_the_second_at_the_models_price(
        api: TestClient, pool: asyncpg.Pool, first: MediaUpstream, second: MediaUpstream) -> None:
    first.status = 503
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/images/generations", json={"model": IMAGE, "prompt": "a fox", "n": 2},
                          headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert (resp.headers["X-Meterline-Provider"], resp.headers["X-Meterline-Model"]) == ("second", "second-model")
    answer = await resp.json()
    assert len(answer["data"]) == 2 and answer["metadata"]["cost_micros"] == 2 * PER_IMAGE
    assert second.bodies[0]["model"] == "second-model" and first.calls["generations"] == 1
    record = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", resp.headers["X-Request-Id"])
    assert (record["provider"], record["cost_micros"], record["upstream_cost_micros"]) == (
        "second", 2 * PER_IMAGE, 2 * COSTS["second"][0])
    assert [(a["provider"], a["upstream_status"]) for a in record["attempts"]] == [("first", 503), ("second", 200)]
    assert await verify(pool) == []


async def test_images_every_provider_refuses_are_all_providers_exhausted_and_free(
        api: TestClient, pool: asyncpg.Pool, first: MediaUpstream, second: MediaUpstream) -> None:
    first.status = second.status = 500
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/images/generations", json={"model": IMAGE, "prompt": "a fox"}, headers=auth(secret))
    assert (resp.status, (await resp.json())["error"]["code"]) == (502, "ALL_PROVIDERS_EXHAUSTED")
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'") == 0
    assert await pool.fetchval("SELECT state FROM holds") == "voided"


async def test_a_video_job_the_second_provider_accepted_is_polled_fetched_and_settled_there(
        api: TestClient, pool: asyncpg.Pool, first: MediaUpstream, second: MediaUpstream) -> None:
    first.status = 500
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/videos", json={"model": VIDEO, "prompt": "a capybara", "seconds": "8"},
                          headers=auth(secret))
    assert resp.status == 202, await resp.text()
    video = await resp.json()
    assert resp.headers["X-Meterline-Provider"] == "second"
    assert (video["metadata"]["provider"], video["metadata"]["executed_model"]) == ("second", "second-model")
    upstream_id = video["metadata"]["upstream_id"]
    assert upstream_id in second.videos and first.calls["create_video"] == 1
    for _ in range(10):  # each GET polls the job's provider; the fake completes on its second poll
        video = await (await api.get(f"/v1/videos/{video['id']}", headers=auth(secret))).json()
        if video["status"] == "completed":
            break
        await asyncio.sleep(0)
    assert video["status"] == "completed" and video["metadata"]["cost_micros"] == 8 * PER_SECOND
    assert second.calls["get_video"] == 2 and first.calls["get_video"] == 0
    content = await api.get(f"/v1/videos/{video['id']}/content", headers=auth(secret))
    assert content.status == 200 and await content.read() == second.content
    assert (content.headers["X-Meterline-Provider"], content.headers["X-Meterline-Model"]) == (
        "second", "second-model")
    assert (first.calls["video_content"], second.calls["video_content"]) == (0, 1)
    record = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", resp.headers["X-Request-Id"])
    assert (record["billing_status"], record["provider"], record["provider_model"], record["generation_id"]) == (
        "settled", "second", "second-model", upstream_id)
    assert (record["cost_micros"], record["upstream_cost_micros"]) == (8 * PER_SECOND, 8 * COSTS["second"][1])
    assert [(a["provider"], a["upstream_status"]) for a in record["attempts"]] == [("first", 500), ("second", 200)]
    assert await verify(pool) == []
