"""Ledger and request-record exports, rendered batch by batch as CSV or JSON Lines in constant memory.

Rows come from a server-side cursor inside one REPEATABLE READ read-only transaction, so an export is a
consistent snapshot however long it takes, and only one batch is ever in memory. Timestamps are ISO-8601 UTC
("2026-03-15T14:32:10.123456Z"); amounts are integer micros plus an exact USD decimal string, never floats.
The columns, in order, are LEDGER_COLUMNS and REQUEST_COLUMNS (documented in README).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

import asyncpg

from billing.errors import InvalidAmount
from billing.money import format_usd

FORMATS = ("csv", "jsonl")
KINDS = ("ledger", "requests")

# name: meaning. amount_micros is signed from the customer account's side (credit +, debit -), so the sum over
# an account's rows is the change in its balance.
LEDGER_COLUMNS: dict[str, str] = {
    "transfer_id": "the transfer's id (ascending within equal created_at)",
    "created_at": "when the transfer was posted, ISO-8601 UTC",
    "account_id": "the customer account the transfer belongs to",
    "kind": "topup | adjustment | grant | charge | refund | expiry",
    "amount_micros": "signed amount from the customer's side: credit positive, debit negative",
    "amount_usd": "amount_micros as an exact USD decimal string",
    "debit_account_id": "the account the money left",
    "credit_account_id": "the account the money entered",
    "request_id": "the billed request (charges only)",
    "description": "top-up description, adjustment reason, or what a refund or an expiry reverses",
    "balance_after_micros": "the customer's balance right after this transfer",
    "estimated": "true when a charge was priced from an estimate, not upstream usage",
    "overrun_micros": "the part of a charge above its hold (of a refund: the part the balance did not cover)",
    "grant_id": "the credit grant a credit (topup, adjustment, grant) created or an expiry expired",
}

REQUEST_COLUMNS: dict[str, str] = {
    "id": "the request id",
    "created_at": "when the request was held, ISO-8601 UTC",
    "finished_at": "when it was settled or voided, ISO-8601 UTC",
    "account_id": "the customer account",
    "key_id": "the API key used",
    "model": "the requested model",
    "modality": "text | image | video | ...",
    "endpoint": "the API path called",
    "upstream": "the upstream that served it",
    "status": "completed | upstream_failure | cancelled | ...",
    "billing_status": "settled | voided",
    "error_code": "the error code, if it failed",
    "user": "the caller's `user` field",
    "prompt_tokens": "input tokens",
    "completion_tokens": "output tokens",
    "cached_tokens": "cached input tokens",
    "reasoning_tokens": "reasoning tokens",
    "quantity": "images, seconds or other units billed",
    "hold_micros": "the amount held before dispatch",
    "cost_micros": "the amount charged (0 when voided)",
    "cost_usd": "cost_micros as an exact USD decimal string",
    "upstream_cost_micros": "what the upstream reported charging us, if it did",
    "upstream_cost_usd": "upstream_cost_micros as an exact USD decimal string",
    "estimated": "true when the charge was priced from an estimate",
    "overrun_micros": "the part of the charge above the hold",
    "duration_ms": "time from dispatch to the end of the response",
    "client_request_id": "the caller's own X-Request-Id, when it sent a usable one",
    "provider": "the provider that served it (a model with several providers)",
    "provider_model": "the model id that provider was sent",
    "generation_id": "the upstream's own id of the call",
}

_LEDGER_SQL = """
    SELECT id AS transfer_id, created_at, account_id, kind,
           CASE WHEN credit_account_id = account_id THEN amount_micros
                ELSE -amount_micros END AS amount_micros,
           debit_account_id, credit_account_id, request_id, description, balance_after_micros, estimated,
           overrun_micros, grant_id
      FROM transfers
     WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR account_id = $3)
     ORDER BY created_at, id
"""

_REQUESTS_SQL = """
    SELECT id, created_at, finished_at, account_id, key_id, model, modality, endpoint, upstream, status,
           billing_status, error_code, "user", prompt_tokens, completion_tokens, cached_tokens,
           reasoning_tokens, quantity, hold_micros, cost_micros, upstream_cost_micros, estimated,
           overrun_micros, duration_ms, client_request_id, provider, provider_model, generation_id
      FROM requests
     WHERE created_at >= $1 AND created_at < $2 AND ($3::text IS NULL OR account_id = $3)
     ORDER BY created_at, id
"""

# The USD columns of a ledger row and the micros columns they are derived from.
LEDGER_USD = {"amount_usd": "amount_micros"}

# For each kind: the query, its columns, and the USD columns derived from micros columns.
_SOURCES: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {
    "ledger": (_LEDGER_SQL, LEDGER_COLUMNS, LEDGER_USD),
    "requests": (_REQUESTS_SQL, REQUEST_COLUMNS,
                 {"cost_usd": "cost_micros", "upstream_cost_usd": "upstream_cost_micros"}),
}


def iso_utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _row_values(row: asyncpg.Record, columns: dict[str, str], usd: dict[str, str]) -> list[Any]:
    values: list[Any] = []
    for name in columns:
        source = usd.get(name)
        if source is not None:
            micros = row[source]
            values.append(None if micros is None else format_usd(micros))
            continue
        value = row[name]
        values.append(iso_utc(value) if isinstance(value, datetime) else value)
    return values


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def csv_renderer(columns: dict[str, str], usd: dict[str, str], *,
                 lead: Sequence[str] = ()) -> Callable[[list[asyncpg.Record]], str]:
    """CSV rows (no header) for batches of records; `lead` cells go before each row's own (a statement marks its
    ledger rows with a section)."""
    def render(batch: list[asyncpg.Record]) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for row in batch:
            writer.writerow([*lead, *(_csv_cell(v) for v in _row_values(row, columns, usd))])
        return out.getvalue()

    return render


def jsonl_renderer(columns: dict[str, str], usd: dict[str, str]) -> Callable[[list[asyncpg.Record]], str]:
    names = list(columns)

    def render(batch: list[asyncpg.Record]) -> str:
        return "".join(
            json.dumps(dict(zip(names, _row_values(row, columns, usd), strict=True)), separators=(",", ":"))
            + "\n"
            for row in batch
        )

    return render


def check(kind: str, fmt: str, start: datetime, end: datetime) -> None:
    if kind not in KINDS:
        raise InvalidAmount(f"export must be one of {', '.join(KINDS)}")
    if fmt not in FORMATS:
        raise InvalidAmount(f"format must be one of {', '.join(FORMATS)}")
    if end <= start:
        raise InvalidAmount("the export period must end after it starts (to > from)")


async def export_chunks(
    conn: asyncpg.Connection,
    kind: str,
    *,
    fmt: str,
    start: datetime,
    end: datetime,
    account_id: str | None = None,
    batch_size: int = 2_000,
) -> AsyncGenerator[tuple[str, int], None]:
    """Yield (text, rows in it): the CSV header first (0 rows), then one chunk per fetched batch.

    The connection is used exclusively until the iterator is exhausted or closed (close it with
    contextlib.aclosing, so an abandoned export ends its transaction).
    """
    check(kind, fmt, start, end)
    _, columns, usd = _SOURCES[kind]
    render = (csv_renderer if fmt == "csv" else jsonl_renderer)(columns, usd)
    if fmt == "csv":
        yield ",".join(columns) + "\n", 0
    batches = export_batches(conn, kind, start=start, end=end, account_id=account_id, batch_size=batch_size)
    async with aclosing(batches):
        async for batch in batches:
            yield render(batch), len(batch)


async def export_batches(
    conn: asyncpg.Connection,
    kind: str,
    *,
    start: datetime,
    end: datetime,
    account_id: str | None = None,
    batch_size: int = 2_000,
) -> AsyncGenerator[list[asyncpg.Record], None]:
    """The rows of `kind` for [start, end), a batch at a time, from a server-side cursor in a REPEATABLE READ
    read-only transaction. Inside a caller's transaction it is a savepoint of it, so the rows come from the
    caller's snapshot (how a statement's lines agree with its totals). Close it with contextlib.aclosing."""
    query, _, _ = _SOURCES[kind]
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = await conn.cursor(query, start, end, account_id)
        while batch := await cursor.fetch(batch_size):
            yield batch
