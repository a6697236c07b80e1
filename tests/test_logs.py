"""Structured logs (issue 14): lines logged while a request is handled are JSON carrying its request_id and the
caller's account and key ids, never a secret; a connection's next request starts a fresh context."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import logs
from gateway.app import create_app
from gateway.settings import Settings, UpstreamSettings
from tests.chat_support import MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_customer
from tests.serving import free_port


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Every log line, as `meterline serve` writes it off a terminal (JSON), for the test's duration."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield out
    finally:
        root.removeHandler(handler)


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
