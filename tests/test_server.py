"""The running server: health, readiness, its own hold sweeper, and no input that produces a 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import ledger
from billing.verify import verify
from tests.conftest import admin_headers
from tests.factories import make_account, make_customer, request_id


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


@pytest.mark.parametrize("path", [
    "/admin/accounts/a%00b", "/admin/accounts?cursor=a%00", "/v1/requests/req_%00", "/v1/requests?model=a%00b",
], ids=["admin-id", "admin-cursor", "request-id", "request-filter"])
async def test_a_nul_in_the_path_or_query_is_a_400(client: TestClient, pool: asyncpg.Pool, path: str) -> None:
    _, secret = await make_customer(pool)
    headers = admin_headers() if path.startswith("/admin") else {"Authorization": f"Bearer {secret}"}
    resp = await client.get(path, headers=headers)
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "INVALID_REQUEST")


@pytest.mark.parametrize("path", ["/admin/accounts", "/v1/chat/completions"], ids=["admin", "chat"])
async def test_a_body_nested_too_deeply_is_a_400(client: TestClient, pool: asyncpg.Pool, path: str) -> None:
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    headers = admin_headers() if path.startswith("/admin") else {"Authorization": f"Bearer {secret}"}
    nested = "[" * 100_000 + "]" * 100_000
    body = nested if path.startswith("/admin") else (
        '{"model": "google/gemini-3-flash-preview", "messages": [{"role": "user", "content": '
        + "[" * 5_000 + "]" * 5_000 + "}]}")
    resp = await client.post(path, data=body, headers={**headers, "Content-Type": "application/json"})
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "INVALID_REQUEST")
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
