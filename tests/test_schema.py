"""The schema as a shipped part: numbered migrations inside the package bring any database to the schema that
schema.sql describes, and the ledger's guards hold (append-only, TRUNCATE included)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from billing import db, schema
from billing.verify import verify
from tests.conftest import ROOT
from tests.factories import billed_request, make_account

# A canonical description of a database's schema: every table column, constraint, index, trigger and function
# (with its body), the seed rows and the recorded migrations.
_DESCRIBE = {
    "columns": """SELECT table_name, ordinal_position, column_name, data_type, is_nullable, column_default,
                         is_identity FROM information_schema.columns WHERE table_schema = 'public'
                   ORDER BY 1, 2""",
    "constraints": """SELECT conrelid::regclass::text AS t, conname, pg_get_constraintdef(oid) AS def
                        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2",
    "triggers": """SELECT tgrelid::regclass::text AS t, tgname, pg_get_triggerdef(oid) AS def FROM pg_trigger
                    WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """SELECT p.oid::regprocedure::text AS f, pg_get_functiondef(p.oid) AS def FROM pg_proc p
                     WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1""",
    "seeds": "SELECT id, kind, name FROM accounts WHERE kind <> 'customer' ORDER BY id",
    "migrations": "SELECT version, name FROM meterline_migrations ORDER BY version",
}


async def describe(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: [tuple(row) for row in await conn.fetch(query)] for name, query in _DESCRIBE.items()}


async def test_the_migrations_build_exactly_the_schema_that_schema_sql_describes(fresh_database: Any) -> None:
    migrated, from_file = await fresh_database(), await fresh_database()
    assert await schema.migrate(migrated) == [m.version for m in schema.migrations()]
    await from_file.execute((ROOT / "schema.sql").read_text(encoding="utf-8"))
    expected, actual = await describe(from_file), await describe(migrated)
    for part in _DESCRIBE:
        assert actual[part] == expected[part], part
    assert await schema.migrate(from_file) == []  # a database built from schema.sql is current


async def test_a_database_built_before_migrations_is_brought_forward_with_its_data(fresh_database: Any) -> None:
    """Databases made by the old whole-file schema.sql (migration 0001's text, applied with its digest) get the
    later migrations, and keep their money."""
    old, reference = await fresh_database(), await fresh_database()
    await old.execute(schema.migrations()[0].sql)
    await old.execute("INSERT INTO meterline_schema (id, digest) VALUES (true, 'old-digest')")
    # The old schema's data, written with the SQL it had (today's billing code reads columns it lacks).
    account = "acct_from_before"
    await old.execute("INSERT INTO accounts (id, kind, name) VALUES ($1, 'customer', 'old')", account)
    await old.execute("SELECT meterline_post($1, 'topup', 5000, 'old funding')", account)
    await billed_request(old, account, hold_micros=1_000, cost_micros=700)
    assert await schema.migrate(old) == [m.version for m in schema.migrations()]
    await schema.migrate(reference)
    assert await describe(old) == await describe(reference)
    assert await old.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account) == 4_300
    # Credit grants (migration 0011): the balance became one paid grant, so the ledger verifies as it did.
    grant = await old.fetchrow("SELECT * FROM credit_grants WHERE account_id = $1", account)
    assert (grant["category"], grant["amount_micros"], grant["remaining_micros"], grant["expires_at"]) == (
        "paid", 4_300, 4_300, None)
    assert await verify(old) == []
    assert await old.fetchval("SELECT to_regclass('meterline_schema')") is None


async def test_migrating_again_takes_no_table_locks(pool: asyncpg.Pool, database_url: str) -> None:
    """A process starting on a current database must not wait behind (nor block) a long export reading the
    ledger: it reads the migration records and takes no lock."""
    conn = await db.connect(database_url)
    try:
        async with pool.acquire() as reader, reader.transaction(isolation="repeatable_read", readonly=True):
            await reader.fetchval("SELECT count(*) FROM transfers")  # an export's lock on the ledger
            async with pool.acquire() as writer:
                # A lock request queued behind the reader: any table lock taken after it would wait too.
                waiting = asyncio.ensure_future(writer.execute("LOCK TABLE transfers IN ACCESS EXCLUSIVE MODE"))
                await asyncio.sleep(0.2)
                assert await asyncio.wait_for(schema.migrate(conn), timeout=10) == []
                waiting.cancel()
                with pytest.raises((asyncio.CancelledError, asyncpg.PostgresError)):
                    await waiting
    finally:
        await conn.close()


@pytest.mark.parametrize("statement", [
    "TRUNCATE transfers", "TRUNCATE holds", "TRUNCATE accounts CASCADE", "UPDATE transfers SET amount_micros = 0",
    "DELETE FROM transfers", "DELETE FROM holds",
], ids=["truncate-transfers", "truncate-holds", "truncate-cascade", "update", "delete", "delete-hold"])
async def test_the_ledger_refuses_to_be_rewritten(pool: asyncpg.Pool, statement: str) -> None:
    account = await make_account(pool, balance_micros=5_000)
    await billed_request(pool, account, hold_micros=1_000, cost_micros=700)
    with pytest.raises(asyncpg.PostgresError) as refused:
        await pool.execute(statement)
    assert refused.value.sqlstate == "ML002"
    assert await pool.fetchval("SELECT count(*) FROM transfers") == 2
    assert await pool.fetchval("SELECT count(*) FROM holds") == 1
