"""Where the database lives: the embedded PostgreSQL (pgserver) and the connections to it.

Every connection Meterline opens is a `Connection`, whose queries translate the failures that mean "the database
is not answering" (refused or lost connections, a server shutting down, a statement past the command timeout)
into one `DatabaseUnavailable`, exactly once, here. Whatever else PostgreSQL answers (a constraint, a bad value)
passes through as asyncpg raised it. Each pool (or lone connection) reports to a `Health`, which logs one line
when the database goes away and one when it is back, rather than one per failed query.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

from billing.errors import DatabaseUnavailable

# What every ledger call runs on: a connection (inside a caller's transaction) or the pool.
Executor: TypeAlias = asyncpg.Connection | asyncpg.Pool



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
    """JSON text for a jsonb value. PostgreSQL cannot store U+0000 in jsonb (or text), nor can a lone UTF-16
    surrogate be encoded for it, and a request record must never be able to abort the settlement it rides with:
    NUL characters are dropped and lone surrogates become U+FFFD."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if "\\u0000" in text:
        text = _NUL_ESCAPE.sub(r"\1", text)
    return text if text.isascii() else _without_surrogates(text)


def clean_text(value: str) -> str:
    """`value` as PostgreSQL text can hold it: without NUL characters, lone surrogates as U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value if value.isascii() else _without_surrogates(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


log = logging.getLogger("meterline.database")

# How long one statement may run before the database counts as hung (overridable per call with `timeout=`), and
# how long opening a connection may take.
COMMAND_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0


class Health:
    """Whether the database answered the last query, and one log line per change of that. A failure within
    RECOVERY_SETTLING_SECONDS of a recovery (a connection that died with the server failing its last query while
    the pool reconnects) belongs to the outage just over: it is not announced as a new one."""

    RECOVERY_SETTLING_SECONDS = 5.0

    def __init__(self, name: str = "database") -> None:
        self.name = name
        self.down_since: float | None = None  # monotonic time of the first failure of this outage
        self._announced = False  # this outage was logged, so its end will be
        self._recovered_at = -math.inf

    @property
    def available(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is not None:
            return
        self.down_since = time.monotonic()
        self._announced = self.down_since - self._recovered_at > self.RECOVERY_SETTLING_SECONDS
        if self._announced:
            log.warning("%s unavailable (%s); database routes answer 503 and settlements are retried until it "
                        "answers", self.name, _reason(exc))

    def answered(self) -> None:
        if self.down_since is None:
            return
        self._recovered_at = time.monotonic()
        if self._announced:
            log.info("%s available again after %.1fs", self.name, self._recovered_at - self.down_since)
        self.down_since = None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# Failures that mean the database is not answering, as opposed to an answer about the query itself.
_UNAVAILABLE = (
    OSError,  # refused, reset, no socket file (the embedded server is stopped)
    TimeoutError,  # the command timeout, or the connect timeout
    asyncpg.PostgresConnectionError,  # class 08, including a connection lost mid-query
    asyncpg.OperatorInterventionError,  # class 57: shutting down, starting up, statement cancelled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.TransactionRollbackError,  # class 40: a deadlock or serialization failure; retrying is the cure
    asyncpg.InterfaceError,  # "connection is closed": only when the connection really is (see _translated)
    asyncpg.exceptions._base.InternalClientError,  # a protocol left mid-operation by a lost connection (likewise)
)
_ONLY_IF_CLOSED = (asyncpg.InterfaceError, asyncpg.exceptions._base.InternalClientError)
# InterfaceErrors that are about the caller's own use of the driver, never about the database's availability.
_CLIENT_FAULTS = (asyncpg.exceptions._base.DataError, asyncpg.ClientConfigurationError,
                  asyncpg.UnsupportedClientFeatureError)


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, with availability failures translated into DatabaseUnavailable."""

    __slots__ = ("health",)

    def _translated(self, exc: BaseException) -> BaseException:
        misuse = isinstance(exc, _CLIENT_FAULTS) or (isinstance(exc, _ONLY_IF_CLOSED) and not self.is_closed())
        if misuse:
            return exc  # a driver misuse on a live connection: a bug to see, not an outage
        health: Health | None = getattr(self, "health", None)
        if health is not None:
            health.failed(exc)
        return DatabaseUnavailable(f"the database is unavailable ({_reason(exc)})")

    def _answered(self) -> None:
        health: Health | None = getattr(self, "health", None)
        if health is not None and health.down_since is not None:
            health.answered()

    def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                    deferrable: bool = False) -> _Transaction:
        return _Transaction(self, super().transaction(isolation=isolation, readonly=readonly,
                                                      deferrable=deferrable))

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        try:
            result: str = await super().execute(query, *args, timeout=timeout)
        except _UNAVAILABLE as exc:
            raise self._translated(exc) from exc
        self._answered()
        return result

    async def executemany(self, command: str, args: Any, *, timeout: float | None = None) -> None:
        try:
            await super().executemany(command, args, timeout=timeout)
        except _UNAVAILABLE as exc:
            raise self._translated(exc) from exc
        self._answered()

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: Any = None) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await super().fetch(query, *args, timeout=timeout,
                                                             record_class=record_class)
        except _UNAVAILABLE as exc:
            raise self._translated(exc) from exc
        self._answered()
        return rows

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: Any = None) -> asyncpg.Record | None:
        try:
            row: asyncpg.Record | None = await super().fetchrow(query, *args, timeout=timeout,
                                                                record_class=record_class)
        except _UNAVAILABLE as exc:
            raise self._translated(exc) from exc
        self._answered()
        return row

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        try:
            value = await super().fetchval(query, *args, column=column, timeout=timeout)
        except _UNAVAILABLE as exc:
            raise self._translated(exc) from exc
        self._answered()
        return value


class _Transaction:
    """asyncpg's transaction block, whose BEGIN, COMMIT and ROLLBACK are translated like any query (asyncpg checks
    the connection itself there, outside the connection's query methods)."""

    __slots__ = ("_conn", "_inner")

    def __init__(self, conn: Connection, inner: Any) -> None:
        self._conn = conn
        self._inner = inner

    async def __aenter__(self) -> None:
        try:
            await self._inner.__aenter__()
        except _UNAVAILABLE as exc:
            raise self._conn._translated(exc) from exc

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            await self._inner.__aexit__(*exc_info)
        except _UNAVAILABLE as exc:
            raise self._conn._translated(exc) from exc

    async def start(self) -> None:
        try:
            await self._inner.start()
        except _UNAVAILABLE as exc:
            raise self._conn._translated(exc) from exc

    async def commit(self) -> None:
        try:
            await self._inner.commit()
        except _UNAVAILABLE as exc:
            raise self._conn._translated(exc) from exc

    async def rollback(self) -> None:
        try:
            await self._inner.rollback()
        except _UNAVAILABLE as exc:
            raise self._conn._translated(exc) from exc


class _QuietOutages(logging.Filter):
    """asyncpg's pool logs each failed attempt to restore its connection floor with a traceback; an outage is
    logged once by Health instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DatabaseUnavailable))


_QUIET = _QuietOutages()


def _connector(health: Health | None) -> Any:
    """The pool's `connect`: opens a `Connection` reporting to `health`; a failure to connect is translated (no
    statement ran)."""

    async def connect(*args: Any, **kwargs: Any) -> Connection:
        kwargs.setdefault("timeout", CONNECT_TIMEOUT_SECONDS)
        try:
            conn: Connection = await asyncpg.connect(*args, **kwargs)
        except _UNAVAILABLE as exc:
            if health is not None:
                health.failed(exc)
            raise DatabaseUnavailable(f"the database is unavailable ({_reason(exc)})", before_query=True) from exc
        conn.health = health
        return conn

    return connect


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=to_json, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections skip asyncpg's default reset query (an extra round trip on every release): pool
    users keep no session state (no SET, LISTEN, cursors or session advisory locks; the schema lock is
    transaction-scoped), and asyncpg still rolls back a transaction left open before calling this."""


async def create_pool(url: str, *, min_size: int = 2, max_size: int = 10, health: Health | None = None,
                      command_timeout: float = COMMAND_TIMEOUT_SECONDS, **kwargs: Any) -> asyncpg.Pool:
    """A pool of `Connection`s. A database that does not answer when the pool opens raises DatabaseUnavailable."""
    kwargs.setdefault("reset", _keep_session)
    logging.getLogger("asyncpg.pool").addFilter(_QUIET)  # the same filter object: adding it again does nothing
    pool = await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_connection,
                                     connect=_connector(health), connection_class=Connection,
                                     command_timeout=command_timeout, **kwargs)
    assert pool is not None
    return pool


async def connect(url: str, *, health: Health | None = None,
                  command_timeout: float = COMMAND_TIMEOUT_SECONDS) -> Connection:
    conn: Connection = await _connector(health)(url, connection_class=Connection, command_timeout=command_timeout)
    await _init_connection(conn)
    return conn


def pool_usage(pool: asyncpg.Pool) -> tuple[int, int]:
    """The pool's connections in use, and the callers waiting for one (a full pool). asyncpg counts waiters only in
    its pool's queue of free connections (an asyncio.Queue), so they are read there; 0 if that ever changes."""
    in_use = pool.get_size() - pool.get_idle_size()
    getters = getattr(getattr(pool, "_queue", None), "_getters", None)
    waiting = sum(1 for waiter in getters if not waiter.done()) if getters is not None else 0
    return in_use, waiting


async def ping(conn: asyncpg.Connection | asyncpg.Pool, *, timeout: float | None = None) -> None:
    """A round trip to the database (readiness); DatabaseUnavailable when it does not answer."""
    await conn.fetchval("SELECT 1", timeout=timeout)
