"""Request records (one per billed call, written by settle/void): filtered reads with cursor pagination.

Records are ordered newest first by (created_at, id). A cursor is an opaque token naming the last record of a
page; the next page is everything strictly after it in that order, so paging visits every matching record once
even while new records arrive. Every read is scoped to one account.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from billing.db import Executor
from billing.errors import BillingError

RECORD_COLUMNS = """
    id, account_id, key_id, model, modality, endpoint, upstream, status, billing_status, error_code,
    error_message, "user", prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, quantity,
    hold_micros, cost_micros, upstream_cost_micros, estimated, overrun_micros, duration_ms, created_at,
    finished_at
"""


class InvalidCursor(BillingError):
    """A cursor that no page of this API produced."""


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which records to read; None means no condition. created_after is inclusive, created_before is not."""

    account_id: str
    created_after: datetime | None = None
    created_before: datetime | None = None
    model: str | None = None
    key_id: str | None = None
    status: str | None = None

    def where(self, first: int = 1) -> tuple[str, list[Any]]:
        """The SQL condition and its arguments, numbered from `$first`."""
        n = first
        clauses = [f"account_id = ${n}"]
        args: list[Any] = [self.account_id]
        for column, op, value in (
            ("created_at", ">=", self.created_after),
            ("created_at", "<", self.created_before),
            ("model", "=", self.model),
            ("key_id", "=", self.key_id),
            ("status", "=", self.status),
        ):
            if value is not None:
                n += 1
                clauses.append(f"{column} {op} ${n}")
                args.append(value)
        return " AND ".join(clauses), args


def encode_cursor(created_at: datetime, request_id: str) -> str:
    raw = f"{created_at.isoformat()}|{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Request ids are ours (billing.accounts.new_id): a cursor naming anything else is not one of our pages.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, request_id = raw.partition("|")
        if not sep or not _REQUEST_ID.fullmatch(request_id):
            raise ValueError(cursor)
        created_at = datetime.fromisoformat(at).astimezone(UTC)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("cursor must be a next_cursor value from a previous page") from None
    return created_at, request_id


@dataclass(frozen=True, slots=True)
class Page:
    records: list[dict[str, Any]]
    next_cursor: str | None  # None on the last page


async def list_requests(
    conn: Executor, where: RequestFilter, *, limit: int, cursor: str | None = None
) -> Page:
    """Up to `limit` matching records, newest first, after `cursor`."""
    condition, args = where.where()
    if cursor is not None:
        at, request_id = decode_cursor(cursor)
        condition += f" AND (created_at, id) < (${len(args) + 1}, ${len(args) + 2})"
        args += [at, request_id]
    # Only fixed text is interpolated (the column list and conditions); every value is a parameter.
    query = f"SELECT {RECORD_COLUMNS} FROM requests WHERE {condition} ORDER BY created_at DESC, id DESC"
    rows = await conn.fetch(
        f"{query} LIMIT ${len(args) + 1}",
        *args, limit + 1,
    )
    records = [dict(r) for r in rows[:limit]]
    more = len(rows) > limit
    last = records[-1] if records else None
    return Page(records, encode_cursor(last["created_at"], last["id"]) if more and last else None)


async def summarize(conn: Executor, where: RequestFilter) -> dict[str, int]:
    """Count and total cost (micros) of every record matching the filter, across all pages."""
    condition, args = where.where()
    totals = "SELECT count(*) AS count, COALESCE(sum(cost_micros), 0)::bigint AS cost_micros FROM requests"
    row = await conn.fetchrow(
        f"{totals} WHERE {condition}",
        *args,
    )
    assert row is not None
    return {"count": row["count"], "cost_micros": row["cost_micros"]}


async def get_request(conn: Executor, *, account_id: str, request_id: str) -> dict[str, Any] | None:
    """One record of this account, or None (also for another account's record: callers answer 404)."""
    row = await conn.fetchrow(
        f"SELECT {RECORD_COLUMNS} FROM requests WHERE id = $1 AND account_id = $2",
        request_id, account_id,
    )
    return dict(row) if row is not None else None
