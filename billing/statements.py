"""Account statements over a half-open period [from, to): opening + credits - debits = closing, exactly.

Every figure is a sum over the append-only `transfers` (never the cached balances), read in one
REPEATABLE READ snapshot, and a transfer belongs to the period by its `created_at`:

    opening_balance = Σ signed amounts of the account's transfers created before `from`
    credits         = Σ transfers into the account in the period (top-ups, positive adjustments)
    debits          = Σ transfers out of it in the period (charges by model and modality, negative
                      adjustments)
    closing_balance = Σ signed amounts created before `to`

Held at close: holds made before `to` that were still pending at `to` (resolved at or after it, or not yet).

`statement_csv_chunks` streams a statement a reader can tie out line by line: the figures above around every
transfer of the period, as the ledger export writes it, all from one snapshot.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import datetime
from typing import Any

import asyncpg

from billing import exports
from billing.accounts import get_account
from billing.db import Executor
from billing.errors import InvalidAmount
from billing.money import format_usd

CSV_COLUMNS = ("section", "kind", "model", "modality", "count", "amount_micros", "amount_usd")
# The streamed statement: a section, then the ledger export's columns (exports.LEDGER_COLUMNS).
LINES_CSV_COLUMNS = ("section", *exports.LEDGER_COLUMNS)


async def statement(conn: Executor, *, account_id: str, start: datetime, end: datetime) -> dict[str, Any]:
    """The account's statement for [start, end); raises AccountNotFound or InvalidAmount (a bad period)."""
    if end <= start:
        raise InvalidAmount("the statement period must end after it starts (to > from)")
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await statement(own, account_id=account_id, start=start, end=end)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await get_account(conn, account_id)
        return await _read(conn, account_id, start, end)


async def statement_lines(conn: Executor, *, account_id: str, start: datetime, end: datetime, limit: int,
                          after_id: int | None = None) -> list[dict[str, Any]]:
    """Up to `limit` of the account's transfers created in [start, end), in the statement's order (created_at,
    then id, as the ledger export), signed from the customer's side, with the balance after each; after the
    transfer `after_id` when given (an id that is not the account's gives no lines)."""
    rows = await conn.fetch(
        """
        SELECT id, kind, request_id, description, created_at, estimated, overrun_micros,
               CASE WHEN credit_account_id = account_id THEN amount_micros ELSE -amount_micros END AS amount_micros,
               balance_after_micros
          FROM transfers
         WHERE account_id = $1 AND created_at >= $2 AND created_at < $3
           AND ($4::bigint IS NULL
                OR (created_at, id) > (SELECT created_at, id FROM transfers WHERE id = $4 AND account_id = $1))
         ORDER BY created_at, id
         LIMIT $5
        """,
        account_id, start, end, after_id, limit,
    )
    return [dict(r) for r in rows]


async def statement_csv_chunks(conn: asyncpg.Connection, *, account_id: str, start: datetime, end: datetime,
                               batch_size: int = 2_000) -> AsyncGenerator[str, None]:
    """The statement as CSV text, chunk by chunk (LINES_CSV_COLUMNS):

        opening_balance   amount and balance after = the opening balance, created_at = from
        line              one per transfer of the period, exactly as the ledger export writes it: the signed
                          amount (credits +, debits -) and the balance after it
        credits_total     the credits (positive), debits_total the debits (positive), as `statement` states them
        closing_balance   amount and balance after = the closing balance, created_at = to
        held_at_close     holds pending at `to` (the description says how many)

    so opening + credits_total - debits_total = closing_balance, and opening + the lines' amounts = closing.
    Everything is read in one REPEATABLE READ snapshot, so the file ties out whatever is posted while it streams,
    and only one batch of lines is in memory. The first chunk (the header and the opening) comes after the
    account and the figures are read: an unknown account or a bad period raises before anything is yielded.
    Close it with contextlib.aclosing.
    """
    if end <= start:
        raise InvalidAmount("the statement period must end after it starts (to > from)")
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await get_account(conn, account_id)
        stmt = await _read(conn, account_id, start, end)

        def summary(section: str, amount: int, *, when: datetime | None = None, balance: bool = False,
                    description: str = "") -> list[Any]:
            cells: dict[str, Any] = {
                "section": section, "created_at": exports.iso_utc(when) if when else "", "account_id": account_id,
                "amount_micros": amount, "amount_usd": format_usd(amount),
                "balance_after_micros": amount if balance else "", "description": description,
            }
            return [cells.get(name, "") for name in LINES_CSV_COLUMNS]

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(LINES_CSV_COLUMNS)
        writer.writerow(summary("opening_balance", stmt["opening_balance_micros"], when=start, balance=True,
                                description="balance at the start of the period"))
        yield out.getvalue()
        render = exports.csv_renderer(exports.LEDGER_COLUMNS, exports.LEDGER_USD, lead=("line",))
        batches = exports.export_batches(conn, "ledger", start=start, end=end, account_id=account_id,
                                         batch_size=batch_size)
        async with aclosing(batches):
            async for batch in batches:
                yield render(batch)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(summary("credits_total", stmt["credits_micros"], description="credits in the period"))
        writer.writerow(summary("debits_total", stmt["debits_micros"], description="debits in the period"))
        writer.writerow(summary("closing_balance", stmt["closing_balance_micros"], when=end, balance=True,
                                description="balance at the end of the period"))
        writer.writerow(summary("held_at_close", stmt["held_at_close_micros"], when=end,
                                description=f"{stmt['holds_at_close']} holds pending at the end of the period"))
        yield out.getvalue()


async def _read(conn: asyncpg.Connection, account_id: str, start: datetime, end: datetime) -> dict[str, Any]:
    balances = await conn.fetchrow(
        """
        SELECT COALESCE(sum(signed) FILTER (WHERE created_at < $2), 0)::bigint AS opening,
               COALESCE(sum(signed), 0)::bigint AS closing
          FROM (SELECT created_at,
                       CASE WHEN credit_account_id = account_id THEN amount_micros
                            ELSE -amount_micros END AS signed
                  FROM transfers WHERE account_id = $1 AND created_at < $3) t
        """,
        account_id, start, end,
    )
    credits = await conn.fetch(
        """
        SELECT kind, count(*) AS count, sum(amount_micros)::bigint AS amount_micros
          FROM transfers
         WHERE account_id = $1 AND credit_account_id = $1 AND created_at >= $2 AND created_at < $3
         GROUP BY kind ORDER BY kind
        """,
        account_id, start, end,
    )
    charges = await conn.fetch(
        """
        SELECT r.model, r.modality, count(*) AS count, sum(t.amount_micros)::bigint AS amount_micros
          FROM transfers t LEFT JOIN requests r ON r.id = t.request_id
         WHERE t.account_id = $1 AND t.kind = 'charge' AND t.created_at >= $2 AND t.created_at < $3
         GROUP BY r.model, r.modality ORDER BY r.model NULLS LAST, r.modality NULLS LAST
        """,
        account_id, start, end,
    )
    other_debits = await conn.fetch(
        """
        SELECT kind, count(*) AS count, sum(amount_micros)::bigint AS amount_micros
          FROM transfers
         WHERE account_id = $1 AND debit_account_id = $1 AND kind <> 'charge'
           AND created_at >= $2 AND created_at < $3
         GROUP BY kind ORDER BY kind
        """,
        account_id, start, end,
    )
    held = await conn.fetchrow(
        """
        SELECT count(*) AS count, COALESCE(sum(amount_micros), 0)::bigint AS amount_micros
          FROM holds
         WHERE account_id = $1 AND created_at < $2 AND (resolved_at IS NULL OR resolved_at >= $2)
        """,
        account_id, end,
    )
    assert balances is not None and held is not None
    credit_lines = [dict(r) for r in credits]
    charge_lines = [dict(r) for r in charges]
    debit_lines = [dict(r) for r in other_debits]
    credits_total = sum(r["amount_micros"] for r in credit_lines)
    debits_total = sum(r["amount_micros"] for r in charge_lines + debit_lines)
    return {
        "object": "statement",
        "account_id": account_id,
        "from": start,
        "to": end,
        "currency": "usd",
        "opening_balance_micros": balances["opening"],
        "credits_micros": credits_total,
        "credits": credit_lines,
        "debits_micros": debits_total,
        "debits": {"charges": charge_lines, "adjustments": debit_lines},
        "closing_balance_micros": balances["closing"],
        "held_at_close_micros": held["amount_micros"],
        "holds_at_close": held["count"],
    }


def statement_csv(stmt: dict[str, Any]) -> str:
    """The statement as CSV: one line per figure, amounts as integer micros and exact USD strings."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def line(section: str, kind: str, amount: int, *, model: Any = "", modality: Any = "",
             count: Any = "") -> None:
        writer.writerow([section, kind, model or "", modality or "", count, amount, format_usd(amount)])

    line("opening_balance", "", stmt["opening_balance_micros"])
    for r in stmt["credits"]:
        line("credit", r["kind"], r["amount_micros"], count=r["count"])
    line("credits_total", "", stmt["credits_micros"])
    for r in stmt["debits"]["charges"]:
        line("debit", "charge", r["amount_micros"], model=r["model"], modality=r["modality"],
             count=r["count"])
    for r in stmt["debits"]["adjustments"]:
        line("debit", r["kind"], r["amount_micros"], count=r["count"])
    line("debits_total", "", stmt["debits_micros"])
    line("closing_balance", "", stmt["closing_balance_micros"])
    line("held_at_close", "", stmt["held_at_close_micros"], count=stmt["holds_at_close"])
    return out.getvalue()


def render_usd(stmt: dict[str, Any]) -> dict[str, Any]:
    """The statement with an exact USD string beside each total (for JSON)."""
    extra = {
        name.replace("_micros", "_usd"): format_usd(stmt[name])
        for name in ("opening_balance_micros", "credits_micros", "debits_micros", "closing_balance_micros",
                     "held_at_close_micros")
    }
    return {**stmt, **extra}
