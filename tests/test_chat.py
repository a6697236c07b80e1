"""Non-streaming chat completions through the official OpenAI SDK and raw HTTP: holds, charges to the micro,
pass-through, failures that cost nothing, dryRun, and K-of-N concurrency against one balance."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient

from billing import pricing, tokens
from billing.verify import verify
from tests.chat_support import (
    MESSAGES,
    MODEL,
    PRICES,
    UPSTREAM_KEY,
    account_row,
    cost,
    held_prompt,
    request_record,
    settled,
)
from tests.factories import make_customer
from tests.fakes.upstream import CONTENT_PIECE, FakeUpstream

FUNDS = 10_000_000


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def expected_hold(messages: list[Any], max_tokens: int, prices: pricing.TokenPrices = PRICES) -> int:
    return cost(held_prompt(messages), max_tokens, prices=prices)


async def test_sdk_call_is_charged_the_upstream_usage_to_the_micro(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any
) -> None:
    openrouter.prompt_tokens, openrouter.completion_tokens = 1_234, 567
    openrouter.cached_tokens, openrouter.reasoning_tokens = 200, 100
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    raw = await sdk_factory(secret).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=1_000)
    completion = raw.parse()
    charge = cost(1_234, 567, cached=200)
    assert charge == 2_228  # 1,034 uncached x 0.5 + 200 cached x 0.05 + 567 x 3 micros
    assert completion.choices[0].message.content == CONTENT_PIECE * 5
    assert completion.usage is not None
    assert completion.usage.model_extra == {"cost": charge / 1_000_000, "cost_micros": charge}
    assert raw.headers["X-Cost-Micros"] == str(charge)
    row = await account_row(pool, account_id)
    assert (row["balance"], row["held"]) == (FUNDS - charge, 0)
    record = await request_record(pool, raw.headers["X-Request-Id"])
    assert (record["model"], record["modality"], record["status"], record["billing_status"]) == (
        MODEL, "text", "completed", "settled")
    assert (record["prompt_tokens"], record["completion_tokens"], record["cached_tokens"],
            record["reasoning_tokens"]) == (1_234, 567, 200, 100)
    assert (record["cost_micros"], record["upstream_cost_micros"], record["estimated"]) == (charge, 123, False)
    assert record["endpoint"] == "/v1/chat/completions"
    assert record["hold_micros"] == expected_hold(MESSAGES, 1_000)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
async def test_text_postgresql_cannot_hold_from_the_upstream_cannot_escape_the_charge(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, stream: bool
) -> None:
    """PostgreSQL cannot store U+0000 nor encode a lone surrogate; an upstream's usage carrying them is still
    settled, its record stored with the NUL dropped and the surrogate replaced (a client's own text with either
    is refused at the edge: tests/test_bad_input.py)."""
    openrouter.prompt_tokens, openrouter.completion_tokens = 100, 10
    openrouter.usage_extra = {"note": "a\u0000b\ud800c"}
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 50, "stream": stream,
        "stream_options": {"include_usage": True} if stream else None})
    assert resp.status == 200
    await resp.read()
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "settled"
    assert tuple(await account_row(pool, account_id)) == (FUNDS - cost(100, 10), 0)
    assert (await request_record(pool, hold["request_id"]))["usage"]["note"] == "ab\ufffdc"
    assert await verify(pool) == []


async def test_an_upstream_error_postgresql_cannot_hold_still_voids_its_hold(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.status, openrouter.error_message = 400, "bad \u0000 request \ud800"
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 50})
    assert resp.status == 400
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided"
    assert (await request_record(pool, hold["request_id"]))["error_message"] == "bad  request \ufffd"
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)


async def test_openrouter_prefix_is_the_same_model_at_the_same_price(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    for model in (MODEL, f"openrouter/{MODEL}"):
        resp = await chat_client.post("/openai/v1/chat/completions", headers=auth(secret),
                                      json={"model": model, "messages": MESSAGES, "max_tokens": 50})
        assert resp.status == 200
        assert (await resp.json())["usage"]["cost_micros"] == cost(12, 5)
    assert [body["model"] for body in openrouter.bodies] == [MODEL, MODEL]
    assert (await account_row(pool, account_id))["balance"] == FUNDS - 2 * cost(12, 5)


async def test_known_fields_go_upstream_as_sent_unknown_answer_fields_come_back_and_only_our_key_goes_up(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    sent = {
        "model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "tools": [tool], "tool_choice": "auto",
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "seed": 7, "logprobs": True, "temperature": 0.25, "reasoning": {"effort": "high"},
        "provider": {"order": ["google-vertex"], "allow_fallbacks": False},
    }
    openrouter.extra_message = {
        "reasoning": "thinking...", "reasoning_details": [{"type": "reasoning.text", "text": "t"}],
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}],
        "annotations": [{"type": "url_citation", "url_citation": {"url": "https://example.com"}}],
    }
    openrouter.extra_top = {"system_fingerprint": "fp_1", "x_upstream_only": {"a": [1, 2]}}
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json=sent)
    assert resp.status == 200
    answer = await resp.json()
    # Every field as sent (the model id is already the catalog's), plus the one output limit the hold covers: the
    # model's whole output limit, as the client set none.
    assert openrouter.bodies == [{**sent, "max_tokens": 65_536}]
    message = answer["choices"][0]["message"]
    for name, value in openrouter.extra_message.items():
        assert message[name] == value
    assert (answer["system_fingerprint"], answer["x_upstream_only"]) == ("fp_1", {"a": [1, 2]})
    headers = openrouter.headers[0]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(secret not in value for value in headers.values())
    assert UPSTREAM_KEY not in await resp.text()
    assert all(UPSTREAM_KEY not in value for value in resp.headers.values())


@pytest.mark.parametrize(("field", "value"), [("x_custom", [1, {"deep": None}]), ("models", ["a/b", "c/d"]),
                                               ("plugins", [{"id": "web"}]), ("web_search_options", {}),
                                               ("route", "fallback"), ("service_tier", "priority"),
                                               ("modalities", ["text", "audio"])],
                         ids=["unknown", "models", "plugins", "web-search", "route", "priority-tier", "audio"])
async def test_a_field_that_would_reach_the_upstream_unpriced_is_refused(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, field: str, value: Any
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, field: value})
    error = (await resp.json())["error"]
    assert (resp.status, error["code"], error["param"]) == (400, "INVALID_REQUEST", field)
    assert field in error["message"]
    assert openrouter.calls["chat"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


@pytest.mark.parametrize("authorization", [None, "Bearer ml-not-a-real-key", "Basic abc"],
                         ids=["missing", "unknown", "wrong-scheme"])
async def test_bad_key_is_401_and_nothing_reaches_upstream(
    chat_client: TestClient, openrouter: FakeUpstream, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    resp = await chat_client.post("/v1/chat/completions", headers=headers,
                                  json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "AUTHENTICATION_FAILED"
    assert openrouter.calls["chat"] == 0


async def test_insufficient_balance_is_402_with_lumenfall_body_and_nothing_reaches_upstream(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=10)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk_factory(secret).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert caught.value.status_code == 402
    error = caught.value.response.json()["error"]
    minimum = cost(held_prompt(MESSAGES), 16)
    assert error["code"] == "INSUFFICIENT_BALANCE"
    assert error["type"] == "billing_error"
    assert error["message"].startswith("Insufficient balance")
    assert (error["required_micros"], error["available_micros"]) == (minimum, 10)
    assert openrouter.calls["chat"] == 0
    assert tuple(await account_row(pool, account_id)) == (10, 0)
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_short_balance_sends_the_affordable_max_tokens_and_says_so(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    padded = held_prompt(MESSAGES)
    balance = cost(padded, 0) + 3_000  # the prompt plus 1,000 output tokens at 3 micros each
    account_id, secret = await make_customer(pool, balance_micros=balance)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 50_000})
    assert resp.status == 200
    affordable = (balance * 1_000_000 - padded * 500_000) // 3_000_000
    assert affordable in (1_000, 1_001)
    assert resp.headers["X-Max-Tokens-Reduced-To"] == str(affordable)
    assert openrouter.bodies[0]["max_completion_tokens"] == affordable
    assert "max_tokens" not in openrouter.bodies[0]
    assert (await account_row(pool, account_id))["balance"] == balance - cost(12, 5)


async def test_unknown_model_is_404_without_calling_upstream(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": "nobody/no-such-model", "messages": MESSAGES})
    assert resp.status == 404
    body = await resp.json()
    assert (body["error"]["code"], body["error"]["param"]) == ("MODEL_NOT_FOUND", "model")
    assert openrouter.calls["chat"] == 0
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)


@pytest.mark.parametrize(("knobs", "status", "code"), [
    ({"status": 500}, 502, "UPSTREAM_ERROR"),
    ({"status": 503}, 502, "UPSTREAM_ERROR"),
    ({"status": 429}, 429, "RATE_LIMITED"),
    ({"status": 400, "error_message": "messages[0] is too long"}, 400, "INVALID_REQUEST"),
], ids=["500", "503", "429", "400"])
async def test_upstream_failure_costs_nothing(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, knobs: dict[str, Any], status: int,
    code: str
) -> None:
    for name, value in knobs.items():
        setattr(openrouter, name, value)
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] == code
    if status == 400:
        assert error["message"] == "messages[0] is too long"
    assert openrouter.calls["chat"] == 1
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided"
    record = await request_record(pool, hold["request_id"])
    assert (record["status"], record["error_code"], record["cost_micros"]) == ("upstream_failure", code, 0)


async def test_upstream_timeout_is_502_and_costs_nothing(
    aiohttp_client: Any, chat_settings: Any, pool: asyncpg.Pool, openrouter: FakeUpstream, openrouter_server: Any
) -> None:
    from gateway.app import create_app
    from tests.chat_support import point_at

    openrouter.delay = 1.0
    client = await aiohttp_client(create_app(point_at(chat_settings, openrouter_server, timeout_seconds=0.2)))
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await client.post("/v1/chat/completions", headers=auth(secret),
                             json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "UPSTREAM_ERROR"
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)
    [hold] = await settled(pool, account_id)
    assert hold["state"] == "voided"


async def test_refused_upstream_is_502_and_costs_nothing(
    aiohttp_client: Any, chat_settings: Any, pool: asyncpg.Pool, openrouter_server: Any
) -> None:
    from gateway.app import create_app
    from gateway.settings import UpstreamSettings

    upstreams = dict(chat_settings.upstreams)
    # Port 1 on loopback: nothing listens there, so the connection is refused.
    upstreams["openrouter"] = UpstreamSettings(base_url="http://127.0.0.1:1/api/v1", api_key_env="X")
    client = await aiohttp_client(create_app(chat_settings.model_copy(update={"upstreams": upstreams})))
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await client.post("/v1/chat/completions", headers=auth(secret),
                             json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "UPSTREAM_ERROR"
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)


async def test_absent_usage_is_estimated_with_tiktoken_and_flagged(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.usage = "absent"
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 100})
    assert resp.status == 200
    prompt = tokens.count_prompt_sync(MESSAGES)
    completion = tokens.count_text(CONTENT_PIECE * 5)
    assert (prompt, completion) == (13, 6)
    charge = cost(prompt, completion)
    usage = (await resp.json())["usage"]
    assert usage == {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion, "estimated": True,
                     "cost": charge / 1_000_000, "cost_micros": charge}
    assert (await account_row(pool, account_id))["balance"] == FUNDS - charge
    assert await pool.fetchval("SELECT estimated FROM transfers WHERE kind = 'charge'") is True
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["estimated"], record["cost_micros"], record["usage"]) == (True, charge, None)


async def test_explicit_zero_usage_bills_zero(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.usage = "zero"
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == 200
    assert resp.headers["X-Cost-Micros"] == "0"
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)
    [hold] = await settled(pool, account_id)
    assert (hold["state"], hold["actual_micros"]) == ("settled", 0)
    assert await pool.fetchval("SELECT estimated FROM transfers WHERE kind = 'charge'") is False


@pytest.mark.parametrize(("body", "query", "param"), [
    ({"model": MODEL}, "", "messages"),
    ({"model": MODEL, "messages": "hi"}, "", "messages"),
    ({"model": MODEL, "messages": []}, "", "messages"),
    ({"model": MODEL, "messages": [{"content": "hi"}]}, "", "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "", "messages.0.content"),
    ({"messages": MESSAGES}, "", "model"),
    ({"model": 3, "messages": MESSAGES}, "", "model"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, "", "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": -5}, "", "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": "5"}, "", "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 1.5}, "", "max_completion_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "stream": "yes"}, "", "stream"),
    ({"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": 1}}, "",
     "stream_options.include_usage"),
    ({"model": MODEL, "messages": MESSAGES, "n": 0}, "", "n"),
    ({"model": MODEL, "messages": MESSAGES}, "?dryRun=maybe", "dryRun"),
    ({"model": MODEL}, "?dryRun=true", "messages"),
], ids=["no-messages", "messages-string", "messages-empty", "no-role", "content-number", "no-model",
        "model-number", "max-tokens-zero", "max-tokens-negative", "max-tokens-string", "max-completion-float",
        "stream-string", "include-usage-number", "n-zero", "dry-run-unknown", "dry-run-invalid-body"])
async def test_bad_input_is_400_naming_the_field(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, body: dict[str, Any], query: str,
    param: str
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post(f"/v1/chat/completions{query}", headers=auth(secret), json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("INVALID_REQUEST", param)
    assert param in error["message"]
    assert openrouter.calls["chat"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe"], ids=["empty", "text", "array", "bytes"])
async def test_malformed_body_is_400(chat_client: TestClient, pool: asyncpg.Pool, raw: bytes) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), data=raw)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_REQUEST"


async def test_dry_run_equals_the_real_hold_calls_nothing_and_holds_nothing(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2_000, "n": 2}
    resp = await chat_client.post("/openai/v1/chat/completions?dryRun=true", headers=auth(secret), json=body)
    assert resp.status == 200
    estimate = await resp.json()
    counted = tokens.count_prompt_sync(MESSAGES)
    padded = held_prompt(MESSAGES)
    hold = cost(padded, 4_000)
    input_cost = cost(padded, 0)
    assert estimate == {
        "estimated": True, "model": MODEL, "provider": "openrouter", "total_cost_micros": hold,
        "currency": "USD",
        "components": [
            {"type": "input", "metric": "token", "quantity": counted, "billable_quantity": padded,
             "unit_price_micros_per_mtok": 500_000, "total_cost_micros": input_cost},
            {"type": "output", "metric": "token", "quantity": 4_000, "billable_quantity": 4_000,
             "unit_price_micros_per_mtok": 3_000_000, "total_cost_micros": hold - input_cost},
        ],
        "available_micros": FUNDS, "sufficient_balance": True,
    }
    assert openrouter.calls["chat"] == 0
    assert tuple(await account_row(pool, account_id)) == (FUNDS, 0)
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0

    real = await chat_client.post("/openai/v1/chat/completions", headers=auth(secret), json=body)
    assert real.status == 200
    assert await pool.fetchval("SELECT amount_micros FROM holds") == hold


async def test_dry_run_reports_an_insufficient_balance(chat_client: TestClient, pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool, balance_micros=5)
    resp = await chat_client.post("/v1/chat/completions?dryRun=1", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES})
    estimate = await resp.json()
    assert (resp.status, estimate["available_micros"], estimate["sufficient_balance"]) == (200, 5, False)
    # Without max_tokens the hold assumes the model's whole output limit.
    assert estimate["components"][1]["quantity"] == 65_536


async def test_50_concurrent_calls_against_a_balance_for_10_let_exactly_10_through(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100}
    padded = held_prompt(MESSAGES)
    # The openrouter reports exactly the hold's usage, so each call costs its whole hold whenever it settles:
    # the balance admits ten, however the fifty interleave.
    openrouter.prompt_tokens, openrouter.completion_tokens, openrouter.delay = padded, 100, 0.05
    hold = cost(padded, 100)
    account_id, secret = await make_customer(pool, balance_micros=10 * hold)
    responses = await asyncio.gather(*(
        chat_client.post("/v1/chat/completions", headers=auth(secret), json=body) for _ in range(50)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 10 + [402] * 40
    assert openrouter.calls["chat"] == 10
    await settled(pool, account_id, holds=10)
    assert tuple(await account_row(pool, account_id)) == (0, 0)
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'") == 10
    assert await verify(pool) == []
