"""`python -m bench.console`: how long the console's pages take to render over a database of 1,000,000 billed
requests (issue 12's bar: well under a second).

It fills a fresh database with `--requests` request records (default 1,000,000) and their charge transfers, spread
over 90 days, 1,000 accounts with two keys each and 8 models, plus a top-up per account; builds the daily rollups
from the records (`meterline_rollup_rebuild`, timed too); then serves the gateway on loopback, signs in as an
admin and as a customer, and times each page (`--runs` times, default 5): the overview (30 days), the accounts
list and a search, the busiest account's page, the usage explorer (30 days by model, 90 days by account), the
customer's page, and every other console page this checkout has. Prints one JSON object: per page the median and
the slowest time in milliseconds, and the fill and rebuild times.

It runs on its own embedded PostgreSQL (pgserver) in a temporary directory, or on `--database-url` (a database it
may fill).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import aiohttp  # noqa: E402 - after making the project importable

from billing import db, schema  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.settings import load_settings  # noqa: E402
from tests.serving import running  # noqa: E402

ADMIN = "bench-console-admin-token-0123456789"
_FILL = """
INSERT INTO accounts (id, kind, name, credits_posted)
SELECT 'acct_bench_' || lpad(a::text, 4, '0'), 'customer', 'Bench customer ' || a, 1000000000000
  FROM generate_series(1, 1000) a;
INSERT INTO api_keys (id, account_id, name, prefix, digest)
SELECT 'key_bench_' || lpad(a::text, 4, '0') || '_' || k, 'acct_bench_' || lpad(a::text, 4, '0'), 'key ' || k,
       'ml-bench' || k, sha256(('bench ' || a || ' ' || k)::bytea)
  FROM generate_series(1, 1000) a, generate_series(1, 2) k;
INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, description,
                       balance_after_micros, created_at)
SELECT 'acct_bench_' || lpad(a::text, 4, '0'), 'op_funding', 'acct_bench_' || lpad(a::text, 4, '0'),
       1000000000000, 'topup', 'bench funding', 1000000000000, now() - interval '91 days'
  FROM generate_series(1, 1000) a;
"""
# Request i: account skewed towards the first ones (the busiest has ~1% of all), over the last 90 days.
_REQUESTS = """
WITH r AS (
    SELECT i, 'req_bench_' || i AS id,
           'acct_bench_' || lpad((1 + (floor(power(random(), 2) * 1000))::int % 1000)::text, 4, '0') AS account_id,
           now() - random() * interval '90 days' AS at,
           (ARRAY['acme/small', 'acme/large', 'vendor/fast', 'vendor/smart', 'img/one', 'img/two', 'vid/a',
                  'vid/b'])[1 + i % 8] AS model,
           (random() * 2000)::bigint AS prompt, (random() * 800)::bigint AS completion
      FROM generate_series($1::bigint, $2::bigint) i
), ins AS (
    INSERT INTO requests (id, account_id, key_id, model, modality, endpoint, upstream, status, billing_status,
                          prompt_tokens, completion_tokens, hold_micros, cost_micros, estimated, created_at,
                          finished_at)
    SELECT id, account_id, replace(account_id, 'acct_', 'key_') || '_' || (1 + i % 2), model,
           CASE WHEN model LIKE 'img/%' THEN 'image' WHEN model LIKE 'vid/%' THEN 'video' ELSE 'text' END,
           '/v1/chat/completions', 'openrouter', CASE WHEN i % 97 = 0 THEN 'upstream_failure' ELSE 'completed' END,
           'settled', prompt, completion, 5000, prompt + completion * 3, i % 53 = 0, at, at
      FROM r
    RETURNING id, account_id, cost_micros, estimated, finished_at
)
INSERT INTO transfers (account_id, debit_account_id, credit_account_id, amount_micros, kind, request_id,
                       estimated, balance_after_micros, created_at)
SELECT account_id, account_id, 'op_revenue', cost_micros, 'charge', id, estimated, 0, finished_at FROM ins
"""


async def _fill(url: str, count: int) -> dict[str, float]:
    conn = await db.connect(url)
    try:
        await schema.migrate(conn)
        started = time.perf_counter()
        await conn.execute(_FILL)
        step = 100_000
        for first in range(1, count + 1, step):
            await conn.execute(_REQUESTS, first, min(first + step - 1, count))
        filled = time.perf_counter() - started
        await conn.execute("ANALYZE")
        started = time.perf_counter()
        today = datetime.now(UTC).date()
        await conn.fetchval("SELECT meterline_rollup_rebuild($1, $2)", today - timedelta(days=92),
                            today + timedelta(days=1))
        rebuilt = time.perf_counter() - started
        await conn.execute("ANALYZE usage_daily")
        return {"fill_seconds": round(filled, 1), "rollup_rebuild_seconds": round(rebuilt, 2)}
    finally:
        await conn.close()


async def _session(http: aiohttp.ClientSession, base: str, secret: str) -> None:
    async with http.get(f"{base}/console/login") as page:
        token = re.search(r'name="login_csrf" value="([^"]+)"', await page.text())
    assert token is not None
    async with http.post(f"{base}/console/login", data={"login_csrf": token[1], "token": secret},
                         allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()


async def _time(http: aiohttp.ClientSession, url: str, runs: int) -> dict[str, Any]:
    took: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        async with http.get(url) as resp:
            await resp.read()
            assert resp.status == 200, (url, resp.status)
        took.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(took), 1), "max_ms": round(max(took), 1)}


async def run(url: str, count: int, runs: int) -> dict[str, Any]:
    result: dict[str, Any] = {"requests": count, **await _fill(url, count)}
    settings = load_settings(config=ROOT / "config" / "meterline.toml", database_url=url, admin_token=ADMIN,
                             remote_catalog=False)
    today = datetime.now(UTC).date()
    pages = {
        "overview (30 days)": "/console",
        "accounts": "/console/accounts",
        "accounts search": "/console/accounts?q=customer%2099",
        "busiest account": "/console/accounts/acct_bench_0001",
        "usage: cost by model, 30 days": "/console/usage?metric=cost&group_by=model",
        "usage: requests by account, 90 days":
            f"/console/usage?metric=requests&group_by=account&from={today - timedelta(days=89)}",
    }
    optional = {  # pages of other parts of the console, timed when this checkout has them
        "requests (all, newest first)": "/console/requests",
        "requests (one account, one model)": "/console/requests?account=acct_bench_0002&model=acme/small",
        "finance (30 days)": "/console/finance",
        "statement (busiest account, this month)": "/console/accounts/acct_bench_0001/statement",
        "videos": "/console/videos",
    }
    timings: dict[str, Any] = {}
    async with running(create_app(settings), handler_cancellation=False) as base:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as http:
            await _session(http, base, ADMIN)
            for name, path in pages.items():
                timings[name] = await _time(http, base + path, runs)
            for name, path in optional.items():
                async with http.get(base + path) as probe:
                    if probe.status == 404:
                        continue
                timings[name] = await _time(http, base + path, runs)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            secret = await _customer_key(url)
            await _session(http, base, secret)
            timings["customer page (busiest account)"] = await _time(http, f"{base}/console/me", runs)
    result["pages"] = timings
    return result


async def _customer_key(url: str) -> str:
    from billing import keys

    conn = await db.connect(url)
    try:
        _, secret = await keys.create_key(conn, account_id="acct_bench_0001", name="bench console")
        return secret
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.database_url:
        print(json.dumps(asyncio.run(run(args.database_url, args.requests, args.runs)), indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="meterline-console-bench-") as data:
        url = db.embedded_database_url(Path(data))
        print(json.dumps(asyncio.run(run(url, args.requests, args.runs)), indent=2))


if __name__ == "__main__":
    main()
