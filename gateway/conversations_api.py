"""Stored conversations and memories over HTTP: the calling key's own under /v1 (and /openai/v1), every account's
under /admin.

A key reads and deletes only what it stored: another key's conversation or memory (of its account or another)
answers 404, as an unknown id does. Deletion is immediate: a deleted conversation takes its turns and its memories
with it, and nothing deleted is ever replayed or recalled again. Reading and deleting work whatever the key's
detailed_logging setting is now, so turning it off never strands data.
"""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from billing import conversation_store, conversations
from billing.conversation_store import InvalidCursor, MemoryNotFound, Page
from billing.conversations import ConversationNotFound
from gateway import wire
from gateway.auth import requires_key
from gateway.chat_state import conversation_not_found
from gateway.consumer import CONSUMER_PREFIXES
from gateway.contract import CONVERSATION_NOT_FOUND, MEMORY_NOT_FOUND, operation
from gateway.errors import ApiError, invalid
from gateway.keys import API_KEY, POOL
from gateway.params import CURSOR, Param, TextParam, limit
from gateway.render import json_response

_LIMIT = limit(20, 100)
_PAGE: tuple[Param, ...] = (_LIMIT, CURSOR)
_OWNER = (TextParam("account_id", "Only this account's"), TextParam("key_id", "Only this key's"))


def render_conversation(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "object": "conversation", "account_id": row["account_id"],
            "key_id": row["key_id"], "model": row["model"], "turns": row["turns"], "exchanges": row["exchanges"],
            "created_at": row["created_at"], "updated_at": row["updated_at"]}


def render_turn(row: dict[str, Any]) -> dict[str, Any]:
    return {**row["message"], "seq": row["seq"], "request_id": row["request_id"], "tokens": row["tokens"],
            "created_at": row["created_at"]}


def render_memory(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "object": "memory", "account_id": row["account_id"], "key_id": row["key_id"],
            "conversation_id": str(row["conversation_id"]), "request_id": row["request_id"],
            "content": row["content"], "tokens": row["tokens"], "created_at": row["created_at"]}


def memory_not_found(memory_id: str) -> ApiError:
    return ApiError(404, "MEMORY_NOT_FOUND", f"No memory with id {memory_id!r}", type="invalid_request_error")


def _id(request: web.Request, name: str, missing: type[Exception]) -> uuid.UUID:
    parsed = conversations.parse_id(request.match_info[name])
    if parsed is None:
        raise missing(request.match_info[name])
    return parsed


def _page(page: Page, render: Any) -> dict[str, Any]:
    return {"object": "list", "data": [render(item) for item in page.items], "has_more": page.next_cursor is not None,
            "next_cursor": page.next_cursor}


async def _listed(request: web.Request, lister: Any, render: Any, *, account_id: str | None,
                  key_id: str | None) -> web.Response:
    try:
        page = await lister(request.config_dict[POOL], account_id=account_id, key_id=key_id,
                            limit=_LIMIT.read(request), cursor=CURSOR.read(request))
    except InvalidCursor as exc:
        raise invalid(str(exc), "cursor") from None
    return json_response(_page(page, render))


async def _conversation(request: web.Request, *, account_id: str | None, key_id: str | None) -> web.Response:
    try:
        conversation_id = _id(request, "conversation_id", ConversationNotFound)
        row, turns = await conversation_store.get_conversation(request.config_dict[POOL], conversation_id,
                                                          account_id=account_id, key_id=key_id)
    except ConversationNotFound:
        raise conversation_not_found(request.match_info["conversation_id"]) from None
    return json_response({**render_conversation(row), "messages": [render_turn(t) for t in turns]})


async def _delete_conversation(request: web.Request, *, account_id: str | None, key_id: str | None) -> web.Response:
    try:
        conversation_id = _id(request, "conversation_id", ConversationNotFound)
        await conversation_store.delete_conversation(request.config_dict[POOL], conversation_id, account_id=account_id,
                                                key_id=key_id)
    except ConversationNotFound:
        raise conversation_not_found(request.match_info["conversation_id"]) from None
    return json_response({"id": str(conversation_id), "object": "conversation.deleted", "deleted": True})


async def _delete_memory(request: web.Request, *, account_id: str | None, key_id: str | None) -> web.Response:
    try:
        memory_id = _id(request, "memory_id", MemoryNotFound)
        await conversation_store.delete_memory(request.config_dict[POOL], memory_id, account_id=account_id,
                                          key_id=key_id)
    except MemoryNotFound:
        raise memory_not_found(request.match_info["memory_id"]) from None
    return json_response({"id": str(memory_id), "object": "memory.deleted", "deleted": True})


# The calling key's own.

@operation("This key's stored conversations, newest first", query=_PAGE, answer=wire.ConversationList)
@requires_key
async def list_conversations(request: web.Request) -> web.Response:
    key = request[API_KEY]
    return await _listed(request, conversation_store.list_conversations, render_conversation,
                         account_id=key.account_id, key_id=key.id)


@operation("One stored conversation with its messages", answer=wire.ConversationWithMessages,
           errors=(CONVERSATION_NOT_FOUND,))
@requires_key
async def get_conversation(request: web.Request) -> web.Response:
    key = request[API_KEY]
    return await _conversation(request, account_id=key.account_id, key_id=key.id)


@operation("Delete a conversation, its turns and its memories", answer=wire.Deleted,
           errors=(CONVERSATION_NOT_FOUND,))
@requires_key
async def delete_conversation(request: web.Request) -> web.Response:
    key = request[API_KEY]
    return await _delete_conversation(request, account_id=key.account_id, key_id=key.id)


@operation("This key's memories, newest first", query=_PAGE, answer=wire.MemoryList)
@requires_key
async def list_memories(request: web.Request) -> web.Response:
    key = request[API_KEY]
    return await _listed(request, conversation_store.list_memories, render_memory,
                         account_id=key.account_id, key_id=key.id)


@operation("Delete one memory", answer=wire.Deleted, errors=(MEMORY_NOT_FOUND,))
@requires_key
async def delete_memory(request: web.Request) -> web.Response:
    key = request[API_KEY]
    return await _delete_memory(request, account_id=key.account_id, key_id=key.id)


@operation("Delete every memory of this key", answer=wire.Deleted)
@requires_key
async def delete_memories(request: web.Request) -> web.Response:
    key = request[API_KEY]
    deleted = await conversation_store.delete_memories(request.app[POOL], account_id=key.account_id, key_id=key.id)
    return json_response({"object": "memory.deleted", "deleted": deleted})


def add_routes(app: web.Application) -> None:
    for prefix in CONSUMER_PREFIXES:
        app.router.add_get(f"{prefix}/conversations", list_conversations)
        app.router.add_get(f"{prefix}/conversations/{{conversation_id}}", get_conversation)
        app.router.add_delete(f"{prefix}/conversations/{{conversation_id}}", delete_conversation)
        app.router.add_get(f"{prefix}/memories", list_memories)
        app.router.add_delete(f"{prefix}/memories", delete_memories)
        app.router.add_delete(f"{prefix}/memories/{{memory_id}}", delete_memory)


# Every account's, for admins (mounted under /admin by gateway.admin).

admin_routes = web.RouteTableDef()


def _owner_filter(request: web.Request) -> dict[str, str | None]:
    return {param.name: param.read(request) for param in _OWNER}


@operation("Every account's stored conversations, newest first", query=(*_PAGE, *_OWNER),
           answer=wire.ConversationList)
@admin_routes.get("/conversations")
async def admin_list_conversations(request: web.Request) -> web.Response:
    return await _listed(request, conversation_store.list_conversations, render_conversation, **_owner_filter(request))


@operation("One stored conversation with its messages", answer=wire.ConversationWithMessages,
           errors=(CONVERSATION_NOT_FOUND,))
@admin_routes.get("/conversations/{conversation_id}")
async def admin_get_conversation(request: web.Request) -> web.Response:
    return await _conversation(request, account_id=None, key_id=None)


@operation("Delete a conversation, its turns and its memories", answer=wire.Deleted,
           errors=(CONVERSATION_NOT_FOUND,))
@admin_routes.delete("/conversations/{conversation_id}")
async def admin_delete_conversation(request: web.Request) -> web.Response:
    return await _delete_conversation(request, account_id=None, key_id=None)


@operation("Every account's memories, newest first", query=(*_PAGE, *_OWNER), answer=wire.MemoryList)
@admin_routes.get("/memories")
async def admin_list_memories(request: web.Request) -> web.Response:
    return await _listed(request, conversation_store.list_memories, render_memory, **_owner_filter(request))


@operation("Delete one memory", answer=wire.Deleted, errors=(MEMORY_NOT_FOUND,))
@admin_routes.delete("/memories/{memory_id}")
async def admin_delete_memory(request: web.Request) -> web.Response:
    return await _delete_memory(request, account_id=None, key_id=None)
