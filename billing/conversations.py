"""Stored conversations and memory (lumyx's Detailed Logging): what a call replays and recalls, and what it stores
once it has been charged.

A key with `detailed_logging` on stores every chat completion as an exchange of a conversation: the messages the
client sent and the answer (choice 0) it got. A call that names a `conversation_id` gets the stored turns replayed
before its own messages; one that asks for `memory` gets the most relevant exchanges of the key's other
conversations recalled into one system message. Both are prompt like any other: the hold counts them and the
upstream's usage charges them.

Replay (README, "Conversations"), in the order the upstream receives it:

    instructions   the new messages' system/developer messages if there are any, else the stored ones
    memory         one system message with the recalled exchanges (only with `memory: true`)
    dialogue       the stored non-system turns, then the new non-system messages

When the model publishes a context length, the oldest stored exchanges are dropped until the prompt, as the hold
counts it, plus the output allowance fits in it (instructions and the new messages are never dropped; a tool
result left without its call is dropped with it). The response says how many stored messages were left out.

Storage happens in the settlement's own transaction (`Conversing`), so an exchange is stored if and only if its
call was charged: a call that failed or was voided stores nothing, and a retried settlement cannot store twice.

Recall (README, "Memory"): each exchange made with `memory: true` is learned as one memory, the user's words and
the answer, each cut at MEMORY_PART_CHARS, indexed with PostgreSQL's full-text search in `memory_language`. A call
recalls the key's memories that share a word (stemmed, stop words left out) with its new user messages, ranked by
ts_rank_cd normalised by length, newest first among equals, leaving out its own conversation, and keeps them in
that order while they fit `memory_budget_tokens` (at most `memory_max_items`). Nothing of another key or account is
ever read.

Reading, deleting and purging what is stored is billing.conversation_store's.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import asyncpg

from billing import ledger, pricing, tokens
from billing.db import Executor
from billing.errors import BillingError
from billing.holds import Batched, Hold
from billing.ledger import Reservation, Resolution
from billing.pricing import Component, Estimate, TokenPrices
from billing.text import BYTES_PER_TOKEN_FLOOR, HoldRules

log = logging.getLogger("meterline.conversations")

INSTRUCTION_ROLES = frozenset({"system", "developer"})
# A memory keeps the user's words and the answer, each cut at this many characters.
MEMORY_PART_CHARS = 1_500
# What a stored message keeps (reasoning is kept for reading back, never replayed).
_STORED_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "reasoning")
_REPLAYED_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
# Outcomes whose exchange is stored: a completed call, and a stream whose client left (stored as delivered).
_STORED_STATUSES = frozenset({"completed", "cancelled"})
_MEMORY_HEADER = ("Memory: exchanges recalled from this user's earlier conversations, most relevant first. "
                  "They may be out of date; use them only where they help.")


class ConversationNotFound(BillingError):
    """No conversation with this id belongs to the calling key."""


@dataclass(frozen=True, slots=True)
class MemoryRules:
    language: str  # a PostgreSQL text search configuration ("english", "simple", ...)
    budget_tokens: int
    max_items: int


@dataclass(frozen=True, slots=True)
class Turn:
    seq: int
    request_id: str
    role: str
    message: dict[str, Any]
    tokens: int


@dataclass(frozen=True, slots=True)
class Recalled:
    id: uuid.UUID
    conversation_id: uuid.UUID
    content: str
    tokens: int


def replayed(message: dict[str, Any]) -> dict[str, Any]:
    """A stored message as it is sent upstream again."""
    return {name: message[name] for name in _REPLAYED_FIELDS if message.get(name) is not None}


def stored(message: dict[str, Any]) -> dict[str, Any]:
    return {name: message[name] for name in _STORED_FIELDS if message.get(name) is not None}


def _is_instruction(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in INSTRUCTION_ROLES


def weight(prompt: tokens.Prompt, counted: int) -> int:
    """The most a hold counts this text as before padding: its count or its bytes over four, plus framing."""
    floor = -(-prompt.text_bytes() // BYTES_PER_TOKEN_FLOOR) + prompt.framing + prompt.images * tokens.IMAGE_PART_TOKENS
    return max(counted, floor)


async def message_weight(message: dict[str, Any]) -> int:
    """A stored turn's `tokens`: its weight as a prompt of one message (framing included)."""
    prompt = tokens.Prompt.of([message])
    return weight(prompt, await prompt.count())


def user_text(messages: list[Any]) -> str:
    """The words of the user messages among `messages` (what recall searches with, and what a memory keeps)."""
    texts: list[str] = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts.extend(part["text"] for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
    return "\n".join(texts)


def _cut(text: str) -> str:
    return text if len(text) <= MEMORY_PART_CHARS else text[:MEMORY_PART_CHARS] + "…"


def memory_content(new_messages: list[Any], answer: dict[str, Any]) -> str:
    content = answer.get("content")
    return f"User: {_cut(user_text(new_messages))}\nAssistant: {_cut(content if isinstance(content, str) else '')}"


def memory_message(memories: list[Recalled]) -> dict[str, Any]:
    items = "\n\n".join(f"- {m.content}" for m in memories)
    return {"role": "system", "content": f"{_MEMORY_HEADER}\n\n{items}"}


@dataclass(slots=True)
class Context:
    """What one call replays and recalls, and where its exchange is stored."""

    conversation_id: uuid.UUID
    new: bool  # the conversation is created by this call
    learn: bool  # memory: true, so the exchange becomes a memory
    history: list[dict[str, Any]] = field(default_factory=list)  # replayed stored messages, kept
    instructions: list[dict[str, Any]] = field(default_factory=list)  # stored system messages replayed
    dropped: int = 0  # stored messages left out to fit the context
    memories: list[Recalled] = field(default_factory=list)

    @property
    def memory(self) -> dict[str, Any] | None:
        return memory_message(self.memories) if self.memories else None

    def messages(self, new_messages: list[Any]) -> list[Any]:
        """The messages sent upstream (module docstring: instructions, memory, dialogue)."""
        memory = [self.memory] if self.memories else []
        if not self.history and not self.instructions:
            lead = 0
            while lead < len(new_messages) and _is_instruction(new_messages[lead]):
                lead += 1
            return [*new_messages[:lead], *memory, *new_messages[lead:]]
        new_instructions = [m for m in new_messages if _is_instruction(m)]
        dialogue = [m for m in new_messages if not _is_instruction(m)]
        return [*(new_instructions or self.instructions), *memory, *self.history, *dialogue]

    def replayed_messages(self) -> list[dict[str, Any]]:
        return [*self.instructions, *self.history]

    def fields(self) -> dict[str, Any]:
        """What the answer says about the conversation."""
        return {"conversation_id": str(self.conversation_id), "history_turns": len(self.replayed_messages()),
                "history_dropped": self.dropped, "memories_recalled": len(self.memories)}


def parse_id(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def load_turns(conn: Executor, *, conversation_id: uuid.UUID, account_id: str, key_id: str) -> list[Turn]:
    """The stored turns of a conversation of this key, in order; ConversationNotFound when it is not one."""
    rows = await conn.fetch(
        """SELECT c.id AS found, t.seq, t.request_id, t.role, t.message, t.tokens
             FROM conversations c LEFT JOIN conversation_turns t ON t.conversation_id = c.id
            WHERE c.id = $1 AND c.account_id = $2 AND c.key_id = $3
            ORDER BY t.seq""",
        conversation_id, account_id, key_id)
    if not rows:
        raise ConversationNotFound(str(conversation_id))
    return [Turn(r["seq"], r["request_id"], r["role"], r["message"], r["tokens"]) for r in rows if r["seq"] is not None]


async def recall(conn: Executor, *, account_id: str, key_id: str, exclude: uuid.UUID | None, text: str,
                 rules: MemoryRules) -> list[Recalled]:
    """The key's memories relevant to `text`, best first, within the token budget and item count."""
    if not text.strip() or rules.budget_tokens <= 0 or rules.max_items <= 0:
        return []
    rows = await conn.fetch("SELECT * FROM meterline_recall($1, $2, $3, $4::regconfig, $5, $6)",
                            account_id, key_id, exclude, rules.language, text, rules.max_items * 4)
    kept: list[Recalled] = []
    spent = 0
    for row in rows:
        if spent + row["tokens"] > rules.budget_tokens:
            continue
        kept.append(Recalled(row["id"], row["conversation_id"], row["content"], row["tokens"]))
        spent += row["tokens"]
        if len(kept) == rules.max_items:
            break
    return kept


def _held(total_weight: int, messages: int, tools: bool, rules: HoldRules) -> int:
    """billing.text.held_prompt_tokens on a weight that is at least the prompt's own (per-message slack for the
    newlines that join them)."""
    padded = pricing.padded_prompt_tokens(total_weight + messages, rules.safety_factor)
    return (padded + rules.overhead_per_message * messages + rules.overhead_per_request
            + (rules.overhead_with_tools if tools else 0))


async def prepare(conn: Executor, *, account_id: str, key_id: str, conversation_id: uuid.UUID | None, memory: bool,
                  new_messages: list[Any], forwarded: dict[str, Any] | None, context_length: int | None,
                  output_allowance: int, rules: HoldRules, memory_rules: MemoryRules) -> Context:
    """Load, recall and trim for one call (module docstring). Raises ConversationNotFound."""
    context = Context(conversation_id=conversation_id or uuid.uuid4(), new=conversation_id is None, learn=memory)
    turns: list[Turn] = []
    if conversation_id is not None:
        turns = await load_turns(conn, conversation_id=conversation_id, account_id=account_id, key_id=key_id)
    if memory:
        context.memories = await recall(conn, account_id=account_id, key_id=key_id, exclude=conversation_id,
                                        text=user_text(new_messages), rules=memory_rules)
    if not turns:
        return context
    own_instructions = any(_is_instruction(m) for m in new_messages)
    instructions = [] if own_instructions else [t for t in turns if t.role in INSTRUCTION_ROLES]
    dialogue = [t for t in turns if t.role not in INSTRUCTION_ROLES]
    start = 0
    if context_length is not None:
        start = await _first_kept(dialogue, instructions, context, new_messages, forwarded,
                                  room=context_length - output_allowance, rules=rules)
    context.instructions = [replayed(t.message) for t in instructions]
    context.history = [replayed(t.message) for t in dialogue[start:]]
    context.dropped = start
    return context


async def _first_kept(dialogue: list[Turn], instructions: list[Turn], context: Context, new_messages: list[Any],
                      forwarded: dict[str, Any] | None, *, room: int, rules: HoldRules) -> int:
    """The index of the oldest stored dialogue turn that is replayed: whole exchanges are dropped, oldest first,
    until the held prompt fits `room`, and a tool result whose call was dropped goes too."""
    new_prompt = tokens.Prompt.of(new_messages, forwarded)
    fixed = weight(new_prompt, await new_prompt.count()) + sum(t.tokens for t in instructions)
    messages = len(new_messages) + len(instructions)
    memory = context.memory
    if memory is not None:
        fixed += await message_weight(memory)
        messages += 1
    kept = sum(t.tokens for t in dialogue)
    start = 0
    while start < len(dialogue) and _held(fixed + kept, messages + len(dialogue) - start,
                                          new_prompt.tools, rules) > room:
        exchange = dialogue[start].request_id
        while start < len(dialogue) and dialogue[start].request_id == exchange:
            kept -= dialogue[start].tokens
            start += 1
    while start < len(dialogue) and dialogue[start].role == "tool":
        kept -= dialogue[start].tokens
        start += 1
    return start


def itemised(estimate: Estimate, prices: TokenPrices, *, safety_factor: Decimal, history_tokens: int,
             memory_tokens: int) -> Estimate:
    """A chat estimate with its replayed history and recalled memory as their own input lines (`history`,
    `memory`), each priced on its count padded like the prompt; the `input` line keeps the rest of the prompt's
    cost, so the lines still add up to exactly the hold."""
    if not history_tokens and not memory_tokens:
        return estimate
    input_line, *rest = estimate.components
    lines: list[Component] = []
    left_tokens, left_cost = input_line.billable_quantity, input_line.total_cost_micros
    for name, counted in (("history", history_tokens), ("memory", memory_tokens)):
        if not counted:
            continue
        billable = min(pricing.padded_prompt_tokens(counted, safety_factor), left_tokens)
        cost = min(pricing.cost_micros(prices, pricing.Usage(prompt_tokens=billable, completion_tokens=0)),
                   left_cost)
        lines.append(Component(name, "token", counted, billable, input_line.unit_price_micros, cost))
        left_tokens -= billable
        left_cost -= cost
    own = Component("input", "token", max(input_line.quantity - history_tokens - memory_tokens, 0), left_tokens,
                    input_line.unit_price_micros, left_cost)
    return Estimate(estimate.total_micros, (own, *lines, *rest))


async def counted(messages: list[dict[str, Any]]) -> int:
    """The tiktoken count of messages as part of a prompt (their text and framing, without the reply priming)."""
    if not messages:
        return 0
    return await tokens.Prompt.of(messages).count() - tokens.REPLY_PRIMING


class Conversing:
    """The hold steps of a call on a key with detailed logging: holds group-committed like any chat call; the
    settlement, in one transaction of its own, charges and stores the exchange (`meterline_converse`)."""

    void_without_hold = False

    def __init__(self, batched: Batched, context: Context, *, account_id: str, key_id: str, model: str,
                 new_messages: list[Any], language: str) -> None:
        self.batched = batched  # holds and voids are any chat call's
        self.pool = batched.pool
        self.context = context
        self.account_id = account_id
        self.key_id = key_id
        self.model = model
        self.new_messages = new_messages
        self.language = language

    async def reserve(self, hold: Hold, low: int, high: int) -> Reservation:
        return await self.batched.reserve(hold, low, high)

    async def settle(self, hold: Hold, actual_micros: int, estimated: bool, record: dict[str, Any],
                     response: dict[str, Any] | None) -> Resolution:
        turns, memory = None, None
        answer = response.get("message") if response is not None else None
        if isinstance(answer, dict) and record.get("status") in _STORED_STATUSES:
            turns, memory = await self._exchange(hold.request_id, answer)
        async with self.pool.acquire() as conn, conn.transaction():
            resolution = await ledger.settle(conn, request_id=hold.request_id, actual_micros=actual_micros,
                                             estimated=estimated, record=record)
            if turns is not None and not resolution.replayed:
                try:
                    async with conn.transaction():  # a savepoint: storing can never cost the charge
                        await conn.execute(
                            "SELECT meterline_converse($1, $2, $3, $4, $5, $6, $7, $8, $9::regconfig)",
                            self.context.conversation_id, self.account_id, self.key_id, self.context.new,
                            self.model, hold.request_id, turns, memory, self.language)
                except asyncpg.PostgresError:
                    log.exception("storing the exchange of %s in conversation %s failed; the call is charged "
                                  "without it", hold.request_id, self.context.conversation_id)
            return resolution

    async def _exchange(self, request_id: str, answer: dict[str, Any]) -> tuple[list[dict[str, Any]],
                                                                                dict[str, Any] | None]:
        messages = [stored(m) for m in self.new_messages if isinstance(m, dict)]
        messages.append(stored({**answer, "role": "assistant"}))
        weights = await asyncio.gather(*(message_weight(m) for m in messages))
        turns = [{"role": m["role"], "message": m, "tokens": w} for m, w in zip(messages, weights, strict=True)]
        memory = None
        if self.context.learn:
            content = memory_content(self.new_messages, answer)
            memory = {"id": str(uuid.uuid4()), "content": content,
                      "tokens": await message_weight({"role": "system", "content": f"- {content}"})}
        return turns, memory

    async def void(self, hold: Hold, reason: str, record: dict[str, Any]) -> Resolution:
        return await self.batched.void(hold, reason, record)


async def has_language(conn: Executor, language: str) -> bool:
    """Whether PostgreSQL has this text search configuration (for `memory_language`)."""
    try:
        await conn.fetchval("SELECT $1::regconfig", language)
    except (asyncpg.UndefinedObjectError, asyncpg.InvalidNameError, asyncpg.SyntaxOrAccessError):
        return False
    return True
