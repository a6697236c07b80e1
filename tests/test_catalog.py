"""The model catalog: local and upstream entries, exact remote prices with markup, the optional `openrouter/`
prefix, keeping the last good catalog when a refresh fails, and GET models / models/{id}."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from billing.catalog import Catalog, CatalogError
from billing.catalog_config import ImageModelConfig, TextModelConfig
from gateway.app import create_app
from gateway.keys import CATALOG
from gateway.models_api import FIRST_LOAD, refresh_catalog
from gateway.settings import Settings
from tests.chat_support import MESSAGES, cost, point_at
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream, openrouter_model

LOCAL = {
    "google/gemini-3-flash-preview": TextModelConfig(
        input_per_mtok_micros=500_000, output_per_mtok_micros=3_000_000, context_length=1_048_576,
        max_output_tokens=65_536),
    "pixel-1": ImageModelConfig(modality="image", per_image_micros=40_000, sizes=["1024x1024"]),
}
REMOTE = [
    openrouter_model("acme/tiny", prompt="0.0000001234567", completion="0.000000987654321",
                     cache_read="0.00000001"),
    openrouter_model("google/gemini-3-flash-preview", prompt="0.001", completion="0.001"),  # local wins
    openrouter_model("openrouter/auto", prompt="-1", completion="-1"),  # "varies": not priced
    openrouter_model("acme/free", prompt="0", completion="0", max_completion_tokens=None, context_length=4_096),
    {"id": "broken", "pricing": {"prompt": "x"}},
]


def catalog(markup: str = "0") -> Catalog:
    return Catalog(LOCAL, text_upstream="openrouter", markup=Decimal(markup))


def test_remote_prices_are_exact_micros_per_mtok_times_markup() -> None:
    c = catalog("0.05")
    assert c.load_remote({"data": REMOTE}) == 3  # tiny, free and the (shadowed) gemini
    tiny = c.get("acme/tiny")
    assert tiny is not None and tiny.prices is not None
    assert tiny.prices.input == Fraction("123456.7") * Fraction(105, 100)
    assert tiny.prices.output == Fraction("987654.321") * Fraction(105, 100)
    assert tiny.prices.cached == Fraction(10_000) * Fraction(105, 100)
    # Shown as whole micros, half-up: 129629.535 -> 129630, 1037037.03705 -> 1037037.
    assert tiny.pricing() == {"input_per_mtok_micros": 129_630, "output_per_mtok_micros": 1_037_037,
                              "cached_input_per_mtok_micros": 10_500}
    assert (tiny.context_length, tiny.max_output_tokens, tiny.source) == (128_000, 8_192, "remote")


def test_local_entries_win_and_unpriced_models_are_left_out() -> None:
    c = catalog()
    c.load_remote({"data": REMOTE})
    local = c.get("google/gemini-3-flash-preview")
    assert local is not None and local.source == "local"
    assert local.pricing()["input_per_mtok_micros"] == 500_000
    assert c.get("openrouter/auto") is None and c.get("auto") is None and c.get("broken") is None
    free = c.get("acme/free")
    assert free is not None and free.max_output_tokens == 4_096  # no published limit: the context window
    assert [e.id for e in c.entries()] == ["acme/free", "acme/tiny", "google/gemini-3-flash-preview", "pixel-1"]


@pytest.mark.parametrize("model_id", ["acme/tiny", "openrouter/acme/tiny"], ids=["bare", "prefixed"])
def test_the_openrouter_prefix_is_optional(model_id: str) -> None:
    c = catalog()
    c.load_remote({"data": REMOTE})
    entry = c.get(model_id)
    assert entry is not None and entry.id == "acme/tiny"


def test_a_failed_refresh_keeps_the_last_good_catalog() -> None:
    c = catalog()
    assert c.status()["status"] == "loading"
    c.load_remote({"data": REMOTE})
    assert c.status()["status"] == "ok"
    with pytest.raises(CatalogError):
        c.load_remote({"models": []})
    assert c.get("acme/tiny") is not None
    status = c.status()
    assert (status["status"], status["remote_models"], status["error"]) == (
        "stale", 3, "the upstream's model list is malformed (no `data` array)")
    c.load_remote({"data": REMOTE[:1]})
    assert (c.status()["status"], c.status()["error"], c.get("acme/free")) == ("ok", None, None)


def test_a_catalog_never_loaded_serves_local_models_only() -> None:
    c = catalog()
    with pytest.raises(CatalogError):
        c.load_remote("not a catalog")
    assert c.status()["status"] == "local_only"
    assert c.get("google/gemini-3-flash-preview") is not None
    assert c.get("acme/tiny") is None


def test_an_alias_keeps_its_own_id_prices_and_limits_and_forwards_the_upstreams_id() -> None:
    """`house/tiny` is an alias of `acme/tiny`, which the remote catalog prices: each keeps its own price."""
    alias = TextModelConfig(upstream_model="acme/tiny", input_per_mtok_micros=700_000,
                            output_per_mtok_micros=2_000_000, context_length=32_000, max_output_tokens=4_000)
    image = ImageModelConfig(modality="image", per_image_micros=50_000, sizes=["1024x1024"], upstream_model="pixel-1")
    c = Catalog({**LOCAL, "house/tiny": alias, "house/pixel": image}, text_upstream="openrouter",
                markup=Decimal("0.05"))
    c.load_remote({"data": REMOTE})
    entry = c.get("openrouter/house/tiny")
    assert entry is not None and entry.prices is not None
    assert (entry.id, entry.forwarded_id, entry.upstream, entry.source) == (
        "house/tiny", "acme/tiny", "openrouter", "local")
    assert (entry.prices.input, entry.prices.output, entry.context_length, entry.max_output_tokens) == (
        700_000, 2_000_000, 32_000, 4_000)
    assert entry.as_model()["upstream_model"] == "acme/tiny"
    remote = c.get("acme/tiny")
    assert remote is not None and remote.prices is not None
    assert (remote.forwarded_id, remote.prices.input) == ("acme/tiny", Fraction("123456.7") * Fraction(105, 100))
    assert "upstream_model" not in remote.as_model()
    pixel = c.get("house/pixel")
    assert pixel is not None
    assert (pixel.forwarded_id, pixel.pricing()["per_image_micros"]) == ("pixel-1", 50_000)


def test_an_alias_must_name_its_upstream_model() -> None:
    with pytest.raises(ValidationError) as caught:
        TextModelConfig(upstream_model="", input_per_mtok_micros=1, output_per_mtok_micros=1, context_length=1,
                        max_output_tokens=1)
    assert [error["loc"] for error in caught.value.errors()] == [("upstream_model",)]


@pytest.fixture
async def remote_client(aiohttp_client: Any, chat_settings: Settings, openrouter_server: Any,
                        openrouter: FakeUpstream, pool: asyncpg.Pool) -> TestClient:
    openrouter.models = REMOTE
    client: TestClient = await aiohttp_client(create_app(point_at(
        chat_settings, openrouter_server, remote_catalog=True, markup=Decimal("0.1"))))
    await client.server.app[FIRST_LOAD].wait()
    return client


async def test_models_list_shows_every_modality_with_integer_prices(
    remote_client: TestClient, pool: asyncpg.Pool
) -> None:
    _, secret = await make_customer(pool)
    resp = await remote_client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert {"acme/tiny", "acme/free", "google/gemini-3-flash-preview", "openai/gpt-5.4", "gemini-3-pro-image",
            "sora-2"} <= set(models)
    assert models["google/gemini-3-flash-preview"]["pricing"] == {
        "input_per_mtok_micros": 500_000, "output_per_mtok_micros": 3_000_000,
        "cached_input_per_mtok_micros": 50_000}
    assert models["google/gemini-3-flash-preview"]["context_length"] == 1_048_576
    assert models["google/gemini-3-flash-preview"]["max_output_tokens"] == 65_536
    assert models["acme/tiny"]["pricing"]["input_per_mtok_micros"] == 135_802  # 123456.7 x 1.1 = 135802.37
    assert models["gemini-3-pro-image"]["modality"] == "image"
    assert models["gemini-3-pro-image"]["pricing"]["per_image_micros"] == 134_000
    assert models["sora-2"]["pricing"]["per_second_micros"] == 100_000


@pytest.mark.parametrize("path", ["/v1/models/acme/tiny", "/openai/v1/models/openrouter/acme/tiny"],
                         ids=["bare", "prefixed"])
async def test_model_by_id_with_slashes(remote_client: TestClient, pool: asyncpg.Pool, path: str) -> None:
    _, secret = await make_customer(pool)
    resp = await remote_client.get(path, headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200
    model = await resp.json()
    assert (model["id"], model["object"], model["owned_by"], model["max_output_tokens"]) == (
        "acme/tiny", "model", "acme", 8_192)


async def test_unknown_model_by_id_is_404(remote_client: TestClient, pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool)
    resp = await remote_client.get("/v1/models/nobody/nothing", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "MODEL_NOT_FOUND"


async def test_models_need_a_key(remote_client: TestClient) -> None:
    assert (await remote_client.get("/v1/models")).status == 401


async def test_a_remote_model_is_billed_at_its_exact_price_with_markup(
    remote_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.prompt_tokens, openrouter.completion_tokens = 1_000_000, 333_333
    account_id, secret = await make_customer(pool, balance_micros=10_000_000)
    resp = await remote_client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                    json={"model": "openrouter/acme/tiny", "messages": MESSAGES, "max_tokens": 10})
    assert resp.status == 200
    prices = remote_client.server.app[CATALOG].get("acme/tiny").prices  # type: ignore[union-attr]
    assert prices is not None
    # 1,000,000 x 135802.37 / 1e6 + 333,333 x 1086419.7531 / 1e6 = 135802.37 + 362139.55...: rounded once.
    charge = cost(1_000_000, 333_333, prices=prices)
    assert charge == 497_942
    assert (await resp.json())["usage"]["cost_micros"] == charge
    assert openrouter.bodies[0]["model"] == "acme/tiny"
    balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account_id)
    assert balance == 10_000_000 - charge


async def test_readyz_reports_a_stale_catalog_and_keeps_serving_it(
    remote_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    ready = await (await remote_client.get("/readyz")).json()
    assert (ready["catalog"]["status"], ready["catalog"]["remote_models"]) == ("ok", 3)
    openrouter.models_status = 500
    assert await refresh_catalog(remote_client.server.app) is False
    resp = await remote_client.get("/readyz")
    ready = await resp.json()
    assert resp.status == 200  # the database is fine; the catalog is reported, not required
    assert (ready["catalog"]["status"], ready["catalog"]["remote_models"]) == ("stale", 3)
    assert "500" in ready["catalog"]["error"]
    _, secret = await make_customer(pool)
    found = await remote_client.get("/v1/models/acme/tiny", headers={"Authorization": f"Bearer {secret}"})
    assert found.status == 200
    assert openrouter.calls["models"] == 2
