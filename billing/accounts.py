"""Customer accounts and their ledger history: create, read, list."""

from __future__ import annotations

import secrets
from typing import Any

from billing.db import Executor
from billing.errors import AccountNotFound

_ACCOUNT_COLUMNS = """
    id, name, created_at,
    credits_posted - debits_posted AS balance_micros,
    held_micros,
    credits_posted - debits_posted - held_micros AS available_micros,
    low_balance_micros
"""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


async def create_account(conn: Executor, *, name: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"INSERT INTO accounts (id, kind, name) VALUES ($1, 'customer', $2) RETURNING {_ACCOUNT_COLUMNS}",
        new_id("acct"), name,
    )
    assert row is not None
    return dict(row)


async def get_account(conn: Executor, account_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = $1 AND kind = 'customer'", account_id
    )
    if row is None:
        raise AccountNotFound(account_id)
    return dict(row)


async def list_accounts(
    conn: Executor, *, limit: int, after: str | None = None
) -> list[dict[str, Any]]:
    """Accounts in id order, `limit` at a time after the cursor `after` (an account id)."""
    rows = await conn.fetch(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'customer' AND ($1::text IS NULL OR id > $1)"
        " ORDER BY id LIMIT $2",
        after, limit,
    )
    return [dict(r) for r in rows]


async def set_low_balance(conn: Executor, account_id: str, threshold_micros: int | None) -> dict[str, Any]:
    """The available balance below which a charge sends `balance.low` (None: never); the alert is re-armed."""
    row = await conn.fetchrow(
        f"UPDATE accounts SET low_balance_micros = $2, low_balance_alerted_at = NULL"
        f" WHERE id = $1 AND kind = 'customer' RETURNING {_ACCOUNT_COLUMNS}", account_id, threshold_micros)
    if row is None:
        raise AccountNotFound(account_id)
    return dict(row)


async def search_accounts(conn: Executor, query: str, *, limit: int, after: str | None = None) -> list[dict[str, Any]]:
    """Accounts whose id is `query` or whose name contains it (case-insensitive), in id order after `after`."""
    pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = await conn.fetch(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE kind = 'customer' AND (id = $1 OR name ILIKE $2)"
        " AND ($3::text IS NULL OR id > $3) ORDER BY id LIMIT $4",
        query, pattern, after, limit,
    )
    return [dict(r) for r in rows]


async def ledger_entries(
    conn: Executor, account_id: str, *, limit: int, before_id: int | None = None
) -> list[dict[str, Any]]:
    """The account's transfers, newest first, signed from the customer's side (credits positive)."""
    await get_account(conn, account_id)
    rows = await conn.fetch(
        """
        SELECT id, kind, request_id, description, created_at, estimated, overrun_micros,
               CASE WHEN credit_account_id = account_id THEN amount_micros ELSE -amount_micros END AS amount_micros,
               balance_after_micros
          FROM transfers
         WHERE account_id = $1 AND ($2::bigint IS NULL OR id < $2)
         ORDER BY id DESC
         LIMIT $3
        """,
        account_id, before_id, limit,
    )
    return [dict(r) for r in rows]
