"""What one billed request costs in PostgreSQL: `meterline_reserve` then `meterline_settle`, one request at a time.

These are the two statements every chat call makes (the hold before forwarding, the charge before answering),
timed from the client over asyncpg as the gateway sends them (prepared, one statement per transaction), with a
typical request record, over 1,000 funded accounts with keys. Each is timed twice: with synchronous commit (what
Meterline runs: the WAL is flushed before the commit returns) and without it (diagnostic only: the difference is
the price of durability). The settlement is then broken down by leaving out one part of it at a time, in a copy of
the function created in this scratch database only; the versions take turns request by request, so the
differences are paired in time rather than taken between runs. The bench keys have no spend limit (the key's window
update then matches no row). Runs on a new embedded PostgreSQL unless given a server:

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
from billing import db, schema

RECORD = {"model": "bench-model", "modality": "text", "endpoint": "/v1/chat/completions", "upstream": "openrouter",
          "user": None, "prompt_tokens": 250, "completion_tokens": 16, "cached_tokens": 0, "reasoning_tokens": 0,
          "upstream_cost_micros": None, "status": "completed", "duration_ms": 1,
          "usage": {"prompt_tokens": 250, "completion_tokens": 16, "total_tokens": 266}}
ACCOUNTS = 1_000
# The whole schema, as the migrations build it: the settle function is read from here to time it part by part.
SCHEMA_SQL = Path(__file__).resolve().parent.parent / "schema.sql"

# Parts of meterline_settle left out one at a time (regex over the function's body in schema.sql).
_SETTLE_PARTS = {
    "the transfer (ledger row)": r"    INSERT INTO transfers .*?v_balance\);\n",
    "the request record": r"    PERFORM meterline_record\(.*?\);\n",
    "the hold's state change": r"    UPDATE holds SET state = 'settled'.*?WHERE holds\.request_id = p_request_id;\n",
    "the key's spend window": r"    PERFORM meterline_key_release\(.*?\);\n",
    "the draw from credit grants": r"    IF p_actual > 0 THEN  -- the charge is drawn.*?END IF;\n",
}


async def _setup(url: str, schema_sql: str) -> list[tuple[str, str]]:
    conn = await db.connect(url)
    try:
        await schema.migrate(conn)
        await conn.execute(
            "INSERT INTO accounts (id, kind, name, credits_posted) SELECT 'sqlb_' || i, 'customer', 'bench', "
            "1000000000000 FROM generate_series(1, $1) i ON CONFLICT DO NOTHING", ACCOUNTS)
        await conn.execute(
            "INSERT INTO api_keys (id, account_id, prefix, digest) SELECT 'sqlbk_' || i, 'sqlb_' || i, 'ml-', "
            "sha256(('sqlb-' || i)::bytea) FROM generate_series(1, $1) i ON CONFLICT DO NOTHING", ACCOUNTS)
        start = schema_sql.index("CREATE OR REPLACE FUNCTION meterline_settle(")
        settle = schema_sql[start:schema_sql.index("END $$;", start) + len("END $$;")]
        for n, pattern in enumerate(_SETTLE_PARTS.values()):
            variant, found = re.subn(pattern, "", settle, flags=re.S)
            if found != 1:
                raise SystemExit(f"schema.sql's meterline_settle no longer matches {pattern!r}: update _SETTLE_PARTS")
            await conn.execute(variant.replace("meterline_settle(", f"bench_settle_without_{n}(", 1))
        return [(f"sqlb_{i}", f"sqlbk_{i}") for i in range(1, ACCOUNTS + 1)]
    finally:
        await conn.close()


async def _time(url: str, accounts: list[tuple[str, str]], seconds: float, *, synchronous: bool,
                settles: tuple[str, ...] = ("meterline_settle",)) -> tuple[float, list[float], int]:
    """Median milliseconds of the reserve and of each settle function, over `seconds` of back-to-back requests;
    the settle functions take turns, one request each."""
    conn = await db.connect(url)
    try:
        await conn.execute(f"SET synchronous_commit = {'on' if synchronous else 'off'}")
        reserve_sql = "SELECT * FROM meterline_reserve($1, $2, 100, 200, 900000, $3)"
        settle_sqls = [f"SELECT * FROM {name}($1, 150, false, $2::jsonb)" for name in settles]
        reserves: list[float] = []
        settled: list[list[float]] = [[] for _ in settles]
        rng = random.Random(7)
        deadline = time.perf_counter() + seconds
        run = f"{time.time_ns():x}"
        while time.perf_counter() < deadline:
            account, key = accounts[rng.randrange(len(accounts))]
            turn = len(reserves) % len(settles)
            request_id = f"sqlb_req_{run}_{len(reserves)}"
            t0 = time.perf_counter()
            await conn.fetchrow(reserve_sql, request_id, account, key)
            t1 = time.perf_counter()
            await conn.fetchrow(settle_sqls[turn], request_id, RECORD)
            t2 = time.perf_counter()
            reserves.append(t1 - t0)
            settled[turn].append(t2 - t1)
        return (statistics.median(reserves) * 1e3, [statistics.median(times) * 1e3 for times in settled],
                len(reserves))
    finally:
        await conn.close()


async def _run(url: str, seconds: float) -> dict[str, Any]:
    accounts = await _setup(url, SCHEMA_SQL.read_text(encoding="utf-8"))
    await _time(url, accounts, min(seconds, 1.0), synchronous=True)  # warm caches and plans
    out: dict[str, Any] = {}
    for synchronous in (True, False):
        reserve, [settle], n = await _time(url, accounts, seconds, synchronous=synchronous)
        out["synchronous" if synchronous else "asynchronous"] = (reserve, settle, n)
    names = ("meterline_settle", *(f"bench_settle_without_{n}" for n in range(len(_SETTLE_PARTS))))
    _, settles, _ = await _time(url, accounts, seconds * len(names), synchronous=False, settles=names)
    out["settle without"] = {part: settles[0] - settles[n + 1] for n, part in enumerate(_SETTLE_PARTS)}
    out["settle alongside"] = settles[0]
    return out


def _filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (a tmpfs would make synchronous commit flush nothing)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server to create a scratch database on")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (more than 0)")
    args = parser.parse_args()
    if not args.seconds > 0:
        parser.error("--seconds must be more than 0")
    with tempfile.TemporaryDirectory() as tmp, meterline.database(args.database_url, Path(tmp)) as database:
        where = "a new embedded server, data on " + _filesystem(Path(tmp)) if args.database_url is None else \
            "a scratch database on the given server"
        results = asyncio.run(_run(database.url, args.seconds))
    sync_r, sync_s, n = results["synchronous"]
    async_r, async_s, _ = results["asynchronous"]
    print(f"median ms per statement, one request at a time ({n:,} requests with synchronous commit; {where}):")
    print(f"  {'':32} {'reserve':>8} {'settle':>8} {'both':>8}")
    print(f"  {'synchronous commit (as served)':32} {sync_r:8.3f} {sync_s:8.3f} {sync_r + sync_s:8.3f}")
    print(f"  {'without (diagnostic only)':32} {async_r:8.3f} {async_s:8.3f} {async_r + async_s:8.3f}")
    print(f"what each part of the settlement costs without synchronous commit (medians of settlements taking turns "
          f"with the whole one, {results['settle alongside']:.3f} ms):")
    for part, value in results["settle without"].items():
        print(f"  {part:32} {value * 1e3:+6.0f} µs")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
