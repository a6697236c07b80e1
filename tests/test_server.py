"""The running server: health, readiness, its own hold sweeper, and no input that produces a 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import ledger
from billing.verify import verify
from tests.conftest import admin_headers
from tests.factories import make_account, request_id


async def test_health_and_readiness(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready" and body["checks"]["database"] == "ok"


async def test_the_server_sweeps_expired_holds_by_itself(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=5_000)
    rid = request_id()
    await ledger.reserve(pool, request_id=rid, account_id=account, amount_micros=3_000, ttl_seconds=0.1)
    assert await ledger.available_micros(pool, account) == 2_000
    for _ in range(50):  # the test app sweeps every 0.2 s
        if await pool.fetchval("SELECT state FROM holds WHERE request_id = $1", rid) == "expired":
            break
        await asyncio.sleep(0.1)
    assert await pool.fetchval("SELECT state FROM holds WHERE request_id = $1", rid) == "expired"
    assert await ledger.available_micros(pool, account) == 5_000
    assert await verify(pool, stale_after_seconds=0) == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={"amount_micros": JSON, "amount_usd": JSON, "description": JSON, "reason": JSON, "name": JSON},
)


async def test_no_admin_body_produces_a_500(client: TestClient, pool: asyncpg.Pool) -> None:
    account = await make_account(pool, balance_micros=1_000)
    paths = [f"/admin/accounts/{account}/topups", f"/admin/accounts/{account}/adjustments", "/admin/accounts",
             f"/admin/accounts/{account}/keys"]
    statuses: set[int] = set()

    # Hypothesis drives a sync function: run it in a worker thread, each example on this test's loop.
    loop = asyncio.get_running_loop()

    def run_in_thread() -> None:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        @given(body=FIELDS | JSON, path=st.sampled_from(paths), key=st.text(max_size=4))
        def probe_threaded(body: Any, path: str, key: str) -> None:
            async def send() -> None:
                headers = admin_headers(**({"Idempotency-Key": f"fuzz-{key}"} if key.isalnum() else {}))
                resp = await client.post(path, data=json.dumps(body), headers=headers)
                payload = await resp.json()
                statuses.add(resp.status)
                assert resp.status < 500, payload
                if resp.status >= 400:
                    assert set(payload["error"]) >= {"message", "type", "code", "param"}

            asyncio.run_coroutine_threadsafe(send(), loop).result(timeout=30)

        probe_threaded()

    await asyncio.to_thread(run_in_thread)
    assert 400 in statuses
    assert await verify(pool) == []
