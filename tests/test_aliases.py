"""Model aliases: a configured id (`nova_1_1` in config/meterline.toml) naming an upstream model, forwarded under
the upstream's id, answered under the alias (non-streaming and in every stream chunk), billed at the alias's own
prices to the micro, and listed in GET models under its own id. Image and video models can be aliases too."""

from __future__ import annotations

import json
import warnings
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import pricing
from billing.catalog_config import ImageModelConfig, TextModelConfig, VideoModelConfig
from gateway.app import create_app
from gateway.models_api import FIRST_LOAD
from gateway.settings import Settings
from tests.chat_support import MESSAGES, MODEL, account_row, cost, held_prompt, point_at, request_record, settled
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY as MEDIA_KEY
from tests.fakes.media_upstream import MediaUpstream, media_settings, tiny_png
from tests.fakes.upstream import CONTENT_PIECE, FakeUpstream, openrouter_model

FUNDS = 10_000_000
ALIAS = "nova_1_1"
# The alias's own prices in config/meterline.toml (its upstream, MODEL, is priced 500,000 / 3,000,000 / 50,000).
ALIAS_PRICES = pricing.TokenPrices(Fraction(800_000), Fraction(4_000_000), Fraction(80_000))
DATED = f"{MODEL}-20251217"  # an upstream answering with a dated version of the id it was asked for


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_an_alias_is_forwarded_as_its_upstream_and_answered_billed_and_recorded_as_itself(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any
) -> None:
    openrouter.prompt_tokens, openrouter.completion_tokens, openrouter.cached_tokens = 1_234, 567, 200
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    raw = await sdk_factory(secret).chat.completions.with_raw_response.create(
        model=ALIAS, messages=MESSAGES, max_tokens=1_000)
    completion = raw.parse()
    charge = cost(1_234, 567, cached=200, prices=ALIAS_PRICES)
    assert charge == 3_111  # 1,034 uncached x 0.8 + 200 cached x 0.08 + 567 x 4 micros = 3,111.2
    assert [body["model"] for body in openrouter.bodies] == [MODEL]
    assert completion.model == ALIAS
    assert completion.choices[0].message.content == CONTENT_PIECE * 5
    assert completion.usage is not None
    assert completion.usage.model_extra == {"cost": charge / 1_000_000, "cost_micros": charge}
    assert tuple(await account_row(pool, account_id)) == (FUNDS - charge, 0)
    record = await request_record(pool, raw.headers["X-Request-Id"])
    assert (record["model"], record["upstream"], record["cost_micros"], record["hold_micros"]) == (
        ALIAS, "openrouter", charge, cost(held_prompt(MESSAGES), 1_000, prices=ALIAS_PRICES))


@pytest.mark.parametrize("compact", [True, False], ids=["compact-json", "spaced-json"])
@pytest.mark.parametrize("include_usage", [True, False], ids=["usage-chunk", "no-usage-chunk"])
async def test_every_chunk_of_an_aliased_stream_names_the_alias(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any, compact: bool,
    include_usage: bool
) -> None:
    openrouter.compact = compact
    openrouter.prompt_tokens, openrouter.completion_tokens = 2_000, 321
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    stream = await sdk_factory(secret).chat.completions.create(
        model=ALIAS, messages=MESSAGES, max_tokens=500, stream=True,
        stream_options={"include_usage": True} if include_usage else None)
    chunks = [chunk async for chunk in stream]
    assert [chunk.model for chunk in chunks] == [ALIAS] * (6 if include_usage else 5)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CONTENT_PIECE * 5
    assert openrouter.bodies[0]["model"] == MODEL
    charge = cost(2_000, 321, prices=ALIAS_PRICES)
    assert charge == 2_884  # 2,000 x 0.8 + 321 x 4
    if include_usage:
        assert chunks[-1].usage is not None and chunks[-1].usage.model_extra == {
            "cost": charge / 1_000_000, "cost_micros": charge}
    [hold] = await settled(pool, account_id)
    assert hold["actual_micros"] == charge
    assert tuple(await account_row(pool, account_id)) == (FUNDS - charge, 0)
    assert (await request_record(pool, hold["request_id"]))["model"] == ALIAS


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_an_upstream_naming_a_dated_version_of_its_model_still_shows_the_alias(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, stream: bool
) -> None:
    openrouter.answer_model, openrouter.compact = DATED, True
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json={
        "model": ALIAS, "messages": MESSAGES, "max_tokens": 50, "stream": stream,
        "stream_options": {"include_usage": True} if stream else None})
    assert resp.status == 200
    text = await resp.text()
    assert MODEL not in text  # neither the id forwarded nor the upstream's version of it
    if stream:
        events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
        assert [event["model"] for event in events] == [ALIAS] * 6
    else:
        assert json.loads(text)["model"] == ALIAS


async def test_a_model_that_is_not_an_alias_is_answered_as_the_upstream_says(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.answer_model = DATED
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    for stream in (False, True):
        resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json={
            "model": MODEL, "messages": MESSAGES, "max_tokens": 50, "stream": stream})
        assert resp.status == 200
        text = await resp.text()
        if stream:  # the chunks pass as they came, but for the last, which gains the context fields
            events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
            assert [event["model"] for event in events] == [DATED] * 5
            assert text.count(f'"model": "{DATED}"') == 4
        else:
            assert json.loads(text)["model"] == DATED
    assert [body["model"] for body in openrouter.bodies] == [MODEL, MODEL]


async def test_models_list_the_alias_under_its_own_id_with_its_own_prices(
    chat_client: TestClient, pool: asyncpg.Pool
) -> None:
    _, secret = await make_customer(pool)
    listed = {m["id"]: m for m in (await (await chat_client.get("/v1/models", headers=auth(secret))).json())["data"]}
    alias = {"id": ALIAS, "object": "model", "created": 0, "owned_by": "meterline", "name": "Nova 1.1",
             "modality": "text", "pricing": {"input_per_mtok_micros": 800_000, "output_per_mtok_micros": 4_000_000,
                                             "cached_input_per_mtok_micros": 80_000},
             "context_length": 1_048_576, "max_output_tokens": 65_536, "upstream_model": MODEL}
    assert listed[ALIAS] == alias
    assert (await (await chat_client.get(f"/v1/models/{ALIAS}", headers=auth(secret))).json()) == alias
    # The upstream's model is listed as well, under its own id and prices, and is no alias.
    assert listed[MODEL]["pricing"]["input_per_mtok_micros"] == 500_000
    assert "upstream_model" not in listed[MODEL]


async def test_an_alias_of_a_remote_model_is_billed_at_its_own_prices_not_the_remote_ones(
    aiohttp_client: Any, chat_settings: Settings, openrouter_server: TestServer, openrouter: FakeUpstream,
    pool: asyncpg.Pool
) -> None:
    """The upstream's catalog prices `acme/tiny` too; the alias of it is priced at its own local prices, and the
    remote model keeps its remote price under its own id."""
    openrouter.models = [openrouter_model("acme/tiny", prompt="0.000001", completion="0.000002")]
    openrouter.prompt_tokens, openrouter.completion_tokens = 1_000, 100
    alias = TextModelConfig(upstream_model="acme/tiny", input_per_mtok_micros=7_000_000,
                            output_per_mtok_micros=9_000_000, context_length=32_000, max_output_tokens=2_000)
    client: TestClient = await aiohttp_client(create_app(point_at(
        chat_settings, openrouter_server, remote_catalog=True, markup=Decimal("0.1"),
        models={**chat_settings.models, "house/tiny": alias})))
    await client.server.app[FIRST_LOAD].wait()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    charges = []
    for model in ("house/tiny", "acme/tiny"):
        resp = await client.post("/v1/chat/completions", headers=auth(secret),
                                 json={"model": model, "messages": MESSAGES, "max_tokens": 10})
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        assert answer["model"] == model
        charges.append(answer["usage"]["cost_micros"])
    # 1,000 x 7 + 100 x 9 for the alias; 1,000 x 1.1 + 100 x 2.2 for the remote model (USD/token x 1.1 markup).
    assert charges == [7_900, 1_320]
    assert [body["model"] for body in openrouter.bodies] == ["acme/tiny", "acme/tiny"]
    assert (await account_row(pool, account_id))["balance"] == FUNDS - 7_900 - 1_320


# Media aliases of the shipped media models, at prices of their own.
MEDIA_ALIASES = {
    "pixel-1": ImageModelConfig(modality="image", upstream="media", upstream_model="gemini-3-pro-image",
                                per_image_micros=90_000, sizes=["1024x1024"]),
    "clip-1": VideoModelConfig(modality="video", upstream="media", upstream_model="sora-2", per_second_micros=50_000,
                               sizes=["1280x720"], seconds=[4, 8]),
}


@pytest.fixture
async def media_api(aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
                    monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("MEDIA_API_KEY", MEDIA_KEY)
    client: TestClient = await aiohttp_client(create_app(media_settings(
        settings, server, models={**settings.models, **MEDIA_ALIASES}, video_poll_seconds=3600.0)))
    return client


async def test_an_aliased_image_model_is_forwarded_as_its_upstream_and_answered_and_billed_as_itself(
    media_api: TestClient, pool: asyncpg.Pool, fake: MediaUpstream
) -> None:
    fake.echo_model = True
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    sdk = openai.AsyncOpenAI(base_url=str(media_api.make_url("/v1")), api_key=secret, max_retries=0)
    try:
        generated = await sdk.images.generate(model="pixel-1", prompt="a lighthouse", n=2)
        edited = await sdk.images.edit(model="pixel-1", prompt="make it snow",
                                       image=("lighthouse.png", tiny_png(), "image/png"))
    finally:
        await sdk.close()
    # Generations send JSON, edits multipart: both reach the upstream under its own id.
    assert [body["model"] for body in fake.bodies] == ["gemini-3-pro-image", "gemini-3-pro-image"]
    assert (generated.to_dict()["model"], edited.to_dict()["model"]) == ("pixel-1", "pixel-1")
    costs = [(answer.model_extra or {})["metadata"]["cost_micros"] for answer in (generated, edited)]
    assert costs == [2 * 90_000, 90_000]
    assert tuple(await account_row(pool, account_id)) == (FUNDS - 3 * 90_000, 0)
    rows = await pool.fetch("SELECT model, upstream, cost_micros FROM requests ORDER BY cost_micros DESC")
    assert [tuple(row) for row in rows] == [("pixel-1", "media", 180_000), ("pixel-1", "media", 90_000)]


async def test_an_aliased_video_model_is_started_as_its_upstream_and_answered_and_billed_as_itself(
    media_api: TestClient, pool: asyncpg.Pool, fake: MediaUpstream
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    sdk = openai.AsyncOpenAI(base_url=str(media_api.make_url("/v1")), api_key=secret, max_retries=0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks its Sora calls deprecated
            multipart = await sdk.videos.create(model="clip-1", prompt="a capybara", seconds="8", size="1280x720",
                                                input_reference=("ref.png", tiny_png(), "image/png"))
    finally:
        await sdk.close()
    resp = await media_api.post("/v1/videos", headers=auth(secret),
                                json={"model": "clip-1", "prompt": "a capybara", "seconds": "4"})
    assert resp.status == 202
    plain = await resp.json()
    assert [body["model"] for body in fake.bodies] == ["sora-2", "sora-2"]
    assert (multipart.model, plain["model"]) == ("clip-1", "clip-1")
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 8 * 50_000 + 4 * 50_000)
    for _ in range(2):  # in_progress, then completed: settled at the alias's price
        polled = await (await media_api.get(f"/v1/videos/{plain['id']}", headers=auth(secret))).json()
    assert (polled["status"], polled["model"], polled["metadata"]["cost_micros"]) == ("completed", "clip-1", 200_000)
    assert tuple(await account_row(pool, account_id)) == (FUNDS - 200_000, 8 * 50_000)
    record = await pool.fetchrow("SELECT model, upstream, cost_micros FROM requests")
    assert tuple(record) == ("clip-1", "media", 200_000)
