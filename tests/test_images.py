"""Images through the gateway: generations and edits (through the official openai SDK where it has the call),
billed per image returned at the catalog's price for the size and quality asked, against a fake media upstream
on a real socket and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from billing import accounts
from billing.verify import verify
from gateway.app import create_app
from gateway.settings import Settings
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY, MediaUpstream, media_settings, tiny_png
from tests.serving import running

MODEL = "gemini-3-pro-image"
# The shipped price table (config/meterline.toml): the default, a size price and a size+quality price.
DEFAULT_UNIT = 134_000
HD_2048_UNIT = 180_000
BIG_UNIT = 240_000
FUNDS = 10_000_000


@pytest.fixture
async def api(aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
              monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    return await aiohttp_client(create_app(media_settings(settings, server, max_upload_bytes=64 * 1024)))  # type: ignore[no-any-return]


async def balance(pool: asyncpg.Pool, account_id: str) -> dict[str, Any]:
    return await accounts.get_account(pool, account_id)


def auth(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **extra}


async def test_generation_bills_the_price_table_times_images_returned(
    sdk: openai.AsyncOpenAI, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    result = await sdk.images.generate(model=MODEL, prompt="a lighthouse", n=2, size="2048x2048", quality="hd")

    assert len(result.data or []) == 2
    metadata = (result.model_extra or {})["metadata"]
    assert metadata["cost_micros"] == 2 * HD_2048_UNIT
    assert metadata["cost"] == 0.36
    account = await balance(pool, customer[0])
    assert account["balance_micros"] == FUNDS - 2 * HD_2048_UNIT
    assert account["held_micros"] == 0
    row = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", metadata["request_id"])
    assert (row["modality"], row["quantity"], row["cost_micros"], row["hold_micros"], row["status"]) == (
        "image", 2, 2 * HD_2048_UNIT, 2 * HD_2048_UNIT, "completed")
    assert row["endpoint"] == "/v1/images/generations"
    # The upstream got its own key, never the client's, and the body as sent (unknown fields kept).
    assert fake.calls["generations"] == 1
    assert fake.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert customer[1] not in str(fake.headers[0])
    assert fake.bodies[0] == {"model": MODEL, "prompt": "a lighthouse", "n": 2, "size": "2048x2048",
                              "quality": "hd"}
    assert await verify(pool) == []


async def test_fewer_images_returned_bill_fewer(
    sdk: openai.AsyncOpenAI, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    fake.images_returned = 1
    result = await sdk.images.generate(model=MODEL, prompt="three cats", n=3)

    assert len(result.data or []) == 1
    assert (result.model_extra or {})["metadata"]["cost_micros"] == DEFAULT_UNIT
    account = await balance(pool, customer[0])
    assert (account["balance_micros"], account["held_micros"]) == (FUNDS - DEFAULT_UNIT, 0)
    hold = await pool.fetchrow("SELECT amount_micros, actual_micros, state FROM holds")
    assert tuple(hold) == (3 * DEFAULT_UNIT, DEFAULT_UNIT, "settled")
    # Omitted size and quality were priced at the entry's defaults, and sent so that is what is generated.
    assert (fake.bodies[0]["size"], fake.bodies[0]["quality"]) == ("1024x1024", "standard")
    assert await verify(pool) == []


@pytest.mark.parametrize(("status", "error", "code"), [(500, openai.InternalServerError, 502),
                                                       (429, openai.RateLimitError, 429)],
                         ids=["upstream-500", "upstream-429"])
async def test_upstream_failure_charges_nothing(
    sdk: openai.AsyncOpenAI, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream,
    status: int, error: type[openai.APIStatusError], code: int,
) -> None:
    fake.status = status
    with pytest.raises(error) as caught:
        await sdk.images.generate(model=MODEL, prompt="x", n=4)
    assert caught.value.status_code == code
    account = await balance(pool, customer[0])
    assert (account["balance_micros"], account["held_micros"]) == (FUNDS, 0)
    assert await pool.fetchval("SELECT state FROM holds") == "voided"
    row = await pool.fetchrow("SELECT status, billing_status, cost_micros FROM requests")
    assert tuple(row) == ("upstream_failure", "voided", 0)
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'") == 0
    assert await verify(pool) == []


async def test_edit_with_two_pngs_and_a_mask_through_the_sdk(
    sdk: openai.AsyncOpenAI, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    first, second, mask = tiny_png(10), tiny_png(200), tiny_png(0)
    result = await sdk.images.edit(
        model=MODEL, prompt="make it blue", n=2, size="4096x4096",
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png")], mask=("m.png", mask, "image/png"),
    )

    assert (result.model_extra or {})["metadata"]["cost_micros"] == 2 * BIG_UNIT
    account = await balance(pool, customer[0])
    assert (account["balance_micros"], account["held_micros"]) == (FUNDS - 2 * BIG_UNIT, 0)
    [parts] = fake.parts
    files = [(p.name, p.filename, p.data) for p in parts if p.filename is not None]
    assert files == [("image[]", "a.png", first), ("image[]", "b.png", second), ("mask", "m.png", mask)]
    assert fake.bodies[0] == {"model": MODEL, "prompt": "make it blue", "n": "2", "size": "4096x4096",
                              "quality": "standard"}
    assert fake.headers[0]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert await pool.fetchval("SELECT endpoint FROM requests") == "/v1/images/edits"
    assert await verify(pool) == []


def edit_form(*, image: bytes | None = b"", prompt: str | None = "p", **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", MODEL)
    if prompt is not None:
        form.add_field("prompt", prompt)
    for name, value in fields.items():
        form.add_field(name, value)
    if image is not None:
        form.add_field("image", image or tiny_png(), filename="x.png", content_type="image/png")
    return form


@pytest.mark.parametrize(
    ("form", "param"),
    [(lambda: edit_form(image=None), "image"), (lambda: edit_form(prompt=None), "prompt"),
     (lambda: edit_form(size="333x333"), "size"), (lambda: edit_form(quality="ultra"), "quality")],
    ids=["missing-image", "missing-prompt", "unknown-size", "unknown-quality"],
)
async def test_edit_refuses_incomplete_or_unpriced_requests(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream, form: Any, param: str
) -> None:
    resp = await api.post("/openai/v1/images/edits", data=form(), headers=auth(customer[1]))
    body = await resp.json()
    assert resp.status == 400
    assert (body["error"]["code"], body["error"]["param"]) == ("INVALID_REQUEST", param)
    assert param in body["error"]["message"]
    assert fake.calls["edits"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_unknown_size_names_the_allowed_sizes(
    sdk: openai.AsyncOpenAI, pool: asyncpg.Pool, fake: MediaUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.images.generate(model=MODEL, prompt="x", size="512x512")
    message = caught.value.message
    assert "1024x1024, 1536x1024, 1024x1536, 2048x2048, 4096x4096" in message
    assert fake.calls["generations"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_oversize_upload_is_413_and_reaches_nothing(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    big = tiny_png() + bytes(100 * 1024)  # the fixture's max_upload_bytes is 64 KiB
    resp = await api.post("/v1/images/edits", data=edit_form(image=big), headers=auth(customer[1]))
    body = await resp.json()
    assert resp.status == 413
    assert body["error"]["code"] == "REQUEST_TOO_LARGE"
    assert "65536 bytes" in body["error"]["message"]
    assert fake.calls["edits"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


async def test_dry_run_equals_the_real_hold_for_generations_and_edits(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    account_id, secret = customer
    generation = {"model": MODEL, "prompt": "x", "n": 3, "size": "2048x2048", "quality": "hd"}
    dry = await api.post("/v1/images/generations?dryRun=true", json=generation, headers=auth(secret))
    estimate = await dry.json()
    assert dry.status == 200
    assert estimate == {
        "estimated": True, "model": MODEL, "provider": "media", "total_cost_micros": 3 * HD_2048_UNIT,
        "currency": "USD",
        "components": [{"type": "output", "metric": "image", "quantity": 3, "billable_quantity": 3,
                        "unit_price_micros": HD_2048_UNIT, "total_cost_micros": 3 * HD_2048_UNIT}],
        "available_micros": FUNDS, "sufficient_balance": True,
    }
    dry_edit = await api.post("/v1/images/edits?dryRun=true", data=edit_form(n="2", size="4096x4096"),
                              headers=auth(secret))
    edit_estimate = await dry_edit.json()
    assert edit_estimate["total_cost_micros"] == 2 * BIG_UNIT
    # Nothing was called or held by the estimates.
    assert sum(fake.calls.values()) == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
    assert (await balance(pool, account_id))["available_micros"] == FUNDS

    real = await api.post("/v1/images/generations", json=generation, headers=auth(secret))
    real_edit = await api.post("/v1/images/edits", data=edit_form(n="2", size="4096x4096"), headers=auth(secret))
    assert (real.status, real_edit.status) == (200, 200)
    holds = {r["endpoint"]: r["hold_micros"] for r in await pool.fetch("SELECT endpoint, hold_micros FROM requests")}
    assert holds == {"/v1/images/generations": estimate["total_cost_micros"],
                     "/v1/images/edits": edit_estimate["total_cost_micros"]}
    assert await verify(pool) == []


async def test_dry_run_rejects_a_bad_value_and_invalid_bodies_like_a_real_call(
    api: TestClient, customer: tuple[str, str]
) -> None:
    bad = await api.post("/v1/images/generations?dryRun=yes", json={"model": MODEL, "prompt": "x"},
                         headers=auth(customer[1]))
    assert (bad.status, (await bad.json())["error"]["param"]) == (400, "dryRun")
    no_prompt = await api.post("/v1/images/generations?dryRun=true", json={"model": MODEL},
                               headers=auth(customer[1]))
    assert (no_prompt.status, (await no_prompt.json())["error"]["param"]) == (400, "prompt")
    unknown = await api.post("/v1/images/generations?dryRun=true", json={"model": "nope", "prompt": "x"},
                             headers=auth(customer[1]))
    assert (unknown.status, (await unknown.json())["error"]["code"]) == (404, "MODEL_NOT_FOUND")


async def test_idempotency_key_replays_one_result_and_refuses_another_body(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    account_id, secret = customer
    body = {"model": MODEL, "prompt": "once", "n": 2}
    headers = auth(secret, **{"Idempotency-Key": "img-1"})
    first = await api.post("/v1/images/generations", json=body, headers=headers)
    again = await api.post("/openai/v1/images/generations", json=body, headers=headers)
    assert (first.status, again.status) == (200, 200)
    assert await again.json() == await first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert fake.calls["generations"] == 1
    assert await pool.fetchval("SELECT count(*) FROM holds") == 1
    assert (await balance(pool, account_id))["balance_micros"] == FUNDS - 2 * DEFAULT_UNIT

    other = await api.post("/v1/images/generations", json={**body, "n": 1}, headers=headers)
    assert (other.status, (await other.json())["error"]["code"]) == (422, "IDEMPOTENCY_CONFLICT")
    assert fake.calls["generations"] == 1
    assert await verify(pool) == []


async def test_failed_request_frees_its_idempotency_key_for_a_retry(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    body = {"model": MODEL, "prompt": "retry me"}
    headers = auth(customer[1], **{"Idempotency-Key": "img-retry"})
    fake.status = 503
    failed = await api.post("/v1/images/generations", json=body, headers=headers)
    fake.status = None
    retried = await api.post("/v1/images/generations", json=body, headers=headers)
    assert (failed.status, retried.status) == (502, 200)
    assert fake.calls["generations"] == 2
    assert (await balance(pool, customer[0]))["balance_micros"] == FUNDS - DEFAULT_UNIT
    assert await verify(pool) == []


async def test_a_claim_orphaned_by_a_dead_process_is_taken_over_once_it_is_stale(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    """A process killed between claiming the key and storing the result leaves an unfinished claim. Until it
    is older than a hold's lifetime it answers 409; after that one retry takes it over and runs."""
    body = {"model": MODEL, "prompt": "orphan"}
    headers = auth(customer[1], **{"Idempotency-Key": "img-orphan"})
    assert (await api.post("/v1/images/generations", json=body, headers=headers)).status == 200
    await pool.execute("UPDATE idempotency_keys SET response = NULL, status_code = NULL")  # the orphan
    fresh = await api.post("/v1/images/generations", json=body, headers=headers)
    assert (fresh.status, (await fresh.json())["error"]["code"]) == (409, "CONFLICT")
    await pool.execute("UPDATE idempotency_keys SET created_at = now() - interval '1 hour'")
    retries = await asyncio.gather(*[api.post("/v1/images/generations", json=body, headers=headers)
                                     for _ in range(3)])
    ran = [r for r in retries if r.status == 200 and "Idempotent-Replayed" not in r.headers]
    others = {(r.status, r.headers.get("Idempotent-Replayed")) for r in retries if r not in ran}
    assert len(ran) == 1  # exactly one retry took the claim over; the rest waited on it or replayed it
    assert others <= {(409, None), (200, "true")}
    assert fake.calls["generations"] == 2
    assert (await balance(pool, customer[0]))["balance_micros"] == FUNDS - 2 * DEFAULT_UNIT
    assert await verify(pool) == []


async def test_insufficient_balance_is_402_and_reaches_nothing(
    api: TestClient, pool: asyncpg.Pool, fake: MediaUpstream
) -> None:
    account_id, secret = await make_customer(pool, balance_micros=DEFAULT_UNIT)
    resp = await api.post("/v1/images/generations", json={"model": MODEL, "prompt": "x", "n": 2},
                          headers=auth(secret))
    body = await resp.json()
    assert resp.status == 402
    assert (body["error"]["code"], body["error"]["required_micros"]) == ("INSUFFICIENT_BALANCE", 2 * DEFAULT_UNIT)
    assert fake.calls["generations"] == 0
    assert (await balance(pool, account_id))["available_micros"] == DEFAULT_UNIT
    assert await verify(pool) == []


async def test_oversize_chunked_upload_is_counted_as_it_streams(
    api: TestClient, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):  # 160 KiB, with no Content-Length to refuse it up front
            yield bytes(8192)

    writer = aiohttp.MultipartWriter("form-data")
    for name, value in (("model", MODEL), ("prompt", "p")):
        writer.append(value).set_content_disposition("form-data", name=name)
    writer.append(chunks(), {"Content-Type": "image/png"}).set_content_disposition(
        "form-data", name="image", filename="x.png")
    resp = await api.post("/v1/images/edits", data=writer, headers=auth(customer[1]))
    assert resp.request_info.headers.get("Content-Length") is None
    assert (resp.status, (await resp.json())["error"]["code"]) == (413, "REQUEST_TOO_LARGE")
    assert fake.calls["edits"] == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0


@pytest.mark.parametrize(("handler_cancellation", "state", "charged"),
                         [(False, "settled", 2 * DEFAULT_UNIT), (True, "voided", 0)],
                         ids=["handler-runs-on", "handler-cancelled"])
async def test_client_that_gives_up_mid_call_leaves_no_pending_hold(
    settings: Settings, server: TestServer, pool: asyncpg.Pool, customer: tuple[str, str], fake: MediaUpstream,
    monkeypatch: pytest.MonkeyPatch, handler_cancellation: bool, state: str, charged: int,
) -> None:
    """The client disconnects while the upstream is still working. If the handler runs on (aiohttp's default,
    as under `meterline serve`), the images produced are billed once; if it is cancelled, the hold is voided.
    Either way the hold does not linger."""
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    fake.delay = 0.3
    app = create_app(media_settings(settings, server))
    async with running(app, handler_cancellation=handler_cancellation) as base, aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(session.post(
            f"{base}/v1/images/generations", json={"model": MODEL, "prompt": "slow", "n": 2},
            headers=auth(customer[1])))
        # The upstream has the call (so the hold exists) before the client gives up: no race with the hold.
        for _ in range(1_000):  # bounds on waiting, not timing assertions
            if fake.calls["generations"]:
                break
            await asyncio.sleep(0.01)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        for _ in range(1_000):
            if await pool.fetchval("SELECT state FROM holds") not in (None, "pending"):
                break
            await asyncio.sleep(0.02)
    assert await pool.fetchval("SELECT state FROM holds") == state
    assert await pool.fetchval("SELECT count(*) FROM transfers WHERE kind = 'charge'") == (1 if charged else 0)
    account = await balance(pool, customer[0])
    assert (account["balance_micros"], account["held_micros"]) == (FUNDS - charged, 0)
    assert await verify(pool) == []


@pytest.mark.parametrize(
    ("body", "param"),
    [({"model": 5, "prompt": "x"}, "model"), ({"model": MODEL, "prompt": ["x"]}, "prompt"),
     ({"model": MODEL, "prompt": "a\u0000b"}, "prompt"), ({"model": MODEL, "prompt": "x", "n": 1.5}, "n"),
     ({"model": MODEL, "prompt": "x", "n": 10**30}, "n"), ({"model": MODEL, "prompt": "x", "size": 5}, "size")],
    ids=["model-not-text", "prompt-not-text", "prompt-with-nul", "n-fraction", "n-huge", "size-not-text"],
)
async def test_malformed_generation_is_400_naming_the_field(
    api: TestClient, customer: tuple[str, str], fake: MediaUpstream, body: dict[str, Any], param: str
) -> None:
    resp = await api.post("/v1/images/generations", json=body, headers=auth(customer[1]))
    assert (resp.status, (await resp.json())["error"]["param"]) == (400, param)
    assert fake.calls["generations"] == 0
