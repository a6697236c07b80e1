"""Where the database lives: the embedded PostgreSQL (pgserver), the connection pool, and the schema."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

# What every ledger call runs on: a connection (inside a caller's transaction) or the pool.
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema.sql"
# Any constant works; it only has to be the same in every process that applies the schema.
_SCHEMA_LOCK = 0x6D657465726C696E  # "meterlin"


def embedded_database_url(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL whose data lives in `data_dir` and return its URL.

    pgserver keeps one server per data directory, shared by every process that asks for it, and stops it when
    the last of them exits; the data stays in `data_dir` across restarts.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (as on CI machines); its fallback is fine.
        warnings.simplefilter("ignore")
        import pgserver  # imported lazily: only needed when no database URL is configured

        logging.getLogger("pgserver").setLevel(logging.WARNING)
        data_dir.mkdir(parents=True, exist_ok=True)
        server = pgserver.get_server(  # type: ignore[attr-defined]
            data_dir.resolve() / "pgdata", cleanup_mode="stop"
        )
    return str(server.get_uri())


# A JSON escape of U+0000 preceded by an even number of backslashes (an odd number would make it literal text).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def to_json(value: Any) -> str:
    """JSON text for a jsonb value. PostgreSQL cannot store U+0000 in jsonb (or text), and a request record
    must never be able to abort the settlement it rides with, so NUL characters are dropped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return _NUL_ESCAPE.sub(r"\1", text) if "\\u0000" in text else text


def clean_text(value: str) -> str:
    """`value` without NUL characters, which PostgreSQL text cannot hold."""
    return value.replace("\x00", "") if "\x00" in value else value


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=to_json, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's default reset query (an extra round trip on every release): pool
    users keep no session state (no SET, LISTEN, cursors or session advisory locks; the schema lock is
    transaction-scoped), and asyncpg still rolls back a transaction left open before calling this."""


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any) -> asyncpg.Pool:
    kwargs.setdefault("reset", _keep_session)
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection, **kwargs)
    assert pool is not None
    return pool


async def connect(url: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(url)
    await _init_connection(conn)
    return conn


async def apply_schema(conn: asyncpg.Connection, *, force: bool = False) -> bool:
    """Apply schema.sql unless this exact text was applied already (or `force`); returns whether it ran.

    Serialised by an advisory lock so that several processes may start at once. Skipping a current schema
    matters: re-running it takes exclusive table locks (DROP TRIGGER, ALTER TABLE), so a gateway starting while
    a long export reads `transfers` would otherwise stall every settlement until the export ends.
    """
    sql = SCHEMA_PATH.read_text(encoding="utf-8")
    digest = hashlib.sha256(sql.encode()).hexdigest()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
        if (not force and await conn.fetchval("SELECT to_regclass('meterline_schema') IS NOT NULL")
                and await conn.fetchval("SELECT digest FROM meterline_schema") == digest):
            return False
        await conn.execute(sql)
        await conn.execute(
            "INSERT INTO meterline_schema (id, digest) VALUES (true, $1)"
            " ON CONFLICT (id) DO UPDATE SET digest = excluded.digest, applied_at = now()", digest
        )
    return True


async def ping(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """A round trip to the database (readiness)."""
    await conn.fetchval("SELECT 1")


async def reset(conn: asyncpg.Connection) -> None:
    """Empty every table and restore the seed rows (tests use this between cases)."""
    tables = await conn.fetchval(
        "SELECT string_agg(format('%I', tablename), ', ') FROM pg_tables WHERE schemaname = 'public'"
    )
    await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE; SELECT meterline_seed();")
