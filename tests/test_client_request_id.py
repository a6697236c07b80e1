"""A client's own X-Request-Id (issue 14): a plain id of at most 128 characters is kept as `client_request_id` on
the call's record (chat, and a video job's record written when the job ends), on its log lines and in exports;
the id Meterline returns and stores as the record's key is still its own. Anything else in the header is ignored,
never a failed call."""

from __future__ import annotations

import io
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.chat_support import MODEL, UPSTREAM_KEY_ENV
from tests.chat_support import UPSTREAM_KEY as CHAT_UPSTREAM_KEY
from tests.factories import make_customer
from tests.fakes.media_upstream import UPSTREAM_KEY, media_settings
from tests.serving import free_port

ASK = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _auth(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **extra}



async def test_a_clients_request_id_is_kept_on_the_record_and_found_by_it_while_ours_is_returned(
        chat_client: TestClient, pool: asyncpg.Pool) -> None:
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    mine = "trace-7f3a_9b.c:01/x+y=@z"
    resp = await chat_client.post("/v1/chat/completions", json=ASK, headers=_auth(secret, **{"X-Request-Id": mine}))
    assert resp.status == 200, await resp.text()
    ours = resp.headers["X-Request-Id"]
    assert ours.startswith("req_") and ours != mine
    record = await (await chat_client.get(f"/v1/requests/{ours}", headers=_auth(secret))).json()
    assert (record["id"], record["client_request_id"]) == (ours, mine)
    other = await chat_client.post("/v1/chat/completions", json=ASK, headers=_auth(secret))
    assert other.status == 200
    found = await (await chat_client.get("/v1/requests", params={"client_request_id": mine},
                                         headers=_auth(secret))).json()
    assert [r["id"] for r in found["data"]] == [ours]
    assert await pool.fetchval("SELECT client_request_id FROM requests WHERE id = $1",
                               other.headers["X-Request-Id"]) is None


@pytest.mark.parametrize("header", ["has space", "x" * 129, "quote\"d", "semi;colon", "üñï", ""])
async def test_an_unusable_client_request_id_is_ignored_and_the_call_goes_through(
        chat_client: TestClient, pool: asyncpg.Pool, header: str) -> None:
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    resp = await chat_client.post("/v1/chat/completions", json=ASK,
                                  headers=_auth(secret, **{"X-Request-Id": header}))
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-Request-Id"].startswith("req_")
    assert await pool.fetchval("SELECT client_request_id FROM requests WHERE id = $1",
                               resp.headers["X-Request-Id"]) is None


async def test_log_lines_of_the_call_carry_the_clients_id_beside_ours(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, json_lines: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, CHAT_UPSTREAM_KEY)
    nowhere = UpstreamSettings(base_url=f"http://127.0.0.1:{free_port()}/api/v1",  # nothing listens: logged
                               api_key_env=UPSTREAM_KEY_ENV, connect_timeout_seconds=2, timeout_seconds=10)
    chat_client: TestClient = await aiohttp_client(create_app(settings.model_copy(
        update={"upstreams": {**settings.upstreams, "openrouter": nowhere}})))
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    resp = await chat_client.post("/v1/chat/completions", json=ASK,
                                  headers=_auth(secret, **{"X-Request-Id": "client-42"}))
    assert resp.status == 502
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == resp.headers["X-Request-Id"]]
    assert mine, "the refused call logged nothing"
    assert all(line["client_request_id"] == "client-42" for line in mine)
    assert secret not in json_lines.getvalue() and CHAT_UPSTREAM_KEY not in json_lines.getvalue()


async def test_a_video_jobs_record_written_when_it_ends_keeps_the_creating_calls_id(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, server: TestServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIA_API_KEY", UPSTREAM_KEY)
    api: TestClient = await aiohttp_client(create_app(media_settings(settings, server, video_poll_seconds=3600.0)))
    _, secret = await make_customer(pool, balance_micros=20_000_000)
    resp = await api.post("/v1/videos", json={"model": "sora-2", "prompt": "a capybara", "seconds": 4},
                          headers=_auth(secret, **{"X-Request-Id": "render-job-1"}))
    assert resp.status == 202, await resp.text()
    video = await resp.json()
    for _ in range(10):  # the fake completes after a few polls; each GET polls it
        if (await (await api.get(f"/v1/videos/{video['id']}", headers=_auth(secret))).json())["status"] \
                == "completed":
            break
    row = await pool.fetchrow("SELECT billing_status, client_request_id FROM requests WHERE id = $1",
                              resp.headers["X-Request-Id"])
    assert tuple(row) == ("settled", "render-job-1")


async def test_the_requests_export_carries_the_clients_id(
        chat_client: TestClient, pool: asyncpg.Pool) -> None:
    from tests.conftest import ADMIN_TOKEN

    _, secret = await make_customer(pool, balance_micros=1_000_000)
    resp = await chat_client.post("/v1/chat/completions", json=ASK,
                                  headers=_auth(secret, **{"X-Request-Id": "exp-1"}))
    assert resp.status == 200
    export = await chat_client.get("/admin/exports/requests", params={"from": "2000-01-01", "to": "2100-01-01"},
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert export.status == 200, await export.text()
    lines = (await export.text()).splitlines()
    header = lines[0].split(",")
    row = dict(zip(header, lines[1].split(","), strict=True))
    assert (row["id"], row["client_request_id"]) == (resp.headers["X-Request-Id"], "exp-1")


_SAFE = st.text(st.sampled_from("abcXYZ019._:/+=@-"), min_size=1, max_size=128)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(_SAFE, st.text(max_size=200)))
def test_only_plain_ids_of_at_most_128_characters_are_kept(value: str) -> None:
    from gateway.errors import _CLIENT_REQUEST_ID

    plain = 1 <= len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:/+=@-") for c in value)
    assert bool(_CLIENT_REQUEST_ID.fullmatch(value)) == plain
