"""Stored conversations and memories in the console, with delete buttons: a customer's own key's under
`/console/me/conversations`, and every key's for admins under `/console/conversations` (narrowed by `account` and
`key` in the URL).

What a page may reach is decided by its session, never by the URL alone: a customer session is scoped to its own
account and key (another key's conversation id answers 404, as an unknown one does), and the console's middleware
keeps customers on `/console/me` pages and admins off them. Deleting is immediate: a conversation goes with its
turns and memories, and nothing deleted is replayed or recalled again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web

from billing import conversation_store, conversations
from gateway.console.common import SESSION, render, see_other
from gateway.errors import invalid
from gateway.keys import POOL

MAX_FILTER = 200


@dataclass(frozen=True, slots=True)
class Scope:
    account_id: str | None  # None: every account (an admin without a filter)
    key_id: str | None
    base: str  # where this session's conversation pages live
    query: str  # the filters to keep in links ("" or "?account=...&key=...")


def _scope(request: web.Request) -> Scope:
    session = request[SESSION]
    if not session.admin:
        return Scope(session.account_id, session.key_id, "/console/me/conversations", "")
    filters = {name: value.strip() for name in ("account", "key")
               if (value := request.query.get(name)) and value.strip()}
    for name, value in filters.items():
        if len(value) > MAX_FILTER:
            raise invalid(f"{name} is longer than {MAX_FILTER} characters", name)
    return Scope(filters.get("account"), filters.get("key"), "/console/conversations",
                 f"?{urlencode(filters)}" if filters else "")


def _id(request: web.Request) -> uuid.UUID:
    parsed = conversations.parse_id(request.match_info["item_id"])
    if parsed is None:
        raise web.HTTPNotFound()
    return parsed


def _done(scope: Scope, what: str) -> web.Response:
    separator = "&" if scope.query else "?"
    return see_other(f"{scope.base}{scope.query}{separator}deleted={what}")


async def conversations_page(request: web.Request) -> web.Response:
    """Conversations (newest first, paged) and the memories recall may draw on, each with a delete button."""
    scope = _scope(request)
    pool = request.config_dict[POOL]
    try:
        page = await conversation_store.list_conversations(pool, account_id=scope.account_id, key_id=scope.key_id,
                                                           limit=25, cursor=request.query.get("cursor") or None)
    except conversation_store.InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    memories = await conversation_store.list_memories(pool, account_id=scope.account_id, key_id=scope.key_id,
                                                      limit=100)
    return render(request, "conversations.html", {
        "scope": scope, "conversations": page.items, "next_cursor": page.next_cursor, "memories": memories.items,
        "more_memories": memories.next_cursor, "deleted": request.query.get("deleted"),
        # Forgetting everything is per key: offered once the page is scoped to one key of one account.
        "can_forget_all": scope.account_id is not None and scope.key_id is not None})


async def conversation_page(request: web.Request) -> web.Response:
    scope = _scope(request)
    try:
        row, turns = await conversation_store.get_conversation(request.config_dict[POOL], _id(request),
                                                               account_id=scope.account_id, key_id=scope.key_id)
    except conversations.ConversationNotFound:
        raise web.HTTPNotFound() from None
    return render(request, "conversation.html", {"scope": scope, "conversation": row, "turns": turns})


async def delete_conversation(request: web.Request) -> web.Response:
    scope = _scope(request)
    try:
        await conversation_store.delete_conversation(request.config_dict[POOL], _id(request),
                                                     account_id=scope.account_id, key_id=scope.key_id)
    except conversations.ConversationNotFound:
        raise web.HTTPNotFound() from None
    return _done(scope, "conversation")


async def delete_memory(request: web.Request) -> web.Response:
    scope = _scope(request)
    try:
        await conversation_store.delete_memory(request.config_dict[POOL], _id(request), account_id=scope.account_id,
                                               key_id=scope.key_id)
    except conversation_store.MemoryNotFound:
        raise web.HTTPNotFound() from None
    return _done(scope, "memory")


async def delete_memories(request: web.Request) -> web.Response:
    scope = _scope(request)
    if scope.account_id is None or scope.key_id is None:
        raise invalid("Forgetting every memory is per key: give the account and the key", "key")
    await conversation_store.delete_memories(request.config_dict[POOL], account_id=scope.account_id,
                                             key_id=scope.key_id)
    return _done(scope, "memories")


def add_routes(app: web.Application) -> None:
    for base in ("/me/conversations", "/conversations"):
        # The fixed paths first: "memories" is not a conversation id.
        app.router.add_post(f"{base}/memories/delete", delete_memories)
        app.router.add_post(f"{base}/memories/{{item_id}}/delete", delete_memory)
        app.router.add_get(base, conversations_page)
        app.router.add_get(f"{base}/{{item_id}}", conversation_page)
        app.router.add_post(f"{base}/{{item_id}}/delete", delete_conversation)
