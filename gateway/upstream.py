"""The upstream client: every call to an upstream API goes through here, on the app's one ClientSession.

It adds the upstream's own key (read from the environment variable its settings name), applies that upstream's
timeouts, and translates failures exactly once into OpenAI-shaped errors (`UpstreamError`, an `ApiError`):

    upstream 429                          -> 429 RATE_LIMITED
    upstream 400 / 404 / 413 / 422        -> 400 INVALID_REQUEST carrying the upstream's message
    other upstream 4xx / 5xx              -> 502 UPSTREAM_ERROR
    timeouts, refused or dropped sockets  -> 502 UPSTREAM_ERROR

Errors raised by the caller's own code while a response is open (such as a write to a client that went away)
pass through untranslated: only the request and the reads made through `UpstreamResponse` are translated.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import ApiError
from gateway.keys import HTTP, SETTINGS
from gateway.metrics import METRICS, Metrics
from gateway.render import dumps
from gateway.settings import Settings, UpstreamSettings

log = logging.getLogger("meterline.upstream")

# Upstream statuses that mean "the request itself is wrong": the client gets a 400 with the upstream's words.
_CLIENT_FAULT = frozenset({400, 404, 413, 422})
_MESSAGE_LIMIT = 1000
# Bodies past this are sent from a stream (aiohttp.payload.TOO_LARGE_BYTES_BODY).
_LARGE_BODY = 1024 * 1024


class UpstreamError(ApiError):
    """An upstream failure, already rendered OpenAI-shaped. `upstream_status` is the upstream's HTTP status
    (None when no response arrived: timeout, refused, dropped)."""

    def __init__(self, status: int, code: str, message: str, *, upstream_status: int | None,
                 type: str = "upstream_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(status, code, message, type=type, headers=headers)
        self.upstream_status = upstream_status


@dataclass(frozen=True, slots=True)
class Upstream:
    """One configured upstream: its name (for logs, request records and metric labels), settings, and the app's
    metrics (its failures are counted where they are translated)."""

    name: str
    settings: UpstreamSettings
    metrics: Metrics | None = field(default=None, compare=False, repr=False)

    def failed(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_error(self.name, kind)

    def url(self, path: str) -> str:
        return f"{self.settings.base_url}/{path.lstrip('/')}"

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Request headers carrying the upstream's own key. Nothing from the client's request is copied,
        so the client's Authorization can never reach an upstream."""
        headers = {"Accept": "application/json"}
        if extra:
            headers.update(extra)
        key = self.settings.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.settings.timeout_seconds, sock_connect=self.settings.connect_timeout_seconds
        )

    def redact(self, text: str) -> str:
        """Never echo a key back, even if an upstream quotes one in an error: ours, whole or in part, in any case
        (an upstream may truncate, mask or lower-case it), and anything shaped like an API key."""
        text = _KEY_SHAPED.sub("[redacted]", text)
        key = self.settings.api_key()
        return _without(text, key) if key else text


# Shapes of API keys an upstream's message might quote (OpenAI's and OpenRouter's sk-, ours ml-, ...).
_KEY_SHAPED = re.compile(r"(?i)\b(?:sk|ml|rk|pk|key)[-_][a-z0-9_\-]{12,}")
# The shortest run of a key's characters that counts as quoting it.
_KEY_RUN = 8


def _without(text: str, key: str) -> str:
    """`text` with every run of at least _KEY_RUN characters of `key` (compared case-insensitively) redacted."""
    lowered, secret = text.lower(), key.lower()
    spans: list[tuple[int, int]] = []
    start = 0
    while start <= len(lowered) - _KEY_RUN:
        if lowered[start:start + _KEY_RUN] in secret:
            end = start + _KEY_RUN
            while end < len(lowered) and lowered[start:end + 1] in secret:
                end += 1
            spans.append((start, end))
            start = end
        else:
            start += 1
    for begin, end in reversed(spans):
        text = text[:begin] + "[redacted]" + text[end:]
    return text


def upstream_named(app: web.Application, name: str) -> Upstream:
    settings = app[SETTINGS].upstreams.get(name)
    if settings is None:
        # A configuration fault, not the client's and not a passing one: say which upstream, nothing more.
        raise UpstreamError(503, "UPSTREAM_NOT_CONFIGURED",
                            f"The {name!r} upstream is not configured on this gateway, so this model cannot be "
                            "served; its operator sets [upstreams." + name + "] base_url", upstream_status=None,
                            type="server_error")
    return Upstream(name, settings, app.get(METRICS))


def report_unconfigured(settings: Settings) -> list[str]:
    """One log line per upstream whose API key variable is unset, and per upstream models name that is not
    configured at all (start-up; nothing is refused for it). Returns the lines."""
    lines = [f"upstream {name!r} has no API key: set the environment variable {up.api_key_env}"
             for name, up in settings.upstreams.items() if up.api_key() is None]
    named = {config.upstream or ("media" if config.modality != "text" else settings.text_upstream)
             for config in settings.models.values() if not config.providers} | {settings.text_upstream}
    named |= {provider.upstream for config in settings.models.values() for provider in config.providers or ()}
    lines += [f"upstream {name!r} is not configured: the models that use it answer 503 until [upstreams.{name}]"
              " base_url is set" for name in sorted(named - set(settings.upstreams))]
    for line in lines:
        log.warning("%s", line)
    return lines


def from_exception(exc: BaseException, upstream: Upstream) -> UpstreamError:
    """The one translation of a transport failure (timeout, refused, reset, malformed response)."""
    if isinstance(exc, TimeoutError):
        message, kind = f"The upstream {upstream.name} did not answer in time", "timeout"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        message, kind = f"The upstream {upstream.name} could not be reached", "unreachable"
    else:
        message, kind = f"The connection to the upstream {upstream.name} failed", "connection"
    upstream.failed(kind)
    log.warning("upstream %s failed: %s", upstream.name, type(exc).__name__)
    return UpstreamError(502, "UPSTREAM_ERROR", message, upstream_status=None)


def upstream_message(body: bytes) -> str | None:
    """The human message in an upstream error body (OpenAI/OpenRouter shape, or plain text)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:_MESSAGE_LIMIT] or None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_MESSAGE_LIMIT]
        if isinstance(error, str):
            return error[:_MESSAGE_LIMIT]
    return None


def from_status(status: int, body: bytes, upstream: Upstream) -> UpstreamError:
    """The one translation of an upstream error status."""
    message = upstream_message(body)
    log.warning("upstream %s answered %d", upstream.name, status)
    upstream.failed("rate_limited" if status == 429 else "rejected" if status in _CLIENT_FAULT else "error_status")
    if status == 429:
        return UpstreamError(429, "RATE_LIMITED",
                             f"The upstream {upstream.name} is rate limiting requests; retry later",
                             upstream_status=status, type="rate_limit_error")
    if status in _CLIENT_FAULT:
        text = upstream.redact(message) if message else f"The upstream {upstream.name} rejected the request"
        return UpstreamError(400, "INVALID_REQUEST", text, upstream_status=status,
                             type="invalid_request_error")
    return UpstreamError(502, "UPSTREAM_ERROR",
                         f"The upstream {upstream.name} failed with status {status}", upstream_status=status)


class UpstreamResponse:
    """An open, successful (status < 400) upstream response; its reads translate transport failures."""

    __slots__ = ("raw", "upstream")

    def __init__(self, raw: aiohttp.ClientResponse, upstream: Upstream) -> None:
        self.raw = raw
        self.upstream = upstream

    @property
    def status(self) -> int:
        return self.raw.status

    async def read(self) -> bytes:
        try:
            return await self.raw.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise from_exception(exc, self.upstream) from None

    async def json(self) -> Any:
        """The body as JSON. Numbers parse as Python's json does: a float's repr is its shortest exact
        spelling, so `Decimal(str(value))` recovers an upstream decimal such as usage.cost exactly."""
        body = await self.read()
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            self.upstream.failed("malformed")
            raise UpstreamError(502, "UPSTREAM_ERROR",
                                f"The upstream {self.upstream.name} sent a malformed response",
                                upstream_status=self.status) from None

    def release(self) -> None:
        """Give the connection back to the pool (aiohttp closes it instead if the body was not read)."""
        self.raw.release()

    def close(self) -> None:
        """Drop the connection: the upstream sees the request abandoned."""
        self.raw.close()


class EventReader:
    """Server-sent events from an upstream response as they arrive, each as its raw bytes ending in a blank
    line, so a relay can forward them without re-encoding. CRLF line ends are normalised to LF.

    The partial-event buffer lives on the object, not in a generator frame, so a read cancelled half-way (the
    handler cancelled) loses nothing and another task can carry on reading."""

    __slots__ = ("_buffer", "_done", "_events", "response")

    def __init__(self, response: UpstreamResponse) -> None:
        self.response = response
        self._buffer = b""
        self._events: deque[bytes] = deque()
        self._done = False

    async def next(self) -> bytes | None:
        """The next event, or None at the end of the stream. Transport failures raise UpstreamError."""
        while not self._events:
            if self._done:
                return None
            try:
                chunk = await self.response.raw.content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._done = True
                raise from_exception(exc, self.response.upstream) from None
            if not chunk:
                self._done = True
                if self._buffer.strip():
                    self._events.append(self._buffer + b"\n\n")
                self._buffer = b""
                continue
            self._split(chunk)
        return self._events.popleft()

    async def first_data(self) -> None:
        """Read up to the stream's first data event and keep everything read for `next`: until it arrives,
        nothing has been relayed, so a failure here (raised as UpstreamError, an error event included) can still
        be answered by another provider. A stream that ends first returns, its events kept."""
        read: list[bytes] = []
        try:
            while (event := await self.next()) is not None:
                read.append(event)
                if event.startswith(b"data:"):
                    if b'"error"' in event:
                        _raise_error_event(event, self.response.upstream)
                    return
        finally:
            self._events.extendleft(reversed(read))

    def _split(self, chunk: bytes) -> None:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while (end := buffer.find(b"\n\n", start)) != -1:
            self._events.append(buffer[start:end + 2])
            start = end + 2
        self._buffer = buffer[start:] if start else buffer


def _raise_error_event(event: bytes, upstream: Upstream) -> None:
    """An SSE data event that is an error (no choices): the upstream failed before generating anything."""
    payload = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return
    if not isinstance(data, dict) or data.get("choices") or data.get("error") is None:
        return
    error = data["error"]
    message = error.get("message") if isinstance(error, dict) else error
    log.warning("upstream %s failed its stream before any output", upstream.name)
    raise UpstreamError(502, "UPSTREAM_ERROR", upstream.redact(str(message or f"The upstream {upstream.name} "
                                                                    "failed")), upstream_status=200)


async def open_response(
    app: web.Application,
    upstream: Upstream,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    data: Any = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> UpstreamResponse:
    """Send one upstream call on the shared session and return its open, successful response; the caller
    must `release()` or `close()` it. Error statuses raise `UpstreamError` (with the connection released)."""
    session = app[HTTP]
    body: Any = data
    send_headers = upstream.headers(headers)
    if json_body is not None:
        body = dumps(json_body).encode()
        if len(body) > _LARGE_BODY:  # aiohttp writes a large bytes body in one go, blocking; a stream is chunked
            body = io.BytesIO(body)
        send_headers["Content-Type"] = "application/json"
    started = time.perf_counter()
    try:
        raw = await session.request(method, upstream.url(path), data=body, params=params,
                                    headers=send_headers, timeout=upstream.timeout())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise from_exception(exc, upstream) from None
    if upstream.metrics is not None:
        upstream.metrics.upstream_time(upstream.name, time.perf_counter() - started)
    if raw.status >= 400:
        try:
            error_body = await raw.read()
        except (aiohttp.ClientError, TimeoutError):
            error_body = b""
        finally:
            raw.release()
        raise from_status(raw.status, error_body, upstream)
    return UpstreamResponse(raw, upstream)


@asynccontextmanager
async def request(
    app: web.Application,
    upstream: Upstream,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    data: Any = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[UpstreamResponse]:
    """`open_response` as a context: the response is released (or its connection closed, if unread) on
    exit. Errors raised by the caller's code inside the block pass through untranslated."""
    response = await open_response(app, upstream, method, path, json_body=json_body, data=data,
                                   params=params, headers=headers)
    try:
        yield response
    finally:
        response.release()
