"""The schema: numbered migrations, shipped inside the package and recorded in the database once applied.

`billing/migrations/NNNN_name.sql` are applied in order, each in its own transaction together with its row in
`meterline_migrations`, so a migration is applied exactly once and a failed one leaves nothing behind. Several
processes starting at once serialise on an advisory lock. `schema.sql` at the top of the repository is the whole
schema these files build, for readers; a test proves the two agree.

A process starting on a current database reads one row and takes no lock, so it never waits behind (or blocks)
a long export reading the ledger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

# Any constant works; it only has to be the same in every process that migrates.
_LOCK = 0x6D657465726C696E  # "meterlin"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_TABLE = """
CREATE TABLE IF NOT EXISTS meterline_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every shipped migration, in order. Versions are 1, 2, 3, ... without gaps (checked)."""
    found: list[Migration] = []
    for entry in resources.files("billing").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {[m.version for m in found]}")
    return found


async def applied(conn: asyncpg.Connection) -> list[int]:
    """The versions recorded in this database (none for a database no migration has touched)."""
    if not await conn.fetchval("SELECT to_regclass('meterline_migrations') IS NOT NULL"):
        return []
    rows = await conn.fetch("SELECT version FROM meterline_migrations ORDER BY version")
    return [int(row["version"]) for row in rows]


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration; returns the versions applied now (empty when the database is current)."""
    shipped = migrations()
    if await _current(conn, shipped):
        return []
    done: list[int] = []
    for migration in shipped:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            await conn.execute(_TABLE)
            if await conn.fetchval("SELECT true FROM meterline_migrations WHERE version = $1", migration.version):
                continue  # another process applied it while we waited for the lock
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO meterline_migrations (version, name) VALUES ($1, $2)",
                               migration.version, migration.name)
            done.append(migration.version)
    return done


async def _current(conn: asyncpg.Connection, shipped: list[Migration]) -> bool:
    return set(await applied(conn)) >= {m.version for m in shipped}
