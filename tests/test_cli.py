"""The `meterline` command, run as a real subprocess against the test database (and once on its own
embedded PostgreSQL, to show that data survives a restart)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import ADMIN_TOKEN

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
    for _ in range(2):
        assert "schema applied" in meterline("migrate", database_url=database_url).stdout
    assert await pool.fetchval("SELECT count(*) FROM accounts WHERE kind <> 'customer'") == 3


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _serve(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    env.update(METERLINE_DATA_DIR=str(data_dir), METERLINE_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"meterline serve exited: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("meterline serve did not become ready")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


@pytest.mark.timeout(180)
def test_serve_on_the_embedded_database_keeps_data_across_restarts(tmp_path: Path) -> None:
    import warnings

    port = _free_port()
    proc = _serve(tmp_path, port)
    try:
        body = json.dumps({"name": "persisted"}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/admin/accounts", data=body, method="POST",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as resp:
            created = json.loads(resp.read())
    finally:
        _stop(proc)
    proc = _serve(tmp_path, port)
    try:
        status, account = _get(f"http://127.0.0.1:{port}/admin/accounts/{created['id']}", ADMIN_TOKEN)
        assert (status, account["name"]) == (200, "persisted")
    finally:
        _stop(proc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            pgserver.get_server(tmp_path / "pgdata", cleanup_mode="stop").cleanup()
