"""Stored conversations and memories, read and deleted: pages newest first, one conversation with its turns, and
deletion (at once, turns and memories with their conversation), for the consumer and admin APIs; and the
retention purge. Every read is scoped to an owner when one is named (a key sees only what it stored).
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from billing.conversations import ConversationNotFound
from billing.db import Executor
from billing.errors import BillingError


class MemoryNotFound(BillingError):
    """No memory with this id belongs to the calling key."""


class InvalidCursor(BillingError):
    """A cursor that no page of this API produced."""


_CONVERSATION_COLUMNS = "c.id, c.account_id, c.key_id, c.model, c.turns, c.exchanges, c.created_at, c.updated_at"


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _encode_cursor(created_at: datetime, item_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{item_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, item_id = raw.partition("|")
        if not sep:
            raise ValueError(cursor)
        return datetime.fromisoformat(at).astimezone(UTC), uuid.UUID(item_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("cursor must be a next_cursor value from a previous page") from None


def _where(alias: str, account_id: str | None, key_id: str | None, first: int = 1) -> tuple[list[str], list[Any]]:
    """Conditions on the owner (only fixed text is interpolated; the values are parameters from `$first`)."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in (("account_id", account_id), ("key_id", key_id)):
        if value is not None:
            args.append(value)
            clauses.append(f"{alias}.{column} = ${first + len(args) - 1}")
    return clauses, args


async def _newest_first(conn: Executor, *, table: str, alias: str, columns: str, account_id: str | None,
                        key_id: str | None, limit: int, cursor: str | None) -> Page:
    """A page of `table`'s rows of this owner, newest first by creation (so pages stay stable while rows change),
    after `cursor`. Only fixed text is interpolated; every value is a parameter."""
    clauses, args = _where(alias, account_id, key_id)
    if cursor is not None:
        at, after = _decode_cursor(cursor)
        args += [at, after]
        clauses.append(f"({alias}.created_at, {alias}.id) < (${len(args) - 1}, ${len(args)})")
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = await conn.fetch(f"SELECT {columns} FROM {table} {alias} {where}"
                            f" ORDER BY {alias}.created_at DESC, {alias}.id DESC LIMIT ${len(args) + 1}",
                            *args, limit + 1)
    items = [dict(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(items, _encode_cursor(items[-1]["created_at"], items[-1]["id"]) if more and items else None)


async def list_conversations(conn: Executor, *, account_id: str | None, key_id: str | None, limit: int,
                             cursor: str | None = None) -> Page:
    """Conversations, newest first."""
    return await _newest_first(conn, table="conversations", alias="c", columns=_CONVERSATION_COLUMNS,
                               account_id=account_id, key_id=key_id, limit=limit, cursor=cursor)


async def get_conversation(conn: Executor, conversation_id: uuid.UUID, *, account_id: str | None = None,
                           key_id: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A conversation (of this key, when one is named) and its stored turns; ConversationNotFound otherwise."""
    clauses, args = _where("c", account_id, key_id, first=2)
    condition = " AND ".join(["c.id = $1", *clauses])
    row = await conn.fetchrow(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations c WHERE {condition}",
                              conversation_id, *args)
    if row is None:
        raise ConversationNotFound(str(conversation_id))
    turns = await conn.fetch("SELECT seq, request_id, message, tokens, created_at FROM conversation_turns"
                             " WHERE conversation_id = $1 ORDER BY seq", conversation_id)
    return dict(row), [dict(t) for t in turns]


async def delete_conversation(conn: Executor, conversation_id: uuid.UUID, *, account_id: str | None = None,
                              key_id: str | None = None) -> None:
    """Delete a conversation with its turns and memories, at once; ConversationNotFound if there is none."""
    clauses, args = _where("c", account_id, key_id, first=2)
    condition = " AND ".join(["c.id = $1", *clauses])
    deleted = await conn.fetchval(f"DELETE FROM conversations c WHERE {condition} RETURNING c.id",
                                  conversation_id, *args)
    if deleted is None:
        raise ConversationNotFound(str(conversation_id))


_MEMORY_COLUMNS = "m.id, m.account_id, m.key_id, m.conversation_id, m.request_id, m.content, m.tokens, m.created_at"


async def list_memories(conn: Executor, *, account_id: str | None, key_id: str | None, limit: int,
                        cursor: str | None = None) -> Page:
    """Memories newest first: everything recall may draw on for the key."""
    return await _newest_first(conn, table="memories", alias="m", columns=_MEMORY_COLUMNS, account_id=account_id,
                               key_id=key_id, limit=limit, cursor=cursor)


async def delete_memory(conn: Executor, memory_id: uuid.UUID, *, account_id: str | None = None,
                        key_id: str | None = None) -> None:
    clauses, args = _where("m", account_id, key_id, first=2)
    condition = " AND ".join(["m.id = $1", *clauses])
    if await conn.fetchval(f"DELETE FROM memories m WHERE {condition} RETURNING m.id", memory_id, *args) is None:
        raise MemoryNotFound(str(memory_id))


async def delete_memories(conn: Executor, *, account_id: str, key_id: str) -> int:
    """Delete every memory of the key; returns how many there were."""
    return int(await conn.fetchval(
        "WITH gone AS (DELETE FROM memories WHERE account_id = $1 AND key_id = $2 RETURNING 1)"
        " SELECT count(*) FROM gone", account_id, key_id))


async def purge(conn: Executor, *, retention_days: int, batch: int = 500) -> int:
    """Delete conversations idle for longer than `retention_days` (in batches); returns how many went."""
    total = 0
    while True:
        gone = int(await conn.fetchval("SELECT meterline_purge_conversations($1, $2)", retention_days, batch))
        total += gone
        if gone < batch:
            return total
