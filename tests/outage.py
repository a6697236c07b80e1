"""Adversity for tests: an embedded PostgreSQL of the test's own that can be stopped and started again, and a wait
for a statement to block on a row lock (so a test can hold a money step mid-way, as a slow database would).

The session's shared server is never stopped; each outage test gets a fresh pgserver in a temporary directory. It
keeps its data and its socket path across a stop, so a gateway's database URL stays valid through the outage,
as it would for an operator restarting PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from billing import db, schema


class StoppablePostgres:
    def __init__(self, directory: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        self._pgserver: Any = pgserver
        self.directory = directory
        self.server = pgserver.get_server(directory / "pgdata", cleanup_mode=None)
        self.url = str(self.server.get_uri())

    def stop(self) -> None:
        """A fast shutdown, as `pg_ctl stop` does by default: sessions are terminated, nothing is lost."""
        self._pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    async def stopped(self) -> None:
        await asyncio.to_thread(self.stop)

    async def started(self) -> None:
        await asyncio.to_thread(self.start)

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped; the directory goes either way
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


async def backend_waiting_on(pool: Any, text: str) -> int:
    """The pid of the backend whose statement (containing `text`) waits on a lock."""
    for _ in range(1_000):  # a bound on waiting for the call to reach the lock, not a timing assertion
        pid = await pool.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            " AND query LIKE $1", f"%{text}%")
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waited on {text}")


@pytest.fixture
def stoppable_postgres() -> Iterator[StoppablePostgres]:
    server = StoppablePostgres(Path(tempfile.mkdtemp(prefix="meterline-outage-")))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def outage_pool(stoppable_postgres: StoppablePostgres) -> AsyncIterator[Any]:
    """A pool on the stoppable server, its schema applied (for the test's own reads and set-up)."""
    conn = await db.connect(stoppable_postgres.url)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()
    pool = await db.create_pool(stoppable_postgres.url, min_size=1, max_size=4)
    yield pool
    await pool.close()
