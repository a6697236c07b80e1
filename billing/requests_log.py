"""Request records (one per billed call, written by settle/void): filtered reads with cursor pagination.

Records are ordered newest first by (created_at, id). A cursor is an opaque token naming the last record of a
page; the next page is everything strictly after it in that order, so paging visits every matching record once
even while new records arrive. Every read a customer can cause is scoped to one account; only the admin console
reads across accounts (a filter whose account_id is None) or one record by its id alone (`request_detail`).
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
    finished_at, client_request_id, provider, provider_model, attempts, generation_id
"""


class InvalidCursor(BillingError):
    """A cursor that no page of this API produced."""


# The modalities a record can have (billing.catalog's entries: text, image, video).
MODALITIES = ("text", "image", "video")


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which records to read; None means no condition. created_after is inclusive, created_before is not.

    account_id has no default, so that a caller reading across accounts says so with None. estimated and overrun
    select the records with (True) or without (False) an estimated charge or a charge above the hold."""

    account_id: str | None
    created_after: datetime | None = None
    created_before: datetime | None = None
    model: str | None = None
    key_id: str | None = None
    status: str | None = None
    modality: str | None = None
    estimated: bool | None = None
    overrun: bool | None = None
    client_request_id: str | None = None
    generation_id: str | None = None
    provider: str | None = None

    def where(self, first: int = 1) -> tuple[str, list[Any]]:
        """The SQL condition and its arguments, numbered from `$first`."""
        clauses: list[str] = []
        args: list[Any] = []
        for column, op, value in (
            ("account_id", "=", self.account_id),
            ("created_at", ">=", self.created_after),
            ("created_at", "<", self.created_before),
            ("model", "=", self.model),
            ("key_id", "=", self.key_id),
            ("status", "=", self.status),
            ("modality", "=", self.modality),
            ("estimated", "=", self.estimated),
            ("client_request_id", "=", self.client_request_id),
            ("generation_id", "=", self.generation_id),
            ("provider", "=", self.provider),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ${first + len(args)}")
                args.append(value)
        if self.overrun is not None:
            clauses.append("overrun_micros > 0" if self.overrun else "overrun_micros = 0")
        return " AND ".join(clauses) or "TRUE", args


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


@dataclass(frozen=True, slots=True)
class RequestDetail:
    """One record with what the ledger holds for it: its hold (every record has one, as meterline_record writes it
    from the hold), its charge when one was posted (a voided call has none) and its key's name and prefix."""

    record: dict[str, Any]
    hold: dict[str, Any] | None
    transfer: dict[str, Any] | None
    key: dict[str, Any] | None


_HOLD_COLUMNS = ("amount_micros", "state", "created_at", "expires_at", "resolved_at", "actual_micros",
                 "overrun_micros", "expired_first", "reason")
_TRANSFER_COLUMNS = ("id", "kind", "amount_micros", "balance_after_micros", "overrun_micros", "estimated",
                     "description", "debit_account_id", "credit_account_id", "created_at")
_KEY_COLUMNS = ("name", "prefix")


def _joined(alias: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{alias}.{column} AS {alias}__{column}" for column in columns)


# The record is read alone first, so that its columns keep their names next to the hold's and transfer's.
_DETAIL = f"""
    SELECT r.*, {_joined("h", _HOLD_COLUMNS)}, {_joined("t", _TRANSFER_COLUMNS)}, {_joined("k", _KEY_COLUMNS)}
      FROM (SELECT {RECORD_COLUMNS}, usage FROM requests WHERE id = $1) r
      LEFT JOIN holds h ON h.request_id = r.id
      LEFT JOIN transfers t ON t.request_id = r.id
      LEFT JOIN api_keys k ON k.id = r.key_id
"""


async def request_detail(conn: Executor, request_id: str) -> RequestDetail | None:
    """One record by its id, of any account, with its hold, charge and key; None when there is no such record.
    For the admin console only: a customer's read goes through `get_request`, which is scoped to its account."""
    row = await conn.fetchrow(_DETAIL, request_id)
    if row is None:
        return None
    found = dict(row)

    def part(alias: str, columns: tuple[str, ...], present: str) -> dict[str, Any] | None:
        values = {column: found.pop(f"{alias}__{column}") for column in columns}
        return values if values[present] is not None else None

    hold = part("h", _HOLD_COLUMNS, "state")
    transfer = part("t", _TRANSFER_COLUMNS, "id")
    key = part("k", _KEY_COLUMNS, "prefix")
    return RequestDetail(record=found, hold=hold, transfer=transfer, key=key)
