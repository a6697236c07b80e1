"""Test data with keyword defaults: accounts with a balance, keys for them."""

from __future__ import annotations

import secrets
from typing import Any

from billing import accounts, keys, ledger
from billing.db import Executor


async def make_account(conn: Executor, *, balance_micros: int = 0, name: str = "acme") -> str:
    account = await accounts.create_account(conn, name=name)
    if balance_micros:
        await ledger.post(conn, account_id=account["id"], kind="topup", amount_micros=balance_micros,
                          description="test funding")
    return str(account["id"])


async def make_key(conn: Executor, account_id: str, *, name: str | None = "test",
                   detailed_logging: bool = False) -> str:
    _, secret = await keys.create_key(conn, account_id=account_id, name=name, detailed_logging=detailed_logging)
    return secret


async def make_customer(conn: Executor, *, balance_micros: int = 0,
                        detailed_logging: bool = False) -> tuple[str, str]:
    """An account with `balance_micros` and a key for it: (account_id, secret)."""
    account_id = await make_account(conn, balance_micros=balance_micros)
    return account_id, await make_key(conn, account_id, detailed_logging=detailed_logging)


def request_id() -> str:
    return f"req_{secrets.token_hex(8)}"


async def billed_request(
    conn: Executor,
    account_id: str,
    *,
    key_id: str | None = None,
    hold_micros: int = 1_000,
    cost_micros: int | None = 500,
    estimated: bool = False,
    record: dict[str, Any] | None = None,
) -> str:
    """A request held and then settled for `cost_micros` (None: voided), with a request record, exactly as the
    routes do it; returns its request id."""
    rid = request_id()
    await ledger.reserve(conn, request_id=rid, account_id=account_id, amount_micros=hold_micros,
                         ttl_seconds=60, key_id=key_id)
    fields = {"model": "test-model", "modality": "text", "endpoint": "/v1/chat/completions", **(record or {})}
    if cost_micros is None:
        await ledger.void(conn, request_id=rid, reason="test void", record={"status": "cancelled", **fields})
    else:
        await ledger.settle(conn, request_id=rid, actual_micros=cost_micros, estimated=estimated, record=fields)
    return rid

