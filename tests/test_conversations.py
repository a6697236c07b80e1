"""Stateful chat as lumyx offers it (issue 11): stored conversations, memory, context accounting.

Every call goes through the official OpenAI SDK (lumyx's fields in `extra_body`) against a gateway on real
PostgreSQL; the fake OpenRouter records the body of every request it receives, so what was replayed and recalled
is asserted on what the upstream actually got.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from billing.catalog_config import TextModelConfig
from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import (
    MODEL,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    account_row,
    cost,
    held_prompt,
    settled,
)
from tests.factories import make_customer, make_key
from tests.fakes.upstream import FakeUpstream
from tests.serving import meterline_serve

FUNDS = 10_000_000
CONTEXT = 1_048_576  # the seed model's context length (config/meterline.toml)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def echo(body: dict[str, Any]) -> str:
    return f"you said: {body['messages'][-1]['content']}"


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def ask(sdk: openai.AsyncOpenAI, text: str, **lumyx: Any) -> Any:
    return await sdk.chat.completions.create(model=MODEL, messages=[user(text)], max_tokens=50,
                                             extra_body=lumyx or None)


async def stored_messages(client: TestClient, secret: str, conversation_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/v1/conversations/{conversation_id}", headers=auth(secret))
    assert resp.status == 200, await resp.text()
    return [{"role": m["role"], "content": m["content"]} for m in (await resp.json())["messages"]]


def system_texts(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "system"]


async def test_a_conversation_continues_across_two_gateway_processes(
        pool: asyncpg.Pool, database_url: str, openrouter: FakeUpstream, openrouter_server: TestServer) -> None:
    openrouter.reply = echo
    _, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    env = {"METERLINE_DATABASE_URL": database_url, "METERLINE_REMOTE_CATALOG": "false",
           "METERLINE_UPSTREAMS__OPENROUTER__BASE_URL": str(openrouter_server.make_url("/api/v1")),
           "METERLINE_UPSTREAMS__OPENROUTER__API_KEY_ENV": UPSTREAM_KEY_ENV, UPSTREAM_KEY_ENV: UPSTREAM_KEY}
    async with meterline_serve(env) as (one, _), meterline_serve(env) as (two, _):
        first_gateway = openai.AsyncOpenAI(base_url=f"{one}/v1", api_key=secret, max_retries=0)
        second_gateway = openai.AsyncOpenAI(base_url=f"{two}/v1", api_key=secret, max_retries=0)
        first = await ask(first_gateway, "my name is Ada")
        conversation = first.conversation_id  # type: ignore[attr-defined]
        assert uuid.UUID(conversation).version == 4
        second = await ask(second_gateway, "what is my name?", conversation_id=conversation)
        third = await ask(first_gateway, "thanks", conversation_id=conversation)
        async with aiohttp.ClientSession() as http, \
                http.get(f"{two}/v1/conversations/{conversation}", headers=auth(secret)) as resp:
            stored = await resp.json()
        await first_gateway.close()
        await second_gateway.close()
    assert second.conversation_id == third.conversation_id == conversation  # type: ignore[attr-defined]
    asked = [user("my name is Ada"), assistant("you said: my name is Ada"),
             user("what is my name?"), assistant("you said: what is my name?"), user("thanks")]
    assert openrouter.bodies[2]["messages"] == asked
    assert "conversation_id" not in openrouter.bodies[2] and "memory" not in openrouter.bodies[2]
    assert [{"role": m["role"], "content": m["content"]} for m in stored["messages"]] == [
        *asked, assistant("you said: thanks")]
    assert [m["seq"] for m in stored["messages"]] == list(range(6))
    assert (stored["turns"], stored["exchanges"]) == (6, 3)


async def test_a_key_without_detailed_logging_may_not_name_a_conversation_or_ask_for_memory(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS)
    sdk = sdk_factory(secret)
    for field, value in (("conversation_id", str(uuid.uuid4())), ("memory", True)):
        with pytest.raises(openai.BadRequestError) as refused:
            await ask(sdk, "hello", **{field: value})
        assert refused.value.status_code == 400
        assert refused.value.body["param"] == field  # type: ignore[index]
        assert "detailed_logging" in refused.value.message
    answer = await ask(sdk, "hello", memory=False)
    assert answer.context_total == CONTEXT  # type: ignore[attr-defined]
    assert answer.context_left == CONTEXT - 12 - 5  # type: ignore[attr-defined]
    assert getattr(answer, "conversation_id", None) is None
    assert openrouter.calls["chat"] == 1 and "memory" not in openrouter.bodies[0]
    for table in ("conversations", "conversation_turns", "memories"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert (await account_row(pool, account_id))["held"] == 0


async def test_a_bad_conversation_id_or_memory_flag_is_a_400_naming_it(chat_client: TestClient,
                                                                       pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    for field, value, says in (("conversation_id", "not-a-uuid", "UUID"), ("conversation_id", 7, "UUID"),
                               ("memory", "yes", "boolean")):
        resp = await chat_client.post("/v1/chat/completions", headers=auth(secret),
                                      json={"model": MODEL, "messages": [user("hi")], field: value})
        error = (await resp.json())["error"]
        assert (resp.status, error["param"]) == (400, field) and says in error["message"]


async def test_another_accounts_or_another_keys_conversation_is_404_and_its_memories_are_never_recalled(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    account_id, owner = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sibling = await make_key(pool, account_id, detailed_logging=True)  # same account, another key
    _, stranger = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    planted = await ask(sdk_factory(owner), "My cat is called Marmalade.", memory=True)
    conversation = planted.conversation_id  # type: ignore[attr-defined]
    for secret in (sibling, stranger):
        with pytest.raises(openai.NotFoundError) as missing:
            await ask(sdk_factory(secret), "go on", conversation_id=conversation)
        assert missing.value.body["code"] == "CONVERSATION_NOT_FOUND"  # type: ignore[index]
        for method in ("GET", "DELETE"):
            resp = await chat_client.request(method, f"/v1/conversations/{conversation}", headers=auth(secret))
            assert resp.status == 404
        answer = await ask(sdk_factory(secret), "What is my cat called?", memory=True)
        assert answer.memories_recalled == 0  # type: ignore[attr-defined]
        assert not any("Marmalade" in text for text in system_texts(openrouter.bodies[-1]))
        listed = await (await chat_client.get("/v1/memories", headers=auth(secret))).json()
        assert all("Marmalade" not in memory["content"] for memory in listed["data"])
    mine = await ask(sdk_factory(owner), "What is my cat called?", memory=True)
    assert mine.memories_recalled == 1  # type: ignore[attr-defined]
    assert any("Marmalade" in text for text in system_texts(openrouter.bodies[-1]))
    assert await stored_messages(chat_client, owner, conversation) == [
        user("My cat is called Marmalade."), assistant("hello " * 5)]


async def test_memory_recalls_planted_facts_when_relevant_never_when_unrelated_or_off_and_never_after_delete(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    _, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sdk = sdk_factory(secret)
    await ask(sdk, "Remember that my dog is called Biscuit.", memory=True)
    await ask(sdk, "Our project code word is Tangerine.", memory=True)
    await ask(sdk, "My dog Biscuit hates the vacuum cleaner.")  # memory off: stored, but never learned

    async def recalled(question: str, **lumyx: Any) -> list[str]:
        await ask(sdk, question, **lumyx)
        return system_texts(openrouter.bodies[-1])

    dog = await recalled("What is my dog's name?", memory=True)
    assert len(dog) == 1 and "Biscuit" in dog[0] and "Tangerine" not in dog[0] and "vacuum" not in dog[0]
    assert openrouter.bodies[-1]["messages"][-1] == user("What is my dog's name?")
    code = await recalled("Remind me of the project code word.", memory=True)
    assert len(code) == 1 and "Tangerine" in code[0] and "Biscuit" not in code[0]
    assert await recalled("How do I reverse a list in Python?", memory=True) == []
    assert await recalled("What is my dog's name?") == []  # memory absent: nothing injected
    assert await recalled("What is my dog's name?", memory=False) == []

    memories = (await (await chat_client.get("/v1/memories", headers=auth(secret))).json())["data"]
    biscuit = [m for m in memories if "Biscuit" in m["content"]]
    assert len(biscuit) == 1
    resp = await chat_client.delete(f"/v1/memories/{biscuit[0]['id']}", headers=auth(secret))
    assert (resp.status, (await resp.json())["deleted"]) == (200, True)
    assert (await chat_client.delete(f"/v1/memories/{biscuit[0]['id']}", headers=auth(secret))).status == 404
    assert all("Biscuit" not in text for text in await recalled("What is my dog's name?", memory=True))

    # Deleting the conversation a memory came from forgets it too, at once.
    tangerine = next(m for m in memories if "Tangerine" in m["content"])
    resp = await chat_client.delete(f"/v1/conversations/{tangerine['conversation_id']}", headers=auth(secret))
    assert resp.status == 200
    assert all("Tangerine" not in text for text in await recalled("Remind me of the project code word.",
                                                                   memory=True))
    assert await pool.fetchval("SELECT count(*) FROM conversation_turns WHERE conversation_id = $1",
                               uuid.UUID(tangerine["conversation_id"])) == 0

    # DELETE /v1/memories forgets every one of the key's memories.
    remaining = (await (await chat_client.get("/v1/memories", headers=auth(secret))).json())["data"]
    assert remaining  # the calls above with memory on were learned
    resp = await chat_client.delete("/v1/memories", headers=auth(secret))
    assert (await resp.json())["deleted"] == len(remaining)
    assert (await (await chat_client.get("/v1/memories", headers=auth(secret))).json())["data"] == []


async def test_the_charge_is_the_usage_of_the_call_that_carried_history_and_memory_and_dry_run_adds_up(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sdk = sdk_factory(secret)
    await ask(sdk, "My favourite colour is teal.", memory=True)
    first = await ask(sdk, "I live in Lisbon.")
    conversation = first.conversation_id  # type: ignore[attr-defined]
    body = {"model": MODEL, "messages": [user("Which colour do I like, and where do I live?")], "max_tokens": 50,
            "conversation_id": conversation, "memory": True}

    resp = await chat_client.post("/v1/chat/completions?dryRun=true", headers=auth(secret), json=body)
    estimate = await resp.json()
    lines = {line["type"]: line for line in estimate["components"]}
    assert list(lines) == ["input", "history", "memory", "output"]
    assert sum(line["total_cost_micros"] for line in lines.values()) == estimate["total_cost_micros"]
    assert lines["history"]["quantity"] > 0 and lines["memory"]["quantity"] > 0

    openrouter.prompt_tokens, openrouter.completion_tokens = 1_234, 56
    balance_before = (await account_row(pool, account_id))["balance"]
    resp = await chat_client.post("/v1/chat/completions", headers=auth(secret), json=body)
    answer = await resp.json()
    sent = openrouter.bodies[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert "teal" in sent[0]["content"] and sent[1] == user("I live in Lisbon.")
    hold = await pool.fetchrow("SELECT amount_micros, actual_micros FROM holds WHERE request_id = $1",
                               resp.headers["X-Request-Id"])
    # The hold is the dry run's total, taken on exactly what reached the upstream (a prompt this long is held on
    # its byte bound when the balance covers that).
    assert hold["amount_micros"] == estimate["total_cost_micros"] == cost(held_prompt(sent, bound=True), 50)
    assert hold["actual_micros"] == cost(1_234, 56) == answer["usage"]["cost_micros"]
    assert (await account_row(pool, account_id))["balance"] == balance_before - cost(1_234, 56)
    assert (answer["context_total"], answer["context_left"]) == (CONTEXT, CONTEXT - 1_234 - 56)
    assert (answer["conversation_id"], answer["history_turns"], answer["history_dropped"],
            answer["memories_recalled"]) == (conversation, 2, 0, 1)


async def test_a_failed_or_refused_call_stores_nothing(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sdk = sdk_factory(secret)
    conversation = (await ask(sdk, "first")).conversation_id  # type: ignore[attr-defined]
    openrouter.status = 500
    with pytest.raises(openai.APIStatusError):
        await ask(sdk, "second", conversation_id=conversation, memory=True)
    with pytest.raises(openai.APIStatusError):
        await ask(sdk, "a new conversation")
    await settled(pool, account_id, holds=3)
    assert await stored_messages(chat_client, secret, conversation) == [user("first"), assistant("hello " * 5)]
    assert await pool.fetchval("SELECT count(*) FROM conversations") == 1
    assert await pool.fetchval("SELECT count(*) FROM memories") == 0


async def test_ten_concurrent_calls_on_one_conversation_store_ten_exchanges(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any) -> None:
    openrouter.reply, openrouter.delay = echo, 0.05
    _, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sdk = sdk_factory(secret)
    conversation = (await ask(sdk, "start")).conversation_id  # type: ignore[attr-defined]
    await asyncio.gather(*(ask(sdk, f"message {i}", conversation_id=conversation) for i in range(10)))
    stored = await stored_messages(chat_client, secret, conversation)
    assert len(stored) == 22
    pairs = [(stored[i], stored[i + 1]) for i in range(2, 22, 2)]
    assert sorted(question["content"] for question, _ in pairs) == sorted(f"message {i}" for i in range(10))
    assert all(answer == assistant(f"you said: {question['content']}") for question, answer in pairs)
    rows = await pool.fetch("SELECT seq, request_id FROM conversation_turns WHERE conversation_id = $1 ORDER BY seq",
                            uuid.UUID(conversation))
    assert [r["seq"] for r in rows] == list(range(22))
    assert len({r["request_id"] for r in rows}) == 11


@pytest.fixture
def tiny_settings(chat_settings: Settings) -> Settings:
    """A local model with a 700-token context and 100 tokens of output."""
    tiny = TextModelConfig(input_per_mtok_micros=1_000_000, output_per_mtok_micros=2_000_000, context_length=700,
                           max_output_tokens=100)
    return chat_settings.model_copy(update={"models": {**chat_settings.models, "acme/tiny": tiny}})


async def test_history_beyond_the_context_drops_the_oldest_turns_keeps_instructions_and_the_hold_covers_it(
        aiohttp_client: Any, tiny_settings: Settings, pool: asyncpg.Pool, openrouter: FakeUpstream) -> None:
    client: TestClient = await aiohttp_client(create_app(tiny_settings))
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    openrouter.reply = echo
    sentence = "The quick brown fox jumps over the lazy dog near the river bank today. "
    conversation = None
    for turn in range(8):
        messages = [user(f"turn {turn}: {sentence * 2}")]
        if turn == 0:
            messages.insert(0, {"role": "system", "content": "You are terse."})
        body: dict[str, Any] = {"model": "acme/tiny", "messages": messages, "max_tokens": 100}
        if conversation is not None:
            body["conversation_id"] = conversation
        resp = await client.post("/v1/chat/completions", headers=auth(secret), json=body)
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
        conversation = answer["conversation_id"]
    sent = openrouter.bodies[-1]["messages"]
    stored = await stored_messages(client, secret, conversation or "")
    assert sent[0] == {"role": "system", "content": "You are terse."}  # instructions are never dropped
    assert sent[-1]["content"].startswith("turn 7:")
    kept = len(sent) - 2  # replayed dialogue turns
    dialogue = [m for m in stored if m["role"] != "system"][:-2]  # without the last exchange, stored after
    assert 0 < kept < len(dialogue)
    assert sent[1:-1] == dialogue[len(dialogue) - kept:]  # the newest turns, in order: the oldest went first
    assert answer["history_dropped"] == len(dialogue) - kept
    assert answer["history_turns"] == kept + 1
    assert held_prompt(sent) + 100 <= 700  # what was sent fits the model, as the hold counts it
    hold = await pool.fetchval("SELECT amount_micros FROM holds WHERE request_id = $1", resp.headers["X-Request-Id"])
    tiny = pricing_of(1_000_000, 2_000_000)
    assert hold == cost(held_prompt(sent, bound=True), 100, prices=tiny)  # long: held on its byte bound
    await settled(pool, account_id, holds=8)


def pricing_of(input_micros: int, output_micros: int) -> Any:
    from fractions import Fraction

    from billing.pricing import TokenPrices

    return TokenPrices(Fraction(input_micros), Fraction(output_micros))


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_streamed_answer_is_stored_as_delivered_and_its_last_chunk_carries_the_context(
        chat_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, sdk_factory: Any,
        include_usage: bool) -> None:
    openrouter.reply = echo
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    sdk = sdk_factory(secret)
    conversation = (await ask(sdk, "first")).conversation_id  # type: ignore[attr-defined]
    stream = await sdk.chat.completions.create(
        model=MODEL, messages=[user("tell me more")], max_tokens=50, stream=True,
        stream_options={"include_usage": True} if include_usage else None,
        extra_body={"conversation_id": conversation})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "you said: tell me more"
    last = chunks[-1]
    assert (last.context_total, last.context_left) == (CONTEXT, CONTEXT - 12 - 5)  # type: ignore[attr-defined]
    assert last.conversation_id == conversation  # type: ignore[attr-defined]
    assert all(getattr(c, "conversation_id", None) is None for c in chunks[:-1])
    if include_usage:
        assert last.choices == [] and last.usage is not None
    else:
        assert last.choices[0].finish_reason == "stop"
    await settled(pool, account_id, holds=2)
    assert await stored_messages(chat_client, secret, conversation) == [
        user("first"), assistant("you said: first"), user("tell me more"), assistant("you said: tell me more")]


async def test_conversations_are_listed_newest_first_in_pages_and_admins_see_and_delete_them(
        chat_client: TestClient, pool: asyncpg.Pool, sdk_factory: Any) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    made = [(await ask(sdk_factory(secret), f"topic {i}")).conversation_id for i in range(5)]  # type: ignore[attr-defined]
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await chat_client.get(f"/v1/conversations{query}", headers=auth(secret))).json()
        seen += [c["id"] for c in page["data"]]
        cursor = page["next_cursor"]
        assert page["has_more"] == (cursor is not None)
        if cursor is None:
            break
    assert seen == made[::-1]
    admin = {"Authorization": "Bearer test-admin-token-0123456789"}
    listed = await (await chat_client.get(f"/admin/conversations?account_id={account_id}", headers=admin)).json()
    assert [c["id"] for c in listed["data"]] == made[::-1]
    one = await (await chat_client.get(f"/admin/conversations/{made[0]}", headers=admin)).json()
    assert [m["content"] for m in one["messages"]] == ["topic 0", "hello " * 5]
    assert (await chat_client.delete(f"/admin/conversations/{made[0]}", headers=admin)).status == 200
    assert (await chat_client.get(f"/v1/conversations/{made[0]}", headers=auth(secret))).status == 404
    resp = await chat_client.get("/v1/conversations?cursor=bogus", headers=auth(secret))
    assert (resp.status, (await resp.json())["error"]["param"]) == (400, "cursor")


async def test_detailed_logging_is_set_by_admins_and_reaches_the_gateway_at_once(
        chat_client: TestClient, pool: asyncpg.Pool, sdk_factory: Any) -> None:
    account_id, _ = await make_customer(pool, balance_micros=FUNDS)
    admin = {"Authorization": "Bearer test-admin-token-0123456789"}
    resp = await chat_client.post(f"/admin/accounts/{account_id}/keys", headers=admin,
                                  json={"name": "logged", "detailed_logging": True})
    created = await resp.json()
    assert (resp.status, created["detailed_logging"]) == (201, True)
    sdk = sdk_factory(created["key"])
    assert (await ask(sdk, "hello")).conversation_id is not None  # type: ignore[attr-defined]
    resp = await chat_client.patch(f"/admin/keys/{created['id']}", headers=admin, json={"detailed_logging": False})
    assert (await resp.json())["detailed_logging"] is False
    answer = await ask(sdk, "hello again")
    assert getattr(answer, "conversation_id", None) is None
    assert await pool.fetchval("SELECT count(*) FROM conversation_turns") == 2
    resp = await chat_client.patch(f"/admin/keys/{created['id']}", headers=admin, json={"detailed_logging": "yes"})
    assert resp.status == 400


async def test_conversations_idle_past_the_retention_are_purged_with_their_memories(
        chat_client: TestClient, pool: asyncpg.Pool, sdk_factory: Any) -> None:
    from billing import conversation_store

    _, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    old = (await ask(sdk_factory(secret), "old news", memory=True)).conversation_id  # type: ignore[attr-defined]
    fresh = (await ask(sdk_factory(secret), "fresh news", memory=True)).conversation_id  # type: ignore[attr-defined]
    await pool.execute("UPDATE conversations SET updated_at = now() - interval '91 days' WHERE id = $1",
                       uuid.UUID(old))
    assert await conversation_store.purge(pool, retention_days=90) == 1
    assert [str(r["id"]) for r in await pool.fetch("SELECT id FROM conversations")] == [fresh]
    assert [str(r["conversation_id"]) for r in await pool.fetch("SELECT conversation_id FROM memories")] == [fresh]


async def test_an_exchange_postgresql_refuses_to_store_never_costs_the_charge(
        chat_client: TestClient, pool: asyncpg.Pool, sdk_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    account_id, secret = await make_customer(pool, balance_micros=FUNDS, detailed_logging=True)
    await pool.execute("""
        CREATE FUNCTION test_refuse_turns() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'turns refused for this test'; END $$;
        CREATE TRIGGER test_refuse_turns BEFORE INSERT ON conversation_turns
            FOR EACH ROW EXECUTE FUNCTION test_refuse_turns();""")
    try:
        answer = await ask(sdk_factory(secret), "store me", memory=True)
    finally:
        await pool.execute("DROP TRIGGER test_refuse_turns ON conversation_turns; DROP FUNCTION test_refuse_turns()")
    assert answer.usage.cost_micros == cost(12, 5)  # type: ignore[attr-defined]
    assert (await account_row(pool, account_id))["balance"] == FUNDS - cost(12, 5)
    for table in ("conversations", "conversation_turns", "memories"):  # all of the exchange, or none of it
        assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert "charged without it" in caplog.text


async def test_a_memory_language_postgresql_does_not_have_stops_the_start_naming_the_setting(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool) -> None:
    from gateway.settings import SettingsError

    runner = web.AppRunner(create_app(settings.model_copy(update={"memory_language": "klingon"})))
    try:
        with pytest.raises(SettingsError, match="invalid setting memory_language: 'klingon'"):
            await runner.setup()
    finally:
        await runner.cleanup()
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(update={"memory_language": "simple"})))
    assert (await client.get("/readyz")).status == 200
