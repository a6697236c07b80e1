"""The admin API: authentication, accounts, keys, idempotent top-ups and adjustments, ledger history."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_TOKEN, admin_headers
from tests.factories import make_customer

ADMIN = admin_headers()


async def _create_account(client: TestClient, name: str = "acme") -> dict[str, Any]:
    resp = await client.post("/admin/accounts", json={"name": name}, headers=ADMIN)
    assert resp.status == 201
    body: dict[str, Any] = await resp.json()
    return body


async def _topup(client: TestClient, account: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post(f"/admin/accounts/{account}/topups", json=body,
                             headers={**ADMIN, "Idempotency-Key": key})
    return resp.status, await resp.json()


async def test_create_and_read_an_account(client: TestClient) -> None:
    created = await _create_account(client, "Acme Corp")
    assert created["name"] == "Acme Corp"
    assert (created["balance_micros"], created["held_micros"], created["available_micros"]) == (0, 0, 0)
    assert created["id"].startswith("acct_")
    resp = await client.get(f"/admin/accounts/{created['id']}", headers=ADMIN)
    assert resp.status == 200
    assert await resp.json() == created
    listing = await (await client.get("/admin/accounts", headers=ADMIN)).json()
    assert [a["id"] for a in listing["data"]] == [created["id"]]


async def test_account_listing_pages_visit_every_account_once(client: TestClient) -> None:
    ids = {(await _create_account(client, f"a{i}"))["id"] for i in range(7)}
    seen: list[str] = []
    cursor = ""
    while True:
        page = await (await client.get(f"/admin/accounts?limit=3&cursor={cursor}", headers=ADMIN)).json()
        seen += [a["id"] for a in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(ids) and len(seen) == 7


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {ADMIN_TOKEN}"}],
    ids=["no-token", "wrong-token", "wrong-scheme"],
)
async def test_admin_api_refuses_bad_credentials(client: TestClient, headers: dict[str, str]) -> None:
    resp = await client.get("/admin/accounts", headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "AUTHENTICATION_FAILED"


async def test_admin_api_refuses_a_customer_key(client: TestClient, pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool)
    resp = await client.get("/admin/accounts", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 401


async def test_without_a_configured_token_the_admin_api_refuses_everyone(
    aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool
) -> None:
    client = await aiohttp_client(create_app(settings.model_copy(update={"admin_token": None})))
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        resp = await client.get("/admin/accounts", headers=headers)
        assert resp.status == 401


async def test_ten_concurrent_topups_with_one_key_credit_once(client: TestClient, pool: asyncpg.Pool) -> None:
    account = (await _create_account(client))["id"]
    results = await asyncio.gather(
        *[_topup(client, account, {"amount_usd": "12.50"}, "topup-1") for _ in range(10)]
    )
    assert {status for status, _ in results} == {201}
    bodies = [body for _, body in results]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["balance_micros"] == 12_500_000
    assert bodies[0]["created_at"].endswith("Z")
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'topup'") == 1
    account_row = await (await client.get(f"/admin/accounts/{account}", headers=ADMIN)).json()
    assert account_row["balance_micros"] == 12_500_000
    assert await verify(pool) == []


async def test_a_reused_idempotency_key_with_another_body_is_refused(client: TestClient, pool: asyncpg.Pool) -> None:
    account = (await _create_account(client))["id"]
    assert (await _topup(client, account, {"amount_micros": 5_000_000}, "k"))[0] == 201
    status, body = await _topup(client, account, {"amount_micros": 6_000_000}, "k")
    assert status == 422
    assert body["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    assert await pool.fetchval("SELECT sum(amount_micros) FROM transfers") == 5_000_000


async def test_the_same_amount_in_usd_or_micros_is_the_same_request(client: TestClient) -> None:
    account = (await _create_account(client))["id"]
    first = await _topup(client, account, {"amount_usd": "3.000001"}, "same")
    again = await _topup(client, account, {"amount_micros": 3_000_001}, "same")
    assert first == again
    assert first[1]["balance_micros"] == 3_000_001


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount_micros": 0}, "amount_micros"),
        ({"amount_micros": -5}, "amount_micros"),
        ({"amount_micros": 2**63}, "amount_micros"),
        ({"amount_micros": "100"}, "amount_micros"),
        ({"amount_micros": 1.5}, "amount_micros"),
        ({"amount_usd": "0.0000001"}, None),
        ({"amount_usd": "abc"}, None),
        ({"amount_usd": "1e30"}, None),
        ({}, None),
        ({"amount_micros": 1, "amount_usd": "1"}, None),
        ({"amount_micros": 1, "colour": "red"}, "colour"),
        ({"amount_micros": 1, "description": "a\u0000b"}, "description"),
        ({"amount_usd": "1e100000000"}, None),
    ],
    ids=["zero", "negative", "past-2^63", "string-micros", "float-micros", "sub-micro-usd", "not-a-number",
         "huge-usd", "no-amount", "both-amounts", "unknown-field", "nul-in-text", "overflowing-usd"],
)
async def test_bad_topups_are_400_naming_the_problem(
    client: TestClient, pool: asyncpg.Pool, body: dict[str, Any], param: str | None
) -> None:
    account = (await _create_account(client))["id"]
    status, error = await _topup(client, account, body, "bad")
    assert status == 400
    assert error["error"]["code"] == "INVALID_REQUEST"
    assert error["error"]["param"] == param
    assert await pool.fetchval("SELECT count(*) FROM transfers") == 0


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"], ids=["malformed", "array", "empty", "not-utf8"]
)
async def test_malformed_bodies_are_400(client: TestClient, raw: bytes) -> None:
    resp = await client.post("/admin/accounts", data=raw, headers={**ADMIN, "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "INVALID_REQUEST"


async def test_topup_needs_an_idempotency_key(client: TestClient) -> None:
    account = (await _create_account(client))["id"]
    resp = await client.post(f"/admin/accounts/{account}/topups", json={"amount_micros": 1}, headers=ADMIN)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "Idempotency-Key"


async def test_topup_of_an_unknown_account_is_404(client: TestClient) -> None:
    status, body = await _topup(client, "acct_missing", {"amount_micros": 1}, "x")
    assert status == 404
    assert body["error"]["code"] == "NOT_FOUND"


async def test_a_balance_that_would_pass_2_63_is_refused(client: TestClient, pool: asyncpg.Pool) -> None:
    account = (await _create_account(client))["id"]
    assert (await _topup(client, account, {"amount_micros": 2**63 - 10}, "a"))[0] == 201
    status, body = await _topup(client, account, {"amount_micros": 100}, "b")
    assert status == 400
    assert "64-bit" in body["error"]["message"]
    assert await verify(pool) == []


async def test_adjustments_are_signed_need_a_reason_and_cannot_overdraw(client: TestClient) -> None:
    account = (await _create_account(client))["id"]
    await _topup(client, account, {"amount_micros": 1_000}, "fund")

    async def adjust(body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        resp = await client.post(f"/admin/accounts/{account}/adjustments", json=body,
                                 headers={**ADMIN, "Idempotency-Key": key})
        return resp.status, await resp.json()

    assert (await adjust({"amount_micros": -300}, "no-reason"))[0] == 400
    status, body = await adjust({"amount_micros": -300, "reason": "refund reversal"}, "a1")
    assert (status, body["balance_micros"], body["amount_micros"]) == (201, 700, -300)
    status, body = await adjust({"amount_micros": -701, "reason": "too much"}, "a2")
    assert status == 402
    assert (body["error"]["code"], body["error"]["available_micros"]) == ("INSUFFICIENT_BALANCE", 700)
    status, body = await adjust({"amount_usd": "0.0005", "reason": "goodwill"}, "a3")
    assert (status, body["balance_micros"]) == (201, 1_200)


async def test_ledger_history_is_newest_first_with_balance_after(client: TestClient) -> None:
    account = (await _create_account(client))["id"]
    for i, amount in enumerate([100, 200, 300, 400, 500]):
        await _topup(client, account, {"amount_micros": amount, "description": f"t{i}"}, f"k{i}")
    first = await (await client.get(f"/admin/accounts/{account}/ledger?limit=2", headers=ADMIN)).json()
    assert [(e["amount_micros"], e["balance_after_micros"], e["description"]) for e in first["data"]] == [
        (500, 1_500, "t4"), (400, 1_000, "t3")]
    assert first["has_more"] is True
    rest = await (await client.get(
        f"/admin/accounts/{account}/ledger?limit=10&cursor={first['next_cursor']}", headers=ADMIN)).json()
    assert [e["amount_micros"] for e in rest["data"]] == [300, 200, 100]
    assert rest["has_more"] is False
    assert all(e["kind"] == "topup" and e["created_at"].endswith("Z") for e in rest["data"])


async def test_keys_are_listed_without_secrets_and_revocation_is_immediate(client: TestClient) -> None:
    account = (await _create_account(client))["id"]
    resp = await client.post(f"/admin/accounts/{account}/keys", json={"name": "prod"}, headers=ADMIN)
    assert resp.status == 201
    created = await resp.json()
    secret = created["key"]
    assert secret.startswith("ml-") and created["prefix"] == secret[:11]
    listed = await (await client.get(f"/admin/accounts/{account}/keys", headers=ADMIN)).json()
    assert [k["id"] for k in listed["data"]] == [created["id"]]
    assert "key" not in listed["data"][0] and secret not in str(listed)

    customer = {"Authorization": f"Bearer {secret}"}
    assert (await client.get("/v1/balance", headers=customer)).status == 200
    revoked = await client.delete(f"/admin/keys/{created['id']}", headers=ADMIN)
    assert revoked.status == 200 and (await revoked.json())["revoked_at"] is not None
    assert (await client.get("/v1/balance", headers=customer)).status == 401


async def test_unknown_routes_and_ids_are_openai_shaped_404s(client: TestClient) -> None:
    for path in ("/admin/accounts/acct_nope", "/admin/nothing-here", "/v2/whatever"):
        resp = await client.get(path, headers=ADMIN)
        assert resp.status == 404
        body = await resp.json()
        assert body["error"]["code"] == "NOT_FOUND" and set(body["error"]) >= {"message", "type", "param"}
    resp = await client.delete("/admin/keys/key_nope", headers=ADMIN)
    assert resp.status == 404
