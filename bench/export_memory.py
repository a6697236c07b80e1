"""Peak memory of the ledger export over 1,000,000 rows: the streamed HTTP route and the CLI.

Creates a scratch database on the given PostgreSQL server, bulk-loads N one-micro top-ups, then
  1. starts `meterline serve` on it, reads the server's peak RSS (VmHWM) before and after streaming
     GET /admin/exports/ledger (CSV, read and discarded by this script), and
  2. runs `meterline export ledger -o FILE` for an empty period and for all N rows and compares the child
     processes' peak RSS.
Constant memory means the figures barely move between 0 and N rows. Run once:

    python3 bench/export_memory.py --server-url postgresql://127.0.0.1:5432/test --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing import db, schema  # noqa: E402 - after making the project importable when run as a script

TOKEN = "bench-admin-token-0123456789"
FROM, TO = "2000-01-01T00:00:00Z", "2100-01-01T00:00:00Z"


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def load(server_url: str, name: str, rows: int) -> str:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(server_url, name)
    conn = await db.connect(url)
    try:
        await schema.migrate(conn)
        await conn.execute("INSERT INTO accounts (id, kind, name) VALUES ('acct_bench', 'customer', 'bench')")
        # One bulk statement (not N ledger calls): the export only reads transfers, and the cached balance is
        # set to match so `meterline verify` would still pass.
        await conn.execute(
            """
            INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind,
                                   description, balance_after_micros, created_at)
            SELECT 'acct_bench', 'op_funding', 'acct_bench', 1, 'topup', 'bench row ' || n, n,
                   timestamptz '2026-01-01' + n * interval '1 millisecond'
              FROM generate_series(1, $1) AS n
            """,
            rows,
        )
        await conn.execute("UPDATE accounts SET credits_posted = $1 WHERE id = 'acct_bench'", rows)
    finally:
        await conn.close()
    return url


def _env(url: str, config: Path) -> dict[str, str]:
    return {**os.environ, "METERLINE_DATABASE_URL": url, "METERLINE_ADMIN_TOKEN": TOKEN,
            "METERLINE_CONFIG": str(config)}


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def measure_server(url: str, config: Path) -> tuple[int, int, int, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)], cwd=ROOT, env=_env(url, config),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        return asyncio.run(_stream(proc.pid, f"http://127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait()


async def _stream(pid: int, base: str) -> tuple[int, int, int, float]:
    """Wait for the server, then stream the whole export and discard it; the server's peak RSS around it."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for _ in range(300):
            try:
                async with http.get(f"{base}/healthz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        before = _hwm_kib(pid)
        lines = 0
        started = time.perf_counter()
        async with http.get(f"{base}/admin/exports/ledger", params={"from": FROM, "to": TO}) as resp:
            resp.raise_for_status()
            async for chunk in resp.content.iter_any():
                lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
        return before, _hwm_kib(pid), lines - 1, elapsed


def measure_cli(url: str, config: Path, to: str, out: Path) -> tuple[int, float]:
    """Peak RSS (KiB) of one `meterline export` child: run it in a fresh helper process so that
    RUSAGE_CHILDREN sees only this export."""
    started = time.perf_counter()
    code = (
        "import resource, subprocess, sys\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "gateway.cli", "export", "ledger",
         "--from", FROM, "--to", to, "--format", "csv", "-o", str(out)],
        cwd=ROOT, env=_env(url, config), check=True, capture_output=True, text=True,
    )
    return int(result.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database", default="meterline_bench_export")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    url = asyncio.run(load(args.server_url, args.database, args.rows))
    print(f"loaded {args.rows:,} ledger rows into {args.database}")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.toml"
        config.write_text("sweep_interval_seconds = 60\n")
        before, after, lines, seconds = measure_server(url, config)
        print(f"server: peak RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after streaming "
              f"{lines:,} rows over HTTP ({seconds:.1f} s)")
        empty_kib, _ = measure_cli(url, config, "2000-01-02T00:00:00Z", Path(tmp) / "empty.csv")
        full_kib, seconds = measure_cli(url, config, TO, Path(tmp) / "full.csv")
        size = (Path(tmp) / "full.csv").stat().st_size
        print(f"cli: peak RSS {empty_kib / 1024:.1f} MiB for 0 rows, {full_kib / 1024:.1f} MiB for "
              f"{args.rows:,} rows ({size / 2**20:.0f} MiB of CSV, {seconds:.1f} s)")
    print(f"(this script itself: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB)")
    if not args.keep:

        async def drop() -> None:
            admin = await asyncpg.connect(args.server_url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
            finally:
                await admin.close()

        asyncio.run(drop())


if __name__ == "__main__":
    main()
