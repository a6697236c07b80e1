"""Test data with keyword defaults: accounts with a balance, keys for them."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg

from billing import accounts, keys, ledger, videos
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


async def make_video(
    pool: asyncpg.Pool,
    account_id: str,
    *,
    model: str = "test-video",
    size: str = "1280x720",
    seconds: int = 8,
    price_micros: int = 800_000,
    status: str = "queued",
) -> str:
    """A video job held for `price_micros`, as POST /v1/videos stores it, then moved by billing.videos to `status`:
    in_progress (started upstream, 40% done), completed (charged its price) or failed (voided); returns its id."""
    assert status in videos.STATUSES, status
    job = videos.NewVideo(request_id=request_id(), account_id=account_id, key_id=None, model=model,
                          upstream="fake-media", endpoint="/v1/videos", prompt="a capybara", size=size,
                          seconds=seconds, price_micros=price_micros)
    row, _ = await videos.create_once(pool, job, idempotency=None, hold_ttl_seconds=3600, max_job_seconds=3600,
                                      lease_owner="test", lease_seconds=60)
    if status == "completed":
        await videos.complete(pool, row["id"], output=None, record=videos.record(row, "completed"))
    elif status == "failed":
        await videos.fail(pool, row["id"], reason="the upstream failed the job",
                          error={"code": "upstream_failed", "message": "the upstream failed the job"},
                          record=videos.record(row, "upstream_failure", error_code="upstream_failed"))
    elif status == "in_progress":
        await videos.started(pool, row["id"], upstream_id=f"up_{row['id']}", status="in_progress", progress=40,
                             output=None, owner="test", poll_seconds=60,
                             provider=videos.Provider(name="fake-media", upstream="fake-media", model=model,
                                                      upstream_cost_micros=None))
    return str(row["id"])
