"""The customer's console: a read-only view of the signed-in key's own account (its balance, the key's limits and
when they reset, its spend per day, the account's recent requests), and the key's stored conversations and memories,
which it may delete. Everything is read through the session's account and key, never from the URL alone, so no
other account's or key's data can be reached from here (another key's conversation id answers 404)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from aiohttp import web

from billing import accounts, conversation_store, conversations, limits, requests_log, rollups
from gateway.console.charts import chart, period
from gateway.console.common import SESSION, render, see_other
from gateway.errors import invalid
from gateway.keys import POOL


async def me(request: web.Request) -> web.Response:
    session = request[SESSION]
    assert session.account_id is not None and session.key_id is not None
    pool = request.config_dict[POOL]
    page = await requests_log.list_requests(pool, requests_log.RequestFilter(account_id=session.account_id),
                                            limit=50)
    start, end = period(request)
    days = await rollups.daily(pool, start=start, end=end, account_id=session.account_id)
    return render(request, "me.html", {
        "start": start, "last": end - timedelta(days=1),
        "spend_chart": chart([d["day"] for d in days], {"Spend": [d["cost_micros"] for d in days]}, unit="micros"),
        "account": await accounts.get_account(pool, session.account_id),
        "key": await limits.key_status(pool, session.key_id),
        "requests": page.records,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_get("/me", me)
    add_conversation_routes(app)


async def conversations_page(request: web.Request) -> web.Response:
    """The key's stored conversations (newest first, paged) and what memory may recall, each with a delete button."""
    session = request[SESSION]
    pool = request.config_dict[POOL]
    try:
        page = await conversation_store.list_conversations(pool, account_id=session.account_id,
                                                           key_id=session.key_id, limit=25,
                                                           cursor=request.query.get("cursor") or None)
    except conversation_store.InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    memories = await conversation_store.list_memories(pool, account_id=session.account_id, key_id=session.key_id,
                                                      limit=100)
    return render(request, "conversations.html", {"conversations": page.items, "next_cursor": page.next_cursor,
                                                  "memories": memories.items, "more_memories": memories.next_cursor,
                                                  "deleted": request.query.get("deleted")})


def _id(request: web.Request) -> uuid.UUID:
    parsed = conversations.parse_id(request.match_info["item_id"])
    if parsed is None:
        raise web.HTTPNotFound()
    return parsed


async def conversation_page(request: web.Request) -> web.Response:
    session = request[SESSION]
    try:
        row, turns = await conversation_store.get_conversation(request.config_dict[POOL], _id(request),
                                                               account_id=session.account_id, key_id=session.key_id)
    except conversations.ConversationNotFound:
        raise web.HTTPNotFound() from None
    return render(request, "conversation.html", {"conversation": row, "turns": turns})


async def delete_conversation(request: web.Request) -> web.Response:
    session = request[SESSION]
    try:
        await conversation_store.delete_conversation(request.config_dict[POOL], _id(request),
                                                     account_id=session.account_id, key_id=session.key_id)
    except conversations.ConversationNotFound:
        raise web.HTTPNotFound() from None
    return see_other("/console/me/conversations?deleted=conversation")


async def delete_memory(request: web.Request) -> web.Response:
    session = request[SESSION]
    try:
        await conversation_store.delete_memory(request.config_dict[POOL], _id(request),
                                               account_id=session.account_id, key_id=session.key_id)
    except conversation_store.MemoryNotFound:
        raise web.HTTPNotFound() from None
    return see_other("/console/me/conversations?deleted=memory")


async def delete_memories(request: web.Request) -> web.Response:
    session = request[SESSION]
    assert session.account_id is not None and session.key_id is not None
    await conversation_store.delete_memories(request.config_dict[POOL], account_id=session.account_id,
                                             key_id=session.key_id)
    return see_other("/console/me/conversations?deleted=memories")


def add_conversation_routes(app: web.Application) -> None:
    app.router.add_get("/me/conversations", conversations_page)
    app.router.add_get("/me/conversations/{item_id}", conversation_page)
    app.router.add_post("/me/conversations/{item_id}/delete", delete_conversation)
    app.router.add_post("/me/memories/{item_id}/delete", delete_memory)
    app.router.add_post("/me/memories/delete", delete_memories)
