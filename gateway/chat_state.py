"""The edge of stateful chat (billing.conversations): who may use `conversation_id` and `memory`, the context a
call replays and recalls, and the fields every chat answer carries about its context.

`context_total` is the model's context length; `context_left` is `context_total` minus the call's prompt tokens
(history and memory included) minus its completion tokens, as the upstream's usage reports them (as estimated when
it reports none), never below 0. Both are null for a model that publishes no context length.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing import conversations
from billing.catalog import CatalogEntry
from billing.conversations import Context, Conversing, MemoryRules
from billing.keys import ApiKey
from billing.pricing import Estimate, TokenPrices, Usage
from billing.text import HoldRules
from gateway.chat_request import STATEFUL, ChatRequest
from gateway.errors import ApiError, invalid
from gateway.keys import HOLDS, POOL, SETTINGS


def memory_rules(app: web.Application) -> MemoryRules:
    settings = app[SETTINGS]
    return MemoryRules(language=settings.memory_language, budget_tokens=settings.memory_budget_tokens,
                       max_items=settings.memory_max_items)


def conversation_not_found(conversation_id: object) -> ApiError:
    return ApiError(404, "CONVERSATION_NOT_FOUND", f"No conversation with id {str(conversation_id)!r}",
                    param="conversation_id", type="invalid_request_error")


async def context_for(app: web.Application, key: ApiKey, chat: ChatRequest, entry: CatalogEntry, *,
                      output_allowance: int, rules: HoldRules) -> Context | None:
    """The context of a call: None for a key without Detailed Logging (which may not name a conversation or
    ask for memory: 400); otherwise its conversation (404 if not this key's), recalled memory and trimmed
    history."""
    if not key.detailed_logging:
        asked = dict(zip(STATEFUL, (chat.conversation_id is not None, chat.memory), strict=True))
        for name in (name for name, used in asked.items() if used):
            raise invalid(f"{name} needs Detailed Logging, which is off for this key: turn on the key's "
                          "detailed_logging setting to store conversations and use memory", name)
        return None
    try:
        return await conversations.prepare(
            app[POOL], account_id=key.account_id, key_id=key.id, conversation_id=chat.conversation_id,
            memory=chat.memory, new_messages=chat.messages, forwarded=chat.forwarded or None,
            context_length=entry.context_length, output_allowance=output_allowance, rules=rules,
            memory_rules=memory_rules(app))
    except conversations.ConversationNotFound:
        raise conversation_not_found(chat.conversation_id) from None


def steps(app: web.Application, context: Context, key: ApiKey, entry: CatalogEntry,
          new_messages: list[Any]) -> Conversing:
    """The hold steps that store the exchange with its settlement."""
    return Conversing(app[HOLDS].batched, context, account_id=key.account_id, key_id=key.id, model=entry.id,
                      new_messages=new_messages, language=app[SETTINGS].memory_language)


def context_fields(entry: CatalogEntry, usage: Usage | None, context: Context | None) -> dict[str, Any]:
    """What a chat answer (or a stream's last chunk) says about its context (module docstring)."""
    total = entry.context_length
    left = None
    if total is not None and usage is not None:
        left = max(total - usage.prompt_tokens - usage.completion_tokens, 0)
    fields: dict[str, Any] = {"context_total": total, "context_left": left}
    if context is not None:
        fields.update(context.fields())
    return fields


async def itemised(estimate: Estimate, prices: TokenPrices, context: Context | None, rules: HoldRules) -> Estimate:
    """A dryRun's estimate with the replayed history and the recalled memory as their own lines."""
    if context is None:
        return estimate
    memory = context.memory
    return conversations.itemised(
        estimate, prices, safety_factor=rules.safety_factor,
        history_tokens=await conversations.counted(context.replayed_messages()),
        memory_tokens=await conversations.counted([memory] if memory is not None else []))
