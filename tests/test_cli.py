"""The `meterline` command, run as a real subprocess against the test database (and once on its own
embedded PostgreSQL, to show that data survives a restart)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from billing import schema
from tests.conftest import ADMIN_TOKEN
from tests.serving import meterline_serve

ROOT = Path(__file__).resolve().parent.parent


def meterline(*args: str, database_url: str | None, extra_env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    if database_url:
        env["METERLINE_DATABASE_URL"] = database_url
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


async def test_migrate_is_harmless_to_repeat(pool: asyncpg.Pool, database_url: str) -> None:
    latest = schema.migrations()[-1].version
    for _ in range(2):  # the session's database is already current: nothing is applied, the version is reported
        assert json.loads(meterline("migrate", database_url=database_url).stdout) == {
            "object": "migrations", "applied_now": [], "schema_version": latest}
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE kind <> 'customer'") == 5


async def test_admin_mirrors_print_json_and_topup_is_idempotent(pool: asyncpg.Pool, database_url: str) -> None:
    account: dict[str, Any] = json.loads(meterline("accounts", "create", "--name", "Acme",
                                                   database_url=database_url).stdout)
    assert (account["name"], account["balance_micros"]) == ("Acme", 0)
    key = json.loads(meterline("keys", "create", "--account", account["id"], database_url=database_url).stdout)
    assert key["key"].startswith("ml-") and key["account_id"] == account["id"]
    topup = ["topup", "--account", account["id"], "--amount-usd", "7.25", "--idempotency-key", "cli-1"]
    first = json.loads(meterline(*topup, database_url=database_url).stdout)
    again = json.loads(meterline(*topup, database_url=database_url).stdout)
    assert (first["balance_micros"], first["replayed"]) == (7_250_000, False)
    assert (again["balance_micros"], again["replayed"]) == (7_250_000, True)
    assert await pool.fetchval("SELECT count(*) FROM transfers") == 1


async def test_keys_are_created_with_and_switched_to_detailed_logging(pool: asyncpg.Pool, database_url: str) -> None:
    account = json.loads(meterline("accounts", "create", "--name", "Acme", database_url=database_url).stdout)
    plain = json.loads(meterline("keys", "create", "--account", account["id"], database_url=database_url).stdout)
    logged = json.loads(meterline("keys", "create", "--account", account["id"], "--detailed-logging",
                                  database_url=database_url).stdout)
    assert (plain["detailed_logging"], logged["detailed_logging"]) == (False, True)
    switched = json.loads(meterline("keys", "update", plain["id"], "--detailed-logging", "on",
                                    database_url=database_url).stdout)
    assert switched["detailed_logging"] is True and "key" not in switched
    assert await pool.fetchval("SELECT bool_and(detailed_logging) FROM api_keys") is True
    missing = meterline("keys", "update", "key_nope", "--detailed-logging", "off", database_url=database_url,
                        check=False)
    assert missing.returncode != 0 and "key_nope" in missing.stderr


async def test_cli_errors_exit_non_zero_with_a_message(pool: asyncpg.Pool, database_url: str) -> None:
    bad = meterline("topup", "--account", "acct_x", "--amount-usd", "1.0000001", "--idempotency-key", "k",
                    database_url=database_url, check=False)
    assert bad.returncode == 1 and "finer than one micro" in bad.stderr
    missing = meterline("topup", "--account", "acct_x", "--amount-usd", "1", "--idempotency-key", "k",
                        database_url=database_url, check=False)
    assert missing.returncode == 1 and "acct_x" in missing.stderr
    setting = meterline("migrate", database_url=database_url, extra_env={"METERLINE_PORT": "x"}, check=False)
    assert setting.returncode == 2 and "invalid setting port" in setting.stderr


async def test_verify_exits_non_zero_naming_the_violation(pool: asyncpg.Pool, database_url: str) -> None:
    account = json.loads(meterline("accounts", "create", "--name", "A", database_url=database_url).stdout)
    meterline("topup", "--account", account["id"], "--amount-usd", "1", "--idempotency-key", "v",
              database_url=database_url)
    assert meterline("verify", database_url=database_url).returncode == 0
    await pool.execute("UPDATE accounts SET held_micros = 5 WHERE id = $1", account["id"])
    broken = meterline("verify", database_url=database_url, check=False)
    assert broken.returncode == 1
    assert f"cached-holds: account {account['id']} caches 5 micros held" in broken.stderr


@pytest.mark.timeout(180)
async def test_serve_on_the_embedded_database_keeps_data_across_restarts(tmp_path: Path) -> None:
    """No database URL: `meterline serve` starts its own PostgreSQL in METERLINE_DATA_DIR, which stops with the
    last process using it; a second start finds the data again."""
    env = {"METERLINE_DATA_DIR": str(tmp_path), "METERLINE_ADMIN_TOKEN": ADMIN_TOKEN}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        meterline_serve(env) as (base, _),
        aiohttp.ClientSession(headers=admin) as http,
        http.post(f"{base}/admin/accounts", json={"name": "persisted"}) as resp,
    ):
        assert resp.status == 201
        created = await resp.json()
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists()  # the embedded server stopped with it
    async with (
        meterline_serve(env) as (base, _),
        aiohttp.ClientSession(headers=admin) as http,
        http.get(f"{base}/admin/accounts/{created['id']}") as resp,
    ):
        assert (resp.status, (await resp.json())["name"]) == (200, "persisted")
