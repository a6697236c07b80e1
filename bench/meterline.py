"""The Meterline arm: a real PostgreSQL, customers funded through the billing functions, `meterline serve`
pointed at the fake upstream, and the correctness gates that every run must pass before it may report figures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.procs import ROOT, Service, cpu_seconds, descendants, free_port, python_module
from bench.upstream import MODEL
from billing import accounts, db, keys, ledger, schema

ADMIN_TOKEN = "bench-admin-token-" + "0" * 16
FUNDING_MICROS = 100_000 * 1_000_000  # $100,000 per account: no run comes near it
UPSTREAM_KEY_ENV = "METERLINE_BENCH_UPSTREAM_KEY"


@dataclass
class Database:
    url: str
    postmaster_pid: int | None  # known for the embedded server only; for its CPU time

    def cpu_seconds(self) -> float | None:
        if self.postmaster_pid is None:
            return None
        pids = [self.postmaster_pid, *descendants(self.postmaster_pid)]
        return sum(cpu_seconds(pid) for pid in pids)


@contextlib.contextmanager
def database(url: str | None, workdir: Path) -> Iterator[Database]:
    """A fresh database: a new embedded pgserver in `workdir`, or a new database on the server at `url`."""
    if url is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            server = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
        try:
            pid_file = workdir / "pgdata" / "postmaster.pid"
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
            yield Database(str(server.get_uri()), pid)
        finally:
            server.cleanup()
        return
    name = f"meterline_bench_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin_sql(url, f'CREATE DATABASE "{name}"'))
    try:
        yield Database(urlunsplit(urlsplit(url)._replace(path=f"/{name}")), None)
    finally:
        asyncio.run(_admin_sql(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin_sql(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Customers:
    hot_key: str
    spread_keys: list[str]
    initial_micros: int  # the sum of every bench account's funding


async def _create_customers(url: str, spread: int) -> Customers:
    pool = await db.create_pool(url, min_size=1, max_size=8)
    try:
        async with pool.acquire() as conn:
            await schema.migrate(conn)

        async def customer(name: str) -> str:
            async with pool.acquire() as conn:
                account = await accounts.create_account(conn, name=name)
                await ledger.post(conn, account_id=account["id"], kind="topup", amount_micros=FUNDING_MICROS,
                                  description="benchmark funding")
                _, secret = await keys.create_key(conn, account_id=account["id"], name="bench")
                return secret

        hot = await customer("bench-hot")
        spread_keys = []
        for start in range(0, spread, 50):
            spread_keys += await asyncio.gather(
                *(customer(f"bench-spread-{i}") for i in range(start, min(start + 50, spread))))
        return Customers(hot, spread_keys, FUNDING_MICROS * (1 + spread))
    finally:
        await pool.close()


def create_customers(url: str, spread: int) -> Customers:
    return asyncio.run(_create_customers(url, spread))


def write_config(workdir: Path, upstream_base: str) -> Path:
    """A settings file for the run: the fake upstream as `openrouter`, and the bench model priced locally at the
    same $1 / $2 per million tokens that the fake upstream's catalog advertises."""
    path = workdir / "meterline-bench.toml"
    path.write_text(f"""
host = "127.0.0.1"
data_dir = "{workdir / 'data'}"
hold_ttl_seconds = 900
sweep_interval_seconds = 5

[upstreams.openrouter]
base_url = "{upstream_base}"
api_key_env = "{UPSTREAM_KEY_ENV}"
connect_timeout_seconds = 5
timeout_seconds = 60

[upstreams.media]
base_url = "{upstream_base}"
api_key_env = "{UPSTREAM_KEY_ENV}"

[models."{MODEL}"]
modality = "text"
input_per_mtok_micros = 1000000
output_per_mtok_micros = 2000000
context_length = 131072
max_output_tokens = 4096
""", encoding="utf-8")
    return path


def environment(database_url: str, config: Path) -> dict[str, str]:
    return {
        "METERLINE_CONFIG": str(config),
        "METERLINE_DATABASE_URL": database_url,
        "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN,
        UPSTREAM_KEY_ENV: "upstream-secret-key",
    }


def serve_supports(flag: str) -> bool:
    out = subprocess.run(python_module("gateway.cli", "serve", "--help"), cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=False)
    return flag in out.stdout


def start(workdir: Path, env: dict[str, str], *, cpu: int | None, workers: int, name: str = "meterline") -> Service:
    port = free_port()
    argv = python_module("gateway.cli", "serve", "--port", str(port))
    if workers > 1:
        argv += ["--workers", str(workers)]
    service = Service(name, argv, port=port, log=workdir / f"{name}.log", env=env, cpu=cpu)
    service.wait_ready()
    return service


@dataclass
class Ledgerbook:
    """What the clients saw from Meterline, to be checked against the ledger afterwards."""

    ok: int = 0
    cost_sum: int = 0
    bad: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def add(self, result: dict[str, Any], arm: str) -> None:
        ok = int(result["ok"])
        ids = result.get("ids", [])
        self.ok += ok
        self.cost_sum += int(result["cost_sum"])
        self.ids += ids
        statuses = {k: v for k, v in result["statuses"].items() if not k.startswith("2")}
        if statuses or result["errors"]:
            self.bad.append(f"{arm}: non-2xx responses {statuses}, transport errors {result['errors']}")
        if result["missing_cost"]:
            self.bad.append(f"{arm}: {result['missing_cost']} successful responses carried no cost")
        if result.get("bad_streams"):
            self.bad.append(f"{arm}: {result['bad_streams']} streams lost chunks or their terminator")
        if len(ids) != ok:
            self.bad.append(f"{arm}: {ok - len(ids)} successful responses had no X-Request-Id")


async def _gates(url: str, customers: Customers, book: Ledgerbook) -> list[str]:
    failures = list(book.bad)
    conn = await asyncpg.connect(url)
    try:
        # Holds end with their calls; quota grants are given back once idle (quota_idle_seconds, 10 s).
        deadline = time.monotonic() + 30
        pending = quotas = 0
        while time.monotonic() < deadline:
            pending = await conn.fetchval("SELECT count(*) FROM holds WHERE state = 'pending'")
            quotas = await conn.fetchval("SELECT count(*) FROM quotas WHERE state = 'pending'")
            if pending == 0 and quotas == 0:
                break
            await asyncio.sleep(0.2)
        if pending:
            failures.append(f"{pending} holds are still pending after the run")
        if quotas:
            failures.append(f"{quotas} quota grants are still pending 30 s after the run")
        balance, held = await conn.fetchrow(
            "SELECT COALESCE(sum(credits_posted - debits_posted), 0), COALESCE(sum(held_micros), 0)"
            " FROM accounts WHERE kind = 'customer'")
        charges = await conn.fetch("SELECT request_id, amount_micros FROM transfers WHERE kind = 'charge'")
        settled = await conn.fetchval("SELECT count(*) FROM holds WHERE state = 'settled'")
    finally:
        await conn.close()
    drop = customers.initial_micros - balance
    charged = sum(r["amount_micros"] for r in charges)
    if held:
        failures.append(f"{held} micros are still held")
    if drop != charged:
        failures.append(f"the balances dropped by {drop} micros but the charges sum to {charged}")
    if drop != book.cost_sum:
        failures.append(f"the balances dropped by {drop} micros but the responses reported {book.cost_sum}")
    if settled != len(charges):
        failures.append(f"{settled} holds are settled but there are {len(charges)} charges")
    charged_ids = {r["request_id"] for r in charges}
    seen = set(book.ids)
    if len(seen) != len(book.ids):
        failures.append(f"{len(book.ids) - len(seen)} request ids were answered twice")
    if len(charges) != book.ok:
        failures.append(f"{book.ok} successful responses but {len(charges)} charges")
    if seen - charged_ids:
        failures.append(f"{len(seen - charged_ids)} successful responses have no settled charge")
    if charged_ids - seen:
        failures.append(f"{len(charged_ids - seen)} charges match no successful response")
    return failures


def gates(url: str, config: Path, customers: Customers, book: Ledgerbook) -> list[str]:
    """Every correctness gate; an empty list means the run may report its figures."""
    failures = asyncio.run(_gates(url, customers, book))
    out = subprocess.run(python_module("gateway.cli", "verify"), cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **environment(url, config)}, timeout=120, check=False)
    if out.returncode != 0:
        failures.append(f"`meterline verify` failed ({out.returncode}): {out.stderr.strip()[-1000:]}")
    return failures


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="meterline-bench-"))
