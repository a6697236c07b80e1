"""The request record is one typed value: its fields are exactly what the SQL stores, so a field the SQL does not
know is an error here, not silently dropped; and the hold lifecycle resolves each hold once."""

from __future__ import annotations

import dataclasses
import re

import asyncpg
import pytest

from billing import ledger
from billing.batcher import LedgerBatcher
from billing.holds import Holds
from billing.records import Outcome, RequestRecord
from billing.tasks import TaskOwner
from billing.verify import verify
from tests.factories import make_account, request_id

# Columns of `requests` that the ledger fills (ids, money, times), never the record.
_LEDGER_COLUMNS = {"id", "account_id", "key_id", "billing_status", "hold_micros", "cost_micros", "estimated",
                   "overrun_micros", "created_at", "finished_at"}


async def test_the_record_is_exactly_what_meterline_record_stores(pool: asyncpg.Pool) -> None:
    source = await pool.fetchval("SELECT pg_get_functiondef('meterline_record'::regproc)")
    read = set(re.findall(r"p_record->>?'(\w+)'", source))
    columns = {r["column_name"] for r in await pool.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'requests'")}
    fields = {field.name for field in dataclasses.fields(RequestRecord)}
    assert fields == read == columns - _LEDGER_COLUMNS
    assert {field.name for field in dataclasses.fields(Outcome)} <= fields


def test_an_outcome_field_the_record_does_not_have_is_an_error() -> None:
    with pytest.raises(TypeError):
        Outcome(status="completed", tokens_used=3)  # type: ignore[call-arg]


async def test_a_hold_resolves_once_whatever_is_asked_of_it(pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=10_000)
    tasks, batcher = TaskOwner(), LedgerBatcher(pool)
    holds = Holds(pool, batcher, tasks, ttl_seconds=60, void_wait_seconds=5)
    hold = holds.open(request_id(), account_id=account, key_id=None, record=RequestRecord(model="m", modality="text"))
    assert (await hold.reserve(5_000, min_micros=100)).granted_micros == 5_000
    first = await hold.settle(1_234, outcome=Outcome(prompt_tokens=7))
    assert first is not None and (first.state, first.actual_micros) == ("settled", 1_234)
    assert await hold.settle(9_999, outcome=Outcome()) is first  # a second settle changes nothing
    assert await hold.void("late", Outcome(status="cancelled")) is first
    await tasks.close(grace_seconds=5)
    await batcher.close()
    assert await ledger.available_micros(pool, account) == 10_000 - 1_234
    record = await pool.fetchrow("SELECT status, prompt_tokens, model, duration_ms FROM requests")
    assert (record["status"], record["prompt_tokens"], record["model"]) == ("completed", 7, "m")
    assert record["duration_ms"] >= 0
    assert await verify(pool) == []
