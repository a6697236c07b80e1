"""Quota grants (billing.quotas, issue 17): a process admits calls against its quota in memory and charges each one
exactly; holds and quotas never exceed the balance; K-of-N admission stays exact; a quota is given back when idle
or when a call would otherwise be refused; a key with a spend limit never uses one."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from billing import reports
from billing.limits import set_key_limits
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream
from tests.serving import meterline_serve

MESSAGES = [{"role": "user", "content": "Say hello."}]
MAX_TOKENS = 1_000
EXACT = 16  # min_output_tokens: a per-call hold for it cannot be partial


@pytest.fixture
async def quota_client(aiohttp_client: Any, settings: Settings, openrouter_server: Any, pool: asyncpg.Pool,
                       monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    quota_settings = point_at(settings, openrouter_server, quotas=True, quota_beat_seconds=0.05,
                              quota_min_calls=1, quota_share_ppm=500_000, quota_idle_seconds=1.0)
    client: TestClient = await aiohttp_client(create_app(quota_settings))
    return client


async def chat(client: TestClient, secret: str, max_tokens: int = MAX_TOKENS) -> aiohttp.ClientResponse:
    return await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens})


async def worst_case(client: TestClient, secret: str, max_tokens: int = MAX_TOKENS) -> int:
    resp = await client.post("/v1/chat/completions?dryRun=true", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens})
    assert resp.status == 200
    total: int = (await resp.json())["total_cost_micros"]
    return total


async def until(predicate: Any, what: str, seconds: float = 10.0) -> Any:
    for _ in range(int(seconds / 0.02)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


async def pending_quota(pool: asyncpg.Pool, account_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM quotas WHERE account_id = $1 AND state = 'pending'", account_id)


async def test_calls_under_a_quota_are_admitted_without_a_hold_and_charged_exactly(
        quota_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream) -> None:
    account_id, secret = await make_customer(pool, balance_micros=50_000_000)
    first = await chat(quota_client, secret)
    assert first.status == 200
    quota = await until(lambda: pending_quota(pool, account_id), "a quota is taken after the first call")
    assert quota["holder"].count(":") == 2 and quota["amount_micros"] > 0
    costs = []
    for _ in range(5):
        resp = await chat(quota_client, secret)
        assert resp.status == 200
        costs.append(int(resp.headers["X-Cost-Micros"]))
    holds = await pool.fetch("SELECT * FROM holds WHERE account_id = $1 ORDER BY created_at", account_id)
    # The first call took a per-call hold; the other five were charged under the quota, one hold row each, born
    # settled, holding the call's worst case and charged its usage.
    assert [h["quota_id"] for h in holds] == [None] + [quota["id"]] * 5
    assert [h["state"] for h in holds] == ["settled"] * 6
    assert [h["actual_micros"] for h in holds[1:]] == costs
    charges = await pool.fetch("SELECT request_id, amount_micros FROM transfers WHERE kind = 'charge'"
                               " AND account_id = $1", account_id)
    assert sorted(c["amount_micros"] for c in charges) == sorted([int(first.headers["X-Cost-Micros"]), *costs])
    records = await pool.fetchval("SELECT count(*) FROM requests WHERE account_id = $1", account_id)
    assert records == 6
    row = await pool.fetchrow("SELECT * FROM quotas WHERE id = $1", quota["id"])
    assert row["drawn_micros"] == sum(costs)
    assert await verify(pool) == []
    # Unused for quota_idle_seconds, it is given back whole: nothing stays held.
    returned = await until(lambda: pool.fetchrow("SELECT * FROM quotas WHERE id = $1 AND state = 'returned'",
                                                 quota["id"]), "the idle quota is returned")
    assert returned["amount_micros"] == 0
    assert returned["granted_micros"] == returned["drawn_micros"] + returned["released_micros"]
    balance = await pool.fetchrow("SELECT credits_posted - debits_posted AS balance, held_micros FROM accounts"
                                  " WHERE id = $1", account_id)
    assert (balance["balance"], balance["held_micros"]) == (50_000_000 - sum(c["amount_micros"] for c in charges), 0)
    assert await verify(pool) == []


async def test_k_of_n_admission_stays_exact_with_a_quota(
        quota_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream) -> None:
    """N concurrent calls against a balance covering K worst cases: exactly K are admitted, part under the
    process's quota and part by per-call holds, and the quota's room is given back before any refusal stands. The
    calls ask for min_output_tokens, so a per-call hold is all or nothing, as a quota admission is."""
    account_id, secret = await make_customer(pool, balance_micros=1)
    worst = await worst_case(quota_client, secret, EXACT)
    await pool.execute("SELECT meterline_post($1, 'topup', $2, 'k of n')", account_id, 4 * worst - 1)
    warm_up = await chat(quota_client, secret, EXACT)  # a per-call hold; then a quota is taken
    assert warm_up.status == 200
    quota = await until(lambda: pending_quota(pool, account_id), "a quota is taken")
    balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account_id)
    k = balance // worst
    # The quota is half the available balance: 1.x worst cases, and so is what is left for per-call holds. One call
    # fits each; the third fits only once the quota's leftover room is given back.
    assert k == 3 and worst < quota["amount_micros"] < 2 * worst
    openrouter.hold_answers = True  # every admitted call stays in flight until all have been decided
    n = k + 8
    calls = [asyncio.ensure_future(chat(quota_client, secret, EXACT)) for _ in range(n)]
    try:
        await until(lambda: _settled_count(calls, openrouter, k), "every call admitted or refused")
    except AssertionError:
        print("DEBUG", openrouter.calls["chat"], sum(1 for c in calls if c.done()),
              [c.result().status for c in calls if c.done()],
              await pool.fetch("SELECT * FROM quotas WHERE account_id = $1", account_id),
              await pool.fetchrow("SELECT * FROM accounts WHERE id = $1", account_id))
        raise
    openrouter.release.set()
    statuses = sorted([(await call).status for call in calls])
    assert statuses == [200] * k + [402] * (n - k)
    under_quota = await pool.fetchval("SELECT count(*) FROM holds WHERE account_id = $1 AND quota_id IS NOT NULL",
                                      account_id)
    assert under_quota == 1  # both ways were used
    assert await verify(pool) == []
    left = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account_id)
    assert left >= 0


async def _settled_count(calls: list[asyncio.Future[Any]], openrouter: FakeUpstream, k: int,
                         warmups: int = 1) -> bool:
    """K calls (after the warm-ups) reached the upstream, where they wait, and every other call was answered."""
    refused = sum(1 for call in calls if call.done())
    return openrouter.calls["chat"] >= k + warmups and refused == len(calls) - k


async def test_a_key_with_a_spend_limit_never_uses_the_quota(
        quota_client: TestClient, pool: asyncpg.Pool) -> None:
    account_id, secret = await make_customer(pool, balance_micros=50_000_000)
    assert (await chat(quota_client, secret)).status == 200
    await until(lambda: pending_quota(pool, account_id), "a quota is taken")
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)
    await set_key_limits(pool, key_id, {"limit_micros": 10_000_000, "limit_reset": "monthly"})
    await asyncio.sleep(0.3)  # the key-change notification evicts the cached key (a revocation is the same path)
    for _ in range(3):
        assert (await chat(quota_client, secret)).status == 200
    rows = await pool.fetch("SELECT quota_id, key_limited FROM holds WHERE account_id = $1 ORDER BY created_at"
                            " OFFSET 1", account_id)
    assert [(r["quota_id"], r["key_limited"]) for r in rows] == [(None, True)] * 3
    assert await verify(pool) == []


async def test_a_gateway_killed_under_load_with_quotas_loses_no_answered_call_and_names_its_calls_in_flight(
        pool: asyncpg.Pool, database_url: str, aiohttp_server: Any) -> None:
    """SIGKILL a `meterline serve` process while 16 clients keep calls in flight under its quota (the upstream takes
    0.2 s to 0.95 s by client, so the calls in flight at the kill were admitted at different times). Afterwards: every
    answered call has exactly the charge its answer stated; nothing is held once the quota and holds expired; the
    reconciliation report names every call lost in flight but those admitted within the last beat (plus the
    scheduling slack of this machine) before the kill, and names no answered call; `meterline verify` passes."""
    arrivals: dict[str, float] = {}  # the client's id for a call -> when it reached the upstream (monotonic)

    async def upstream_chat(request: web.Request) -> web.Response:
        body = await request.json()
        call = body["messages"][0]["content"]
        arrivals[call] = time.monotonic()
        await asyncio.sleep(0.2 + 0.05 * int(call.split()[1].split("-")[0]))  # 0.2 s to 0.95 s by client
        return web.json_response({
            "id": "gen-kill", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}})

    app = web.Application()
    app.router.add_post("/api/v1/chat/completions", upstream_chat)
    fake = await aiohttp_server(app)
    funds = 100_000_000
    account_id, secret = await make_customer(pool, balance_micros=funds)
    beat, ttl = 0.05, 2.5
    env = {"METERLINE_DATABASE_URL": database_url, "METERLINE_REMOTE_CATALOG": "false",
           "METERLINE_UPSTREAMS__OPENROUTER__BASE_URL": str(fake.make_url("/api/v1")),
           "METERLINE_UPSTREAMS__OPENROUTER__API_KEY_ENV": UPSTREAM_KEY_ENV, UPSTREAM_KEY_ENV: UPSTREAM_KEY,
           "METERLINE_UPSTREAMS__OPENROUTER__TIMEOUT_SECONDS": "1.5", "METERLINE_HOLD_TTL_SECONDS": str(ttl),
           "METERLINE_DRAIN_SECONDS": "0.5", "METERLINE_QUOTA_BEAT_SECONDS": str(beat),
           "METERLINE_QUOTA_LEASE_SECONDS": "1",
           "METERLINE_SWEEP_INTERVAL_SECONDS": "60"}
    answered: dict[str, tuple[str, int]] = {}  # client id -> (Meterline's request id, X-Cost-Micros)
    unanswered: set[str] = set()
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession, base: str, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            call = f"call {worker}-{n}"
            try:
                async with http.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                     json={"model": MODEL, "messages": [{"role": "user", "content": call}],
                                           "max_tokens": 50}) as resp:
                    assert resp.status == 200, await resp.text()
                    await resp.read()
                    answered[call] = (resp.headers["X-Request-Id"], int(resp.headers["X-Cost-Micros"]))
            except aiohttp.ClientError:
                unanswered.add(call)
                return

    async with meterline_serve(env) as (base, proc), aiohttp.ClientSession() as http:
        workers = [asyncio.ensure_future(client(http, base, w)) for w in range(16)]
        await until(lambda: pending_quota(pool, account_id), "the gateway takes a quota")
        await asyncio.sleep(1.0)
        proc.kill()
        killed = time.monotonic()
        await proc.wait()
        stop.set()
        await asyncio.gather(*workers)
    # Another process's sweeps, once the per-call holds and the quota (hold TTL + a lease of 1 s after its last
    # beat) have expired.
    await asyncio.sleep(ttl + 1.0 + 0.5)
    await pool.execute("SELECT meterline_sweep(1000), meterline_quota_sweep(1000)")
    assert await pool.fetchval("SELECT held_micros FROM accounts WHERE id = $1", account_id) == 0
    quota = await pool.fetchrow("SELECT * FROM quotas WHERE account_id = $1", account_id)
    assert quota["state"] == "expired"
    charges = {r["request_id"]: r["amount_micros"] for r in await pool.fetch(
        "SELECT request_id, amount_micros FROM transfers WHERE kind = 'charge' AND account_id = $1", account_id)}
    assert len(answered) >= 16
    for request_id, cost in answered.values():
        assert charges.get(request_id) == cost
    balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account_id)
    assert balance == funds - sum(charges.values())
    # Charges of calls whose answer the kill cut off (committed, never sent) are allowed; none is doubled.
    assert len(charges) <= len(answered) + len(unanswered)
    counts, flags = await reports.flags(pool, start=datetime(2000, 1, 1, tzinfo=UTC),
                                        end=datetime(2100, 1, 1, tzinfo=UTC), limit=1000)
    named = {f["request_id"] for f in flags if f["kind"] in ("in_flight_unsettled", "expired_unsettled")}
    answered_ids = {request_id for request_id, _ in answered.values()}
    assert not named & answered_ids and not named & set(charges)
    lost = unanswered - {call for call in unanswered if call not in arrivals}  # reached the upstream, never answered
    early = {call for call in lost if arrivals[call] < killed - beat - 0.25}
    assert len(early) <= len(named) <= len(unanswered)
    assert counts["in_flight_unsettled"] >= 1  # the kill caught calls under the quota
    assert await verify(pool) == []


async def test_a_stream_under_a_quota_is_charged_before_its_done_and_a_revoked_key_stops_at_once(
        quota_client: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream) -> None:
    account_id, secret = await make_customer(pool, balance_micros=50_000_000)
    assert (await chat(quota_client, secret)).status == 200
    quota = await until(lambda: pending_quota(pool, account_id), "a quota is taken")
    resp = await quota_client.post(
        "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True,
              "stream_options": {"include_usage": True}})
    assert resp.status == 200
    text = await resp.text()
    assert text.rstrip().endswith("data: [DONE]")
    usage = [json.loads(line[6:]) for line in text.splitlines()
             if line.startswith("data: {") and '"usage"' in line][-1]["usage"]
    request_id = resp.headers["X-Request-Id"]
    hold = await pool.fetchrow("SELECT * FROM holds WHERE request_id = $1", request_id)
    charge = await pool.fetchval("SELECT amount_micros FROM transfers WHERE request_id = $1", request_id)
    assert (hold["quota_id"], hold["state"], charge) == (quota["id"], "settled", usage["cost_micros"])
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    await until(lambda: _refused(quota_client, secret), "the revoked key is refused", seconds=1.0)
    assert await verify(pool) == []


async def _refused(client: TestClient, secret: str) -> bool:
    return (await chat(client, secret)).status == 401


async def test_k_of_n_stays_exact_across_two_processes_with_quotas(
        aiohttp_client: Any, settings: Settings, openrouter_server: Any, pool: asyncpg.Pool,
        openrouter: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two gateways (two apps, two quota books) on one account, each holding a quota: N concurrent calls to one of
    them against a balance covering K are admitted exactly K times. A process refused a hold gives its own
    room back and recalls the other's (meterline_quota_recall) before the refusal stands."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    # quota_min_calls 1: no quota is given back for the balance running low during the burst, so only the refused
    # process's recall can bring the other's room back.
    quota_settings = point_at(settings, openrouter_server, quotas=True, quota_beat_seconds=0.05,
                              quota_min_calls=1, quota_share_ppm=500_000, quota_idle_seconds=5.0)
    first: TestClient = await aiohttp_client(create_app(quota_settings))
    second: TestClient = await aiohttp_client(create_app(quota_settings))
    account_id, secret = await make_customer(pool, balance_micros=1)
    worst = await worst_case(first, secret, EXACT)
    await pool.execute("SELECT meterline_post($1, 'topup', $2, 'k of n')", account_id, 20 * worst)
    for client in (first, second):
        assert (await chat(client, secret, EXACT)).status == 200
    await until(lambda: pool.fetchval("SELECT count(*) = 2 FROM quotas WHERE account_id = $1 AND state = 'pending'",
                                      account_id), "both processes take a quota")
    balance = await pool.fetchval("SELECT credits_posted - debits_posted FROM accounts WHERE id = $1", account_id)
    k = balance // worst
    assert k == 19
    openrouter.hold_answers = True
    n = k + 8
    # Every call goes to the first process: the second's quota sits idle with its room, which only a recall brings
    # back before the first process's refusals stand.
    calls = [asyncio.ensure_future(chat(first, secret, EXACT)) for _ in range(n)]
    await until(lambda: _settled_count(calls, openrouter, k, warmups=2), "every call admitted or refused")
    openrouter.release.set()
    statuses = sorted([(await call).status for call in calls])
    assert statuses == [200] * k + [402] * (n - k)
    idle = await pool.fetchrow("SELECT * FROM quotas WHERE account_id = $1 AND holder <> ALL ("
                               "SELECT q.holder FROM holds h JOIN quotas q ON q.id = h.quota_id)", account_id)
    assert idle["state"] == "returned" and idle["released_micros"] == idle["granted_micros"] > worst
    assert await verify(pool) == []
