"""Secrets never reach a log line or a response: malformed header lines are refused without their content, the
access log drops query strings, and an upstream quoting our key (in any case, or in part) is redacted.

The gateway is served as `meterline serve` serves it (gateway.server), on a real socket; every log record of every
logger is captured, with its exception text, and searched for the secrets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MESSAGES, MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.factories import make_customer
from tests.fakes.upstream import FakeUpstream
from tests.serving import running

SECRET = "ml-" + "S3cr3tK3y" * 4 + "abcdefg"  # shaped like a customer key


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Everything logged: messages and exception text (tracebacks quote exception messages)."""
    handler = logging.Formatter()
    return "\n".join(handler.format(record) for record in caplog.records)


async def send(base: str, request: bytes) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


MALFORMED = {
    "control-character": b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode()
                         + b"\x01\r\n\r\n",
    "bare-lf": b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode()
               + b"\nX-Next: y\r\n\r\n",
    "obs-fold": b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + SECRET.encode() + b"\r\n\r\n",
    "over-8-kb": b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + SECRET.encode() + b"x" * 9_000
                 + b"\r\n\r\n",
    "space-before-colon": b"GET /v1/balance HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + SECRET.encode()
                          + b"\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_header_line_is_refused_without_its_content_in_the_answer_or_the_log(
        settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture, request_bytes: bytes) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(create_app(settings.model_copy(update={"access_log": True})),
                       handler_cancellation=False) as base:
        status, body = await send(base, request_bytes)
    assert status == 400
    assert json.loads(body)["error"]["code"] == "INVALID_REQUEST"
    assert SECRET.encode() not in body and b"S3cr3t" not in body
    text = logged(caplog)
    assert "refused a malformed HTTP request" in text
    assert "S3cr3t" not in text


async def test_the_access_log_never_holds_a_query_string(settings: Settings, pool: asyncpg.Pool,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    _, secret = await make_customer(pool)
    async with running(create_app(settings.model_copy(update={"access_log": True})),
                       handler_cancellation=False) as base:
        status, _ = await send(base, (f"GET /v1/balance?api_key={SECRET}&token=tok-S3cr3t HTTP/1.1\r\nHost: x\r\n"
                                      f"Authorization: Bearer {secret}\r\nConnection: close\r\n\r\n").encode())
    assert status == 200
    lines = [r for r in caplog.records if r.name == "meterline.access"]
    assert len(lines) == 1 and lines[0].getMessage().startswith("GET /v1/balance 200 ")
    assert not [r for r in caplog.records if r.name == "aiohttp.access"]
    text = logged(caplog)
    assert "S3cr3t" not in text and secret not in text and "api_key" not in text


@pytest.mark.parametrize("quoted", [UPSTREAM_KEY.upper(), UPSTREAM_KEY[:14] + "…", "…" + UPSTREAM_KEY[-12:],
                                    "Bearer sk-another-key-0123456789abcdef"],
                         ids=["upper-case", "truncated", "masked", "another-key"])
async def test_an_upstream_error_quoting_a_key_is_redacted(
        aiohttp_client: Any, settings: Settings, openrouter: FakeUpstream, openrouter_server: TestServer,
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, quoted: str) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    client = await aiohttp_client(create_app(point_at(settings, openrouter_server)))
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    openrouter.status, openrouter.error_message = 400, f"invalid api key: {quoted} (check it)"
    resp = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                             json={"model": MODEL, "messages": MESSAGES})
    message = (await resp.json())["error"]["message"]
    assert (resp.status, message) == (400, "invalid api key: " + ("[redacted]" if quoted[0] != "…" and
                                      not quoted.startswith("Bearer") else "") + _expected_tail(quoted))
    for text in (message, logged(caplog)):
        assert UPSTREAM_KEY.lower() not in text.lower()
        assert "0123456789abcdef" not in text and "secret-01234" not in text.lower()


def _expected_tail(quoted: str) -> str:
    if quoted.startswith("Bearer"):
        return "Bearer [redacted] (check it)"
    if quoted.startswith("…"):
        return "…[redacted] (check it)"
    return ("…" if quoted.endswith("…") else "") + " (check it)"
