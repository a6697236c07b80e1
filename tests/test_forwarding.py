"""Forward only what was priced: what the upstream is sent, and so what it can bill, is bounded by the hold.

The upstream here bills every text-bearing field it receives as input and honours the largest output limit it is
sent (tests/fakes/billing_upstream.py). Over generated chat bodies (both output-limit fields, `n`, tools,
functions, schemas, predictions, long and short prompts, unknown fields), its bill never exceeds the hold, and what
it received carries exactly one output limit: the allowance the hold covers. Then the cases of issue 10, each of
which broke that before.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MODEL, PRICES, UPSTREAM_KEY, UPSTREAM_KEY_ENV, cost, held_prompt, point_at
from tests.factories import make_customer
from tests.fakes.billing_upstream import BillingUpstream, billed_input
from tests.fakes.upstream import FakeUpstream, openrouter_model

MODEL_LIMIT = 65_536  # the seed model's max_output_tokens (config/meterline.toml)

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00"), max_size=400)
_WORDS = st.one_of(
    _TEXT,
    st.integers(1, 600).map(lambda k: " " * k),  # runs cl100k packs many to a token
    st.integers(1, 300).map(lambda k: "ab" * k),
    st.integers(1, 200).map(lambda k: "\n" * k),
    st.just("the quick brown fox jumps over the lazy dog " * 20),
)
_CONTENT = st.one_of(_WORDS, st.lists(st.one_of(
    _WORDS.map(lambda t: {"type": "text", "text": t}),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "high"}}),
), min_size=1, max_size=3))
_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": _CONTENT},
    optional={"name": st.text("abcxyz_", min_size=1, max_size=12)}), min_size=1, max_size=4)
_SCHEMA = st.recursive(st.one_of(st.just({"type": "string"}), st.just({"type": "integer"}),
                                 _WORDS.map(lambda d: {"type": "string", "description": d})),
                       lambda inner: st.dictionaries(st.text("abcdefgh", min_size=1, max_size=8), inner, max_size=4)
                       .map(lambda props: {"type": "object", "properties": props}), max_leaves=12)
_FUNCTION = st.fixed_dictionaries({"name": st.text("abcdefgh_", min_size=1, max_size=16), "description": _WORDS,
                                   "parameters": _SCHEMA})
_LIMIT = st.integers(1, 200_000)

BODIES = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": _MESSAGES},
    optional={
        "max_tokens": _LIMIT, "max_completion_tokens": _LIMIT, "n": st.integers(1, 4),
        "tools": st.lists(_FUNCTION.map(lambda f: {"type": "function", "function": f}), min_size=1, max_size=3),
        "functions": st.lists(_FUNCTION, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "response_format": _SCHEMA.map(lambda s: {"type": "json_schema", "json_schema": {"name": "out", "schema": s}}),
        "prediction": _WORDS.map(lambda t: {"type": "content", "content": t}),
        "stop": st.lists(_TEXT.filter(bool), min_size=1, max_size=3), "user": st.text("abc123", max_size=40),
        "temperature": st.floats(0, 2), "seed": st.integers(0, 2**31),
        "reasoning": st.fixed_dictionaries({"effort": st.sampled_from(["low", "high"])},
                                           optional={"max_tokens": _LIMIT}),
        "reasoning_effort": st.sampled_from(["xhigh", "minimal", "none"]),  # sent as reasoning.effort
        "x_unknown": _TEXT, "logit_bias_typo": st.just({"50256": -100}),
    },
)


@pytest.fixture
def billing() -> BillingUpstream:
    return BillingUpstream()


@pytest.fixture
async def billing_gateway(aiohttp_client: Any, settings: Settings, billing: BillingUpstream, aiohttp_server: Any,
                          pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> tuple[TestClient, str, str]:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    server: TestServer = await aiohttp_server(billing.app())
    client: TestClient = await aiohttp_client(create_app(point_at(settings, server)))
    account, secret = await make_customer(pool, balance_micros=10**13)
    return client, account, secret


async def _hold(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM holds WHERE request_id = $1", request_id)
    assert row is not None
    return row


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=BODIES)
async def test_the_upstreams_bill_never_exceeds_the_hold_and_it_gets_exactly_the_held_output_limit(
        billing_gateway: tuple[TestClient, str, str], billing: BillingUpstream, pool: asyncpg.Pool,
        body: dict[str, Any]) -> None:
    client, _, secret = billing_gateway
    forwarded_before = len(billing.bodies)
    resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"})
    unknown = [name for name in body if name in ("x_unknown", "logit_bias_typo")]
    if unknown:
        error = (await resp.json())["error"]
        assert (resp.status, error["param"]) == (400, unknown[0])
        assert len(billing.bodies) == forwarded_before
        return
    assert resp.status == 200, await resp.text()
    sent = billing.bodies[-1]
    limits = [name for name in ("max_tokens", "max_completion_tokens") if name in sent]
    asked = [body[name] for name in ("max_tokens", "max_completion_tokens") if name in body]
    assert len(limits) == 1
    assert sent[limits[0]] == min([*asked, MODEL_LIMIT])
    if asked:
        assert limits[0] == min((name for name in ("max_completion_tokens", "max_tokens") if name in body),
                                key=lambda name: body[name])
    hold = await _hold(pool, resp.headers["X-Request-Id"])
    assert hold["state"] == "settled"
    assert hold["overrun_micros"] == 0, (hold["amount_micros"], hold["actual_micros"])
    assert hold["actual_micros"] == cost(billed_input(sent), sent[limits[0]] * (body.get("n") or 1))


async def test_twenty_calls_asking_both_limits_cannot_overspend_a_small_balance(
        aiohttp_client: Any, settings: Settings, billing: BillingUpstream, aiohttp_server: Any, pool: asyncpg.Pool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: `{"max_tokens": 1, "max_completion_tokens": 4096}` was held for 1 token and forwarded with both;
    20 concurrent calls took an account holding 1,000 micros to -654,800."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    client = await aiohttp_client(create_app(point_at(settings, await aiohttp_server(billing.app()))))
    account, secret = await make_customer(pool, balance_micros=1_000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1,
            "max_completion_tokens": 4096}
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=body,
                                                 headers={"Authorization": f"Bearer {secret}"}) for _ in range(20)))
    assert all(a.status in (200, 402) for a in answers)
    assert all(sent["max_tokens"] == 1 and "max_completion_tokens" not in sent for sent in billing.bodies)
    balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account)
    assert balance >= 0
    assert await pool.fetchval("SELECT coalesce(sum(overrun_micros), 0) FROM holds") == 0
    assert len(billing.bodies) == sum(a.status == 200 for a in answers) > 0


@pytest.mark.parametrize("field", ["response_format", "functions"])
async def test_a_huge_schema_is_held_for(
        billing_gateway: tuple[TestClient, str, str], billing: BillingUpstream, pool: asyncpg.Pool,
        field: str) -> None:
    """Issue 10: a 990 KB JSON schema in response_format (or functions) was held 28 micros and charged 660,688."""
    client, _, secret = billing_gateway
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "a detail " * 12}
                                               for i in range(6_200)}}
    value: Any = ({"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
                  if field == "response_format" else [{"name": "big", "parameters": schema}])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "fill it"}], "max_tokens": 10, field: value}
    raw = json.dumps(body).encode()
    assert 950_000 < len(raw) < 1024 * 1024  # just under the body limit
    resp = await client.post("/v1/chat/completions", data=io.BytesIO(raw),
                             headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    hold = await _hold(pool, resp.headers["X-Request-Id"])
    assert hold["actual_micros"] > 90_000  # the schema was billed as input (about 200,000 tokens)...
    assert (hold["overrun_micros"], hold["amount_micros"] >= hold["actual_micros"]) == (0, True)  # ...and held


async def test_a_model_without_an_output_limit_is_held_and_capped_at_the_default(
        aiohttp_client: Any, settings: Settings, openrouter: FakeUpstream, openrouter_server: TestServer,
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 10: a catalog entry publishing no output limit was held for 16 tokens and sent no limit at all."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    openrouter.models = [openrouter_model("acme/unlimited", prompt="0.0000005", completion="0.000003",
                                          context_length=None, max_completion_tokens=None)]  # type: ignore[arg-type]
    client = await aiohttp_client(create_app(point_at(settings, openrouter_server, remote_catalog=True)))
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    messages = [{"role": "user", "content": "hi"}]
    resp = await client.post("/v1/chat/completions", json={"model": "acme/unlimited", "messages": messages},
                             headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200, await resp.text()
    assert openrouter.bodies[-1]["max_tokens"] == 4_096  # default_max_output_tokens
    hold = await _hold(pool, resp.headers["X-Request-Id"])
    assert hold["amount_micros"] == cost(held_prompt(messages), 4_096, prices=PRICES)


async def test_a_short_prompt_of_spaces_is_held_above_what_another_tokenizer_counts(
        billing_gateway: tuple[TestClient, str, str]) -> None:
    """Issue 10: 250 spaces were held as 11 prompt tokens while the upstream counted 94."""
    client, _, secret = billing_gateway
    resp = await client.post("/v1/chat/completions?dryRun=true", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": " " * 250}]})
    [prompt, _] = (await resp.json())["components"]
    assert prompt["billable_quantity"] >= 94
    assert prompt["billable_quantity"] == held_prompt([{"role": "user", "content": " " * 250}])
