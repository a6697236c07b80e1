"""What one billed request costs in PostgreSQL: `meterline_reserve` then `meterline_settle`, one request at a time.

These are the two statements every chat call makes (the hold before forwarding, the charge before answering),
timed from the client over asyncpg as the gateway sends them (prepared, one statement per transaction), with a
typical request record, over 1,000 funded accounts with keys. Each is timed twice: with synchronous commit (what
Meterline runs: the WAL is flushed before the commit returns) and without it (diagnostic only: the difference is
the price of durability). The settlement is then broken down by leaving out one part of it at a time, in a copy of
the function created in this scratch database only. Runs on a new embedded PostgreSQL unless given a server:

    python -m bench.ledger_sql [--database-url postgresql://127.0.0.1:5432/test] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import meterline
from billing import db

RECORD = {"model": "bench-model", "modality": "text", "endpoint": "/v1/chat/completions", "upstream": "openrouter",
          "user": None, "prompt_tokens": 250, "completion_tokens": 16, "cached_tokens": 0, "reasoning_tokens": 0,
          "upstream_cost_micros": None, "status": "completed", "duration_ms": 1,
          "usage": {"prompt_tokens": 250, "completion_tokens": 16, "total_tokens": 266}}
ACCOUNTS = 1_000

# Parts of meterline_settle left out one at a time (regex over the function's body in schema.sql).
_SETTLE_PARTS = {
    "the transfer (ledger row)": r"    INSERT INTO transfers .*?v_balance\);\n",
    "the request record": r"    PERFORM meterline_record\(.*?\);\n",
    "the hold's state change": r"    UPDATE holds SET state = 'settled'.*?WHERE holds\.request_id = p_request_id;\n",
    "the key's spend window": r"    PERFORM meterline_key_release\(.*?\);\n",
}


async def _setup(url: str, schema: str) -> list[tuple[str, str]]:
    conn = await db.connect(url)
    try:
        await db.apply_schema(conn)
        await conn.execute(
            "INSERT INTO accounts (id, kind, name, credits_posted) SELECT 'sqlb_' || i, 'customer', 'bench', "
            "1000000000000 FROM generate_series(1, $1) i ON CONFLICT DO NOTHING", ACCOUNTS)
        await conn.execute(
            "INSERT INTO api_keys (id, account_id, prefix, digest) SELECT 'sqlbk_' || i, 'sqlb_' || i, 'ml-', "
            "sha256(('sqlb-' || i)::bytea) FROM generate_series(1, $1) i ON CONFLICT DO NOTHING", ACCOUNTS)
        start = schema.index("CREATE OR REPLACE FUNCTION meterline_settle(")
        settle = schema[start:schema.index("END $$;", start) + len("END $$;")]
        for n, pattern in enumerate(_SETTLE_PARTS.values()):
            variant, found = re.subn(pattern, "", settle, flags=re.S)
            assert found == 1, pattern
            await conn.execute(variant.replace("meterline_settle(", f"bench_settle_without_{n}(", 1))
        return [(f"sqlb_{i}", f"sqlbk_{i}") for i in range(1, ACCOUNTS + 1)]
    finally:
        await conn.close()


async def _time(url: str, accounts: list[tuple[str, str]], seconds: float, *, synchronous: bool,
                settle: str = "meterline_settle") -> tuple[float, float, int]:
    """Median milliseconds of (reserve, settle) over `seconds` of back-to-back requests."""
    conn = await db.connect(url)
    try:
        await conn.execute(f"SET synchronous_commit = {'on' if synchronous else 'off'}")
        reserve_sql = "SELECT * FROM meterline_reserve($1, $2, 100, 200, 900000, $3)"
        settle_sql = f"SELECT * FROM {settle}($1, 150, false, $2::jsonb)"
        reserves: list[float] = []
        settles: list[float] = []
        rng = random.Random(7)
        deadline = time.perf_counter() + seconds
        run = f"{time.time_ns():x}"
        while time.perf_counter() < deadline:
            account, key = accounts[rng.randrange(len(accounts))]
            request_id = f"sqlb_req_{run}_{len(reserves)}"
            t0 = time.perf_counter()
            await conn.fetchrow(reserve_sql, request_id, account, key)
            t1 = time.perf_counter()
            await conn.fetchrow(settle_sql, request_id, RECORD)
            t2 = time.perf_counter()
            reserves.append(t1 - t0)
            settles.append(t2 - t1)
        return statistics.median(reserves) * 1e3, statistics.median(settles) * 1e3, len(reserves)
    finally:
        await conn.close()


async def _run(url: str, seconds: float) -> dict[str, Any]:
    accounts = await _setup(url, db.SCHEMA_PATH.read_text(encoding="utf-8"))
    await _time(url, accounts, min(seconds, 1.0), synchronous=True)  # warm caches and plans
    out: dict[str, Any] = {}
    for synchronous in (True, False):
        out["synchronous" if synchronous else "asynchronous"] = await _time(url, accounts, seconds,
                                                                            synchronous=synchronous)
    out["settle without"] = {
        part: (await _time(url, accounts, seconds, synchronous=False, settle=f"bench_settle_without_{n}"))[1]
        for n, part in enumerate(_SETTLE_PARTS)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, meterline.database(args.database_url, Path(tmp)) as database:
        results = asyncio.run(_run(database.url, args.seconds))
    sync_r, sync_s, n = results["synchronous"]
    async_r, async_s, _ = results["asynchronous"]
    print(f"median ms per statement, one request at a time ({n:,} requests with synchronous commit):")
    print(f"  {'':32} {'reserve':>8} {'settle':>8} {'both':>8}")
    print(f"  {'synchronous commit (as served)':32} {sync_r:8.3f} {sync_s:8.3f} {sync_r + sync_s:8.3f}")
    print(f"  {'without (diagnostic only)':32} {async_r:8.3f} {async_s:8.3f} {async_r + async_s:8.3f}")
    print("settle without synchronous commit, leaving out one part (what that part costs):")
    for part, value in results["settle without"].items():
        print(f"  {part:32} {value:8.3f}  ({(async_s - value) * 1e3:+.0f} µs)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
