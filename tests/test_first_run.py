"""The first run (issue 14): a fresh data directory gets an admin token that works, stored readable by its owner
only and printed once; later starts reuse it silently; `meterline admin-token` shows it; a configured one wins."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg

from tests.conftest import ROOT
from tests.serving import free_port


async def _serve_once(data_dir: Path, database_url: str, **extra: str) -> tuple[str, int]:
    """Start `meterline serve` on the data directory, make one admin call with the token it uses, stop it with
    SIGINT; returns its output and that call's status."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
           "METERLINE_DATA_DIR": str(data_dir), "METERLINE_DATABASE_URL": database_url,
           "METERLINE_REMOTE_CATALOG": "false", **extra}
    log = data_dir.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
                                                    cwd=ROOT, env=env, stdout=out, stderr=out)
    status = 0
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # bounded wait for start-up
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as ready:
                        if ready.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            token = extra.get("METERLINE_ADMIN_TOKEN") or (data_dir / "admin-token").read_text().strip()
            async with http.get(f"http://127.0.0.1:{port}/admin/accounts",
                                headers={"Authorization": f"Bearer {token}"}) as resp:
                status = resp.status
    finally:
        proc.send_signal(signal.SIGINT)
        await proc.wait()
    return log.read_text(errors="replace"), status


def _admin_token_command(data_dir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")},
           "METERLINE_DATA_DIR": str(data_dir), **extra}
    return subprocess.run([sys.executable, "-m", "gateway.cli", "admin-token"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


async def test_a_fresh_data_directory_gets_an_admin_token_shown_once_stored_for_its_owner_only(
        tmp_path: Path, database_url: str, pool: asyncpg.Pool) -> None:
    data_dir = tmp_path / "data"
    first, status = await _serve_once(data_dir, database_url)
    token = (data_dir / "admin-token").read_text().strip()
    assert status == 200 and re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert first.count(token) == 2  # the token itself, and in the ready curl line, once each
    assert stat.S_IMODE((data_dir / "admin-token").stat().st_mode) == 0o600
    second, status = await _serve_once(data_dir, database_url)
    assert status == 200 and token not in second
    shown = _admin_token_command(data_dir)
    assert (shown.returncode, shown.stdout.strip()) == (0, token)


async def test_a_configured_admin_token_wins_and_nothing_is_stored(tmp_path: Path, database_url: str,
                                                                    pool: asyncpg.Pool) -> None:
    data_dir = tmp_path / "data"
    output, status = await _serve_once(data_dir, database_url, METERLINE_ADMIN_TOKEN="configured-token-0123456789")
    assert status == 200 and not (data_dir / "admin-token").exists() and "configured-token" not in output
    missing = _admin_token_command(tmp_path / "elsewhere")
    assert missing.returncode == 1 and "meterline serve" in missing.stderr
