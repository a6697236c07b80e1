"""Reasoning, lumyx-compatible: an upstream's `reasoning` text also reaches the client as `reasoning_content`
(in answers and in stream deltas), `reasoning_details` passes untouched, and the text is charged once; the
deprecated `reasoning_effort` is accepted and sent as `reasoning.effort`, and held for as what is sent."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing import tokens
from tests.chat_support import MESSAGES, MODEL, account_row, cost, held_prompt, settled
from tests.factories import make_customer
from tests.fakes.upstream import CONTENT_PIECE, FakeUpstream

FUNDS = 10_000_000
THOUGHT = "Let me calculate this step by step..."
DETAILS = [{"type": "reasoning.text", "text": THOUGHT, "format": "unknown", "index": 0}]


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_an_answer_with_reasoning_also_carries_it_as_reasoning_content(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any
) -> None:
    openrouter.extra_message = {"reasoning": THOUGHT, "reasoning_details": DETAILS}
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    completion = await sdk_factory(secret).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    message = completion.choices[0].message
    assert message.content == CONTENT_PIECE * 5
    assert message.model_extra == {"reasoning": THOUGHT, "reasoning_content": THOUGHT, "reasoning_details": DETAILS}
    assert tuple(await account_row(pool, account_id)) == (FUNDS - cost(12, 5), 0)


@pytest.mark.parametrize(("upstream", "shown"), [
    ({"reasoning": THOUGHT}, THOUGHT),
    ({"reasoning": THOUGHT, "reasoning_content": "the upstream's own"}, "the upstream's own"),
    ({"reasoning": THOUGHT, "reasoning_content": None}, THOUGHT),
    ({"reasoning": ""}, ""),
    ({"reasoning": None}, None),
    ({}, None),
], ids=["reasoning-only", "both-given", "content-null", "empty", "reasoning-null", "no-reasoning"])
async def test_reasoning_content_is_added_only_where_reasoning_text_comes_without_it(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, upstream: dict[str, Any],
    shown: str | None
) -> None:
    openrouter.extra_message = upstream
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 100})
    assert resp.status == 200
    message = (await resp.json())["choices"][0]["message"]
    assert message.get("reasoning_content") == shown
    assert ("reasoning_content" in message) == (shown is not None or "reasoning_content" in upstream)
    assert message.get("reasoning") == upstream.get("reasoning")


@pytest.mark.parametrize("compact", [True, False], ids=["compact-json", "spaced-json"])
async def test_stream_deltas_with_reasoning_also_carry_it_as_reasoning_content(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any, compact: bool
) -> None:
    openrouter.compact = compact
    details = [{"type": "reasoning.text", "text": "think "}]
    openrouter.extra_delta = {"reasoning": "think ", "reasoning_details": details}
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    stream = await sdk_factory(secret).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=100, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert [delta.content for delta in deltas] == [CONTENT_PIECE] * 5
    assert [delta.model_extra for delta in deltas] == [{
        "reasoning": "think ", "reasoning_content": "think ", "reasoning_details": details}] * 5
    assert chunks[-1].usage is not None and chunks[-1].usage.model_extra == {
        "cost": cost(12, 5) / 1_000_000, "cost_micros": cost(12, 5)}
    await settled(pool, account_id)
    assert tuple(await account_row(pool, account_id)) == (FUNDS - cost(12, 5), 0)


async def test_stream_deltas_without_reasoning_text_pass_as_the_bytes_they_came_in(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    """OpenRouter may write `"reasoning":null` into every delta: such chunks are not parsed nor re-encoded (the
    fake writes `": "`, which the gateway's own encoding never does)."""
    openrouter.extra_delta = {"reasoning": None, "reasoning_details": []}
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True})
    assert resp.status == 200
    text = await resp.text()
    events = [event for event in text.split("\n\n") if event.startswith("data: {")]
    assert len(events) == 5
    # All but the last, which is re-encoded once to carry the context fields.
    assert all('"reasoning": null, "reasoning_details": []' in event for event in events[:-1])
    assert '"reasoning":null,"reasoning_details":[]' in events[-1] and '"context_left"' in events[-1]
    assert "reasoning_content" not in text


async def test_a_stream_without_usage_charges_its_reasoning_once(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    """The estimate counts the text delivered: reasoning given under both names is counted once."""
    openrouter.usage = "absent"
    openrouter.extra_delta = {"reasoning": "think "}
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True})
    events = [json.loads(event[6:]) for event in (await resp.text()).split("\n\n") if event.startswith("data: {")]
    assert [event["choices"][0]["delta"]["reasoning_content"] for event in events] == ["think "] * 5
    [hold] = await settled(pool, account_id)
    completion = tokens.count_text((CONTENT_PIECE + "think ") * 5)
    assert completion == 11
    charge = cost(tokens.count_prompt_sync(MESSAGES), completion)
    assert hold["actual_micros"] == charge
    assert await pool.fetchval("SELECT estimated FROM transfers WHERE kind = 'charge'") is True


async def test_reasoning_effort_reaches_the_upstream_as_reasoning_effort_inside_reasoning(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    await sdk_factory(secret).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100,
                                                      reasoning_effort="high")
    assert openrouter.bodies == [{"model": MODEL, "messages": MESSAGES, "reasoning": {"effort": "high"},
                                  "max_tokens": 100}]
    hold = await pool.fetchrow("SELECT amount_micros, actual_micros FROM holds WHERE account_id = $1", account_id)
    assert tuple(hold) == (cost(held_prompt(MESSAGES, {"reasoning": {"effort": "high"}}), 100), cost(12, 5))


@pytest.mark.parametrize(("given", "sent"), [
    ({"reasoning_effort": "minimal"}, {"reasoning": {"effort": "minimal"}}),
    ({"reasoning_effort": "low", "reasoning": {"max_tokens": 50}}, {"reasoning": {"max_tokens": 50, "effort": "low"}}),
    ({"reasoning_effort": "low", "reasoning": {"effort": "xhigh"}}, {"reasoning": {"effort": "xhigh"}}),
    ({"reasoning_effort": "none", "reasoning": {"effort": None, "exclude": True}},
     {"reasoning": {"effort": "none", "exclude": True}}),
    ({"reasoning_effort": None, "reasoning": {"enabled": True}}, {"reasoning": {"enabled": True}}),
], ids=["effort-alone", "beside-a-budget", "explicit-effort-wins", "null-effort-filled", "null-not-sent"])
async def test_reasoning_effort_is_merged_into_reasoning_and_held_as_sent(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, given: dict[str, Any],
    sent: dict[str, Any]
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "max_tokens": 100, **given})
    assert resp.status == 200, await resp.text()
    assert openrouter.bodies == [{"model": MODEL, "messages": MESSAGES, **sent, "max_tokens": 100}]
    hold = await pool.fetchval("SELECT amount_micros FROM holds")
    assert hold == cost(held_prompt(MESSAGES, sent), 100)


@pytest.mark.parametrize("value", ["extreme", "HIGH", "", 3, True, ["high"], {"effort": "high"}],
                         ids=["unknown", "upper-case", "empty", "number", "boolean", "array", "object"])
async def test_a_bad_reasoning_effort_is_a_400_naming_it_and_reaches_nothing(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, value: Any
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                  json={"model": MODEL, "messages": MESSAGES, "reasoning_effort": value})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"], error["message"]) == (
        "INVALID_REQUEST", "reasoning_effort",
        "reasoning_effort must be one of xhigh, high, medium, low, minimal, none")
    assert openrouter.calls["chat"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
