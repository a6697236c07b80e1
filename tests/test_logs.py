"""Structured logs (issue 14): lines logged while a request is handled are JSON carrying its request_id and the
caller's account and key ids, never a secret; a connection's next request starts a fresh context."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import logs
from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, cost
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream
from tests.serving import free_port


async def test_lines_logged_for_a_failed_upstream_call_carry_its_request_id_and_ids_and_no_secret(
        aiohttp_client: Any, settings: Settings, pool: asyncpg.Pool, json_lines: io.StringIO,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    nowhere = UpstreamSettings(base_url=f"http://127.0.0.1:{free_port()}/api/v1",  # nothing listens there
                               api_key_env=UPSTREAM_KEY_ENV, connect_timeout_seconds=2, timeout_seconds=10)
    client: TestClient = await aiohttp_client(create_app(settings.model_copy(
        update={"upstreams": {**settings.upstreams, "openrouter": nowhere}})))
    account_id, secret = await make_customer(pool, balance_micros=1_000_000)
    key_id = await pool.fetchval("SELECT id FROM api_keys WHERE account_id = $1", account_id)
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 502
    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]  # every line is JSON
    mine = [line for line in lines if line.get("request_id") == resp.headers["X-Request-Id"]]
    assert any(line["logger"] == "meterline.upstream" and "failed" in line["message"] for line in mine)
    assert all((line["account_id"], line["key_id"]) == (account_id, key_id) for line in mine)
    text = json_lines.getvalue()
    assert secret not in text and UPSTREAM_KEY not in text and ADMIN_TOKEN not in text


def test_a_new_request_starts_a_fresh_context_and_tasks_keep_theirs() -> None:
    logs.start("req_first")
    logs.bind(account_id="acct_a", key_id="key_a")
    inherited = logs.CONTEXT.get()
    logs.start("req_second")
    assert logs.CONTEXT.get() == {"request_id": "req_second"}
    assert inherited == {"request_id": "req_first", "account_id": "acct_a", "key_id": "key_a"}


def test_text_lines_on_a_terminal_name_the_request_and_json_lines_off_it_are_objects() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        for stream, check in ((Terminal(), lambda text: text.rstrip().endswith("[req_text]")),
                              (io.StringIO(), lambda text: json.loads(text)["request_id"] == "req_text")):
            logs.configure("auto", stream=stream)
            logs.start("req_text")
            logging.getLogger("meterline.test").warning("a line")
            assert check(stream.getvalue()), stream.getvalue()
    finally:
        root.handlers[:] = before
        root.setLevel(level)


async def test_the_access_log_is_one_json_line_per_request_with_its_cost_and_no_secret(
        aiohttp_client: Any, chat_settings: Settings, openrouter: FakeUpstream, pool: asyncpg.Pool,
        json_lines: io.StringIO, caplog: pytest.LogCaptureFixture) -> None:
    """A billed call, a streamed one, a 402 and an upstream error: each response's X-Request-Id has exactly one
    access line, JSON, with its route template, status, model and (when charged) the settled cost."""
    caplog.set_level(logging.INFO)
    client: TestClient = await aiohttp_client(create_app(chat_settings.model_copy(update={"access_log": True})))
    _, secret = await make_customer(pool, balance_micros=1_000_000)
    _, broke = await make_customer(pool, balance_micros=0)
    body = {"model": MODEL, "messages": MESSAGES}
    calls: list[tuple[str, int, int | None]] = []  # (request id, status, cost)
    billed = await client.post("/v1/chat/completions?dryRun=false", headers={"Authorization": f"Bearer {secret}"},
                               json=body)
    calls.append((billed.headers["X-Request-Id"], 200, cost(12, 5)))
    streamed = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                                 json={**body, "stream": True, "stream_options": {"include_usage": True}})
    await streamed.read()  # its charge committed before its last events were sent
    calls.append((streamed.headers["X-Request-Id"], 200, cost(12, 5)))
    refused = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {broke}"}, json=body)
    calls.append((refused.headers["X-Request-Id"], 402, None))
    openrouter.status = 503
    failed = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"}, json=body)
    calls.append((failed.headers["X-Request-Id"], 502, None))
    assert [billed.status, streamed.status, refused.status, failed.status] == [200, 200, 402, 502]

    lines = [json.loads(line) for line in json_lines.getvalue().splitlines()]  # every line is JSON
    for request_id, status, charged in calls:
        access = [line for line in lines if line["logger"] == "meterline.access"
                  and line.get("request_id") == request_id]
        assert len(access) == 1, (request_id, access)
        line = access[0]
        assert {k: line.get(k) for k in ("method", "route", "status", "model", "cost_micros")} == {
            "method": "POST", "route": "/v1/chat/completions", "status": status, "model": MODEL,
            "cost_micros": charged}
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["message"].startswith(f"POST /v1/chat/completions {status} ")
    # (aiohttp's own access lines are the test servers': `meterline serve` never writes them.)
    text = "\n".join(json.dumps(line) for line in lines if line["logger"] != "aiohttp.access")
    assert "dryRun" not in text  # no query string
    for leaked in (secret, broke, UPSTREAM_KEY, ADMIN_TOKEN):
        assert leaked not in text


async def test_no_access_line_unless_asked_for(client: TestClient, json_lines: io.StringIO,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert (await client.get("/healthz")).status == 200
    assert '"meterline.access"' not in json_lines.getvalue()


def test_text_access_lines_read_as_a_sentence_and_json_ones_carry_the_fields() -> None:
    record = logging.LogRecord("meterline.access", logging.INFO, __file__, 1, "%s", ("GET /healthz 200 1.5ms",),
                               None)
    record.fields = {"method": "GET", "route": "/healthz", "status": 200, "duration_ms": 1.5,
                     "message": "not over the message", "level": "not over the level"}
    line = json.loads(logs.JsonFormatter().format(record))
    assert (line["message"], line["level"], line["route"], line["status"], line["duration_ms"]) == (
        "GET /healthz 200 1.5ms", "info", "/healthz", 200, 1.5)
    assert logs.TextFormatter().format(record).endswith("INFO meterline.access: GET /healthz 200 1.5ms")
