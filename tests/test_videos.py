"""Video jobs through the gateway: created with a hold (202), followed through the upstream's statuses by client
polls and by the background poller, settled once on completion, voided on failure or past the maximum job time,
even across several gateway processes and after a crash. Real PostgreSQL, a fake media upstream on a real
socket, and the official openai SDK where it has the call."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import accounts
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY, MediaUpstream, media_settings, tiny_png
from tests.serving import meterline_serve

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sora-2"
PER_SECOND = 100_000  # sora-2 at 720x1280 / 1280x720 in config/meterline.toml
TALL_PER_SECOND = 300_000  # 1024x1792
FUNDS = 20_000_000
QUIET = 3600.0  # a poll interval long enough that the background poller never runs during a test


App = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_app(aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
             monkeypatch: pytest.MonkeyPatch) -> App:
    """A gateway process on the test database, talking to the fake; several may run at once."""
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)

    async def make(**overrides: Any) -> TestClient:
        overrides.setdefault("video_poll_seconds", QUIET)
        return await aiohttp_client(create_app(media_settings(settings, server, **overrides)))  # type: ignore[no-any-return]

    return make


@pytest.fixture
async def api(make_app: App) -> TestClient:
    return await make_app()


def auth(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **extra}


async def create(api: TestClient, secret: str, *, prefix: str = "/v1", **body: Any) -> dict[str, Any]:
    resp = await api.post(f"{prefix}/videos", json={"model": MODEL, "prompt": "a capybara", **body},
                          headers=auth(secret))
    assert resp.status == 202, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def retrieve(api: TestClient, secret: str, video_id: str) -> dict[str, Any]:
    resp = await api.get(f"/v1/videos/{video_id}", headers=auth(secret))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    """Wait for a condition the background work brings about (a bound, not a timing assertion)."""
    for _ in range(int(within / 0.02)):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the condition never held")


async def status_is(pool: asyncpg.Pool, video_id: str, status: str) -> bool:
    return bool(await pool.fetchval("SELECT status = $2 FROM videos WHERE id = $1", video_id, status))


async def money(pool: asyncpg.Pool, account_id: str) -> tuple[int, int]:
    row = await accounts.get_account(pool, account_id)
    return row["balance_micros"], row["held_micros"]


async def charges(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'")
    return count


async def test_sdk_create_is_queued_with_a_hold_then_completes_and_is_settled_once(
    sdk: openai.AsyncOpenAI, api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    account_id, secret = customer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks its Sora calls deprecated
        video = await sdk.videos.create(model=MODEL, prompt="a capybara swimming", seconds="8", size="1280x720")
    price = 8 * PER_SECOND
    assert (video.status, video.seconds, video.size, video.model) == ("queued", "8", "1280x720", MODEL)
    assert (video.model_extra or {})["metadata"]["cost_estimate_micros"] == price
    assert await money(pool, account_id) == (FUNDS, price)
    assert await pool.fetchval("SELECT state FROM holds") == "pending"
    # The SDK sends multipart; the upstream got the priced fields and its own key.
    assert fake.bodies[0] == {"model": MODEL, "prompt": "a capybara swimming", "seconds": "8", "size": "1280x720"}
    assert fake.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    polled = await retrieve(api, secret, video.id)
    assert (polled["status"], polled["progress"]) == ("in_progress", 50)
    assert polled["metadata"]["cost_estimate_micros"] == price
    assert await money(pool, account_id) == (FUNDS, price)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        done = await sdk.videos.retrieve(video.id)
        again = await sdk.videos.retrieve(video.id)
        content = await sdk.videos.download_content(video.id)
    assert (done.status, again.status) == ("completed", "completed")
    assert (done.model_extra or {})["metadata"]["cost_micros"] == price
    assert (done.model_extra or {})["metadata"]["cost"] == 0.8
    assert await money(pool, account_id) == (FUNDS - price, 0)
    assert await charges(pool) == 1
    assert fake.calls["get_video"] == 2  # a finished job is not polled again
    assert content.content == fake.content
    row = await pool.fetchrow("SELECT modality, quantity, status, cost_micros, endpoint FROM requests")
    assert tuple(row) == ("video", 8, "completed", price, "/v1/videos")
    assert await verify(pool) == []


async def test_json_create_answers_202_and_content_waits_for_completion(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    video = await create(api, customer[1], prefix="/openai/v1", size="1024x1792", seconds=4)
    assert (video["object"], video["status"], video["seconds"]) == ("video", "queued", "4")
    assert video["metadata"]["cost_estimate_micros"] == 4 * TALL_PER_SECOND
    early = await api.get(f"/openai/v1/videos/{video['id']}/content", headers=auth(customer[1]))
    assert (early.status, (await early.json())["error"]["code"]) == (409, "VIDEO_NOT_READY")
    assert fake.calls["video_content"] == 0


async def test_failing_job_is_voided(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.progression = ["in_progress", "failed"]
    video = await create(api, customer[1], seconds="12")
    assert (await retrieve(api, customer[1], video["id"]))["status"] == "in_progress"
    failed = await retrieve(api, customer[1], video["id"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "generation_failed", "message": "the fake refused"}
    assert failed["metadata"]["cost_micros"] == 0
    assert await money(pool, customer[0]) == (FUNDS, 0)
    assert await pool.fetchval("SELECT state FROM holds") == "voided"
    assert await charges(pool) == 0
    assert await verify(pool) == []


async def test_a_job_the_upstream_finished_at_once_is_settled_at_once(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.created_status = "completed"
    video = await create(api, customer[1], size="1024x1792", seconds=4)
    assert (video["status"], video["metadata"]["cost_micros"]) == ("completed", 4 * TALL_PER_SECOND)
    assert await money(pool, customer[0]) == (FUNDS - 4 * TALL_PER_SECOND, 0)
    assert await pool.fetchval("SELECT state FROM holds") == "settled"
    assert tuple(await pool.fetchrow("SELECT status, quantity, cost_micros FROM requests")) == (
        "completed", 4, 4 * TALL_PER_SECOND)
    assert fake.calls["get_video"] == 0  # nothing was left to poll
    assert await verify(pool) == []


async def test_an_unknown_creation_field_is_refused_unforwarded(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    resp = await api.post("/v1/videos", json={"model": MODEL, "prompt": "x", "quality": "max"},
                          headers=auth(customer[1]))
    assert (resp.status, (await resp.json())["error"]["param"]) == (400, "quality")
    assert fake.calls["create_video"] == 0 and await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_upstream_refusing_the_job_voids_the_hold(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.status = 500
    resp = await api.post("/v1/videos", json={"model": MODEL, "prompt": "x"}, headers=auth(customer[1]))
    assert (resp.status, (await resp.json())["error"]["code"]) == (502, "UPSTREAM_ERROR")
    assert await money(pool, customer[0]) == (FUNDS, 0)
    assert await pool.fetchval("SELECT status FROM videos") == "failed"
    assert await pool.fetchval("SELECT state FROM holds") == "voided"
    assert await verify(pool) == []


async def test_job_nobody_polls_is_settled_by_the_background_poller(
    make_app: App, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    api = await make_app(video_poll_seconds=0.02)
    video = await create(api, customer[1], seconds="4")
    await eventually(lambda: status_is(pool, video["id"], "completed"))
    assert await money(pool, customer[0]) == (FUNDS - 4 * PER_SECOND, 0)
    assert await charges(pool) == 1
    assert await verify(pool) == []


async def test_two_gateway_processes_polling_one_job_settle_it_once(
    make_app: App, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.progression = ["queued", "in_progress", "in_progress", "completed"]
    first = await make_app(video_poll_seconds=0.01)
    await make_app(video_poll_seconds=0.01)
    video = await create(first, customer[1], seconds="8")
    await eventually(lambda: status_is(pool, video["id"], "completed"))
    [upstream_id] = fake.videos
    # Each poll ran under one lease: exactly the four polls the progression needs, none after completion.
    assert fake.polls[upstream_id] == 4
    assert await charges(pool) == 1
    assert await money(pool, customer[0]) == (FUNDS - 8 * PER_SECOND, 0)
    assert await pool.fetchval("SELECT count(*) FROM requests") == 1
    assert await verify(pool) == []


async def test_a_job_left_by_a_crashed_process_is_picked_up_after_restart(
    make_app: App, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    crashed = await make_app()
    video = await create(crashed, customer[1], seconds="4")
    # The crashed process died while polling the (due) job under a lease, which has since run out.
    await pool.execute("UPDATE videos SET next_poll_at = now(), lease_owner = 'dead-process',"
                       " lease_until = now() - interval '1 second'")
    await crashed.close()
    await make_app(video_poll_seconds=0.02)
    await eventually(lambda: status_is(pool, video["id"], "completed"))
    assert await money(pool, customer[0]) == (FUNDS - 4 * PER_SECOND, 0)
    assert await charges(pool) == 1
    assert await verify(pool) == []


async def test_a_job_whose_creator_died_before_the_upstream_answered_is_voided(
    make_app: App, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    api = await make_app()
    video = await create(api, customer[1], seconds="4")
    await pool.execute("UPDATE videos SET upstream_id = NULL, lease_owner = 'dead', lease_until = now()")
    failed = await retrieve(api, customer[1], video["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "creation_failed")
    assert await money(pool, customer[0]) == (FUNDS, 0)
    assert await verify(pool) == []


async def test_a_job_past_its_maximum_time_is_voided(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.progression = ["in_progress"]
    video = await create(api, customer[1], seconds="4")
    await pool.execute("UPDATE videos SET deadline_at = now() - interval '1 second'")
    failed = await retrieve(api, customer[1], video["id"])
    assert (failed["status"], failed["error"]["code"]) == ("failed", "timeout")
    assert await money(pool, customer[0]) == (FUNDS, 0)
    assert await pool.fetchval("SELECT state FROM holds") == "voided"
    assert await verify(pool) == []


async def test_idempotency_key_replay_is_one_job_and_one_hold(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    body = {"model": MODEL, "prompt": "once", "seconds": "8"}
    headers = auth(customer[1], **{"Idempotency-Key": "vid-1"})
    first = await api.post("/v1/videos", json=body, headers=headers)
    again = await api.post("/v1/videos", json=body, headers=headers)
    assert (first.status, again.status) == (202, 202)
    assert (await again.json())["id"] == (await first.json())["id"]
    assert fake.calls["create_video"] == 1
    assert await pool.fetchval("SELECT count(*) FROM holds") == 1
    assert await pool.fetchval("SELECT count(*) FROM videos") == 1
    assert await money(pool, customer[0]) == (FUNDS, 8 * PER_SECOND)
    other = await api.post("/v1/videos", json={**body, "seconds": "4"}, headers=headers)
    assert (other.status, (await other.json())["error"]["code"]) == (422, "IDEMPOTENCY_CONFLICT")
    assert fake.calls["create_video"] == 1


async def test_concurrent_replays_make_one_job(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    body = {"model": MODEL, "prompt": "race", "seconds": "4"}
    headers = auth(customer[1], **{"Idempotency-Key": "vid-race"})
    responses = await asyncio.gather(*(api.post("/v1/videos", json=body, headers=headers) for _ in range(5)))
    ids = {(await r.json())["id"] for r in responses}
    assert [r.status for r in responses] == [202] * 5
    assert len(ids) == 1
    assert fake.calls["create_video"] == 1
    assert await pool.fetchval("SELECT count(*) FROM holds") == 1


async def test_dry_run_equals_the_real_hold(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    body = {"model": MODEL, "prompt": "x", "seconds": "12", "size": "1792x1024"}
    dry = await api.post("/v1/videos?dryRun=true", json=body, headers=auth(customer[1]))
    estimate = await dry.json()
    assert estimate == {
        "estimated": True, "model": MODEL, "provider": "media", "total_cost_micros": 12 * TALL_PER_SECOND,
        "currency": "USD",
        "components": [{"type": "output", "metric": "second", "quantity": 12, "billable_quantity": 12,
                        "unit_price_micros": TALL_PER_SECOND, "total_cost_micros": 12 * TALL_PER_SECOND}],
        "available_micros": FUNDS, "sufficient_balance": True,
    }
    assert fake.calls["create_video"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
    await create(api, customer[1], **{k: v for k, v in body.items() if k != "model"})
    assert await pool.fetchval("SELECT amount_micros FROM holds") == estimate["total_cost_micros"]


@pytest.mark.parametrize(
    ("body", "param", "allowed"),
    [({"size": "640x480"}, "size", "720x1280, 1280x720, 1024x1792, 1792x1024"),
     ({"seconds": "5"}, "seconds", "4, 8, 12"),
     ({"prompt": None}, "prompt", None)],
    ids=["unknown-size", "unknown-seconds", "missing-prompt"],
)
async def test_unpriced_or_incomplete_creation_is_400(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream,
    body: dict[str, Any], param: str, allowed: str | None,
) -> None:
    resp = await api.post("/v1/videos", json={"model": MODEL, "prompt": "x", **body}, headers=auth(customer[1]))
    error = (await resp.json())["error"]
    assert (resp.status, error["param"]) == (400, param)
    if allowed is not None:
        assert f"allowed values: {allowed}" in error["message"]
    assert fake.calls["create_video"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_input_reference_is_streamed_through_and_oversize_is_413(
    make_app: App, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    api = await make_app(max_upload_bytes=4096)
    reference = tiny_png()
    form = aiohttp.FormData()
    form.add_field("model", MODEL)
    form.add_field("prompt", "animate this")
    form.add_field("input_reference", reference, filename="ref.png", content_type="image/png")
    resp = await api.post("/v1/videos", data=form, headers=auth(customer[1]))
    assert resp.status == 202
    [parts] = fake.parts
    assert [(p.name, p.filename, p.data) for p in parts if p.filename] == [("input_reference", "ref.png", reference)]

    big = aiohttp.FormData()
    big.add_field("model", MODEL)
    big.add_field("prompt", "too big")
    big.add_field("input_reference", bytes(8192), filename="ref.png", content_type="image/png")
    too_big = await api.post("/v1/videos", data=big, headers=auth(customer[1]))
    assert (too_big.status, (await too_big.json())["error"]["code"]) == (413, "REQUEST_TOO_LARGE")
    assert fake.calls["create_video"] == 1
    assert await pool.fetchval("SELECT count(*) FROM holds") == 1


async def test_another_accounts_video_is_404(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    video = await create(api, customer[1])
    _, stranger = await make_customer(pool, balance_micros=FUNDS)
    for path in (f"/v1/videos/{video['id']}", f"/v1/videos/{video['id']}/content"):
        resp = await api.get(path, headers=auth(stranger))
        assert (resp.status, (await resp.json())["error"]["code"]) == (404, "NOT_FOUND")
    assert fake.calls["get_video"] == 0


# Real gateway processes: `meterline serve` subprocesses on the test database, talking to the fake upstream.


def serve(database_url: str, server: TestServer, *, poll_seconds: float
          ) -> contextlib.AbstractAsyncContextManager[tuple[str, asyncio.subprocess.Process]]:
    """`meterline serve` on the test database, polling the fake media upstream every `poll_seconds`."""
    return meterline_serve({
        "METERLINE_DATABASE_URL": database_url, "METERLINE_VIDEO_POLL_SECONDS": str(poll_seconds),
        "METERLINE_UPSTREAMS__MEDIA__BASE_URL": str(server.make_url("/v1")),
        "METERLINE_UPSTREAMS__MEDIA__API_KEY_ENV": "MEDIA_API_KEY", "MEDIA_API_KEY": UPSTREAM_KEY,
    })


@pytest.mark.timeout(120)
async def test_two_serve_processes_poll_one_job_and_settle_it_once(
    database_url: str, server: TestServer, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream,
) -> None:
    fake.progression = ["queued", "in_progress", "in_progress", "in_progress", "completed"]
    async with serve(database_url, server, poll_seconds=0.02) as (first, _), \
            serve(database_url, server, poll_seconds=0.02):
        client = openai.AsyncOpenAI(base_url=f"{first}/v1", api_key=customer[1], max_retries=0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                video = await client.videos.create(model=MODEL, prompt="two processes", seconds="12")
        finally:
            await client.close()
        await eventually(lambda: status_is(pool, video.id, "completed"))
    [upstream_id] = fake.videos
    assert fake.polls[upstream_id] == 5
    assert await charges(pool) == 1
    assert await money(pool, customer[0]) == (FUNDS - 12 * PER_SECOND, 0)
    assert await verify(pool) == []


@pytest.mark.timeout(120)
async def test_a_killed_process_loses_nothing_the_next_one_settles_its_job(
    database_url: str, server: TestServer, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream,
) -> None:
    async with serve(database_url, server, poll_seconds=QUIET) as (first, proc):
        async with aiohttp.ClientSession() as session:
            resp = await session.post(f"{first}/v1/videos", headers=auth(customer[1]),
                                      json={"model": MODEL, "prompt": "survive", "seconds": "8"})
            assert resp.status == 202
            video_id = (await resp.json())["id"]
        proc.kill()  # SIGKILL: no cleanup, no goodbye
        await proc.wait()
    # The first process polled with a long interval: make the job due, as it would be by the time a poller looks.
    await pool.execute("UPDATE videos SET next_poll_at = now()")
    assert await money(pool, customer[0]) == (FUNDS, 8 * PER_SECOND)
    async with serve(database_url, server, poll_seconds=0.02):
        await eventually(lambda: status_is(pool, video_id, "completed"))
    assert await charges(pool) == 1
    assert await money(pool, customer[0]) == (FUNDS - 8 * PER_SECOND, 0)
    assert await verify(pool) == []


@pytest.mark.parametrize(("video_id", "status", "code"), [
    ("video_%00", 400, "INVALID_REQUEST"), ("x" * 500, 404, "NOT_FOUND"), ("video_does_not_exist", 404, "NOT_FOUND"),
], ids=["nul", "long", "unknown"])
async def test_odd_video_ids_are_refused(
    api: TestClient, customer: tuple[str, str], video_id: str, status: int, code: str
) -> None:
    resp = await api.get(f"/v1/videos/{video_id}", headers=auth(customer[1]))
    assert (resp.status, (await resp.json())["error"]["code"]) == (status, code)


async def test_models_list_media_prices_in_integer_micros(api: TestClient, customer: tuple[str, str]) -> None:
    video = await (await api.get("/v1/models/sora-2", headers=auth(customer[1]))).json()
    image = await (await api.get("/openai/v1/models/gemini-3-pro-image", headers=auth(customer[1]))).json()
    assert (video["modality"], video["pricing"]["per_second_micros"]) == ("video", PER_SECOND)
    assert video["pricing"]["prices"] == {"1024x1792": TALL_PER_SECOND, "1792x1024": TALL_PER_SECOND}
    assert video["pricing"]["seconds"] == [4, 8, 12]
    assert (image["modality"], image["pricing"]["per_image_micros"]) == ("image", 134_000)
    assert image["pricing"]["prices"] == {"2048x2048/hd": 180_000, "4096x4096": 240_000}
