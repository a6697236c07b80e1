"""Provider routing and failover for chat (issue 15): a model with two providers, each a fake OpenAI-compatible
upstream on loopback with knobs. One hold covers every attempt; one charge at the model's price is posted by the
provider that served; every attempt is on the record; the margin is right per provider."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from billing.catalog_config import ModelConfig
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.chat_support import UPSTREAM_KEY, UPSTREAM_KEY_ENV, request_record, settled
from tests.conftest import admin_headers
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream
from tests.serving import free_port
from tests.test_console_pages import signed_in

MODEL = "acme/routed"
FUNDS = 10_000_000
# The model's price, and each provider's cost price (micros per million tokens).
PRICE_IN, PRICE_OUT = 3_000_000, 9_000_000
ALPHA_IN, ALPHA_OUT = 2_000_000, 8_000_000
BETA_IN, BETA_OUT = 1_000_000, 4_000_000
PROMPT, COMPLETION = 12, 5  # what the fakes report
CHARGE = (PROMPT * PRICE_IN + COMPLETION * PRICE_OUT) // 1_000_000  # 81: whole micros, nothing to round
ALPHA_COST = (PROMPT * ALPHA_IN + COMPLETION * ALPHA_OUT) // 1_000_000  # 64
BETA_COST = (PROMPT * BETA_IN + COMPLETION * BETA_OUT) // 1_000_000  # 32
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 50}


def routed_model(**changes: Any) -> Any:
    return TypeAdapter(ModelConfig).validate_python({
        "modality": "text", "input_per_mtok_micros": PRICE_IN, "output_per_mtok_micros": PRICE_OUT,
        "context_length": 32_000, "max_output_tokens": 4096,
        "providers": [
            {"upstream": "alpha", "model": "acme/plain", "priority": 1,
             "input_cost_per_mtok_micros": ALPHA_IN, "output_cost_per_mtok_micros": ALPHA_OUT},
            {"upstream": "beta", "model": "vendor/plain", "priority": 2,
             "input_cost_per_mtok_micros": BETA_IN, "output_cost_per_mtok_micros": BETA_OUT},
        ], **changes})


def upstream_at(url: str, timeout: float = 10) -> UpstreamSettings:
    return UpstreamSettings(base_url=url, api_key_env=UPSTREAM_KEY_ENV, connect_timeout_seconds=2,
                            timeout_seconds=timeout)


@pytest.fixture
def alpha() -> FakeUpstream:
    return FakeUpstream(cost=None)  # no reported cost: the configured cost price counts


@pytest.fixture
def beta() -> FakeUpstream:
    return FakeUpstream(cost=None)


@pytest.fixture
async def servers(aiohttp_server: Any, alpha: FakeUpstream, beta: FakeUpstream) -> tuple[TestServer, TestServer]:
    return await aiohttp_server(alpha.app()), await aiohttp_server(beta.app())


@pytest.fixture
def make_gateway(aiohttp_client: Any, settings: Settings, servers: tuple[TestServer, TestServer], pool: asyncpg.Pool,
                 monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)

    async def make(*, alpha_url: str | None = None, alpha_timeout: float = 10, **changes: Any) -> TestClient:
        upstreams = {**settings.upstreams,
                     "alpha": upstream_at(alpha_url or str(servers[0].make_url("/api/v1")), alpha_timeout),
                     "beta": upstream_at(str(servers[1].make_url("/api/v1")))}
        client: TestClient = await aiohttp_client(create_app(settings.model_copy(update={
            "upstreams": upstreams, "models": {**settings.models, MODEL: routed_model()}, **changes})))
        return client

    return make


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def charges(pool: asyncpg.Pool) -> list[int]:
    return [r["amount_micros"] for r in await pool.fetch(
        "SELECT amount_micros FROM transfers WHERE kind = 'charge' ORDER BY id")]


@pytest.mark.parametrize("failure", ["refused", "timeout", "500", "429"])
async def test_a_failing_first_provider_is_passed_over_and_the_second_serves_one_charge_at_the_models_price(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream, failure: str) -> None:
    expected_status = {"refused": None, "timeout": None, "500": 500, "429": 429}[failure]
    expected_code = {"refused": "UPSTREAM_ERROR", "timeout": "UPSTREAM_ERROR", "500": "UPSTREAM_ERROR",
                     "429": "RATE_LIMITED"}[failure]
    if failure == "refused":
        api = await make_gateway(alpha_url=f"http://127.0.0.1:{free_port()}/api/v1")
    elif failure == "timeout":
        alpha.delay = 5
        api = await make_gateway(alpha_timeout=0.5)
    else:
        alpha.status = int(failure)
        api = await make_gateway()
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert (resp.headers["X-Meterline-Provider"], resp.headers["X-Meterline-Model"]) == ("beta", "vendor/plain")
    assert (await resp.json())["usage"]["cost_micros"] == CHARGE
    assert beta.bodies[0]["model"] == "vendor/plain" and "provider" not in beta.bodies[0]
    assert await charges(pool) == [CHARGE]
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["provider"], record["provider_model"], record["upstream"]) == ("beta", "vendor/plain", "beta")
    assert [(a["provider"], a["upstream_status"], a["error_code"]) for a in record["attempts"]] == [
        ("alpha", expected_status, expected_code), ("beta", 200, None)]
    assert (record["upstream_cost_micros"], record["generation_id"]) == (BETA_COST, "gen-fake-1")
    assert await verify(pool) == []
    for query in ({"generation_id": "gen-fake-1"}, {"provider": "beta"}):
        found = await (await api.get("/v1/requests", params=query, headers=auth(secret))).json()
        assert [(r["id"], r["provider"], r["generation_id"]) for r in found["data"]] == [
            (resp.headers["X-Request-Id"], "beta", "gen-fake-1")]
    assert (await (await api.get("/v1/requests", params={"provider": "alpha"}, headers=auth(secret))).json())[
        "data"] == []


async def test_a_request_the_first_provider_refuses_as_invalid_is_answered_at_once_and_not_retried(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    alpha.status, alpha.error_message = 400, "messages too long for this provider"
    api = await make_gateway()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "messages too long for this provider"
    assert beta.calls["chat"] == 0
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided" and await charges(pool) == []


async def test_when_every_provider_fails_the_answer_is_all_providers_exhausted_and_nothing_is_charged(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    alpha.status, beta.status = 500, 503
    api = await make_gateway()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "ALL_PROVIDERS_EXHAUSTED"
    assert "alpha (status 500)" in error["message"] and "beta (status 503)" in error["message"]
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided" and await charges(pool) == []
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["billing_status"], record["error_code"], record["provider"]) == (
        "voided", "ALL_PROVIDERS_EXHAUSTED", None)
    assert [(a["provider"], a["upstream_status"]) for a in record["attempts"]] == [("alpha", 500), ("beta", 503)]
    await signed_in(api)
    page = await (await api.get(f"/console/requests/{resp.headers['X-Request-Id']}")).text()
    assert '<ol id="attempts"><li>alpha: UPSTREAM_ERROR (status 500)' in page
    assert "<li>beta: UPSTREAM_ERROR (status 503)" in page
    row = await pool.fetchrow("SELECT credits_posted - debits_posted, held_micros FROM accounts WHERE id = $1",
                              account_id)
    assert tuple(row) == (FUNDS, 0)


async def test_a_provider_that_keeps_failing_is_skipped_uncalled_then_tried_again_after_the_cool_down(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    alpha.status = 500
    api = await make_gateway(provider_failure_threshold=2, provider_cooldown_seconds=0.5)
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    for _ in range(2):
        resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
        assert resp.headers["X-Meterline-Provider"] == "beta"
    assert alpha.calls["chat"] == 2
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))  # open: alpha is not called
    assert resp.headers["X-Meterline-Provider"] == "beta" and alpha.calls["chat"] == 2
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert [a["provider"] for a in record["attempts"]] == ["beta"]
    alpha.status = None  # it recovers
    await asyncio.sleep(0.6)  # past the cool-down (a bound to wait out, not a timing assertion)
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
    assert resp.headers["X-Meterline-Provider"] == "alpha" and alpha.calls["chat"] == 3
    resp = await api.post("/v1/chat/completions", json=ASK, headers=auth(secret))
    assert resp.headers["X-Meterline-Provider"] == "alpha"  # closed again
    assert await charges(pool) == [CHARGE] * 5
    exposition = await (await api.get("/metrics", headers=admin_headers())).text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(exposition) for s in family.samples
               if s.name.startswith("meterline_provider")}

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    alpha_labels = {"upstream": "alpha", "model": "acme/plain"}
    assert [sample("meterline_provider_circuit_changes_total", **alpha_labels, state=state)
            for state in ("open", "half_open", "closed")] == [1, 1, 1]
    assert sample("meterline_provider_circuit_open", **alpha_labels) == 0
    assert [sample("meterline_provider_attempts_total", **alpha_labels, outcome=outcome)
            for outcome in ("failed", "served")] == [2, 2]
    assert sample("meterline_provider_attempts_total", upstream="beta", model="vendor/plain", outcome="served") == 3


async def test_a_stream_whose_first_provider_fails_before_its_first_chunk_is_served_whole_by_the_second(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    alpha.error_after = 0  # an error event where the first chunk should be
    api = await make_gateway()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    async with api.post("/v1/chat/completions", json={**ASK, "stream": True,
                                                       "stream_options": {"include_usage": True}},
                        headers=auth(secret)) as resp:
        text = await resp.text()
        assert resp.status == 200 and resp.headers["X-Meterline-Provider"] == "beta"
    assert "provider crashed" not in text and text.count('"content"') == beta.chunks
    assert text.rstrip().endswith("data: [DONE]")
    await settled(pool, account_id)
    assert await charges(pool) == [CHARGE]
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert [(a["provider"], a["upstream_status"]) for a in record["attempts"]] == [("alpha", 200), ("beta", 200)]
    assert record["attempts"][0]["error_code"] == "UPSTREAM_ERROR"
    assert (record["generation_id"], record["upstream_cost_micros"]) == ("gen-fake-1", BETA_COST)


async def test_a_stream_that_fails_after_output_started_is_not_moved_and_bills_what_was_delivered(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    alpha.error_after = 2
    api = await make_gateway()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    async with api.post("/v1/chat/completions", json={**ASK, "stream": True}, headers=auth(secret)) as resp:
        text = await resp.text()
    assert resp.status == 200 and "provider crashed" in text
    assert beta.calls["chat"] == 0
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "settled"
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["status"], record["estimated"], record["provider"]) == ("upstream_failure", True, "alpha")
    assert record["cost_micros"] == (await charges(pool))[0] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
async def test_an_errored_empty_completion_costs_nothing(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, stream: bool) -> None:
    alpha.completion_tokens, alpha.finish_reason, alpha.chunks = 0, "error", 1
    alpha.reply = lambda body: ""
    api = await make_gateway()
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    body = {**ASK, "stream": True, "stream_options": {"include_usage": True}} if stream else ASK
    async with api.post("/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        text = await resp.text()
    assert resp.status == 200
    assert re.search(r'"cost_micros": ?0[,}]', text) and f'"model":"{MODEL}"' in text.replace(" ", "")
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided" and await charges(pool) == []
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["error_code"], record["cost_micros"], record["prompt_tokens"], record["completion_tokens"]) == (
        "EMPTY_COMPLETION", 0, PROMPT, 0)


async def test_a_request_may_prefer_a_provider_and_a_dry_run_names_the_one_first_in_line(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    api = await make_gateway()
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    dry = await api.post("/v1/chat/completions?dryRun=true", json=ASK, headers=auth(secret))
    assert (await dry.json())["provider"] == "alpha"
    resp = await api.post("/v1/chat/completions", json={**ASK, "provider": {"order": ["beta"]}},
                          headers=auth(secret))
    assert resp.headers["X-Meterline-Provider"] == "beta" and alpha.calls["chat"] == 0
    bad = await api.post("/v1/chat/completions", json={**ASK, "provider": {"order": ["gamma"]}},
                         headers=auth(secret))
    assert bad.status == 400 and (await bad.json())["error"]["param"] == "provider.order"


async def test_the_margin_report_is_exact_per_provider(
        make_gateway: Any, pool: asyncpg.Pool, alpha: FakeUpstream, beta: FakeUpstream) -> None:
    api = await make_gateway()
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    served = {"alpha": 3, "beta": 2}
    for name, count in served.items():
        for _ in range(count):
            resp = await api.post("/v1/chat/completions", json={**ASK, "provider": {"order": [name]}},
                                  headers=auth(secret))
            assert resp.headers["X-Meterline-Provider"] == name
    beta.cost = "0.000050"  # a provider that reports its own cost: that is what counts
    resp = await api.post("/v1/chat/completions", json={**ASK, "provider": {"order": ["beta"]}},
                          headers=auth(secret))
    assert resp.status == 200
    report = await (await api.get("/admin/reports/margin", params={
        "from": "2000-01-01", "to": "2100-01-01", "group_by": "provider"}, headers=admin_headers())).json()
    by_group = {row["group"]: (row["requests"], row["revenue_micros"], row["upstream_cost_micros"],
                               row["margin_micros"]) for row in report["data"]}
    alpha_cost, beta_cost = 3 * ALPHA_COST, 2 * BETA_COST + 50
    assert by_group == {"alpha": (3, 3 * CHARGE, alpha_cost, 3 * CHARGE - alpha_cost),
                        "beta": (3, 3 * CHARGE, beta_cost, 3 * CHARGE - beta_cost)}
    assert report["totals"]["margin_micros"] == 6 * CHARGE - alpha_cost - beta_cost
