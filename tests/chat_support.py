"""Fixtures and helpers shared by the chat tests: a fake OpenRouter on a real socket, a gateway pointed at
it, the official OpenAI SDK as the client, and reads of the ledger to state outcomes exactly."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import pricing, tokens
from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.fakes.upstream import FakeUpstream

UPSTREAM_KEY_ENV = "METERLINE_TEST_OPENROUTER_KEY"
UPSTREAM_KEY = "sk-or-upstream-secret-0123456789"
MODEL = "google/gemini-3-flash-preview"
# The seed model's prices in config/meterline.toml (micros per million tokens).
PRICES = pricing.TokenPrices(Fraction(500_000), Fraction(3_000_000), Fraction(50_000))


@pytest.fixture
def openrouter() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def openrouter_server(aiohttp_server: Any, openrouter: FakeUpstream) -> TestServer:
    server: TestServer = await aiohttp_server(openrouter.app())
    return server


def point_at(settings: Settings, server: TestServer, **changes: Any) -> Settings:
    """`settings` with the text upstream on the fake OpenRouter (its key in a test variable)."""
    upstreams = dict(settings.upstreams)
    upstreams["openrouter"] = UpstreamSettings(
        base_url=str(server.make_url("/api/v1")), api_key_env=UPSTREAM_KEY_ENV,
        connect_timeout_seconds=2, timeout_seconds=changes.pop("timeout_seconds", 10),
    )
    return settings.model_copy(update={"upstreams": upstreams, **changes})


@pytest.fixture
def chat_settings(settings: Settings, openrouter_server: TestServer, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    return point_at(settings, openrouter_server)


@pytest.fixture
async def chat_client(aiohttp_client: Any, chat_settings: Settings, pool: asyncpg.Pool) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(chat_settings))
    return client


@pytest.fixture
async def sdk_factory(chat_client: TestClient) -> AsyncIterator[Any]:
    """Make OpenAI SDK clients for a key against the gateway; all are closed after the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(secret: str, prefix: str = "/v1") -> openai.AsyncOpenAI:
        sdk = openai.AsyncOpenAI(base_url=str(chat_client.make_url(prefix)), api_key=secret, max_retries=0)
        made.append(sdk)
        return sdk

    yield make
    for sdk in made:
        await sdk.close()


async def account_row(pool: asyncpg.Pool, account_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT credits_posted - debits_posted AS balance, held_micros AS held FROM accounts WHERE id = $1",
        account_id,
    )
    assert row is not None
    return row


async def settled(pool: asyncpg.Pool, account_id: str, *, holds: int = 1) -> list[asyncpg.Record]:
    """Wait until the account has `holds` holds and none pending (a stream settles after its last byte is
    sent), then return them. Waiting is bounded; what is asserted is the ledger's state, not the time."""
    for _ in range(400):
        rows = await pool.fetch("SELECT * FROM holds WHERE account_id = $1 ORDER BY created_at", account_id)
        if len(rows) >= holds and all(r["state"] != "pending" for r in rows):
            return rows
        await asyncio.sleep(0.025)
    raise AssertionError(f"holds of {account_id} did not resolve: {[dict(r) for r in rows]}")


async def request_record(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", request_id)
    assert row is not None, f"no request record for {request_id}"
    return row


def cost(prompt: int, completion: int, cached: int = 0, prices: pricing.TokenPrices = PRICES) -> int:
    """The charge the catalog price implies, computed independently of billing.pricing's code path."""
    exact = (Fraction(prompt - cached) * prices.input + Fraction(cached) * prices.cached
             + Fraction(completion) * prices.output) / 1_000_000
    floor = exact.numerator // exact.denominator
    return floor + (1 if exact - floor >= Fraction(1, 2) else 0)


MESSAGES = [{"role": "user", "content": "Say hello five times."}]


def held_prompt(messages: list[Any], extra: dict[str, Any] | None = None, *, bound: bool = False) -> int:
    """The prompt tokens a hold assumes, by README's rule spelled out here (defaults: safety factor 1.25, 4 tokens
    a message, 32 a request, 400 with tools): the count (or, `bound`, one token per byte) of the messages' text
    plus the JSON of the other forwarded fields, at least that text's bytes over 4, times 1.25, rounded up, plus
    the overheads. The count includes OpenAI's framing, 3 tokens a message and 3 for the reply."""
    text = "\n".join([*(_strings(m) for m in messages), *([json.dumps(extra, separators=(",", ":"),
                                                                          ensure_ascii=False)] if extra else [])])
    framing = 3 * len(messages) + 3
    size = len(text.encode("utf-8", "surrogatepass"))
    counted = size + framing if bound else tokens.count_text(text) + framing
    floor = -(-size // 4) + framing
    tools = bool(extra) and bool(extra.get("tools") or extra.get("functions"))  # type: ignore[union-attr]
    return math.ceil(Decimal(max(counted, floor)) * Decimal("1.25")) + 4 * len(messages) + 32 + (400 if tools else 0)


def _strings(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_strings(v) for v in value)
    if isinstance(value, dict):
        return "\n".join(_strings(v) for k, v in value.items() if k not in ("type", "detail"))
    return "" if value is None or isinstance(value, bool) else str(value)
