"""Bad input is a 400 naming the problem, never a 500: every case the attack on issue 10 found, as a table.

Each request is written byte for byte on a socket (so a header can carry bytes no client library would send),
to a gateway whose upstreams are fakes that count their calls: nothing bad reaches an upstream, and nothing is
held. The text of the body is checked before it can reach PostgreSQL or an upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.settings import Settings
from tests.chat_support import MODEL, UPSTREAM_KEY, UPSTREAM_KEY_ENV, point_at
from tests.conftest import ADMIN_TOKEN
from tests.factories import make_customer
from tests.fakes.media_upstream import MediaUpstream, media_settings
from tests.fakes.upstream import FakeUpstream

CHAT = "/v1/chat/completions"


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


# (id, method, path, extra header lines, body, key: "customer" | "admin", expected param)
CASES: list[tuple[str, str, str, list[bytes], bytes, str, str | None]] = [
    ("lone-surrogate-in-user", "POST", CHAT, [], chat_body().replace(b'"hi"}]', b'"hi"}], "user": "a\\ud800b"'),
     "customer", "user"),
    ("lone-surrogate-in-content", "POST", CHAT, [],
     b'{"model": "%s", "messages": [{"role": "user", "content": "x\\udc00"}]}' % MODEL.encode(), "customer",
     "messages.0.content"),
    ("lone-surrogate-in-a-tool", "POST", CHAT, [],
     chat_body().replace(b'"hi"}]', b'"hi"}], "tools": [{"type": "function", "function": {"name": "\\ud83d"}}]'),
     "customer", "tools.0.function.name"),
    ("lone-surrogate-in-image-prompt", "POST", "/v1/images/generations", [],
     b'{"model": "gemini-3-pro-image", "prompt": "\\ud800"}', "customer", "prompt"),
    ("lone-surrogate-in-video-prompt", "POST", "/v1/videos", [],
     b'{"model": "sora-2", "prompt": "a \\udfff"}', "customer", "prompt"),
    ("lone-surrogate-in-admin-name", "POST", "/admin/accounts", [], b'{"name": "Acme \\ud800"}', "admin", "name"),
    ("nul-in-content", "POST", CHAT, [], chat_body().replace(b'"hi"', b'"h\\u0000i"'), "customer",
     "messages.0.content"),
    ("5000-digit-integer", "POST", CHAT, [], chat_body().replace(b'"hi"}]', b'"hi"}], "seed": ' + b"9" * 5000),
     "customer", None),
    ("integer-beyond-64-bits", "POST", CHAT, [], chat_body(seed=2**64), "customer", "seed"),
    ("user-too-long", "POST", CHAT, [], chat_body(user="u" * 257), "customer", "user"),
    ("non-utf8-authorization", "POST", CHAT, [b"Authorization: Bearer ml-\xff\xfe"], chat_body(), "none",
     "Authorization"),
    ("non-utf8-idempotency-key", "POST", "/v1/images/generations", [b"Idempotency-Key: k\xff"],
     b'{"model": "gemini-3-pro-image", "prompt": "x"}', "customer", "Idempotency-Key"),
    ("non-utf8-admin-idempotency-key", "POST", "/admin/accounts/acct_x/topups", [b"Idempotency-Key: \xe9\xe9"],
     b'{"amount_micros": 5}', "admin", "Idempotency-Key"),
    ("base64-cursor-decoding-to-nul", "GET",
     "/v1/requests?cursor=" + base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|req_\x00").decode(), [], b"",
     "customer", "cursor"),
    ("superscript-ledger-cursor", "GET", "/admin/accounts/acct_x/ledger?cursor=%C2%B2", [], b"", "admin", "cursor"),
    ("ledger-cursor-beyond-bigint", "GET", "/admin/accounts/acct_x/ledger?cursor=99999999999999999999", [], b"",
     "admin", "cursor"),
    ("deflate-garbage", "POST", CHAT, [b"Content-Encoding: deflate"], b"this is not deflate data", "customer", None),
    ("multipart-part-with-an-invalid-header-line", "POST", "/v1/videos",
     [b"Content-Type: multipart/form-data; boundary=XX"], b"--XX\r\n502--XX--\r\n", "customer", None),
    ("duplicate-multipart-field", "POST", "/v1/images/edits",
     [b"Content-Type: multipart/form-data; boundary=XX"],
     b"".join(b'--XX\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % pair for pair in [
         (b"model", b"gemini-3-pro-image"), (b"prompt", b"p"), (b"n", b"1"), (b"n", b"4")])
     + b'--XX\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nPNG\r\n--XX--\r\n',
     "customer", "n"),
]


async def raw_request(server: TestServer, method: str, path: str, lines: list[bytes], body: bytes) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = b"%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: %d\r\n" % (
        method.encode(), path.encode(), len(body))
    if not any(line.lower().startswith(b"content-type") for line in lines) and body:
        head += b"Content-Type: application/json\r\n"
    writer.write(head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body)
    await writer.drain()
    response = await reader.read()
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


@pytest.fixture
async def gateway(aiohttp_client: Any, settings: Settings, openrouter_server: TestServer, server: TestServer,
                  pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv("MEDIA_API_KEY", "media-key")
    client: TestClient = await aiohttp_client(create_app(media_settings(point_at(settings, openrouter_server),
                                                                        server)))
    return client


@pytest.mark.parametrize(("method", "path", "lines", "body", "who", "param"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
async def test_bad_input_is_a_400_naming_it_and_reaches_nothing(
        gateway: TestClient, pool: asyncpg.Pool, openrouter: FakeUpstream, fake: MediaUpstream, method: str,
        path: str, lines: list[bytes], body: bytes, who: str, param: str | None) -> None:
    _, secret = await make_customer(pool, balance_micros=10_000_000)
    auth = {"customer": [b"Authorization: Bearer " + secret.encode()],
            "admin": [b"Authorization: Bearer " + ADMIN_TOKEN.encode()], "none": []}[who]
    assert gateway.server is not None
    status, answer = await raw_request(gateway.server, method, path, auth + lines, body)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "INVALID_REQUEST", param), answer
    assert openrouter.calls["chat"] == 0 and sum(fake.calls.values()) == 0
    assert await pool.fetchval("SELECT count(*) FROM holds") == 0
    # The 400 never echoes what it refused (a header's bytes may be a secret).
    assert "\\udc" not in json.dumps(answer) and "ml-\\u00ff" not in json.dumps(answer)
