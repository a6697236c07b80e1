"""Prompts over `prompt_bound_above_chars` (256): the hold is taken on an upper bound of the prompt (one token per
UTF-8 byte) instead of a tiktoken count, so a 100 KB prompt does not wait milliseconds before it is forwarded;
whenever that bound is more than the balance or the key's limit covers, the prompt is counted and the answer is
exactly the counted one. dryRun answers with exactly the hold the real call takes, either way."""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import aiohttp
import asyncpg
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from billing import keys, limits, tokens
from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MODEL, PRICES, account_row, cost, held_prompt, request_record, settled
from tests.factories import make_account, make_customer
from tests.fakes.upstream import CONTENT_PIECE, FakeUpstream
from tests.serving import running

FUNDS = 10_000_000
CONTENT = "the quick brown fox jumps over the lazy dog " * 1_000  # 44,000 ASCII characters, ~9,000 tokens
BIG = [{"role": "user", "content": CONTENT}]
# The bound, computed by hand: the role and the content joined by a newline, one token per byte, plus 3 tokens
# of framing for the message and 3 for the reply.
BOUND = len("user") + 1 + len(CONTENT) + 3 + 3


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# The prompt tokens a hold assumes for BIG: on its bound, and on its count (README's rule, tests/chat_support).
HELD_BOUND = held_prompt(BIG, bound=True)
HELD_COUNT = held_prompt(BIG)


def counted_hold(max_tokens: int) -> int:
    return cost(HELD_COUNT, max_tokens)


async def call(client: TestClient, secret: str, url: str = "/v1/chat/completions", **extra: Any) -> Any:
    return await client.post(url, headers=auth(secret),
                             json={"model": MODEL, "messages": BIG, "max_tokens": 100, **extra})


async def held_in_full(client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, secret: str) -> Any:
    """Call with BIG and max_tokens 100, check it went through with its max_tokens untouched; its request record."""
    resp = await call(client, secret)
    assert resp.status == 200
    assert "X-Max-Tokens-Reduced-To" not in resp.headers
    assert openrouter.bodies[-1]["max_tokens"] == 100
    return await request_record(pool, resp.headers["X-Request-Id"])


def test_the_bound_is_what_the_test_computes_and_far_above_the_count() -> None:
    prompt = tokens.Prompt.of(BIG)
    assert prompt.large
    assert prompt.bound() == BOUND
    assert tokens.count_prompt_sync(BIG) < BOUND // 4


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec=None, exclude_categories=()), max_size=300), st.booleans())
def test_the_bound_is_never_below_the_count(text: str, in_tools: bool) -> None:
    """Any text, lone surrogates included, in a message or in a tool definition (counted as its JSON): one token
    per UTF-8 byte is never fewer tokens than tiktoken's."""
    messages = [{"role": "user", "content": "" if in_tools else text}]
    extra = {"tools": [{"type": "function", "function": {"name": "f", "description": text}}]} if in_tools else None
    assert tokens.Prompt.of(messages, extra).bound() >= tokens.count_prompt_sync(messages, extra)


async def test_a_covered_large_prompt_is_held_on_its_bound_and_charged_its_usage(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.prompt_tokens, openrouter.completion_tokens = 9_001, 5
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == cost(HELD_BOUND, 100)
    assert (record["cost_micros"], record["estimated"]) == (cost(9_001, 5), False)
    assert tuple(await account_row(pool, account_id)) == (FUNDS - cost(9_001, 5), 0)


async def test_a_balance_short_of_the_bound_gets_the_counted_hold_in_full(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    balance = counted_hold(100)
    assert cost(HELD_BOUND, 100) > balance
    _, secret = await make_customer(pool, balance_micros=balance)
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == balance


async def test_a_balance_between_the_bounds_minimum_and_its_hold_is_counted_not_reduced(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    """The bound must be all or nothing: a balance that affords the bound only with a smaller max_tokens gets the
    counted hold in full, never a reduction the count would not make."""
    balance = cost(HELD_BOUND, 50)
    assert cost(HELD_BOUND, 16) < balance < cost(HELD_BOUND, 100) and counted_hold(100) < balance
    _, secret = await make_customer(pool, balance_micros=balance)
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == counted_hold(100)


async def test_a_balance_of_exactly_the_bound_hold_is_held_on_the_bound_and_dry_run_says_so(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    balance = cost(HELD_BOUND, 100)
    _, secret = await make_customer(pool, balance_micros=balance)
    dry = await (await call(chat_client, secret, url="/v1/chat/completions?dryRun=true")).json()
    assert (dry["total_cost_micros"], dry["sufficient_balance"]) == (balance, True)
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == balance


async def test_a_key_limit_short_of_the_bound_gets_the_counted_hold_in_full(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    account_id = await make_account(pool, balance_micros=FUNDS)
    row, secret = await keys.create_key(pool, account_id=account_id, name="limited")
    await limits.set_key_limits(pool, row["id"], {"limit_micros": counted_hold(100), "limit_reset": "daily"})
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == counted_hold(100)


async def test_a_balance_short_of_the_counted_hold_gets_the_counted_max_tokens(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    prompt = HELD_COUNT
    balance = cost(prompt, 0) + 60 * 3  # the counted prompt and 60 output tokens at 3 micros each
    _, secret = await make_customer(pool, balance_micros=balance)
    resp = await call(chat_client, secret)
    assert resp.status == 200
    # The most output whose exact cost, beside the counted prompt's, fits in the balance.
    affordable = math.floor((balance * 1_000_000 - prompt * PRICES.input) / PRICES.output)
    assert resp.headers["X-Max-Tokens-Reduced-To"] == str(affordable)
    assert openrouter.bodies[0]["max_tokens"] == affordable


async def test_a_balance_short_of_the_counted_minimum_is_402_naming_the_counted_minimum(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    _, secret = await make_customer(pool, balance_micros=1_000)
    resp = await call(chat_client, secret)
    assert resp.status == 402
    error = (await resp.json())["error"]
    assert (error["required_micros"], error["available_micros"]) == (counted_hold(16), 1_000)
    assert openrouter.calls["chat"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_missing_usage_charges_the_counted_prompt_not_the_bound(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.usage = "absent"
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await call(chat_client, secret)
    assert resp.status == 200
    charge = cost(tokens.count_prompt_sync(BIG), tokens.count_text(CONTENT_PIECE * 5))
    assert (await resp.json())["usage"]["cost_micros"] == charge
    record = await request_record(pool, resp.headers["X-Request-Id"])
    assert (record["hold_micros"], record["cost_micros"], record["estimated"]) == (
        cost(HELD_BOUND, 100), charge, True)


async def test_a_stream_without_usage_charges_the_counted_prompt_not_the_bound(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    openrouter.usage = "absent"
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    resp = await call(chat_client, secret, stream=True)
    assert resp.status == 200
    await resp.read()
    [hold] = await settled(pool, account_id)
    charge = cost(tokens.count_prompt_sync(BIG), tokens.count_text(CONTENT_PIECE * 5))
    assert (hold["amount_micros"], hold["actual_micros"]) == (cost(HELD_BOUND, 100), charge)


async def test_prompts_up_to_256_characters_are_counted_and_longer_ones_bounded(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    for extra, rule in ((0, "counted"), (1, "bounded")):
        # The counted text is "user" and the content joined by a newline: 256 characters, then 257.
        messages = [{"role": "user", "content": "word " * 50 + "x" * (1 + extra)}]
        assert len(tokens.Prompt.of(messages).text) == 256 + extra
        resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                      json={"model": MODEL, "messages": messages, "max_tokens": 10})
        assert resp.status == 200
        held = held_prompt(messages, bound=rule == "bounded")
        assert (await request_record(pool, resp.headers["X-Request-Id"]))["hold_micros"] == cost(held, 10)


async def test_dry_run_is_the_bound_hold_when_the_balance_covers_it(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS)
    dry = await (await call(chat_client, secret, url="/v1/chat/completions?dryRun=true")).json()
    assert dry["total_cost_micros"] == cost(HELD_BOUND, 100)
    assert dry["components"][0]["quantity"] == BOUND
    assert openrouter.calls["chat"] == 0
    record = await held_in_full(chat_client, pool, openrouter, secret)
    assert record["hold_micros"] == dry["total_cost_micros"]


async def test_dry_run_is_the_counted_hold_when_the_balance_or_the_key_limit_is_short_of_the_bound(
    chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    _, short = await make_customer(pool, balance_micros=counted_hold(100))
    account_id = await make_account(pool, balance_micros=FUNDS)
    row, limited = await keys.create_key(pool, account_id=account_id, name="limited")
    await limits.set_key_limits(pool, row["id"], {"limit_micros": counted_hold(100), "limit_reset": None})
    for secret in (short, limited):
        dry = await (await call(chat_client, secret, url="/v1/chat/completions?dryRun=true")).json()
        assert dry["total_cost_micros"] == counted_hold(100)
        assert dry["components"][0]["quantity"] == tokens.count_prompt_sync(BIG)
        record = await held_in_full(chat_client, pool, openrouter, secret)
        assert record["hold_micros"] == dry["total_cost_micros"]


async def test_a_delivered_answer_without_usage_is_charged_even_if_the_handler_is_cancelled_while_counting(
    chat_settings: Settings, pool: asyncpg.Pool, openrouter: FakeUpstream
) -> None:
    """Counting a prompt near the 1 MiB body limit takes tens of milliseconds in a thread, after the upstream has
    answered without usage. The client leaves during that count and the handler is cancelled
    (handler_cancellation): the call was delivered upstream, so it must still be charged, estimated."""
    openrouter.usage = "absent"
    messages = [{"role": "user", "content": CONTENT[:43] * 23_000}]  # ~1,000,000 characters
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    async with running(create_app(chat_settings), handler_cancellation=True) as base, \
            aiohttp.ClientSession() as http:
        pending = asyncio.ensure_future(http.post(f"{base}/v1/chat/completions", headers=auth(secret),
                                                  json={"model": MODEL, "messages": messages, "max_tokens": 100}))
        for _ in range(1_000):
            if openrouter.finished:
                break
            await asyncio.sleep(0.005)
        assert openrouter.finished == 1
        await asyncio.sleep(0.02)  # the gateway has read the answer and is counting the prompt
        pending.cancel()  # the client leaves
        with contextlib.suppress(asyncio.CancelledError):
            await pending
        [hold] = await settled(pool, account_id)
    charge = cost(tokens.count_prompt_sync(messages), tokens.count_text(CONTENT_PIECE * 5))
    assert (hold["state"], hold["actual_micros"]) == ("settled", charge)
    record = await request_record(pool, hold["request_id"])
    assert (record["status"], record["estimated"], record["cost_micros"]) == ("completed", True, charge)
    assert tuple(await account_row(pool, account_id)) == (FUNDS - charge, 0)
